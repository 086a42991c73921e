//! The `[scheduler]` config section: raw as written in TOML, and resolved after
//! validation, which reports every problem at once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_providers::{Price, ProviderConfig, Secret, Timeouts, TokenCounter};
use flotilla_scheduler::{
    Capability, CloudTarget, HealthConfig, MidStream, ModelGroup, PolicySettings, Priority, Rule,
    Strategy,
};
use flotilla_state::SharedConfig;

pub use crate::tls::TlsSection;
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
    fn resolve(&self) -> ClassDefaults {
        let d = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        ClassDefaults {
            ttft: d(self.ttft_ms),
            deadline: d(self.deadline_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerSection {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body; slower ones get 408.
    pub body_timeout_ms: u64,
    /// How long a client may take to send a request's headers (also how long an idle
    /// keep-alive connection stays open); slower ones are disconnected.
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers) accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// Queue depth limit for models whose entry does not set one.
    pub default_max_queue_depth: u64,
    /// How often agents are asked to heartbeat.
    pub heartbeat_ms: u64,
    /// An agent that misses this many heartbeats in a row is unhealthy: not routed to
    /// until it reports again.
    pub missed_heartbeats: u32,
    /// Deprecated: the silence after which a node was dropped; read as
    /// `missed_heartbeats = ceil(node_ttl_ms / heartbeat_ms)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ttl_ms: Option<u64>,
    pub connect_timeout_ms: u64,
    /// Until an upstream's response headers arrive.
    pub first_byte_timeout_ms: u64,
    /// For a whole non-streaming upstream response.
    pub request_timeout_ms: u64,
    /// From sending a streamed request until its first token; a stream silent (or broken,
    /// or garbled) before that fails over to the next target without the client noticing.
    pub first_token_timeout_ms: u64,
    /// The longest silence between two chunks of a running stream; past it the stream is
    /// broken (`mid_stream` says what the client gets).
    pub stream_idle_timeout_ms: u64,
    /// Environment variable holding the token agents must present; unset = no check.
    pub cluster_token_env: Option<String>,
    /// Environment variable holding the token `/admin/...` requires; unset = open (warned
    /// about beyond loopback).
    pub admin_token_env: Option<String>,
    /// Routing strategy of models whose entry sets none: cost | latency | failover |
    /// weighted | local-only | cloud-only.
    pub default_strategy: Strategy,
    /// Amortised price of one owned GPU-hour in US dollars, busy or idle: what reports
    /// charge local work (busy time) and the fleet (every hour of the window).
    pub gpu_hour_usd: f64,
    /// What one more busy GPU-hour costs on top of owning it (power, say), in US dollars;
    /// 0 by default. The `cost` strategy prices local work with this plus an opportunity
    /// cost that grows as free local capacity shrinks, so idle GPUs take work first.
    pub gpu_marginal_usd_per_hour: f64,
    /// The share of requests a target must be predicted to serve within their deadlines
    /// (0..1): targets are judged by their TTFT at this quantile, not by its mean.
    pub sla_attainment: f64,
    /// What keeps a client on one side of a `weighted` split: `request` (each request is
    /// drawn anew), `key` (the API key) or `user` (the body's `user`, else the key).
    pub split_by: SplitBy,
    /// Class of requests without `x-flotilla-priority`.
    pub default_priority: Priority,
    /// Deadlines per class when the request's headers set none.
    pub interactive: ClassSection,
    pub batch: ClassSection,
    /// Batch work that has waited this long is dispatched like interactive work.
    pub batch_age_boost_ms: u64,
    /// Most requests one model's local queue holds; past it they spill or get 503.
    pub max_queued: u64,
    /// Longest a request waits in the local queue before it gets 504.
    pub max_queue_wait_ms: u64,
    /// Prefix affinity may load a node this many requests above the least loaded one.
    pub affinity_max_imbalance: u64,
    pub local_balance: LocalBalance,
    /// Targets tried per request, the first included.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubles for each next one (capped at 1 s).
    pub retry_backoff_ms: u64,
    /// No new attempt starts this long after the request arrived.
    pub retry_budget_ms: u64,
    /// A stream broken after its first byte: `error` (an SSE error event) or `continue`
    /// (the next target continues the answer).
    pub mid_stream: MidStream,
    /// Completion length assumed for cost and finish-time estimates when the request sets
    /// no `max_tokens`.
    pub default_max_tokens: u64,
    /// Assumed until measured: a target's TTFT, a local request's latency, tokens/s.
    pub prior_ttft_ms: u64,
    pub prior_latency_ms: u64,
    pub prior_tokens_per_s: f64,
    pub health: HealthSection,
    /// `keys` (the default): clients need an API key; `none`: open (what `flotilla up`
    /// uses on a loopback address when this is unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// How often keys (new, revoked, spend) are re-read from the database.
    pub key_refresh_ms: u64,
    /// Per API key (by name): the class and strategy of its requests without headers.
    pub key_defaults: HashMap<String, KeyDefaults>,
    pub ledger: LedgerSection,
    pub state: StateSection,
    /// HTTPS on the listener (`cert_file`, `key_file`); unset = plain HTTP.
    pub tls: TlsSection,
    /// The cloud provider the savings report prices all traffic on ("what it would have
    /// cost without Flotilla"); unset = the first configured provider.
    pub default_provider: Option<String>,
    /// A `tokenizer.json` for our own token counts (answers without usage, and the check
    /// of those with it); unset = about four bytes a token.
    pub usage_tokenizer: Option<PathBuf>,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelSection>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            body_timeout_ms: 30_000,
            header_timeout_ms: 30_000,
            max_header_bytes: 64 * 1024,
            default_max_queue_depth: 16,
            heartbeat_ms: 1_000,
            missed_heartbeats: 3,
            node_ttl_ms: None,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 60_000,
            request_timeout_ms: 600_000,
            first_token_timeout_ms: 60_000,
            stream_idle_timeout_ms: 20_000,
            cluster_token_env: None,
            admin_token_env: None,
            default_strategy: Strategy::Cost,
            gpu_hour_usd: 2.0,
            gpu_marginal_usd_per_hour: 0.0,
            sla_attainment: 0.99,
            split_by: SplitBy::Request,
            default_priority: Priority::Interactive,
            interactive: ClassSection {
                ttft_ms: 10_000,
                deadline_ms: 0,
            },
            batch: ClassSection::default(),
            batch_age_boost_ms: 30_000,
            max_queued: 1024,
            max_queue_wait_ms: 600_000,
            affinity_max_imbalance: 2,
            local_balance: LocalBalance::Pack,
            max_attempts: 3,
            retry_backoff_ms: 25,
            retry_budget_ms: 30_000,
            mid_stream: MidStream::Error,
            default_max_tokens: 256,
            prior_ttft_ms: 500,
            prior_latency_ms: 5_000,
            prior_tokens_per_s: 30.0,
            health: HealthSection::default(),
            auth: None,
            key_refresh_ms: 5_000,
            key_defaults: HashMap::new(),
            ledger: LedgerSection::default(),
            state: StateSection::default(),
            tls: TlsSection::default(),
            default_provider: None,
            usage_tokenizer: None,
            providers: Vec::new(),
            models: Vec::new(),
        }
    }
}

/// What keeps a client on one side of a weighted split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SplitBy {
    /// Each request is drawn anew.
    #[default]
    Request,
    /// The API key: one key always sees the same side.
    Key,
    /// The request body's `user` (the OpenAI field), else the API key.
    User,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSection {
    /// The public model name clients ask for.
    pub name: String,
    /// The name agents serve it under; defaults to `name`.
    #[serde(default)]
    pub local_model: Option<String>,
    #[serde(default)]
    pub max_queue_depth: Option<u64>,
    /// Cloud equivalents, tried in this order.
    #[serde(default)]
    pub cloud: Vec<CloudTarget>,
    /// Overrides `scheduler.default_strategy`.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Local agents' share under `weighted` (default 1).
    #[serde(default)]
    pub local_weight: Option<u32>,
    /// What the local deployment supports: tools, vision, json_schema.
    #[serde(default)]
    pub local_capabilities: Vec<Capability>,
    /// Overrides `scheduler.gpu_hour_usd`.
    #[serde(default)]
    pub gpu_hour_usd: Option<f64>,
    /// Overrides `scheduler.gpu_marginal_usd_per_hour`.
    #[serde(default)]
    pub gpu_marginal_usd_per_hour: Option<f64>,
    /// First matching rule chooses the target set.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Overrides `scheduler.mid_stream`.
    #[serde(default)]
    pub mid_stream: Option<MidStream>,
}

impl ModelSection {
    pub fn new(name: &str, cloud: Vec<CloudTarget>) -> Self {
        ModelSection {
            name: name.to_owned(),
            local_model: None,
            max_queue_depth: None,
            cloud,
            strategy: None,
            local_weight: None,
            local_capabilities: Vec::new(),
            gpu_hour_usd: None,
            gpu_marginal_usd_per_hour: None,
            rules: Vec::new(),
            mid_stream: None,
        }
    }
}

/// What the scheduler runs with.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub default_max_queue_depth: u64,
    pub heartbeat: Duration,
    pub missed_heartbeats: u32,
    pub timeouts: Timeouts,
    /// The token agents must present on heartbeats; None = no check.
    pub cluster_token: Option<Secret>,
    /// The token the admin API requires; None = no check.
    pub admin_token: Option<Secret>,
    pub providers: Vec<ProviderConfig>,
    pub groups: HashMap<String, ModelGroup>,
    pub default_strategy: Strategy,
    pub gpu_hour_usd: f64,
    pub gpu_marginal_usd_per_hour: f64,
    pub split_by: SplitBy,
    pub default_priority: Priority,
    pub interactive: ClassDefaults,
    pub batch: ClassDefaults,
    pub policy: PolicySettings,
    pub health: HealthConfig,
    pub max_queue_wait: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_budget: Duration,
    pub mid_stream: MidStream,
    pub default_max_tokens: u64,
    pub auth: AuthMode,
    pub key_refresh: Duration,
    pub key_defaults: HashMap<String, KeyDefaults>,
    pub ledger: LedgerSection,
    /// The listener's TLS settings; None = plain HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Redis shared with other replicas; None = state in memory only.
    pub shared: Option<SharedConfig>,
    /// How often in-flight counts and health figures are exchanged with other replicas.
    pub sync: Duration,
    /// The savings report's baseline provider.
    pub default_provider: Option<String>,
    pub counter: Arc<TokenCounter>,
}

impl SchedulerConfig {
    /// A provider's config by name.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// What a request for `model` would cost on the baseline provider, per token: its
    /// cloud entry for that provider, or the provider's own price table.
    pub fn baseline_price(&self, model: &str) -> Option<Price> {
        let name = self.default_provider.as_deref()?;
        if let Some(c) = self
            .groups
            .get(model)
            .and_then(|g| g.cloud.iter().find(|c| c.provider == name))
        {
            return Some(c.price());
        }
        let p = self.provider(name)?;
        let id = p.models.get(model).map_or(model, String::as_str);
        p.prices.get(id).copied()
    }

    /// The group for a model agents serve but the config does not name.
    pub fn implicit_group(&self, name: &str) -> ModelGroup {
        ModelGroup {
            strategy: self.default_strategy,
            gpu_hour_usd: self.gpu_hour_usd,
            gpu_marginal_usd_per_hour: self.gpu_marginal_usd_per_hour,
            mid_stream: self.mid_stream,
            ..ModelGroup::implicit(name, self.default_max_queue_depth)
        }
    }

    pub fn class(&self, p: Priority) -> ClassDefaults {
        match p {
            Priority::Interactive => self.interactive,
            Priority::Batch => self.batch,
        }
    }
}

impl SchedulerSection {
    /// Resolves the section, or returns every problem found (each prefixed with its key).
    pub fn validate(&self) -> Result<SchedulerConfig, Vec<String>> {
        let mut errors = Vec::new();
        let admin_token = match &self.admin_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("scheduler.admin_token_env: {e}")))
                .ok(),
        };
        let cluster_token = match &self.cluster_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("scheduler.cluster_token_env: {e}")))
                .ok(),
        };
        for (key, v) in [
            ("scheduler.body_timeout_ms", self.body_timeout_ms),
            ("scheduler.header_timeout_ms", self.header_timeout_ms),
            ("scheduler.heartbeat_ms", self.heartbeat_ms),
            ("scheduler.connect_timeout_ms", self.connect_timeout_ms),
            (
                "scheduler.first_byte_timeout_ms",
                self.first_byte_timeout_ms,
            ),
            ("scheduler.request_timeout_ms", self.request_timeout_ms),
            (
                "scheduler.first_token_timeout_ms",
                self.first_token_timeout_ms,
            ),
            (
                "scheduler.stream_idle_timeout_ms",
                self.stream_idle_timeout_ms,
            ),
            ("scheduler.max_queue_wait_ms", self.max_queue_wait_ms),
            ("scheduler.retry_budget_ms", self.retry_budget_ms),
            ("scheduler.health.window_ms", self.health.window_ms),
            ("scheduler.health.open_ms", self.health.open_ms),
            ("scheduler.max_queued", self.max_queued),
            ("scheduler.default_max_tokens", self.default_max_tokens),
            ("scheduler.key_refresh_ms", self.key_refresh_ms),
            ("scheduler.ledger.flush_ms", self.ledger.flush_ms),
            ("scheduler.ledger.batch", self.ledger.batch as u64),
            ("scheduler.state.sync_ms", self.state.sync_ms),
            ("scheduler.state.timeout_ms", self.state.timeout_ms),
            ("scheduler.state.warn_every_ms", self.state.warn_every_ms),
        ] {
            if v == 0 {
                errors.push(format!("{key}: must be greater than 0"));
            }
        }
        if self.max_body_bytes < 1024 {
            errors.push("scheduler.max_body_bytes: must be at least 1024".into());
        }
        if self.max_header_bytes < 8192 {
            errors.push("scheduler.max_header_bytes: must be at least 8192".into());
        }
        if self.max_attempts == 0 {
            errors.push("scheduler.max_attempts: must be at least 1".into());
        }
        if !(self.health.ewma_alpha > 0.0 && self.health.ewma_alpha <= 1.0) {
            errors.push("scheduler.health.ewma_alpha: must be in (0, 1]".into());
        }
        if !(self.health.error_rate > 0.0 && self.health.error_rate <= 1.0) {
            errors.push("scheduler.health.error_rate: must be in (0, 1]".into());
        }
        if !(self.prior_tokens_per_s > 0.0 && self.prior_tokens_per_s.is_finite()) {
            errors.push("scheduler.prior_tokens_per_s: must be greater than 0".into());
        }
        if !(self.gpu_hour_usd >= 0.0 && self.gpu_hour_usd.is_finite()) {
            errors.push("scheduler.gpu_hour_usd: must be a non-negative number".into());
        }
        if !(self.gpu_marginal_usd_per_hour >= 0.0 && self.gpu_marginal_usd_per_hour.is_finite()) {
            errors
                .push("scheduler.gpu_marginal_usd_per_hour: must be a non-negative number".into());
        }
        if !(self.sla_attainment > 0.0 && self.sla_attainment < 1.0) {
            errors.push("scheduler.sla_attainment: must be between 0 and 1 (exclusive)".into());
        }
        if self.missed_heartbeats == 0 {
            errors.push("scheduler.missed_heartbeats: must be at least 1".into());
        }
        if self.heartbeat_ms > 3_600_000 {
            errors.push("scheduler.heartbeat_ms: must be at most 3600000 (an hour)".into());
        }
        let shared = self
            .state
            .resolve()
            .map_err(|e| errors.push(e))
            .ok()
            .flatten();
        let tls = self.tls.load().map_err(|e| errors.push(e)).ok().flatten();
        let missed_heartbeats = match self.node_ttl_ms {
            Some(ttl) if ttl <= self.heartbeat_ms => {
                errors.push(format!(
                    "scheduler.node_ttl_ms: {ttl} must be greater than scheduler.heartbeat_ms ({}); \
                     prefer scheduler.missed_heartbeats",
                    self.heartbeat_ms
                ));
                self.missed_heartbeats
            }
            Some(ttl) => {
                let missed = ttl.div_ceil(self.heartbeat_ms.max(1)).min(u32::MAX as u64) as u32;
                tracing::warn!(
                    node_ttl_ms = ttl,
                    missed_heartbeats = missed,
                    "scheduler.node_ttl_ms is deprecated; use scheduler.missed_heartbeats"
                );
                missed
            }
            None => self.missed_heartbeats,
        };
        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.name.is_empty() {
                errors.push(format!("scheduler.providers[{i}].name: must not be empty"));
            } else if !names.insert(p.name.as_str()) {
                errors.push(format!(
                    "scheduler.providers[{i}].name: `{}` is defined twice",
                    p.name
                ));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                errors.push(format!(
                    "scheduler.providers[{i}].base_url: `{}` must start with http:// or https://",
                    p.base_url
                ));
            }
            for (id, price) in &p.prices {
                for what in price.invalid() {
                    errors.push(format!(
                        "scheduler.providers[{i}].prices.{id}.{what}: must be a non-negative number"
                    ));
                }
            }
            for (key, v) in [
                ("connect_timeout_ms", p.connect_timeout_ms),
                ("first_byte_timeout_ms", p.first_byte_timeout_ms),
                ("request_timeout_ms", p.request_timeout_ms),
                ("first_token_timeout_ms", p.first_token_timeout_ms),
                ("stream_idle_timeout_ms", p.stream_idle_timeout_ms),
                ("default_max_tokens", p.default_max_tokens),
            ] {
                if v == Some(0) {
                    errors.push(format!(
                        "scheduler.providers[{i}].{key}: must be greater than 0"
                    ));
                }
            }
            if p.rpm == Some(0) || p.tpm == Some(0) {
                errors.push(format!(
                    "scheduler.providers[{i}]: rpm and tpm must be greater than 0 when set"
                ));
            }
        }
        let default_provider = match &self.default_provider {
            Some(name) if !names.contains(name.as_str()) => {
                errors.push(format!(
                    "scheduler.default_provider: `{name}` is not a configured provider"
                ));
                None
            }
            Some(name) => Some(name.clone()),
            None => self.providers.first().map(|p| p.name.clone()),
        };
        let ledger = LedgerSection {
            url: self.ledger.resolved_url().unwrap_or_else(|e| {
                errors.push(e);
                None
            }),
            url_env: None,
            ..self.ledger.clone()
        };
        let counter = match &self.usage_tokenizer {
            None => Arc::new(TokenCounter::Estimate),
            Some(path) => match TokenCounter::from_file(path) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    errors.push(format!("scheduler.usage_tokenizer: {e}"));
                    Arc::new(TokenCounter::Estimate)
                }
            },
        };
        let mut groups = HashMap::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() {
                errors.push(format!("scheduler.models[{i}].name: must not be empty"));
                continue;
            }
            check_model(i, m, &names, &mut errors);
            let cloud = m
                .cloud
                .iter()
                .map(|c| resolve_cloud(&m.name, c, &self.providers))
                .collect();
            let group = ModelGroup {
                name: m.name.clone(),
                local_model: m.local_model.clone().unwrap_or_else(|| m.name.clone()),
                max_queue_depth: m.max_queue_depth.unwrap_or(self.default_max_queue_depth),
                cloud,
                strategy: m.strategy.unwrap_or(self.default_strategy),
                local_weight: m.local_weight.unwrap_or(1),
                local_capabilities: m.local_capabilities.clone(),
                gpu_hour_usd: m.gpu_hour_usd.unwrap_or(self.gpu_hour_usd),
                gpu_marginal_usd_per_hour: m
                    .gpu_marginal_usd_per_hour
                    .unwrap_or(self.gpu_marginal_usd_per_hour),
                rules: m.rules.clone(),
                mid_stream: m.mid_stream.unwrap_or(self.mid_stream),
            };
            if groups.insert(m.name.clone(), group).is_some() {
                errors.push(format!(
                    "scheduler.models[{i}].name: `{}` is defined twice",
                    m.name
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(SchedulerConfig {
            max_body_bytes: self.max_body_bytes,
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            max_header_bytes: self.max_header_bytes,
            default_max_queue_depth: self.default_max_queue_depth,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            missed_heartbeats,
            timeouts: Timeouts {
                connect: Duration::from_millis(self.connect_timeout_ms),
                first_byte: Duration::from_millis(self.first_byte_timeout_ms),
                total: Duration::from_millis(self.request_timeout_ms),
                first_token: Duration::from_millis(self.first_token_timeout_ms),
                stream_idle: Duration::from_millis(self.stream_idle_timeout_ms),
            },
            cluster_token,
            admin_token,
            providers: self.providers.clone(),
            groups,
            default_strategy: self.default_strategy,
            gpu_hour_usd: self.gpu_hour_usd,
            gpu_marginal_usd_per_hour: self.gpu_marginal_usd_per_hour,
            split_by: self.split_by,
            default_priority: self.default_priority,
            interactive: self.interactive.resolve(),
            batch: self.batch.resolve(),
            policy: PolicySettings {
                age_boost: Duration::from_millis(self.batch_age_boost_ms),
                max_queued: self.max_queued,
                affinity_max_imbalance: self.affinity_max_imbalance,
                pack: self.local_balance == LocalBalance::Pack,
                prior_ttft: Duration::from_millis(self.prior_ttft_ms),
                prior_latency: Duration::from_millis(self.prior_latency_ms),
                prior_tokens_per_s: self.prior_tokens_per_s,
                sla_attainment: self.sla_attainment,
            },
            health: HealthConfig {
                ewma_alpha: self.health.ewma_alpha,
                window: Duration::from_millis(self.health.window_ms),
                min_requests: self.health.min_requests,
                error_rate: self.health.error_rate,
                open_for: Duration::from_millis(self.health.open_ms),
                default_retry_after: Duration::from_millis(self.health.default_retry_after_ms),
                probe_idle: (self.health.probe_idle_ms > 0)
                    .then(|| Duration::from_millis(self.health.probe_idle_ms)),
                forget_after: (self.health.forget_ms > 0)
                    .then(|| Duration::from_millis(self.health.forget_ms)),
            },
            max_queue_wait: Duration::from_millis(self.max_queue_wait_ms),
            max_attempts: self.max_attempts,
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
            retry_budget: Duration::from_millis(self.retry_budget_ms),
            mid_stream: self.mid_stream,
            default_max_tokens: self.default_max_tokens,
            auth: self.auth.unwrap_or_default(),
            key_refresh: Duration::from_millis(self.key_refresh_ms),
            key_defaults: self.key_defaults.clone(),
            ledger,
            tls,
            shared,
            sync: Duration::from_millis(self.state.sync_ms.max(1)),
            default_provider,
            counter,
        })
    }
}

impl StateSection {
    /// The shared store's settings, None without a URL.
    fn resolve(&self) -> Result<Option<SharedConfig>, String> {
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

/// A cloud entry completed from its provider: the model id from the provider's model map
/// (or the public name), prices from its price table, capabilities from its list.
fn resolve_cloud(name: &str, c: &CloudTarget, providers: &[ProviderConfig]) -> CloudTarget {
    let Some(p) = providers.iter().find(|p| p.name == c.provider) else {
        return c.clone();
    };
    let mut c = c.clone();
    if c.model.is_empty() {
        c.model = p
            .models
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_owned());
    }
    if let Some(price) = p.prices.get(&c.model) {
        c.set_price(c.price().or(price));
    }
    if c.capabilities.is_none() {
        c.capabilities = p.capabilities.clone();
    }
    c
}

/// Checks one model entry's cloud targets and rules against the configured providers.
fn check_model(i: usize, m: &ModelSection, providers: &HashSet<&str>, errors: &mut Vec<String>) {
    let key = format!("scheduler.models[{i}]");
    let mut labels: HashSet<String> = HashSet::from(["local".to_owned()]);
    for (j, c) in m.cloud.iter().enumerate() {
        if !providers.contains(c.provider.as_str()) {
            errors.push(format!(
                "{key}.cloud[{j}].provider: `{}` is not a configured provider",
                c.provider
            ));
        }
        for what in c.price().invalid() {
            errors.push(format!(
                "{key}.cloud[{j}].{what}: must be a non-negative number"
            ));
        }
        labels.insert(c.label());
    }
    if m.gpu_hour_usd.is_some_and(|p| !(p >= 0.0 && p.is_finite())) {
        errors.push(format!("{key}.gpu_hour_usd: must be a non-negative number"));
    }
    if m.gpu_marginal_usd_per_hour
        .is_some_and(|p| !(p >= 0.0 && p.is_finite()))
    {
        errors.push(format!(
            "{key}.gpu_marginal_usd_per_hour: must be a non-negative number"
        ));
    }
    if m.strategy == Some(Strategy::Weighted)
        && m.local_weight.unwrap_or(1) == 0
        && m.cloud.iter().all(|c| c.weight == 0)
    {
        errors.push(format!(
            "{key}.strategy: `weighted` needs a non-zero weight somewhere"
        ));
    }
    for (j, r) in m.rules.iter().enumerate() {
        if r.targets.is_empty() {
            errors.push(format!(
                "{key}.rules[{j}].targets: must name at least one target"
            ));
        }
        for t in &r.targets {
            if !labels.contains(t) {
                let mut known: Vec<&String> = labels.iter().collect();
                known.sort();
                errors.push(format!(
                    "{key}.rules[{j}].targets: `{t}` is not one of this model's targets ({})",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_error_together() {
        let s = SchedulerSection {
            missed_heartbeats: 0,
            providers: vec![ProviderConfig::new("a", "ftp://x")],
            models: vec![ModelSection {
                rules: vec![Rule {
                    targets: vec!["cloud:elsewhere".into()],
                    ..Rule::default()
                }],
                ..ModelSection::new("m", vec![CloudTarget::new("nope", "x")])
            }],
            ..SchedulerSection::default()
        };
        let errs = s.validate().unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("`cloud:elsewhere`")));
        assert!(errs.iter().any(|e| e.contains("missed_heartbeats")));
        assert!(errs.iter().any(|e| e.contains("base_url")));
        assert!(errs.iter().any(|e| e.contains("`nope`")));
    }

    #[test]
    fn the_ledger_url_can_come_from_the_environment_and_is_never_echoed() {
        let with = |url: Option<&str>, url_env: Option<&str>| SchedulerSection {
            ledger: LedgerSection {
                url: url.map(str::to_owned),
                url_env: url_env.map(str::to_owned),
                ..LedgerSection::default()
            },
            ..SchedulerSection::default()
        };
        // PATH is set wherever tests run; it is no database URL, and must not be printed.
        let e = with(None, Some("PATH")).validate().unwrap_err();
        assert!(e[0].contains("must start with sqlite:"), "{e:?}");
        assert!(!e[0].contains("/bin"), "{e:?}");
        let e = with(None, Some("FLOTILLA_TEST_UNSET_LEDGER_URL"))
            .validate()
            .unwrap_err();
        assert!(e[0].contains("FLOTILLA_TEST_UNSET_LEDGER_URL"), "{e:?}");
        let e = with(Some("sqlite::memory:"), Some("PATH"))
            .validate()
            .unwrap_err();
        assert!(e[0].contains("not both"), "{e:?}");
        let c = with(Some("sqlite::memory:"), None).validate().unwrap();
        assert_eq!(c.ledger.url.as_deref(), Some("sqlite::memory:"));
    }

    #[test]
    fn node_ttl_ms_still_reads_as_missed_heartbeats() {
        let c = SchedulerSection {
            heartbeat_ms: 1000,
            node_ttl_ms: Some(2500),
            ..SchedulerSection::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.missed_heartbeats, 3);
        let e = SchedulerSection {
            node_ttl_ms: Some(500),
            ..SchedulerSection::default()
        }
        .validate()
        .unwrap_err();
        assert!(e[0].contains("node_ttl_ms"), "{e:?}");
    }

    #[test]
    fn redis_settings_are_checked_without_echoing_the_url() {
        let with = |state: StateSection| {
            SchedulerSection {
                state,
                ..SchedulerSection::default()
            }
            .validate()
        };
        let c = with(StateSection {
            redis_url: Some("redis://:pw@127.0.0.1:6379/2".into()),
            sync_ms: 100,
            ..StateSection::default()
        })
        .unwrap();
        let sh = c.shared.expect("shared state");
        assert_eq!(sh.prefix, "flotilla");
        assert_eq!(c.sync, Duration::from_millis(100));
        let errs = with(StateSection {
            redis_url: Some("http://:secret-pw@host".into()),
            ..StateSection::default()
        })
        .unwrap_err();
        assert!(errs[0].starts_with("scheduler.state.redis_url"), "{errs:?}");
        assert!(!errs[0].contains("secret-pw"));
        let errs = with(StateSection {
            redis_url_env: Some("FLOTILLA_TEST_UNSET_REDIS_URL".into()),
            sync_ms: 0,
            ..StateSection::default()
        })
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("FLOTILLA_TEST_UNSET_REDIS_URL"))
        );
        assert!(
            SchedulerSection::default()
                .validate()
                .unwrap()
                .shared
                .is_none()
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = SchedulerSection::default().validate().unwrap();
        assert!(c.groups.is_empty());
    }
}
