//! The `[scheduler]` config section: raw as written in TOML, and resolved after
//! validation, which reports every problem at once.

use std::collections::HashMap;
use std::time::Duration;

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_providers::{Price, ProviderConfig, Secret, Timeouts, TokenCounter};
use flotilla_scheduler::{HealthConfig, MidStream, ModelGroup, PolicySettings, Priority, Strategy};
use flotilla_state::SharedConfig;

pub use crate::tls::TlsSection;

mod models;
mod sections;

pub use models::ModelSection;
use models::check_providers;
pub use sections::{
    AuthMode, ClassDefaults, ClassSection, HealthSection, KeyDefaults, LedgerSection, LocalBalance,
    StateSection,
};
use serde::{Deserialize, Serialize};

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
    /// Environment variable holding a token `/metrics` requires; unset = `/metrics` is open.
    pub metrics_token_env: Option<String>,
    /// Listening beyond loopback without a cluster token, or with `auth = "none"`, is
    /// refused at start unless this is set; then it is warned about at start and every
    /// 10 minutes.
    pub allow_insecure: bool,
    /// Heartbeats are taken only from these networks (CIDRs such as `10.0.0.0/8`; a bare
    /// address is one host); empty = from anywhere the cluster token is presented.
    pub agent_networks: Vec<String>,
    /// Largest whole answer read from an agent or provider; past it the attempt fails over.
    pub max_response_bytes: usize,
    /// How a key with a budget pays on a target without a price: `refuse` (it may not use
    /// such targets) or `max_price` (charged at the dearest price of the model's targets).
    pub unpriced: Unpriced,
    /// Failed authentications (API key or admin token) one client address may make in a
    /// minute; past it the address gets 429 until the minute has passed.
    pub auth_failures_per_minute: u32,
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
            metrics_token_env: None,
            allow_insecure: false,
            agent_networks: Vec::new(),
            max_response_bytes: 16 * 1024 * 1024,
            unpriced: Unpriced::Refuse,
            auth_failures_per_minute: 30,
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

/// How a key with a budget pays on a target that has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unpriced {
    /// Such targets are not used for the key's requests; a request left with none gets 400.
    #[default]
    Refuse,
    /// Charged at the dearest per-token price among the model's priced targets.
    MaxPrice,
}

/// `agent_networks` as networks; a bare address is a network of one.
fn parse_networks(list: &[String], errors: &mut Vec<String>) -> Vec<ipnet::IpNet> {
    list.iter()
        .filter_map(|s| {
            let s = s.trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    errors.push(format!(
                        "scheduler.agent_networks: `{s}` is not a network (e.g. 10.0.0.0/8) or an address"
                    ))
                })
                .ok()
        })
        .collect()
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
    /// The token `/metrics` requires; None = open.
    pub metrics_token: Option<Secret>,
    pub allow_insecure: bool,
    /// Where heartbeats may come from; empty = anywhere.
    pub agent_networks: Vec<ipnet::IpNet>,
    pub max_response_bytes: usize,
    pub unpriced: Unpriced,
    pub auth_failures_per_minute: u32,
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
        p.prices.get(id).map(|pr| p.kind.complete_price(*pr))
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
    /// The numbers that must be positive, in range or finite.
    fn check_limits(&self, errors: &mut Vec<String>) {
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
        if self.max_response_bytes < 1024 {
            errors.push("scheduler.max_response_bytes: must be at least 1024".into());
        }
        if self.auth_failures_per_minute == 0 {
            errors.push("scheduler.auth_failures_per_minute: must be at least 1".into());
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
    }

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
        let metrics_token = match &self.metrics_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("scheduler.metrics_token_env: {e}")))
                .ok(),
        };
        let agent_networks = parse_networks(&self.agent_networks, &mut errors);
        self.check_limits(&mut errors);
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
        let names = check_providers(&self.providers, &mut errors);
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
        let groups = self.groups(&names, &mut errors);
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
            metrics_token,
            allow_insecure: self.allow_insecure,
            agent_networks,
            max_response_bytes: self.max_response_bytes,
            unpriced: self.unpriced,
            auth_failures_per_minute: self.auth_failures_per_minute,
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_scheduler::{CloudTarget, Rule};

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
