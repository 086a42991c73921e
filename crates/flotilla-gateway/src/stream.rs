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
use flotilla_api::sse::{SseDecoder, SseEvent, data_event};
use flotilla_scheduler::{InFlightGuard, Outcome, Target};
use futures::stream::{BoxStream, StreamExt};
use serde_json::Value;

use crate::AppState;
use crate::dispatch::{Attempt, Endpoint, open_attempt};
use crate::health::health_key;

/// Where a continuation may go and what it re-sends.
pub(crate) struct Continuation {
    pub state: AppState,
    pub targets: VecDeque<Target>,
    /// The client's request body (chat), before any continuation.
    pub body: Value,
    pub request_id: String,
    pub attempts_left: u32,
}

pub(crate) struct RelayCtx {
    pub state: AppState,
    /// The attempt whose body this is.
    pub attempt: Attempt,
    pub idle: Duration,
    pub guard: Option<InFlightGuard>,
    pub predicted_ttft: Duration,
    /// Some when broken streams continue elsewhere.
    pub cont: Option<Continuation>,
}

struct Relay {
    ctx: RelayCtx,
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: SseDecoder,
    saw_done: bool,
    saw_finish: bool,
    ended: bool,
    first_event: Option<Duration>,
    events: u64,
    /// The answer so far (continue mode only).
    partial: String,
    /// The first upstream's chunk id, kept on continued chunks.
    stream_id: Option<String>,
    /// Events from a continuation are rewritten to read as the first stream's.
    rewrite: bool,
    /// A continuation's head is dropped until its first content (its role chunk).
    skip_role: bool,
    /// The current attempt's outcome is in the health book.
    recorded: bool,
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
        }
    }
}

impl Relay {
    /// The error event, on a line of its own even when the upstream broke off mid-line.
    fn error_event(&self, message: &str) -> Bytes {
        let ev = error_event(&self.ctx.attempt.label, message);
        if self.decoder.has_partial() {
            let mut b = b"\n\n".to_vec();
            b.extend_from_slice(&ev);
            Bytes::from(b)
        } else {
            ev
        }
    }

    /// Records the current attempt's outcome in health and metrics.
    fn finish_attempt(&mut self, ok: bool) {
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
                ttft,
                latency: a.started.elapsed(),
                // Role and finish chunks carry no token.
                tokens: Some(self.events.saturating_sub(2)),
            }
        } else {
            Outcome::Failure
        };
        self.ctx
            .state
            .inner
            .health
            .finish(&a.health_key, outcome, now);
    }

    /// Looks at each complete event: [DONE], finish reasons, the answer text when a
    /// continuation may need it. Returns the bytes to send (rewritten for continuations).
    fn inspect(&mut self, bytes: Bytes) -> Bytes {
        let events = self.decoder.feed(&bytes);
        let keep_text = self.ctx.cont.is_some();
        if self.first_event.is_none() && !events.is_empty() {
            self.first_event = Some(self.ctx.attempt.started.elapsed());
        }
        if !self.rewrite && !keep_text {
            for e in &events {
                self.events += 1;
                if e.is_done() {
                    self.saw_done = true;
                }
            }
            return bytes;
        }
        let mut out = Vec::new();
        for e in events {
            self.events += 1;
            if e.is_done() {
                self.saw_done = true;
                out.extend_from_slice(data_event("[DONE]").as_bytes());
                continue;
            }
            if let Some(v) = self.track(&e) {
                out.extend_from_slice(data_event(&v).as_bytes());
            }
        }
        if self.rewrite {
            Bytes::from(out)
        } else {
            bytes
        }
    }

    /// Notes the event's text and finish reason; returns what to send (None = drop it).
    fn track(&mut self, e: &SseEvent) -> Option<String> {
        let Ok(mut v) = serde_json::from_str::<Value>(&e.data) else {
            return Some(e.data.clone());
        };
        if self.stream_id.is_none() {
            self.stream_id = v.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        let choice = v.pointer("/choices/0");
        let content = choice
            .and_then(|c| c.pointer("/delta/content"))
            .and_then(Value::as_str)
            .unwrap_or("");
        self.partial.push_str(content);
        if choice
            .and_then(|c| c.get("finish_reason"))
            .is_some_and(|f| !f.is_null())
        {
            self.saw_finish = true;
        }
        if !self.rewrite {
            return Some(e.data.clone());
        }
        let has_finish = choice
            .and_then(|c| c.get("finish_reason"))
            .is_some_and(|f| !f.is_null());
        if self.skip_role && content.is_empty() && !has_finish && v.get("usage").is_none() {
            return None;
        }
        self.skip_role = false;
        if let Some(id) = &self.stream_id {
            v["id"] = Value::String(id.clone());
        }
        Some(v.to_string())
    }

    /// After a break: the next target's stream, or None when there is none.
    async fn continue_elsewhere(&mut self, why: &str) -> bool {
        let Some(cont) = self.ctx.cont.as_mut() else {
            return false;
        };
        let mut body = cont.body.clone();
        if let Some(msgs) = body.get_mut("messages").and_then(Value::as_array_mut) {
            msgs.push(serde_json::json!({"role": "assistant", "content": self.partial}));
        }
        // The continuation may only write what the client has not had yet.
        let sent = self.events.saturating_sub(1);
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = body.get(key).and_then(Value::as_u64) {
                body[key] = Value::from(n.saturating_sub(sent).max(1));
            }
        }
        while cont.attempts_left > 0 {
            let Some(target) = cont.targets.pop_front() else {
                break;
            };
            let admit = cont
                .state
                .inner
                .health
                .admit(&health_key(&target), Instant::now());
            if !admit.allowed() {
                continue;
            }
            cont.attempts_left -= 1;
            match open_attempt(&cont.state, Endpoint::Chat, &target, &body, true, None).await {
                Ok((attempt, resp, guard)) => {
                    tracing::warn!(
                        request_id = %cont.request_id,
                        broken = %self.ctx.attempt.label,
                        upstream = %attempt.label,
                        partial_chars = self.partial.len(),
                        reason = why,
                        "stream broke mid-way; continuing on the next target"
                    );
                    self.ctx.attempt = attempt;
                    self.ctx.guard = guard;
                    self.upstream = resp.bytes_stream().boxed();
                    self.decoder = SseDecoder::new();
                    self.first_event = None;
                    self.rewrite = true;
                    self.skip_role = true;
                    self.recorded = false;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(request_id = %cont.request_id, error = %e, "continuation attempt failed");
                }
            }
        }
        false
    }

    /// The stream broke (`why`): continue it elsewhere or say so.
    async fn broken(&mut self, why: String) -> Option<Bytes> {
        tracing::warn!(upstream = %self.ctx.attempt.label, reason = %why, "stream broke mid-way");
        self.finish_attempt(false);
        if self.saw_finish {
            // The answer was complete; only the end marker is missing.
            self.ended = true;
            return Some(Bytes::from(data_event("[DONE]")));
        }
        if self.continue_elsewhere(&why).await {
            return Some(Bytes::new());
        }
        self.ended = true;
        Some(self.error_event(&why))
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

pub(crate) fn relay_sse(resp: reqwest::Response, ctx: RelayCtx) -> Body {
    let state = Relay {
        upstream: resp.bytes_stream().boxed(),
        decoder: SseDecoder::new(),
        saw_done: false,
        saw_finish: false,
        ended: false,
        first_event: None,
        events: 0,
        partial: String::new(),
        stream_id: None,
        rewrite: false,
        skip_role: false,
        recorded: false,
        ctx,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        // After [DONE] the answer is complete: whatever the upstream does next (stall,
        // reset) is not the client's concern.
        if st.ended {
            return None;
        }
        if st.saw_done {
            return None;
        }
        let out = match tokio::time::timeout(st.ctx.idle, st.upstream.next()).await {
            Ok(Some(Ok(bytes))) => {
                let out = st.inspect(bytes);
                if st.saw_done {
                    st.finish_attempt(true);
                }
                Some(out)
            }
            Ok(Some(Err(e))) => st.broken(format!("the upstream stream broke: {e}")).await,
            Ok(None) => {
                st.broken("the upstream ended the stream before it was complete".into())
                    .await
            }
            Err(_) => {
                let idle = st.ctx.idle.as_millis();
                st.broken(format!("no data from the upstream for {idle} ms"))
                    .await
            }
        };
        out.map(|b| (Ok::<Bytes, Infallible>(b), st))
    });
    Body::from_stream(stream)
}
