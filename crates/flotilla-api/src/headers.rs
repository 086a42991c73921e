//! Header names Flotilla adds or reads.

/// Set on every completion response: where the request ran, e.g. `local:node-a/tiny-llama`
/// or `cloud:openai`.
pub const TARGET: &str = "x-flotilla-target";
/// Set on every response: the request id the scheduler assigned.
pub const REQUEST_ID: &str = "x-request-id";
