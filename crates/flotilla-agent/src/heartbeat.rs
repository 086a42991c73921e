//! Reports this node to the scheduler every `heartbeat_ms`, and deregisters it on shutdown
//! so the scheduler stops routing here at once instead of after its TTL.

use std::time::Duration;

use flotilla_api::protocol::{
    DEREGISTER_PATH, HEARTBEAT_PATH, HeartbeatAck, ModelKind, ModelState, NodeModel, NodeReport,
    PROTOCOL_VERSION,
};
use flotilla_gpu::Telemetry;
use tokio_util::sync::CancellationToken;

use crate::models::EMBEDDING_SLOTS;
use crate::{AgentError, AgentState};

pub(crate) fn report(state: &AgentState, telemetry: Telemetry) -> NodeReport {
    let draining = state.drain.is_draining();
    let model_state = if draining {
        ModelState::Draining
    } else {
        ModelState::Ready
    };
    let device = |name: &str| {
        state
            .models
            .devices
            .get(name)
            .cloned()
            .unwrap_or_else(|| "cpu".into())
    };
    let mut models = Vec::new();
    for (name, engine) in &state.models.chat {
        let st = engine.status();
        models.push(NodeModel {
            name: name.clone(),
            kind: ModelKind::Chat,
            state: model_state,
            device: device(name),
            context_length: engine.context_length() as u64,
            running: st.running as u64,
            waiting: st.waiting as u64,
            max_running: st.max_running as u64,
            kv_blocks_free: st.kv_blocks_free as u64,
            kv_blocks_total: st.kv_blocks_total as u64,
            tokens_per_second: st.tokens_per_second,
        });
    }
    for (name, m) in &state.models.embedding {
        let (running, waiting) = m.load();
        models.push(NodeModel {
            name: name.clone(),
            kind: ModelKind::Embedding,
            state: model_state,
            device: device(name),
            context_length: m.engine.max_input_tokens() as u64,
            running,
            waiting,
            max_running: EMBEDDING_SLOTS,
            kv_blocks_free: 0,
            kv_blocks_total: 0,
            tokens_per_second: 0.0,
        });
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let sent_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    NodeReport {
        protocol: PROTOCOL_VERSION,
        node_id: state.config.node_id.clone(),
        base_url: state.base_url.to_string(),
        models,
        sent_at_ms,
        draining,
        gpus: telemetry.gpus,
        host: telemetry.host,
        heartbeat_ms: state.config.heartbeat.as_millis() as u64,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// One heartbeat; returns the interval the scheduler asks for.
pub(crate) async fn send(state: &AgentState) -> Result<Option<Duration>, AgentError> {
    let Some(base) = &state.config.scheduler_url else {
        return Ok(None);
    };
    let url = format!("{}{}", base.trim_end_matches('/'), HEARTBEAT_PATH);
    let report = report(state, state.telemetry().await);
    let mut req = state.http.post(&url).json(&report);
    if let Some(t) = &state.config.cluster_token {
        req = req.bearer_auth(t.expose());
    }
    let err = |reason: String| AgentError::Register {
        url: url.clone(),
        reason,
    };
    let resp = req.send().await.map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(err(format!(
            "HTTP {status}: {}",
            body.chars().take(300).collect::<String>()
        )));
    }
    let ack: HeartbeatAck = resp.json().await.map_err(|e| err(e.to_string()))?;
    Ok(Some(Duration::from_millis(ack.heartbeat_ms.max(50))))
}

/// Heartbeats until `stop`, at once when a drain starts, then deregisters.
pub(crate) async fn run(state: AgentState, stop: CancellationToken) {
    if state.config.scheduler_url.is_none() {
        return;
    }
    let mut every = state.config.heartbeat;
    let mut healthy = true;
    loop {
        match send(&state).await {
            Ok(Some(d)) => {
                if !healthy {
                    tracing::info!("heartbeats reach the scheduler again");
                }
                healthy = true;
                every = d;
            }
            Ok(None) => return,
            Err(e) => {
                // One warning per outage, not one per second.
                if healthy {
                    tracing::warn!(error = %e, "heartbeat failed; retrying every interval");
                }
                healthy = false;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
            // The scheduler must stop routing here now, not at the next beat.
            _ = state.drain.started.notified() => {}
        }
    }
    if let Some(base) = &state.config.scheduler_url {
        let url = format!(
            "{}{}/{}",
            base.trim_end_matches('/'),
            DEREGISTER_PATH,
            state.config.node_id
        );
        let mut req = state.http.delete(&url);
        if let Some(t) = &state.config.cluster_token {
            req = req.bearer_auth(t.expose());
        }
        match req.send().await {
            Ok(_) => tracing::info!("deregistered from the scheduler"),
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the scheduler will drop this node after its TTL")
            }
        }
    }
}
