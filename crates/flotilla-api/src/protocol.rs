//! The agent <-> scheduler protocol. Agents push a [`NodeReport`] every `heartbeat_ms` to
//! [`HEARTBEAT_PATH`]; the first report registers the node. A scheduler forgets a node
//! whose last report is older than its `node_ttl_ms`, and at once when the agent says
//! goodbye on [`DEREGISTER_PATH`] during a graceful shutdown.
//!
//! Inference itself goes over the agent's OpenAI-compatible HTTP API, so an agent is just
//! another OpenAI-compatible target to the scheduler.

use serde::{Deserialize, Serialize};

pub const HEARTBEAT_PATH: &str = "/internal/v1/heartbeat";
/// `DELETE` with the node id as the last segment.
pub const DEREGISTER_PATH: &str = "/internal/v1/nodes";
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// One model an agent serves and its load right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeModel {
    pub name: String,
    pub kind: ModelKind,
    pub context_length: u64,
    /// Sequences decoding now.
    pub running: u64,
    /// Sequences accepted but not yet running.
    pub waiting: u64,
    /// How many sequences may run at once.
    pub max_running: u64,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// How often the scheduler wants reports; agents adopt it.
    pub heartbeat_ms: u64,
}
