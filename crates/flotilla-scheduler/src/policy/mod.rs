//! The routing decision, pure and synchronous: a [`Snapshot`] (the group, its agents and
//! their load, each target's health, the local queue) and a [`RequestInfo`] in, a
//! [`Decision`] with a human-readable reason out. One step each, in its own unit:
//! - [`candidates`]: the targets that fit the request and are admitted, with predictions.
//!   Local agents are one option with many nodes; their TTFT is the queue wait (requests
//!   ahead over the drain rate, Little's law) plus their measured TTFT. Local work is priced
//!   at its marginal cost plus an opportunity cost that grows as free capacity shrinks.
//! - [`sla`]: each target's TTFT tail; a target meets the SLA when the TTFT it stays within
//!   with probability `sla_attainment` fits the deadline, and its finish the total one.
//! - [`strategy`]: one unit per strategy orders those that meet it; the rest follow as
//!   failover, likeliest to meet the deadlines first.
//! - [`explain`]: the action (dispatch, or wait in the queue and when to spill), the reason
//!   code and the line a person reads.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::health::HealthView;
use crate::queue::Waiting;
use crate::{ModelGroup, RequestInfo, SchedulerError, Strategy};

mod candidates;
mod explain;
mod forecast;
pub mod sla;
mod strategy;

use candidates::{Choice, Via};
pub use forecast::{LocalForecast, forecast_local};

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
    /// The share of requests whose deadlines a target must be predicted to meet (0..1):
    /// targets are judged by the TTFT they stay within this often, not by their mean.
    pub sla_attainment: f64,
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
            sla_attainment: 0.99,
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

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send to `targets[0]` now; the rest are the failover order.
    Dispatch { targets: Vec<Target> },
    /// Wait for a local slot; if none comes within `spill_after` (from now), go to
    /// `fallbacks` (the cloud targets, best first) instead.
    Enqueue {
        spill_after: Option<Duration>,
        fallbacks: Vec<Target>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub code: ReasonCode,
    /// One line a person can read: the numbers behind the choice.
    pub reason: String,
    pub strategy: Strategy,
    /// Predicted TTFT of the chosen target (for a queued request, local's).
    pub predicted_ttft: Duration,
    /// Requests ahead of this one in the local queue (0 = a slot is free).
    pub position: u64,
}

impl Decision {
    /// The targets to try, best first: where to send the request now, or where it goes
    /// when it leaves the queue without a local slot.
    pub fn targets(&self) -> &[Target] {
        match &self.action {
            Action::Dispatch { targets } => targets,
            Action::Enqueue { fallbacks, .. } => fallbacks,
        }
    }
}

/// Decides where one request goes: the candidates, their order (the strategy's among those
/// that meet the SLA, then the rest by their chance of meeting it), and the action.
pub fn decide(snap: &Snapshot<'_>, req: &RequestInfo) -> Result<Decision, SchedulerError> {
    let rule = snap
        .group
        .rules
        .iter()
        .find(|r| r.matches(req.tag.as_deref(), req.prompt_tokens));
    let strategy = req
        .strategy
        .or(rule.and_then(|r| r.strategy))
        .unwrap_or(snap.group.strategy);
    let cands = candidates::build(snap, req, strategy, rule);
    if cands.options.is_empty() {
        return Err(explain::no_option(snap, req, strategy, &cands));
    }
    let (mut eligible, mut rest): (Vec<Choice>, Vec<Choice>) = cands
        .options
        .iter()
        .cloned()
        .partition(|o| o.meets_sla && !o.overflow);
    strategy::of(strategy).rank(&mut eligible, req);
    strategy::rank_rest(&mut rest);
    let any_eligible = !eligible.is_empty();
    let mut order = eligible;
    order.extend(rest);
    let targets = expand(snap, &order, &cands.locals);
    let ctx = explain::Ctx {
        snap,
        req,
        strategy,
        cands: &cands,
        order: &order,
        any_eligible,
    };
    match order[0].via {
        Via::Local => explain::local_lead(&ctx, targets),
        Via::Cloud(_) => Ok(explain::cloud_lead(&ctx, targets)),
    }
}

/// The options as targets, in order: the local option becomes its nodes with a free slot.
fn expand(snap: &Snapshot<'_>, order: &[Choice], locals: &[&LocalCandidate]) -> Vec<Target> {
    let mut targets = Vec::new();
    for o in order {
        match o.via {
            Via::Cloud(i) => {
                let t = &snap.group.cloud[i];
                targets.push(Target::Cloud {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                });
            }
            Via::Local => targets.extend(
                local_order(locals, snap.affinity, snap.settings)
                    .into_iter()
                    .map(|c| Target::Local {
                        node_id: c.node_id.clone(),
                        base_url: c.base_url.clone(),
                        model: c.model.clone(),
                    }),
            ),
        }
    }
    targets
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

#[cfg(test)]
mod tests;
