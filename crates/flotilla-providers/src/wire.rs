//! How a provider's API is spoken: the one trait every provider implements. A provider
//! takes the client's OpenAI request and encodes it for its API, decodes answers back into
//! OpenAI objects, and reads token usage out of them. OpenAI-compatible providers (OpenAI,
//! Together, Fireworks, Groq, DeepInfra, OpenRouter, vLLM, Ollama, Flotilla agents) pass
//! bodies through untouched; Anthropic's Messages API is translated both ways.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use flotilla_api::error::ErrorBody;
use flotilla_api::sse::SseEvent;
use http::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use crate::Secret;
use crate::usage::{OpenAiUsage, TokenUsage};

/// The OpenAI endpoints a request can arrive on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The OpenAI path under a `/v1` base URL.
    pub fn openai_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// What the gateway wants from an upstream beyond the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub stream: bool,
    /// Ask for token usage in the stream's final chunk (the client may not have).
    pub stream_usage: bool,
    /// Completion length for APIs that require one when the request sets none.
    pub default_max_tokens: u64,
}

/// A request the provider cannot take as it is: the client's to fix (400 with `param`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    pub param: Option<String>,
    pub message: String,
}

impl EncodeError {
    pub fn new(param: Option<&str>, message: impl Into<String>) -> Self {
        EncodeError {
            param: param.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// What one upstream stream event turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Part of the answer (content, tool call, role or finish chunk).
    Answer,
    /// A chunk that carries only usage (no choices): relayed only to clients that asked.
    UsageOnly,
    /// The end of the stream (`[DONE]`, `message_stop`).
    Done,
    /// Nothing the client sees (keep-alives, pings).
    Ignored,
}

/// Reads one streamed answer, event by event.
pub trait StreamDecoder: Send {
    /// True when the upstream's events are OpenAI chunks already and its bytes are
    /// relayed as they came; a translating decoder pushes what to send into `out` instead.
    fn passthrough(&self) -> bool;
    /// One complete upstream event. A translating decoder pushes the OpenAI `data:`
    /// payloads to send (JSON chunks, `[DONE]`) into `out`. An error is a broken stream
    /// (the upstream sent an error event or something unreadable).
    fn event(&mut self, ev: &SseEvent, out: &mut Vec<String>) -> Result<EventKind, String>;
    /// The usage the upstream reported, once it did.
    fn usage(&self) -> Option<TokenUsage>;
    /// A finish reason was seen: the answer is complete even if the end marker is not.
    fn finished(&self) -> bool;
}

/// How one provider's API is spoken.
pub trait Wire: Send + Sync + fmt::Debug {
    /// `openai` or `anthropic`, as the config names it.
    fn name(&self) -> &'static str;
    /// The path under the base URL for an endpoint; None when the API has none.
    fn path(&self, ep: Endpoint) -> Option<&'static str>;
    /// The headers every request carries: authentication and versioning.
    fn headers(&self, key: Option<&Secret>) -> HeaderMap;
    /// The client's request (with `model` already set to the provider's id) as this API's
    /// body.
    fn encode(
        &self,
        ep: Endpoint,
        body: &Value,
        opts: &EncodeOptions,
    ) -> Result<Bytes, EncodeError>;
    /// A whole non-streaming answer as the OpenAI object the client expects, with its usage
    /// and its text, read in one pass.
    fn decode_answer(&self, ep: Endpoint, bytes: Bytes) -> Result<Answer, String>;
    /// A decoder for one streamed answer; `client_usage` says whether the client asked for
    /// the usage chunk.
    fn stream_decoder(&self, ep: Endpoint, client_usage: bool) -> Box<dyn StreamDecoder>;
    /// An error answer's body as OpenAI's error object, when it is readable.
    fn error_body(&self, text: &str) -> Option<ErrorBody>;
}

/// The OpenAI-compatible API: bodies pass through; usage is read, not rewritten.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiWire;

/// A whole answer, as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The OpenAI object (the upstream's bytes as they came, for OpenAI-compatible APIs).
    pub body: Bytes,
    /// What the upstream reported.
    pub usage: Option<TokenUsage>,
    /// The answer's text, for our own token count: chat content and tool-call names and
    /// arguments, completion text.
    pub text: String,
}

/// The parts of an OpenAI answer or chunk that are read; the rest passes untouched.
#[derive(Deserialize)]
struct AnswerView<'a> {
    #[serde(default, borrow)]
    choices: Vec<TextChoice<'a>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct TextChoice<'a> {
    #[serde(default, borrow)]
    message: Option<TextMessage<'a>>,
    #[serde(default, borrow)]
    delta: Option<TextMessage<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TextMessage<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<TextToolCall<'a>>>,
}

#[derive(Deserialize)]
struct TextToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<TextFunction<'a>>,
}

#[derive(Deserialize)]
struct TextFunction<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

impl AnswerView<'_> {
    fn append_text(&self, out: &mut String) {
        for c in &self.choices {
            if let Some(t) = &c.text {
                out.push_str(t);
            }
            for m in [&c.message, &c.delta].into_iter().flatten() {
                if let Some(t) = &m.content {
                    out.push_str(t);
                }
                for call in m.tool_calls.iter().flatten() {
                    if let Some(f) = &call.function {
                        out.push_str(f.name.as_deref().unwrap_or(""));
                        out.push_str(f.arguments.as_deref().unwrap_or(""));
                    }
                }
            }
        }
    }
}

/// Appends the text of one OpenAI answer or chunk (JSON) to `out`; anything unreadable
/// adds nothing.
pub fn append_answer_text(json: &[u8], out: &mut String) {
    if let Ok(v) = serde_json::from_slice::<AnswerView>(json) {
        v.append_text(out);
    }
}

impl Wire for OpenAiWire {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn path(&self, ep: Endpoint) -> Option<&'static str> {
        Some(ep.openai_path())
    }

    fn headers(&self, key: Option<&Secret>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(key) = key
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            v.set_sensitive(true);
            h.insert(http::header::AUTHORIZATION, v);
        }
        h
    }

    fn encode(
        &self,
        ep: Endpoint,
        body: &Value,
        opts: &EncodeOptions,
    ) -> Result<Bytes, EncodeError> {
        let asks = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if opts.stream && opts.stream_usage && !asks && ep != Endpoint::Embeddings {
            let mut body = body.clone();
            if let Some(o) = body.as_object_mut() {
                let so = o
                    .entry("stream_options")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(so) = so.as_object_mut() {
                    so.insert("include_usage".into(), Value::Bool(true));
                }
            }
            return serde_json::to_vec(&body)
                .map(Bytes::from)
                .map_err(|e| EncodeError::new(None, e.to_string()));
        }
        serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|e| EncodeError::new(None, e.to_string()))
    }

    fn decode_answer(&self, _ep: Endpoint, bytes: Bytes) -> Result<Answer, String> {
        let (usage, text) = {
            let view: AnswerView =
                serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
            let mut text = String::new();
            view.append_text(&mut text);
            (view.usage.map(TokenUsage::from), text)
        };
        Ok(Answer {
            body: bytes,
            usage,
            text,
        })
    }

    fn stream_decoder(&self, _ep: Endpoint, _client_usage: bool) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiStream::default())
    }

    fn error_body(&self, text: &str) -> Option<ErrorBody> {
        serde_json::from_str(text).ok()
    }
}

/// Watches an OpenAI stream go by: its usage chunk and finish reason.
#[derive(Debug, Default)]
pub struct OpenAiStream {
    usage: Option<TokenUsage>,
    finished: bool,
}

#[derive(Deserialize)]
struct ChunkView {
    #[serde(default)]
    choices: Vec<ChoiceView>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct ChoiceView {
    #[serde(default)]
    finish_reason: Option<serde::de::IgnoredAny>,
}

fn not_json(e: &serde_json::Error) -> String {
    format!("the upstream sent a stream event that is not JSON ({e})")
}

impl StreamDecoder for OpenAiStream {
    fn passthrough(&self) -> bool {
        true
    }

    fn event(&mut self, ev: &SseEvent, _out: &mut Vec<String>) -> Result<EventKind, String> {
        if ev.is_done() {
            return Ok(EventKind::Done);
        }
        let data = ev.data.as_str();
        // Most chunks carry neither a finish reason nor usage: skip parsing those.
        let has_usage = data.contains("\"usage\"");
        let has_finish =
            data.contains("\"finish_reason\"") && !data.contains("\"finish_reason\":null");
        if !has_usage && !has_finish {
            if data.trim().is_empty() {
                return Ok(EventKind::Ignored);
            }
            // Checked without building anything: a chunk a client's SDK could not parse
            // breaks the stream here, instead of in the client.
            return match serde_json::from_str::<serde::de::IgnoredAny>(data) {
                Ok(_) => Ok(EventKind::Answer),
                Err(e) => Err(not_json(&e)),
            };
        }
        // An upstream's error object mid-stream is JSON: the relay passes it on, and
        // whether the stream completes decides the rest.
        let chunk = serde_json::from_str::<ChunkView>(data).map_err(|e| not_json(&e))?;
        if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
            self.finished = true;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
            if chunk.choices.is_empty() {
                return Ok(EventKind::UsageOnly);
            }
        }
        Ok(EventKind::Answer)
    }

    fn usage(&self) -> Option<TokenUsage> {
        self.usage
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    #[test]
    fn stream_usage_is_asked_for_without_touching_the_rest() {
        let body = serde_json::json!({"model": "m", "messages": [], "stream": true, "tools": [{"type": "function"}]});
        let opts = EncodeOptions {
            stream: true,
            stream_usage: true,
            default_max_tokens: 16,
        };
        let out: Value =
            serde_json::from_slice(&OpenAiWire.encode(Endpoint::Chat, &body, &opts).unwrap())
                .unwrap();
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["tools"], body["tools"]);
        let plain = EncodeOptions {
            stream_usage: false,
            ..opts
        };
        let out: Value =
            serde_json::from_slice(&OpenAiWire.encode(Endpoint::Chat, &body, &plain).unwrap())
                .unwrap();
        assert_eq!(out, body);
    }

    #[test]
    fn stream_decoder_finds_finish_and_usage() {
        let mut d = OpenAiWire.stream_decoder(Endpoint::Chat, false);
        let mut out = Vec::new();
        assert_eq!(
            d.event(
                &ev(r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#),
                &mut out
            ),
            Ok(EventKind::Answer)
        );
        assert!(!d.finished());
        d.event(
            &ev(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#),
            &mut out,
        )
        .unwrap();
        assert!(d.finished());
        let kind = d
            .event(
                &ev(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":4}}}"#),
                &mut out,
            )
            .unwrap();
        assert_eq!(kind, EventKind::UsageOnly);
        assert_eq!(
            d.usage(),
            Some(TokenUsage {
                prompt: 7,
                completion: 3,
                cached_prompt: 4,
                cache_write_prompt: 0,
            })
        );
        assert_eq!(d.event(&ev("[DONE]"), &mut out), Ok(EventKind::Done));
        assert!(out.is_empty());
    }

    #[test]
    fn a_chunk_that_is_not_json_breaks_the_stream_and_an_error_object_does_not() {
        let mut d = OpenAiWire.stream_decoder(Endpoint::Chat, false);
        let mut out = Vec::new();
        for bad in [
            r#"{"choices":[{"delta"#,
            "not json at all",
            r#"{"choices":[{"finish_reason":"stop""#,
        ] {
            let err = d.event(&ev(bad), &mut out).unwrap_err();
            assert!(err.contains("not JSON"), "{err}");
        }
        let upstream_error = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
        assert_eq!(
            d.event(&ev(upstream_error), &mut out),
            Ok(EventKind::Answer)
        );
        assert_eq!(d.event(&ev("  "), &mut out), Ok(EventKind::Ignored));
    }

    #[test]
    fn answer_usage_is_read_and_bytes_kept() {
        let raw = Bytes::from_static(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}"#);
        let a = OpenAiWire
            .decode_answer(Endpoint::Chat, raw.clone())
            .unwrap();
        assert_eq!(a.body, raw);
        assert_eq!(a.usage.unwrap().completion, 5);
        assert!(
            OpenAiWire
                .decode_answer(Endpoint::Chat, Bytes::from_static(b"nope"))
                .is_err()
        );
    }
}
