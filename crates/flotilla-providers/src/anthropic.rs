//! Anthropic's Messages API spoken for OpenAI clients: chat requests are encoded as
//! Messages requests, and answers, streams, usage and errors are decoded back into the
//! OpenAI objects the client expects. Anthropic has no completions or embeddings endpoint.

use bytes::Bytes;
use flotilla_api::error::ErrorBody;
use flotilla_api::sse::SseEvent;
use http::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::Secret;
use crate::usage::TokenUsage;
use crate::wire::{Answer, EncodeError, EncodeOptions, Endpoint, EventKind, StreamDecoder, Wire};

/// Completion limit sent when the request sets none: Anthropic requires `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Anthropic's price of a 5-minute cache write, as a multiple of the input price.
pub const CACHE_WRITE_PRICE_FACTOR: f64 = 1.25;
/// The API version every request names (`anthropic-version`).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic's Messages API (`POST {base}/messages`, base e.g. `https://api.anthropic.com/v1`).
#[derive(Debug, Clone)]
pub struct AnthropicWire {
    default_max_tokens: u64,
}

impl AnthropicWire {
    pub fn new(default_max_tokens: u64) -> Self {
        AnthropicWire { default_max_tokens }
    }
}

impl Wire for AnthropicWire {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn path(&self, ep: Endpoint) -> Option<&'static str> {
        match ep {
            Endpoint::Chat => Some("/messages"),
            Endpoint::Completions | Endpoint::Embeddings => None,
        }
    }

    fn headers(&self, key: Option<&Secret>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(key) = key
            && let Ok(mut v) = HeaderValue::from_str(key.expose())
        {
            v.set_sensitive(true);
            h.insert("x-api-key", v);
        }
        h.insert(
            "anthropic-version",
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        h
    }

    fn encode(
        &self,
        ep: Endpoint,
        body: &Value,
        opts: &EncodeOptions,
    ) -> Result<Bytes, EncodeError> {
        if ep != Endpoint::Chat {
            return Err(EncodeError::new(
                None,
                format!(
                    "Anthropic's Messages API has no {} endpoint; only chat completions",
                    ep.as_str()
                ),
            ));
        }
        let req = encode_chat(body, opts, self.default_max_tokens)?;
        serde_json::to_vec(&req)
            .map(Bytes::from)
            .map_err(|e| EncodeError::new(None, e.to_string()))
    }

    fn decode_answer(&self, _ep: Endpoint, bytes: Bytes) -> Result<Answer, String> {
        let msg: Message =
            serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        if msg.kind != "message" {
            return Err(format!("expected a message, got `{}`", msg.kind));
        }
        let mut text = String::new();
        // Tool names and arguments, after the content, as the OpenAI answer reads.
        let mut tool_text = String::new();
        let mut tool_calls = Vec::new();
        for block in &msg.content {
            match block {
                Block::Text { text: t } => text.push_str(t),
                Block::ToolUse { id, name, input } => {
                    let arguments = input.to_string();
                    tool_text.push_str(name);
                    tool_text.push_str(&arguments);
                    tool_calls.push(json!({
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }));
                }
                Block::Other => {}
            }
        }
        let answer_text = format!("{text}{tool_text}");
        let mut message = json!({
            "role": "assistant",
            "content": if text.is_empty() { Value::Null } else { Value::String(text) },
        });
        if !tool_calls.is_empty() {
            message["tool_calls"] = Value::Array(tool_calls);
        }
        let usage = msg.usage.total();
        let out = json!({
            "id": msg.id,
            "object": "chat.completion",
            "created": flotilla_api::unix_now(),
            "model": msg.model,
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": msg.stop_reason.as_deref().map(finish_reason),
                "logprobs": null,
            }],
            "usage": openai_usage(&usage),
        });
        let bytes = serde_json::to_vec(&out).map_err(|e| e.to_string())?;
        Ok(Answer {
            body: Bytes::from(bytes),
            usage: Some(usage),
            text: answer_text,
        })
    }

    fn stream_decoder(&self, _ep: Endpoint, client_usage: bool) -> Box<dyn StreamDecoder> {
        Box::new(AnthropicStream::new(client_usage))
    }

    fn error_body(&self, text: &str) -> Option<ErrorBody> {
        // Anthropic's `{"type":"error","error":{"type","message"}}` reads as OpenAI's
        // `{"error":{"message","type"}}` with no param or code; an OpenAI-shaped body (from
        // a proxy in front of Anthropic) keeps its own.
        serde_json::from_str(text).ok()
    }
}

// ---- Requests ----

fn encode_chat(body: &Value, opts: &EncodeOptions, default_max: u64) -> Result<Value, EncodeError> {
    let Some(req) = body.as_object() else {
        return Err(EncodeError::new(
            None,
            "the request body must be a JSON object",
        ));
    };
    if req.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(EncodeError::new(
            Some("n"),
            "Anthropic's Messages API returns one choice per request; `n` must be 1",
        ));
    }
    if let Some(kind) = body
        .pointer("/response_format/type")
        .and_then(Value::as_str)
        && matches!(kind, "json_schema" | "json_object")
    {
        return Err(EncodeError::new(
            Some("response_format"),
            format!(
                "`response_format` of type `{kind}` is not supported for Anthropic models: \
                 Anthropic's Messages API is not asked for JSON mode through this gateway"
            ),
        ));
    }
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(EncodeError::new(
            Some("logprobs"),
            "Anthropic's Messages API does not return log-probabilities",
        ));
    }
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return Err(EncodeError::new(
            Some("messages"),
            "`messages` must be a list",
        ));
    };

    let mut out = Map::new();
    out.insert(
        "model".into(),
        req.get("model").cloned().unwrap_or(Value::Null),
    );
    let (system, turns) = encode_messages(messages)?;
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(turns));
    let max_tokens = req
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| req.get("max_tokens").and_then(Value::as_u64))
        .unwrap_or(default_max);
    out.insert("max_tokens".into(), max_tokens.into());
    if let Some(t) = req.get("temperature").and_then(Value::as_f64) {
        // OpenAI's range is 0..2, Anthropic's 0..1.
        out.insert("temperature".into(), t.clamp(0.0, 1.0).into());
    }
    if let Some(p) = req.get("top_p").and_then(Value::as_f64) {
        out.insert("top_p".into(), p.into());
    }
    // vLLM's extension, which Anthropic takes too; 0 and -1 mean "off" in vLLM.
    if let Some(k) = req.get("top_k").and_then(Value::as_u64).filter(|k| *k > 0) {
        out.insert("top_k".into(), k.into());
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(list)) if !list.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(list.clone()));
        }
        _ => {}
    }
    if opts.stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    if let Some(user) = req.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    encode_tools(req, &mut out)?;
    Ok(Value::Object(out))
}

/// The system prompt's parts and the user/assistant turns, consecutive same-role messages
/// merged: Anthropic requires the roles to alternate, and tool results to be user blocks.
fn encode_messages(messages: &[Value]) -> Result<(Vec<String>, Vec<Value>), EncodeError> {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                let text = text_of(content, i)?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => ("user", content_blocks(content, i)?),
            "assistant" => {
                let mut blocks = content_blocks(content, i)?;
                blocks.extend(tool_use_blocks(m, i)?);
                ("assistant", blocks)
            }
            "tool" => {
                let Some(id) = m.get("tool_call_id").and_then(Value::as_str) else {
                    return Err(EncodeError::new(
                        Some(&format!("messages[{i}].tool_call_id")),
                        "a tool message needs `tool_call_id`",
                    ));
                };
                let result = match content {
                    Value::Array(_) => Value::Array(content_blocks(content, i)?),
                    _ => Value::String(text_of(content, i)?),
                };
                (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": result})],
                )
            }
            other => {
                return Err(EncodeError::new(
                    Some(&format!("messages[{i}].role")),
                    format!("messages with role `{other}` cannot be sent to Anthropic models"),
                ));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, prev)) if *last == role => prev.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, turns))
}

/// A message's text: string content or its text parts joined.
fn text_of(content: &Value, i: usize) -> Result<String, EncodeError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    kind => {
                        return Err(EncodeError::new(
                            Some(&format!("messages[{i}].content[{j}]")),
                            format!(
                                "content part of type `{}` is not allowed here",
                                kind.unwrap_or("unknown")
                            ),
                        ));
                    }
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(content_error(i)),
    }
}

fn content_error(i: usize) -> EncodeError {
    EncodeError::new(
        Some(&format!("messages[{i}].content")),
        "`content` must be a string or a list of parts",
    )
}

/// User or assistant content as Anthropic blocks. Empty text is dropped: Anthropic
/// rejects empty text blocks.
fn content_blocks(content: &Value, i: usize) -> Result<Vec<Value>, EncodeError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let param = || format!("messages[{i}].content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                        if !text.is_empty() {
                            blocks.push(json!({"type": "text", "text": text}));
                        }
                    }
                    Some("image_url") => {
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        blocks.push(
                            image_block(url).map_err(|m| EncodeError::new(Some(&param()), m))?,
                        );
                    }
                    kind => {
                        return Err(EncodeError::new(
                            Some(&param()),
                            format!(
                                "content part of type `{}` cannot be sent to Anthropic models",
                                kind.unwrap_or("unknown")
                            ),
                        ));
                    }
                }
            }
            Ok(blocks)
        }
        _ => Err(content_error(i)),
    }
}

fn image_block(url: &str) -> Result<Value, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((mime, data)) = rest.split_once(";base64,") else {
            return Err("an image data URL must be base64 (`data:<mime>;base64,<data>`)".into());
        };
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": mime, "data": data},
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err("an image must be an http(s) URL or a base64 data URL".into())
}

/// An assistant message's `tool_calls` as `tool_use` blocks.
fn tool_use_blocks(m: &Value, i: usize) -> Result<Vec<Value>, EncodeError> {
    let Some(calls) = m.get("tool_calls").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let param = format!("messages[{i}].tool_calls");
    calls
        .iter()
        .map(|call| {
            let id = call.get("id").and_then(Value::as_str);
            let name = call.pointer("/function/name").and_then(Value::as_str);
            let (Some(id), Some(name)) = (id, name) else {
                return Err(EncodeError::new(
                    Some(&param),
                    "each tool call needs an `id` and a `function.name`",
                ));
            };
            let args = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            // Some clients send "" for a call without arguments.
            let input = if args.trim().is_empty() {
                json!({})
            } else {
                match serde_json::from_str::<Value>(args) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(EncodeError::new(
                            Some(&param),
                            format!("the arguments of tool call `{id}` are not a JSON object"),
                        ));
                    }
                }
            };
            Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
        })
        .collect()
}

fn encode_tools(req: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), EncodeError> {
    let tools = match req.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|t| {
                let f = t.get("function");
                let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                match (t.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(name)) => {
                        let mut tool = Map::new();
                        tool.insert("name".into(), name.into());
                        if let Some(d) = f.and_then(|f| f.get("description")).filter(|d| d.is_string()) {
                            tool.insert("description".into(), d.clone());
                        }
                        let schema = f
                            .and_then(|f| f.get("parameters"))
                            .filter(|p| p.is_object())
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                        tool.insert("input_schema".into(), schema);
                        Ok(Value::Object(tool))
                    }
                    _ => Err(EncodeError::new(
                        Some("tools"),
                        "only tools of type `function` with a `function.name` can be sent to Anthropic models",
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(EncodeError::new(Some("tools"), "`tools` must be a list")),
    };
    let choice = match req.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => {
                return Err(EncodeError::new(
                    Some("tool_choice"),
                    format!("unknown `tool_choice` `{other}`"),
                ));
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => {
                return Err(EncodeError::new(
                    Some("tool_choice"),
                    "`tool_choice` must be auto, required, none or {\"type\":\"function\",\"function\":{\"name\":...}}",
                ));
            }
        },
    };
    if tools.is_empty() {
        // Without tools only "do not call one" makes sense; OpenAI rejects the rest too.
        if choice
            .as_ref()
            .is_some_and(|c| !matches!(c["type"].as_str(), Some("auto" | "none")))
        {
            return Err(EncodeError::new(
                Some("tool_choice"),
                "`tool_choice` needs `tools`",
            ));
        }
        return Ok(());
    }
    let mut choice = choice.unwrap_or_else(|| json!({"type": "auto"}));
    if req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false)
        && choice["type"] != "none"
        && let Some(c) = choice.as_object_mut()
    {
        c.insert("disable_parallel_tool_use".into(), Value::Bool(true));
    }
    out.insert("tools".into(), Value::Array(tools));
    out.insert("tool_choice".into(), choice);
    Ok(())
}

// ---- Answers ----

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// Thinking, redacted thinking and server tool blocks: not part of an OpenAI answer.
    #[serde(other)]
    Other,
}

/// Anthropic's usage: `input_tokens` excludes the tokens read from or written to the cache.
/// Fields are nullable in stream deltas, where only those present are updates.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl Usage {
    /// In OpenAI's terms: every prompt token, cache reads and writes included (as the
    /// client's `prompt_tokens`), and of them the reads and the writes.
    fn total(&self) -> TokenUsage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        TokenUsage {
            prompt: self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(written),
            completion: self.output_tokens.unwrap_or(0),
            cached_prompt: read,
            cache_write_prompt: written,
        }
    }

    /// The counts `later` reports, the rest kept (stream deltas are cumulative).
    fn update(&mut self, later: &Usage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
    }
}

fn openai_usage(u: &TokenUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt},
    })
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn (a server tool paused the turn) and any
        // reason added later.
        _ => "stop",
    }
}

// ---- Streams ----

/// Translates Anthropic's stream events into OpenAI chunks.
#[derive(Debug)]
pub struct AnthropicStream {
    client_usage: bool,
    id: String,
    model: String,
    created: u64,
    usage: Usage,
    usage_seen: bool,
    finished: bool,
    /// Content block index -> OpenAI tool call index, for the tool_use blocks so far.
    tools: Vec<(u64, usize)>,
}

#[derive(Deserialize)]
struct StartView {
    message: StartMessage,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
struct BlockStartView {
    index: u64,
    content_block: Value,
}

#[derive(Deserialize)]
struct BlockDeltaView {
    index: u64,
    delta: Value,
}

#[derive(Deserialize)]
struct MessageDeltaView {
    #[serde(default)]
    delta: MessageDelta,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Default, Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

fn parse<'a, T: Deserialize<'a>>(name: &str, data: &'a str) -> Result<T, String> {
    serde_json::from_str(data).map_err(|e| format!("anthropic: unreadable {name} event: {e}"))
}

impl AnthropicStream {
    pub fn new(client_usage: bool) -> Self {
        AnthropicStream {
            client_usage,
            id: String::new(),
            model: String::new(),
            created: flotilla_api::unix_now(),
            usage: Usage::default(),
            usage_seen: false,
            finished: false,
            tools: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
        .to_string()
    }

    fn tool_index(&self, block: u64) -> Option<usize> {
        self.tools
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, t)| *t)
    }
}

impl StreamDecoder for AnthropicStream {
    fn passthrough(&self) -> bool {
        false
    }

    fn event(&mut self, ev: &SseEvent, out: &mut Vec<String>) -> Result<EventKind, String> {
        let data = ev.data.as_str();
        let typed;
        let name = match ev.event.as_deref() {
            Some(n) => n,
            None => {
                #[derive(Deserialize)]
                struct Typed {
                    #[serde(rename = "type")]
                    kind: String,
                }
                typed = parse::<Typed>("untyped", data)?.kind;
                typed.as_str()
            }
        };
        match name {
            "message_start" => {
                let v: StartView = parse(name, data)?;
                self.id = v.message.id;
                self.model = v.message.model;
                self.usage.update(&v.message.usage);
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
                Ok(EventKind::Answer)
            }
            "content_block_start" => {
                let v: BlockStartView = parse(name, data)?;
                let block = &v.content_block;
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => {
                            out.push(self.chunk(json!({"content": t}), None));
                            Ok(EventKind::Answer)
                        }
                        _ => Ok(EventKind::Ignored),
                    },
                    Some("tool_use") => {
                        let index = self.tools.len();
                        self.tools.push((v.index, index));
                        let call = json!({
                            "index": index,
                            "id": block.get("id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": {
                                "name": block.get("name").cloned().unwrap_or(Value::Null),
                                "arguments": "",
                            },
                        });
                        out.push(self.chunk(json!({"tool_calls": [call]}), None));
                        Ok(EventKind::Answer)
                    }
                    _ => Ok(EventKind::Ignored),
                }
            }
            "content_block_delta" => {
                let v: BlockDeltaView = parse(name, data)?;
                let d = &v.delta;
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => match d.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => {
                            out.push(self.chunk(json!({"content": t}), None));
                            Ok(EventKind::Answer)
                        }
                        _ => Ok(EventKind::Ignored),
                    },
                    Some("input_json_delta") => {
                        let part = d.get("partial_json").and_then(Value::as_str).unwrap_or("");
                        match self.tool_index(v.index) {
                            Some(index) if !part.is_empty() => {
                                let call = json!({"index": index, "function": {"arguments": part}});
                                out.push(self.chunk(json!({"tool_calls": [call]}), None));
                                Ok(EventKind::Answer)
                            }
                            _ => Ok(EventKind::Ignored),
                        }
                    }
                    // thinking_delta, signature_delta, citations_delta.
                    _ => Ok(EventKind::Ignored),
                }
            }
            "message_delta" => {
                let v: MessageDeltaView = parse(name, data)?;
                if let Some(u) = &v.usage {
                    self.usage.update(u);
                }
                self.usage_seen = true;
                match v.delta.stop_reason.as_deref() {
                    Some(stop) => {
                        self.finished = true;
                        out.push(self.chunk(json!({}), Some(finish_reason(stop))));
                        Ok(EventKind::Answer)
                    }
                    None => Ok(EventKind::Ignored),
                }
            }
            "message_stop" => {
                self.usage_seen = true;
                if self.client_usage {
                    let usage = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": openai_usage(&self.usage.total()),
                    });
                    out.push(usage.to_string());
                }
                out.push("[DONE]".into());
                Ok(EventKind::Done)
            }
            "error" => {
                #[derive(Deserialize)]
                struct ErrorView {
                    error: ErrorInner,
                }
                #[derive(Deserialize)]
                struct ErrorInner {
                    #[serde(rename = "type", default)]
                    kind: String,
                    #[serde(default)]
                    message: String,
                }
                match serde_json::from_str::<ErrorView>(data) {
                    Ok(e) => Err(format!("anthropic: {}: {}", e.error.kind, e.error.message)),
                    Err(_) => Err(format!(
                        "anthropic: error event: {}",
                        data.chars().take(300).collect::<String>()
                    )),
                }
            }
            // ping, content_block_stop, and event types added later.
            _ => Ok(EventKind::Ignored),
        }
    }

    fn usage(&self) -> Option<TokenUsage> {
        self.usage_seen.then(|| self.usage.total())
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> AnthropicWire {
        AnthropicWire::new(DEFAULT_MAX_TOKENS)
    }

    fn opts(stream: bool) -> EncodeOptions {
        EncodeOptions {
            stream,
            stream_usage: true,
            default_max_tokens: 16,
        }
    }

    fn encode(body: Value) -> Result<Value, EncodeError> {
        wire()
            .encode(Endpoint::Chat, &body, &opts(false))
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn headers_carry_the_key_and_version() {
        let h = wire().headers(Some(&Secret::new("sk-ant-1".into())));
        assert_eq!(h["x-api-key"], "sk-ant-1");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], ANTHROPIC_VERSION);
        assert!(!h.contains_key("authorization"));
        assert_eq!(wire().path(Endpoint::Chat), Some("/messages"));
        assert_eq!(wire().path(Endpoint::Embeddings), None);
    }

    #[test]
    fn request_with_system_tools_results_and_images() {
        let body = json!({
            "model": "claude-x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in these, and the weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "sun"}]},
                {"role": "user", "content": "Thanks"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "clock"}},
            ],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "temperature": 1.7,
            "top_p": 0.9,
            "stop": "END",
            "user": "u-42",
            "max_completion_tokens": 100,
            "max_tokens": 5,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "seed": 7,
            "stream_options": {"include_usage": true},
        });
        let out = encode(body).unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "Be brief.\n\nUse tools.");
        assert_eq!(out["max_tokens"], 100);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["top_p"], 0.9);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "u-42"}));
        for dropped in [
            "frequency_penalty",
            "presence_penalty",
            "seed",
            "stream_options",
            "stream",
            "stop",
            "user",
            "parallel_tool_calls",
        ] {
            assert!(out.get(dropped).is_none(), "{dropped} was sent");
        }
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["role"], "user");
        assert_eq!(
            msgs[0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "iVBOR"})
        );
        assert_eq!(
            msgs[0]["content"][2]["source"],
            json!({"type": "url", "url": "https://example.com/a.jpg"})
        );
        assert_eq!(msgs[1]["role"], "assistant");
        assert_eq!(
            msgs[1]["content"][0],
            json!({"type": "text", "text": "Checking."})
        );
        assert_eq!(
            msgs[1]["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}})
        );
        assert_eq!(msgs[1]["content"][2]["id"], "call_2");
        // Both tool results and the following user text in one user turn, results first.
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(
            msgs[2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "call_1", "content": "rain"})
        );
        assert_eq!(msgs[2]["content"][1]["tool_use_id"], "call_2");
        assert_eq!(
            msgs[2]["content"][1]["content"],
            json!([{"type": "text", "text": "sun"}])
        );
        assert_eq!(
            msgs[2]["content"][2],
            json!({"type": "text", "text": "Thanks"})
        );
        assert_eq!(
            out["tools"][0],
            json!({"name": "weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}})
        );
        assert_eq!(
            out["tools"][1],
            json!({"name": "clock", "input_schema": {"type": "object", "properties": {}}})
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn defaults_choices_and_streaming() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]});
        let out: Value = serde_json::from_slice(
            &AnthropicWire::new(77)
                .encode(Endpoint::Chat, &base, &opts(true))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(out["max_tokens"], 77);
        assert_eq!(out["stream"], true);
        assert_eq!(out["tool_choice"], json!({"type": "auto"}));
        assert_eq!(
            out["messages"].as_array().unwrap().len(),
            1,
            "same-role messages merge"
        );
        let mut named = base.clone();
        named["tool_choice"] = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(
            encode(named).unwrap()["tool_choice"],
            json!({"type": "tool", "name": "f"})
        );
        let mut none = base.clone();
        none["tool_choice"] = json!("none");
        none["stop"] = json!(["a", "b"]);
        let out = encode(none).unwrap();
        assert_eq!(out["tool_choice"], json!({"type": "none"}));
        assert_eq!(out["stop_sequences"], json!(["a", "b"]));
    }

    #[test]
    fn encode_errors_name_the_parameter() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"model": "m", "messages": user, "n": 2}), "n"),
            (
                json!({"model": "m", "messages": user, "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"model": "m", "messages": user, "response_format": {"type": "json_schema", "json_schema": {}}}),
                "response_format",
            ),
            (
                json!({"model": "m", "messages": user, "logprobs": true}),
                "logprobs",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
                "messages[0].tool_calls",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"model": "m", "messages": user, "tool_choice": "required"}),
                "tool_choice",
            ),
        ];
        for (body, param) in cases {
            let err = encode(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
        }
        assert!(
            encode(json!({"model": "m", "messages": user, "response_format": {"type": "text"}}))
                .is_ok()
        );
        let err = wire()
            .encode(
                Endpoint::Embeddings,
                &json!({"model": "m", "input": "x"}),
                &opts(false),
            )
            .unwrap_err();
        assert!(err.message.contains("embeddings"));
    }

    #[test]
    fn answer_with_text_tool_use_and_cache_usage() {
        let raw = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5},
        });
        let Answer {
            body: bytes,
            usage,
            text,
        } = wire()
            .decode_answer(Endpoint::Chat, Bytes::from(raw.to_string()))
            .unwrap();
        assert_eq!(text, r#"Let me check.weather{"city":"Oslo"}"#);
        assert_eq!(
            usage,
            Some(TokenUsage {
                prompt: 115,
                completion: 20,
                cached_prompt: 100,
                cache_write_prompt: 5,
            })
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["id"], "msg_01");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "claude-x");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Let me check.");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_1");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Oslo"}));
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 115, "completion_tokens": 20, "total_tokens": 135, "prompt_tokens_details": {"cached_tokens": 100}})
        );
        let typed: flotilla_api::openai::ChatCompletion = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(typed.usage.unwrap().prompt_tokens, 115);

        let plain = json!({"id": "msg_02", "type": "message", "role": "assistant", "model": "m",
                           "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                           "stop_reason": "max_tokens", "usage": {"input_tokens": 1, "output_tokens": 2}});
        let bytes = wire()
            .decode_answer(Endpoint::Chat, Bytes::from(plain.to_string()))
            .unwrap()
            .body;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(
            wire()
                .decode_answer(Endpoint::Chat, Bytes::from_static(b"nope"))
                .is_err()
        );
    }

    #[test]
    fn finish_reasons_map() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            assert_eq!(finish_reason(stop), finish);
        }
    }

    fn ev(name: &str, data: Value) -> SseEvent {
        SseEvent {
            event: Some(name.into()),
            data: data.to_string(),
        }
    }

    #[test]
    fn stream_with_text_and_a_tool_call_in_two_parts() {
        let mut d = wire().stream_decoder(Endpoint::Chat, true);
        assert!(!d.passthrough());
        let mut out = Vec::new();
        let events = [
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_s", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "stop_reason": null, "usage": {"input_tokens": 7, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 4, "output_tokens": 1}}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev("ping", json!({"type": "ping"})),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi "}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "there"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "thinking", "thinking": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": "secret"}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 2}),
            ),
        ];
        let kinds: Vec<EventKind> = events
            .iter()
            .map(|e| d.event(e, &mut out).unwrap())
            .collect();
        use EventKind::{Answer as A, Ignored as I};
        assert_eq!(kinds, [A, I, I, A, A, I, I, I, A, A, A, I]);
        assert_eq!(d.usage(), None);
        assert!(!d.finished());
        // Without an `event:` line the JSON type is read.
        let delta = SseEvent { event: None, data: json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 12}}).to_string() };
        assert_eq!(d.event(&delta, &mut out), Ok(EventKind::Answer));
        assert!(d.finished());
        assert_eq!(
            d.usage(),
            Some(TokenUsage {
                prompt: 14,
                completion: 12,
                cached_prompt: 3,
                cache_write_prompt: 4,
            })
        );
        assert_eq!(
            d.event(
                &ev("message_stop", json!({"type": "message_stop"})),
                &mut out
            ),
            Ok(EventKind::Done)
        );

        assert_eq!(out.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = out[..out.len() - 1]
            .iter()
            .map(|c| serde_json::from_str(c).unwrap())
            .collect();
        assert!(chunks.iter().all(|c| c["id"] == "msg_s"
            && c["object"] == "chat.completion.chunk"
            && c["model"] == "claude-x"));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hi there");
        assert_eq!(
            chunks[3]["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "weather", "arguments": ""}})
        );
        let args: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"city": "Oslo"})
        );
        assert_eq!(chunks[6]["choices"][0]["finish_reason"], "tool_calls");
        let usage = &chunks[7];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 14, "completion_tokens": 12, "total_tokens": 26, "prompt_tokens_details": {"cached_tokens": 3}})
        );
        assert_eq!(chunks.len(), 8);
        for c in &out[..out.len() - 1] {
            serde_json::from_str::<flotilla_api::openai::ChatCompletionChunk>(c).unwrap();
        }
    }

    #[test]
    fn cache_writes_reported_in_message_delta_are_read() {
        let mut d = wire().stream_decoder(Endpoint::Chat, false);
        let mut out = Vec::new();
        d.event(&ev("message_start", json!({"type": "message_start", "message": {"id": "m", "model": "x", "usage": {"input_tokens": 2, "output_tokens": 1}}})), &mut out).unwrap();
        d.event(&ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3, "cache_creation_input_tokens": 6}})), &mut out).unwrap();
        assert_eq!(
            d.usage(),
            Some(TokenUsage {
                prompt: 8,
                completion: 3,
                cached_prompt: 0,
                cache_write_prompt: 6,
            })
        );
    }

    #[test]
    fn anthropic_prices_cache_writes_at_one_and_a_quarter_input_unless_set() {
        use crate::{Price, ProviderKind};
        let listed = Price {
            input_usd_per_mtok: Some(3.0),
            output_usd_per_mtok: Some(15.0),
            cached_input_usd_per_mtok: Some(0.3),
            cache_write_usd_per_mtok: None,
        };
        let p = ProviderKind::Anthropic.complete_price(listed);
        assert_eq!(p.cache_write_usd_per_mtok, Some(3.75));
        // The usage of `answer_with_text_tool_use_and_cache_usage`'s shape: 10 uncached,
        // 100 read, 5 written, 20 out.
        let u = TokenUsage {
            prompt: 115,
            completion: 20,
            cached_prompt: 100,
            cache_write_prompt: 5,
        };
        let want = (10.0 * 3.0 + 100.0 * 0.3 + 5.0 * 3.75 + 20.0 * 15.0) / 1e6;
        assert!((p.cost(&u).unwrap() - want).abs() < 1e-12);
        // A price set stays; other APIs leave it unset (the input rate).
        let set = Price {
            cache_write_usd_per_mtok: Some(6.0),
            ..listed
        };
        assert_eq!(ProviderKind::Anthropic.complete_price(set), set);
        assert_eq!(ProviderKind::Openai.complete_price(listed), listed);
        let plain = (15.0 * 3.0 + 100.0 * 0.3 + 20.0 * 15.0) / 1e6;
        assert!((listed.cost(&u).unwrap() - plain).abs() < 1e-12);
    }

    #[test]
    fn stream_without_client_usage_ends_with_done_only() {
        let mut d = wire().stream_decoder(Endpoint::Chat, false);
        let mut out = Vec::new();
        d.event(&ev("message_start", json!({"type": "message_start", "message": {"id": "m", "model": "x", "usage": {"input_tokens": 1, "output_tokens": 1}}})), &mut out).unwrap();
        out.clear();
        assert_eq!(
            d.event(
                &ev("message_stop", json!({"type": "message_stop"})),
                &mut out
            ),
            Ok(EventKind::Done)
        );
        assert_eq!(out, ["[DONE]"]);
        assert_eq!(d.usage().map(|u| u.prompt), Some(1));
    }

    #[test]
    fn error_event_breaks_the_stream() {
        let mut d = wire().stream_decoder(Endpoint::Chat, false);
        let mut out = Vec::new();
        let err = d
            .event(&ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})), &mut out)
            .unwrap_err();
        assert_eq!(err, "anthropic: overloaded_error: Overloaded");
        let untyped = SseEvent {
            event: None,
            data: r#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#.into(),
        };
        assert_eq!(
            d.event(&untyped, &mut out).unwrap_err(),
            "anthropic: api_error: boom"
        );
        assert!(out.is_empty());
        assert!(
            d.event(&ev("message_start", json!("junk")), &mut out)
                .is_err()
        );
    }

    #[test]
    fn error_bodies_read_both_shapes() {
        let b = wire()
            .error_body(r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"},"request_id":"req_1"}"#)
            .unwrap();
        assert_eq!(b.error.message, "max_tokens: Field required");
        assert_eq!(b.error.r#type, "invalid_request_error");
        assert_eq!(b.error.code, None);
        let b = wire()
            .error_body(
                r#"{"error":{"message":"nope","type":"rate_limit_error","param":null,"code":"x"}}"#,
            )
            .unwrap();
        assert_eq!(
            (b.error.message.as_str(), b.error.code.as_deref()),
            ("nope", Some("x"))
        );
        assert!(wire().error_body("<html>").is_none());
    }
}
