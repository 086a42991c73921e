//! Test fakes for what is remote: an OpenAI-compatible mock upstream whose behaviour is
//! scripted per request (answers, latency, error statuses with Retry-After or a provider's
//! error code, streams cut, stalled, garbled or left without `[DONE]`, prefill refused,
//! requests that never get an answer), a server that resets every connection, and a mock of
//! Anthropic's Messages API that validates requests as the real one does; the mocks record
//! every request they receive.

pub mod anthropic;
mod mock;

pub use anthropic::{AnthropicBehavior, AnthropicRecorded, MockAnthropic, MockUsage};
pub use mock::{Behavior, MockOptions, MockUpstream, Recorded, ResetUpstream, closed_port_url};
