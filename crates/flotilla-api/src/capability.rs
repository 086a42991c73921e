//! What a request may need from the model that serves it.

use serde::{Deserialize, Serialize};

/// A feature a request needs from the model that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Tools,
    Vision,
    JsonSchema,
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
}

impl Capability {
    /// The request field that asks for it.
    pub fn param(self) -> &'static str {
        match self {
            Capability::Tools => "tools",
            Capability::Vision => "messages",
            Capability::JsonSchema | Capability::JsonObject => "response_format",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Tools => "tools",
            Capability::Vision => "vision",
            Capability::JsonSchema => "json_schema",
            Capability::JsonObject => "json_object",
        }
    }
}
