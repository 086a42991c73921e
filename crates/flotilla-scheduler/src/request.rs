//! What the policy knows about one request: its class, deadlines, routing preference and the
//! features rules and model-aware filtering look at.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Priority class: interactive work is dispatched first; batch work waits behind it but
/// never forever (see [`crate::queue::pick_next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Priority::Interactive),
            "batch" => Some(Priority::Batch),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }
}

/// How the targets that may serve a request are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Cheapest target that meets the SLA (local GPU time priced by $/GPU-hour and
    /// measured throughput); targets that miss it follow, fastest first.
    #[default]
    Cost,
    /// Lowest predicted TTFT.
    Latency,
    /// The configured order: local agents, then the cloud targets as listed.
    Failover,
    /// One target drawn by weight (A/B tests, canaries); the rest in failover order.
    Weighted,
    /// Only local agents.
    LocalOnly,
    /// Only cloud targets.
    CloudOnly,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Strategy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cost" => Some(Strategy::Cost),
            "latency" => Some(Strategy::Latency),
            "failover" => Some(Strategy::Failover),
            "weighted" => Some(Strategy::Weighted),
            "local-only" | "local_only" => Some(Strategy::LocalOnly),
            "cloud-only" | "cloud_only" => Some(Strategy::CloudOnly),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Cost => "cost",
            Strategy::Latency => "latency",
            Strategy::Failover => "failover",
            Strategy::Weighted => "weighted",
            Strategy::LocalOnly => "local-only",
            Strategy::CloudOnly => "cloud-only",
        }
    }
}

pub use flotilla_api::Capability;

/// The request as the policy sees it. Token counts are estimates made before any tokenizer
/// ran (the scheduler has none): about four characters a token.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestInfo {
    pub priority: Priority,
    /// The first token must arrive within this (from arrival).
    pub ttft_deadline: Option<Duration>,
    /// The whole answer must arrive within this (from arrival).
    pub deadline: Option<Duration>,
    /// `x-flotilla-route`: overrides the group's strategy.
    pub strategy: Option<Strategy>,
    /// `x-flotilla-tag`, for rules.
    pub tag: Option<String>,
    pub prompt_tokens: u64,
    /// `max_tokens` or the group's default completion estimate.
    pub max_tokens: u64,
    /// `max_completion_tokens` / `max_tokens` as the client set it: the context must hold
    /// the prompt and this many (unset: the prompt and at least one more).
    pub requested_max_tokens: Option<u64>,
    pub needs: Vec<Capability>,
    /// Hash of the prompt's leading part (system prompt), for affinity.
    pub prefix: Option<u64>,
    /// A stable per-request number for weighted splits.
    pub split_key: u64,
    /// How long it has already waited in the scheduler's queue.
    pub waited: Duration,
}
