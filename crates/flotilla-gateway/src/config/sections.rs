//! The smaller `[scheduler.*]` sections: health, classes, keys, the ledger, shared state,
//! and how requests spread over agents.

use std::time::Duration;

use flotilla_scheduler::{HealthConfig, Priority, Strategy};
use flotilla_state::SharedConfig;
use serde::{Deserialize, Serialize};

/// How requests spread over agents with free slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LocalBalance {
    /// Fill one agent's batch before the next (requests share batches and KV cache).
    #[default]
    Pack,
    /// Least loaded first.
    Spread,
}

/// Circuit breaker and EWMA settings (`[scheduler.health]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSection {
    /// Weight of the newest sample in the TTFT, latency and tokens/s EWMAs.
    pub ewma_alpha: f64,
    /// The error rate is measured over this window.
    pub window_ms: u64,
    /// Fewer requests than this in the window never open the breaker.
    pub min_requests: u32,
    /// Error rate (0..1] that opens the breaker.
    pub error_rate: f64,
    /// How long an open breaker waits before one probe request.
    pub open_ms: u64,
    /// How long a 429 without `Retry-After` keeps a target aside.
    pub default_retry_after_ms: u64,
    /// Active probes (0 = off): every target idle this long (cloud targets of the model
    /// groups, and the models agents serve) gets a one-token request from the scheduler,
    /// which keeps its latency figures current and opens its breaker before a client
    /// meets the failure; and a half-open breaker is probed the same way rather than with
    /// a client's request. Each probe is a real, billed request of one token.
    pub probe_idle_ms: u64,
    /// A target's TTFT measured longer ago than this is forgotten (0 = never): it is
    /// judged on its expected TTFT again, so a target whose tail once looked too slow is
    /// tried again and measured anew instead of being passed over for good.
    pub forget_ms: u64,
}

impl Default for HealthSection {
    fn default() -> Self {
        let d = HealthConfig::default();
        HealthSection {
            ewma_alpha: d.ewma_alpha,
            window_ms: d.window.as_millis() as u64,
            min_requests: d.min_requests,
            error_rate: d.error_rate,
            open_ms: d.open_for.as_millis() as u64,
            default_retry_after_ms: d.default_retry_after.as_millis() as u64,
            probe_idle_ms: 0,
            forget_ms: d.forget_after.map_or(0, |f| f.as_millis() as u64),
        }
    }
}

/// Whether clients must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every OpenAI API request needs a key made with `flotilla keys create`.
    #[default]
    Keys,
    /// No keys: anyone who reaches the port may call (for a first look on localhost).
    None,
}

/// Defaults for one API key's requests (`[scheduler.key_defaults.<key name>]`); headers
/// still win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KeyDefaults {
    pub priority: Option<Priority>,
    pub strategy: Option<Strategy>,
}

/// Where every request's row is written (`[scheduler.ledger]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerSection {
    /// `sqlite://PATH` or `postgres://...`; unset = `ledger.db` in the data directory
    /// (the `flotilla` binary) or an in-memory database (a library user).
    pub url: Option<String>,
    /// An environment variable holding the URL (when it carries a password, as a
    /// Kubernetes Secret or a systemd EnvironmentFile provides it).
    pub url_env: Option<String>,
    /// Rows are written at least this often; a crash loses at most this much.
    pub flush_ms: u64,
    /// Or as soon as this many rows wait; also the most rows one transaction writes. Kept
    /// small: the writer's thread shares the cores with the request path, and a 512-row
    /// transaction (~5 ms of CPU) put +2.3 ms on the scheduler's p99 at concurrency 1,
    /// where 32 rows cost no measurable CPU more a row under load (BENCHMARKS.md).
    pub batch: usize,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            url: None,
            url_env: None,
            flush_ms: 200,
            batch: 32,
        }
    }
}

impl LedgerSection {
    /// The database URL: `url`, or the value of the variable `url_env` names; None when
    /// neither is set. Errors never quote the URL (it may carry a password).
    pub fn resolved_url(&self) -> Result<Option<String>, String> {
        let url = match (&self.url, &self.url_env) {
            (Some(_), Some(_)) => {
                return Err("scheduler.ledger: set url or url_env, not both".to_owned());
            }
            (Some(u), None) => u.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!("scheduler.ledger.url_env: environment variable `{var}` is not set")
            })?,
            (None, None) => return Ok(None),
        };
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(
                "scheduler.ledger.url: must start with sqlite:, postgres:// or postgresql://"
                    .into(),
            );
        }
        Ok(Some(url))
    }
}

/// State shared with other scheduler replicas (`[scheduler.state]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSection {
    /// `redis://[:password@]host:port[/db]`; unset = every replica keeps its own state
    /// in memory.
    pub redis_url: Option<String>,
    /// An environment variable holding the URL (when it carries a password).
    pub redis_url_env: Option<String>,
    /// Replicas with the same prefix share state; different fleets use different ones.
    pub key_prefix: String,
    /// How often each replica writes its in-flight counts and health figures and reads the
    /// others' (breakers, Retry-After and nodes travel at once by pub/sub).
    pub sync_ms: u64,
    /// The most one Redis call may take before Redis counts as down.
    pub timeout_ms: u64,
    /// While Redis is down, one warning per this interval.
    pub warn_every_ms: u64,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            redis_url: None,
            redis_url_env: None,
            key_prefix: "flotilla".into(),
            sync_ms: 250,
            timeout_ms: 250,
            warn_every_ms: 10_000,
        }
    }
}

/// Deadlines a request of one class gets when its headers set none (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClassSection {
    pub ttft_ms: u64,
    pub deadline_ms: u64,
}

/// A class's deadlines, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassDefaults {
    pub ttft: Option<Duration>,
    pub deadline: Option<Duration>,
}

impl ClassSection {
    pub(super) fn resolve(&self) -> ClassDefaults {
        let d = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        ClassDefaults {
            ttft: d(self.ttft_ms),
            deadline: d(self.deadline_ms),
        }
    }
}

impl StateSection {
    /// The shared store's settings, None without a URL.
    pub(super) fn resolve(&self) -> Result<Option<SharedConfig>, String> {
        let url = match (&self.redis_url, &self.redis_url_env) {
            (Some(_), Some(_)) => {
                return Err("scheduler.state: set redis_url or redis_url_env, not both".to_owned());
            }
            (Some(u), None) => u.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!("scheduler.state.redis_url_env: environment variable `{var}` is not set")
            })?,
            (None, None) => return Ok(None),
        };
        if !url.starts_with("redis://") {
            // Never echo the URL: it may carry a password.
            return Err(
                "scheduler.state.redis_url: must start with redis:// (TLS to Redis is not built in)"
                    .into(),
            );
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err("scheduler.state.key_prefix: must be non-empty, without spaces".into());
        }
        Ok(Some(SharedConfig {
            url,
            prefix: self.key_prefix.clone(),
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            warn_every: Duration::from_millis(self.warn_every_ms.max(1)),
        }))
    }
}
