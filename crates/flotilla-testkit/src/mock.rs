use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flotilla_api::sse::data_event;
use futures::StreamExt as _;
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
    /// Answer with this status and an OpenAI error of this `type` and `code`, as providers
    /// refuse requests (`context_length_exceeded`, `content_filter`).
    Error {
        status: u16,
        error_type: String,
        code: String,
        message: String,
    },
    /// Stream `after_chunks` content chunks, then drop the connection without `[DONE]`.
    StreamCut { after_chunks: usize },
    /// Stream the role chunk and `after_chunks` content chunks of `text`, go silent for
    /// `pause`, then finish normally. `after_chunks: 0` is a first token that comes late.
    Stall {
        text: String,
        after_chunks: usize,
        pause: Duration,
    },
    /// Stream `after_chunks` content chunks of `text`, then an event that is not JSON, then
    /// the rest.
    Malformed { text: String, after_chunks: usize },
    /// Stream `text` (with its finish reason when `finish`), then close the connection
    /// cleanly without `data: [DONE]`.
    NoDone { text: String, finish: bool },
    /// Refuse a request whose last message is the assistant's (a prefill to continue), as
    /// some providers do, with a 400; answer anything else with `text`.
    RejectPrefill { text: String },
    /// Accept the request and never answer.
    Hang,
    /// A valid answer whose content is `bytes` long: whole, with its `Content-Length` or,
    /// when `chunked`, without one (the size shows only as it is read); streamed, one
    /// content event (one `data:` line) that long.
    Huge { bytes: usize, chunked: bool },
    /// This status with a body that starts as an OpenAI error and never ends.
    EndlessError { code: u16 },
    /// This status with an OpenAI-shaped error body and these headers as given (a
    /// `Retry-After` date, `retry-after-ms`).
    StatusHeaders {
        code: u16,
        headers: Vec<(String, String)>,
    },
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
    /// This status with `Retry-After: value`, the value as given.
    pub fn retry_after(code: u16, value: &str) -> Self {
        Behavior::StatusHeaders {
            code,
            headers: vec![("retry-after".into(), value.to_owned())],
        }
    }
    /// OpenAI's answer to a prompt longer than the model's context.
    pub fn context_length_exceeded() -> Self {
        Behavior::Error {
            status: 400,
            error_type: "invalid_request_error".into(),
            code: "context_length_exceeded".into(),
            message: "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.".into(),
        }
    }
    /// A provider's content filter refusing the prompt.
    pub fn content_filter() -> Self {
        Behavior::Error {
            status: 400,
            error_type: "invalid_request_error".into(),
            code: "content_filter".into(),
            message: "The prompt was filtered due to the provider's content management policy."
                .into(),
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

/// A second handle on every accepted connection by peer address, so that a cut or a kill
/// can break it (dropping hyper's handle alone would not close a socket held here too).
type Conns = Arc<Mutex<HashMap<SocketAddr, std::net::TcpStream>>>;

struct MockState {
    conns: Conns,
    script: Mutex<VecDeque<Behavior>>,
    default: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    hits: AtomicUsize,
    options: MockOptions,
    billing: Arc<Billing>,
}

/// The tokens the mock bills, as a provider does: a whole answer's once it is made, a
/// stream's prompt when it starts and each word as it is generated (whether or not the
/// client is still there to read it).
#[derive(Debug, Default)]
struct Billing {
    prompt: AtomicU64,
    completion: AtomicU64,
}

/// An OpenAI-compatible server on `127.0.0.1:0`. Stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
    /// A second handle on every accepted connection, so [`MockUpstream::kill`] can cut them.
    conns: Conns,
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
        let conns: Conns = Arc::default();
        let state = Arc::new(MockState {
            conns: Arc::clone(&conns),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
            options,
            billing: Arc::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/completions", post(handle))
            .route("/v1/embeddings", post(handle))
            .with_state(Arc::clone(&state));
        let record = state.options.record.then(|| Arc::clone(&conns));
        let task = tokio::spawn(async move {
            // Chunks go out as written, as a real provider's do.
            let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
                let _ = tcp.set_nodelay(true);
                if let Some(conns) = &record
                    && let Ok(peer) = tcp.peer_addr()
                    && let Ok(fd) = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned()
                {
                    lock(conns).insert(peer, std::net::TcpStream::from(fd));
                }
            });
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
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
        for (_, c) in lock(&self.conns).drain() {
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
    /// The (prompt, completion) tokens billed for `Reply` answers so far.
    pub fn billed(&self) -> (u64, u64) {
        let b = &self.state.billing;
        (
            b.prompt.load(Ordering::SeqCst),
            b.completion.load(Ordering::SeqCst),
        )
    }

    pub fn hits(&self) -> usize {
        if self.state.options.record {
            lock(&self.state.requests).len()
        } else {
            self.state.hits.load(Ordering::Relaxed)
        }
    }
}

/// A server that accepts each connection, reads the request's head, and resets the
/// connection (TCP RST) before any response byte: a provider's load balancer dropping
/// the request. Stops when dropped.
pub struct ResetUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ResetUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ResetUpstream {
    pub async fn start() -> std::io::Result<ResetUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let hits = Arc::clone(&counted);
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    hits.fetch_add(1, Ordering::Relaxed);
                    // Closing with a zero linger time sends RST instead of FIN.
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                    drop(conn);
                });
            }
        });
        Ok(ResetUpstream { addr, hits, task })
    }

    /// Base URL with the `/v1` segment, as a provider's `base_url` is configured.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests whose head arrived (each was reset).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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
            json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS as usize + completion,
                   "prompt_tokens_details": {"cached_tokens": state.options.cached_tokens}})
        })
    };
    let chat = path.ends_with("/chat/completions");
    match behavior {
        Behavior::Huge { bytes, chunked } => huge(chat, stream, &model, bytes, chunked),
        Behavior::EndlessError { code } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let head = Bytes::from_static(
                b"{\"error\": {\"type\": \"mock_error\", \"message\": \"endless ",
            );
            let tail = Bytes::from(vec![b'x'; 8 << 10]);
            let body = futures::stream::iter(std::iter::once(head).chain(std::iter::repeat(tail)))
                .map(Ok::<_, std::io::Error>);
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from_stream(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Behavior::StatusHeaders { code, headers } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = json!({"error": {"message": format!("mock upstream says {code}"), "type": "mock_error", "param": null, "code": code.to_string()}});
            let mut resp = (status, axum::Json(body)).into_response();
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    axum::http::HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            resp
        }
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
        Behavior::Error {
            status,
            error_type,
            code,
            message,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            let body = json!({"error": {"message": message, "type": error_type, "param": null, "code": code}});
            (status, axum::Json(body)).into_response()
        }
        Behavior::RejectPrefill { text } => {
            let prefill = body
                .get("messages")
                .and_then(Value::as_array)
                .and_then(|m| m.last())
                .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
            if prefill {
                let body = json!({"error": {"message": "This model does not support assistant message prefill. The conversation must end with a user message.", "type": "invalid_request_error", "param": "messages", "code": null}});
                return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
            }
            let words = words_of(&text);
            if stream {
                let usage = include_usage.then(|| usage(words.len())).flatten();
                sse(answer_events(chat, &model, &words, usage), pause)
            } else {
                axum::Json(whole(chat, &model, &text, usage(words.len()))).into_response()
            }
        }
        Behavior::Stall {
            text,
            after_chunks,
            pause: silence,
        } => {
            let words = words_of(&text);
            let usage = include_usage.then(|| usage(words.len())).flatten();
            let mut events = answer_events(chat, &model, &words, usage);
            events.insert(first_content(chat) + after_chunks, Ev::Pause(silence));
            sse(events, pause)
        }
        Behavior::Malformed { text, after_chunks } => {
            let words = words_of(&text);
            let usage = include_usage.then(|| usage(words.len())).flatten();
            let mut events = answer_events(chat, &model, &words, usage);
            events.insert(
                first_content(chat) + after_chunks,
                Ev::Data(Bytes::from_static(
                    b"data: {\"id\": \"chatcmpl-mock\", \"choices\": [{\"delta\n\n",
                )),
            );
            sse(events, pause)
        }
        Behavior::NoDone { text, finish } => {
            let words = words_of(&text);
            let usage = include_usage.then(|| usage(words.len())).flatten();
            let mut events = answer_events(chat, &model, &words, usage);
            events.pop();
            if !finish {
                events.truncate(first_content(chat) + words.len());
            }
            sse(events, pause)
        }
        Behavior::Reply { text, latency } => {
            if !(latency.is_zero() && state.options.skip_zero_sleep) {
                tokio::time::sleep(latency).await;
            }
            if path.ends_with("/embeddings") {
                return axum::Json(embeddings(&model, &body)).into_response();
            }
            let words = words_of(&text);
            let usage = if include_usage || !stream {
                usage(words.len())
            } else {
                None
            };
            let billing = &state.billing;
            billing.prompt.fetch_add(PROMPT_TOKENS, Ordering::SeqCst);
            if stream {
                // Each word is billed as it is generated, before it is sent.
                let mut events = answer_events(chat, &model, &words, usage);
                let first = first_content(chat);
                for i in (first..first + words.len()).rev() {
                    events.insert(i, Ev::Bill(Arc::clone(billing)));
                }
                sse(events, pause)
            } else {
                billing
                    .completion
                    .fetch_add(words.len() as u64, Ordering::SeqCst);
                axum::Json(whole(chat, &model, &text, usage)).into_response()
            }
        }
        Behavior::StreamCut { after_chunks } => {
            let words: Vec<String> = (0..after_chunks + 5).map(|i| format!("w{i} ")).collect();
            let mut events = answer_events(chat, &model, &words, None);
            events.truncate(first_content(chat) + after_chunks);
            events.push(Ev::Cut(lock(&state.conns).remove(&peer)));
            sse(events, pause)
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

/// [`Behavior::Huge`]: `bytes` of content in an answer of the usual shape.
fn huge(chat: bool, stream: bool, model: &str, bytes: usize, chunked: bool) -> Response {
    let content = "x".repeat(bytes);
    if stream {
        return sse(answer_events(chat, model, &[content], None), Duration::ZERO);
    }
    let body = Bytes::from(whole(chat, model, &content, None).to_string());
    let body = if chunked {
        // In pieces of 64 KiB, with no length known up front.
        let pieces: Vec<Bytes> = (0..body.len())
            .step_by(64 << 10)
            .map(|at| body.slice(at..(at + (64 << 10)).min(body.len())))
            .collect();
        Body::from_stream(futures::stream::iter(pieces).map(Ok::<_, std::io::Error>))
    } else {
        Body::from(body)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
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

fn words_of(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

/// One step of a scripted stream.
enum Ev {
    /// Bytes to send (after the event pause).
    Data(Bytes),
    /// Silence this long.
    Pause(Duration),
    /// The connection breaks (shut down for real when the mock holds a handle on it).
    Cut(Option<std::net::TcpStream>),
    /// One completion token is billed.
    Bill(Arc<Billing>),
}

/// The prompt tokens every answer reports.
const PROMPT_TOKENS: u64 = 5;

/// Where the first content chunk sits in [`answer_events`]: after the role chunk of a chat.
fn first_content(chat: bool) -> usize {
    usize::from(chat)
}

/// The SSE events of a whole streamed answer: the role chunk (chat), one chunk per word,
/// the finish chunk, the usage chunk when given, and `[DONE]`.
fn answer_events(chat: bool, model: &str, words: &[String], usage: Option<Value>) -> Vec<Ev> {
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
    let data = |v: &Value| Ev::Data(Bytes::from(data_event(&v.to_string())));
    let mut out = Vec::new();
    if chat {
        out.push(data(
            &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
        ));
    }
    for w in words {
        out.push(data(&chunk(Some(w), None)));
    }
    out.push(data(&chunk(None, Some("stop"))));
    if let Some(usage) = usage {
        out.push(data(
            &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                    "usage": usage}),
        ));
    }
    out.push(Ev::Data(Bytes::from(data_event("[DONE]"))));
    out
}

fn sse(events: Vec<Ev>, pause: Duration) -> Response {
    let body = if pause.is_zero()
        && events
            .iter()
            .all(|e| matches!(e, Ev::Data(_) | Ev::Bill(_)))
    {
        Body::from_stream(futures::stream::iter(events.into_iter().filter_map(
            |e| match e {
                Ev::Data(b) => Some(Ok::<_, std::io::Error>(b)),
                Ev::Bill(b) => {
                    b.completion.fetch_add(1, Ordering::SeqCst);
                    None
                }
                Ev::Pause(_) | Ev::Cut(_) => None,
            },
        )))
    } else {
        // A short pause between events makes the stream arrive in several reads, as a real one does.
        Body::from_stream(futures::stream::unfold(
            events.into_iter(),
            move |mut it| async move {
                loop {
                    match it.next()? {
                        Ev::Pause(d) => tokio::time::sleep(d).await,
                        Ev::Bill(b) => {
                            b.completion.fetch_add(1, Ordering::SeqCst);
                        }
                        Ev::Cut(conn) => {
                            // After the pause, so what was sent before is flushed first.
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            if let Some(c) = conn {
                                let _ = c.shutdown(std::net::Shutdown::Both);
                            }
                            let cut = std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "mock cut the stream",
                            );
                            return Some((Err(cut), it));
                        }
                        Ev::Data(b) => {
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            return Some((Ok(b), it));
                        }
                    }
                }
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
