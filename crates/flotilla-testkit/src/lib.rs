//! Test fakes for what is remote: an OpenAI-compatible mock upstream whose behaviour is
//! scripted per request (answers, latency, error statuses with Retry-After, streams cut
//! mid-way, requests that never get an answer), recording every request it receives.

mod mock;

pub use mock::{Behavior, MockOptions, MockUpstream, Recorded, closed_port_url};
