//! The scheduler's `/metrics`: requests by model, target, status and priority; TTFT,
//! latency, cost and tokens per target; spillover to the cloud by reason; failovers; queue
//! depth and wait per model; predicted against actual TTFT; routing decisions by reason;
//! attempts by outcome; breaker states, each target's TTFT EWMA and the shared store's
//! health.
//!
//! Label values are bounded: targets are the configured providers and the agents that
//! heartbeat; a model is named only once it resolved to a configured group or a served
//! model (anything a client made up counts as `other`); statuses and priorities are ours.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_api::metrics::{self as m, Histogram, TTFT_BUCKETS, TextEncoder};
use flotilla_scheduler::{BreakerState, ReasonCode};

use crate::AppState;

const KINDS: [&str; 2] = ["local", "cloud"];
pub(crate) const OUTCOMES: [&str; 4] = ["success", "failure", "rate_limited", "rejected"];

pub(crate) struct GatewayMetrics {
    predicted: [Histogram; 2],
    actual: [Histogram; 2],
    error: [Histogram; 2],
    /// Indexed like [`ReasonCode::ALL`].
    decisions: [AtomicU64; ReasonCode::ALL.len()],
    attempts: [AtomicU64; 4],
    /// The scheduler's own probes, indexed like attempts.
    probes: [AtomicU64; 4],
    /// Series per target and per model, filled once per request when it ends.
    series: Mutex<Series>,
    /// Requests refused before routing (no ledger row), by HTTP status.
    refused: Mutex<HashMap<u16, u64>>,
}

/// A request's ledger statuses, as the `status` label (anything else: `other`).
const STATUSES: [&str; 5] = ["ok", "error", "rejected", "cancelled", "other"];
/// Priorities, as the `priority` label; `none` for a request that failed before its
/// class was read.
const PRIORITIES: [&str; 3] = ["interactive", "batch", "none"];
/// More distinct targets or models than this (a fleet far larger than any we run, or a
/// bug) fold into `other` rather than growing `/metrics` without bound.
const MAX_SERIES: usize = 1024;
const OTHER: &str = "other";

#[derive(Default)]
struct Series {
    targets: HashMap<String, TargetSeries>,
    models: HashMap<String, ModelSeries>,
}

struct TargetSeries {
    ttft: Histogram,
    latency: Histogram,
    cost_usd: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Per model: counts by status, then priority.
    requests: HashMap<String, [[u64; PRIORITIES.len()]; STATUSES.len()]>,
}

impl Default for TargetSeries {
    fn default() -> Self {
        TargetSeries {
            ttft: Histogram::new(TTFT_BUCKETS),
            latency: Histogram::new(TTFT_BUCKETS),
            cost_usd: 0.0,
            prompt_tokens: 0,
            completion_tokens: 0,
            requests: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct ModelSeries {
    /// Indexed like [`ReasonCode::ALL`].
    overflow: [u64; ReasonCode::ALL.len()],
    failovers: u64,
    queue_wait: Option<Histogram>,
}

/// The entry for `key`, made on first use; past [`MAX_SERIES`] keys new ones share `other`.
fn entry<'m, V: Default>(map: &'m mut HashMap<String, V>, key: &str) -> &'m mut V {
    let key = if map.contains_key(key) || map.len() < MAX_SERIES {
        key
    } else {
        OTHER
    };
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// Cumulative totals since start, for the dashboard.
#[derive(Debug, Clone)]
pub(crate) struct Counters {
    pub targets: Vec<TargetCounters>,
    /// Requests sent to a cloud target first, indexed like [`ReasonCode::ALL`].
    pub overflow: [u64; ReasonCode::ALL.len()],
}

#[derive(Debug, Clone)]
pub(crate) struct TargetCounters {
    /// `none` counts requests no target answered.
    pub target: String,
    pub requests: u64,
    pub ok: u64,
    pub cost_usd: f64,
    pub ttft: flotilla_api::metrics::HistogramSnapshot,
}

/// One request as it ended, for [`GatewayMetrics::request`].
pub(crate) struct Ended<'a> {
    /// The model, once it resolved to a group or a served model.
    pub model: Option<&'a str>,
    /// The target that answered (`none` when none did).
    pub target: Option<&'a str>,
    pub status: &'a str,
    pub priority: &'a str,
    pub ttft: Option<Duration>,
    pub latency: Duration,
    pub cost_usd: Option<f64>,
    /// Billed tokens: the upstream's usage, or our count when it reported none.
    pub tokens: Option<(u64, u64)>,
    /// Attempts after the first (including a stream continued elsewhere).
    pub failovers: u64,
    /// The policy sent it to a cloud target first, for this reason.
    pub to_cloud: Option<ReasonCode>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let h = || [Histogram::new(TTFT_BUCKETS), Histogram::new(TTFT_BUCKETS)];
        GatewayMetrics {
            predicted: h(),
            actual: h(),
            error: h(),
            decisions: Default::default(),
            attempts: Default::default(),
            probes: Default::default(),
            series: Mutex::default(),
            refused: Mutex::default(),
        }
    }
}

impl GatewayMetrics {
    /// A served request's TTFT next to what the policy predicted for it.
    pub fn observe_ttft(&self, local: bool, predicted: Duration, actual: Duration) {
        let i = usize::from(!local);
        self.predicted[i].observe(predicted.as_secs_f64());
        self.actual[i].observe(actual.as_secs_f64());
        self.error[i].observe((actual.as_secs_f64() - predicted.as_secs_f64()).abs());
    }

    pub fn decision(&self, code: ReasonCode) {
        if let Some(i) = ReasonCode::ALL.iter().position(|c| *c == code) {
            self.decisions[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `outcome` indexes [`OUTCOMES`].
    pub fn probe(&self, outcome: usize) {
        if let Some(a) = self.probes.get(outcome) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn series(&self) -> std::sync::MutexGuard<'_, Series> {
        // Every critical section leaves the maps consistent: a poisoned lock is usable.
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request's figures, once, when its ledger row is made: one lock for all of them.
    pub fn request(&self, e: &Ended<'_>) {
        let status = STATUSES
            .iter()
            .position(|s| *s == e.status)
            .unwrap_or(STATUSES.len() - 1);
        let priority = PRIORITIES
            .iter()
            .position(|p| *p == e.priority)
            .unwrap_or(PRIORITIES.len() - 1);
        let model = e.model.unwrap_or(OTHER);
        let mut series = self.series();
        let t = entry(&mut series.targets, e.target.unwrap_or("none"));
        entry(&mut t.requests, model)[status][priority] += 1;
        if let Some(ttft) = e.ttft {
            t.ttft.observe(ttft.as_secs_f64());
        }
        if e.target.is_some() {
            t.latency.observe(e.latency.as_secs_f64());
        }
        if let Some(c) = e.cost_usd.filter(|c| c.is_finite()) {
            t.cost_usd += c;
        }
        if let Some((p, c)) = e.tokens {
            t.prompt_tokens = t.prompt_tokens.saturating_add(p);
            t.completion_tokens = t.completion_tokens.saturating_add(c);
        }
        if e.failovers > 0 || e.to_cloud.is_some() {
            let m = entry(&mut series.models, model);
            m.failovers += e.failovers;
            if let Some(i) = e
                .to_cloud
                .and_then(|code| ReasonCode::ALL.iter().position(|c| *c == code))
            {
                m.overflow[i] += 1;
            }
        }
    }

    /// Every target's totals and spillover by reason (all models) as they stand, for the
    /// dashboard's samples.
    pub fn counters(&self) -> Counters {
        let series = self.series();
        let mut targets: Vec<TargetCounters> = series
            .targets
            .iter()
            .map(|(name, t)| {
                let (mut requests, mut ok) = (0, 0);
                for by_status in t.requests.values() {
                    for (i, by_priority) in by_status.iter().enumerate() {
                        let n: u64 = by_priority.iter().sum();
                        requests += n;
                        if STATUSES[i] == "ok" {
                            ok += n;
                        }
                    }
                }
                TargetCounters {
                    target: name.clone(),
                    requests,
                    ok,
                    cost_usd: t.cost_usd,
                    ttft: t.ttft.snapshot(),
                }
            })
            .collect();
        targets.sort_by(|a, b| a.target.cmp(&b.target));
        let mut overflow = [0u64; ReasonCode::ALL.len()];
        for m in series.models.values() {
            for (sum, n) in overflow.iter_mut().zip(m.overflow) {
                *sum += n;
            }
        }
        Counters { targets, overflow }
    }

    /// How long a request waited in `model`'s local queue before it left (for a slot, for
    /// the cloud, or out of time).
    pub fn queue_wait(&self, model: &str, waited: Duration) {
        let mut series = self.series();
        entry(&mut series.models, model)
            .queue_wait
            .get_or_insert_with(|| Histogram::new(TTFT_BUCKETS))
            .observe(waited.as_secs_f64());
    }

    /// A request refused before it was routed (authentication, an unreadable body).
    pub fn refused(&self, http_status: u16) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(http_status)
            .or_default() += 1;
    }

    /// `outcome` indexes [`OUTCOMES`].
    pub fn attempt(&self, outcome: usize) {
        if let Some(a) = self.attempts.get(outcome) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub(crate) fn render(s: &AppState) -> String {
    let mx = &s.inner.metrics;
    let mut e = TextEncoder::new();
    for (name, help, hs) in [
        (
            m::SCHED_PREDICTED_TTFT,
            "TTFT the policy predicted for served requests.",
            &mx.predicted,
        ),
        (
            m::SCHED_TTFT,
            "TTFT measured at the scheduler for served requests.",
            &mx.actual,
        ),
        (m::SCHED_TTFT_ERROR, "|actual - predicted| TTFT.", &mx.error),
    ] {
        e.family(name, "histogram", help);
        for (k, h) in KINDS.iter().zip(hs.iter()) {
            e.histogram(name, &[("target_kind", k)], &h.snapshot());
        }
    }
    e.family(
        m::SCHED_KEY_STORE_READS,
        "counter",
        "Reads of API keys from the database (refreshes, and lookups of keys not yet known); unknown keys are refused from memory.",
    );
    e.sample(
        m::SCHED_KEY_STORE_READS,
        &[],
        s.inner.keys.store_reads() as f64,
    );
    e.family(
        m::SCHED_DECISIONS,
        "counter",
        "Routing decisions by reason.",
    );
    for (code, n) in ReasonCode::ALL.iter().zip(mx.decisions.iter()) {
        e.sample(
            m::SCHED_DECISIONS,
            &[("reason", code.as_str())],
            n.load(Ordering::Relaxed) as f64,
        );
    }
    e.family(
        m::SCHED_ATTEMPTS,
        "counter",
        "Upstream attempts by outcome.",
    );
    for (o, a) in OUTCOMES.iter().zip(mx.attempts.iter()) {
        e.sample(
            m::SCHED_ATTEMPTS,
            &[("outcome", o)],
            a.load(Ordering::Relaxed) as f64,
        );
    }
    e.family(
        m::SCHED_PROBES,
        "counter",
        "The scheduler's own probes of idle and half-open targets, by outcome.",
    );
    for (o, a) in OUTCOMES.iter().zip(mx.probes.iter()) {
        e.sample(
            m::SCHED_PROBES,
            &[("outcome", o)],
            a.load(Ordering::Relaxed) as f64,
        );
    }
    e.family(
        m::SCHED_QUEUE_DEPTH,
        "gauge",
        "Requests waiting for a local slot.",
    );
    for q in s.inner.queues.depths() {
        e.sample(
            m::SCHED_QUEUE_DEPTH,
            &[("model", &q.model), ("priority", q.priority.as_str())],
            q.depth as f64,
        );
    }
    let rows = s.inner.health.rows(Instant::now());
    e.family(
        m::SCHED_BREAKER_STATE,
        "gauge",
        "Circuit breaker per target: 0 closed, 1 half-open, 2 open.",
    );
    for r in &rows {
        let v = match r.breaker {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        e.sample(m::SCHED_BREAKER_STATE, &[("target", &r.key)], v);
    }
    e.family(
        m::SCHED_TARGET_EWMA_TTFT,
        "gauge",
        "EWMA of each target's TTFT.",
    );
    for r in &rows {
        if let Some(t) = r.ttft_s {
            e.sample(m::SCHED_TARGET_EWMA_TTFT, &[("target", &r.key)], t);
        }
    }
    render_series(&mut e, mx);
    e.family(
        m::SCHED_LEDGER_ROWS,
        "counter",
        "Request rows the ledger writer wrote, and those it could not write.",
    );
    let w = &s.inner.writer;
    e.sample(
        m::SCHED_LEDGER_ROWS,
        &[("result", "written")],
        w.written() as f64,
    );
    e.sample(
        m::SCHED_LEDGER_ROWS,
        &[("result", "failed")],
        w.failed() as f64,
    );
    if let Some(sh) = &s.inner.shared {
        e.family(
            m::SHARED_STATE_UP,
            "gauge",
            "1 while the Redis shared with other replicas answers, 0 while this replica runs on its own state.",
        );
        e.sample(m::SHARED_STATE_UP, &[], if sh.is_up() { 1.0 } else { 0.0 });
        e.family(
            m::SHARED_STATE_ERRORS,
            "counter",
            "Calls to the shared Redis that failed or got no answer in time.",
        );
        e.sample(m::SHARED_STATE_ERRORS, &[], sh.errors() as f64);
    }
    e.finish()
}

/// The per-request series, sorted by label so scrapes read the same order.
fn render_series(e: &mut TextEncoder, mx: &GatewayMetrics) {
    // Copied out under the lock; encoded after it is released.
    let (targets, models) = {
        let series = mx.series();
        let mut targets: Vec<_> = series
            .targets
            .iter()
            .map(|(name, t)| {
                let mut requests: Vec<_> =
                    t.requests.iter().map(|(m, c)| (m.clone(), *c)).collect();
                requests.sort_by(|a, b| a.0.cmp(&b.0));
                (
                    name.clone(),
                    t.ttft.snapshot(),
                    t.latency.snapshot(),
                    t.cost_usd,
                    (t.prompt_tokens, t.completion_tokens),
                    requests,
                )
            })
            .collect();
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        let mut models: Vec<_> = series
            .models
            .iter()
            .map(|(name, m)| {
                (
                    name.clone(),
                    m.overflow,
                    m.failovers,
                    m.queue_wait.as_ref().map(Histogram::snapshot),
                )
            })
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        (targets, models)
    };
    e.family(
        m::SCHED_REQUESTS,
        "counter",
        "Requests that ended, by model, the target that answered (none: no target did), ledger status and priority.",
    );
    for (target, _, _, _, _, requests) in &targets {
        for (model, by_status) in requests {
            for (status, by_priority) in STATUSES.iter().zip(by_status) {
                for (priority, n) in PRIORITIES.iter().zip(by_priority) {
                    if *n > 0 {
                        e.sample(
                            m::SCHED_REQUESTS,
                            &[
                                ("model", model),
                                ("target", target),
                                ("status", status),
                                ("priority", priority),
                            ],
                            *n as f64,
                        );
                    }
                }
            }
        }
    }
    e.family(
        m::SCHED_REFUSED,
        "counter",
        "Requests refused before routing (authentication, unreadable body), by HTTP status.",
    );
    let mut refused: Vec<(u16, u64)> = mx
        .refused
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    refused.sort_unstable();
    for (code, n) in refused {
        e.sample(m::SCHED_REFUSED, &[("code", &code.to_string())], n as f64);
    }
    for (name, help, latency) in [
        (
            m::SCHED_TARGET_TTFT,
            "Time to first token (whole answer, when not streamed) per answering target, from arrival.",
            false,
        ),
        (
            m::SCHED_TARGET_LATENCY,
            "Time from arrival to the answer's end, per answering target.",
            true,
        ),
    ] {
        e.family(name, "histogram", help);
        for (target, ttft, lat, ..) in &targets {
            if target != "none" {
                e.histogram(
                    name,
                    &[("target", target)],
                    if latency { lat } else { ttft },
                );
            }
        }
    }
    e.family(
        m::SCHED_TARGET_COST,
        "counter",
        "What answers cost, per target (known prices and GPU time only).",
    );
    for (target, _, _, cost, ..) in &targets {
        if target != "none" {
            e.sample(m::SCHED_TARGET_COST, &[("target", target)], *cost);
        }
    }
    e.family(
        m::SCHED_TARGET_TOKENS,
        "counter",
        "Billed tokens per target: the upstream's usage, or our count where it reported none.",
    );
    for (target, _, _, _, (prompt, completion), _) in &targets {
        if target != "none" {
            e.sample(
                m::SCHED_TARGET_TOKENS,
                &[("target", target), ("kind", "prompt")],
                *prompt as f64,
            );
            e.sample(
                m::SCHED_TARGET_TOKENS,
                &[("target", target), ("kind", "completion")],
                *completion as f64,
            );
        }
    }
    e.family(
        m::SCHED_OVERFLOW,
        "counter",
        "Requests the policy sent to a cloud target first, by model and reason: queue_depth_exceeded, deadline_miss and no_local are spillover; cheapest, fastest, ordered and weighted the strategy's choice.",
    );
    for (model, overflow, ..) in &models {
        for (code, n) in ReasonCode::ALL.iter().zip(overflow) {
            if *n > 0 {
                e.sample(
                    m::SCHED_OVERFLOW,
                    &[("model", model), ("reason", code.as_str())],
                    *n as f64,
                );
            }
        }
    }
    e.family(
        m::SCHED_FAILOVERS,
        "counter",
        "Attempts after a request's first, on another target (including streams continued elsewhere), by model.",
    );
    for (model, _, failovers, _) in &models {
        e.sample(m::SCHED_FAILOVERS, &[("model", model)], *failovers as f64);
    }
    e.family(
        m::SCHED_QUEUE_WAIT,
        "histogram",
        "Time requests waited in a model's local queue before leaving it (for a slot, for the cloud, or out of time).",
    );
    for (model, _, _, wait) in &models {
        if let Some(h) = wait {
            e.histogram(m::SCHED_QUEUE_WAIT, &[("model", model)], h);
        }
    }
}
