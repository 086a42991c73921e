//! Carries one request down the scheduler's ordered target list until a target answers.

use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::protocol::ModelKind;
use flotilla_api::{ApiError, ErrorKind, headers};
use flotilla_providers::{ProviderError, Upstream};
use flotilla_scheduler::{ModelGroup, Target, plan_route};
use serde_json::Value;

use crate::AppState;
use crate::stream::relay_sse;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
    fn kind(self) -> ModelKind {
        match self {
            Endpoint::Chat | Endpoint::Completions => ModelKind::Chat,
            Endpoint::Embeddings => ModelKind::Embedding,
        }
    }
}

fn resolve_group(s: &AppState, model: &str, kind: ModelKind) -> Result<ModelGroup, ApiError> {
    if let Some(g) = s.inner.config.groups.get(model) {
        return Ok(g.clone());
    }
    if s.inner.fleet.knows_model(model, Some(kind)) {
        return Ok(ModelGroup::implicit(
            model,
            s.inner.config.default_max_queue_depth,
        ));
    }
    if s.inner.fleet.knows_model(model, None) {
        let what = match kind {
            ModelKind::Chat => "text generation",
            ModelKind::Embedding => "embeddings",
        };
        return Err(ApiError::invalid_param(
            "model",
            format!("`{model}` is served here, but not for {what}"),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// Tries each target of the plan in order. A target that fails before the first byte of
/// its answer with a retryable error (connection, timeout, 5xx, 429) hands the request to
/// the next; a non-retryable answer (the request's own fault, e.g. context too long) goes
/// back to the client as it is.
pub(crate) async fn dispatch(
    s: &AppState,
    ep: Endpoint,
    model: &str,
    stream: bool,
    mut body: Value,
    request_id: &str,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let group = resolve_group(s, model, ep.kind())?;
    let candidates = s
        .inner
        .fleet
        .candidates(&group.local_model, ep.kind(), started);
    let plan = plan_route(&group, &candidates)?;
    let mut failures: Vec<ProviderError> = Vec::new();

    for target in &plan.targets {
        let label = target.label();
        let (upstream, guard) = match target {
            Target::Local {
                node_id,
                base_url,
                model,
            } => (
                s.inner.pool.upstream(
                    &label,
                    &format!("{}/v1", base_url.trim_end_matches('/')),
                    None,
                ),
                Some(s.inner.fleet.acquire(node_id, model)),
            ),
            Target::Cloud { provider, .. } => match s.inner.providers.get(provider) {
                Some(Ok(up)) => (up.clone(), None),
                Some(Err(reason)) => {
                    failures.push(ProviderError::Connect {
                        target: label,
                        reason: reason.clone(),
                    });
                    continue;
                }
                None => {
                    failures.push(ProviderError::Connect {
                        target: label,
                        reason: "provider not configured".into(),
                    });
                    continue;
                }
            },
        };
        body["model"] = Value::String(target.model().to_owned());

        let result = match upstream.post_json(ep.path(), &body, stream).await {
            Ok(resp) if stream => Ok(Answer::Stream(resp)),
            Ok(resp) => upstream.read_json(resp).await.map(Answer::Json),
            Err(e) => Err(e),
        };
        match result {
            Ok(answer) => {
                tracing::info!(
                    request_id,
                    model,
                    reason = plan.reason.as_str(),
                    upstream = %label,
                    failed_attempts = failures.len(),
                    stream,
                    "routed"
                );
                return Ok(respond(answer, &upstream, &label, request_id, s, guard));
            }
            Err(e) => {
                // An agent that refuses connections or does not answer in time gets no
                // more work until its next heartbeat says it is alive.
                if let (
                    Target::Local { node_id, .. },
                    ProviderError::Connect { .. } | ProviderError::Timeout { .. },
                ) = (target, &e)
                {
                    s.inner.fleet.mark_unreachable(node_id);
                }
                if !e.is_retryable() {
                    tracing::info!(request_id, model, upstream = %label, error = %e, "upstream rejected the request");
                    return Err(e.to_api_error());
                }
                tracing::warn!(request_id, model, upstream = %label, error = %e, "attempt failed; trying the next target");
                failures.push(e);
            }
        }
    }

    tracing::warn!(
        request_id,
        model,
        attempts = failures.len(),
        "every target failed"
    );
    Err(all_failed(model, &failures))
}

enum Answer {
    Stream(reqwest::Response),
    Json(Value),
}

fn respond(
    answer: Answer,
    upstream: &Upstream,
    label: &str,
    request_id: &str,
    s: &AppState,
    guard: Option<flotilla_scheduler::InFlightGuard>,
) -> Response {
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(
            headers::TARGET,
            HeaderValue::from_str(label).unwrap_or(HeaderValue::from_static("unknown")),
        )
        .header(
            headers::REQUEST_ID,
            HeaderValue::from_str(request_id).unwrap_or(HeaderValue::from_static("")),
        );
    let built = match answer {
        Answer::Stream(resp) => builder
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(relay_sse(
                resp,
                upstream.label().to_owned(),
                s.inner.config.timeouts.first_byte,
                guard,
            )),
        Answer::Json(v) => {
            drop(guard);
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string()))
        }
    };
    built.unwrap_or_else(|e| ApiError::new(ErrorKind::Internal, e.to_string()).into_response())
}

/// 503 naming every attempt, or the last upstream's own status when that is more telling
/// (e.g. every target rate-limited: 429).
fn all_failed(model: &str, failures: &[ProviderError]) -> ApiError {
    if failures.is_empty() {
        return ApiError::new(
            ErrorKind::Unavailable,
            format!("no target available for model `{model}`"),
        )
        .with_code("no_target_available");
    }
    let detail: Vec<String> = failures.iter().map(ToString::to_string).collect();
    let all_rate_limited = failures.iter().all(|f| f.kind() == ErrorKind::RateLimited);
    let kind = if all_rate_limited {
        ErrorKind::RateLimited
    } else {
        ErrorKind::Unavailable
    };
    ApiError::new(
        kind,
        format!(
            "every target for model `{model}` failed: {}",
            detail.join("; ")
        ),
    )
    .with_code("no_target_available")
}
