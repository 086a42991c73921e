//! One request from decision to answer: ask the policy, wait in the local queue when it
//! says so (spilling to the cloud when the wait would miss the deadline), then carry the
//! request down its target list — retrying connection errors, timeouts, 5xx and 429 before
//! the first byte on the next target with backoff, within an attempt count and a time
//! budget — and record every attempt's outcome in the targets' health.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::protocol::ModelKind;
use flotilla_api::{ApiError, ErrorKind, headers};
use flotilla_providers::{Endpoint, ProviderError, UpstreamResponse};
use flotilla_scheduler::{
    Action, Decision, InFlightGuard, MidStream, ModelGroup, Outcome, PolicySettings, ReasonCode,
    RequestInfo, Snapshot, Target, decide,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::accounting::{AnswerText, Pricing, Tally};
use crate::attempt::{
    self, Attempt, failed_after_headers, first_token_header, ledger_outcome, ms_header,
    open_attempt,
};
use crate::auth::{admit_key, chargeable, max_cost};
use crate::health::{cloud_key, local_key};
use crate::queue::Wake;
use crate::stream::{Continuation, RelayCtx, first_token, relay_sse};
use crate::{AppState, SchedulerConfig};

fn kind_of(ep: Endpoint) -> ModelKind {
    match ep {
        Endpoint::Chat | Endpoint::Completions => ModelKind::Chat,
        Endpoint::Embeddings => ModelKind::Embedding,
    }
}

/// A request ready to route.
pub(crate) struct Routed<'a> {
    pub ep: Endpoint,
    pub model: &'a str,
    pub stream: bool,
    /// The client asked for the stream's usage chunk.
    pub client_usage: bool,
    /// `max_completion_tokens` or `max_tokens`, when the request sets one.
    pub max_tokens: Option<u64>,
    pub body: Value,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
    /// Cancelled when the client goes away. A request still waiting for its turn is then
    /// dropped; an attempt under way runs to its answer, so what it generated is paid for.
    pub gone: &'a CancellationToken,
}

fn resolve_group<'a>(
    s: &AppState,
    cfg: &'a SchedulerConfig,
    model: &str,
    kind: ModelKind,
) -> Result<Cow<'a, ModelGroup>, ApiError> {
    if let Some(g) = cfg.groups.get(model) {
        return Ok(Cow::Borrowed(g));
    }
    if s.inner.fleet.knows_model(model, Some(kind)) {
        return Ok(Cow::Owned(cfg.implicit_group(model)));
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

/// Asks the policy, with the current fleet, health and queue.
fn decide_now(
    s: &AppState,
    settings: &PolicySettings,
    group: &ModelGroup,
    kind: ModelKind,
    info: &RequestInfo,
) -> Result<Decision, ApiError> {
    let inner = &s.inner;
    let now = Instant::now();
    let mut locals = inner.fleet.candidates(&group.local_model, kind, now);
    for c in &mut locals {
        c.health = inner.health.view(&local_key(&c.node_id, &c.model), 0, now);
    }
    let cloud: Vec<_> = group
        .cloud
        .iter()
        .map(|c| {
            let key = cloud_key(&c.provider, &c.model);
            inner.health.view(&key, c.max_concurrency, now)
        })
        .collect();
    let waiting = inner.queues.waiting(&group.local_model, kind);
    let affinity = info
        .prefix
        .and_then(|p| inner.affinity(&group.local_model, p));
    let snap = Snapshot {
        group,
        locals: &locals,
        cloud: &cloud,
        waiting: &waiting,
        affinity: affinity.as_deref(),
        settings,
        now,
    };
    Ok(decide(&snap, info)?)
}

/// The tokens a request is counted for against per-minute limits before it runs: its
/// prompt and its longest answer.
fn counted_tokens(info: &RequestInfo, r: &Routed<'_>) -> u64 {
    info.prompt_tokens
        .saturating_add(r.max_tokens.unwrap_or(info.max_tokens))
}

/// Routes one request and returns the answer (or the error every target gave). The
/// request's account goes to the ledger when it ends, whichever way it ends.
pub(crate) async fn dispatch(
    s: &AppState,
    r: Routed<'_>,
    tally: Tally,
) -> Result<Response, ApiError> {
    let mut slot = Some(tally);
    match route(s, &r, &mut slot).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            if let Some(t) = slot.take() {
                t.failed(&e).await;
            }
            Err(e)
        }
    }
}

async fn route(
    s: &AppState,
    r: &Routed<'_>,
    tally: &mut Option<Tally>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let cfg = s.inner.config();
    let group = resolve_group(s, &cfg, r.model, kind_of(r.ep))?;
    if let Some(t) = tally.as_mut() {
        t.model_known();
    }
    let key = tally.as_ref().and_then(|t| t.key().cloned());
    let group = chargeable(s, group, key.as_deref(), kind_of(r.ep))?;
    let mut info =
        crate::features::request_info(&cfg, &r.body, r.headers, r.request_id, key.as_deref())?;
    if let Some(t) = tally.as_mut() {
        t.request(&info);
        if let Some(k) = &key {
            let tokens = counted_tokens(&info, r);
            let reservation =
                admit_key(s, k, tokens, max_cost(s, &group, &info, r.max_tokens)).await?;
            t.hold(reservation, tokens);
        }
    }
    loop {
        info.waited = arrived.elapsed();
        let decision = decide_now(s, &cfg.policy, &group, kind_of(r.ep), &info)?;
        if let Some(t) = tally.as_mut() {
            t.decision(&decision);
        }
        s.inner.metrics.decision(decision.code);
        log_decision(r, &info, &decision);
        let (targets, guard, why) = match &decision.action {
            Action::Dispatch { targets } => (targets.clone(), None, decision.code),
            Action::Enqueue {
                spill_after,
                fallbacks,
            } => {
                let waited = Waited {
                    group: &group,
                    info: &info,
                    arrived,
                    spill_after: *spill_after,
                };
                let woke = wait_in_queue(s, r, &waited, tally).await?;
                match leave_queue(s, r, &waited, woke, fallbacks, decision.code)? {
                    Some(next) => next,
                    None => continue,
                }
            }
        };
        if let (Some(t), Some(Target::Cloud { .. })) = (tally.as_mut(), targets.first()) {
            t.sent_to_cloud(why);
        }
        let c = Carry {
            r,
            group: &group,
            info: &info,
            decision: &decision,
            arrived,
        };
        return carry(s, &c, targets, guard, tally).await;
    }
}

/// One info line per request: "routed" (with this decision) or, for a request that
/// waits, "queued" now and "routed" when it leaves.
fn log_decision(r: &Routed<'_>, info: &RequestInfo, decision: &Decision) {
    if matches!(decision.action, Action::Enqueue { .. }) {
        tracing::info!(
            request_id = r.request_id,
            model = r.model,
            priority = info.priority.as_str(),
            strategy = decision.strategy.as_str(),
            reason = decision.code.as_str(),
            detail = %decision.reason,
            predicted_ttft_ms = decision.predicted_ttft.as_millis() as u64,
            position = decision.position,
            "queued for a local slot"
        );
    } else {
        tracing::debug!(
            request_id = r.request_id,
            model = r.model,
            reason = decision.code.as_str(),
            detail = %decision.reason,
            "route decision"
        );
    }
}

/// A request about to wait for a local slot.
struct Waited<'a> {
    group: &'a ModelGroup,
    info: &'a RequestInfo,
    arrived: Instant,
    /// Leave the queue for the cloud after this long (the deadline's spill point).
    spill_after: Option<Duration>,
}

/// Waits in the model's local queue for a slot, a reconsideration, or the time to leave
/// (None). A client that goes away meanwhile ends the request at no cost.
async fn wait_in_queue(
    s: &AppState,
    r: &Routed<'_>,
    w: &Waited<'_>,
    tally: &mut Option<Tally>,
) -> Result<Option<Wake>, ApiError> {
    let model = &w.group.local_model;
    let mut ticket = s
        .inner
        .queues
        .enqueue(model, kind_of(r.ep), w.info.priority);
    let left = s
        .inner
        .config()
        .max_queue_wait
        .saturating_sub(w.arrived.elapsed());
    let limit = w.spill_after.map_or(left, |sp| sp.min(left));
    let woke = tokio::select! {
        w = &mut ticket.rx => w.ok(),
        _ = r.gone.cancelled() => {
            // Nothing ran: the account says the client left, at no cost.
            drop(tally.take());
            return Err(client_gone());
        }
        _ = tokio::time::sleep(limit) => {
            // The pump may have handed us a slot just as time ran out.
            ticket.rx.try_recv().ok()
        }
    };
    drop(ticket);
    // Counted once, when the request leaves the queue for good (a reconsidered request
    // may wait again).
    if !matches!(woke, Some(Wake::Reconsider)) {
        s.inner.metrics.queue_wait(model, w.arrived.elapsed());
    }
    Ok(woke)
}

/// The targets to try in order, the local slot a queued request was handed, and why.
type Routes = (Vec<Target>, Option<InFlightGuard>, ReasonCode);

/// Where a request goes once it leaves the queue: the slot it was handed (then its
/// fallbacks), the fallbacks when its time is up, or a 504 when there are none. None: it
/// is to be decided again.
fn leave_queue(
    s: &AppState,
    r: &Routed<'_>,
    w: &Waited<'_>,
    woke: Option<Wake>,
    fallbacks: &[Target],
    code: ReasonCode,
) -> Result<Option<Routes>, ApiError> {
    match woke {
        Some(Wake::Slot(target, guard)) => {
            let mut targets = vec![target];
            targets.extend(fallbacks.iter().cloned());
            Ok(Some((targets, Some(guard), code)))
        }
        Some(Wake::Reconsider) => Ok(None),
        // Time to leave the queue: for the deadline, or after the longest wait.
        None if !fallbacks.is_empty() => {
            tracing::info!(
                request_id = r.request_id,
                model = r.model,
                waited_ms = w.arrived.elapsed().as_millis() as u64,
                upstream = %fallbacks[0].label(),
                "spilled: no local slot in time for the deadline"
            );
            s.inner.metrics.decision(ReasonCode::DeadlineMiss);
            Ok(Some((fallbacks.to_vec(), None, ReasonCode::DeadlineMiss)))
        }
        None => Err(flotilla_scheduler::SchedulerError::QueueTimeout {
            model: w.group.name.clone(),
            waited_ms: w.arrived.elapsed().as_millis() as u64,
        }
        .into()),
    }
}

/// A routed request on its way down its target list.
struct Carry<'a> {
    r: &'a Routed<'a>,
    group: &'a ModelGroup,
    info: &'a RequestInfo,
    decision: &'a Decision,
    arrived: Instant,
}

/// Tries `targets` in order until one answers (`first_guard`: the local slot a queued
/// request was handed).
async fn carry(
    s: &AppState,
    c: &Carry<'_>,
    targets: Vec<Target>,
    mut first_guard: Option<InFlightGuard>,
    tally: &mut Option<Tally>,
) -> Result<Response, ApiError> {
    let Carry {
        r,
        group,
        info,
        arrived,
        ..
    } = *c;
    let cfg = s.inner.config();
    let mut targets: VecDeque<Target> = targets.into();
    let mut failures: Vec<ProviderError> = Vec::new();
    let mut attempts = 0u32;
    let tokens = counted_tokens(info, r);
    while let Some(target) = targets.pop_front() {
        if attempts >= cfg.max_attempts {
            break;
        }
        if attempts > 0 && !back_off(&cfg, r, attempts, arrived).await {
            break;
        }
        let now = Instant::now();
        if let Err(why) = attempt::admit(s, &target, r.ep, tokens).await {
            let label = target.label();
            tracing::info!(request_id = r.request_id, upstream = %label, reason = %why, "skipping target");
            if let Some(t) = tally.as_mut() {
                t.attempt(&label, now, "skipped", None, Some(why));
            }
            continue;
        }
        if r.gone.is_cancelled() {
            // Nothing was sent for this client: its row says it left, at no cost.
            drop(tally.take());
            return Err(client_gone());
        }
        attempts += 1;
        let guard = if target.is_local() {
            first_guard.take()
        } else {
            None
        };
        // The target's name for the account of a cut, once it has moved into the attempt.
        let for_cut = target.is_local().then(|| target.clone());
        let step = Step {
            c,
            target,
            guard,
            started: now,
            rest: &targets,
            attempts_left: cfg.max_attempts.saturating_sub(attempts),
            failed: failures.len(),
        };
        match one_attempt(s, step, tally).await {
            Tried::Answered(resp) => return Ok(resp),
            Tried::Refused(e) => return Err(e),
            Tried::Failed {
                error,
                locals_refuse,
            } => {
                if locals_refuse {
                    // Every agent serves the model alike: the request goes where it fits.
                    targets.retain(|t| !t.is_local());
                }
                failures.push(error);
            }
            Tried::Cut => {
                return Err(match &for_cut {
                    Some(t) => cut_local(s, tally, t, now, group),
                    None => client_gone(),
                });
            }
        }
    }
    tracing::warn!(
        request_id = r.request_id,
        model = r.model,
        attempts = failures.len(),
        "every target failed"
    );
    Err(all_failed(r.model, &failures))
}

/// Waits before the next attempt (doubling from `retry_backoff`, at most 1 s); false when
/// that would pass the retry budget.
async fn back_off(cfg: &SchedulerConfig, r: &Routed<'_>, attempts: u32, arrived: Instant) -> bool {
    let backoff = cfg
        .retry_backoff
        .saturating_mul(1 << (attempts - 1).min(10))
        .min(Duration::from_secs(1));
    if arrived.elapsed() + backoff >= cfg.retry_budget {
        tracing::warn!(request_id = r.request_id, "retry budget spent");
        return false;
    }
    tokio::time::sleep(backoff).await;
    true
}

/// One attempt about to be made.
struct Step<'a> {
    c: &'a Carry<'a>,
    target: Target,
    guard: Option<InFlightGuard>,
    started: Instant,
    /// The targets after this one (a broken stream may continue there).
    rest: &'a VecDeque<Target>,
    attempts_left: u32,
    /// Attempts that failed before this one.
    failed: usize,
}

/// How one attempt ended.
enum Tried {
    Answered(Response),
    /// The upstream refused the request itself: the client's error, no failover.
    Refused(ApiError),
    /// Failed; the next target is tried. `locals_refuse`: an agent could not take the
    /// request as asked, so no agent can.
    Failed {
        error: ProviderError,
        locals_refuse: bool,
    },
    /// The client left while an agent worked on it; the work was cut.
    Cut,
}

/// Opens one attempt and reads its answer (whole, or a stream up to its first token).
async fn one_attempt(s: &AppState, step: Step<'_>, tally: &mut Option<Tally>) -> Tried {
    let Carry { r, group, info, .. } = *step.c;
    let label = step.target.label();
    let target = step.target;
    let opening = open_attempt(s, r.ep, &target, &r.body, r.stream, step.guard);
    let Some(opened) = unless_gone(r, target.is_local(), opening).await else {
        return Tried::Cut;
    };
    let (attempt, resp, guard) = match opened {
        Ok(x) => x,
        Err(e) => {
            if let Some(t) = tally.as_mut() {
                let (outcome, status) = ledger_outcome(&e);
                t.attempt(&label, step.started, outcome, status, Some(e.to_string()));
            }
            // A local agent that cannot take the request as asked passes it on.
            let locals_refuse = target.is_local() && e.refuses_fit();
            if !(e.is_retryable() || locals_refuse) {
                tracing::info!(request_id = r.request_id, model = r.model, upstream = %label, error = %e, "upstream rejected the request");
                return Tried::Refused(e.to_api_error());
            }
            tracing::warn!(request_id = r.request_id, model = r.model, upstream = %label, error = %e, "attempt failed; trying the next target");
            return Tried::Failed {
                error: e,
                locals_refuse,
            };
        }
    };
    if let (Target::Local { node_id, .. }, Some(p)) = (&target, info.prefix) {
        crate::shared::served_prefix(s, &group.local_model, p, node_id);
    }
    let opened = Opened {
        target,
        attempt,
        resp,
        guard,
    };
    let answered = if r.stream {
        let left = step.attempts_left;
        stream_answer(s, step.c, opened, step.rest, left, step.failed, tally).await
    } else {
        whole_answer(s, step.c, opened, step.failed, tally).await
    };
    match answered {
        Ok(Some(resp)) => Tried::Answered(resp),
        Ok(None) => Tried::Cut,
        Err(error) => {
            tracing::warn!(request_id = r.request_id, model = r.model, upstream = %label, error = %error, "no answer after the headers; trying the next target");
            Tried::Failed {
                error,
                locals_refuse: false,
            }
        }
    }
}

/// An attempt whose response headers came.
struct Opened {
    target: Target,
    attempt: Attempt,
    resp: UpstreamResponse,
    guard: Option<InFlightGuard>,
}

/// The answer's head: where it ran and why.
fn answer_head(c: &Carry<'_>, label: &str) -> axum::http::response::Builder {
    Response::builder()
        .status(StatusCode::OK)
        .header(TARGET, hv(label))
        .header(REQUEST_ID, hv(c.r.request_id))
        .header(
            ROUTE_REASON,
            HeaderValue::from_static(c.decision.code.as_str()),
        )
}

/// A stream, relayed once its first token came. Until then it is still invisible to the
/// client: one that stalls, breaks or garbles before it fails over (Err) like a refused
/// connection.
async fn stream_answer(
    s: &AppState,
    c: &Carry<'_>,
    o: Opened,
    rest: &VecDeque<Target>,
    attempts_left: u32,
    failed: usize,
    tally: &mut Option<Tally>,
) -> Result<Option<Response>, ProviderError> {
    let Carry {
        r,
        group,
        info,
        decision,
        ..
    } = *c;
    let label = o.attempt.label.clone();
    let reading = first_token(o.resp, &o.attempt, r.ep);
    let Some(read) = unless_gone(r, o.target.is_local(), reading).await else {
        return Ok(None);
    };
    let primed = match read {
        Ok(p) => p,
        Err(e) => {
            failed_after_headers(s, &o.attempt, tally, &e);
            return Err(e);
        }
    };
    s.inner.metrics.attempt(0);
    // The prediction was for the first target; later ones are compared with theirs.
    let predicted = decision.predicted_ttft;
    tracing::info!(request_id = r.request_id, model = r.model, upstream = %label, priority = info.priority.as_str(), strategy = decision.strategy.as_str(), reason = decision.code.as_str(), predicted_ttft_ms = predicted.as_millis() as u64, failed_attempts = failed, stream = true, "routed");
    let cont =
        (group.mid_stream == MidStream::Continue && r.ep == Endpoint::Chat).then(|| Continuation {
            targets: rest.clone(),
            body: r.body.clone(),
            request_id: r.request_id.to_owned(),
            attempts_left,
        });
    let body = relay_sse(
        primed,
        RelayCtx {
            state: s.clone(),
            ep: r.ep,
            attempt: o.attempt,
            guard: o.guard,
            predicted_ttft: predicted,
            cont,
            client_usage: r.client_usage,
            tally: tally.take(),
            group: group.clone(),
        },
    );
    Ok(Some(
        answer_head(c, &label)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap_or_else(|e| ApiError::new(ErrorKind::Internal, e.to_string()).into_response()),
    ))
}

/// An answer read whole; a body that breaks fails over (Err).
async fn whole_answer(
    s: &AppState,
    c: &Carry<'_>,
    o: Opened,
    failed: usize,
    tally: &mut Option<Tally>,
) -> Result<Option<Response>, ProviderError> {
    let Carry {
        r,
        group,
        info,
        decision,
        ..
    } = *c;
    let Opened {
        target,
        attempt,
        resp,
        guard,
    } = o;
    let agent_ttft = first_token_header(&resp);
    let agent_busy = ms_header(&resp, headers::BUSY_MS);
    let reading = attempt.upstream.read_answer(r.ep, resp);
    let Some(read) = unless_gone(r, target.is_local(), reading).await else {
        return Ok(None);
    };
    let answer = match read {
        Ok(a) => a,
        Err(e) => {
            failed_after_headers(s, &attempt, tally, &e);
            return Err(e);
        }
    };
    let (bytes, usage) = (answer.body, answer.usage);
    let took = attempt.started.elapsed();
    // An agent says when its first token came; a cloud answer sent whole does not, and its
    // latency is no TTFT.
    let ttft = agent_ttft
        .filter(|_| target.is_local())
        .map(|t| t.min(took));
    s.inner.health.finish(
        &attempt.health_key,
        Outcome::Success {
            ttft,
            latency: took,
            tokens: usage.map(|u| u.completion),
        },
        Instant::now(),
    );
    s.inner.metrics.attempt(0);
    let predicted = decision.predicted_ttft;
    if let Some(t) = ttft {
        s.inner
            .metrics
            .observe_ttft(target.is_local(), predicted, t);
    }
    drop(guard);
    let label = &attempt.label;
    tracing::info!(request_id = r.request_id, model = r.model, upstream = %label, priority = info.priority.as_str(), strategy = decision.strategy.as_str(), reason = decision.code.as_str(), predicted_ttft_ms = predicted.as_millis() as u64, failed_attempts = failed, stream = false, latency_ms = took.as_millis() as u64, "routed");
    if let Some(mut t) = tally.take() {
        t.attempt(label, attempt.started, "ok", Some(200), None);
        let ours = AnswerText::whole(answer.text).count(s, r.ep);
        let pricing = attempt.pricing(group).busy(agent_busy);
        t.answered(&target, ttft, usage, ours, pricing).await;
    }
    Ok(Some(
        answer_head(c, label)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .unwrap_or_else(|e| ApiError::new(ErrorKind::Internal, e.to_string()).into_response()),
    ))
}

/// Waits for an attempt's upstream I/O, unless the client goes away and the target is an
/// agent: work for a client who left is cut there (the GPU is ours to free). A cloud
/// attempt runs on, so the answer it is billed for is read and charged. Only I/O is raced,
/// never the bookkeeping after it; the I/O is polled first, so an attempt that was cut
/// had started (its health counts it) before it was.
async fn unless_gone<T>(
    r: &Routed<'_>,
    local: bool,
    io: impl std::future::Future<Output = T>,
) -> Option<T> {
    if !local {
        return Some(io.await);
    }
    tokio::select! {
        biased;
        done = io => Some(done),
        _ = r.gone.cancelled() => None,
    }
}

/// A local attempt cut because the client left: its GPU time until then is charged (at a
/// whole GPU's share, the most it can have been) and its row says `cancelled`.
fn cut_local(
    s: &AppState,
    tally: &mut Option<Tally>,
    target: &Target,
    started: Instant,
    group: &ModelGroup,
) -> ApiError {
    let now = Instant::now();
    s.inner
        .health
        .finish(&crate::health::health_key(target), Outcome::Rejected, now);
    if let Some(mut t) = tally.take() {
        let gone = Some("the client went away".to_owned());
        t.attempt(&target.label(), started, "cut", None, gone.clone());
        let pricing = Pricing::Gpu {
            usd_per_hour: group.gpu_hour_usd,
            share: 1.0,
            busy: None,
            since: started,
        };
        t.answered_as("cancelled", gone, target, None, None, 0, pricing);
    }
    client_gone()
}

/// What a request whose client left gets; nobody reads it (its row says `cancelled`).
fn client_gone() -> ApiError {
    ApiError::new(ErrorKind::RequestTimeout, "the client went away")
}

// Parsed once, not per response.
const TARGET: HeaderName = HeaderName::from_static(headers::TARGET);
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static(headers::REQUEST_ID);
const ROUTE_REASON: HeaderName = HeaderName::from_static(headers::ROUTE_REASON);

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("unknown"))
}

/// 503 naming every attempt, or the last upstream's own status when that is more telling
/// (e.g. every target rate-limited: 429).
fn all_failed(model: &str, failures: &[ProviderError]) -> ApiError {
    // Every target that was tried could not take the request as asked: the client's to fix.
    if let Some(first) = failures.first()
        && failures
            .iter()
            .all(|f| matches!(f, ProviderError::Unsupported { .. }) || f.refuses_fit())
    {
        return first.to_api_error();
    }
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
