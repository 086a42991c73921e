//! The llama family's config.json as Hugging Face checkpoints write it (Llama 2/3, Mistral,
//! Qwen2, SmolLM, TinyLlama), normalised into what the model code needs.

use serde::Deserialize;

use crate::error::EngineError;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IdOrIds {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
struct RopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<IdOrIds>,
    /// The checkpoint's weight type (newer configs call it `dtype`).
    #[serde(alias = "dtype")]
    torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    2048
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RopeKind {
    Default,
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Each inverse frequency divided by its own factor: GGUF's `rope_freqs.weight`, which is
    /// how llama.cpp stores Llama 3.1's scaling.
    FreqFactors(Vec<f32>),
}

#[derive(Debug, Clone)]
pub(crate) struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope: RopeKind,
    /// Positions the model attends over: max_position_embeddings, or the sliding window
    /// when the model uses one (we attend over the full cache, so we stop where the window
    /// would start to matter).
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` from config.json (`bfloat16`, `float16`, `float32`), when given.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    pub(crate) fn from_json(raw: &str) -> Result<ModelConfig, String> {
        let c: HfConfig = serde_json::from_str(raw).map_err(|e| format!("config.json: {e}"))?;
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(format!(
                "model_type `{model_type}` is not supported (llama, mistral, qwen2 are)"
            ));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if c.num_attention_heads == 0 || num_kv_heads == 0 || c.num_hidden_layers == 0 {
            return Err("heads and layers must be at least 1".into());
        }
        if !c.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {num_kv_heads}",
                c.num_attention_heads
            ));
        }
        let head_dim = match c.head_dim {
            Some(d) => d,
            None if c.hidden_size.is_multiple_of(c.num_attention_heads) => {
                c.hidden_size / c.num_attention_heads
            }
            None => return Err("hidden_size must divide by num_attention_heads".into()),
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let rope = match &c.rope_scaling {
            None => RopeKind::Default,
            Some(s) => match s.rope_type.as_deref() {
                None | Some("default") => RopeKind::Default,
                Some("llama3") => RopeKind::Llama3 {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                Some("linear") => RopeKind::Linear {
                    factor: s.factor.unwrap_or(1.0),
                },
                Some(other) => {
                    return Err(format!("rope_scaling type `{other}` is not supported"));
                }
            },
        };
        let window = match model_type.as_str() {
            "mistral" => c.sliding_window,
            "qwen2" if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        let context_length = match window {
            Some(w) if w > 0 && w < c.max_position_embeddings => w,
            _ => c.max_position_embeddings,
        };
        Ok(ModelConfig {
            model_type,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope,
            context_length,
            tie_word_embeddings: c.tie_word_embeddings,
            eos_token_ids: match c.eos_token_id {
                Some(IdOrIds::One(id)) => vec![id],
                Some(IdOrIds::Many(ids)) => ids,
                None => Vec::new(),
            },
            torch_dtype: c.torch_dtype,
        })
    }

    /// The type the weights, activations and KV cache use on `device`: f32 on the CPU
    /// (candle's CPU kernels are fastest there), the checkpoint's own type on a GPU (bf16
    /// when config.json does not say).
    pub(crate) fn compute_dtype(&self, device: &candle_core::Device) -> candle_core::DType {
        if device.is_cpu() {
            candle_core::DType::F32
        } else {
            self.gpu_dtype()
        }
    }

    pub(crate) fn gpu_dtype(&self) -> candle_core::DType {
        use candle_core::DType;
        match self.torch_dtype.as_deref() {
            Some("float16" | "f16" | "half") => DType::F16,
            Some("float32" | "f32" | "float") => DType::F32,
            _ => DType::BF16,
        }
    }

    pub(crate) fn load(dir: &std::path::Path) -> Result<ModelConfig, EngineError> {
        let path = dir.join("config.json");
        let raw = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        ModelConfig::from_json(&raw).map_err(|m| EngineError::files(dir, m))
    }

    /// Inverse frequencies of the rotary embedding, one per pair of dimensions.
    pub(crate) fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match self.rope {
            RopeKind::Default => base,
            RopeKind::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeKind::FreqFactors(ref factors) => base
                .into_iter()
                .zip(factors)
                .map(|(f, &d)| f / d as f64)
                .collect(),
            RopeKind::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let orig = original_max_position_embeddings as f64;
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_and_mistral_configs() {
        let qwen = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":896,
            "intermediate_size":4864,"vocab_size":151936,"num_hidden_layers":24,
            "num_attention_heads":14,"num_key_value_heads":2,"rms_norm_eps":1e-6,
            "rope_theta":1000000.0,"max_position_embeddings":32768,"sliding_window":32768,
            "use_sliding_window":false,"tie_word_embeddings":true,"eos_token_id":151643}"#;
        let c = ModelConfig::from_json(qwen).unwrap();
        assert_eq!(
            (c.head_dim, c.num_kv_heads, c.context_length),
            (64, 2, 32768)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151643]);
        let mistral = r#"{"model_type":"mistral","hidden_size":4096,"intermediate_size":14336,
            "vocab_size":32000,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"max_position_embeddings":32768,"sliding_window":4096}"#;
        let c = ModelConfig::from_json(mistral).unwrap();
        assert_eq!(c.context_length, 4096);
        let bad = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"vocab_size":8,
            "num_hidden_layers":1,"num_attention_heads":2}"#;
        assert!(ModelConfig::from_json(bad).unwrap_err().contains("gpt2"));
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies() {
        let raw = r#"{"hidden_size":64,"intermediate_size":8,"vocab_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"rope_theta":500000.0,
            "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
        let c = ModelConfig::from_json(raw).unwrap();
        let f = c.inv_freq();
        assert_eq!(f[0], 1.0);
        let plain = ModelConfig {
            rope: RopeKind::Default,
            ..c.clone()
        }
        .inv_freq();
        assert!((f[31] - plain[31] / 8.0).abs() < 1e-12);
    }
}
