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

    /// The checked sampling options. `logprobs` is a boolean here; `top_logprobs` (0..=20)
    /// asks for alternatives and needs `logprobs: true`, as in OpenAI's API.
    pub fn sampling(&self) -> Result<SamplingOptions, ApiError> {
        let mut opts = sampling_options(
            self.temperature,
            self.top_p,
            self.max_tokens(),
            self.stop.as_ref(),
            &self.extra,
        )?;
        opts.seed = self.seed;
        let logprobs = extra_bool(&self.extra, "logprobs")?.unwrap_or(false);
        let top = extra_int(&self.extra, "top_logprobs")?;
        if let Some(n) = top {
            if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
                ));
            }
            if !logprobs {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs` set to true",
                ));
            }
        }
        opts.logprobs = logprobs.then(|| top.unwrap_or(0) as u32);
        Ok(opts)
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
        self.sampling()?;
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
        self.sampling()?;
        check_n(self.n)?;
        Ok(())
    }

    /// The checked sampling options. The legacy `logprobs` is a number of alternatives,
    /// 0..=5; the chosen token's log-probability always comes with them.
    pub fn sampling(&self) -> Result<SamplingOptions, ApiError> {
        let mut opts = sampling_options(
            self.temperature,
            self.top_p,
            self.max_tokens,
            self.stop.as_ref(),
            &self.extra,
        )?;
        opts.seed = self.seed;
        if let Some(n) = extra_int(&self.extra, "logprobs")? {
            if !(0..=MAX_LEGACY_LOGPROBS as i64).contains(&n) {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!("`logprobs` must be between 0 and {MAX_LEGACY_LOGPROBS}, got {n}"),
                ));
            }
            opts.logprobs = Some(n as u32);
        }
        Ok(opts)
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

/// Most alternatives chat's `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most alternatives the legacy completions' `logprobs` may ask for.
pub const MAX_LEGACY_LOGPROBS: u32 = 5;

/// A request's sampling options, checked. Past OpenAI's own fields this reads vLLM's
/// extensions `top_k`, `min_p` and `repetition_penalty`. The options that are not typed
/// fields stay in the request's `extra` map, so a request forwarded to a provider carries
/// them as the client wrote them, and a value of the wrong type is a 400 naming it rather
/// than a parse error.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOptions {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// `None` when absent or off: vLLM reads both 0 and -1 as "consider every token".
    pub top_k: Option<u64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and its `n` likeliest alternatives.
    pub logprobs: Option<u32>,
    /// vLLM's `ignore_eos`: generate past end-of-sequence until `max_tokens`.
    pub ignore_eos: bool,
}

/// The options chat and completions share.
fn sampling_options(
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u64>,
    stop: Option<&StopSpec>,
    extra: &Map<String, Value>,
) -> Result<SamplingOptions, ApiError> {
    check_sampling(temperature, top_p, max_tokens, stop)?;
    let top_k = match extra_int(extra, "top_k")? {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as u64),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be at least 1, or 0 or -1 for off; got {k}"),
            ));
        }
    };
    let min_p = extra_number(extra, "min_p")?;
    if let Some(p) = min_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(ApiError::invalid_param(
            "min_p",
            format!("`min_p` must be between 0 and 1, got {p}"),
        ));
    }
    let repetition_penalty = extra_number(extra, "repetition_penalty")?;
    if let Some(r) = repetition_penalty
        && r <= 0.0
    {
        return Err(ApiError::invalid_param(
            "repetition_penalty",
            format!("`repetition_penalty` must be greater than 0, got {r}"),
        ));
    }
    let penalty = |name: &str| -> Result<Option<f64>, ApiError> {
        let v = extra_number(extra, name)?;
        if let Some(v) = v
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` must be between -2 and 2, got {v}"),
            ));
        }
        Ok(v)
    };
    let frequency_penalty = penalty("frequency_penalty")?;
    let presence_penalty = penalty("presence_penalty")?;
    let ignore_eos = extra_bool(extra, "ignore_eos")?.unwrap_or(false);
    Ok(SamplingOptions {
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        seed: None,
        max_tokens,
        stop: stop.map(StopSpec::to_vec).unwrap_or_default(),
        logprobs: None,
        ignore_eos,
    })
}

/// `extra[name]` as a number; absent and null are `None`.
fn extra_number(extra: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be a number, got {other}"),
        )),
    }
}

/// `extra[name]` as an integer (`2.0` counts, `2.5` does not); absent and null are `None`.
fn extra_int(extra: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    let not_int =
        |v: &Value| ApiError::invalid_param(name, format!("`{name}` must be an integer, got {v}"));
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 2f64.powi(53) => Ok(Some(f as i64)),
            _ => Err(not_int(v)),
        },
        Some(v) => Err(not_int(v)),
    }
}

/// `extra[name]` as a boolean; absent and null are `None`.
fn extra_bool(extra: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be a boolean, got {other}"),
        )),
    }
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
    /// An agent's stream says how long its sequences were in the running batch (the
    /// longest, in microseconds): what the scheduler prices local GPU time by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_us: Option<u64>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            busy_us: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    pub role: String,
    pub content: Option<String>,
}

/// One alternative at a position, as chat reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes, which may be part of a character.
    pub bytes: Option<Vec<u8>>,
}

/// One generated token's log-probability and, when asked, its likeliest alternatives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// `choices[i].logprobs` of a chat completion or chunk: one entry per generated token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Option<Vec<ChatTokenLogprob>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<String>,
    pub logprobs: Option<ChatLogprobs>,
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
    pub logprobs: Option<ChatLogprobs>,
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

/// Token -> log-probability as a JSON object whose keys keep this order (best first),
/// whatever map type the JSON library uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogprobMap(pub Vec<(String, f32)>);

impl Serialize for LogprobMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            m.serialize_entry(token, logprob)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for LogprobMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = LogprobMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of token to log-probability")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<LogprobMap, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, f32>()? {
                    out.push(entry);
                }
                Ok(LogprobMap(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// `choices[i].logprobs` of the legacy completions API: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` only for an echoed prompt's first token.
    pub token_logprobs: Vec<Option<f32>>,
    /// The likeliest alternatives and the chosen token, so up to `logprobs + 1` entries.
    pub top_logprobs: Vec<Option<LogprobMap>>,
    /// Where each token starts in the choice's text, in characters.
    pub text_offset: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<CompletionLogprobs>,
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

    fn chat(extra: Value) -> ChatCompletionRequest {
        let mut body = serde_json::json!({"model":"m","messages":[{"role":"user","content":"hi"}]});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        serde_json::from_value(body).unwrap()
    }

    fn completion(extra: Value) -> CompletionRequest {
        let mut body = serde_json::json!({"model":"m","prompt":"hi"});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn sampling_extensions_are_read_and_checked() {
        let opts = chat(serde_json::json!({
            "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2,
            "frequency_penalty": 0.5, "presence_penalty": -1, "logprobs": true,
            "top_logprobs": 3, "seed": -4, "stop": "x", "unknown_thing": [1]
        }))
        .sampling()
        .unwrap();
        assert_eq!(opts.top_k, Some(40));
        assert_eq!(opts.min_p, Some(0.05));
        assert_eq!(opts.repetition_penalty, Some(1.2));
        assert_eq!(opts.frequency_penalty, Some(0.5));
        assert_eq!(opts.presence_penalty, Some(-1.0));
        assert_eq!(opts.logprobs, Some(3));
        assert_eq!(opts.seed, Some(-4));
        assert_eq!(opts.stop, ["x"]);
        assert!(!opts.ignore_eos);
        let opts = completion(serde_json::json!({"ignore_eos": true}))
            .sampling()
            .unwrap();
        assert!(opts.ignore_eos);
        for off in [-1, 0] {
            let opts = chat(serde_json::json!({"top_k": off})).sampling().unwrap();
            assert_eq!(opts.top_k, None);
        }
        assert_eq!(
            chat(serde_json::json!({"logprobs": true}))
                .sampling()
                .unwrap()
                .logprobs,
            Some(0)
        );
        assert_eq!(
            chat(serde_json::json!({"logprobs": false}))
                .sampling()
                .unwrap()
                .logprobs,
            None
        );

        let bad = [
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"top_k": 2.5}), "top_k"),
            (serde_json::json!({"top_k": "5"}), "top_k"),
            (serde_json::json!({"min_p": 1.5}), "min_p"),
            (serde_json::json!({"min_p": "a"}), "min_p"),
            (
                serde_json::json!({"repetition_penalty": 0}),
                "repetition_penalty",
            ),
            (
                serde_json::json!({"frequency_penalty": 2.5}),
                "frequency_penalty",
            ),
            (
                serde_json::json!({"presence_penalty": -3}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"presence_penalty": true}),
                "presence_penalty",
            ),
            (serde_json::json!({"logprobs": 1}), "logprobs"),
            (serde_json::json!({"ignore_eos": 1}), "ignore_eos"),
            (
                serde_json::json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                serde_json::json!({"logprobs": true, "top_logprobs": -1}),
                "top_logprobs",
            ),
            (serde_json::json!({"top_logprobs": 2}), "top_logprobs"),
            (
                serde_json::json!({"logprobs": false, "top_logprobs": 0}),
                "top_logprobs",
            ),
        ];
        for (extra, param) in bad {
            let err = chat(extra.clone()).validate().unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{extra}");
        }
    }

    #[test]
    fn legacy_logprobs_is_a_count() {
        let opts = completion(serde_json::json!({"logprobs": 2}))
            .sampling()
            .unwrap();
        assert_eq!(opts.logprobs, Some(2));
        let opts = completion(serde_json::json!({"logprobs": 0}))
            .sampling()
            .unwrap();
        assert_eq!(opts.logprobs, Some(0));
        let opts = completion(serde_json::json!({"logprobs": null}))
            .sampling()
            .unwrap();
        assert_eq!(opts.logprobs, None);
        for bad in [
            serde_json::json!(6),
            serde_json::json!(true),
            serde_json::json!(-1),
        ] {
            let err = completion(serde_json::json!({"logprobs": bad}))
                .validate()
                .unwrap_err();
            assert_eq!(err.param.as_deref(), Some("logprobs"));
        }
        let err = completion(serde_json::json!({"top_k": 0.5}))
            .validate()
            .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("top_k"));
    }

    #[test]
    fn logprob_map_keeps_its_order() {
        let m = LogprobMap(vec![("b".into(), -0.5), ("a".into(), -1.0)]);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"b":-0.5,"a":-1.0}"#);
        let back: LogprobMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
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
