use crate::error::EngineError;

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Fixed seed makes sampling reproducible; `None` draws a random seed.
    pub seed: Option<u64>,
    /// Defaults to the room left in the context window.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_tokens == Some(0) {
            return Err(EngineError::invalid("max_tokens must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
}

#[derive(Debug)]
pub enum GenerateEvent {
    /// New text. Never contains any part of a stop string and never splits a UTF-8 char.
    Delta {
        text: String,
    },
    Finished {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(EngineError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TextEngineConfig {
    /// Sequences stepped together; further requests wait in FIFO order.
    pub max_running: usize,
}

impl Default for TextEngineConfig {
    fn default() -> Self {
        TextEngineConfig { max_running: 8 }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStatus {
    pub running: usize,
    pub waiting: usize,
    pub max_running: usize,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
}
