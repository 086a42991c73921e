//! Thin handlers: read and validate, call dispatch, map the error.

use std::time::Instant;

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use flotilla_api::openai::{
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard, ModelList, OpenAiRequest,
};
use flotilla_api::protocol::{
    DEREGISTER_PATH, HEARTBEAT_PATH, HeartbeatAck, NodeReport, PROTOCOL_VERSION,
};
use flotilla_api::{ApiError, ErrorKind};
use flotilla_scheduler::Upsert;

use crate::AppState;
use crate::accounting::Tally;
use crate::dispatch::{Routed, dispatch};
use flotilla_api::body::{parse_json, read_limited};
use flotilla_providers::Endpoint;
use tokio_util::sync::CancellationToken;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(crate::dashboard::page))
        .route("/dashboard/data", get(crate::dashboard::data))
        .route("/admin/v1/nodes", get(crate::admin::nodes))
        .route("/admin/v1/targets", get(crate::admin::targets))
        .route("/admin/v1/requests", get(crate::admin::requests))
        .route("/admin/v1/savings", get(crate::admin::savings))
        .route("/admin/v1/reload", post(crate::admin::reload))
        .route(
            "/admin/v1/keys",
            get(crate::admin::keys).post(crate::admin::create_key),
        )
        .route("/admin/v1/keys/{id}", delete(crate::admin::revoke_key))
        .route(HEARTBEAT_PATH, post(heartbeat))
        .route(
            &format!("{DEREGISTER_PATH}/{{node_id}}"),
            delete(deregister),
        )
        .fallback(|| async {
            ApiError::new(ErrorKind::NotFound, "no such endpoint").into_response()
        })
        // Bodies are read by `read_limited` with the configured limit instead.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// A request id that grows with time (UUIDv7: milliseconds, then random bits), so the
/// ledger's primary-key index takes each new row at its end. Random (v4) ids scattered the
/// inserts over the whole index: 40–56 µs of CPU a row instead of 9–13
/// (`examples/ledger_insert.rs`, 300k rows).
fn new_request_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

pub(crate) fn error_response(err: ApiError, request_id: &str) -> Response {
    let mut resp = err.into_response();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(crate::dispatch::REQUEST_ID, v);
    }
    resp
}

async fn chat(State(s): State<AppState>, h: HeaderMap, body: Body) -> Response {
    handle::<ChatCompletionRequest>(&s, Endpoint::Chat, &h, body).await
}

async fn completions(State(s): State<AppState>, h: HeaderMap, body: Body) -> Response {
    handle::<CompletionRequest>(&s, Endpoint::Completions, &h, body).await
}

async fn embeddings(State(s): State<AppState>, h: HeaderMap, body: Body) -> Response {
    handle::<EmbeddingRequest>(&s, Endpoint::Embeddings, &h, body).await
}

async fn metrics(State(s): State<AppState>, h: HeaderMap) -> Response {
    let auth = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = flotilla_api::check_bearer(
        s.inner.config().metrics_token.as_ref(),
        auth,
        "metrics token",
    ) {
        return e.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            flotilla_api::metrics::TEXT_CONTENT_TYPE,
        )],
        crate::metrics::render(&s),
    )
        .into_response()
}

/// Read, parse and validate one OpenAI request, then hand it to the failover loop. Errors
/// carry the request id like answers do.
pub(crate) async fn handle<R: OpenAiRequest>(
    s: &AppState,
    ep: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let id = new_request_id();
    let cfg = s.inner.config();
    // Set once the request has an account: from then on its end is counted with its row.
    let mut tallied = false;
    let res = async {
        let key = crate::auth::authenticate(s, headers).await?;
        let bytes = read_limited(body, cfg.max_body_bytes, cfg.body_timeout).await?;
        // One parse of the text; the typed request is read from that tree (it checks the
        // shape), and the tree itself is what goes upstream, as the client wrote it.
        let value: serde_json::Value = parse_json(&bytes)?;
        let req = R::deserialize(&value)
            .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?;
        let tally = Tally::new(s, &id, ep, req.model(), req.is_stream(), key);
        tallied = true;
        if let Err(e) = req.validate() {
            tally.failed(&e).await;
            return Err(e);
        }
        let client_usage = value
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let max_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| value.get(*k).and_then(serde_json::Value::as_u64));
        // A key with a budget pays for what its request started even when its client
        // leaves, so that request runs on its own task; others run here and stop when
        // the client goes (their row says so, the cost of an attempt cut short unknown).
        let budgeted = tally.key().is_some_and(|k| k.budget_usd.is_some());
        if !budgeted {
            let routed = Routed {
                ep,
                model: req.model(),
                stream: req.is_stream(),
                client_usage,
                max_tokens,
                body: value,
                headers,
                request_id: &id,
                gone: &NEVER_GONE,
            };
            return dispatch(s, routed, tally).await;
        }
        let job = Job {
            state: s.clone(),
            ep,
            model: req.model().to_owned(),
            stream: req.is_stream(),
            client_usage,
            max_tokens,
            body: value,
            headers: headers.clone(),
            request_id: id.clone(),
        };
        job.run(tally).await
    }
    .await;
    res.unwrap_or_else(|e| {
        if !tallied {
            s.inner.metrics.refused(e.kind.http_status());
        }
        error_response(e, &id)
    })
}

/// The client of a request that runs on the client's own connection: when it leaves, the
/// request is dropped with it, so nothing needs telling.
static NEVER_GONE: std::sync::LazyLock<CancellationToken> =
    std::sync::LazyLock::new(CancellationToken::new);

/// A request handed to its own task. The task runs on when the client goes away
/// mid-attempt, so the answer it pays for is read and charged (provider usage, not $0);
/// a request not yet sent anywhere is dropped then.
struct Job {
    state: AppState,
    ep: Endpoint,
    model: String,
    stream: bool,
    client_usage: bool,
    max_tokens: Option<u64>,
    body: serde_json::Value,
    headers: HeaderMap,
    request_id: String,
}

impl Job {
    async fn run(self, mut tally: Tally) -> Result<Response, ApiError> {
        let gone = CancellationToken::new();
        tally.watch(gone.clone());
        // Dropped with this future when the client disconnects; disarmed on the way out.
        let watch = gone.clone().drop_guard();
        let task = tokio::spawn(async move {
            let routed = Routed {
                ep: self.ep,
                model: &self.model,
                stream: self.stream,
                client_usage: self.client_usage,
                max_tokens: self.max_tokens,
                body: self.body,
                headers: &self.headers,
                request_id: &self.request_id,
                gone: &gone,
            };
            dispatch(&self.state, routed, tally).await
        });
        let out = task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request's task failed");
            Err(ApiError::new(
                ErrorKind::Internal,
                "the request failed inside the scheduler",
            ))
        });
        watch.disarm();
        out
    }
}

async fn models(State(s): State<AppState>, h: HeaderMap) -> Response {
    // The model list is the API's like any other path: with keys on, it needs one.
    if let Err(e) = crate::auth::authenticate(&s, &h).await {
        return e.into_response();
    }
    let mut names: Vec<String> = s.inner.config().groups.keys().cloned().collect();
    names.extend(
        s.inner
            .fleet
            .served_models(Instant::now())
            .into_iter()
            .map(|(n, _)| n),
    );
    names.sort();
    names.dedup();
    Json(ModelList {
        object: "list".into(),
        data: names
            .iter()
            .map(|n| ModelCard::new(n, "flotilla"))
            .collect(),
    })
    .into_response()
}

/// The fleet as `/admin/v1/nodes` shows it, plus the model groups: for the admin token (or
/// an admin key) and for agents' cluster token.
async fn status(State(s): State<AppState>, h: HeaderMap) -> Response {
    let agent = s.inner.cluster_token.is_some() && check_cluster_token(&s, &h).is_ok();
    if !agent && let Err(e) = crate::auth::check_admin(&s, &h).await {
        return e.into_response();
    }
    let mut groups: Vec<_> = s.inner.config().groups.values().cloned().collect();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    Json(serde_json::json!({
        "nodes": s.inner.fleet.snapshot(Instant::now()),
        "models": groups,
    }))
    .into_response()
}

fn check_cluster_token(s: &AppState, h: &HeaderMap) -> Result<(), ApiError> {
    let auth = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    flotilla_api::check_bearer(s.inner.cluster_token.as_ref(), auth, "cluster token")
}

async fn heartbeat(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    body: Body,
) -> Response {
    let res = async {
        let cfg = s.inner.config();
        crate::trust::check_agent_source(&cfg, Some(peer.ip()))?;
        check_cluster_token(&s, &h)?;
        let limit = cfg.max_body_bytes.min(crate::trust::HEARTBEAT_MAX_BYTES);
        let bytes = read_limited(body, limit, cfg.body_timeout).await?;
        let report: NodeReport = parse_json(&bytes)?;
        if report.protocol != PROTOCOL_VERSION {
            return Err(ApiError::invalid(format!(
                "agent speaks protocol {}, this scheduler speaks {PROTOCOL_VERSION}",
                report.protocol
            )));
        }
        if report.node_id.is_empty() || report.base_url.is_empty() {
            return Err(ApiError::invalid("node_id and base_url must not be empty"));
        }
        let node_id = report.node_id.clone();
        s.inner.claims.admit(
            &node_id,
            &report.base_url,
            crate::trust::credential(&h),
            s.inner.fleet.registered_at(&node_id, Instant::now()),
        )?;
        let models: Vec<String> = report.models.iter().map(|m| m.name.clone()).collect();
        let gpus = report.gpus.len();
        if let Some(sh) = &s.inner.shared {
            // Every replica hears of it at once (and later ones find it in the store).
            let (report, seen) = (report.clone(), crate::shared::now_ms());
            crate::shared::spawn_shared(sh, move |sh| async move {
                sh.put_node(&report, seen, flotilla_scheduler::fleet::FORGET_AFTER)
                    .await;
            });
        }
        let change = s.inner.fleet.upsert(report, Instant::now());
        // New load figures may free slots for queued requests.
        s.inner.queues.wake.notify_one();
        match change {
            Upsert::Joined => {
                tracing::info!(node_id = %node_id, models = ?models, gpus, "node joined")
            }
            Upsert::Recovered => tracing::info!(node_id = %node_id, "node heartbeats again"),
            Upsert::StartedDraining => {
                tracing::info!(node_id = %node_id, "node draining: no new work goes to it")
            }
            Upsert::Unchanged => {}
        }
        Ok(Json(HeartbeatAck {
            heartbeat_ms: s.inner.config().heartbeat.as_millis() as u64,
        })
        .into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

async fn deregister(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(node_id): Path<String>,
) -> Response {
    if let Err(e) = check_cluster_token(&s, &h) {
        return e.into_response();
    }
    if !s
        .inner
        .claims
        .may_remove(&node_id, &crate::trust::credential(&h))
    {
        return ApiError::new(
            ErrorKind::Unauthorized,
            format!("node `{node_id}` registered with a token; only that token removes it"),
        )
        .with_code("node_claimed")
        .into_response();
    }
    s.inner.claims.forget(&node_id);
    if let Some(sh) = &s.inner.shared {
        let id = node_id.clone();
        crate::shared::spawn_shared(sh, move |sh| async move {
            sh.remove_node(&id).await;
        });
    }
    if s.inner.fleet.remove(&node_id) {
        s.inner.queues.wake.notify_one();
        tracing::info!(node_id = %node_id, "node left");
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError::new(
            ErrorKind::NotFound,
            format!("node `{node_id}` is not registered"),
        )
        .into_response()
    }
}
