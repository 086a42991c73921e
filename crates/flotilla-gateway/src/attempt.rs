//! One attempt at one target, the same way for the first try, each failover and the
//! continuation of a broken stream: admission (health, the probe claim across replicas,
//! the provider's endpoints and per-minute limits), the upstream call, and what the
//! outcome means for the target's health and the ledger.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use flotilla_api::headers;
use flotilla_providers::{EncodeOptions, Endpoint, ProviderError, Upstream, UpstreamResponse};
use flotilla_scheduler::{Admit, InFlightGuard, ModelGroup, Outcome, Target};
use serde_json::Value;

use crate::AppState;
use crate::accounting::{Pricing, Tally};
use crate::auth::provider_admits;
use crate::health::health_key;

/// Whether `target` may take an attempt now, `tokens` counted against its provider's
/// per-minute limits. What happened since the decision (a 429, an opened breaker, a wait
/// in the queue) applies at once. Err says why it is skipped: a skipped target is not an
/// attempt.
pub(crate) async fn admit(
    s: &AppState,
    target: &Target,
    ep: Endpoint,
    tokens: u64,
) -> Result<(), String> {
    let hkey = health_key(target);
    let admit = s.inner.health.admit(&hkey, Instant::now());
    if !admit.allowed() {
        return Err(admit.as_str().to_owned());
    }
    if admit == Admit::Probe && !claim_probe(s, &hkey).await {
        return Err("probe_in_flight (another replica probes it)".to_owned());
    }
    let Target::Cloud { provider, .. } = target else {
        return Ok(());
    };
    if s.inner
        .providers
        .get(provider)
        .and_then(|u| u.as_ref().ok())
        .is_some_and(|u| !u.supports(ep))
    {
        return Err(format!("{provider} has no {} endpoint", ep.as_str()));
    }
    if let Err(wait) = provider_admits(s, provider, tokens).await {
        return Err(format!(
            "{provider}'s per-minute limit is reached for {} ms more",
            wait.as_millis()
        ));
    }
    Ok(())
}

/// One attempt in progress.
pub(crate) struct Attempt {
    pub target: Target,
    pub label: String,
    pub health_key: String,
    pub started: Instant,
    pub upstream: Upstream,
    /// The sequences running on the target beside this one, itself included (local).
    pub sharing: u64,
}

impl Attempt {
    /// How this attempt's answer is paid for.
    pub(crate) fn pricing(&self, group: &ModelGroup) -> Pricing {
        match &self.target {
            Target::Local { .. } => Pricing::Gpu {
                usd_per_hour: group.gpu_hour_usd,
                share: 1.0 / self.sharing.max(1) as f64,
                busy: None,
                since: self.started,
            },
            Target::Cloud { provider, model } => Pricing::Tokens(
                group
                    .cloud
                    .iter()
                    .find(|c| &c.provider == provider && &c.model == model)
                    .map(|c| c.price())
                    .unwrap_or_default(),
            ),
        }
    }
}

/// The attempt outcome the ledger records for a failure.
pub(crate) fn ledger_outcome(e: &ProviderError) -> (&'static str, Option<u16>) {
    match e {
        ProviderError::Status { status: 429, .. } => ("rate_limited", Some(429)),
        ProviderError::Status { status, .. } if !e.is_retryable() => ("rejected", Some(*status)),
        ProviderError::Status { status, .. } => ("failed", Some(*status)),
        ProviderError::Unsupported { .. } => ("rejected", None),
        _ => ("failed", None),
    }
}

pub(crate) fn outcome_of(e: &ProviderError) -> (Outcome, usize) {
    match e {
        ProviderError::Status {
            status: 429,
            retry_after,
            ..
        } => (
            Outcome::RateLimited {
                retry_after: *retry_after,
            },
            2,
        ),
        e if !e.is_retryable() => (Outcome::Rejected, 3),
        _ => (Outcome::Failure, 1),
    }
}

pub(crate) fn upstream_for(
    s: &AppState,
    target: &Target,
    label: &str,
) -> Result<Upstream, ProviderError> {
    match target {
        // Agents with a cluster token want it on every request.
        Target::Local { base_url, .. } => Ok(s.inner.pool.upstream(
            label,
            &format!("{}/v1", base_url.trim_end_matches('/')),
            s.inner.cluster_token.clone(),
        )),
        Target::Cloud { provider, .. } => match s.inner.providers.get(provider) {
            Some(Ok(up)) => Ok(up.clone()),
            Some(Err(reason)) => Err(ProviderError::Connect {
                target: label.to_owned(),
                reason: reason.clone(),
            }),
            None => Err(ProviderError::Connect {
                target: label.to_owned(),
                reason: "provider not configured".into(),
            }),
        },
    }
}

/// Sends `body` to `target` and waits for the response headers. The attempt counts in the
/// target's health from here; a failure is recorded before it is returned.
pub(crate) async fn open_attempt(
    s: &AppState,
    ep: Endpoint,
    target: &Target,
    body: &Value,
    stream: bool,
    guard: Option<InFlightGuard>,
) -> Result<(Attempt, UpstreamResponse, Option<InFlightGuard>), ProviderError> {
    let (label, upstream, key, started, guard, sharing) = start_attempt(s, target, guard)?;
    // The target's own name for the model; a copy of the body only when it differs.
    let body = if body.get("model").and_then(Value::as_str) == Some(target.model()) {
        Cow::Borrowed(body)
    } else {
        let mut renamed = body.clone();
        renamed["model"] = Value::String(target.model().to_owned());
        Cow::Owned(renamed)
    };
    let opts = EncodeOptions {
        stream,
        stream_usage: match target {
            Target::Local { .. } => true,
            Target::Cloud { provider, .. } => s
                .inner
                .config()
                .provider(provider)
                .is_none_or(|p| p.stream_usage),
        },
        default_max_tokens: s.inner.config().default_max_tokens,
    };
    match upstream.post_json(ep, &body, &opts).await {
        Ok(resp) => Ok((
            Attempt {
                target: target.clone(),
                label,
                health_key: key,
                started,
                upstream,
                sharing,
            },
            resp,
            guard,
        )),
        Err(e) => {
            let (outcome, n) = outcome_of(&e);
            s.inner.metrics.attempt(n);
            s.inner.health.finish(&key, outcome, Instant::now());
            // An agent that refuses connections or does not answer in time gets no more
            // work until its next heartbeat says it is alive.
            if let (
                Target::Local { node_id, .. },
                ProviderError::Connect { .. } | ProviderError::Timeout { .. },
            ) = (target, &e)
            {
                s.inner.fleet.mark_unreachable(node_id);
                s.inner.queues.wake.notify_one();
                if let Some(sh) = &s.inner.shared {
                    let node_id = node_id.clone();
                    crate::shared::spawn_shared(sh, move |sh| async move {
                        sh.publish(&flotilla_state::Event::NodeUnreachable { node_id })
                            .await;
                    });
                }
            }
            Err(e)
        }
    }
}

type Started = (
    String,
    Upstream,
    String,
    Instant,
    Option<InFlightGuard>,
    u64,
);

/// Everything before the request leaves: the upstream, the health admission, the slot.
fn start_attempt(
    s: &AppState,
    target: &Target,
    guard: Option<InFlightGuard>,
) -> Result<Started, ProviderError> {
    let label = target.label();
    let upstream = upstream_for(s, target, &label)?;
    let key = health_key(target);
    let started = Instant::now();
    let admit = s.inner.health.try_start(&key, started);
    if !admit.allowed() {
        return Err(ProviderError::Connect {
            target: label,
            reason: format!("not tried: {}", admit.as_str()),
        });
    }
    let guard = match (target, guard) {
        (_, Some(g)) => Some(g),
        (Target::Local { node_id, model, .. }, None) => Some(s.inner.fleet.acquire(node_id, model)),
        (Target::Cloud { .. }, None) => None,
    };
    let sharing = match target {
        Target::Local { node_id, model, .. } => s.inner.fleet.in_flight(node_id, model),
        Target::Cloud { .. } => 1,
    };
    Ok((label, upstream, key, started, guard, sharing))
}

/// A half-open target takes one probe across all replicas: this replica may send it
/// unless another claimed it (always, without shared state or while Redis is down).
pub(crate) async fn claim_probe(s: &AppState, key: &str) -> bool {
    match &s.inner.shared {
        Some(sh) => sh
            .claim_probe(key, s.inner.config().health.open_for)
            .await
            .unwrap_or(true),
        None => true,
    }
}

/// An attempt that got its 200 headers but no usable answer (the body broke, or a stream
/// gave no first token): a failure for the target's health, a failed attempt in the ledger.
pub(crate) fn failed_after_headers(
    s: &AppState,
    attempt: &Attempt,
    tally: &mut Option<Tally>,
    e: &ProviderError,
) {
    s.inner.metrics.attempt(1);
    s.inner
        .health
        .finish(&attempt.health_key, Outcome::Failure, Instant::now());
    if let Some(t) = tally.as_mut() {
        t.attempt(
            &attempt.label,
            attempt.started,
            "failed",
            Some(200),
            Some(e.to_string()),
        );
    }
}

/// An agent's `x-flotilla-first-token-ms` (fractional milliseconds), when it is sane.
pub(crate) fn first_token_header(resp: &UpstreamResponse) -> Option<Duration> {
    ms_header(resp, headers::FIRST_TOKEN_MS)
}

/// A duration an agent sent as fractional milliseconds; None when absent or absurd.
pub(crate) fn ms_header(resp: &UpstreamResponse, name: &str) -> Option<Duration> {
    let ms: f64 = resp.headers().get(name)?.to_str().ok()?.parse().ok()?;
    (ms.is_finite() && (0.0..1e9).contains(&ms)).then(|| Duration::from_secs_f64(ms / 1e3))
}

/// The engine time an agent's stream reported in its usage chunk (`usage.busy_us`).
pub(crate) fn agent_busy(data: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    let us = v.get("usage")?.get("busy_us")?.as_u64()?;
    (us < 1_000_000_000_000).then(|| Duration::from_micros(us))
}
