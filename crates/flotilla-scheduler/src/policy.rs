//! The routing decision, pure and synchronous: a [`Snapshot`] (the group, its agents and
//! their load, each target's health, the local queue) and a [`RequestInfo`] in, a
//! [`Decision`] with a human-readable reason out.
//!
//! Local agents are one target with many nodes. Its TTFT is predicted from the queue: the
//! requests that would be served before this one, divided by the model's drain rate (slots
//! over the measured mean latency, Little's law), plus the measured TTFT. A target "meets the
//! SLA" when its predicted TTFT is within the request's TTFT deadline and its predicted
//! finish within the total deadline. The strategy orders the targets that meet it; those that
//! miss it follow as failover, fastest first.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::health::{Admit, HealthView};
use crate::queue::{Waiting, ahead_of};
use crate::{Capability, ModelGroup, Priority, RequestInfo, SchedulerError, Strategy};

/// Scheduler-wide knobs the policy reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySettings {
    /// Batch work waiting this long competes as interactive.
    pub age_boost: Duration,
    /// Hard cap on a model's local queue; past it, requests without a cloud target get 503.
    pub max_queued: u64,
    /// Prefix affinity may send a node this many more requests than the least loaded one.
    pub affinity_max_imbalance: u64,
    /// Fill one agent's batch before starting another (true) or spread (false).
    pub pack: bool,
    /// TTFT assumed for a target nothing has measured yet.
    pub prior_ttft: Duration,
    /// Request latency assumed for local agents before one was measured.
    pub prior_latency: Duration,
    /// Generated tokens/s assumed for one sequence before one was measured.
    pub prior_tokens_per_s: f64,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            age_boost: Duration::from_secs(30),
            max_queued: 1024,
            affinity_max_imbalance: 2,
            pack: true,
            prior_ttft: Duration::from_millis(500),
            prior_latency: Duration::from_secs(5),
            prior_tokens_per_s: 30.0,
        }
    }
}

/// An agent that serves the model, with its load and health.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalCandidate {
    pub node_id: String,
    pub base_url: String,
    pub model: String,
    /// Requests this scheduler has sent there and not yet seen finish.
    pub in_flight: u64,
    /// Running + waiting as the agent's last heartbeat said (includes other schedulers').
    pub reported_load: u64,
    pub max_running: u64,
    pub context_length: u64,
    /// Generated tokens/s the agent measured over its last seconds (0 = idle or unknown).
    pub tokens_per_second: f64,
    pub health: HealthView,
}

impl LocalCandidate {
    pub fn load(&self) -> u64 {
        self.in_flight.max(self.reported_load)
    }
    pub fn free(&self) -> u64 {
        self.max_running.saturating_sub(self.load())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local {
        node_id: String,
        base_url: String,
        model: String,
    },
    Cloud {
        provider: String,
        model: String,
    },
}

impl Target {
    /// What `x-flotilla-target` says: `local:<node>/<model>` or `cloud:<provider>`.
    pub fn label(&self) -> String {
        match self {
            Target::Local { node_id, model, .. } => format!("local:{node_id}/{model}"),
            Target::Cloud { provider, .. } => format!("cloud:{provider}"),
        }
    }
    pub fn is_local(&self) -> bool {
        matches!(self, Target::Local { .. })
    }
    pub fn model(&self) -> &str {
        match self {
            Target::Local { model, .. } | Target::Cloud { model, .. } => model,
        }
    }
}

/// Everything the policy looks at for one request.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub group: &'a ModelGroup,
    /// Healthy agents serving the group's local model.
    pub locals: &'a [LocalCandidate],
    /// Health of `group.cloud[i]`, same order (missing entries count as unmeasured).
    pub cloud: &'a [HealthView],
    /// The model's local queue, this request excluded.
    pub waiting: &'a [Waiting],
    /// The node that last served this request's prefix.
    pub affinity: Option<&'a str>,
    pub settings: &'a PolicySettings,
    pub now: Instant,
}

/// Why the first target was chosen; the code is a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// A local agent has a free slot and meets the SLA.
    LocalCapacity,
    /// Every local slot is busy; waiting for one still meets the SLA.
    LocalQueue,
    /// Batch work without a deadline waits for local capacity.
    BatchWaits,
    /// The request would wait behind more than `max_queue_depth` others locally.
    QueueDepthExceeded,
    /// The predicted local TTFT misses the deadline.
    DeadlineMiss,
    /// No healthy agent serves the model (or none fits the request).
    NoLocal,
    /// Cost strategy: the cheapest target that meets the SLA is a cloud one.
    Cheapest,
    /// Latency strategy: a cloud target has the lowest predicted TTFT.
    Fastest,
    /// Failover strategy: the configured order.
    Ordered,
    /// Weighted strategy: drawn by weight.
    Weighted,
    /// No target meets the SLA: the fastest one is tried.
    NoneMeetsSla,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 11] = [
        ReasonCode::LocalCapacity,
        ReasonCode::LocalQueue,
        ReasonCode::BatchWaits,
        ReasonCode::QueueDepthExceeded,
        ReasonCode::DeadlineMiss,
        ReasonCode::NoLocal,
        ReasonCode::Cheapest,
        ReasonCode::Fastest,
        ReasonCode::Ordered,
        ReasonCode::Weighted,
        ReasonCode::NoneMeetsSla,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::LocalCapacity => "local_capacity",
            ReasonCode::LocalQueue => "local_queue",
            ReasonCode::BatchWaits => "batch_waits",
            ReasonCode::QueueDepthExceeded => "queue_depth_exceeded",
            ReasonCode::DeadlineMiss => "deadline_miss",
            ReasonCode::NoLocal => "no_local",
            ReasonCode::Cheapest => "cheapest",
            ReasonCode::Fastest => "fastest",
            ReasonCode::Ordered => "ordered",
            ReasonCode::Weighted => "weighted",
            ReasonCode::NoneMeetsSla => "none_meets_sla",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Send to `targets[0]` now; the rest are the failover order.
    Dispatch,
    /// Wait for a local slot; if none comes within `spill_after` (from now), go to
    /// `targets` (the cloud fallbacks) instead.
    Enqueue { spill_after: Option<Duration> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub targets: Vec<Target>,
    pub code: ReasonCode,
    /// One line a person can read: the numbers behind the choice.
    pub reason: String,
    pub strategy: Strategy,
    /// Predicted TTFT of the chosen target (for a queued request, local's).
    pub predicted_ttft: Duration,
    /// Requests ahead of this one in the local queue (0 = a slot is free).
    pub position: u64,
}

/// One target the request may go to, with its predictions.
#[derive(Debug, Clone)]
struct Choice {
    label: String,
    /// None = the local agents; Some(i) = `group.cloud[i]`.
    cloud: Option<usize>,
    ttft: Duration,
    /// A TTFT it rarely exceeds (mean + 2 standard deviations when measured, 1.5 x the
    /// expectation before): how early a queued request must leave for it.
    ttft_high: Duration,
    /// Estimated US dollars; None = unknown price.
    cost: Option<f64>,
    meets_sla: bool,
    /// Local only: past `max_queue_depth` (not eligible to lead unless nothing else can).
    overflow: bool,
    weight: u32,
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// The local queue seen by one request: how many go first and how fast it drains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalForecast {
    pub free_slots: u64,
    pub ahead: u64,
    /// Requests that must finish before this one starts (0 = starts now).
    pub position: u64,
    /// Requests finished per second across all agents.
    pub drain_per_s: f64,
    pub wait: Duration,
    pub ttft: Duration,
    /// Generated tokens/s for one sequence.
    pub tokens_per_s: f64,
    /// Whether the latency figures are measured (false = priors).
    pub measured: bool,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs.fold((0u32, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

/// Predicts the local wait and TTFT for a request of `priority` arriving now.
pub fn forecast_local(
    locals: &[&LocalCandidate],
    waiting: &[Waiting],
    priority: Priority,
    s: &PolicySettings,
    now: Instant,
) -> LocalForecast {
    let free_slots = locals.iter().fold(0u64, |a, c| a.saturating_add(c.free()));
    let slots = locals
        .iter()
        .fold(0u64, |a, c| a.saturating_add(c.max_running))
        .max(1);
    let ahead = ahead_of(waiting, priority, now, s.age_boost);
    let position = if ahead < free_slots {
        0
    } else {
        ahead - free_slots + 1
    };
    let latency = mean(
        locals
            .iter()
            .filter_map(|c| c.health.latency.map(|d| d.as_secs_f64())),
    );
    let ttft = mean(
        locals
            .iter()
            .filter_map(|c| c.health.ttft.map(|d| d.as_secs_f64())),
    );
    let tps = mean(locals.iter().filter_map(|c| c.health.tokens_per_s));
    let measured = latency.is_some();
    let latency = latency.unwrap_or(s.prior_latency.as_secs_f64()).max(1e-3);
    let drain_per_s = slots as f64 / latency;
    let wait_s = position as f64 / drain_per_s;
    let ttft_s = ttft.unwrap_or(s.prior_ttft.as_secs_f64());
    LocalForecast {
        free_slots,
        ahead,
        position,
        drain_per_s,
        wait: Duration::from_secs_f64(wait_s.min(1e9)),
        ttft: Duration::from_secs_f64((wait_s + ttft_s).min(1e9)),
        tokens_per_s: tps.unwrap_or(s.prior_tokens_per_s).max(1e-3),
        measured,
    }
}

/// Decides where one request goes.
pub fn decide(snap: &Snapshot<'_>, req: &RequestInfo) -> Result<Decision, SchedulerError> {
    let group = snap.group;
    let s = snap.settings;
    let rule = group
        .rules
        .iter()
        .find(|r| r.matches(req.tag.as_deref(), req.prompt_tokens));
    let strategy = req
        .strategy
        .or(rule.and_then(|r| r.strategy))
        .unwrap_or(group.strategy);
    let ttft_budget = req.ttft_deadline.map(|d| d.saturating_sub(req.waited));
    let budget = req.deadline.map(|d| d.saturating_sub(req.waited));
    let mut unfit: Vec<String> = Vec::new();
    let mut blocked: Vec<(String, Admit)> = Vec::new();

    // Local agents: those that fit the request and whose breaker admits it.
    let local_allowed = strategy != Strategy::CloudOnly && rule.is_none_or(|r| r.allows("local"));
    let missing_local: Vec<Capability> = req
        .needs
        .iter()
        .copied()
        .filter(|c| !group.local_capabilities.contains(c))
        .collect();
    let mut locals: Vec<&LocalCandidate> = Vec::new();
    if local_allowed && !snap.locals.is_empty() {
        if !missing_local.is_empty() {
            let names: Vec<&str> = missing_local.iter().map(|c| c.as_str()).collect();
            unfit.push(format!("local agents lack {}", names.join(", ")));
        } else {
            for c in snap.locals {
                if req.prompt_tokens >= c.context_length {
                    unfit.push(format!(
                        "local:{} context {} < prompt ~{} tokens",
                        c.node_id, c.context_length, req.prompt_tokens
                    ));
                } else if !c.health.admit.allowed() {
                    blocked.push((format!("local:{}", c.node_id), c.health.admit));
                } else {
                    locals.push(c);
                }
            }
        }
    }

    let mut options: Vec<Choice> = Vec::new();
    let mut forecast = None;
    if !locals.is_empty() {
        let f = forecast_local(&locals, snap.waiting, req.priority, s, snap.now);
        let finish = f.ttft + Duration::from_secs_f64(req.max_tokens as f64 / f.tokens_per_s);
        // Local GPU time: the GPU-hour shared by everything it generates at once. Prefill is
        // roughly ten times faster than decode, so a prompt token costs a tenth.
        let slots = locals
            .iter()
            .fold(0u64, |a, c| a.saturating_add(c.max_running))
            .max(1);
        let throughput: f64 = locals
            .iter()
            .map(|c| c.tokens_per_second)
            .sum::<f64>()
            .max(f.tokens_per_s * slots as f64);
        let tokens = req.max_tokens as f64 + req.prompt_tokens as f64 / 10.0;
        let cost = group.gpu_hour_usd / 3600.0 * tokens / throughput;
        let batch_waits = req.priority == Priority::Batch
            && req.ttft_deadline.is_none()
            && req.deadline.is_none();
        options.push(Choice {
            label: "local".into(),
            cloud: None,
            ttft: f.ttft,
            ttft_high: f.ttft,
            cost: Some(cost),
            meets_sla: ttft_budget.is_none_or(|b| f.ttft <= b)
                && budget.is_none_or(|b| finish <= b),
            overflow: !batch_waits && f.position > group.max_queue_depth,
            weight: group.local_weight,
        });
        forecast = Some(f);
    }

    // Cloud targets that fit the request and are admitted.
    if strategy != Strategy::LocalOnly {
        for (i, t) in group.cloud.iter().enumerate() {
            let label = t.label();
            if rule.is_some_and(|r| !r.allows(&label)) {
                continue;
            }
            if let Some(c) = req.needs.iter().find(|c| !t.supports(**c)) {
                unfit.push(format!("{label} lacks {}", c.as_str()));
                continue;
            }
            if let Some(ctx) = t.context_length
                && req.prompt_tokens >= ctx
            {
                unfit.push(format!(
                    "{label} context {ctx} < prompt ~{} tokens",
                    req.prompt_tokens
                ));
                continue;
            }
            let h = snap.cloud.get(i).copied().unwrap_or_default();
            if !h.admit.allowed() {
                blocked.push((label, h.admit));
                continue;
            }
            let ttft = h
                .ttft
                .or(t.expected_ttft_ms.map(Duration::from_millis))
                .unwrap_or(s.prior_ttft);
            let ttft_high = match (h.ttft, h.ttft_dev) {
                (Some(m), Some(d)) => m + d * 2,
                _ => ttft.mul_f64(1.5),
            };
            let tps = h.tokens_per_s.unwrap_or(s.prior_tokens_per_s).max(1e-3);
            let finish = ttft + Duration::from_secs_f64(req.max_tokens as f64 / tps);
            let cost = match (t.input_usd_per_mtok, t.output_usd_per_mtok) {
                (Some(i), Some(o)) => {
                    Some((req.prompt_tokens as f64 * i + req.max_tokens as f64 * o) / 1e6)
                }
                _ => None,
            };
            options.push(Choice {
                label,
                cloud: Some(i),
                ttft,
                ttft_high,
                cost,
                meets_sla: ttft_budget.is_none_or(|b| ttft <= b)
                    && budget.is_none_or(|b| finish <= b),
                overflow: false,
                weight: t.weight,
            });
        }
    }

    if options.is_empty() {
        // The field to blame: a capability nobody has, else the prompt's length.
        let param = req
            .needs
            .iter()
            .find(|c| {
                !group.local_capabilities.contains(c)
                    && group.cloud.iter().all(|t| !t.supports(**c))
            })
            .map_or("messages", |c| c.param());
        let param = Some(param);
        return Err(no_option(group, strategy, &unfit, &blocked, param));
    }

    // Order: eligible (meets the SLA, not past the queue limit) by strategy, then the rest
    // fastest first.
    let (mut eligible, mut rest): (Vec<Choice>, Vec<Choice>) = options
        .into_iter()
        .partition(|o| o.meets_sla && !o.overflow);
    let config_order = |o: &Choice| o.cloud.map_or(0, |i| i + 1);
    match strategy {
        Strategy::Cost => eligible.sort_by(|a, b| {
            let ca = a.cost.unwrap_or(f64::INFINITY);
            let cb = b.cost.unwrap_or(f64::INFINITY);
            ca.total_cmp(&cb)
                .then(a.ttft.cmp(&b.ttft))
                .then(config_order(a).cmp(&config_order(b)))
        }),
        Strategy::Latency => eligible.sort_by(|a, b| {
            a.ttft
                .cmp(&b.ttft)
                .then(config_order(a).cmp(&config_order(b)))
        }),
        Strategy::Failover | Strategy::LocalOnly | Strategy::CloudOnly => {
            eligible.sort_by_key(config_order)
        }
        Strategy::Weighted => {
            eligible.sort_by_key(config_order);
            let total: u64 = eligible.iter().map(|o| o.weight as u64).sum();
            if total > 0 {
                let mut pick = req.split_key % total;
                let idx = eligible
                    .iter()
                    .position(|o| {
                        if pick < o.weight as u64 {
                            true
                        } else {
                            pick -= o.weight as u64;
                            false
                        }
                    })
                    .unwrap_or(0);
                let chosen = eligible.remove(idx);
                eligible.insert(0, chosen);
            }
        }
    }
    rest.sort_by(|a, b| {
        // Within the rest, local past its queue limit goes last only if something else can
        // take the request; otherwise it is the one place to wait.
        a.overflow
            .cmp(&b.overflow)
            .then(a.ttft.cmp(&b.ttft))
            .then(config_order(a).cmp(&config_order(b)))
    });
    let any_eligible = !eligible.is_empty();
    let mut order = eligible;
    order.extend(rest);
    let first = &order[0];

    // Expand into targets: the local option becomes its nodes with a free slot.
    let mut targets = Vec::new();
    for o in &order {
        match o.cloud {
            Some(i) => {
                let t = &group.cloud[i];
                targets.push(Target::Cloud {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                });
            }
            None => targets.extend(local_order(&locals, snap.affinity, s).into_iter().map(|c| {
                Target::Local {
                    node_id: c.node_id.clone(),
                    base_url: c.base_url.clone(),
                    model: c.model.clone(),
                }
            })),
        }
    }

    let mut reason = String::new();
    let code;
    let position = forecast.map_or(0, |f| f.position);
    if first.cloud.is_none() {
        let f = forecast.expect("local option implies a forecast");
        let _ = write!(
            reason,
            "local: {} ahead, {} free slots, drains {:.2} req/s{}, predicted TTFT {}",
            f.ahead,
            f.free_slots,
            f.drain_per_s,
            if f.measured { "" } else { " (prior)" },
            secs(f.ttft)
        );
        if let Some(b) = ttft_budget {
            let _ = write!(reason, " (deadline {})", secs(b));
        }
        code = if !any_eligible {
            ReasonCode::NoneMeetsSla
        } else if f.position == 0 {
            ReasonCode::LocalCapacity
        } else if req.priority == Priority::Batch
            && req.ttft_deadline.is_none()
            && req.deadline.is_none()
        {
            ReasonCode::BatchWaits
        } else {
            ReasonCode::LocalQueue
        };
        if f.position > 0 {
            if snap.waiting.len() as u64 >= s.max_queued {
                // The queue is at its hard cap: take any other target now, or refuse.
                let others: Vec<Target> = targets.into_iter().filter(|t| !t.is_local()).collect();
                if others.is_empty() {
                    return Err(SchedulerError::QueueFull {
                        model: group.name.clone(),
                        depth: snap.waiting.len() as u64,
                    });
                }
                let _ = write!(reason, "; queue at its cap of {}", s.max_queued);
                return Ok(Decision {
                    action: Action::Dispatch,
                    targets: others,
                    code: ReasonCode::QueueDepthExceeded,
                    reason,
                    strategy,
                    predicted_ttft: order.get(1).map_or(f.ttft, |o| o.ttft),
                    position,
                });
            }
            // Cloud fallbacks for a spill, and when to spill: early enough that the best
            // one meets the TTFT deadline even when it is slower than usual.
            let clouds: Vec<(&Choice, Target)> = order
                .iter()
                .filter(|o| o.cloud.is_some())
                .zip(targets.iter().filter(|t| !t.is_local()).cloned())
                .collect();
            let spill_after = match (ttft_budget, clouds.iter().map(|(o, _)| o.ttft_high).min()) {
                (Some(b), Some(cloud_ttft)) => Some(b.saturating_sub(cloud_ttft)),
                _ => None,
            };
            if let Some(sp) = spill_after {
                let _ = write!(reason, "; spills after {} in the queue", secs(sp));
            }
            return Ok(Decision {
                action: Action::Enqueue { spill_after },
                targets: clouds.into_iter().map(|(_, t)| t).collect(),
                code,
                reason,
                strategy,
                predicted_ttft: f.ttft,
                position,
            });
        }
    } else {
        let local = order.iter().find(|o| o.cloud.is_none());
        code = match (forecast, local) {
            (Some(f), Some(o)) if o.overflow => {
                let _ = write!(
                    reason,
                    "local queue position {} > max_queue_depth {}; ",
                    f.position, group.max_queue_depth
                );
                ReasonCode::QueueDepthExceeded
            }
            (Some(f), Some(o)) if !o.meets_sla => {
                let _ = write!(
                    reason,
                    "local predicted TTFT {} ({} ahead at {:.2} req/s{}) misses the deadline; ",
                    secs(f.ttft),
                    f.ahead,
                    f.drain_per_s,
                    if f.measured { "" } else { ", prior" },
                );
                ReasonCode::DeadlineMiss
            }
            _ if !any_eligible => ReasonCode::NoneMeetsSla,
            _ => match strategy {
                Strategy::Weighted => ReasonCode::Weighted,
                Strategy::Failover | Strategy::CloudOnly => ReasonCode::Ordered,
                Strategy::Latency => ReasonCode::Fastest,
                Strategy::Cost | Strategy::LocalOnly if forecast.is_none() => ReasonCode::NoLocal,
                Strategy::Cost | Strategy::LocalOnly => ReasonCode::Cheapest,
            },
        };
        let _ = write!(
            reason,
            "{} predicted TTFT {}",
            first.label,
            secs(first.ttft)
        );
        if let Some(c) = first.cost {
            let _ = write!(reason, ", ~${c:.6}");
        }
        if let Some(b) = ttft_budget {
            let _ = write!(reason, " (deadline {})", secs(b));
        }
    }
    if !blocked.is_empty() {
        let b: Vec<String> = blocked
            .iter()
            .map(|(l, a)| format!("{l} {}", a.as_str()))
            .collect();
        let _ = write!(reason, "; skipped {}", b.join(", "));
    }
    Ok(Decision {
        action: Action::Dispatch,
        targets,
        code,
        reason,
        strategy,
        predicted_ttft: first.ttft,
        position,
    })
}

/// Agents with a free slot in the order to try them: the prefix's last node while it is
/// within the allowed imbalance, then fullest first (pack, so requests share a batch) or
/// emptiest first (spread).
pub fn local_order<'a>(
    locals: &[&'a LocalCandidate],
    affinity: Option<&str>,
    s: &PolicySettings,
) -> Vec<&'a LocalCandidate> {
    let mut free: Vec<&LocalCandidate> = locals.iter().copied().filter(|c| c.free() > 0).collect();
    free.sort_by(|a, b| {
        // Compare load relative to capacity without dividing.
        let la = a.load() as u128 * b.max_running.max(1) as u128;
        let lb = b.load() as u128 * a.max_running.max(1) as u128;
        let by_load = if s.pack { lb.cmp(&la) } else { la.cmp(&lb) };
        by_load.then_with(|| a.node_id.cmp(&b.node_id))
    });
    if let Some(node) = affinity
        && let Some(i) = free.iter().position(|c| c.node_id == node)
    {
        let least = free.iter().map(|c| c.load()).min().unwrap_or(0);
        if free[i].load().saturating_sub(least) <= s.affinity_max_imbalance {
            let c = free.remove(i);
            free.insert(0, c);
        }
    }
    free
}

/// The error when nothing can take the request, by the most telling cause.
fn no_option(
    group: &ModelGroup,
    strategy: Strategy,
    unfit: &[String],
    blocked: &[(String, Admit)],
    param: Option<&'static str>,
) -> SchedulerError {
    if !unfit.is_empty() && blocked.is_empty() {
        return SchedulerError::Unfit {
            model: group.name.clone(),
            detail: unfit.join("; "),
            param,
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

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
