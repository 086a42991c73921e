//! Reading llama.cpp's GGUF files into the same model code: Hugging Face tensor names mapped
//! to llama.cpp's, quantized matrices kept quantized (candle's quantized matmul), and a
//! `ModelConfig` built from the file's metadata.
//!
//! llama.cpp's `convert_hf_to_gguf.py` reorders the rows of `attn_q` and `attn_k` for the
//! `llama` architecture so that ggml's interleaved ("normal") rope applies: within each head
//! the rows `[x0..x(d/2), y0..y(d/2)]` become `[x0, y0, x1, y1, ...]`. Our model applies the
//! Hugging Face (half-split, "NEOX") rope, so those rows are put back on load. Rows are
//! independent byte ranges even in quantized tensors (`in / block_size` blocks each), so this
//! is a byte copy, with no dequantization. `qwen2` files are written without that reordering.
//!
//! The tokenizer embedded in a GGUF file is not read: `tokenizer.json` (and, for the chat
//! template, optionally `tokenizer_config.json`) must sit next to the `.gguf` file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor, ggml_file};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;

use crate::error::EngineError;
use crate::models::config::{ModelConfig, RopeKind};
use crate::models::weights::WeightSource;

/// Architectures (`general.architecture`) whose tensors the llama model code runs.
const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];
/// Per-frequency rope divisors (Llama 3.1 scaling as llama.cpp stores it).
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

/// The `.gguf` file `path` names: the path itself when it is a `.gguf` file, the single
/// `*.gguf` of a directory, `None` for a directory without one (a safetensors checkpoint) or
/// a path that does not exist (the safetensors loader reports that).
pub(crate) fn find_gguf(path: &Path) -> Result<Option<PathBuf>, EngineError> {
    if path.is_file() {
        if !is_gguf(path) {
            return Err(EngineError::files(
                path,
                "a model file must be a .gguf; for safetensors give the directory",
            ));
        }
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| EngineError::io(path, e))? {
        let p = entry.map_err(|e| EngineError::io(path, e))?.path();
        if p.is_file() && is_gguf(&p) {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => {
            let names: Vec<String> = found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            Err(EngineError::files(
                path,
                format!(
                    "{} .gguf files ({}); give the path of the one to load",
                    found.len(),
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The dimensions of a GGUF model from its header alone (no tensor is read), for sizing it
/// before it loads. `None` when `path` holds no GGUF file.
pub fn gguf_dims(path: &Path) -> Result<Option<GgufDims>, EngineError> {
    let Some(file_path) = find_gguf(path)? else {
        return Ok(None);
    };
    let mut file = File::open(&file_path).map_err(|e| EngineError::io(&file_path, e))?;
    let file_bytes = file
        .metadata()
        .map_err(|e| EngineError::io(&file_path, e))?
        .len();
    let content = Content::read(&mut file)
        .map_err(|e| EngineError::files(&file_path, format!("not a readable GGUF file: {e}")))?;
    let cfg = config_from_gguf(&content).map_err(|m| EngineError::files(&file_path, m))?;
    Ok(Some(GgufDims {
        layers: cfg.num_layers as u64,
        heads: cfg.num_heads as u64,
        kv_heads: cfg.num_kv_heads as u64,
        head_dim: cfg.head_dim as u64,
        hidden: cfg.hidden_size as u64,
        intermediate: cfg.intermediate_size as u64,
        vocab: cfg.vocab_size as u64,
        context: cfg.context_length as u64,
        file_bytes,
    }))
}

/// What [`gguf_dims`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufDims {
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub context: u64,
    pub file_bytes: u64,
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
}

/// llama.cpp's name for a Hugging Face llama-family tensor name.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let short = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Undoes convert_hf_to_gguf.py's q/k row order. `raw` holds `rows` equal-sized rows, `n_head`
/// heads of `rows / n_head` rows each; GGUF row `h*d + 2i + s` is Hugging Face row
/// `h*d + s*d/2 + i` (`s` in 0..2, `i` in 0..d/2).
pub(crate) fn unpermute_rows(raw: &[u8], rows: usize, n_head: usize) -> Result<Vec<u8>, String> {
    if rows == 0
        || n_head == 0
        || !rows.is_multiple_of(2 * n_head)
        || !raw.len().is_multiple_of(rows)
    {
        return Err(format!(
            "{rows} rows of {} bytes cannot be split into {n_head} heads of an even size",
            raw.len()
        ));
    }
    let row = raw.len() / rows;
    let d = rows / n_head;
    let mut out = vec![0u8; raw.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for s in 0..2 {
                let dst = h * d + s * (d / 2) + i;
                let src = h * d + 2 * i + s;
                out[dst * row..(dst + 1) * row].copy_from_slice(&raw[src * row..(src + 1) * row]);
            }
        }
    }
    Ok(out)
}

/// The tensors of one GGUF file, read on demand.
pub(crate) struct GgufWeights {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    /// Bytes, so that a header promising more data than the file holds is an error, not an
    /// allocation of that size.
    file_len: u64,
    device: Device,
    /// Heads of `attn_q` and `attn_k` whose rows the converter reordered (`llama` only).
    permuted_heads: Option<(usize, usize)>,
    /// Counts the bytes of tensors read; its length is the tensor data's size.
    progress: ProgressBar,
}

impl GgufWeights {
    /// Opens `path` and reads its header, and the model config from its metadata. Tensors
    /// are read when asked for, their bytes counted on `progress`.
    pub(crate) fn open(
        path: &Path,
        device: &Device,
        progress: ProgressBar,
    ) -> Result<(Self, ModelConfig), EngineError> {
        let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let content = Content::read(&mut file)
            .map_err(|e| EngineError::files(path, format!("not a readable GGUF file: {e}")))?;
        let mut cfg = config_from_gguf(&content).map_err(|m| EngineError::files(path, m))?;
        let permuted_heads =
            (cfg.model_type == "llama").then_some((cfg.num_heads, cfg.num_kv_heads));
        let weights = GgufWeights {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            file_len,
            device: device.clone(),
            permuted_heads,
            progress,
        };
        let tensor_bytes: u64 = weights
            .content
            .tensor_infos
            .values()
            .map(|i| {
                let blocks = i.shape.elem_count() / i.ggml_dtype.block_size();
                (blocks * i.ggml_dtype.type_size()) as u64
            })
            .sum();
        weights.progress.set_length(tensor_bytes);
        if weights.content.tensor_infos.contains_key(ROPE_FREQS) {
            let factors = weights
                .read(ROPE_FREQS)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != cfg.head_dim / 2 {
                return Err(EngineError::files(
                    path,
                    format!(
                        "{ROPE_FREQS} has {} values, expected head size / 2 = {}",
                        factors.len(),
                        cfg.head_dim / 2
                    ),
                ));
            }
            cfg.rope = RopeKind::FreqFactors(factors);
        }
        Ok((weights, cfg))
    }

    /// A string from the file's metadata (e.g. `tokenizer.chat_template`).
    pub(crate) fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer from the file's metadata (e.g. `tokenizer.ggml.bos_token_id`).
    pub(crate) fn metadata_u64(&self, key: &str) -> Option<u64> {
        self.content.metadata.get(key).and_then(as_u64)
    }

    /// A tensor by its Hugging Face name.
    fn qtensor(&self, hf: &str) -> Result<QTensor, EngineError> {
        match gguf_name(hf) {
            Some(name) if self.content.tensor_infos.contains_key(&name) => self.read(&name),
            Some(name) => Err(EngineError::files(
                &self.path,
                format!("tensor `{name}` (`{hf}`) is missing"),
            )),
            None => Err(EngineError::files(
                &self.path,
                format!("tensor `{hf}` has no GGUF name"),
            )),
        }
    }

    /// A tensor by its GGUF name, q/k rows in Hugging Face order.
    fn read(&self, name: &str) -> Result<QTensor, EngineError> {
        let info =
            self.content.tensor_infos.get(name).ok_or_else(|| {
                EngineError::files(&self.path, format!("tensor `{name}` is missing"))
            })?;
        let dims = info.shape.dims().to_vec();
        let (dtype, elems) = (info.ggml_dtype, info.shape.elem_count());
        if !elems.is_multiple_of(dtype.block_size()) {
            return Err(EngineError::files(
                &self.path,
                format!("`{name}` has {elems} values, not whole {dtype:?} blocks"),
            ));
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        if start.saturating_add(size as u64) > self.file_len {
            return Err(EngineError::files(
                &self.path,
                format!("`{name}` ends past the end of the file (truncated download?)"),
            ));
        }
        let mut raw = vec![0u8; size];
        {
            let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| EngineError::files(&self.path, format!("reading `{name}`: {e}")))?;
        }
        self.progress.inc(size as u64);
        if let Some(heads) = self.heads_to_unpermute(name) {
            let rows = dims.first().copied().unwrap_or(0);
            raw = unpermute_rows(&raw, rows, heads)
                .map_err(|m| EngineError::files(&self.path, format!("`{name}`: {m}")))?;
        }
        Ok(ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            dims,
            &self.device,
        )?)
    }

    fn heads_to_unpermute(&self, name: &str) -> Option<usize> {
        let (q_heads, k_heads) = self.permuted_heads?;
        let module = name.rsplit('.').nth(1)?;
        match module {
            "attn_q" => Some(q_heads),
            "attn_k" => Some(k_heads),
            _ => None,
        }
    }
}

impl WeightSource for GgufWeights {
    fn has(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn tensor(&self, name: &str) -> Result<Tensor, EngineError> {
        Ok(self.qtensor(name)?.dequantize(&self.device)?)
    }

    fn matmul(&self, name: &str) -> Result<QMatMul, EngineError> {
        Ok(QMatMul::from_arc(Arc::new(self.qtensor(name)?))?)
    }

    fn origin(&self) -> &Path {
        &self.path
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => as_u64(v).map(|x| x as f64),
    }
}

/// The llama-family config from GGUF metadata, written as the config.json it stands for so
/// that one parser checks both.
fn config_from_gguf(content: &Content) -> Result<ModelConfig, String> {
    let md = &content.metadata;
    let arch = match md.get("general.architecture") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err("metadata has no general.architecture".into()),
    };
    if !ARCHITECTURES.contains(&arch) {
        return Err(format!(
            "architecture `{arch}` is not supported ({} are)",
            ARCHITECTURES.join(", ")
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<Option<u64>, String> {
        match md.get(&key(k)) {
            None => Ok(None),
            Some(v) => as_u64(v)
                .map(Some)
                .ok_or_else(|| format!("metadata {} must be one non-negative integer", key(k))),
        }
    };
    let need = |k: &str| int(k)?.ok_or_else(|| format!("metadata has no {}", key(k)));
    let float = |k: &str| -> Result<Option<f64>, String> {
        match md.get(&key(k)) {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| format!("metadata {} must be a number", key(k))),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let head_dim = match int("attention.key_length")? {
        Some(d) => d,
        None if heads > 0 => hidden / heads,
        None => return Err("attention.head_count must be at least 1".into()),
    };
    if let Some(rot) = int("rope.dimension_count")?
        && rot != head_dim
    {
        return Err(format!(
            "partial rotary embeddings (rope.dimension_count {rot}, head size {head_dim}) are not supported"
        ));
    }
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("tensor token_embd.weight is missing")?;
    let vocab = match embed.shape.dims() {
        [vocab, _] => *vocab,
        dims => return Err(format!("token_embd.weight has shape {dims:?}")),
    };
    let rope_scaling = match md.get(&key("rope.scaling.type")) {
        None => serde_json::Value::Null,
        Some(Value::String(t)) if t == "none" => serde_json::Value::Null,
        Some(Value::String(t)) if t == "linear" => serde_json::json!({
            "type": "linear",
            "factor": float("rope.scaling.factor")?.unwrap_or(1.0),
        }),
        Some(other) => return Err(format!("rope scaling {other:?} is not supported")),
    };
    let eos = md.get("tokenizer.ggml.eos_token_id").and_then(as_u64);
    let hf = serde_json::json!({
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "vocab_size": vocab,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": int("attention.head_count_kv")?.unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        "rope_theta": float("rope.freq_base")?.unwrap_or(10_000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": need("context_length")?,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "eos_token_id": eos,
        // candle's quantized matmul takes f32 activations, on the GPU too.
        "torch_dtype": "float32",
    });
    ModelConfig::from_json(&hf.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            ("model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.11.post_attention_layernorm.weight",
                "blk.11.ffn_norm.weight",
            ),
            (
                "model.layers.11.mlp.down_proj.weight",
                "blk.11.ffn_down.weight",
            ),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.up_proj.scale"), None);
    }
}
