//! The OpenAI HTTP schema: requests keep unknown fields (`extra`) so a request forwarded
//! to a cloud provider loses nothing; responses are what OpenAI SDKs parse.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ApiError;

/// What the scheduler needs of any OpenAI request to route it.
pub trait OpenAiRequest: serde::de::DeserializeOwned + Serialize {
    fn model(&self) -> &str;
    fn is_stream(&self) -> bool;
    /// Checks that hold for every target, local or cloud.
    fn validate(&self) -> Result<(), ApiError>;
}

macro_rules! openai_request {
    ($t:ty, stream: $stream:expr) => {
        impl OpenAiRequest for $t {
            fn model(&self) -> &str {
                &self.model
            }
            fn is_stream(&self) -> bool {
                let stream: fn(&$t) -> bool = $stream;
                stream(self)
            }
            fn validate(&self) -> Result<(), ApiError> {
                <$t>::validate(self)
            }
        }
    };
}

openai_request!(ChatCompletionRequest, stream: |r| r.stream.unwrap_or(false));
openai_request!(CompletionRequest, stream: |r| r.stream.unwrap_or(false));
openai_request!(EmbeddingRequest, stream: |_| false);

/// `stop`: a string or a list of up to four strings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s.clone()],
            StopSpec::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A message's content: a plain string or a list of typed parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// The message as plain text: string content, or its `text` parts joined. Parts of any
    /// other type (images, audio) cannot be read as text and are an error.
    pub fn text(&self, index: usize) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(MessageContent::Text(s)) => Ok(s.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut out = String::new();
                for part in parts {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                &format!("messages[{index}].content"),
                                format!(
                                    "content part of type `{}` is not supported by this model",
                                    kind.unwrap_or("unknown")
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Everything else (tools, response_format, user, ...) is carried through untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
    /// `max_completion_tokens` supersedes the older `max_tokens`.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Checks that hold for every target, local or cloud.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_model(&self.model)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must contain at least one message",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool" | "function"
            ) {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{}`", m.role),
                ));
            }
        }
        check_sampling(
            self.temperature,
            self.top_p,
            self.max_tokens(),
            self.stop.as_ref(),
        )?;
        check_n(self.n)?;
        if self.stream_options.is_some() && !self.is_stream() {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        Ok(())
    }
}

/// `prompt` of the legacy completions API: one string or a list of them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
    pub fn prompts(&self) -> Vec<String> {
        match &self.prompt {
            PromptInput::One(s) => vec![s.clone()],
            PromptInput::Many(v) => v.clone(),
        }
    }
    pub fn validate(&self) -> Result<(), ApiError> {
        check_model(&self.model)?;
        if let PromptInput::Many(v) = &self.prompt
            && v.is_empty()
        {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` must not be an empty list",
            ));
        }
        check_sampling(
            self.temperature,
            self.top_p,
            self.max_tokens,
            self.stop.as_ref(),
        )?;
        check_n(self.n)?;
        Ok(())
    }
}

/// `input` of the embeddings API: a string, a list of strings, or token ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// OpenAI's limit on inputs per embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

impl EmbeddingRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        check_model(&self.model)?;
        match &self.input {
            EmbeddingInput::Many(v) if v.is_empty() => {
                return Err(ApiError::invalid_param(
                    "input",
                    "`input` must not be an empty list",
                ));
            }
            EmbeddingInput::TokenBatches(v) if v.is_empty() => {
                return Err(ApiError::invalid_param(
                    "input",
                    "`input` must not be an empty list",
                ));
            }
            EmbeddingInput::Many(v) if v.len() > MAX_EMBEDDING_INPUTS => {
                return Err(ApiError::invalid_param(
                    "input",
                    format!("`input` takes at most {MAX_EMBEDDING_INPUTS} items"),
                ));
            }
            EmbeddingInput::TokenBatches(v) if v.len() > MAX_EMBEDDING_INPUTS => {
                return Err(ApiError::invalid_param(
                    "input",
                    format!("`input` takes at most {MAX_EMBEDDING_INPUTS} items"),
                ));
            }
            _ => {}
        }
        match self.encoding_format.as_deref() {
            None | Some("float") | Some("base64") => Ok(()),
            Some(other) => Err(ApiError::invalid_param(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
            )),
        }
    }
    pub fn wants_base64(&self) -> bool {
        self.encoding_format.as_deref() == Some("base64")
    }
}

fn check_n(n: Option<u64>) -> Result<(), ApiError> {
    match n {
        Some(n) if n == 0 || n > 128 => Err(ApiError::invalid_param(
            "n",
            "`n` must be between 1 and 128",
        )),
        _ => Ok(()),
    }
}

fn check_model(model: &str) -> Result<(), ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::invalid_param(
            "model",
            "`model` must be a non-empty string",
        ));
    }
    Ok(())
}

fn check_sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u64>,
    stop: Option<&StopSpec>,
) -> Result<(), ApiError> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("`top_p` must be in (0, 1], got {p}"),
        ));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    if let Some(stop) = stop {
        let v = stop.to_vec();
        if v.len() > 4 {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` takes at most 4 sequences",
            ));
        }
        if v.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "stop sequences must not be empty",
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    pub role: String,
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChunkDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: ChunkDelta,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

/// Response of `/v1/completions`, and each of its stream chunks (object `text_completion`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One vector: a list of floats, or their little-endian f32 bytes in base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingData {
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    pub object: String,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

impl ModelCard {
    pub fn new(id: &str, owned_by: &str) -> Self {
        ModelCard {
            id: id.to_owned(),
            object: "model".into(),
            created: 0,
            owned_by: owned_by.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// Little-endian f32 bytes in standard base64, the `encoding_format: "base64"` form the
/// official SDKs ask for by default.
pub fn encode_f32_base64(values: &[f32]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(TABLE[(n >> 18) as usize & 63] as char);
        out.push(TABLE[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            TABLE[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            TABLE[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"bob"}],"tools":[{"type":"function"}],"stream":true}"#;
        let req: ChatCompletionRequest = serde_json::from_str(raw).unwrap();
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["tools"][0]["type"], "function");
        assert_eq!(back["messages"][0]["name"], "bob");
        assert!(req.is_stream());
    }

    #[test]
    fn validation_names_the_parameter() {
        let mut req: ChatCompletionRequest =
            serde_json::from_str(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert!(req.validate().is_ok());
        req.temperature = Some(3.0);
        assert_eq!(
            req.validate().unwrap_err().param.as_deref(),
            Some("temperature")
        );
        req.temperature = None;
        req.messages.clear();
        assert_eq!(
            req.validate().unwrap_err().param.as_deref(),
            Some("messages")
        );
    }

    #[test]
    fn content_parts_join_as_text() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.text(0).unwrap(), "ab");
        let img: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap();
        assert!(img.text(0).is_err());
    }

    #[test]
    fn base64_matches_known_bytes() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(encode_f32_base64(&[1.0]), "AACAPw==");
        assert_eq!(encode_f32_base64(&[1.0, 2.0]), "AACAPwAAAEA=");
    }
}
