//! Loading a llama-family model directory: config.json, *.safetensors, tokenizer.json,
//! tokenizer_config.json. Weights are converted to F32.

use std::path::Path;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::models::{LlamaModel, ModelConfig, SafetensorsWeights};

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

/// Loads the tokenizer files and the model from a Hugging Face style directory
/// (config.json + *.safetensors) on `device`.
pub(crate) fn load_text_model(
    dir: &Path,
    device: &Device,
) -> Result<(LlamaModel, TextTokenizer), EngineError> {
    let cfg = ModelConfig::load(dir)?;
    let tokenizer = load_text_tokenizer(dir, &cfg)?;
    let weights = SafetensorsWeights::load(dir, device)?;
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
