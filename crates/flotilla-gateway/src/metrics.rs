//! The scheduler's `/metrics`: predicted against actual TTFT, routing decisions by reason,
//! attempts by outcome, queue depths, breaker states and each target's TTFT EWMA.

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
    for (model, p, n) in s.inner.queues.depths() {
        e.sample(
            m::SCHED_QUEUE_DEPTH,
            &[("model", &model), ("priority", p.as_str())],
            n as f64,
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
    }
    e.finish()
}
