//! The routing simulator: replays a JSONL request trace in virtual time against simulated
//! agents (a slots + prefill/decode throughput model, a prefix cache, outages) and simulated
//! cloud targets (lognormal TTFT, tokens/s, prices, failure windows, 429 windows), routing
//! each request through the same [`crate::decide`], [`crate::pick_next`] and
//! [`crate::TargetHealth`] code the gateway runs, next to four baselines. Deterministic: the
//! same trace, config and seed give the same figures.
//!
//! Nothing here reads the clock or touches the network: virtual time is an offset from one
//! base `Instant`, and every random draw comes from [`rng::SplitMix64`].

mod agents;
mod clouds;
pub mod config;
mod engine;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod trace;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use flotilla_api::ErrorKind;

pub use config::{SimAgent, SimCloud, SimConfig};
pub use engine::{SimPolicy, simulate, simulate_all};
pub use report::{PolicyReport, cost_ratios, markdown_table};
pub use scenario::scenario_config;
pub use trace::{GenerateOptions, Trace, TraceRecord, generate};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A trace line that is not a valid request (1-based line number).
    #[error("trace line {line}: {message}")]
    TraceLine { line: usize, message: String },
    #[error("the trace has no requests")]
    EmptyTrace,
    /// Every problem found in the config, at once.
    #[error("invalid simulator config: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error(
        "unknown policy `{0}` (flotilla, cloud-only, local-only, round-robin, ordered-fallback)"
    )]
    UnknownPolicy(String),
    #[error("cannot generate a trace: {0}")]
    Generate(String),
}

impl SimError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SimError::Io { .. } => ErrorKind::Internal,
            _ => ErrorKind::InvalidRequest,
        }
    }
    pub fn is_retryable(&self) -> bool {
        matches!(self, SimError::Io { .. })
    }
}
