//! The simulated fleet: one model group, its agents' throughput model (speed, prefix cache,
//! outages), its cloud targets' latency, speed, prices, failure windows and 429 windows, and
//! overrides of the policy and health settings. TOML with unknown keys refused;
//! [`SimConfig::parse`] reports every invalid value at once.

use std::time::Duration;

use serde::Deserialize;

use super::SimError;
use crate::{CloudTarget, HealthConfig, ModelGroup, PolicySettings, Strategy};

fn one() -> u32 {
    1
}

fn default_queue_depth() -> u64 {
    16
}

fn default_context() -> u64 {
    8192
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The model group's public name; every trace line must name it.
    pub model: String,
    /// Local GPU time, amortised, in US dollars per GPU-hour: what owning a GPU costs, busy
    /// or idle. The report prices local work with it (busy time for the marginal
    /// accounting, the whole window for the owned one); the policy does not route by it.
    pub gpu_hour_usd: f64,
    /// What one more GPU-hour of work costs on top of owning the GPU (power, say): the
    /// group's `gpu_marginal_usd_per_hour`, which the policy prices local work with.
    #[serde(default)]
    pub gpu_marginal_usd_per_hour: f64,
    /// The group's `max_queue_depth`.
    #[serde(default = "default_queue_depth")]
    pub max_queue_depth: u64,
    /// The group's strategy for the `flotilla` policy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Seeds the cloud latency and failure draws.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub agents: Vec<SimAgent>,
    /// In failover order, as in the group's `cloud` list.
    #[serde(default)]
    pub cloud: Vec<SimCloud>,
}

/// One simulated agent serving the model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimAgent {
    pub name: String,
    /// GPUs the agent holds (each priced at `gpu_hour_usd`).
    #[serde(default = "one")]
    pub gpus: u32,
    /// Sequences decoded together (`max_num_seqs`); more wait in the scheduler's queue.
    pub slots: u64,
    /// Prompt tokens/s of one sequence's prefill.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens/s of one sequence decoding alone.
    pub decode_tokens_per_s: f64,
    /// Per-sequence decode slowdown at a full batch (0.3 = 30% slower with every slot busy),
    /// linear in the batch size.
    #[serde(default)]
    pub batch_slowdown: f64,
    /// Longest prompt + completion it takes; longer requests are refused.
    #[serde(default = "default_context")]
    pub context_length: u64,
    /// Its GPUs' price per GPU-hour when it differs from the fleet's `gpu_hour_usd` (an
    /// older card, say). Reports only.
    #[serde(default)]
    pub gpu_hour_usd: Option<f64>,
    /// KV cache kept for shared prompt prefixes, in tokens (least recently used goes
    /// first); 0 = no prefix caching. A request whose prefix the agent holds skips that
    /// part of its prefill.
    #[serde(default)]
    pub prefix_cache_tokens: u64,
    /// Times it is gone (killed, preempted, rebooting): what runs on it breaks, it takes
    /// nothing new, and it comes back empty with a cold prefix cache.
    #[serde(default)]
    pub outages: Vec<Outage>,
}

/// `[start_s, end_s)` of the trace during which an agent is gone. Its process is down, so
/// connections to it are refused at once; the fleet keeps listing it until
/// `gateway.node_ttl_ms` after its last heartbeat (at `start_s`) or until a connection to
/// it is refused, as the gateway's fleet does.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub start_s: f64,
    pub end_s: f64,
}

impl SimAgent {
    /// Whether the agent is gone at `at` (since the trace's start).
    pub fn down_at(&self, at: Duration) -> bool {
        let s = at.as_secs_f64();
        self.outages.iter().any(|o| s >= o.start_s && s < o.end_s)
    }

    /// Tokens/s of one sequence when `running` sequences (itself included) share the batch.
    pub fn decode_rate(&self, running: u64) -> f64 {
        let extra = running.saturating_sub(1) as f64 / self.slots.max(1) as f64;
        self.decode_tokens_per_s * (1.0 - self.batch_slowdown * extra.min(1.0))
    }
}

/// One simulated cloud target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimCloud {
    pub provider: String,
    pub model: String,
    /// Median and 99th percentile of its TTFT (lognormal between them).
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Generated tokens/s of one answer.
    pub tokens_per_s: f64,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    #[serde(default)]
    pub context_length: Option<u64>,
    /// 0 = no limit.
    #[serde(default)]
    pub max_concurrency: u32,
    #[serde(default)]
    pub failures: Vec<FailureWindow>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitWindow>,
}

/// Calls started within `[start_s, end_s)` of the trace fail with `error_rate` probability,
/// after about one TTFT (a 5xx or a timeout).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureWindow {
    pub start_s: f64,
    pub end_s: f64,
    pub error_rate: f64,
}

/// Calls started within `[start_s, end_s)` of the trace get a 429 after [`RATE_LIMIT_MS`],
/// with `Retry-After: retry_after_ms` (none when unset: the health's default applies).
/// Nothing is billed; the gateway keeps the target aside until then and tries the next.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitWindow {
    pub start_s: f64,
    pub end_s: f64,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// How long a provider takes to answer 429: it refuses before any work, about one round
/// trip.
pub const RATE_LIMIT_MS: u64 = 40;

impl SimCloud {
    /// The `Retry-After` of a call started `at`, if the call gets a 429 (Some(None): a 429
    /// without the header).
    pub fn rate_limited_at(&self, at: Duration) -> Option<Option<Duration>> {
        let s = at.as_secs_f64();
        self.rate_limits
            .iter()
            .find(|w| s >= w.start_s && s < w.end_s)
            .map(|w| w.retry_after_ms.map(Duration::from_millis))
    }

    /// Probability that a call started `at` (since the trace's start) fails.
    pub fn error_rate_at(&self, at: Duration) -> f64 {
        let s = at.as_secs_f64();
        self.failures
            .iter()
            .filter(|w| s >= w.start_s && s < w.end_s)
            .map(|w| w.error_rate)
            .fold(0.0, f64::max)
    }
}

/// Overrides of [`PolicySettings`]; unset = the scheduler's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub age_boost_ms: Option<u64>,
    pub max_queued: Option<u64>,
    pub pack: Option<bool>,
    pub prior_ttft_ms: Option<u64>,
    pub prior_latency_ms: Option<u64>,
    pub prior_tokens_per_s: Option<f64>,
    pub sla_attainment: Option<f64>,
}

/// How the gateway carries out a decision (its `[scheduler]` settings of the same names;
/// the defaults are its defaults). Apply to the `flotilla` policy only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Targets tried per request, the first included.
    pub max_attempts: u32,
    /// Pause before the second attempt, doubling for each further one (at most 1 s).
    pub retry_backoff_ms: u64,
    /// No new attempt starts this long after arrival.
    pub retry_budget_ms: u64,
    /// A request waiting longer than this for a local slot fails (unless it spills first).
    pub max_queue_wait_ms: u64,
    /// The fleet stops listing an agent this long after its last heartbeat: the gateway's
    /// `heartbeat_ms` x `missed_heartbeats` + half a beat (1000 x 3 + 500 by default).
    /// Applies to every policy (the fleet is not the policy).
    pub node_ttl_ms: u64,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            max_attempts: 3,
            retry_backoff_ms: 25,
            retry_budget_ms: 30_000,
            max_queue_wait_ms: 600_000,
            node_ttl_ms: 3_500,
        }
    }
}

impl GatewaySection {
    /// The pause before attempt `n` (1-based count of attempts already made).
    pub fn backoff(&self, made: u32) -> Duration {
        Duration::from_millis(self.retry_backoff_ms)
            .saturating_mul(1 << made.saturating_sub(1).min(10))
            .min(Duration::from_secs(1))
    }
}

/// Overrides of [`HealthConfig`]; unset = the scheduler's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub ewma_alpha: Option<f64>,
    pub window_ms: Option<u64>,
    pub min_requests: Option<u32>,
    pub error_rate: Option<f64>,
    pub open_for_ms: Option<u64>,
    /// How long a 429 without `Retry-After` keeps a target aside.
    pub default_retry_after_ms: Option<u64>,
    /// A TTFT measured longer ago than this is forgotten (0 = never).
    pub forget_ms: Option<u64>,
}

fn check(errors: &mut Vec<String>, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        errors.push(what());
    }
}

/// Each `(start_s, end_s)` window must be a non-empty span from 0 on.
fn check_windows(
    errors: &mut Vec<String>,
    at: &str,
    what: &str,
    windows: impl Iterator<Item = (f64, f64)>,
) {
    for (j, (start, end)) in windows.enumerate() {
        check(
            errors,
            non_negative(start) && end.is_finite() && end > start,
            || format!("{at}: {what}[{j}]: need 0 <= start_s < end_s"),
        );
    }
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

impl SimConfig {
    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<SimConfig, SimError> {
        let cfg: SimConfig =
            toml::from_str(text).map_err(|e| SimError::Config(vec![e.to_string()]))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn read(path: &std::path::Path) -> Result<SimConfig, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_owned(),
            source,
        })?;
        SimConfig::parse(&text)
    }

    /// Every invalid value, at once.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut e = Vec::new();
        check(&mut e, !self.model.trim().is_empty(), || {
            "model: empty".into()
        });
        check(&mut e, non_negative(self.gpu_hour_usd), || {
            format!("gpu_hour_usd: {} is not a price", self.gpu_hour_usd)
        });
        check(&mut e, non_negative(self.gpu_marginal_usd_per_hour), || {
            format!(
                "gpu_marginal_usd_per_hour: {} is not a price",
                self.gpu_marginal_usd_per_hour
            )
        });
        check(
            &mut e,
            !self.agents.is_empty() || !self.cloud.is_empty(),
            || "no [[agents]] and no [[cloud]]: nothing to route to".into(),
        );
        for (i, a) in self.agents.iter().enumerate() {
            let at = format!("agents[{i}] ({})", a.name);
            check(&mut e, !a.name.trim().is_empty(), || {
                format!("{at}: empty name")
            });
            check(
                &mut e,
                !self.agents[..i].iter().any(|b| b.name == a.name),
                || format!("{at}: duplicate name"),
            );
            check(&mut e, a.gpus >= 1, || {
                format!("{at}: gpus must be at least 1")
            });
            check(&mut e, a.slots >= 1, || {
                format!("{at}: slots must be at least 1")
            });
            check(&mut e, positive(a.prefill_tokens_per_s), || {
                format!("{at}: prefill_tokens_per_s must be positive")
            });
            check(&mut e, positive(a.decode_tokens_per_s), || {
                format!("{at}: decode_tokens_per_s must be positive")
            });
            check(
                &mut e,
                a.batch_slowdown.is_finite() && (0.0..1.0).contains(&a.batch_slowdown),
                || format!("{at}: batch_slowdown must be in [0, 1)"),
            );
            check(&mut e, a.context_length >= 1, || {
                format!("{at}: context_length must be at least 1")
            });
            check(&mut e, a.gpu_hour_usd.is_none_or(non_negative), || {
                format!("{at}: gpu_hour_usd is not a price")
            });
            check_windows(
                &mut e,
                &at,
                "outages",
                a.outages.iter().map(|o| (o.start_s, o.end_s)),
            );
        }
        for (i, c) in self.cloud.iter().enumerate() {
            let at = format!("cloud[{i}] ({})", c.provider);
            check(&mut e, !c.provider.trim().is_empty(), || {
                format!("{at}: empty provider")
            });
            check(
                &mut e,
                !self.cloud[..i].iter().any(|d| d.provider == c.provider),
                || format!("{at}: duplicate provider"),
            );
            check(
                &mut e,
                positive(c.ttft_p50_ms)
                    && c.ttft_p99_ms.is_finite()
                    && c.ttft_p99_ms >= c.ttft_p50_ms,
                || format!("{at}: need 0 < ttft_p50_ms <= ttft_p99_ms"),
            );
            check(&mut e, positive(c.tokens_per_s), || {
                format!("{at}: tokens_per_s must be positive")
            });
            check(
                &mut e,
                non_negative(c.input_usd_per_mtok) && non_negative(c.output_usd_per_mtok),
                || format!("{at}: prices must be non-negative"),
            );
            check_windows(
                &mut e,
                &at,
                "failures",
                c.failures.iter().map(|w| (w.start_s, w.end_s)),
            );
            check_windows(
                &mut e,
                &at,
                "rate_limits",
                c.rate_limits.iter().map(|w| (w.start_s, w.end_s)),
            );
            for (j, w) in c.failures.iter().enumerate() {
                check(
                    &mut e,
                    w.error_rate.is_finite() && (0.0..=1.0).contains(&w.error_rate),
                    || format!("{at}: failures[{j}]: error_rate must be in [0, 1]"),
                );
            }
        }
        let h = &self.health;
        check(
            &mut e,
            h.ewma_alpha.is_none_or(|a| a > 0.0 && a <= 1.0),
            || "health.ewma_alpha must be in (0, 1]".into(),
        );
        check(
            &mut e,
            h.error_rate.is_none_or(|r| r > 0.0 && r <= 1.0),
            || "health.error_rate must be in (0, 1]".into(),
        );
        check(&mut e, h.min_requests.is_none_or(|n| n >= 1), || {
            "health.min_requests must be at least 1".into()
        });
        check(&mut e, self.gateway.max_attempts >= 1, || {
            "gateway.max_attempts must be at least 1".into()
        });
        check(
            &mut e,
            self.policy.prior_tokens_per_s.is_none_or(positive),
            || "policy.prior_tokens_per_s must be positive".into(),
        );
        check(
            &mut e,
            self.policy
                .sla_attainment
                .is_none_or(|p| p > 0.0 && p < 1.0),
            || "policy.sla_attainment must be in (0, 1)".into(),
        );
        if e.is_empty() {
            Ok(())
        } else {
            Err(SimError::Config(e))
        }
    }

    pub fn settings(&self) -> PolicySettings {
        let d = PolicySettings::default();
        let p = &self.policy;
        PolicySettings {
            age_boost: p.age_boost_ms.map_or(d.age_boost, Duration::from_millis),
            max_queued: p.max_queued.unwrap_or(d.max_queued),
            pack: p.pack.unwrap_or(d.pack),
            prior_ttft: p.prior_ttft_ms.map_or(d.prior_ttft, Duration::from_millis),
            prior_latency: p
                .prior_latency_ms
                .map_or(d.prior_latency, Duration::from_millis),
            prior_tokens_per_s: p.prior_tokens_per_s.unwrap_or(d.prior_tokens_per_s),
            sla_attainment: p.sla_attainment.unwrap_or(d.sla_attainment),
            ..d
        }
    }

    /// The price of one of `agent`'s GPU-hours.
    pub fn gpu_price(&self, agent: &SimAgent) -> f64 {
        agent.gpu_hour_usd.unwrap_or(self.gpu_hour_usd)
    }

    pub fn health_config(&self) -> HealthConfig {
        let d = HealthConfig::default();
        let h = &self.health;
        HealthConfig {
            ewma_alpha: h.ewma_alpha.unwrap_or(d.ewma_alpha),
            window: h.window_ms.map_or(d.window, Duration::from_millis),
            min_requests: h.min_requests.unwrap_or(d.min_requests),
            error_rate: h.error_rate.unwrap_or(d.error_rate),
            open_for: h.open_for_ms.map_or(d.open_for, Duration::from_millis),
            default_retry_after: h
                .default_retry_after_ms
                .map_or(d.default_retry_after, Duration::from_millis),
            forget_after: match h.forget_ms {
                None => d.forget_after,
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
            },
            ..d
        }
    }

    /// The model group the `flotilla` policy routes with, as the gateway would build it
    /// from a `[[scheduler.models]]` entry.
    pub fn group(&self) -> ModelGroup {
        let mut g = ModelGroup::implicit(&self.model, self.max_queue_depth);
        g.strategy = self.strategy;
        g.gpu_hour_usd = self.gpu_hour_usd;
        g.gpu_marginal_usd_per_hour = self.gpu_marginal_usd_per_hour;
        g.cloud = self
            .cloud
            .iter()
            .map(|c| {
                let mut t = CloudTarget::new(&c.provider, &c.model);
                t.input_usd_per_mtok = Some(c.input_usd_per_mtok);
                t.output_usd_per_mtok = Some(c.output_usd_per_mtok);
                t.context_length = c.context_length;
                // What an operator would write from the provider's published latency.
                t.expected_ttft_ms = Some(c.ttft_p50_ms.round() as u64);
                t.max_concurrency = c.max_concurrency;
                t
            })
            .collect();
        g
    }
}
