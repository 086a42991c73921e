//! Active probes (`[scheduler.health] probe_idle_ms`): the scheduler sends a one-token
//! request to every target nobody used for that long, and to every half-open breaker, so
//! latency figures stay current, a dead target's breaker opens before a client meets it,
//! and no client request has to be the one that tests a recovering target.
//!
//! A probe goes through the same health book as client attempts (it is the half-open probe,
//! it counts toward the error rate) but not through the ledger or the attempt counters:
//! it is the scheduler's request, not a client's. `/metrics` counts probes by outcome.

use std::time::{Duration, Instant};

use flotilla_api::protocol::ModelKind;
use flotilla_providers::{EncodeOptions, Endpoint};
use flotilla_scheduler::{Outcome, Target};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::attempt::{claim_probe, outcome_of, upstream_for};
use crate::health::health_key;

/// Every target the scheduler could route to now, with the endpoint its model is for.
fn targets(s: &AppState, now: Instant) -> Vec<(Target, Endpoint)> {
    let inner = &s.inner;
    let mut out = Vec::new();
    for (model, kind) in inner.fleet.served_models(now) {
        let ep = match kind {
            ModelKind::Chat => Endpoint::Chat,
            ModelKind::Embedding => Endpoint::Embeddings,
        };
        for c in inner.fleet.candidates(&model, kind, now) {
            out.push((
                Target::Local {
                    node_id: c.node_id,
                    base_url: c.base_url,
                    model: c.model,
                },
                ep,
            ));
        }
    }
    let cfg = inner.config();
    for g in cfg.groups.values() {
        // A group named after an embedding model the agents serve is an embeddings group.
        let ep = if inner
            .fleet
            .knows_model(&g.local_model, Some(ModelKind::Embedding))
        {
            Endpoint::Embeddings
        } else {
            Endpoint::Chat
        };
        for c in &g.cloud {
            let t = Target::Cloud {
                provider: c.provider.clone(),
                model: c.model.clone(),
            };
            if !out.iter().any(|(o, _)| *o == t) {
                out.push((t, ep));
            }
        }
    }
    out
}

/// The smallest request that exercises the model: one token of answer.
fn probe_body(ep: Endpoint, model: &str) -> Value {
    match ep {
        Endpoint::Embeddings => json!({ "model": model, "input": "ping" }),
        Endpoint::Completions => json!({ "model": model, "prompt": "ping", "max_tokens": 1 }),
        Endpoint::Chat => json!({
            "model": model,
            "messages": [{ "role": "user", "content": "ping" }],
            "max_tokens": 1,
        }),
    }
}

/// Sends one probe and records its outcome; returns it.
pub(crate) async fn probe(s: &AppState, target: &Target, ep: Endpoint) -> Outcome {
    let label = target.label();
    let key = health_key(target);
    let upstream = match upstream_for(s, target, &label) {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(upstream = %label, error = %e, "probe not sent");
            return Outcome::Rejected;
        }
    };
    let started = Instant::now();
    if !s.inner.health.try_start(&key, started).allowed() {
        return Outcome::Rejected;
    }
    let opts = EncodeOptions {
        stream: false,
        stream_usage: false,
        default_max_tokens: 1,
    };
    let answer = match upstream
        .post_json(ep, &probe_body(ep, target.model()), &opts)
        .await
    {
        Ok(resp) => upstream.read_answer(ep, resp).await,
        Err(e) => Err(e),
    };
    let (outcome, n) = match &answer {
        Ok(answer) => {
            let took = started.elapsed();
            (
                Outcome::Success {
                    // A probe asks for one token: its whole latency is its first token's.
                    ttft: Some(took),
                    latency: took,
                    tokens: answer.usage.map(|u| u.completion),
                },
                0,
            )
        }
        Err(e) => outcome_of(e),
    };
    s.inner.health.finish(&key, outcome, Instant::now());
    s.inner.metrics.probe(n);
    match &answer {
        Ok(_) => tracing::debug!(
            upstream = %label,
            latency_ms = started.elapsed().as_millis() as u64,
            "probe answered"
        ),
        Err(e) => tracing::info!(upstream = %label, error = %e, "probe failed"),
    }
    outcome
}

/// Probes what is due, every quarter of `probe_idle` (within 100 ms..5 s), until shutdown.
pub(crate) async fn run(s: AppState, shutdown: CancellationToken) {
    let Some(idle) = s.inner.config().health.probe_idle else {
        return;
    };
    let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = Instant::now();
        for (target, ep) in targets(&s, now) {
            let key = health_key(&target);
            if !s.inner.health.wants_probe(&key, now) {
                continue;
            }
            // A half-open breaker takes one probe across all replicas.
            if s.inner.health.admit(&key, now) == flotilla_scheduler::Admit::Probe
                && !claim_probe(&s, &key).await
            {
                continue;
            }
            let s = s.clone();
            tokio::spawn(async move {
                probe(&s, &target, ep).await;
            });
        }
    }
}
