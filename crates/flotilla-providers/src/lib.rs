//! Clients for cloud providers and Flotilla agents behind one trait ([`Wire`]): the
//! OpenAI-compatible API (passed through) and Anthropic's Messages API (translated both
//! ways, streams included). One pooled HTTP client, per-provider base URL, key, timeouts,
//! read limits and prices; token usage in one shape; every failure classified as
//! retryable or not, with the wait an upstream asks for.
//!
//! Never depends on axum or candle.

pub mod anthropic;
pub mod error;
pub mod limits;
pub mod retry;
pub mod upstream;
pub mod usage;
pub mod wire;

pub use error::ProviderError;
/// Which upstreams go through which proxy ([`UpstreamPool::with_proxies`]).
pub use hyper_util::client::proxy::matcher::Matcher as ProxyMatcher;
pub use limits::ReadLimits;
pub use retry::{MAX_RETRY_AFTER, retry_after};
pub use upstream::{
    ProviderConfig, ProviderKind, Secret, Timeouts, Upstream, UpstreamPool, UpstreamResponse,
    error_chain,
};
pub use usage::{Price, TokenCounter, TokenUsage};
pub use wire::{
    Answer, EncodeError, EncodeOptions, Endpoint, EventKind, StreamDecoder, Wire,
    append_answer_text,
};
