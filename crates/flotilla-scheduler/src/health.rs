//! Per-target health: EWMAs of TTFT, total latency and tokens/s, updated on every request;
//! a circuit breaker on the error rate over a sliding window; 429 `Retry-After`; and a
//! concurrency limit. Time is passed in, never read, so the simulator drives it in virtual
//! time and tests step it by hand.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use flotilla_api::protocol::TargetFigures;
use serde::Serialize;

/// Breaker and EWMA settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Weight of the newest sample in each EWMA (0..=1).
    pub ewma_alpha: f64,
    /// The error rate is measured over this window.
    pub window: Duration,
    /// The breaker does not judge a target on fewer requests than this in the window.
    pub min_requests: u32,
    /// Error rate (0..=1) at or above which the breaker opens.
    pub error_rate: f64,
    /// How long an open breaker stays open before one probe is let through.
    pub open_for: Duration,
    /// Without a `Retry-After`, a 429 keeps the target aside this long.
    pub default_retry_after: Duration,
    /// Active probes: a target nobody sent a request for this long gets a small one from
    /// the scheduler, and a half-open breaker is probed by the scheduler rather than by a
    /// client's request. None = no active probes.
    pub probe_idle: Option<Duration>,
    /// A TTFT measured longer ago than this is forgotten: the target is judged on what is
    /// expected of it again. Without it, a target whose tail once looked too slow for the
    /// deadlines gets no request, so no new sample, and keeps that tail for ever. None =
    /// never forget.
    pub forget_after: Option<Duration>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            ewma_alpha: 0.2,
            window: Duration::from_secs(30),
            min_requests: 5,
            error_rate: 0.5,
            open_for: Duration::from_secs(10),
            default_retry_after: Duration::from_secs(1),
            probe_idle: None,
            forget_after: Some(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    /// The open period is over; one probe request decides.
    HalfOpen,
}

/// How one attempt at a target ended, as far as the target's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Success {
        /// Time to the first token; None when nobody could see it (a cloud answer sent
        /// whole): then only the latency is recorded, never the latency as TTFT.
        ttft: Option<Duration>,
        latency: Duration,
        /// Completion tokens, when the answer said.
        tokens: Option<u64>,
    },
    /// Connection error, timeout, 5xx, or a stream broken mid-way.
    Failure,
    /// 429: not a fault, but the target wants no traffic for this long.
    RateLimited { retry_after: Option<Duration> },
    /// The request's own fault (400-class): says nothing about the target.
    Rejected,
}

/// Whether a target may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "admit", rename_all = "snake_case")]
pub enum Admit {
    Yes,
    /// Half-open: this request is the probe.
    Probe,
    BreakerOpen,
    /// Half-open and its probe is still out.
    ProbeInFlight,
    RateLimited,
    AtConcurrencyLimit,
}

impl Admit {
    pub fn allowed(self) -> bool {
        matches!(self, Admit::Yes | Admit::Probe)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Admit::Yes => "yes",
            Admit::Probe => "probe",
            Admit::BreakerOpen => "breaker_open",
            Admit::ProbeInFlight => "probe_in_flight",
            Admit::RateLimited => "rate_limited",
            Admit::AtConcurrencyLimit => "at_concurrency_limit",
        }
    }
}

/// An exponentially weighted moving average and variance; empty until its first sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ewma {
    mean: Option<f64>,
    var: f64,
}

impl Ewma {
    pub fn add(&mut self, sample: f64, alpha: f64) {
        if !sample.is_finite() {
            return;
        }
        match self.mean {
            None => self.mean = Some(sample),
            Some(m) => {
                let diff = sample - m;
                let incr = alpha * diff;
                self.mean = Some(m + incr);
                self.var = (1.0 - alpha) * (self.var + diff * incr);
            }
        }
    }
    pub fn get(&self) -> Option<f64> {
        self.mean
    }
    /// Standard deviation around the mean (0 after one sample).
    pub fn dev(&self) -> Option<f64> {
        self.mean.map(|_| self.var.max(0.0).sqrt())
    }
}

/// Slices a window is counted in: a request leaves the count within 1/SLICES of the window
/// after it left the window.
const SLICES: u32 = 20;

/// Requests and errors over a sliding window, kept as counts per slice.
#[derive(Debug, Clone, Default)]
struct Window {
    /// (slice start, requests, errors), oldest first.
    slices: VecDeque<(Instant, u64, u64)>,
    total: u64,
    errors: u64,
}

impl Window {
    fn record(&mut self, now: Instant, failed: bool, window: Duration) {
        let slice = (window / SLICES).max(Duration::from_millis(1));
        while let Some(&(t, n, e)) = self.slices.front() {
            if now.saturating_duration_since(t) > window {
                self.slices.pop_front();
                self.total -= n;
                self.errors -= e;
            } else {
                break;
            }
        }
        let e = u64::from(failed);
        match self.slices.back_mut() {
            Some((t, n, errs)) if now.saturating_duration_since(*t) < slice => {
                *n += 1;
                *errs += e;
            }
            _ => self.slices.push_back((now, 1, e)),
        }
        self.total += 1;
        self.errors += e;
    }

    fn clear(&mut self) {
        *self = Window::default();
    }
}

#[derive(Debug, Clone)]
pub struct TargetHealth {
    pub ttft_s: Ewma,
    pub latency_s: Ewma,
    pub tokens_per_s: Ewma,
    /// Judged requests in the window, counted per slice of it: constant work per request
    /// and bounded memory at any rate.
    window: Window,
    state: BreakerState,
    opened_at: Option<Instant>,
    probe_out: bool,
    rate_limited_until: Option<Instant>,
    /// When the last request (or probe) to it started.
    last_start: Option<Instant>,
    pub in_flight: u32,
    /// 0 = no limit.
    pub max_concurrency: u32,
    pub successes: u64,
    pub failures: u64,
    /// What other scheduler replicas measured for this target (merged), blended into the
    /// view with this replica's own figures.
    remote: Option<TargetFigures>,
    /// When the last TTFT was measured.
    last_ttft: Option<Instant>,
}

impl Default for TargetHealth {
    fn default() -> Self {
        TargetHealth::new(0)
    }
}

impl TargetHealth {
    pub fn new(max_concurrency: u32) -> Self {
        TargetHealth {
            ttft_s: Ewma::default(),
            latency_s: Ewma::default(),
            tokens_per_s: Ewma::default(),
            window: Window::default(),
            state: BreakerState::Closed,
            opened_at: None,
            probe_out: false,
            rate_limited_until: None,
            last_start: None,
            in_flight: 0,
            max_concurrency,
            successes: 0,
            failures: 0,
            remote: None,
            last_ttft: None,
        }
    }

    /// This replica's own figures, for the others; a TTFT older than `cfg.forget_after`
    /// is left out.
    pub fn figures(&self, cfg: &HealthConfig, now: Instant) -> TargetFigures {
        let fresh = match (cfg.forget_after, self.last_ttft) {
            (Some(limit), Some(t)) => now.saturating_duration_since(t) <= limit,
            _ => true,
        };
        TargetFigures {
            ttft_s: self.ttft_s.get().filter(|_| fresh),
            ttft_dev_s: self.ttft_s.dev().filter(|_| fresh),
            latency_s: self.latency_s.get(),
            tokens_per_s: self.tokens_per_s.get(),
            samples: self.successes,
        }
    }

    /// Sets what the other replicas measured (None: nothing, or no other replica).
    pub fn set_remote(&mut self, figures: Option<TargetFigures>) {
        self.remote = figures;
    }

    /// Another replica opened this target's breaker at `at`: open here too, unless it was
    /// opened here later. True when this changed the state.
    pub fn force_open(&mut self, at: Instant) -> bool {
        if self.state == BreakerState::Open && self.opened_at.is_some_and(|t| t >= at) {
            return false;
        }
        let was_open = self.state == BreakerState::Open;
        self.state = BreakerState::Open;
        self.opened_at = Some(at);
        // A probe this replica has out no longer decides: the other replica's did.
        self.probe_out = false;
        !was_open
    }

    /// Another replica's probe succeeded at `at`: close here too, unless the breaker was
    /// opened here after that. True when this changed the state.
    pub fn force_close(&mut self, at: Instant) -> bool {
        if self.state == BreakerState::Closed || self.opened_at.is_some_and(|t| t > at) {
            return false;
        }
        self.state = BreakerState::Closed;
        self.opened_at = None;
        self.probe_out = false;
        self.window.clear();
        true
    }

    /// Another replica got a 429: keep the target aside until `until` (or longer, if this
    /// replica already was told so).
    pub fn hold_off_until(&mut self, until: Instant) {
        if self.rate_limited_until.is_none_or(|t| t < until) {
            self.rate_limited_until = Some(until);
        }
    }

    /// The breaker's state at `now` (an open breaker turns half-open once `open_for` passed).
    pub fn breaker(&self, cfg: &HealthConfig, now: Instant) -> BreakerState {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(t)) if now.saturating_duration_since(t) >= cfg.open_for => {
                BreakerState::HalfOpen
            }
            (s, _) => s,
        }
    }

    pub fn admit(&self, cfg: &HealthConfig, now: Instant) -> Admit {
        if self.rate_limited_until.is_some_and(|t| now < t) {
            return Admit::RateLimited;
        }
        match self.breaker(cfg, now) {
            BreakerState::Open => return Admit::BreakerOpen,
            BreakerState::HalfOpen if self.probe_out => return Admit::ProbeInFlight,
            BreakerState::HalfOpen => return Admit::Probe,
            BreakerState::Closed => {}
        }
        if self.max_concurrency > 0 && self.in_flight >= self.max_concurrency {
            return Admit::AtConcurrencyLimit;
        }
        Admit::Yes
    }

    /// When the breaker last opened, while it is open or half-open.
    pub fn opened_at(&self) -> Option<Instant> {
        (self.state != BreakerState::Closed)
            .then_some(self.opened_at)
            .flatten()
    }

    /// Until when a 429 keeps this target aside.
    pub fn rate_limited_until(&self) -> Option<Instant> {
        self.rate_limited_until
    }

    /// A request starts: counts toward the concurrency limit, and is the probe when the
    /// breaker is half-open.
    pub fn start(&mut self, cfg: &HealthConfig, now: Instant) {
        self.in_flight = self.in_flight.saturating_add(1);
        self.last_start = Some(now);
        if self.breaker(cfg, now) == BreakerState::HalfOpen {
            self.state = BreakerState::HalfOpen;
            self.probe_out = true;
        }
    }

    /// A request ended; returns the breaker's state if this changed it.
    pub fn finish(
        &mut self,
        cfg: &HealthConfig,
        outcome: Outcome,
        now: Instant,
    ) -> Option<BreakerState> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let before = self.breaker(cfg, now);
        let failed = match outcome {
            Outcome::Success {
                ttft,
                latency,
                tokens,
            } => {
                self.successes += 1;
                if let Some(t) = ttft {
                    if cfg.forget_after.is_some_and(|limit| {
                        self.last_ttft
                            .is_some_and(|at| now.saturating_duration_since(at) > limit)
                    }) {
                        // Forgotten: the new sample starts the figures afresh.
                        self.ttft_s = Ewma::default();
                    }
                    self.ttft_s.add(t.as_secs_f64(), cfg.ewma_alpha);
                    self.last_ttft = Some(now);
                }
                self.latency_s.add(latency.as_secs_f64(), cfg.ewma_alpha);
                // Tokens/s over the decode part only: TTFT is already its own figure (the
                // measured one, or for an answer sent whole the target's usual TTFT).
                let first = ttft.map(|t| t.as_secs_f64()).or(self.ttft_s.get());
                let decode = latency.as_secs_f64() - first.unwrap_or(0.0);
                if let Some(n) = tokens
                    && n > 1
                    && decode > 0.0
                {
                    self.tokens_per_s.add(n as f64 / decode, cfg.ewma_alpha);
                }
                Some(false)
            }
            Outcome::Failure => {
                self.failures += 1;
                Some(true)
            }
            Outcome::RateLimited { retry_after } => {
                let wait = retry_after.unwrap_or(cfg.default_retry_after);
                self.rate_limited_until = Some(now + wait);
                None
            }
            Outcome::Rejected => None,
        };
        if before == BreakerState::HalfOpen && self.probe_out {
            self.probe_out = false;
            match failed {
                Some(false) => {
                    self.state = BreakerState::Closed;
                    self.opened_at = None;
                    self.window.clear();
                    return Some(BreakerState::Closed);
                }
                Some(true) => {
                    self.state = BreakerState::Open;
                    self.opened_at = Some(now);
                    return Some(BreakerState::Open);
                }
                // A rate-limited or rejected probe says nothing: the next request probes.
                None => return None,
            }
        }
        let failed = failed?;
        self.window.record(now, failed, cfg.window);
        if before == BreakerState::Closed {
            let (n, errors) = (self.window.total, self.window.errors);
            if n >= u64::from(cfg.min_requests) && errors as f64 >= cfg.error_rate * n as f64 {
                self.state = BreakerState::Open;
                self.opened_at = Some(now);
                return Some(BreakerState::Open);
            }
        }
        None
    }

    /// Whether the scheduler should send this target a probe of its own now: its breaker
    /// is half-open with no probe out (so no client request has to be the probe), or it
    /// has been idle for `cfg.probe_idle` (never used counts as idle) and is otherwise fit
    /// to take a request. Never while probes are off, rate-limited or busy.
    pub fn wants_probe(&self, cfg: &HealthConfig, now: Instant) -> bool {
        let Some(idle) = cfg.probe_idle else {
            return false;
        };
        match self.admit(cfg, now) {
            Admit::Probe => true,
            Admit::Yes => {
                self.in_flight == 0
                    && self
                        .last_start
                        .is_none_or(|t| now.saturating_duration_since(t) >= idle)
            }
            _ => false,
        }
    }

    /// Errors / judged requests in the window.
    pub fn error_rate(&self) -> Option<f64> {
        let w = &self.window;
        (w.total > 0).then(|| w.errors as f64 / w.total as f64)
    }

    /// The policy's view of this target now: its own figures, blended with the other
    /// replicas' when there are any.
    pub fn view(&self, cfg: &HealthConfig, now: Instant) -> HealthView {
        let own = self.figures(cfg, now);
        let f = match self.remote {
            Some(remote) => {
                let cap = (1.0 / cfg.ewma_alpha).ceil().clamp(1.0, 1e6) as u64;
                TargetFigures::merge(&[own, remote], cap).unwrap_or(own)
            }
            None => own,
        };
        let secs = |v: Option<f64>| {
            v.filter(|x| x.is_finite() && *x >= 0.0)
                .map(Duration::from_secs_f64)
        };
        HealthView {
            ttft: secs(f.ttft_s),
            ttft_dev: secs(f.ttft_dev_s),
            latency: secs(f.latency_s),
            tokens_per_s: f.tokens_per_s,
            admit: self.admit(cfg, now),
        }
    }
}

/// What routing needs to know about a target's health.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthView {
    pub ttft: Option<Duration>,
    /// How far TTFT strays from its mean (one standard deviation).
    pub ttft_dev: Option<Duration>,
    pub latency: Option<Duration>,
    pub tokens_per_s: Option<f64>,
    pub admit: Admit,
}

impl Default for HealthView {
    fn default() -> Self {
        HealthView {
            ttft: None,
            ttft_dev: None,
            latency: None,
            tokens_per_s: None,
            admit: Admit::Yes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok() -> Outcome {
        Outcome::Success {
            ttft: Some(ms(100)),
            latency: ms(600),
            tokens: Some(51),
        }
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let cfg = HealthConfig {
            min_requests: 3,
            error_rate: 0.5,
            open_for: ms(1000),
            ..HealthConfig::default()
        };
        let t0 = Instant::now();
        let mut h = TargetHealth::new(0);
        // Two failures are below the minimum count: still closed.
        for i in 0..2 {
            h.start(&cfg, t0);
            assert_eq!(h.finish(&cfg, Outcome::Failure, t0 + ms(i)), None);
        }
        assert_eq!(h.admit(&cfg, t0), Admit::Yes);
        h.start(&cfg, t0);
        assert_eq!(
            h.finish(&cfg, Outcome::Failure, t0 + ms(3)),
            Some(BreakerState::Open)
        );
        assert_eq!(h.admit(&cfg, t0 + ms(500)), Admit::BreakerOpen);
        // After open_for, exactly one probe goes through.
        let t1 = t0 + ms(1003);
        assert_eq!(h.admit(&cfg, t1), Admit::Probe);
        h.start(&cfg, t1);
        assert_eq!(h.admit(&cfg, t1), Admit::ProbeInFlight);
        // The probe fails: open again for another period.
        assert_eq!(
            h.finish(&cfg, Outcome::Failure, t1),
            Some(BreakerState::Open)
        );
        assert_eq!(h.admit(&cfg, t1 + ms(999)), Admit::BreakerOpen);
        let t2 = t1 + ms(1000);
        assert_eq!(h.admit(&cfg, t2), Admit::Probe);
        h.start(&cfg, t2);
        assert_eq!(h.finish(&cfg, ok(), t2), Some(BreakerState::Closed));
        assert_eq!(h.admit(&cfg, t2), Admit::Yes);
        assert_eq!(
            h.error_rate(),
            None,
            "a closed breaker starts a fresh window"
        );
    }

    #[test]
    fn other_replicas_open_close_and_hold_off() {
        let cfg = HealthConfig {
            open_for: ms(1000),
            ..HealthConfig::default()
        };
        let t0 = Instant::now();
        let mut h = TargetHealth::new(0);
        assert!(h.force_open(t0));
        assert!(!h.force_open(t0), "already open since then");
        assert_eq!(h.admit(&cfg, t0 + ms(999)), Admit::BreakerOpen);
        assert_eq!(h.admit(&cfg, t0 + ms(1000)), Admit::Probe);
        // A close from before this open does not undo it.
        assert!(!h.force_close(t0 - ms(1)));
        assert!(h.force_close(t0 + ms(10)));
        assert_eq!(h.admit(&cfg, t0 + ms(20)), Admit::Yes);
        h.hold_off_until(t0 + ms(500));
        h.hold_off_until(t0 + ms(100));
        assert_eq!(h.admit(&cfg, t0 + ms(499)), Admit::RateLimited);
        assert_eq!(h.admit(&cfg, t0 + ms(500)), Admit::Yes);
    }

    #[test]
    fn remote_figures_fill_in_and_blend() {
        let cfg = HealthConfig {
            ewma_alpha: 0.5,
            ..HealthConfig::default()
        };
        let t0 = Instant::now();
        let mut h = TargetHealth::new(0);
        let remote = TargetFigures {
            ttft_s: Some(0.3),
            samples: 10,
            ..TargetFigures::default()
        };
        h.set_remote(Some(remote));
        // Never used here: the others' figure.
        assert_eq!(h.view(&cfg, t0).ttft, Some(ms(300)));
        h.start(&cfg, t0);
        h.finish(&cfg, ok(), t0);
        // One sample of 100 ms here against 10 (capped at 1/alpha = 2) of 300 ms there.
        let v = h.view(&cfg, t0).ttft.unwrap().as_secs_f64();
        assert!((v - (0.1 + 2.0 * 0.3) / 3.0).abs() < 1e-9, "{v}");
        h.set_remote(None);
        assert_eq!(h.view(&cfg, t0).ttft, Some(ms(100)));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let cfg = HealthConfig {
            min_requests: 2,
            window: ms(100),
            ..HealthConfig::default()
        };
        let t0 = Instant::now();
        let mut h = TargetHealth::new(0);
        h.start(&cfg, t0);
        h.finish(&cfg, Outcome::Failure, t0);
        h.start(&cfg, t0);
        // 200 ms later the first failure no longer counts: one failure in one request
        // is under the minimum.
        assert_eq!(h.finish(&cfg, Outcome::Failure, t0 + ms(200)), None);
        assert_eq!(h.breaker(&cfg, t0 + ms(200)), BreakerState::Closed);
    }

    #[test]
    fn retry_after_keeps_the_target_aside() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let mut h = TargetHealth::new(0);
        h.start(&cfg, t0);
        h.finish(
            &cfg,
            Outcome::RateLimited {
                retry_after: Some(ms(2000)),
            },
            t0,
        );
        assert_eq!(h.admit(&cfg, t0 + ms(1999)), Admit::RateLimited);
        assert_eq!(h.admit(&cfg, t0 + ms(2000)), Admit::Yes);
        assert_eq!(
            h.breaker(&cfg, t0),
            BreakerState::Closed,
            "429 is not a fault"
        );
    }

    #[test]
    fn ewmas_and_concurrency() {
        let cfg = HealthConfig {
            ewma_alpha: 0.5,
            ..HealthConfig::default()
        };
        let t0 = Instant::now();
        let mut h = TargetHealth::new(1);
        h.start(&cfg, t0);
        assert_eq!(h.admit(&cfg, t0), Admit::AtConcurrencyLimit);
        h.finish(&cfg, ok(), t0);
        h.start(&cfg, t0);
        h.finish(
            &cfg,
            Outcome::Success {
                ttft: Some(ms(300)),
                latency: ms(300),
                tokens: None,
            },
            t0,
        );
        let v = h.view(&cfg, t0);
        assert_eq!(v.ttft, Some(ms(200)));
        // Samples 100 and 300 ms with alpha 0.5: variance 0.5 * (0 + 0.2 * 0.1) s².
        assert_eq!(v.ttft_dev, Some(Duration::from_secs_f64(0.01f64.sqrt())));
        assert_eq!(v.latency, Some(ms(450)));
        // 51 tokens over the 500 ms after the first.
        assert_eq!(v.tokens_per_s, Some(102.0));
        assert_eq!(v.admit, Admit::Yes);
        h.start(&cfg, t0);
        h.finish(&cfg, Outcome::Rejected, t0);
        assert_eq!(h.error_rate(), Some(0.0), "rejections are not judged");
    }

    #[test]
    fn probes_go_to_idle_and_half_open_targets_only_when_enabled() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let off = HealthConfig::default();
        let cfg = HealthConfig {
            probe_idle: Some(ms(100)),
            min_requests: 1,
            open_for: ms(50),
            ..HealthConfig::default()
        };
        let mut h = TargetHealth::default();
        assert!(!h.wants_probe(&off, t0), "probes are off by default");
        assert!(h.wants_probe(&cfg, t0), "never used counts as idle");
        h.start(&cfg, t0);
        assert!(!h.wants_probe(&cfg, t0 + ms(10)), "busy");
        let ok = Outcome::Success {
            ttft: Some(ms(1)),
            latency: ms(1),
            tokens: None,
        };
        assert_eq!(h.finish(&cfg, ok, t0 + ms(10)), None);
        assert!(!h.wants_probe(&cfg, t0 + ms(50)), "used 50 ms ago");
        assert!(h.wants_probe(&cfg, t0 + ms(100)), "idle for 100 ms");
        // A failure opens the breaker: no probe while open, one once half-open.
        h.start(&cfg, t0 + ms(100));
        assert_eq!(
            h.finish(&cfg, Outcome::Failure, t0 + ms(100)),
            Some(BreakerState::Open)
        );
        assert!(!h.wants_probe(&cfg, t0 + ms(120)), "open");
        assert!(h.wants_probe(&cfg, t0 + ms(150)), "half-open");
        h.start(&cfg, t0 + ms(150));
        assert!(!h.wants_probe(&cfg, t0 + ms(160)), "its probe is out");
        assert_eq!(h.finish(&cfg, ok, t0 + ms(170)), Some(BreakerState::Closed));
    }

    #[test]
    fn a_stale_ttft_is_forgotten_and_measured_anew() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let mut h = TargetHealth::default();
        let ok = |ttft: u64| Outcome::Success {
            ttft: Some(ms(ttft)),
            latency: ms(ttft + 100),
            tokens: Some(10),
        };
        for t in [400, 420, 2500] {
            h.start(&cfg, t0);
            h.finish(&cfg, ok(t), t0);
        }
        let v = h.view(&cfg, t0 + Duration::from_secs(59));
        assert!(
            v.ttft_dev.unwrap() > ms(500),
            "one slow answer widens the tail: {v:?}"
        );
        // A minute without a sample: nothing is known of its TTFT any more.
        let v = h.view(&cfg, t0 + Duration::from_secs(61));
        assert_eq!((v.ttft, v.ttft_dev), (None, None));
        assert!(v.latency.is_some(), "latency and tokens/s are kept");
        // The next answer starts the figures afresh.
        let later = t0 + Duration::from_secs(90);
        h.start(&cfg, later);
        h.finish(&cfg, ok(450), later);
        let v = h.view(&cfg, later);
        assert_eq!(v.ttft, Some(ms(450)));
        // Never forgetting keeps the old tail.
        let keep = HealthConfig {
            forget_after: None,
            ..cfg
        };
        assert!(
            h.view(&keep, later + Duration::from_secs(600))
                .ttft
                .is_some()
        );
    }
}
