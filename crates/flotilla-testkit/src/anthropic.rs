//! A mock of Anthropic's Messages API (`POST /v1/messages`): the real wire format, streams
//! with their exact event sequence, and the request checks the real API makes, so a
//! translation bug shows as the 400 Anthropic would answer.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Token counts a behaviour reports: `(input, output, cache_read, cache_creation)`, where
/// `input` excludes the cached tokens, as Anthropic counts them.
pub type MockUsage = (u64, u64, u64, u64);

/// What the mock does with one valid request.
#[derive(Debug, Clone)]
pub enum AnthropicBehavior {
    /// A text answer (`stop_reason: end_turn`).
    Text { text: String, usage: MockUsage },
    /// A tool call, after some text when `text_before` is set (`stop_reason: tool_use`).
    ToolUse {
        text_before: Option<String>,
        id: String,
        name: String,
        input: Value,
        usage: MockUsage,
    },
    /// This status with Anthropic's error body; `retry-after` when set.
    Status {
        code: u16,
        error_type: String,
        message: String,
        retry_after_s: Option<u64>,
    },
    /// A text answer whose stream breaks off after `after_events` events with an
    /// `overloaded_error` event; a non-streaming request gets a 529 instead.
    StreamError { after_events: usize },
}

impl AnthropicBehavior {
    pub fn text(text: &str) -> Self {
        AnthropicBehavior::Text {
            text: text.to_owned(),
            usage: (10, 5, 0, 0),
        }
    }

    pub fn tool_use(name: &str, input: Value) -> Self {
        AnthropicBehavior::ToolUse {
            text_before: None,
            id: "toolu_mock01".into(),
            name: name.to_owned(),
            input,
            usage: (10, 5, 0, 0),
        }
    }

    /// 429 `rate_limit_error` with `retry-after`.
    pub fn rate_limited(retry_after_s: u64) -> Self {
        AnthropicBehavior::Status {
            code: 429,
            error_type: "rate_limit_error".into(),
            message: "Number of request tokens has exceeded your per-minute rate limit".into(),
            retry_after_s: Some(retry_after_s),
        }
    }

    /// 529 `overloaded_error`.
    pub fn overloaded() -> Self {
        AnthropicBehavior::Status {
            code: 529,
            error_type: "overloaded_error".into(),
            message: "Overloaded".into(),
            retry_after_s: None,
        }
    }
}

/// One request as the mock received it, valid or not.
#[derive(Debug, Clone)]
pub struct AnthropicRecorded {
    pub path: String,
    pub api_key: Option<String>,
    pub version: Option<String>,
    /// Anthropic takes no bearer token; a client that sends one has a bug.
    pub authorization: Option<String>,
    pub body: Value,
}

struct MockState {
    script: Mutex<VecDeque<AnthropicBehavior>>,
    default: Mutex<AnthropicBehavior>,
    requests: Mutex<Vec<AnthropicRecorded>>,
}

/// An Anthropic Messages API server on `127.0.0.1:0`. Stops when dropped.
pub struct MockAnthropic {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockAnthropic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MockAnthropic {
    /// Starts a mock that behaves as `default` unless a scripted behaviour is queued.
    pub async fn start(default: AnthropicBehavior) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/messages", post(handle))
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockAnthropic { addr, state, task })
    }

    /// Base URL with the `/v1` segment, as a provider's `base_url` is configured.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a behaviour for the next valid request (before the default).
    pub fn push(&self, b: AnthropicBehavior) {
        lock(&self.state.script).push_back(b);
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<AnthropicRecorded> {
        lock(&self.state.requests).clone()
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_mock"});
    (status, axum::Json(body)).into_response()
}

fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

async fn handle(
    State(state): State<Arc<MockState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let parsed = serde_json::from_slice::<Value>(&body);
    lock(&state.requests).push(AnthropicRecorded {
        path: uri.path().to_owned(),
        api_key: header("x-api-key"),
        version: header("anthropic-version"),
        authorization: header("authorization"),
        body: parsed.as_ref().cloned().unwrap_or(Value::Null),
    });
    if header("x-api-key").is_none() {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        );
    }
    if header("anthropic-version").is_none() {
        return invalid("anthropic-version: header is required");
    }
    let Ok(body) = parsed else {
        return invalid("There was an error parsing the body of your request");
    };
    if let Err(message) = validate(&body) {
        return invalid(&message);
    }
    let behavior = lock(&state.script)
        .pop_front()
        .unwrap_or_else(|| lock(&state.default).clone());
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-mock");
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (blocks, stop, usage, cut) = match behavior {
        AnthropicBehavior::Status {
            code,
            error_type,
            message,
            retry_after_s,
        } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = error(status, &error_type, &message);
            if let Some(s) = retry_after_s
                && let Ok(v) = s.to_string().parse()
            {
                resp.headers_mut().insert("retry-after", v);
            }
            return resp;
        }
        AnthropicBehavior::StreamError { .. } if !stream => {
            let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(status, "overloaded_error", "Overloaded");
        }
        AnthropicBehavior::StreamError { after_events } => (
            vec![json!({"type": "text", "text": "This answer is cut short by an overload."})],
            "end_turn",
            (10, 9, 0, 0),
            Some(after_events),
        ),
        AnthropicBehavior::Text { text, usage } => (
            vec![json!({"type": "text", "text": text})],
            "end_turn",
            usage,
            None,
        ),
        AnthropicBehavior::ToolUse {
            text_before,
            id,
            name,
            input,
            usage,
        } => {
            let mut blocks: Vec<Value> = text_before
                .map(|t| json!({"type": "text", "text": t}))
                .into_iter()
                .collect();
            blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
            (blocks, "tool_use", usage, None)
        }
    };
    if stream {
        let mut events = stream_events(model, &blocks, stop, usage);
        if let Some(n) = cut {
            events.truncate(n);
            events.push(sse_event(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
        }
        return sse(events);
    }
    let (input, output, read, created) = usage;
    axum::Json(json!({
        "id": "msg_mock01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output,
                  "cache_read_input_tokens": read, "cache_creation_input_tokens": created},
    }))
    .into_response()
}

/// The checks the real API makes that a translation from OpenAI can get wrong. Messages
/// follow Anthropic's own error texts.
fn validate(body: &Value) -> Result<(), String> {
    if body.get("model").and_then(Value::as_str).is_none() {
        return Err("model: Field required".into());
    }
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Err("max_tokens: Field required".into());
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return Err("temperature: range: 0..1".into());
    }
    for (i, tool) in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if tool.get("name").and_then(Value::as_str).is_none() {
            return Err(format!("tools.{i}.name: Field required"));
        }
        if !tool.get("input_schema").is_some_and(Value::is_object) {
            return Err(format!("tools.{i}.input_schema: Field required"));
        }
    }
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err("messages: Field required".into());
    };
    let mut pending: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "user" | "assistant" => {}
            "system" => {
                return Err(format!(
                    "messages.{i}.role: Unexpected role \"system\". The Messages API accepts a \
                     top-level `system` parameter, not \"system\" as an input message role."
                ));
            }
            other => return Err(format!("messages.{i}.role: Input tag '{other}' is invalid")),
        }
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if role != expected {
            return Err(if i == 0 {
                "messages: first message must use the \"user\" role".into()
            } else {
                "messages: roles must alternate between \"user\" and \"assistant\"".into()
            });
        }
        let blocks = match m.get("content") {
            Some(Value::String(s)) if !s.is_empty() => Vec::new(),
            Some(Value::Array(b)) if !b.is_empty() => b.clone(),
            _ => {
                return Err(format!(
                    "messages.{i}: all messages must have non-empty content"
                ));
            }
        };
        let results: Vec<&str> = blocks
            .iter()
            .filter(|b| b["type"] == "tool_result")
            .filter_map(|b| b.get("tool_use_id").and_then(Value::as_str))
            .collect();
        if role == "user" {
            if let Some(id) = results.iter().find(|id| !pending.iter().any(|p| p == *id)) {
                return Err(format!(
                    "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` \
                     blocks: {id}. Each `tool_result` block must have a corresponding \
                     `tool_use` block in the previous message."
                ));
            }
            let first_other = blocks.iter().position(|b| b["type"] != "tool_result");
            let last_result = blocks.iter().rposition(|b| b["type"] == "tool_result");
            if let (Some(o), Some(r)) = (first_other, last_result)
                && o < r
            {
                return Err(format!(
                    "messages.{i}.content: `tool_result` blocks must come first in the content"
                ));
            }
        }
        let missing: Vec<&String> = pending
            .iter()
            .filter(|p| !results.contains(&p.as_str()))
            .collect();
        if !missing.is_empty() {
            let ids: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(format!(
                "messages.{i}: `tool_use` ids were found without `tool_result` blocks \
                 immediately after: {}. Each `tool_use` block must have a corresponding \
                 `tool_result` block in the next message.",
                ids.join(", ")
            ));
        }
        pending.clear();
        for (j, b) in blocks.iter().enumerate() {
            match b.get("type").and_then(Value::as_str) {
                Some("text")
                    if b.get("text")
                        .and_then(Value::as_str)
                        .is_some_and(|t| !t.is_empty()) => {}
                Some("text") => {
                    return Err(format!(
                        "messages.{i}.content.{j}.text: text content blocks must be non-empty"
                    ));
                }
                Some("tool_use") if role == "assistant" => {
                    if !b.get("input").is_some_and(Value::is_object) {
                        return Err(format!(
                            "messages.{i}.content.{j}.tool_use.input: Input should be a valid dictionary"
                        ));
                    }
                    let id = b.get("id").and_then(Value::as_str).unwrap_or("");
                    pending.push(id.to_owned());
                }
                Some("tool_result") if role == "user" => {}
                Some("image") if role == "user" => {
                    let source = b.pointer("/source/type").and_then(Value::as_str);
                    if !matches!(source, Some("base64" | "url")) {
                        return Err(format!(
                            "messages.{i}.content.{j}.image.source: Input tag is invalid"
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "messages.{i}.content.{j}: Input tag '{}' is not allowed in a {role} message",
                        other.unwrap_or("")
                    ));
                }
            }
        }
    }
    Ok(())
}

fn sse_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Splits `s` into `n` pieces at character boundaries (fewer when it is shorter).
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// The real event sequence of a streamed answer: message_start, then per block
/// content_block_start / deltas / content_block_stop (a ping after the first start),
/// message_delta and message_stop.
fn stream_events(model: &str, blocks: &[Value], stop: &str, usage: MockUsage) -> Vec<Bytes> {
    let (input, output, read, created) = usage;
    let mut out = vec![sse_event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": "msg_mock01", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": created,
                      "cache_read_input_tokens": read, "output_tokens": 1},
        }}),
    )];
    for (index, block) in blocks.iter().enumerate() {
        let (start, deltas) = if block["type"] == "tool_use" {
            let args = block["input"].to_string();
            let deltas: Vec<Value> = pieces(&args, 3)
                .into_iter()
                .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                .collect();
            (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                deltas,
            )
        } else {
            let text = block["text"].as_str().unwrap_or("");
            let words: Vec<&str> = text.split_inclusive(' ').collect();
            let parts: Vec<String> = if words.len() >= 2 {
                words.into_iter().map(str::to_owned).collect()
            } else {
                pieces(text, 2)
            };
            let deltas = parts
                .into_iter()
                .map(|t| json!({"type": "text_delta", "text": t}))
                .collect();
            (json!({"type": "text", "text": ""}), deltas)
        };
        out.push(sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        if index == 0 {
            out.push(sse_event("ping", &json!({"type": "ping"})));
        }
        for delta in deltas {
            out.push(sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        out.push(sse_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out.push(sse_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"output_tokens": output}}),
    ));
    out.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    out
}

fn sse(events: Vec<Bytes>) -> Response {
    // A short pause between events makes the stream arrive in several reads, as a real one does.
    let body = Body::from_stream(futures::stream::unfold(
        events.into_iter(),
        |mut it| async move {
            let next = it.next()?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            Some((Ok::<_, std::io::Error>(next), it))
        },
    ));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("request-id", "req_mock")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_catches_what_a_translation_gets_wrong() {
        let ok = json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}, {"type": "text", "text": "go"}]},
        ]});
        assert_eq!(validate(&ok), Ok(()));
        let bad = |edit: fn(&mut Value)| {
            let mut b = ok.clone();
            edit(&mut b);
            validate(&b).unwrap_err()
        };
        assert!(
            bad(|b| drop(b.as_object_mut().map(|o| o.remove("max_tokens")))).contains("max_tokens")
        );
        assert!(bad(|b| b["messages"][0]["role"] = json!("system")).contains("system"));
        assert!(bad(|b| b["messages"][1]["role"] = json!("user")).contains("alternate"));
        assert!(bad(|b| b["messages"][2]["content"] = json!("no results")).contains("t1"));
        assert!(
            bad(|b| b["messages"][2]["content"][0]["tool_use_id"] = json!("t9")).contains("t9")
        );
        assert!(bad(|b| b["messages"][2]["content"] = json!([{"type": "text", "text": "go"}, {"type": "tool_result", "tool_use_id": "t1"}])).contains("first"));
        assert!(bad(|b| b["messages"][0]["content"] = json!("")).contains("non-empty"));
    }

    #[test]
    fn streams_split_text_and_tool_input() {
        let blocks = [
            json!({"type": "text", "text": "Hi"}),
            json!({"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}),
        ];
        let events: Vec<String> = stream_events("m", &blocks, "tool_use", (1, 2, 3, 4))
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        let names: Vec<&str> = events
            .iter()
            .filter_map(|e| e.lines().next()?.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(events[0].contains("\"cache_read_input_tokens\":3"));
        assert!(events[11].contains("\"output_tokens\":2"));
    }
}
