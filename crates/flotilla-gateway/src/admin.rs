//! The admin API (`/admin/v1/...`): the fleet, the request ledger, the savings report and
//! API keys. Every route needs the admin token or an admin key.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_api::body::{parse_json, read_limited};
use flotilla_api::{ApiError, ErrorKind};
use flotilla_scheduler::{ModelGroup, NodeState};
use flotilla_state::{NewKey, RequestQuery, SavingsQuery, StateError};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::check_admin;
use crate::health::{HealthDetail, cloud_key, local_key};
use crate::queue::QueueRow;

fn state_error(e: StateError) -> ApiError {
    match e.kind() {
        ErrorKind::InvalidRequest => ApiError::invalid(e.to_string()),
        kind => {
            tracing::error!(error = %e, "ledger query failed");
            ApiError::new(
                kind,
                "the ledger could not be read; see the scheduler's log",
            )
        }
    }
}

/// The fleet as `flotilla status` and the dashboard draw it.
pub(crate) async fn nodes(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Err(e) = check_admin(&s, &h).await {
        return e.into_response();
    }
    Json(serde_json::json!({
        "heartbeat_ms": s.inner.config().heartbeat.as_millis() as u64,
        "missed_heartbeats": s.inner.config().missed_heartbeats,
        "nodes": s.inner.fleet.snapshot(Instant::now()),
    }))
    .into_response()
}

/// One target the scheduler may route to, as `/admin/v1/targets` lists it.
#[derive(Debug, Serialize)]
struct TargetRow {
    /// The health key: `local:NODE/MODEL` or `cloud:PROVIDER/MODEL`.
    target: String,
    kind: &'static str,
    /// The node (local) or provider (cloud).
    at: String,
    /// The model's name there.
    model: String,
    /// The public model names whose requests may go there.
    serves: Vec<String>,
    /// Local targets: the node's state (`healthy`, `draining`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    node_state: Option<NodeState>,
    #[serde(flatten)]
    health: HealthDetail,
}

/// `GET /admin/v1/targets`: every target requests may go to (the agents' models, the
/// configured cloud models, and any other with health kept), each with its breaker, EWMAs
/// and load; and the local queues.
pub(crate) async fn targets(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Err(e) = check_admin(&s, &h).await {
        return e.into_response();
    }
    let now = Instant::now();
    let inner = &s.inner;
    let cfg = inner.config();
    let mut groups: Vec<&ModelGroup> = cfg.groups.values().collect();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows: BTreeMap<String, TargetRow> = BTreeMap::new();
    let new_row = |key: &str, kind, at: &str, model: &str, node_state| TargetRow {
        health: inner.health.detail(key, now),
        target: key.to_owned(),
        kind,
        at: at.to_owned(),
        model: model.to_owned(),
        serves: Vec::new(),
        node_state,
    };
    for node in inner.fleet.snapshot(now) {
        for m in &node.models {
            let name = &m.model.name;
            let key = local_key(&node.node_id, name);
            let r = rows
                .entry(key.clone())
                .or_insert_with(|| new_row(&key, "local", &node.node_id, name, Some(node.state)));
            let by: Vec<String> = groups
                .iter()
                .filter(|g| &g.local_model == name)
                .map(|g| g.name.clone())
                .collect();
            // A model no group names is served under its own name.
            r.serves = if by.is_empty() && !cfg.groups.contains_key(name) {
                vec![name.clone()]
            } else {
                by
            };
        }
    }
    for g in &groups {
        for c in &g.cloud {
            let key = cloud_key(&c.provider, &c.model);
            let r = rows
                .entry(key.clone())
                .or_insert_with(|| new_row(&key, "cloud", &c.provider, &c.model, None));
            r.health.max_concurrency = c.max_concurrency;
            r.serves.push(g.name.clone());
        }
    }
    // Targets with health but gone from the fleet and the config (a node that left).
    for key in inner.health.keys() {
        if let std::collections::btree_map::Entry::Vacant(slot) = rows.entry(key) {
            let key = slot.key();
            let (kind, rest) = key.split_once(':').unwrap_or(("", key));
            let (at, model) = rest.split_once('/').unwrap_or((rest, ""));
            let kind = if kind == "cloud" { "cloud" } else { "local" };
            let row = new_row(key, kind, at, model, None);
            slot.insert(row);
        }
    }
    let queues: Vec<QueueRow> = inner
        .queues
        .depths()
        .into_iter()
        .map(QueueRow::from)
        .collect();
    Json(serde_json::json!({
        "targets": rows.into_values().collect::<Vec<_>>(),
        "queues": queues,
    }))
    .into_response()
}

/// A time bound: unix milliseconds, or a UTC date `YYYY-MM-DD` (its midnight).
fn time_param(name: &str, v: Option<&String>) -> Result<Option<i64>, ApiError> {
    let Some(v) = v.map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    flotilla_state::date_to_ms(v).map(Some).ok_or_else(|| {
        ApiError::invalid_param(
            name,
            format!("`{name}` must be unix milliseconds or a date YYYY-MM-DD, got `{v}`"),
        )
    })
}

/// `GET /admin/v1/requests?from&to&key&model&target&status&limit&cursor`: ledger rows,
/// newest first, with their attempts.
pub(crate) async fn requests(
    State(s): State<AppState>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "from" | "to" | "key" | "model" | "target" | "status" | "limit" | "cursor"
            ) {
                return Err(ApiError::invalid_param(
                    k,
                    format!("unknown query parameter `{k}` (from, to, key, model, target, status, limit, cursor)"),
                ));
            }
        }
        let limit = match q.get("limit") {
            None => 100,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid_param(
                        "limit",
                        format!("`limit` must be between 1 and 1000, got `{v}`"),
                    ));
                }
            },
        };
        let query = RequestQuery {
            from_ms: time_param("from", q.get("from"))?,
            to_ms: time_param("to", q.get("to"))?,
            api_key_id: q.get("key").cloned(),
            model: q.get("model").cloned(),
            target: q.get("target").cloned(),
            status: q.get("status").cloned(),
            limit,
            cursor: q.get("cursor").cloned(),
        };
        let page = s.inner.ledger.requests(&query).await.map_err(state_error)?;
        Ok(Json(serde_json::json!({
            "object": "list",
            "data": page.data,
            "next_cursor": page.next_cursor,
            "has_more": page.next_cursor.is_some(),
        }))
        .into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

/// The most GPUs a savings report prices (far more than any real fleet).
const MAX_GPUS: f64 = 1e6;

/// `GET /admin/v1/savings?from&to&gpus`: actual cost against the same traffic on the
/// default cloud provider, by day and model, and the total under both accountings of owned
/// GPUs: marginal (busy GPU time) and owned (every GPU-hour of the window; `gpus` defaults
/// to the GPUs the fleet reports now).
pub(crate) async fn savings(
    State(s): State<AppState>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        let query = SavingsQuery {
            from_ms: time_param("from", q.get("from"))?,
            to_ms: time_param("to", q.get("to"))?,
        };
        let report = s.inner.ledger.savings(&query).await.map_err(state_error)?;
        let gpus = match q.get("gpus") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|g| (0.0..=MAX_GPUS).contains(g))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "gpus",
                        format!("`gpus` must be a number from 0 to {MAX_GPUS}, got `{v}`"),
                    )
                })?,
            None => s
                .inner
                .fleet
                .snapshot(Instant::now())
                .iter()
                .map(|n| n.gpus.len() as f64)
                .sum(),
        };
        let cfg = s.inner.config();
        let accountings = report.accountings(&query, gpus, cfg.gpu_hour_usd);
        Ok(Json(serde_json::json!({
            "baseline_provider": cfg.default_provider,
            "rows": report.rows,
            "by_model": report.by_model,
            "total": report.total,
            "accountings": accountings,
        }))
        .into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

/// `GET /admin/v1/keys`: every key, without secrets.
pub(crate) async fn keys(State(s): State<AppState>, h: HeaderMap) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        let keys = s.inner.ledger.keys().await.map_err(state_error)?;
        Ok(Json(serde_json::json!({"object": "list", "data": keys})).into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    budget_usd: Option<f64>,
    #[serde(default)]
    rpm: Option<u32>,
    #[serde(default)]
    tpm: Option<u64>,
    #[serde(default)]
    admin: bool,
}

/// `POST /admin/v1/keys`: makes a key; the answer is the only time its secret is shown.
pub(crate) async fn create_key(State(s): State<AppState>, h: HeaderMap, body: Body) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        let bytes = read_limited(body, 64 * 1024, s.inner.config().body_timeout).await?;
        let req: CreateKey = parse_json(&bytes)?;
        let (key, secret) = s
            .inner
            .ledger
            .create_key(&NewKey {
                name: req.name,
                budget_usd: req.budget_usd,
                rpm: req.rpm,
                tpm: req.tpm,
                admin: req.admin,
            })
            .await
            .map_err(state_error)?;
        tracing::info!(key_id = %key.id, name = %key.name, "API key created");
        crate::auth::know_key(&s, &secret, key.clone());
        let mut v = serde_json::to_value(&key)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        v["key"] = serde_json::Value::String(secret);
        Ok((StatusCode::CREATED, Json(v)).into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

/// `DELETE /admin/v1/keys/{id}`: revokes a key (by id or name) at once on this replica.
pub(crate) async fn revoke_key(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        if !s.inner.ledger.revoke_key(&id).await.map_err(state_error)? {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no API key `{id}`"),
            ));
        }
        crate::auth::forget_key(&s, &id);
        tracing::info!(key = %id, "API key revoked");
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}

/// `POST /admin/v1/reload`: re-reads the config and applies it from the next request; an
/// invalid file gets a 400 listing every problem, and the running config stays.
pub(crate) async fn reload(State(s): State<AppState>, h: HeaderMap) -> Response {
    let res = async {
        check_admin(&s, &h).await?;
        // Reading and validating the file is blocking work (files, secrets from the
        // environment): off the runtime's workers.
        let state = s.clone();
        let done = tokio::task::spawn_blocking(move || state.reload())
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        match done {
            Ok(report) => Ok(Json(report).into_response()),
            Err(e @ crate::ReloadError::Invalid(_)) => {
                tracing::warn!(error = %e, "config reload rejected");
                Err(ApiError::invalid(e.to_string()).with_code("invalid_config"))
            }
            Err(e) => Err(ApiError::new(ErrorKind::Unavailable, e.to_string())),
        }
    }
    .await;
    res.unwrap_or_else(|e: ApiError| e.into_response())
}
