//! Test fakes for what is remote: an OpenAI-compatible mock upstream whose behaviour is
//! scripted per request (answers, latency, error statuses with Retry-After, streams cut
//! mid-way, requests that never get an answer), and a mock of Anthropic's Messages API
//! that validates requests as the real one does; both record every request they receive.

pub mod anthropic;
mod mock;

pub use anthropic::{AnthropicBehavior, AnthropicRecorded, MockAnthropic, MockUsage};
pub use mock::{Behavior, MockOptions, MockUpstream, Recorded, closed_port_url};
