//! From the ordered options to the [`Decision`]: the action, the reason code, and the line
//! a person reads with the numbers behind the choice.

use std::fmt::Write as _;
use std::time::Duration;

use super::candidates::{Candidates, Choice, Via, batch_waits, missing_everywhere};
use super::forecast::LocalForecast;
use super::{Action, Decision, ReasonCode, Snapshot, Target, strategy};
use crate::health::Admit;
use crate::{RequestInfo, SchedulerError, Strategy};

/// What every explanation looks at.
pub(super) struct Ctx<'s, 'a> {
    pub snap: &'s Snapshot<'a>,
    pub req: &'s RequestInfo,
    pub strategy: Strategy,
    pub cands: &'s Candidates<'a>,
    /// All options, the one to try first at the front.
    pub order: &'s [Choice],
    /// Whether any option meets the SLA.
    pub any_eligible: bool,
}

pub(super) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn ttft_budget(req: &RequestInfo) -> Option<Duration> {
    req.ttft_deadline.map(|d| d.saturating_sub(req.waited))
}

fn decision(
    c: &Ctx<'_, '_>,
    action: Action,
    code: ReasonCode,
    reason: String,
    ttft: Duration,
) -> Decision {
    Decision {
        action,
        code,
        reason,
        strategy: c.strategy,
        predicted_ttft: ttft,
        position: c.cands.forecast.map_or(0, |f| f.position),
    }
}

/// The local agents lead: dispatch to a free slot, or wait in the queue (spilling to the
/// cloud in time for the deadline), or, with the queue at its cap, go elsewhere now.
pub(super) fn local_lead(
    c: &Ctx<'_, '_>,
    targets: Vec<Target>,
) -> Result<Decision, SchedulerError> {
    let Some(f) = c.cands.forecast else {
        return Err(SchedulerError::NoTarget {
            model: c.snap.group.name.clone(),
            strategy: c.strategy.as_str(),
        });
    };
    let s = c.snap.settings;
    let mut reason = format!(
        "local: {} ahead, {} free slots, drains {:.2} req/s{}, predicted TTFT {} (p{:.0} {})",
        f.ahead,
        f.free_slots,
        f.drain_per_s,
        if f.measured { "" } else { " (prior)" },
        secs(f.ttft),
        s.sla_attainment * 100.0,
        secs(c.order[0].ttft_q),
    );
    if let Some(cost) = c.order[0].cost {
        let _ = write!(reason, ", ~${cost:.6} marginal+opportunity");
    }
    if let Some(b) = ttft_budget(c.req) {
        let _ = write!(reason, " (deadline {})", secs(b));
    }
    let code = if !c.any_eligible {
        ReasonCode::NoneMeetsSla
    } else if f.position == 0 {
        ReasonCode::LocalCapacity
    } else if batch_waits(c.req) {
        ReasonCode::BatchWaits
    } else {
        ReasonCode::LocalQueue
    };
    if f.position == 0 {
        skipped(c, &mut reason);
        return Ok(decision(
            c,
            Action::Dispatch { targets },
            code,
            reason,
            f.ttft,
        ));
    }
    wait_for_a_slot(c, f, targets, code, reason)
}

/// Every slot is taken: wait in the queue, spilling to the cloud in time for the
/// deadline, or, with the queue at its cap, go elsewhere now.
fn wait_for_a_slot(
    c: &Ctx<'_, '_>,
    f: LocalForecast,
    targets: Vec<Target>,
    code: ReasonCode,
    mut reason: String,
) -> Result<Decision, SchedulerError> {
    let s = c.snap.settings;
    let others: Vec<Target> = targets.into_iter().filter(|t| !t.is_local()).collect();
    if c.snap.waiting.len() as u64 >= s.max_queued {
        // The queue is at its hard cap: take any other target now, or refuse.
        if others.is_empty() {
            return Err(SchedulerError::QueueFull {
                model: c.snap.group.name.clone(),
                depth: c.snap.waiting.len() as u64,
            });
        }
        let _ = write!(reason, "; queue at its cap of {}", s.max_queued);
        let next = c
            .order
            .iter()
            .find(|o| o.via != Via::Local)
            .map_or(f.ttft, |o| o.ttft);
        return Ok(decision(
            c,
            Action::Dispatch { targets: others },
            ReasonCode::QueueDepthExceeded,
            reason,
            next,
        ));
    }
    // When to spill: early enough that the fallback the request will go to first still
    // meets the TTFT deadline at the tail.
    let first_cloud = c
        .order
        .iter()
        .find(|o| o.via != Via::Local)
        .map(|o| o.ttft_q);
    let spill_after = match (ttft_budget(c.req), first_cloud) {
        (Some(b), Some(q)) => Some(b.saturating_sub(q)),
        _ => None,
    };
    if let Some(sp) = spill_after {
        let _ = write!(reason, "; spills after {} in the queue", secs(sp));
    }
    skipped(c, &mut reason);
    Ok(decision(
        c,
        Action::Enqueue {
            spill_after,
            fallbacks: others,
        },
        code,
        reason,
        f.ttft,
    ))
}

/// A cloud target leads: why (the local option's miss, or the strategy's choice).
pub(super) fn cloud_lead(c: &Ctx<'_, '_>, targets: Vec<Target>) -> Decision {
    let first = &c.order[0];
    let mut reason = String::new();
    let local = c.order.iter().find(|o| o.via == Via::Local);
    let code = match (c.cands.forecast, local) {
        (Some(f), Some(o)) if o.overflow => {
            let _ = write!(
                reason,
                "local queue position {} > max_queue_depth {}; ",
                f.position, c.snap.group.max_queue_depth
            );
            ReasonCode::QueueDepthExceeded
        }
        (Some(f), Some(o)) if !o.meets_sla => {
            let _ = write!(
                reason,
                "local predicted TTFT {} (p{:.0} {}; {} ahead at {:.2} req/s{}) misses the deadline; ",
                secs(f.ttft),
                c.snap.settings.sla_attainment * 100.0,
                secs(o.ttft_q),
                f.ahead,
                f.drain_per_s,
                if f.measured { "" } else { ", prior" },
            );
            ReasonCode::DeadlineMiss
        }
        _ if !c.any_eligible => ReasonCode::NoneMeetsSla,
        (f, _) => strategy::of(c.strategy).cloud_reason(f.is_some()),
    };
    let _ = write!(
        reason,
        "{} predicted TTFT {} (p{:.0} {})",
        first.label,
        secs(first.ttft),
        c.snap.settings.sla_attainment * 100.0,
        secs(first.ttft_q),
    );
    if let Some(cost) = first.cost {
        let _ = write!(reason, ", ~${cost:.6}");
    }
    if let Some(o) = local
        && let Some(cost) = o.cost
        && o.meets_sla
        && !o.overflow
    {
        let _ = write!(reason, " vs local ~${cost:.6}");
    }
    if let Some(b) = ttft_budget(c.req) {
        let _ = write!(reason, " (deadline {})", secs(b));
    }
    skipped(c, &mut reason);
    decision(c, Action::Dispatch { targets }, code, reason, first.ttft)
}

fn skipped(c: &Ctx<'_, '_>, reason: &mut String) {
    if c.cands.blocked.is_empty() {
        return;
    }
    let b: Vec<String> = c
        .cands
        .blocked
        .iter()
        .map(|(l, a)| format!("{l} {}", a.as_str()))
        .collect();
    let _ = write!(reason, "; skipped {}", b.join(", "));
}

/// The error when nothing can take the request, by the most telling cause.
pub(super) fn no_option(
    snap: &Snapshot<'_>,
    req: &RequestInfo,
    strategy: Strategy,
    cands: &Candidates<'_>,
) -> SchedulerError {
    let group = snap.group;
    let (unfit, blocked) = (&cands.unfit, &cands.blocked);
    if !unfit.is_empty() && blocked.is_empty() {
        // The field to blame: a capability nobody has, else the prompt's length.
        let missing = missing_everywhere(snap, req);
        let param = match missing {
            Some(c) => c.param(),
            None if req.requested_max_tokens.is_some() => "max_tokens",
            None => "messages",
        };
        return SchedulerError::Unfit {
            model: group.name.clone(),
            detail: unfit.join("; "),
            param: Some(param),
            too_long: missing.is_none(),
        };
    }
    if !blocked.is_empty() && blocked.iter().all(|(_, a)| *a == Admit::RateLimited) {
        return SchedulerError::RateLimited {
            model: group.name.clone(),
        };
    }
    if !blocked.is_empty() {
        let b: Vec<String> = blocked
            .iter()
            .map(|(l, a)| format!("{l} {}", a.as_str()))
            .collect();
        return SchedulerError::AllUnhealthy {
            model: group.name.clone(),
            detail: b.join(", "),
        };
    }
    SchedulerError::NoTarget {
        model: group.name.clone(),
        strategy: strategy.as_str(),
    }
}
