//! The agent's HTTP API: OpenAI endpoints over the local engines, plus health and status.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_api::body::{BODY_READ_TIMEOUT, parse_json, read_limited};
use flotilla_api::openai::{
    ChatCompletionRequest, CompletionRequest, EmbeddingData, EmbeddingInput, EmbeddingRequest,
    EmbeddingResponse, EmbeddingUsage, EmbeddingVector, ModelCard, ModelList, SamplingOptions,
};
use flotilla_api::{ApiError, ErrorKind, headers};
use flotilla_engine::{ChatMessage, Prompt, SamplingParams, TextEngine};

use crate::AgentState;
use crate::drain::WorkGuard;
use crate::generate::{Format, Shape, respond_stream, respond_whole, start};

pub(crate) fn router(state: AgentState) -> Router {
    // Inference is counted for the drain and refused while draining.
    let work = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            track_work,
        ));
    // Everything but `/health` and `/metrics` needs the cluster token when there is one.
    let guarded = Router::new()
        .merge(work)
        .route("/v1/models", get(models))
        .route("/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .merge(guarded)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/drain", post(drain))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Holds a drain guard until the response, a stream included, has ended or the client
/// has gone; answers 503 once draining so the scheduler retries elsewhere.
async fn track_work(State(s): State<AgentState>, req: Request, next: Next) -> Response {
    let Some(guard) = s.drain.enter() else {
        return ApiError::new(
            ErrorKind::Unavailable,
            "this agent is draining and takes no new requests",
        )
        .with_code("draining")
        .into_response();
    };
    let (parts, body) = next.run(req).await.into_parts();
    Response::from_parts(
        parts,
        Body::new(Guarded {
            inner: body,
            _guard: guard,
        }),
    )
}

/// A response body that holds a drain guard until it is finished or dropped, and keeps
/// the inner body's size (so whole JSON answers keep their Content-Length).
struct Guarded {
    inner: Body,
    _guard: WorkGuard,
}

impl axum::body::HttpBody for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// 503 while draining, so load balancers and readiness probes stop sending work too.
async fn health(State(s): State<AgentState>) -> Response {
    if s.drain.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ok".into_response()
    }
}

/// With a cluster token, inference, the model list and the status need it: only a
/// scheduler holding it (or an operator) can send this agent work or see its state.
async fn require_token(State(s): State<AgentState>, req: Request, next: Next) -> Response {
    if let Err(e) = check_token(&s, req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

/// The cluster token, when the agent has one, guards its inference and admin endpoints.
fn check_token(s: &AgentState, h: &HeaderMap) -> Result<(), ApiError> {
    let auth = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    flotilla_api::check_bearer(s.config.cluster_token.as_ref(), auth, "cluster token")
}

async fn drain(State(s): State<AgentState>, h: HeaderMap) -> Response {
    if let Err(e) = check_token(&s, &h) {
        return e.into_response();
    }
    s.drain.request();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "draining": true,
            "in_flight": s.drain.in_flight(),
        })),
    )
        .into_response()
}

async fn metrics(State(s): State<AgentState>, h: HeaderMap) -> Response {
    let auth = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(e) =
        flotilla_api::check_bearer(s.config.metrics_token.as_ref(), auth, "metrics token")
    {
        return e.into_response();
    }
    let t = s.telemetry().await;
    let text = crate::metrics::render(&s, &t.gpus, t.host.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            flotilla_api::metrics::TEXT_CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

async fn read_body<T: serde::de::DeserializeOwned>(
    s: &AgentState,
    body: Body,
) -> Result<T, ApiError> {
    parse_json(&read_limited(body, s.config.max_body_bytes, BODY_READ_TIMEOUT).await?)
}

fn chat_engine<'a>(s: &'a AgentState, model: &str) -> Result<&'a TextEngine, ApiError> {
    if let Some(e) = s.models.chat.get(model) {
        return Ok(e);
    }
    if s.models.embedding.contains_key(model) {
        return Err(ApiError::invalid_param(
            "model",
            format!("`{model}` is an embedding model; use /v1/embeddings"),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// The engine's parameters for checked options; what the request leaves out keeps the
/// engine's defaults (every filter and penalty off).
fn sampling(opts: SamplingOptions) -> SamplingParams {
    let d = SamplingParams::default();
    // Beyond usize a count cannot fit any context; saturate and let the engine say so.
    let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    SamplingParams {
        temperature: opts.temperature.unwrap_or(d.temperature),
        top_p: opts.top_p.unwrap_or(d.top_p),
        top_k: opts.top_k.map(count),
        min_p: opts.min_p.unwrap_or(d.min_p),
        repetition_penalty: opts.repetition_penalty.unwrap_or(d.repetition_penalty),
        frequency_penalty: opts.frequency_penalty.unwrap_or(d.frequency_penalty),
        presence_penalty: opts.presence_penalty.unwrap_or(d.presence_penalty),
        // Negative seeds are valid in the OpenAI API; reinterpret the bits.
        seed: opts.seed.map(|s| s as u64),
        max_tokens: opts.max_tokens.map(count),
        stop: opts.stop,
        logprobs: opts.logprobs.is_some(),
        top_logprobs: opts.logprobs.map_or(0, |n| n as usize),
        ignore_eos: opts.ignore_eos,
    }
}

async fn chat(State(s): State<AgentState>, body: Body) -> Response {
    let arrived = Instant::now();
    let res = async {
        let req: ChatCompletionRequest = read_body(&s, body).await?;
        req.validate()?;
        let engine = chat_engine(&s, &req.model)?;
        reject_unsupported(&req.extra)?;
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            messages.push(ChatMessage {
                // OpenAI's newer name for the system role; chat templates know `system`.
                role: if m.role == "developer" {
                    "system".into()
                } else {
                    m.role.clone()
                },
                content: m.text(i)?,
            });
        }
        let params = sampling(req.sampling()?);
        let format = Format {
            shape: Shape::Chat,
            logprobs: params.logprobs,
        };
        let n = req.n.unwrap_or(1) as u32;
        // vLLM's flag: go on writing the last (assistant) message instead of a new turn, as
        // the scheduler asks when it continues a stream another target broke off.
        let prompt =
            if req.extra.get("continue_final_message") == Some(&serde_json::Value::Bool(true)) {
                Prompt::ContinueChat(messages)
            } else {
                Prompt::Chat(messages)
            };
        let seqs = start(engine, vec![prompt], n, &params).await?;
        let (stream, usage) = (req.is_stream(), req.include_usage());
        finish(format, engine, seqs, stream, usage, arrived).await
    }
    .await;
    res.unwrap_or_else(IntoResponse::into_response)
}

/// Features the local engine cannot honour yet are refused, not silently ignored: an answer
/// that ignored `tools` or a JSON schema would look valid and be wrong.
fn reject_unsupported(extra: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::Value;
    let unsupported = |param: &str, what: &str| {
        Err(ApiError::invalid_param(
            param,
            format!("{what} is not supported by local models yet"),
        )
        .with_code("unsupported_parameter"))
    };
    match extra.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return unsupported("tools", "tool calling"),
    }
    if let Some(rf) = extra.get("response_format") {
        match rf.get("type").and_then(Value::as_str) {
            None | Some("text") => {}
            Some(_) => return unsupported("response_format", "structured output"),
        }
    }
    Ok(())
}

async fn completions(State(s): State<AgentState>, body: Body) -> Response {
    let arrived = Instant::now();
    let res = async {
        let req: CompletionRequest = read_body(&s, body).await?;
        req.validate()?;
        let engine = chat_engine(&s, &req.model)?;
        let params = sampling(req.sampling()?);
        let format = Format {
            shape: Shape::Completion,
            logprobs: params.logprobs,
        };
        let prompts = req.prompts().into_iter().map(Prompt::Text).collect();
        let seqs = start(engine, prompts, req.n.unwrap_or(1) as u32, &params).await?;
        let (stream, usage) = (req.is_stream(), req.include_usage());
        finish(format, engine, seqs, stream, usage, arrived).await
    }
    .await;
    res.unwrap_or_else(IntoResponse::into_response)
}

async fn finish(
    format: Format,
    engine: &TextEngine,
    seqs: Vec<crate::generate::Sequence>,
    stream: bool,
    include_usage: bool,
    arrived: Instant,
) -> Result<Response, ApiError> {
    if stream {
        let body = Body::from_stream(respond_stream(format, engine.name(), seqs, include_usage));
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response());
    }
    let (whole, times) = respond_whole(format, engine.name(), seqs).await?;
    let mut resp = Json(whole).into_response();
    // The time to the first token, which the scheduler cannot see in an answer it gets
    // whole (milliseconds from the request's arrival, fractional), and the engine time.
    let ms =
        |d: std::time::Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3));
    if let Some(t) = times.first_token
        && let Ok(v) = ms(t.saturating_duration_since(arrived))
    {
        resp.headers_mut().insert(headers::FIRST_TOKEN_MS, v);
    }
    if let Ok(v) = ms(times.busy) {
        resp.headers_mut().insert(headers::BUSY_MS, v);
    }
    Ok(resp)
}

async fn embeddings(State(s): State<AgentState>, body: Body) -> Response {
    let res = async {
        let req: EmbeddingRequest = read_body(&s, body).await?;
        req.validate()?;
        let Some(model) = s.models.embedding.get(&req.model) else {
            if s.models.chat.contains_key(&req.model) {
                return Err(ApiError::invalid_param(
                    "model",
                    format!(
                        "`{}` is a chat model and has no embeddings endpoint here",
                        req.model
                    ),
                ));
            }
            return Err(ApiError::model_not_found(&req.model));
        };
        let dims = model.engine.dimensions();
        if let Some(d) = req.dimensions
            && d as usize != dims
        {
            return Err(ApiError::invalid_param(
                "dimensions",
                format!(
                    "`{}` produces {dims}-dimensional vectors and cannot shorten them",
                    req.model
                ),
            ));
        }
        let inputs = match &req.input {
            EmbeddingInput::One(s) => vec![s.clone()],
            EmbeddingInput::Many(v) => v.clone(),
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenBatches(_) => {
                return Err(ApiError::invalid_param(
                    "input",
                    "token-id input is not supported; send strings",
                ));
            }
        };
        let out = {
            let _in_flight = InFlight::new(&model.in_flight);
            model.engine.embed(inputs).await
        }
        .map_err(crate::generate::engine_error)?;
        let data = out
            .vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| EmbeddingData {
                object: "embedding".into(),
                index: i as u32,
                embedding: if req.wants_base64() {
                    EmbeddingVector::Base64(flotilla_api::openai::encode_f32_base64(&v))
                } else {
                    EmbeddingVector::Float(v)
                },
            })
            .collect();
        let tokens = out.prompt_tokens as u64;
        Ok(Json(EmbeddingResponse {
            object: "list".into(),
            data,
            model: req.model.clone(),
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        })
        .into_response())
    }
    .await;
    res.unwrap_or_else(IntoResponse::into_response)
}

/// Counts one request in flight until dropped, also when the client goes away mid-request
/// and the handler future is dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn models(State(s): State<AgentState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: s
            .models
            .names()
            .iter()
            .map(|(n, _)| ModelCard::new(n, "flotilla"))
            .collect(),
    })
}

async fn status(State(s): State<AgentState>) -> Json<serde_json::Value> {
    let report = crate::heartbeat::report(&s, s.telemetry().await);
    let engines: serde_json::Map<String, serde_json::Value> = s
        .models
        .chat
        .iter()
        .map(|(n, e)| {
            (
                n.clone(),
                serde_json::to_value(e.status()).unwrap_or_default(),
            )
        })
        .collect();
    Json(serde_json::json!({
        "node": report,
        "engines": engines,
        "in_flight": s.drain.in_flight(),
    }))
}
