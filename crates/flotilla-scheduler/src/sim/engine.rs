//! The discrete-event loop. Virtual time is a `Duration` since the trace's start; the
//! policy and health code see `t0 + offset` as their `now`. Events at the same instant run
//! in the order they were scheduled, so a run is a pure function of its inputs. Agents are
//! modelled in [`super::agents`], cloud calls in [`super::clouds`].
//!
//! The `flotilla` policy acts on each [`decide`] as the gateway's dispatch does: `Dispatch`
//! tries the targets in order (health checked again before each retry, a doubling pause,
//! at most `gateway.max_attempts`); `Enqueue` waits in the model's queue until a slot frees
//! (the fullest agent with room takes [`pick_next`]'s choice), until `spill_after` (then the
//! decision's cloud targets, a fresh round of attempts) or until `max_queue_wait_ms` (then
//! it fails); when no listed agent is admitted, every waiter decides again. A 429 keeps the
//! target aside for its `Retry-After`; a request's prefix sends it to the agent that served
//! that prefix last (affinity). An agent's context-length refusal is returned, not failed
//! over. Where this file says "the gateway", it means `flotilla-gateway/src/dispatch.rs`
//! and `queue.rs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::SimError;
use super::agents::Agent;
use super::clouds::{Call, Cloud};
use super::config::SimConfig;
use super::report::{PolicyReport, TargetTally, percentile};
use super::trace::{Trace, TraceRecord};
use crate::{
    Action, HealthConfig, HealthView, LocalCandidate, ModelGroup, PolicySettings, Priority,
    RequestInfo, Snapshot, Target, Waiting, decide, pick_next,
};

/// A routing policy the simulator can replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimPolicy {
    /// [`crate::decide`] with the group's strategy, the local queue ordered by
    /// [`crate::pick_next`], spills after `spill_after`, failover down the decision's list,
    /// breakers and EWMAs fed by every outcome: what the gateway does.
    Flotilla,
    /// Every request to the first cloud target; a failed call fails the request.
    CloudOnly,
    /// Every request to the agents; a FIFO queue without bound when all slots are busy.
    LocalOnly,
    /// Local, cloud 1, cloud 2, ... in turn regardless of load; no failover.
    RoundRobin,
    /// LiteLLM's `order`: local, then each cloud target, moving on only on an error. Load
    /// is not an error: the local side queues (FIFO).
    OrderedFallback,
}

impl SimPolicy {
    pub const ALL: [SimPolicy; 5] = [
        SimPolicy::Flotilla,
        SimPolicy::CloudOnly,
        SimPolicy::LocalOnly,
        SimPolicy::RoundRobin,
        SimPolicy::OrderedFallback,
    ];

    pub fn parse(s: &str) -> Result<SimPolicy, SimError> {
        let name = s.trim().to_ascii_lowercase().replace('_', "-");
        SimPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| SimError::UnknownPolicy(s.to_owned()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SimPolicy::Flotilla => "flotilla",
            SimPolicy::CloudOnly => "cloud-only",
            SimPolicy::LocalOnly => "local-only",
            SimPolicy::RoundRobin => "round-robin",
            SimPolicy::OrderedFallback => "ordered-fallback",
        }
    }
}

/// One place to try: an agent (None = any that fits) or `cloud[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Local(Option<usize>),
    Cloud(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Event {
    Arrive(usize),
    LocalDone {
        agent: usize,
        req: usize,
        /// The request's try this answers (a stale one is ignored).
        tries: u32,
    },
    CloudDone {
        req: usize,
        cloud: usize,
        call: Call,
    },
    AgentDown(usize),
    AgentUp(usize),
    /// An agent may have left the fleet's list (its heartbeats stopped long enough ago).
    FleetChange,
    /// The pause before a further attempt is over.
    Retry(usize),
    /// The end of a queued request's wait: it spills to its cloud fallbacks, or times out.
    QueueLimit {
        req: usize,
        stint: u32,
        spill: bool,
    },
}

/// An attempt in progress, or the one that served the request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Served {
    /// From arrival.
    pub ttft: Duration,
    /// Virtual time the answer ended.
    pub finish: Duration,
    pub cloud: Option<usize>,
    /// The agent that served it (local attempts).
    pub agent: Option<usize>,
    pub cost_usd: f64,
    /// As the target measures it (from the start of the call), for its health.
    pub svc_ttft: Duration,
    pub svc_latency: Duration,
}

#[derive(Debug, Default)]
pub(super) struct Req {
    /// Where to try next, in order.
    plan: VecDeque<Hop>,
    /// Attempts started in this round (`flotilla`: bounded by `gateway.max_attempts`).
    pub attempts: u32,
    /// Attempts started in all, never reset: tags an attempt's completion event.
    pub tries: u32,
    queued: bool,
    /// Counts the request's stays in the queue, so a stale time limit is ignored.
    stint: u32,
    pub pending: Option<Served>,
    pub done: Option<Served>,
}

/// What happened along the way, for the report.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub cloud_errors: u64,
    pub rate_limited: u64,
    pub agent_failures: u64,
    pub spilled: u64,
    pub reconsidered: u64,
    pub prefix_hits: u64,
    pub prefix_tokens_saved: u64,
}

struct Queued {
    req: usize,
    waiting: Waiting,
}

pub(super) struct Sim<'a> {
    pub cfg: &'a SimConfig,
    pub trace: &'a [TraceRecord],
    pub policy: SimPolicy,
    t0: Instant,
    pub now: Duration,
    group: ModelGroup,
    settings: PolicySettings,
    pub hc: HealthConfig,
    pub agents: Vec<Agent<'a>>,
    pub clouds: Vec<Cloud<'a>>,
    queue: Vec<Queued>,
    pub reqs: Vec<Req>,
    events: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    seq: u64,
    rr: usize,
    pub counts: Counts,
    decisions: BTreeMap<&'static str, u64>,
    /// `flotilla`: prefix id -> the agent that served it last (the gateway's affinity map).
    pub affinity: BTreeMap<u64, usize>,
}

pub(super) fn arrival(r: &TraceRecord) -> Duration {
    Duration::from_millis(r.t_ms)
}

pub(super) fn secs(x: f64) -> Duration {
    Duration::from_secs_f64(if x.is_finite() {
        x.clamp(0.0, 1e9)
    } else {
        1e9
    })
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig, trace: &'a [TraceRecord], policy: SimPolicy) -> Self {
        Sim {
            cfg,
            trace,
            policy,
            t0: Instant::now(),
            now: Duration::ZERO,
            group: cfg.group(),
            settings: cfg.settings(),
            hc: cfg.health_config(),
            agents: cfg.agents.iter().map(Agent::new).collect(),
            clouds: cfg.cloud.iter().map(Cloud::new).collect(),
            queue: Vec::new(),
            reqs: trace.iter().map(|_| Req::default()).collect(),
            events: BinaryHeap::new(),
            seq: 0,
            rr: 0,
            counts: Counts::default(),
            decisions: BTreeMap::new(),
            affinity: BTreeMap::new(),
        }
    }

    pub(super) fn at(&self) -> Instant {
        self.t0 + self.now
    }

    pub(super) fn schedule(&mut self, at: Duration, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn run(mut self) -> PolicyReport {
        for (i, r) in self.trace.iter().enumerate() {
            self.schedule(arrival(r), Event::Arrive(i));
        }
        let cfg = self.cfg;
        for (a, spec) in cfg.agents.iter().enumerate() {
            for o in &spec.outages {
                self.schedule(secs(o.start_s), Event::AgentDown(a));
                self.schedule(secs(o.end_s), Event::AgentUp(a));
            }
        }
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            self.now = t;
            match ev {
                Event::Arrive(i) => self.arrive(i),
                Event::LocalDone { agent, req, tries } => self.local_done(agent, req, tries),
                Event::CloudDone { req, cloud, call } => self.cloud_done(req, cloud, call),
                Event::AgentDown(a) => self.agent_down(a),
                Event::AgentUp(a) => self.agent_up(a),
                Event::FleetChange => self.fill_slots(),
                Event::Retry(i) => self.try_next(i),
                Event::QueueLimit { req, stint, spill } => self.queue_limit(req, stint, spill),
            }
        }
        self.report()
    }

    fn arrive(&mut self, i: usize) {
        let local = !self.agents.is_empty();
        let clouds = (0..self.clouds.len()).map(Hop::Cloud);
        let plan: Vec<Hop> = match self.policy {
            SimPolicy::Flotilla => return self.route_flotilla(i),
            SimPolicy::CloudOnly => clouds.take(1).collect(),
            SimPolicy::LocalOnly => local.then_some(Hop::Local(None)).into_iter().collect(),
            SimPolicy::RoundRobin => {
                let n = usize::from(local) + self.clouds.len();
                let k = self.rr % n.max(1);
                self.rr += 1;
                match (local, k) {
                    (_, _) if n == 0 => Vec::new(),
                    (true, 0) => vec![Hop::Local(None)],
                    (true, k) => vec![Hop::Cloud(k - 1)],
                    (false, k) => vec![Hop::Cloud(k)],
                }
            }
            SimPolicy::OrderedFallback => local
                .then_some(Hop::Local(None))
                .into_iter()
                .chain(clouds)
                .collect(),
        };
        self.reqs[i].plan = plan.into();
        self.advance(i);
    }

    /// What the gateway does with a request: snapshot, [`decide`], act on the decision.
    fn route_flotilla(&mut self, i: usize) {
        let now = self.at();
        let r = &self.trace[i];
        let ttl = self.ttl();
        let locals: Vec<LocalCandidate> = self
            .agents
            .iter()
            .filter(|a| a.listed(self.now, ttl))
            .map(|a| LocalCandidate {
                node_id: a.spec.name.clone(),
                base_url: format!("sim://{}", a.spec.name),
                model: self.group.local_model.clone(),
                in_flight: a.running,
                reported_load: a.running,
                max_running: a.spec.slots,
                context_length: a.spec.context_length,
                tokens_per_second: a.running as f64 * a.spec.decode_rate(a.running),
                health: a.health.view(&self.hc, now),
            })
            .collect();
        let cloud: Vec<HealthView> = self
            .clouds
            .iter()
            .map(|c| c.health.view(&self.hc, now))
            .collect();
        let waiting: Vec<Waiting> = self.queue.iter().map(|q| q.waiting).collect();
        let affinity = r
            .prefix_id
            .and_then(|p| self.affinity.get(&p))
            .map(|&a| self.agents[a].spec.name.as_str());
        let snap = Snapshot {
            group: &self.group,
            locals: &locals,
            cloud: &cloud,
            waiting: &waiting,
            affinity,
            settings: &self.settings,
            now,
        };
        let info = RequestInfo {
            priority: r.priority,
            ttft_deadline: r.ttft_ms.map(Duration::from_millis),
            deadline: r.deadline_ms.map(Duration::from_millis),
            tag: r.tag.clone(),
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.completion_tokens,
            requested_max_tokens: Some(r.completion_tokens),
            prefix: r.prefix_id,
            split_key: i as u64,
            waited: self.now.saturating_sub(arrival(r)),
            ..RequestInfo::default()
        };
        let d = match decide(&snap, &info) {
            Ok(d) => d,
            Err(_) => {
                // Refused (queue full without a cloud target, every target unhealthy): the
                // client gets an error.
                *self.decisions.entry("refused").or_default() += 1;
                return;
            }
        };
        *self.decisions.entry(d.code.as_str()).or_default() += 1;
        let plan: VecDeque<Hop> = d.targets().iter().filter_map(|t| self.hop_of(t)).collect();
        self.reqs[i].plan = plan;
        self.reqs[i].attempts = 0;
        match d.action {
            Action::Dispatch { .. } => self.advance(i),
            Action::Enqueue { spill_after, .. } => self.enqueue(i, spill_after),
        }
    }

    fn hop_of(&self, t: &Target) -> Option<Hop> {
        match t {
            Target::Local { node_id, .. } => self
                .agents
                .iter()
                .position(|a| &a.spec.name == node_id)
                .map(|a| Hop::Local(Some(a))),
            Target::Cloud { provider, .. } => self
                .clouds
                .iter()
                .position(|c| &c.spec.provider == provider)
                .map(Hop::Cloud),
        }
    }

    fn fits(&self, a: usize, i: usize) -> bool {
        let r = &self.trace[i];
        r.prompt_tokens.saturating_add(r.completion_tokens) <= self.agents[a].spec.context_length
    }

    /// The agent with a free slot among `among` a request goes to: fullest first when
    /// `pack` (as the gateway hands out slots), else least loaded; by name on a tie.
    fn free_agent(&self, among: impl Iterator<Item = usize>, pack: bool) -> Option<usize> {
        among
            .filter(|&a| self.usable(a) && self.agents[a].running < self.agents[a].spec.slots)
            .min_by(|&a, &b| {
                let (x, y) = (&self.agents[a], &self.agents[b]);
                // Load relative to slots, compared without dividing.
                let lx = u128::from(x.running) * u128::from(y.spec.slots);
                let ly = u128::from(y.running) * u128::from(x.spec.slots);
                let by_load = if pack { ly.cmp(&lx) } else { lx.cmp(&ly) };
                by_load.then_with(|| x.spec.name.cmp(&y.spec.name))
            })
    }

    /// The previous attempt failed (or none was made): go on down the plan. `flotilla`
    /// does what the gateway does: at most `max_attempts`, a doubling pause before each
    /// further one, none once the retry budget is spent. A request whose plan ends without
    /// an answer has failed.
    pub(super) fn advance(&mut self, i: usize) {
        let made = self.reqs[i].attempts;
        if self.policy == SimPolicy::Flotilla && made > 0 {
            let g = &self.cfg.gateway;
            if made >= g.max_attempts || self.reqs[i].plan.is_empty() {
                return;
            }
            let backoff = g.backoff(made);
            let elapsed = self.now.saturating_sub(arrival(&self.trace[i]));
            if elapsed + backoff >= Duration::from_millis(g.retry_budget_ms) {
                return;
            }
            self.schedule(self.now + backoff, Event::Retry(i));
            return;
        }
        self.try_next(i);
    }

    /// Starts the plan's next hop: an attempt, or a place in the local queue.
    fn try_next(&mut self, i: usize) {
        let flotilla = self.policy == SimPolicy::Flotilla;
        while let Some(hop) = self.reqs[i].plan.pop_front() {
            // The gateway checks health before every attempt (an opened breaker or a 429
            // applies at once); after a failure the skip comes after the pause.
            let admitted = |s: &Self| {
                let h = match hop {
                    Hop::Local(Some(a)) => &s.agents[a].health,
                    Hop::Cloud(c) => &s.clouds[c].health,
                    Hop::Local(None) => return true,
                };
                !flotilla || h.admit(&s.hc, s.at()).allowed()
            };
            if !admitted(self) {
                if self.reqs[i].attempts > 0 {
                    self.advance(i);
                    return;
                }
                continue;
            }
            match hop {
                Hop::Local(which) => {
                    let fitting: Vec<usize> = match which {
                        Some(a) => vec![a],
                        None => (0..self.agents.len()).collect(),
                    }
                    .into_iter()
                    .filter(|&a| self.fits(a, i))
                    .collect();
                    if fitting.is_empty() {
                        // The agent refuses it at once (400: context length). The gateway
                        // returns that error; LiteLLM's order moves on.
                        if flotilla {
                            return;
                        }
                        continue;
                    }
                    let free = match which {
                        // The gateway sends to the node it chose without asking the fleet
                        // again (a node that went is found out by the refused connection).
                        Some(a) => (self.agents[a].running < self.agents[a].spec.slots
                            || !self.listed(a))
                        .then_some(a),
                        None => self.free_agent(fitting.into_iter(), false),
                    };
                    match free {
                        Some(a) => self.start_local(a, i),
                        // The slot went while a cloud attempt failed: wait for one.
                        None => self.enqueue(i, None),
                    }
                    return;
                }
                Hop::Cloud(c) => {
                    self.start_cloud(c, i);
                    return;
                }
            }
        }
    }

    /// Joins the local queue. Under `flotilla` the wait is bounded as in the gateway: by
    /// `spill_after` (then the request goes to its cloud fallbacks) or by
    /// `max_queue_wait_ms` since arrival (then it fails).
    fn enqueue(&mut self, i: usize, spill_after: Option<Duration>) {
        let waiting = Waiting {
            priority: self.trace[i].priority,
            enqueued_at: self.at(),
        };
        self.queue.push(Queued { req: i, waiting });
        let q = &mut self.reqs[i];
        q.queued = true;
        q.stint += 1;
        let stint = q.stint;
        let has_fallback = !q.plan.is_empty();
        if self.policy == SimPolicy::Flotilla {
            let waited = self.now.saturating_sub(arrival(&self.trace[i]));
            let left =
                Duration::from_millis(self.cfg.gateway.max_queue_wait_ms).saturating_sub(waited);
            let limit = spill_after.map_or(left, |sp| sp.min(left));
            // At the limit a request with cloud fallbacks spills; without, it fails.
            let spill = has_fallback;
            self.schedule(
                self.now + limit,
                Event::QueueLimit {
                    req: i,
                    stint,
                    spill,
                },
            );
        }
        self.fill_slots();
    }

    /// Gives free local slots to queued requests: [`pick_next`] for `flotilla`, arrival
    /// order for the baselines. Under `flotilla`, when no listed agent is admitted, every
    /// waiter decides again (the gateway's pump: "nobody serves the model now").
    pub(super) fn fill_slots(&mut self) {
        let flotilla = self.policy == SimPolicy::Flotilla;
        if flotilla && !self.queue.is_empty() && !(0..self.agents.len()).any(|a| self.usable(a)) {
            for q in std::mem::take(&mut self.queue) {
                let r = &mut self.reqs[q.req];
                r.queued = false;
                r.stint += 1;
                self.counts.reconsidered += 1;
                self.route_flotilla(q.req);
            }
            return;
        }
        while !self.queue.is_empty() {
            let Some(a) = self.free_agent(0..self.agents.len(), flotilla && self.settings.pack)
            else {
                return;
            };
            let idx = if flotilla {
                let w: Vec<Waiting> = self.queue.iter().map(|q| q.waiting).collect();
                pick_next(&w, self.at(), self.settings.age_boost).unwrap_or(0)
            } else {
                0
            };
            let q = self.queue.remove(idx);
            self.reqs[q.req].queued = false;
            self.reqs[q.req].plan.push_front(Hop::Local(Some(a)));
            self.try_next(q.req);
        }
    }

    /// A queued request's wait is over: if it still waits, it spills to its cloud
    /// fallbacks (a fresh round of attempts, as the gateway's) or fails.
    fn queue_limit(&mut self, i: usize, stint: u32, spill: bool) {
        if !self.reqs[i].queued || self.reqs[i].stint != stint {
            return;
        }
        if let Some(pos) = self.queue.iter().position(|q| q.req == i) {
            self.queue.remove(pos);
        }
        self.reqs[i].queued = false;
        if spill {
            self.counts.spilled += 1;
            self.reqs[i].attempts = 0;
            self.try_next(i);
        }
    }

    fn report(&self) -> PolicyReport {
        let n = self.trace.len() as u64;
        let mut ttfts = Vec::new();
        let mut interactive = Vec::new();
        let (mut completed, mut sla_met, mut cloud_served) = (0u64, 0u64, 0u64);
        let mut cloud_cost = 0.0;
        let mut last = Duration::ZERO;
        let mut by_target: BTreeMap<String, TargetTally> = BTreeMap::new();
        for (r, q) in self.trace.iter().zip(&self.reqs) {
            let Some(s) = q.done else { continue };
            completed += 1;
            let label = match (s.cloud, s.agent) {
                (Some(c), _) => format!("cloud:{}", self.clouds[c].spec.provider),
                (None, Some(a)) => format!("local:{}", self.agents[a].spec.name),
                (None, None) => "local".into(),
            };
            let t = by_target.entry(label).or_default();
            t.served += 1;
            t.interactive += u64::from(r.priority == Priority::Interactive);
            t.cloud_usd += if s.cloud.is_some() { s.cost_usd } else { 0.0 };
            ttfts.push(s.ttft.as_secs_f64() * 1e3);
            if r.priority == Priority::Interactive {
                interactive.push(s.ttft.as_secs_f64() * 1e3);
            }
            let total = s.finish.saturating_sub(arrival(r));
            let met = r.ttft_ms.is_none_or(|d| s.ttft <= Duration::from_millis(d))
                && r.deadline_ms
                    .is_none_or(|d| total <= Duration::from_millis(d));
            sla_met += u64::from(met);
            if s.cloud.is_some() {
                cloud_served += 1;
                cloud_cost += s.cost_usd;
            }
            last = last.max(s.finish);
        }
        ttfts.sort_by(f64::total_cmp);
        interactive.sort_by(f64::total_cmp);
        let first = self.trace.first().map_or(Duration::ZERO, arrival);
        let last_arrival = self.trace.last().map_or(Duration::ZERO, arrival);
        // The fleet is owned from the trace's start until its last arrival or answer.
        let window_s = last.max(last_arrival).as_secs_f64();
        let (mut gpu_busy_s, mut gpu_owned_s, mut local_cost, mut owned_local) =
            (0.0, 0.0, 0.0, 0.0);
        for a in &self.agents {
            let gpus = f64::from(a.spec.gpus);
            let usd_per_s = self.cfg.gpu_price(a.spec) / 3600.0;
            let busy = a.busy.as_secs_f64() * gpus;
            gpu_busy_s += busy;
            gpu_owned_s += window_s * gpus;
            local_cost += busy * usd_per_s;
            owned_local += window_s * gpus * usd_per_s;
        }
        let c = &self.counts;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        PolicyReport {
            policy: self.policy.as_str(),
            requests: n,
            completed,
            failed: n - completed,
            sla_met,
            sla_attainment: ratio(sla_met, n),
            ttft_p50_ms: percentile(&ttfts, 50.0),
            ttft_p99_ms: percentile(&ttfts, 99.0),
            interactive_ttft_p99_ms: percentile(&interactive, 99.0),
            cloud_served,
            spillover: ratio(cloud_served, completed),
            spilled_from_queue: c.spilled,
            reconsidered: c.reconsidered,
            cloud_errors: c.cloud_errors,
            rate_limited: c.rate_limited,
            agent_failures: c.agent_failures,
            prefix_hits: c.prefix_hits,
            prefix_tokens_saved: c.prefix_tokens_saved,
            gpu_busy_s,
            gpu_owned_s,
            window_s,
            local_cost_usd: local_cost,
            cloud_cost_usd: cloud_cost,
            cost_usd: local_cost + cloud_cost,
            owned_local_cost_usd: owned_local,
            owned_cost_usd: owned_local + cloud_cost,
            makespan_s: last.saturating_sub(first).as_secs_f64(),
            by_target,
            decisions: self.decisions.clone(),
        }
    }
}

/// Replays `trace` under one policy.
pub fn simulate(
    cfg: &SimConfig,
    trace: &Trace,
    policy: SimPolicy,
) -> Result<PolicyReport, SimError> {
    cfg.validate()?;
    trace.check_model(&cfg.model)?;
    Ok(Sim::new(cfg, &trace.requests, policy).run())
}

/// Replays `trace` under each policy, in the order given.
pub fn simulate_all(
    cfg: &SimConfig,
    trace: &Trace,
    policies: &[SimPolicy],
) -> Result<Vec<PolicyReport>, SimError> {
    policies.iter().map(|&p| simulate(cfg, trace, p)).collect()
}
