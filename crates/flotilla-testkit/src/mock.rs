use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flotilla_api::sse::data_event;
use serde_json::{Value, json};

/// What the mock does with one request.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Answer successfully (streamed when the request asks) after `latency`. Chat and
    /// completions answer `text`; embeddings answer 8-dimensional vectors.
    Reply { text: String, latency: Duration },
    /// Answer with this status and an OpenAI-shaped error body.
    Status {
        code: u16,
        retry_after_s: Option<u64>,
        message: String,
    },
    /// Stream `after_chunks` content chunks, then drop the connection without `[DONE]`.
    StreamCut { after_chunks: usize },
    /// Accept the request and never answer.
    Hang,
}

impl Behavior {
    pub fn reply(text: &str) -> Self {
        Behavior::Reply {
            text: text.to_owned(),
            latency: Duration::ZERO,
        }
    }
    /// A reply of `chunks` words, so a stream carries that many content chunks.
    pub fn reply_chunks(chunks: usize) -> Self {
        let text: String = (0..chunks).map(|i| format!("w{i} ")).collect();
        Behavior::Reply {
            text,
            latency: Duration::ZERO,
        }
    }
    pub fn status(code: u16) -> Self {
        Behavior::Status {
            code,
            retry_after_s: None,
            message: format!("mock upstream says {code}"),
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

/// How the mock serves every request, whatever its behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Pause before each SSE event, so a stream arrives in several reads as a real one
    /// does. 2 ms by default; zero for benchmarks that measure the relay, not the pause.
    pub event_pause: Duration,
    /// Keep every request for [`MockUpstream::requests`]. On by default; off for load
    /// tests, where the list would grow without bound and its lock would be measured.
    pub record: bool,
    /// Answer a zero-latency reply at once. Off by default: the reply then still waits on
    /// Tokio's timer, which rounds up to its next millisecond tick (about 1 ms on an idle
    /// server), as it always has; benchmarks turn this on so that pause is not measured.
    pub skip_zero_sleep: bool,
    /// Answer without `usage`, even when a stream asks for it (as some servers do).
    pub omit_usage: bool,
    /// Prompt tokens reported as read from the provider's cache (of the 5 reported).
    pub cached_tokens: u64,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            event_pause: Duration::from_millis(2),
            record: true,
            skip_zero_sleep: false,
            omit_usage: false,
            cached_tokens: 0,
        }
    }
}

impl MockOptions {
    /// No pause between events, no timer for zero latency and no recording: the fastest
    /// upstream the mock can be.
    pub fn bench() -> Self {
        MockOptions {
            event_pause: Duration::ZERO,
            record: false,
            skip_zero_sleep: true,
            ..MockOptions::default()
        }
    }
}

struct MockState {
    script: Mutex<VecDeque<Behavior>>,
    default: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    hits: AtomicUsize,
    options: MockOptions,
}

/// An OpenAI-compatible server on `127.0.0.1:0`. Stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
    /// A second handle on every accepted connection, so [`MockUpstream::kill`] can cut them.
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MockUpstream {
    /// Starts a mock that behaves as `default` unless a scripted behaviour is queued.
    pub async fn start(default: Behavior) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_with(listener, default, MockOptions::default()).await
    }

    /// Starts a mock on a listener the caller bound (any address), serving with `options`.
    pub async fn start_with(
        listener: tokio::net::TcpListener,
        default: Behavior,
        options: MockOptions,
    ) -> std::io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
            options,
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/completions", post(handle))
            .route("/v1/embeddings", post(handle))
            .with_state(Arc::clone(&state));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let record = state.options.record.then(|| Arc::clone(&conns));
        let task = tokio::spawn(async move {
            // Chunks go out as written, as a real provider's do.
            let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
                let _ = tcp.set_nodelay(true);
                if let Some(conns) = &record
                    && let Ok(fd) = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned()
                {
                    lock(conns).push(std::net::TcpStream::from(fd));
                }
            });
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockUpstream {
            addr,
            state,
            task,
            conns,
        })
    }

    /// Dies like a killed process: stops listening (new connections are refused) and cuts
    /// every open connection, answered or not.
    pub fn kill(&self) {
        self.task.abort();
        for c in lock(&self.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL with the `/v1` segment, as a provider's `base_url` is configured.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The address without `/v1`, as an agent advertises itself.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a behaviour for the next request (before the default).
    pub fn push(&self, b: Behavior) {
        lock(&self.state.script).push_back(b);
    }

    pub fn set_default(&self, b: Behavior) {
        *lock(&self.state.default) = b;
    }

    /// Every request received, in order; empty when the options turned recording off.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
    }

    /// How many requests arrived, recorded or not.
    pub fn hits(&self) -> usize {
        if self.state.options.record {
            lock(&self.state.requests).len()
        } else {
            self.state.hits.load(Ordering::Relaxed)
        }
    }
}

/// A URL on which nothing listens: connections are refused.
pub fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9);
    format!("http://127.0.0.1:{port}/v1")
}

async fn handle(
    State(state): State<Arc<MockState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    if state.options.record {
        lock(&state.requests).push(Recorded {
            path: path.clone(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.clone(),
        });
    } else {
        state.hits.fetch_add(1, Ordering::Relaxed);
    }
    let pause = state.options.event_pause;
    let behavior = lock(&state.script)
        .pop_front()
        .unwrap_or_else(|| lock(&state.default).clone());
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_owned();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && !state.options.omit_usage;
    let usage = |completion: usize| -> Option<Value> {
        (!state.options.omit_usage).then(|| {
            json!({"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion,
                   "prompt_tokens_details": {"cached_tokens": state.options.cached_tokens}})
        })
    };
    let chat = path.ends_with("/chat/completions");
    match behavior {
        Behavior::Hang => {
            futures::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Behavior::Status {
            code,
            retry_after_s,
            message,
        } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = json!({"error": {"message": message, "type": "mock_error", "param": null, "code": code.to_string()}});
            let mut resp = (status, axum::Json(body)).into_response();
            if let Some(s) = retry_after_s
                && let Ok(v) = s.to_string().parse()
            {
                resp.headers_mut().insert("retry-after", v);
            }
            resp
        }
        Behavior::Reply { text, latency } => {
            if !(latency.is_zero() && state.options.skip_zero_sleep) {
                tokio::time::sleep(latency).await;
            }
            if path.ends_with("/embeddings") {
                return axum::Json(embeddings(&model, &body)).into_response();
            }
            let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
            let usage = if include_usage || !stream {
                usage(words.len())
            } else {
                None
            };
            if stream {
                sse(stream_chunks(chat, &model, &words, usage, None), pause)
            } else {
                axum::Json(whole(chat, &model, &text, usage)).into_response()
            }
        }
        Behavior::StreamCut { after_chunks } => {
            let words: Vec<String> = (0..after_chunks + 5).map(|i| format!("w{i} ")).collect();
            let usage = if include_usage {
                usage(words.len())
            } else {
                None
            };
            sse(
                stream_chunks(chat, &model, &words, usage, Some(after_chunks)),
                pause,
            )
        }
    }
}

fn whole(chat: bool, model: &str, text: &str, usage: Option<Value>) -> Value {
    let mut v = if chat {
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": null}]})
    } else {
        json!({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
               "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": null}]})
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

fn embeddings(model: &str, body: &Value) -> Value {
    let n = match body.get("input") {
        Some(Value::Array(a)) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": vec![0.125f32 * (i as f32 + 1.0); 8]}))
        .collect();
    json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}})
}

/// The SSE events of a streamed answer; with `cut_after`, only that many content chunks
/// and then a broken connection.
fn stream_chunks(
    chat: bool,
    model: &str,
    words: &[String],
    usage: Option<Value>,
    cut_after: Option<usize>,
) -> Vec<Result<Bytes, std::io::Error>> {
    let chunk = |content: Option<&str>, finish: Option<&str>| -> Value {
        if chat {
            let delta = match content {
                Some(c) => json!({"content": c}),
                None => json!({}),
            };
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        } else {
            json!({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                   "choices": [{"index": 0, "text": content.unwrap_or(""), "finish_reason": finish}]})
        }
    };
    let mut out = Vec::new();
    if chat {
        out.push(Ok(Bytes::from(data_event(
            &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
            .to_string(),
        ))));
    }
    for (i, w) in words.iter().enumerate() {
        if cut_after == Some(i) {
            out.push(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock cut the stream",
            )));
            return out;
        }
        out.push(Ok(Bytes::from(data_event(
            &chunk(Some(w), None).to_string(),
        ))));
    }
    out.push(Ok(Bytes::from(data_event(
        &chunk(None, Some("stop")).to_string(),
    ))));
    if let Some(usage) = usage {
        let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                           "usage": usage});
        out.push(Ok(Bytes::from(data_event(&chunk.to_string()))));
    }
    out.push(Ok(Bytes::from(data_event("[DONE]"))));
    out
}

fn sse(events: Vec<Result<Bytes, std::io::Error>>, pause: Duration) -> Response {
    let body = if pause.is_zero() {
        Body::from_stream(futures::stream::iter(events))
    } else {
        // A short pause between events makes the stream arrive in several reads, as a real one does.
        Body::from_stream(futures::stream::unfold(
            events.into_iter(),
            move |mut it| async move {
                let next = it.next()?;
                tokio::time::sleep(pause).await;
                Some((next, it))
            },
        ))
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bench_options_stream_every_chunk_and_count_without_recording() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock =
            MockUpstream::start_with(listener, Behavior::reply_chunks(5), MockOptions::bench())
                .await
                .unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("{}/chat/completions", mock.base_url());
        for _ in 0..3 {
            let body = client
                .post(&url)
                .json(&json!({"model": "m", "messages": [], "stream": true}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let events: Vec<&str> = body.lines().filter(|l| l.starts_with("data: ")).collect();
            // Role chunk, 5 content chunks, finish chunk, [DONE].
            assert_eq!(events.len(), 8, "{body}");
            assert_eq!(events.last(), Some(&"data: [DONE]"));
            assert!(events[5].contains("w4 "), "{body}");
        }
        assert_eq!(mock.hits(), 3);
        assert!(mock.requests().is_empty());
    }
}
