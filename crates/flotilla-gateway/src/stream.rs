//! Relays an upstream's SSE body to the client byte for byte, and makes a broken stream
//! visible: if the upstream errors, stalls past the idle limit or ends without
//! `data: [DONE]`, the client gets an explicit error event instead of a clean-looking end.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use flotilla_api::sse::{SseDecoder, data_event};
use flotilla_scheduler::InFlightGuard;
use futures::stream::{BoxStream, StreamExt};

struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: SseDecoder,
    saw_done: bool,
    ended: bool,
    idle: Duration,
    label: String,
    /// Held until the stream ends or the client goes away.
    _guard: Option<InFlightGuard>,
}

impl Relay {
    /// The error event, on a line of its own even when the upstream broke off mid-line.
    fn error_event(&self, message: &str) -> Bytes {
        let ev = error_event(&self.label, message);
        if self.decoder.has_partial() {
            let mut b = b"\n\n".to_vec();
            b.extend_from_slice(&ev);
            Bytes::from(b)
        } else {
            ev
        }
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

pub(crate) fn relay_sse(
    resp: reqwest::Response,
    label: String,
    idle: Duration,
    guard: Option<InFlightGuard>,
) -> Body {
    let state = Relay {
        upstream: resp.bytes_stream().boxed(),
        decoder: SseDecoder::new(),
        saw_done: false,
        ended: false,
        idle,
        label,
        _guard: guard,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        // After [DONE] the answer is complete: whatever the upstream does next (stall,
        // reset) is not the client's concern.
        if st.ended || st.saw_done {
            return None;
        }
        match tokio::time::timeout(st.idle, st.upstream.next()).await {
            Ok(Some(Ok(bytes))) => {
                if st.decoder.feed(&bytes).iter().any(|e| e.is_done()) {
                    st.saw_done = true;
                }
                Some((Ok::<Bytes, Infallible>(bytes), st))
            }
            Ok(Some(Err(e))) => {
                st.ended = true;
                tracing::warn!(upstream = %st.label, error = %e, "stream broke mid-way");
                let msg = format!("the upstream stream broke: {e}");
                Some((Ok(st.error_event(&msg)), st))
            }
            Ok(None) => {
                st.ended = true;
                tracing::warn!(upstream = %st.label, "stream ended without [DONE]");
                let ev = st.error_event("the upstream ended the stream before it was complete");
                Some((Ok(ev), st))
            }
            Err(_) => {
                st.ended = true;
                tracing::warn!(upstream = %st.label, idle_ms = st.idle.as_millis() as u64, "stream stalled");
                let msg = format!("no data from the upstream for {} ms", st.idle.as_millis());
                Some((Ok(st.error_event(&msg)), st))
            }
        }
    });
    Body::from_stream(stream)
}
