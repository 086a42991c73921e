//! Where model files come from: a local directory, or a Hugging Face repo id fetched into
//! (or, offline, read from) the standard hub cache.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};

use crate::error::EngineError;
use crate::models::find_gguf;

/// Files every text/embedding model directory needs besides its weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];
const SHARD_INDEX: &str = "model.safetensors.index.json";

fn err(source: &str, message: impl Into<String>) -> EngineError {
    EngineError::Source {
        source_name: source.to_string(),
        message: message.into(),
    }
}

/// Resolves `source` to what the loaders take: a directory holding config.json and friends
/// (or exactly one `*.gguf` with tokenizer.json), or the path of a local `.gguf` file.
pub async fn resolve_model_source(
    source: &str,
    cache_dir: Option<&Path>,
    offline: bool,
) -> Result<PathBuf, EngineError> {
    resolve_model_source_with(source, &Hub::cache(cache_dir), offline).await
}

/// [`resolve_model_source`] with the hub's address and progress bars as `hub` says.
pub async fn resolve_model_source_with(
    source: &str,
    hub: &Hub<'_>,
    offline: bool,
) -> Result<PathBuf, EngineError> {
    let path = Path::new(source);
    if path.is_file() || path.is_dir() {
        let gguf = find_gguf(path).map_err(|e| match e {
            EngineError::ModelFiles { message, .. } => err(source, message),
            other => other,
        })?;
        if gguf.is_none() && !path.join("config.json").exists() {
            return Err(err(
                source,
                "directory has no config.json and no .gguf file",
            ));
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(source) {
        return Err(err(
            source,
            "not a directory, and not a Hugging Face repo id of the form org/name",
        ));
    }
    if offline {
        resolve_offline(source, hub.cache_dir)
    } else {
        resolve_online(source, hub).await
    }
}

/// Where and how [`pull_model`] fetches.
#[derive(Debug, Clone, Default)]
pub struct Hub<'a> {
    /// The hub cache to fill (default: `$HF_HUB_CACHE`, `$HF_HOME/hub`, then
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: Option<&'a Path>,
    /// The hub's address (default: `$HF_ENDPOINT`, then https://huggingface.co).
    pub endpoint: Option<&'a str>,
    /// Draw a progress bar per file on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
}

impl<'a> Hub<'a> {
    fn cache(cache_dir: Option<&'a Path>) -> Self {
        Hub {
            cache_dir,
            ..Hub::default()
        }
    }
}

/// Downloads a Hugging Face model repo's files (config, tokenizer, weights: what the
/// loaders read) into the hub cache, skipping those already there, and returns the
/// snapshot directory the agent will load from (`source = "org/name"`).
pub async fn pull_model(repo_id: &str, hub: &Hub<'_>) -> Result<PathBuf, EngineError> {
    if !looks_like_repo_id(repo_id) {
        return Err(err(
            repo_id,
            "not a Hugging Face repo id of the form org/name",
        ));
    }
    resolve_online(repo_id, hub).await
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    // As the hub names repos: no leading dot and no `..`, so `../x` is never a repo id.
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn cache_for(cache_dir: Option<&Path>) -> Cache {
    match cache_dir {
        Some(dir) => Cache::new(dir.to_path_buf()),
        None => Cache::from_env(),
    }
}

/// Weight files named by the shard index, or the single model.safetensors.
fn shard_names(index_json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(index_json).unwrap_or_default();
    let mut names: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

fn resolve_offline(repo_id: &str, cache_dir: Option<&Path>) -> Result<PathBuf, EngineError> {
    let cache = cache_for(cache_dir);
    let repo = Repo::model(repo_id.to_string());
    let repo_dir = cache.path().join(repo.folder_name());
    let ref_path = repo_dir.join("refs").join(repo.revision());
    let commit = std::fs::read_to_string(&ref_path).map_err(|_| {
        err(
            repo_id,
            format!(
                "offline mode: repo not in the Hugging Face cache (no {}); download it once without offline mode",
                ref_path.display()
            ),
        )
    })?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    let missing = |file: &str| {
        err(
            repo_id,
            format!(
                "offline mode: {file} is missing from the cached snapshot {}",
                snapshot.display()
            ),
        )
    };
    for file in REQUIRED {
        if !snapshot.join(file).exists() {
            return Err(missing(file));
        }
    }
    let index = snapshot.join(SHARD_INDEX);
    let weights = match std::fs::read_to_string(&index) {
        Ok(raw) => shard_names(&raw),
        Err(_) => vec!["model.safetensors".to_string()],
    };
    for file in &weights {
        if !snapshot.join(file).exists() {
            return Err(missing(file));
        }
    }
    Ok(snapshot)
}

async fn resolve_online(repo_id: &str, hub: &Hub<'_>) -> Result<PathBuf, EngineError> {
    let mut builder = hf_hub::api::tokio::ApiBuilder::from_env().with_progress(hub.progress);
    if let Some(dir) = hub.cache_dir {
        builder = builder.with_cache_dir(dir.to_path_buf());
    }
    if let Some(endpoint) = hub.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_owned());
    }
    let api = builder
        .build()
        .map_err(|e| err(repo_id, format!("hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let config = repo
        .get(REQUIRED[0])
        .await
        .map_err(|e| err(repo_id, format!("downloading config.json: {e}")))?;
    for file in &REQUIRED[1..] {
        repo.get(file)
            .await
            .map_err(|e| err(repo_id, format!("downloading {file}: {e}")))?;
    }
    for file in OPTIONAL {
        // Absent optional files are normal (404); only the required set must exist.
        if let Err(e) = repo.get(file).await {
            tracing::debug!(repo = repo_id, file, error = %e, "optional file not fetched");
        }
    }
    let weights = match repo.get(SHARD_INDEX).await {
        Ok(index) => {
            let raw = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            shard_names(&raw)
        }
        Err(_) => vec!["model.safetensors".to_string()],
    };
    for file in &weights {
        repo.get(file)
            .await
            .map_err(|e| err(repo_id, format!("downloading {file}: {e}")))?;
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| err(repo_id, "downloaded config.json has no parent directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shape() {
        assert!(looks_like_repo_id("org/name"));
        assert!(looks_like_repo_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0"));
        assert!(!looks_like_repo_id("name"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("../etc"));
        assert!(!looks_like_repo_id("org/.hidden"));
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
    }

    #[test]
    fn shard_index_lists_unique_files() {
        let idx = r#"{"weight_map":{"a":"model-2.safetensors","b":"model-1.safetensors","c":"model-2.safetensors"}}"#;
        assert_eq!(
            shard_names(idx),
            vec!["model-1.safetensors", "model-2.safetensors"]
        );
    }
}
