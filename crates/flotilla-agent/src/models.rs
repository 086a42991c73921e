//! Loading the configured models into engines on the devices placement chose.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use flotilla_api::protocol::ModelKind;
use flotilla_engine::{EmbeddingEngine, TextEngine};

use crate::AgentError;
use crate::config::AgentConfig;
use crate::placement::AgentPlan;

/// How many embedding requests run at once before the scheduler should look elsewhere.
pub const EMBEDDING_SLOTS: u64 = 16;

pub struct EmbeddingModel {
    pub engine: EmbeddingEngine,
    pub in_flight: AtomicU64,
}

impl EmbeddingModel {
    /// (running, waiting): requests beyond [`EMBEDDING_SLOTS`] count as waiting.
    pub fn load(&self) -> (u64, u64) {
        let busy = self.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        (
            busy.min(EMBEDDING_SLOTS),
            busy.saturating_sub(EMBEDDING_SLOTS),
        )
    }
}

/// The engines this agent serves, by model name.
#[derive(Default, Clone)]
pub struct Models {
    pub chat: HashMap<String, TextEngine>,
    pub embedding: HashMap<String, Arc<EmbeddingModel>>,
    /// Where each runs (`cpu`, `cuda:N`); absent means the CPU.
    pub devices: HashMap<String, String>,
}

impl Models {
    pub fn names(&self) -> Vec<(String, ModelKind)> {
        let mut v: Vec<(String, ModelKind)> = self
            .chat
            .keys()
            .map(|n| (n.clone(), ModelKind::Chat))
            .chain(
                self.embedding
                    .keys()
                    .map(|n| (n.clone(), ModelKind::Embedding)),
            )
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Loads every configured model on the device `plan` gave it; the first failure stops
/// start-up with its reason.
pub async fn load_models(cfg: &AgentConfig, plan: &AgentPlan) -> Result<Models, AgentError> {
    let mut models = Models::default();
    for spec in &cfg.models {
        let dir = crate::source::resolve_configured(&spec.source, cfg).await?;
        let started = std::time::Instant::now();
        let name = spec.name.clone();
        // A bar on stderr while the weights are read (at a terminal with text logs).
        let bar = flotilla_api::logging::byte_bar(0, &spec.name);
        let progress = bar.clone();
        match spec.kind {
            ModelKind::Chat => {
                let mut cfg = spec.engine_config();
                cfg.device = plan.engine_device(spec);
                models
                    .devices
                    .insert(spec.name.clone(), cfg.device.to_string());
                let engine = tokio::task::spawn_blocking(move || {
                    TextEngine::load_with_progress(&name, &dir, cfg, progress)
                })
                .await
                .map_err(|e| AgentError::Load {
                    model: spec.name.clone(),
                    reason: e.to_string(),
                })??;
                models.chat.insert(spec.name.clone(), engine);
            }
            ModelKind::Embedding => {
                let engine = tokio::task::spawn_blocking(move || {
                    EmbeddingEngine::load_with_progress(&name, &dir, progress)
                })
                .await
                .map_err(|e| AgentError::Load {
                    model: spec.name.clone(),
                    reason: e.to_string(),
                })??;
                models.embedding.insert(
                    spec.name.clone(),
                    Arc::new(EmbeddingModel {
                        engine,
                        in_flight: AtomicU64::new(0),
                    }),
                );
            }
        }
        bar.finish_and_clear();
        tracing::info!(
            model = %spec.name,
            kind = ?spec.kind,
            weights_mib = format!("{:.1}", bar.position() as f64 / (1u64 << 20) as f64),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
    }
    Ok(models)
}
