//! Writing one of our safetensors checkpoints as a GGUF file llama.cpp can load: its tensor
//! names, its q/k row order, its metadata keys, and a byte-level BPE tokenizer in its
//! `tokenizer.ggml.*` form.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::EngineError;
use crate::models::config::{ModelConfig, RopeKind};
use crate::models::gguf::{ROPE_FREQS, gguf_name};
use crate::models::weights::{SafetensorsWeights, WeightSource};
use crate::template::TokenizerConfig;

/// Block size of the K-quants (Q4_K, Q6_K): a matrix's input dimension must divide by it.
const QK_K: usize = 256;
/// Block size of Q5_0 and Q8_0.
const QK8_0: usize = 32;

/// How `write_gguf` stores the weight matrices (norms, biases and rope factors stay F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    /// No quantization: every tensor F32, the exact weights (a reference for the conversion).
    F32,
    /// Every matrix F16, like convert_hf_to_gguf.py's default `--outtype f16`.
    F16,
    /// Every matrix Q8_0 (8.5 bits per weight), like llama.cpp's Q8_0.
    Q8_0,
    /// llama.cpp's Q4_K_M recipe (`llama_tensor_get_type`): Q4_K for most matrices; Q6_K for
    /// `output` (and for `token_embd` when it doubles as the output), and for `attn_v` and
    /// `ffn_down` in the layers llama.cpp's `use_more_bits` picks (the first and last eighth
    /// and every third layer between: about half of them). Where a matrix's input dimension
    /// is not a multiple of 256, llama.cpp's fallbacks apply: Q4_K becomes Q5_0, Q6_K becomes
    /// Q8_0, and F16 where even 32 does not divide it.
    Q4KM,
}

impl GgufQuant {
    /// `general.file_type`: llama.cpp's LLAMA_FTYPE_ALL_F32, _MOSTLY_F16, _MOSTLY_Q8_0 and
    /// _MOSTLY_Q4_K_M.
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
        }
    }
}

/// What a matrix is, for the quantization recipe.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// `output`, or `token_embd` when there is no separate `output`.
    Output,
    /// `attn_v` or `ffn_down` of this layer: more bits in some layers.
    MoreBits(usize),
    Other,
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn matrix_type(quant: GgufQuant, role: Role, layers: usize, in_dim: usize) -> GgmlDType {
    let wanted = match (quant, role) {
        (GgufQuant::F32, _) => return GgmlDType::F32,
        (GgufQuant::F16, _) => return GgmlDType::F16,
        (GgufQuant::Q8_0, _) => GgmlDType::Q8_0,
        // llama.cpp goes straight to Q8_0 for an output whose rows do not fit K blocks.
        (GgufQuant::Q4KM, Role::Output) if !in_dim.is_multiple_of(QK_K) => GgmlDType::Q8_0,
        (GgufQuant::Q4KM, Role::Output) => GgmlDType::Q6K,
        (GgufQuant::Q4KM, Role::MoreBits(layer)) if use_more_bits(layer, layers) => GgmlDType::Q6K,
        (GgufQuant::Q4KM, _) => GgmlDType::Q4K,
    };
    let fallback = match wanted {
        GgmlDType::Q4K if !in_dim.is_multiple_of(QK_K) => GgmlDType::Q5_0,
        GgmlDType::Q6K if !in_dim.is_multiple_of(QK_K) => GgmlDType::Q8_0,
        t => t,
    };
    if in_dim.is_multiple_of(QK8_0) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// convert_hf_to_gguf.py's `LlamaModel.permute`: within each head, rows
/// `[x0..x(d/2), y0..y(d/2)]` become `[x0, y0, x1, y1, ...]` so that ggml's interleaved rope
/// pairs them. Works on `[out, in]` weights and `[out]` biases.
pub(crate) fn permute_for_gguf(t: &Tensor, n_head: usize) -> Result<Tensor, EngineError> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let mut split = vec![n_head, 2, out / n_head / 2];
    split.extend_from_slice(&dims[1..]);
    Ok(t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Converts the llama-family safetensors checkpoint in `model_dir` into the GGUF file `out`
/// (`general.architecture` `llama`, or `qwen2` for Qwen2 checkpoints), quantized as `quant`
/// says, and copies tokenizer.json and tokenizer_config.json next to it so that
/// `TextEngine::load` can load it. The file is written under a temporary name and renamed
/// when complete.
pub fn write_gguf(model_dir: &Path, out: &Path, quant: GgufQuant) -> Result<(), EngineError> {
    let cfg = ModelConfig::load(model_dir)?;
    let arch = match cfg.model_type.as_str() {
        // llama.cpp converts Mistral checkpoints to the llama architecture too.
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(EngineError::files(
                model_dir,
                format!("model_type `{other}` has no GGUF writer"),
            ));
        }
    };
    let src = SafetensorsWeights::load(model_dir, &Device::Cpu, &indicatif::ProgressBar::hidden())?;
    let tensors = gguf_tensors(&cfg, &src, arch, quant)?;
    let mut metadata = model_metadata(&cfg, arch, quant, model_dir);
    metadata.extend(tokenizer_metadata(model_dir, cfg.vocab_size)?);

    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    {
        let file = std::fs::File::create(&partial).map_err(|e| EngineError::io(&partial, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &md, &ts)
            .map_err(|e| EngineError::files(&partial, format!("writing GGUF: {e}")))?;
        w.flush().map_err(|e| EngineError::io(&partial, e))?;
    }
    std::fs::rename(&partial, out).map_err(|e| EngineError::io(out, e))?;

    for (name, required) in [("tokenizer.json", true), ("tokenizer_config.json", false)] {
        let from = model_dir.join(name);
        let to = parent.join(name);
        if !from.is_file() {
            if required {
                return Err(EngineError::files(model_dir, format!("{name} is missing")));
            }
            continue;
        }
        // Writing into the model's own directory: the file is already there (copying a file
        // onto itself would truncate it).
        let same = match (from.canonicalize(), to.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            std::fs::copy(&from, &to).map_err(|e| EngineError::io(&to, e))?;
        }
    }
    Ok(())
}

/// Every tensor in llama.cpp's names and order, converted and quantized.
fn gguf_tensors(
    cfg: &ModelConfig,
    src: &SafetensorsWeights,
    arch: &str,
    quant: GgufQuant,
) -> Result<Vec<(String, QTensor)>, EngineError> {
    let tied = cfg.tie_word_embeddings || !src.has("lm_head.weight");
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        names.push(format!("{p}.input_layernorm.weight"));
        for m in ["q_proj", "k_proj", "v_proj"] {
            names.push(format!("{p}.self_attn.{m}.weight"));
            names.push(format!("{p}.self_attn.{m}.bias"));
        }
        names.push(format!("{p}.self_attn.o_proj.weight"));
        names.push(format!("{p}.post_attention_layernorm.weight"));
        for m in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}.mlp.{m}.weight"));
        }
    }
    names.push("model.norm.weight".into());
    if !tied {
        names.push("lm_head.weight".into());
    }

    let mut out = Vec::with_capacity(names.len() + 1);
    if !matches!(cfg.rope, RopeKind::Default | RopeKind::Linear { .. }) {
        // Frequency-dependent scaling (Llama 3.1) as llama.cpp stores it: one divisor per
        // frequency, applied to the unscaled inverse frequencies.
        let plain = ModelConfig {
            rope: RopeKind::Default,
            ..cfg.clone()
        }
        .inv_freq();
        let factors: Vec<f32> = plain
            .iter()
            .zip(cfg.inv_freq())
            .map(|(base, scaled)| base / scaled)
            .collect();
        let t = Tensor::new(factors, &Device::Cpu)?;
        out.push((
            ROPE_FREQS.to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    for hf in names {
        if hf.ends_with(".bias") && !src.has(&hf) {
            continue;
        }
        let name = gguf_name(&hf)
            .ok_or_else(|| EngineError::files(src.origin(), format!("`{hf}` has no GGUF name")))?;
        let mut t = src.tensor(&hf)?.to_dtype(candle_core::DType::F32)?;
        if arch == "llama" {
            if hf.contains(".q_proj.") {
                t = permute_for_gguf(&t, cfg.num_heads)?;
            } else if hf.contains(".k_proj.") {
                t = permute_for_gguf(&t, cfg.num_kv_heads)?;
            }
        }
        let dtype = match t.dims() {
            [_, in_dim] => {
                let layer = || {
                    hf.strip_prefix("model.layers.")
                        .and_then(|r| r.split('.').next())
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0)
                };
                let role = if hf == "lm_head.weight" || (tied && hf == "model.embed_tokens.weight")
                {
                    Role::Output
                } else if hf.contains(".v_proj.") || hf.contains(".down_proj.") {
                    Role::MoreBits(layer())
                } else {
                    Role::Other
                };
                matrix_type(quant, role, cfg.num_layers, *in_dim)
            }
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, dtype)
            .map_err(|e| EngineError::files(src.origin(), format!("quantizing `{hf}`: {e}")))?;
        out.push((name, q));
    }
    Ok(out)
}

/// The `general.*` and `{arch}.*` keys llama.cpp reads for a llama-family model.
fn model_metadata(
    cfg: &ModelConfig,
    arch: &str,
    quant: GgufQuant,
    model_dir: &Path,
) -> Vec<(String, Value)> {
    let u = |n: usize| Value::U32(n as u32);
    let name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        // ggml's GGML_QNT_VERSION: the block layouts candle writes.
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let a = |k: &str| format!("{arch}.{k}");
    md.extend([
        (a("vocab_size"), u(cfg.vocab_size)),
        (a("context_length"), u(cfg.context_length)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("block_count"), u(cfg.num_layers)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_heads)),
        (a("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("rope.dimension_count"), u(cfg.head_dim)),
    ]);
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        md.push((a("attention.key_length"), u(cfg.head_dim)));
        md.push((a("attention.value_length"), u(cfg.head_dim)));
    }
    if let RopeKind::Linear { factor } = cfg.rope {
        md.push((a("rope.scaling.type"), Value::String("linear".into())));
        md.push((a("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    md
}

/// A `tokenizer.json` BPE model's vocabulary and merges in llama.cpp's `gpt2` form, plus the
/// special token ids and chat template from tokenizer_config.json. Tokenizers of other kinds
/// (SentencePiece/Unigram) are not converted: the file then carries no vocabulary, which
/// Flotilla does not need (it reads tokenizer.json) but llama.cpp does.
fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>, EngineError> {
    let path = dir.join("tokenizer.json");
    let raw = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let tj: serde_json::Value = serde_json::from_str(&raw)
        .map_err(|e| EngineError::files(&path, format!("invalid JSON: {e}")))?;
    let model = &tj["model"];
    let byte_level = |v: &serde_json::Value| {
        v["type"] == "ByteLevel"
            || v["pretokenizers"]
                .as_array()
                .is_some_and(|l| l.iter().any(|p| p["type"] == "ByteLevel"))
    };
    if model["type"] != "BPE" || !byte_level(&tj["pre_tokenizer"]) {
        tracing::warn!(
            path = %path.display(),
            "tokenizer is not a byte-level BPE: the GGUF file gets no tokenizer.ggml vocabulary"
        );
        return Ok(Vec::new());
    }
    // llama.cpp's token types.
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    const UNUSED: i32 = 5;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: Option<u64>, text: &str, kind: i32| -> Result<(), EngineError> {
        let slot = id
            .and_then(|id| tokens.get_mut(id as usize))
            .ok_or_else(|| {
                EngineError::files(
                    &path,
                    format!("token {text:?} has an id outside the model's vocab of {vocab_size}"),
                )
            })?;
        *slot = Some((text.to_string(), kind));
        Ok(())
    };
    if let Some(vocab) = model["vocab"].as_object() {
        for (text, id) in vocab {
            put(id.as_u64(), text, NORMAL)?;
        }
    }
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        let kind = if t["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(
            t["id"].as_u64(),
            t["content"].as_str().unwrap_or_default(),
            kind,
        )?;
    }
    let (texts, kinds): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (text, kind) = t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
            (Value::String(text), Value::I32(kind))
        })
        .unzip();
    // Merges are "a b" strings or, in newer files, ["a", "b"] pairs.
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    // A bare ByteLevel pre-tokenizer splits with GPT-2's regex; anything else gets llama.cpp's
    // default splitting.
    let pre = if tj["pre_tokenizer"]["type"] == "ByteLevel"
        && tj["pre_tokenizer"]["use_regex"] != false
    {
        "gpt-2"
    } else {
        tracing::warn!(path = %path.display(), "pre-tokenizer not recognised: GGUF gets `default`");
        "default"
    };
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(kinds)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    let tc = TokenizerConfig::load(dir)?;
    let id_of = |token: &Option<String>| {
        let token = token.as_deref()?;
        model["vocab"][token].as_u64().or_else(|| {
            tj["added_tokens"]
                .as_array()?
                .iter()
                .find(|t| t["content"] == token)?["id"]
                .as_u64()
        })
    };
    if let Some(id) = id_of(&tc.bos_token) {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id as u32)));
    }
    if let Some(id) = id_of(&tc.eos_token) {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id as u32)));
    }
    let tc_raw: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    for key in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc_raw[key].as_bool() {
            md.push((format!("tokenizer.ggml.{key}"), Value::Bool(b)));
        }
    }
    if let Some(t) = tc.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gguf::unpermute_rows;

    #[test]
    fn permutation_matches_convert_hf_to_gguf_and_loading_undoes_it() {
        // 2 heads of 4 rows, 1 column: rows [0 1 2 3 | 4 5 6 7]. Python:
        // w.reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8, 1) -> [0 2 1 3 | 4 6 5 7].
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_for_gguf(&w, 2).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        // The rows of a 16x3 matrix, as bytes, come back in order for 1, 2 and 8 heads.
        for heads in [1, 2, 8] {
            let w = Tensor::arange(0f32, 48., &Device::Cpu)
                .unwrap()
                .reshape((16, 3))
                .unwrap();
            let p = permute_for_gguf(&w, heads).unwrap();
            let bytes: Vec<u8> = p
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let back = unpermute_rows(&bytes, 16, heads).unwrap();
            let back: Vec<f32> = back
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(back, w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        assert!(unpermute_rows(&[0u8; 12], 3, 1).is_err());
    }

    #[test]
    fn q4_k_m_recipe_follows_llama_cpp() {
        // use_more_bits over 12 layers: 0 (first eighth), 10 and 11 (last eighth), and the
        // layers between with (i - 1) % 3 == 2.
        let picked: Vec<usize> = (0..12).filter(|&i| use_more_bits(i, 12)).collect();
        assert_eq!(picked, [0, 3, 6, 9, 10, 11]);
        let t = |role, in_dim| matrix_type(GgufQuant::Q4KM, role, 12, in_dim);
        assert_eq!(t(Role::Other, 768), GgmlDType::Q4K);
        assert_eq!(t(Role::Output, 768), GgmlDType::Q6K);
        assert_eq!(t(Role::MoreBits(0), 3072), GgmlDType::Q6K);
        assert_eq!(t(Role::MoreBits(1), 3072), GgmlDType::Q4K);
        // Rows that are not whole K blocks.
        assert_eq!(t(Role::Other, 64), GgmlDType::Q5_0);
        assert_eq!(t(Role::MoreBits(0), 64), GgmlDType::Q8_0);
        assert_eq!(t(Role::Output, 64), GgmlDType::Q8_0);
        assert_eq!(t(Role::Other, 40), GgmlDType::F16);
        assert_eq!(
            matrix_type(GgufQuant::Q8_0, Role::Output, 2, 64),
            GgmlDType::Q8_0
        );
    }
}
