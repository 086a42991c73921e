//! Header names Flotilla adds or reads.

/// Set on every completion response: where the request ran, e.g. `local:node-a/tiny-llama`
/// or `cloud:openai`.
pub const TARGET: &str = "x-flotilla-target";
/// Set on every response: the request id the scheduler assigned.
pub const REQUEST_ID: &str = "x-request-id";
/// Set on routed responses: why the scheduler chose the target (a reason code).
pub const ROUTE_REASON: &str = "x-flotilla-route-reason";
/// Request: `interactive` or `batch`.
pub const PRIORITY: &str = "x-flotilla-priority";
/// Request: the first token must arrive within this many milliseconds.
pub const TTFT_MS: &str = "x-flotilla-ttft-ms";
/// Request: the whole answer must arrive within this many milliseconds.
pub const DEADLINE_MS: &str = "x-flotilla-deadline-ms";
/// Request: `cost`, `latency`, `failover`, `weighted`, `local-only` or `cloud-only`.
pub const ROUTE: &str = "x-flotilla-route";
/// Request: a free-form tag routing rules can match.
pub const TAG: &str = "x-flotilla-tag";
/// Response, from agents: for an answer sent whole, the milliseconds from the request's
/// arrival to its first token (the scheduler's TTFT figure for non-streamed answers).
pub const FIRST_TOKEN_MS: &str = "x-flotilla-first-token-ms";
/// On an agent's whole answer: how long its sequences were in the running batch (the
/// longest; milliseconds, fractional), what local GPU time is priced by. A stream says it
/// in its usage chunk (`usage.busy_us`).
pub const BUSY_MS: &str = "x-flotilla-busy-ms";
