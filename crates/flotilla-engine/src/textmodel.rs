//! Loading a llama-family model directory: config.json, *.safetensors, tokenizer.json,
//! tokenizer_config.json. Weights are converted to F32 on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};
use tokenizers::Tokenizer;

use crate::error::EngineError;
use crate::template::{ChatTemplate, TokenizerConfig};
use crate::types::Prompt;

/// Everything needed on the caller's side: counting tokens, rendering prompts, decoding.
pub(crate) struct TextTokenizer {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    pub context_length: usize,
}

impl TextTokenizer {
    pub(crate) fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let (text, add_special) = match prompt {
            Prompt::Text(text) => (text.clone(), true),
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::invalid("messages must not be empty"));
                }
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::invalid("this model has no chat template; use a text prompt")
                })?;
                // The template writes the BOS itself, so the tokenizer must not add another.
                (template.render(messages)?, false)
            }
        };
        self.encode(&text, add_special)
    }

    pub(crate) fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(EngineError::tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(EngineError::tokenizer)
    }
}

pub(crate) struct TextModel {
    pub llama: Llama,
    /// Rotary tables for the whole context, computed once; cloned per sequence (tensors are
    /// reference-counted, so a clone is cheap and the KV slots start empty).
    pub cache_template: Cache,
    pub device: Device,
}

impl TextModel {
    pub(crate) fn new_cache(&self) -> Cache {
        self.cache_template.clone()
    }

    /// Logits for the last position of `ids` placed at `index_pos`.
    pub(crate) fn forward(
        &self,
        ids: &[u32],
        index_pos: usize,
        cache: &mut Cache,
    ) -> Result<Vec<f32>, EngineError> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.llama.forward(&input, index_pos, cache)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EngineError> {
    let raw = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&raw).map_err(|e| EngineError::files(path, format!("invalid: {e}")))
}

pub(crate) fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| EngineError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(EngineError::files(dir, "no *.safetensors weights found"));
    }
    Ok(files)
}

pub(crate) fn load_weights(
    dir: &Path,
    device: &Device,
) -> Result<VarBuilder<'static>, EngineError> {
    let mut tensors = HashMap::new();
    for file in safetensor_files(dir)? {
        let part = candle_core::safetensors::load(&file, device)
            .map_err(|e| EngineError::files(&file, e.to_string()))?;
        tensors.extend(part);
    }
    // VarBuilder converts each tensor to F32 as it is fetched (BF16/F16 files work too).
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

pub(crate) fn load_tokenizer(dir: &Path) -> Result<Tokenizer, EngineError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(EngineError::files(dir, "tokenizer.json is missing"));
    }
    Tokenizer::from_file(&path).map_err(|e| EngineError::files(&path, e.to_string()))
}

pub(crate) fn load_text_model(dir: &Path) -> Result<(TextModel, TextTokenizer), EngineError> {
    let llama_cfg: LlamaConfig = read_json(&dir.join("config.json"))?;
    let config_eos = match &llama_cfg.eos_token_id {
        Some(LlamaEosToks::Single(id)) => vec![*id],
        Some(LlamaEosToks::Multiple(ids)) => ids.clone(),
        None => Vec::new(),
    };
    let cfg: Config = llama_cfg.into_config(false);
    if cfg.hidden_size.checked_rem(cfg.num_attention_heads) != Some(0) {
        return Err(EngineError::files(
            dir,
            "hidden_size must divide by num_attention_heads",
        ));
    }
    let tokenizer = load_tokenizer(dir)?;
    let tc = TokenizerConfig::load(dir)?;
    let mut eos_ids = config_eos;
    if let Some(id) = tc
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        && !eos_ids.contains(&id)
    {
        eos_ids.push(id);
    }
    let template = match &tc.chat_template {
        Some(src) => Some(ChatTemplate::new(
            src,
            tc.bos_token.as_deref().unwrap_or_default(),
            tc.eos_token.as_deref().unwrap_or_default(),
        )?),
        None => None,
    };

    let device = Device::Cpu;
    let vb = load_weights(dir, &device)?;
    // candle's Llama::load unwraps per-layer results; a missing tensor would panic, so the
    // panic is caught and reported as a model-files error.
    let llama = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Llama::load(vb, &cfg)))
        .map_err(|p| {
            EngineError::files(
                dir,
                format!("weights do not match config: {}", panic_message(&p)),
            )
        })?
        .map_err(|e| EngineError::files(dir, format!("weights do not match config: {e}")))?;
    let cache_template = Cache::new(true, DType::F32, &cfg, &device)?;
    Ok((
        TextModel {
            llama,
            cache_template,
            device,
        },
        TextTokenizer {
            tokenizer,
            template,
            eos_ids,
            context_length: cfg.max_position_embeddings,
        },
    ))
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
