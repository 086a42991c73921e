//! Wire types shared by every Flotilla crate: the OpenAI schema (chat, completions,
//! embeddings, models, errors, SSE chunks), the agent <-> scheduler protocol, the
//! `ErrorKind` taxonomy and header names.
//!
//! This crate holds data and (de)serialisation only. It never depends on candle or an HTTP
//! client; the `axum` feature adds one `IntoResponse` for `ApiError` and body reading,
//! `serve` the accept loop both servers share, `logging` the binaries' log writer.

#[cfg(feature = "axum")]
pub mod body;
pub mod capability;
pub mod error;
pub mod headers;
#[cfg(feature = "logging")]
pub mod logging;
pub mod metrics;
pub mod openai;
pub mod protocol;
pub mod secret;
#[cfg(feature = "serve")]
pub mod serve;
pub mod sse;
pub mod usage;

pub use capability::Capability;
pub use error::{ApiError, ErrorKind};
pub use secret::{Secret, check_bearer};

/// Seconds since the Unix epoch, as OpenAI's `created` fields carry.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch: ledger timestamps, and the wall-clock times scheduler
/// replicas exchange.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
