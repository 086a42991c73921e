//! Loading a llama-family model: a Hugging Face directory (config.json, *.safetensors,
//! weights converted to F32) or a GGUF file (quantized weights kept quantized), with
//! tokenizer.json and tokenizer_config.json beside either.

use std::path::Path;

use candle_core::Device;
use indicatif::ProgressBar;
use tokenizers::Tokenizer;

use crate::models::{GgufWeights, LlamaModel, ModelConfig, SafetensorsWeights, find_gguf};

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
            Prompt::Chat(messages) | Prompt::ContinueChat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::invalid("messages must not be empty"));
                }
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::invalid("this model has no chat template; use a text prompt")
                })?;
                // The template writes the BOS itself, so the tokenizer must not add another.
                if let Prompt::ContinueChat(_) = prompt {
                    let (head, partial) = template.render_continuing(messages)?;
                    let mut ids = self.encode(&head, false)?;
                    ids.extend(self.encode(&partial, false)?);
                    return Ok(ids);
                }
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

    /// One token's text as logprobs report it (special tokens by name).
    pub(crate) fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(EngineError::tokenizer)
    }
}

pub(crate) fn load_tokenizer(dir: &Path) -> Result<Tokenizer, EngineError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(EngineError::files(dir, "tokenizer.json is missing"));
    }
    Tokenizer::from_file(&path).map_err(|e| EngineError::files(&path, e.to_string()))
}

/// Loads the tokenizer files and the model on `device` from `path`: a `.gguf` file, a
/// directory holding exactly one `*.gguf` (its config.json, if any, is ignored: the GGUF
/// metadata describes the model), or otherwise a Hugging Face style directory
/// (config.json + *.safetensors).
pub(crate) fn load_text_model(
    path: &Path,
    device: &Device,
    progress: &ProgressBar,
) -> Result<(LlamaModel, TextTokenizer), EngineError> {
    if let Some(file) = find_gguf(path)? {
        return load_gguf_model(&file, device, progress);
    }
    let dir = path;
    let cfg = ModelConfig::load(dir)?;
    let tokenizer = load_text_tokenizer(dir, &cfg)?;
    let weights = SafetensorsWeights::load(dir, device, progress)?;
    let model = LlamaModel::load(cfg, &weights, device)?;
    Ok((model, tokenizer))
}

/// A GGUF file's model, with the tokenizer files of its directory: the tokenizer GGUF files
/// embed is not rebuilt, so tokenizer.json must be there.
fn load_gguf_model(
    file: &Path,
    device: &Device,
    progress: &ProgressBar,
) -> Result<(LlamaModel, TextTokenizer), EngineError> {
    let (weights, cfg) = GgufWeights::open(file, device, progress.clone())?;
    let dir = file.parent().unwrap_or(Path::new("."));
    if !dir.join("tokenizer.json").is_file() {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        return Err(EngineError::files(
            dir,
            format!(
                "tokenizer.json is missing next to {name}: the tokenizer embedded in GGUF files is not read; copy the original model's tokenizer.json (and tokenizer_config.json for its chat template) into this directory"
            ),
        ));
    }
    let mut tokenizer = load_text_tokenizer(dir, &cfg)?;
    if tokenizer.template.is_none()
        && let Some(src) = weights.metadata_str("tokenizer.chat_template")
    {
        // No tokenizer_config.json template: use the one the GGUF file carries.
        let special = |key: &str| {
            weights
                .metadata_u64(key)
                .and_then(|id| u32::try_from(id).ok())
                .and_then(|id| tokenizer.tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let (bos, eos) = (
            special("tokenizer.ggml.bos_token_id"),
            special("tokenizer.ggml.eos_token_id"),
        );
        tokenizer.template = Some(ChatTemplate::new(src, &bos, &eos)?);
    }
    let model = LlamaModel::load(cfg, &weights, device)?;
    Ok((model, tokenizer))
}

/// tokenizer.json, and from tokenizer_config.json the chat template and the EOS token
/// (added to config.json's EOS ids).
pub(crate) fn load_text_tokenizer(
    dir: &Path,
    cfg: &ModelConfig,
) -> Result<TextTokenizer, EngineError> {
    let tokenizer = load_tokenizer(dir)?;
    let tc = TokenizerConfig::load(dir)?;
    let mut eos_ids = cfg.eos_token_ids.clone();
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
    Ok(TextTokenizer {
        tokenizer,
        template,
        eos_ids,
        context_length: cfg.context_length,
    })
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
