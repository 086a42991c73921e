//! Relays an upstream's SSE body to the client as it arrives, and makes a broken stream
//! visible: if the upstream errors, stalls past the idle limit or ends without
//! `data: [DONE]`, the client gets an explicit error event, or, with `mid_stream =
//! "continue"`, the rest of the answer from the next target (the partial answer sent to it
//! as an assistant prefix), rewritten to read as one stream. Never a clean-looking end after
//! a truncated answer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use flotilla_api::sse::{SseDecoder, data_event};
use flotilla_providers::{
    Endpoint, EventKind, ProviderError, ProviderKind, StreamDecoder, UpstreamResponse,
};
use flotilla_scheduler::{InFlightGuard, ModelGroup, Outcome, Target};
use futures::stream::{BoxStream, StreamExt};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::AppState;
use crate::accounting::{AnswerText, Tally};
use crate::attempt::{self, Attempt, agent_busy, open_attempt};

/// Where a continuation may go and what it re-sends.
pub(crate) struct Continuation {
    pub targets: VecDeque<Target>,
    /// The client's request body (chat), before any continuation.
    pub body: Value,
    pub request_id: String,
    pub attempts_left: u32,
}

pub(crate) struct RelayCtx {
    pub state: AppState,
    pub ep: Endpoint,
    /// The attempt whose body this is.
    pub attempt: Attempt,
    pub guard: Option<InFlightGuard>,
    pub predicted_ttft: Duration,
    /// Some when broken streams continue elsewhere.
    pub cont: Option<Continuation>,
    /// The client asked for the usage chunk (we always ask the upstream for it).
    pub client_usage: bool,
    /// The request's account, settled and written when the stream ends.
    pub tally: Option<Tally>,
    pub group: ModelGroup,
}

struct Relay {
    ctx: RelayCtx,
    upstream: UpstreamBody,
    sse: SseDecoder,
    /// Reads the current upstream's events (and translates them when it is not OpenAI).
    dec: Box<dyn StreamDecoder>,
    saw_done: bool,
    saw_finish: bool,
    ended: bool,
    first_event: Option<Duration>,
    /// Answer events relayed from the current attempt.
    events: u64,
    /// Answer events the client has had, from every attempt.
    sent: u64,
    /// The answer so far (continue mode only).
    partial: String,
    /// Our count of the answer, for the ledger.
    text: AnswerText,
    /// The first upstream's chunk id, kept on continued chunks.
    stream_id: Option<String>,
    /// Events from a continuation are rewritten to read as the first stream's.
    rewrite: bool,
    /// A continuation's head is dropped until its first content (its role chunk).
    skip_role: bool,
    /// The current attempt's outcome is in the health book.
    recorded: bool,
    /// Bytes to send before the error of a stream that broke inside a read.
    pending: Option<Bytes>,
    /// The engine time an agent's usage chunk reported.
    busy: Option<Duration>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client went away mid-stream: not the target's fault, but its slot is free.
        if !self.recorded {
            let a = &self.ctx.attempt;
            self.ctx
                .state
                .inner
                .health
                .finish(&a.health_key, Outcome::Rejected, Instant::now());
            if let Some(t) = self.ctx.tally.as_mut() {
                t.attempt(
                    &a.label,
                    a.started,
                    "cut",
                    Some(200),
                    Some("the client went away".into()),
                );
            }
        }
        self.account("cancelled", Some("the client went away".into()));
    }
}

impl Relay {
    /// The error event, on a line of its own even when the upstream broke off mid-line.
    fn error_event(&self, message: &str) -> Bytes {
        let ev = error_event(&self.ctx.attempt.label, message);
        if self.sse.has_partial() {
            let mut b = b"\n\n".to_vec();
            b.extend_from_slice(&ev);
            Bytes::from(b)
        } else {
            ev
        }
    }

    /// Writes the request's account: what the client received, from the last target,
    /// with the usage the upstream reported or our count when it reported none.
    fn account(&mut self, status: &str, error: Option<String>) {
        let Some(t) = self.ctx.tally.take() else {
            return;
        };
        let a = &self.ctx.attempt;
        let ours = self.text.count(&self.ctx.state, self.ctx.ep);
        let ttft = self.first_event;
        t.answered_as(
            status,
            error,
            &a.target,
            ttft,
            self.dec.usage(),
            ours,
            a.pricing(&self.ctx.group).busy(self.busy),
        );
    }

    /// Records the current attempt's outcome in health, metrics and the ledger.
    fn finish_attempt(&mut self, ok: bool, error: Option<&str>) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let a = &self.ctx.attempt;
        let now = Instant::now();
        let outcome = if ok {
            let ttft = self.first_event.unwrap_or_else(|| a.started.elapsed());
            self.ctx.state.inner.metrics.observe_ttft(
                a.target.is_local(),
                self.ctx.predicted_ttft,
                ttft,
            );
            Outcome::Success {
                ttft: Some(ttft),
                latency: a.started.elapsed(),
                tokens: Some(
                    self.dec
                        .usage()
                        .map_or(self.events.saturating_sub(2), |u| u.completion),
                ),
            }
        } else {
            Outcome::Failure
        };
        if let Some(t) = self.ctx.tally.as_mut() {
            t.attempt(
                &a.label,
                a.started,
                if ok { "ok" } else { "cut" },
                Some(200),
                error.map(str::to_owned),
            );
        }
        self.ctx
            .state
            .inner
            .health
            .finish(&a.health_key, outcome, now);
    }

    /// Looks at each complete event: the decoder reads usage, finish and end (and
    /// translates a non-OpenAI stream); the answer's text is kept for our count. Returns
    /// the bytes to send: the upstream's own when nothing needs changing, or events
    /// rebuilt (translated, continued, or without the usage chunk the client did not ask
    /// for).
    fn inspect(&mut self, bytes: Bytes) -> Result<Bytes, String> {
        let mut events = Vec::new();
        // A line past the bound breaks the stream after the events before it.
        let overflow = self.sse.try_feed(&bytes, &mut events).err();
        if self.first_event.is_none() && !events.is_empty() {
            self.first_event = Some(self.ctx.attempt.started.elapsed());
        }
        let passthrough = self.dec.passthrough();
        let keep_text = self.ctx.cont.is_some();
        let mut rebuild = self.rewrite || !passthrough || keep_text;
        let mut payloads: Vec<String> = Vec::new();
        let mut broken = None;
        for e in events {
            let mut out = Vec::new();
            let kind = match self.dec.event(&e, &mut out) {
                Ok(k) => k,
                Err(msg) => {
                    // Only the events before this one go out: never the bad one.
                    broken = Some(msg);
                    rebuild = true;
                    break;
                }
            };
            if kind == EventKind::UsageOnly && self.ctx.attempt.target.is_local() {
                self.busy = agent_busy(&e.data);
            }
            if passthrough {
                match kind {
                    EventKind::Done => {
                        self.saw_done = true;
                        payloads.push(e.data);
                    }
                    EventKind::UsageOnly if !self.ctx.client_usage => rebuild = true,
                    EventKind::Ignored => {}
                    EventKind::Answer | EventKind::UsageOnly => {
                        self.events += 1;
                        self.text.add(e.data.as_bytes());
                        payloads.push(e.data);
                    }
                }
            } else {
                if kind == EventKind::Done {
                    self.saw_done = true;
                }
                for p in out {
                    if p.trim() != "[DONE]" {
                        self.events += 1;
                        self.text.add(p.as_bytes());
                    }
                    payloads.push(p);
                }
            }
        }
        if broken.is_none()
            && let Some(e) = overflow
        {
            // Rebuilt, so the start of the oversized line is not passed on.
            broken = Some(e.to_string());
            rebuild = true;
        }
        if self.dec.finished() {
            self.saw_finish = true;
        }
        let out = if rebuild {
            let mut buf = Vec::new();
            for p in payloads {
                if p.trim() == "[DONE]" {
                    buf.extend_from_slice(data_event("[DONE]").as_bytes());
                } else if let Some(v) = self.track(p) {
                    buf.extend_from_slice(data_event(&v).as_bytes());
                }
            }
            Bytes::from(buf)
        } else {
            bytes
        };
        match broken {
            // What came before the error still goes out, then the break is handled.
            Some(msg) => {
                self.pending = Some(out);
                Err(msg)
            }
            None => Ok(out),
        }
    }

    /// Notes the event's text and finish reason; returns what to send (None = drop it).
    fn track(&mut self, data: String) -> Option<String> {
        if !self.rewrite && self.ctx.cont.is_none() {
            return Some(data);
        }
        let Ok(mut v) = serde_json::from_str::<Value>(&data) else {
            return Some(data);
        };
        if self.stream_id.is_none() {
            self.stream_id = v.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        // `get`, not `pointer`: a pointer allocates for each of its tokens, on every chunk.
        let choice = v.get("choices").and_then(|c| c.get(0));
        let content = choice
            .and_then(|c| c.get("delta"))
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .unwrap_or("");
        self.partial.push_str(content);
        let has_finish = choice
            .and_then(|c| c.get("finish_reason"))
            .is_some_and(|f| !f.is_null());
        if has_finish {
            self.saw_finish = true;
        }
        if !self.rewrite {
            return Some(data);
        }
        if self.skip_role && content.is_empty() && !has_finish && v.get("usage").is_none() {
            return None;
        }
        self.skip_role = false;
        if let Some(id) = &self.stream_id {
            v["id"] = Value::String(id.clone());
        }
        Some(v.to_string())
    }

    /// The request for the next target: the partial answer as the assistant's last
    /// message, and only the tokens the client has not had yet as `max_tokens` (counted
    /// by the scheduler's tokenizer when it has one, else one a chunk). Also the same with
    /// `continue_final_message` for servers that take it, and the tokens left.
    fn continuation_bodies(&mut self, cfg: &crate::SchedulerConfig) -> Option<(Value, Value, u64)> {
        let cont = self.ctx.cont.as_ref()?;
        let mut body = cont.body.clone();
        if let Some(msgs) = body.get_mut("messages").and_then(Value::as_array_mut) {
            msgs.push(serde_json::json!({"role": "assistant", "content": self.partial}));
        }
        self.sent += self.events;
        let sent = if cfg.counter.is_tokenizer() {
            cfg.counter.count(&self.partial)
        } else {
            self.sent.saturating_sub(1)
        };
        let mut left = 0;
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = body.get(key).and_then(Value::as_u64) {
                left = n.saturating_sub(sent).max(1);
                body[key] = Value::from(left);
            }
        }
        let mut flagged = body.clone();
        flagged["continue_final_message"] = Value::Bool(true);
        flagged["add_generation_prompt"] = Value::Bool(false);
        Some((body, flagged, left))
    }

    /// After a break: the next target's stream, or None when there is none.
    async fn continue_elsewhere(&mut self, why: &str) -> bool {
        let state = self.ctx.state.clone();
        let cfg = state.inner.config();
        let Some((body, flagged, left)) = self.continuation_bodies(&cfg) else {
            return false;
        };
        let Some(cont) = self.ctx.cont.as_mut() else {
            return false;
        };
        while cont.attempts_left > 0 {
            let Some(target) = cont.targets.pop_front() else {
                break;
            };
            let now = Instant::now();
            // Agents, Anthropic (assistant prefill) and servers configured as continuing
            // go on writing the message; another OpenAI-style API would start a new
            // answer, stitched on.
            let (continues, flag) = match &target {
                Target::Local { .. } => (true, true),
                Target::Cloud { provider, .. } => match cfg.provider(provider) {
                    Some(p) if p.kind == ProviderKind::Anthropic => (true, false),
                    Some(p) => (p.continues_messages, p.continues_messages),
                    None => (false, false),
                },
            };
            let skip = if !continues {
                Some("cannot continue a partial answer".to_owned())
            } else {
                // The same admission as any attempt; the rest of the answer is what
                // counts against a provider's per-minute tokens.
                attempt::admit(&state, &target, Endpoint::Chat, left)
                    .await
                    .err()
            };
            if let Some(why) = skip {
                if let Some(t) = self.ctx.tally.as_mut() {
                    t.attempt(&target.label(), now, "skipped", None, Some(why));
                }
                continue;
            }
            cont.attempts_left -= 1;
            let body = if flag { &flagged } else { &body };
            match open_attempt(&state, Endpoint::Chat, &target, body, true, None).await {
                Ok((attempt, resp, guard)) => {
                    tracing::warn!(
                        request_id = %cont.request_id,
                        broken = %self.ctx.attempt.label,
                        upstream = %attempt.label,
                        partial_chars = self.partial.len(),
                        reason = why,
                        "stream broke mid-way; continuing on the next target"
                    );
                    self.dec = attempt
                        .upstream
                        .wire()
                        .stream_decoder(Endpoint::Chat, self.ctx.client_usage);
                    self.ctx.attempt = attempt;
                    self.ctx.guard = guard;
                    self.upstream = resp.into_body().into_data_stream().boxed();
                    self.sse = self.ctx.attempt.upstream.sse_decoder();
                    self.first_event = None;
                    self.events = 0;
                    self.rewrite = true;
                    self.skip_role = true;
                    self.recorded = false;
                    return true;
                }
                Err(e) => {
                    if let Some(t) = self.ctx.tally.as_mut() {
                        let (outcome, status) = attempt::ledger_outcome(&e);
                        t.attempt(&target.label(), now, outcome, status, Some(e.to_string()));
                    }
                    tracing::warn!(request_id = %cont.request_id, error = %e, "continuation attempt failed");
                }
            }
        }
        false
    }

    /// The stream broke (`why`): continue it elsewhere or say so.
    async fn broken(&mut self, why: String) -> Option<Bytes> {
        tracing::warn!(upstream = %self.ctx.attempt.label, reason = %why, "stream broke mid-way");
        let before = self.pending.take().unwrap_or_default();
        self.finish_attempt(false, Some(&why));
        let tail = if self.saw_finish {
            // The answer was complete; only the end marker is missing.
            self.ended = true;
            self.account("ok", None);
            Bytes::from(data_event("[DONE]"))
        } else if self.continue_elsewhere(&why).await {
            Bytes::new()
        } else {
            self.ended = true;
            let ev = self.error_event(&why);
            self.account("error", Some(format!("stream interrupted: {why}")));
            ev
        };
        if before.is_empty() {
            return Some(tail);
        }
        let mut b = before.to_vec();
        b.extend_from_slice(&tail);
        Some(Bytes::from(b))
    }
}

fn error_event(label: &str, message: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {
            "message": format!("{label}: {message}"),
            "type": "upstream_error",
            "param": null,
            "code": "stream_interrupted",
        }
    });
    Bytes::from(data_event(&body.to_string()))
}

/// An upstream stream read up to its first token: what came so far, then the rest.
pub(crate) struct Primed {
    head: Vec<Bytes>,
    rest: UpstreamBody,
}

type UpstreamBody = BoxStream<'static, Result<Bytes, hyper::Error>>;

/// Reads a stream until its first token (content, a tool call, a finish reason or the end).
/// Nothing has reached the client before that, so a stream that stays silent past
/// `first_token`, breaks, or sends something that is not an event of its API fails here,
/// and the caller tries the next target as it would after a refused connection.
pub(crate) async fn first_token(
    resp: UpstreamResponse,
    attempt: &Attempt,
    ep: Endpoint,
) -> Result<Primed, ProviderError> {
    let limits = attempt.upstream.timeouts();
    let deadline = tokio::time::Instant::from_std(attempt.started) + limits.first_token;
    let target = attempt.label.clone();
    let mut rest = resp.into_body().into_data_stream().boxed();
    let mut dec = attempt.upstream.wire().stream_decoder(ep, true);
    let mut sse = attempt.upstream.sse_decoder();
    // Held until the first token: bounded like one event, so an upstream that sends
    // only pings or empty chunks cannot grow it.
    let head_limit = attempt.upstream.read_limits().max_sse_line_bytes;
    let (mut head, mut head_bytes) = (Vec::new(), 0usize);
    let broken = |reason: String| ProviderError::Body {
        target: target.clone(),
        reason,
    };
    loop {
        let bytes = match tokio::time::timeout_at(deadline, rest.next()).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    target: target.clone(),
                    after: limits.first_token,
                });
            }
            Ok(None) => return Err(broken("the stream ended before its first token".into())),
            Ok(Some(Err(e))) => return Err(broken(format!("the stream broke: {e}"))),
            Ok(Some(Ok(b))) => b,
        };
        let mut started = false;
        let mut events = Vec::new();
        let overflow = sse.try_feed(&bytes, &mut events).err();
        for e in events {
            let mut out = Vec::new();
            let kind = dec.event(&e, &mut out).map_err(&broken)?;
            if kind == EventKind::Done {
                started = true;
                continue;
            }
            let payloads = if dec.passthrough() { vec![e.data] } else { out };
            for p in payloads {
                started |= is_first_token(&p).map_err(&broken)?;
            }
        }
        if !started && let Some(e) = overflow {
            return Err(broken(e.to_string()));
        }
        head_bytes += bytes.len();
        if !started && head_bytes > head_limit {
            return Err(broken(format!(
                "more than max_sse_line_bytes ({head_limit} bytes) came before the first token"
            )));
        }
        head.push(bytes);
        if started {
            return Ok(Primed { head, rest });
        }
    }
}

/// Whether an OpenAI-shaped chunk carries the answer's start: text, a tool call, a
/// refusal, a finish reason, or usage. A role-only or empty chunk does not; an error
/// object or a chunk that is not JSON is an error.
fn is_first_token(data: &str) -> Result<bool, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(true);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("the upstream sent an event that is not JSON ({e})"))?;
    if let Some(err) = v.get("error") {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!(
            "the upstream sent an error before any token: {msg}"
        ));
    }
    if v.get("usage").is_some_and(|u| !u.is_null()) {
        return Ok(true);
    }
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return Ok(false);
    };
    Ok(choices.iter().any(|c| {
        let filled = |x: Option<&Value>| match x {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        let delta = c.get("delta");
        filled(c.get("finish_reason"))
            || filled(c.get("text"))
            || delta.is_some_and(|d| {
                [
                    "content",
                    "tool_calls",
                    "function_call",
                    "refusal",
                    "reasoning_content",
                ]
                .iter()
                .any(|k| filled(d.get(*k)))
            })
    }))
}

pub(crate) fn relay_sse(primed: Primed, ctx: RelayCtx) -> Body {
    let dec = ctx
        .attempt
        .upstream
        .wire()
        .stream_decoder(ctx.ep, ctx.client_usage);
    let head = futures::stream::iter(primed.head.into_iter().map(Ok));
    let sse = ctx.attempt.upstream.sse_decoder();
    let state = Relay {
        upstream: head.chain(primed.rest).boxed(),
        sse,
        dec,
        saw_done: false,
        saw_finish: false,
        ended: false,
        first_event: None,
        events: 0,
        sent: 0,
        partial: String::new(),
        text: AnswerText::default(),
        stream_id: None,
        rewrite: false,
        skip_role: false,
        recorded: false,
        pending: None,
        busy: None,
        ctx,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        // After [DONE] the answer is complete: whatever the upstream does next (stall,
        // reset) is not the client's concern.
        if st.ended || st.saw_done {
            return None;
        }
        let idle = st.ctx.attempt.upstream.timeouts().stream_idle;
        let out = match tokio::time::timeout(idle, st.upstream.next()).await {
            Ok(Some(Ok(bytes))) => match st.inspect(bytes) {
                Ok(out) => {
                    if st.saw_done {
                        st.finish_attempt(true, None);
                        st.account("ok", None);
                    }
                    Some(out)
                }
                Err(msg) => st.broken(msg).await,
            },
            Ok(Some(Err(e))) => st.broken(format!("the upstream stream broke: {e}")).await,
            Ok(None) => {
                st.broken("the upstream ended the stream before it was complete".into())
                    .await
            }
            Err(_) => {
                let idle = idle.as_millis();
                st.broken(format!("no data from the upstream for {idle} ms"))
                    .await
            }
        };
        out.map(|b| (Ok::<Bytes, Infallible>(b), st))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::is_first_token;

    #[test]
    fn the_first_token_is_text_a_tool_call_a_finish_or_the_end() {
        for starts in [
            r#"{"choices":[{"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}"#,
            r#"{"choices":[{"delta":{"reasoning_content":"thinking"}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[{"text":"Hi","finish_reason":null}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#,
            " [DONE] ",
        ] {
            assert_eq!(is_first_token(starts), Ok(true), "{starts}");
        }
        for not_yet in [
            r#"{"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[]}}]}"#,
            r#"{"choices":[]}"#,
            r#"{"id":"x","object":"chat.completion.chunk"}"#,
        ] {
            assert_eq!(is_first_token(not_yet), Ok(false), "{not_yet}");
        }
        let err = is_first_token(r#"{"choices":[{"delta"#).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
        let err = is_first_token(r#"{"error":{"message":"model overloaded"}}"#).unwrap_err();
        assert!(err.contains("model overloaded"), "{err}");
    }
}
