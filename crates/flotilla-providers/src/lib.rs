//! Clients for OpenAI-compatible upstreams: cloud providers, and Flotilla agents, which
//! speak the same API. One pooled HTTP client, per-target base URL and key, timeouts, and
//! the classification of every failure into retryable or not.
//!
//! Never depends on axum or candle.

pub mod error;
pub mod upstream;

pub use error::ProviderError;
pub use upstream::{ProviderConfig, Secret, Timeouts, Upstream, UpstreamPool};
