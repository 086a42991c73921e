//! The agent <-> scheduler protocol. Agents push a [`NodeReport`] every `heartbeat_ms` to
//! [`HEARTBEAT_PATH`]; the first report registers the node. A scheduler stops routing to a
//! node that misses `missed_heartbeats` reports in a row or reports `draining`, and forgets
//! it at once when the agent says goodbye on [`DEREGISTER_PATH`] after draining.
//!
//! Inference itself goes over the agent's OpenAI-compatible HTTP API, so an agent is just
//! another OpenAI-compatible target to the scheduler.

use serde::{Deserialize, Serialize};

pub const HEARTBEAT_PATH: &str = "/internal/v1/heartbeat";
/// `DELETE` with the node id as the last segment.
pub const DEREGISTER_PATH: &str = "/internal/v1/nodes";
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// Whether a model takes new work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    #[default]
    Ready,
    /// Finishing what it runs; takes nothing new.
    Draining,
}

/// One model an agent serves and its load right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeModel {
    pub name: String,
    pub kind: ModelKind,
    #[serde(default)]
    pub state: ModelState,
    /// Where it runs: `cpu` or `cuda:N`.
    #[serde(default)]
    pub device: String,
    pub context_length: u64,
    /// Sequences decoding now.
    pub running: u64,
    /// Sequences accepted but not yet running.
    pub waiting: u64,
    /// How many sequences may run at once.
    pub max_running: u64,
    /// Paged KV cache blocks free (or holding a reusable cached prefix), and in all.
    #[serde(default)]
    pub kv_blocks_free: u64,
    #[serde(default)]
    pub kv_blocks_total: u64,
    /// Generated tokens per second over the last few seconds, measured by the engine.
    #[serde(default)]
    pub tokens_per_second: f64,
}

impl NodeModel {
    /// A ready, idle model with no KV cache figures (scripted nodes in tests use this).
    pub fn idle(name: &str, kind: ModelKind, context_length: u64, max_running: u64) -> Self {
        NodeModel {
            name: name.into(),
            kind,
            state: ModelState::Ready,
            device: "cpu".into(),
            context_length,
            running: 0,
            waiting: 0,
            max_running,
            kv_blocks_free: 0,
            kv_blocks_total: 0,
            tokens_per_second: 0.0,
        }
    }

    /// Batch slots that can take a sequence now without it waiting.
    pub fn free_slots(&self) -> u64 {
        self.max_running
            .saturating_sub(self.running.saturating_add(self.waiting))
    }
}

/// One GPU as the agent's probe last read it. Readings a GPU does not support (a
/// consumer card without power limits, say) are absent rather than zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStats {
    pub index: u32,
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H200`.
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of the last sample period a kernel ran.
    pub gpu_utilization_pct: Option<u32>,
    /// Percent of the last sample period device memory was read or written.
    pub memory_utilization_pct: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_draw_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
}

/// A process holding memory on a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// Its command name, when this host can see the process.
    pub name: Option<String>,
    pub used_memory_bytes: Option<u64>,
}

/// The host's CPU and memory: what CPU-only agents have instead of VRAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStats {
    pub cpus: u32,
    /// Busy fraction of all CPUs since the previous reading, 0..=1.
    pub cpu_utilization: Option<f64>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub protocol: u32,
    pub node_id: String,
    /// Where the scheduler reaches the agent's OpenAI API, e.g. `http://10.0.0.5:9000`.
    pub base_url: String,
    pub models: Vec<NodeModel>,
    /// Milliseconds since the epoch on the agent, for staleness diagnostics.
    pub sent_at_ms: u64,
    /// The agent is finishing its work before it leaves: route nothing new to it.
    #[serde(default)]
    pub draining: bool,
    /// Live telemetry of every GPU on the host (empty on CPU hosts).
    #[serde(default)]
    pub gpus: Vec<GpuStats>,
    #[serde(default)]
    pub host: Option<HostStats>,
    /// How often this agent heartbeats, so the scheduler can count missed beats.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// `flotilla` version of the agent.
    #[serde(default)]
    pub version: String,
}

impl NodeReport {
    /// A report with no telemetry, as a minimal agent would send.
    pub fn new(node_id: &str, base_url: &str, models: Vec<NodeModel>) -> Self {
        NodeReport {
            protocol: PROTOCOL_VERSION,
            node_id: node_id.into(),
            base_url: base_url.into(),
            models,
            sent_at_ms: 0,
            draining: false,
            gpus: Vec::new(),
            host: None,
            heartbeat_ms: 0,
            version: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// How often the scheduler wants reports; agents adopt it.
    pub heartbeat_ms: u64,
}

/// One target's measured figures as one scheduler replica has them; replicas sharing state
/// exchange these so a replica that has not used a target yet routes on what the others
/// measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct TargetFigures {
    pub ttft_s: Option<f64>,
    pub ttft_dev_s: Option<f64>,
    pub latency_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Successful requests behind the figures.
    pub samples: u64,
}

impl TargetFigures {
    /// The figures of several replicas as one: each field averaged over those that have
    /// it, weighted by their samples capped at `cap` (an EWMA remembers about 1/alpha
    /// samples, so more do not make a figure more current). None when `all` is empty.
    pub fn merge(all: &[TargetFigures], cap: u64) -> Option<TargetFigures> {
        if all.is_empty() {
            return None;
        }
        let field = |get: fn(&TargetFigures) -> Option<f64>| {
            let (mut sum, mut weight) = (0.0, 0.0);
            for f in all {
                if let Some(v) = get(f).filter(|v| v.is_finite()) {
                    let w = f.samples.clamp(1, cap.max(1)) as f64;
                    sum += v * w;
                    weight += w;
                }
            }
            (weight > 0.0).then(|| sum / weight)
        };
        Some(TargetFigures {
            ttft_s: field(|f| f.ttft_s),
            ttft_dev_s: field(|f| f.ttft_dev_s),
            latency_s: field(|f| f.latency_s),
            tokens_per_s: field(|f| f.tokens_per_s),
            samples: all.iter().map(|f| f.samples).sum(),
        })
    }
}
