//! Known model families and sizes (`models/catalog.toml`, compiled in), the shape of an
//! unknown model read from its config.json and weight files, and the memory a model needs
//! on a device: weights + KV-cache budget + activation overhead.

use std::path::Path;

use serde::Deserialize;

use crate::GpuError;

/// The catalog shipped with Flotilla.
pub const BUILTIN_CATALOG: &str = include_str!("../../../models/catalog.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// Short id, e.g. `llama-3.1-8b`; what `catalog = "..."` in a model's config names.
    pub id: String,
    pub family: String,
    /// Hugging Face repo ids (and `builtin:` sources) this entry describes.
    #[serde(default)]
    pub repos: Vec<String>,
    /// Parameters in billions (all experts counted for mixtures).
    pub parameters_b: f64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    /// Context length, tokens.
    pub context: u64,
    /// Checkpoint dtype: `bfloat16`, `float16` or `float32`.
    pub dtype: String,
    /// `chat` (default) or `embedding` (no KV cache).
    #[serde(default = "chat")]
    pub kind: String,
    /// The output head shares the embedding matrix (the engine still keeps two copies).
    #[serde(default)]
    pub tied: bool,
    /// Attention window the engine clips the context to (Mistral 7B v0.1).
    #[serde(default)]
    pub sliding_window: Option<u64>,
}

fn chat() -> String {
    "chat".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    models: Vec<CatalogEntry>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
}

impl Catalog {
    pub fn builtin() -> Catalog {
        // The file is compiled in and checked by a test; a parse failure is a build bug.
        Catalog::parse(BUILTIN_CATALOG, "models/catalog.toml").unwrap_or_else(|e| {
            tracing::error!(error = %e, "the built-in model catalog is invalid");
            Catalog {
                entries: Vec::new(),
            }
        })
    }

    pub fn parse(text: &str, path: &str) -> Result<Catalog, GpuError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| GpuError::Catalog {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(Catalog {
            entries: file.models,
        })
    }

    /// The built-in catalog with a user's file's entries in front (they win on id clashes).
    pub fn with_extra(path: &Path) -> Result<Catalog, GpuError> {
        let text = std::fs::read_to_string(path).map_err(|e| GpuError::Catalog {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut extra = Catalog::parse(&text, &path.display().to_string())?;
        extra.entries.extend(Catalog::builtin().entries);
        Ok(extra)
    }

    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    pub fn by_id(&self, id: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.id.eq_ignore_ascii_case(id))
    }

    /// The entry describing a model source: a repo id (any case, a `-GGUF`/`-Instruct`
    /// suffix included as listed) or a `builtin:` name.
    pub fn by_source(&self, source: &str) -> Option<&CatalogEntry> {
        self.entries
            .iter()
            .find(|e| e.repos.iter().any(|r| r.eq_ignore_ascii_case(source)))
            .or_else(|| self.by_id(source))
    }
}

/// What sizing a model needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Where the figures came from: a catalog id, or the directory read.
    pub origin: String,
    pub parameters: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub context: u64,
    /// Bytes per value of the checkpoint (2 for bf16/f16, 4 for f32).
    pub dtype_bytes: u64,
    /// Bytes of the weight files as stored, when read from disk.
    pub file_bytes: Option<u64>,
    /// Quantized (GGUF) weights: they keep their stored size on every device, and
    /// activations and KV run in f32.
    pub quantized: bool,
    /// Embedding models keep no KV cache.
    pub embedding: bool,
    /// Output head tied to the embeddings: the engine loads the matrix twice.
    pub tied: bool,
}

fn dtype_bytes(dtype: &str) -> u64 {
    match dtype.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "float" => 4,
        _ => 2,
    }
}

impl ModelShape {
    pub fn from_entry(e: &CatalogEntry) -> ModelShape {
        ModelShape {
            origin: format!("catalog:{}", e.id),
            parameters: (e.parameters_b * 1e9).round() as u64,
            layers: e.layers,
            heads: e.heads,
            kv_heads: e.kv_heads,
            head_dim: e.head_dim,
            hidden: e.hidden,
            intermediate: e.intermediate,
            vocab: e.vocab,
            context: e
                .sliding_window
                .filter(|&w| w > 0)
                .map_or(e.context, |w| w.min(e.context)),
            dtype_bytes: dtype_bytes(&e.dtype),
            file_bytes: None,
            quantized: false,
            embedding: e.kind == "embedding",
            tied: e.tied,
        }
    }

    /// Reads a model directory: config.json for the dimensions, the safetensors headers for
    /// the exact parameter count and stored size. Nothing is loaded.
    pub fn from_dir(dir: &Path, embedding: bool) -> Result<ModelShape, GpuError> {
        let err = |reason: String| GpuError::Shape {
            model: dir.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| err(format!("config.json: {e}")))?;
        let c: HfDims =
            serde_json::from_str(&text).map_err(|e| err(format!("config.json: {e}")))?;
        let (hidden, layers, heads) = match (c.hidden, c.layers, c.heads) {
            (Some(h), Some(l), Some(n)) if n > 0 => (h, l, n),
            _ => {
                return Err(err(
                    "config.json lacks hidden_size, num_hidden_layers or num_attention_heads"
                        .into(),
                ));
            }
        };
        let context = c.context.unwrap_or(2048);
        // The engine's rule (flotilla-engine models/config.rs): Mistral always attends
        // within its window, Qwen2 when `use_sliding_window` says so; the context is clipped.
        let window = match c.model_type.as_deref() {
            Some("mistral") => c.sliding_window,
            Some("qwen2") if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        let mut shape = ModelShape {
            origin: dir.display().to_string(),
            parameters: 0,
            layers,
            heads,
            kv_heads: c.kv_heads.unwrap_or(heads),
            head_dim: c.head_dim.unwrap_or(hidden / heads),
            hidden,
            intermediate: c.intermediate.unwrap_or(4 * hidden),
            vocab: c.vocab.unwrap_or(32_000),
            context: window
                .filter(|&w| w > 0)
                .map_or(context, |w| w.min(context)),
            dtype_bytes: c.dtype.as_deref().map_or(2, dtype_bytes),
            file_bytes: None,
            quantized: false,
            embedding,
            tied: c.tied.unwrap_or(false),
        };
        match safetensors_totals(dir).map_err(|e| err(e.to_string()))? {
            Some((params, bytes)) => {
                shape.parameters = params;
                shape.file_bytes = Some(bytes);
            }
            None => shape.parameters = shape.formula_parameters(c.experts.unwrap_or(1)),
        }
        Ok(shape)
    }

    /// Parameters of a llama-style decoder with these dimensions.
    fn formula_parameters(&self, experts: u64) -> u64 {
        let (h, hd) = (self.hidden, self.head_dim);
        let attn = 2 * h * self.heads * hd + 2 * h * self.kv_heads * hd;
        let mlp = 3 * h * self.intermediate * experts.max(1);
        let embed = self.vocab * h * if self.tied { 1 } else { 2 };
        self.layers
            .saturating_mul(attn + mlp + 2 * h)
            .saturating_add(embed + h)
    }

    /// KV bytes per token on a device whose compute dtype has `bytes` per value.
    pub fn kv_bytes_per_token(&self, bytes: u64) -> u64 {
        if self.embedding {
            0
        } else {
            (2 * self.layers)
                .saturating_mul(self.kv_heads)
                .saturating_mul(self.head_dim)
                .saturating_mul(bytes)
        }
    }
}

/// The dimensions config.json gives, under the names the common architectures use.
#[derive(Debug, Deserialize)]
struct HfDims {
    #[serde(alias = "n_embd", alias = "d_model", alias = "hidden_size")]
    hidden: Option<u64>,
    #[serde(alias = "n_layer", alias = "num_layers", alias = "num_hidden_layers")]
    layers: Option<u64>,
    #[serde(alias = "n_head", alias = "num_attention_heads")]
    heads: Option<u64>,
    #[serde(alias = "num_key_value_heads", alias = "n_head_kv")]
    kv_heads: Option<u64>,
    head_dim: Option<u64>,
    #[serde(alias = "intermediate_size", alias = "ffn_dim", alias = "n_inner")]
    intermediate: Option<u64>,
    #[serde(alias = "vocab_size")]
    vocab: Option<u64>,
    #[serde(
        alias = "max_position_embeddings",
        alias = "n_positions",
        alias = "max_seq_len"
    )]
    context: Option<u64>,
    #[serde(alias = "torch_dtype")]
    dtype: Option<String>,
    #[serde(alias = "num_local_experts")]
    experts: Option<u64>,
    #[serde(alias = "tie_word_embeddings")]
    tied: Option<bool>,
    model_type: Option<String>,
    sliding_window: Option<u64>,
    use_sliding_window: Option<bool>,
}

/// (parameters, bytes) over every `*.safetensors` file in `dir`, from their headers; None
/// when there are none.
fn safetensors_totals(dir: &Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::io::Read;
    let mut found = false;
    let (mut params, mut bytes) = (0u64, 0u64);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        found = true;
        let mut f = std::fs::File::open(&path)?;
        bytes += f.metadata()?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        // A real header is a few MB at most; a larger one means a corrupt file.
        if len > 100 << 20 {
            return Err(std::io::Error::other(format!(
                "{}: safetensors header of {len} bytes",
                path.display()
            )));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        for (name, t) in &header {
            if name == "__metadata__" {
                continue;
            }
            let n = t
                .get("shape")
                .and_then(|s| s.as_array())
                .map_or(Some(0), |dims| {
                    dims.iter()
                        .try_fold(1u64, |acc, d| acc.checked_mul(d.as_u64()?))
                })
                .ok_or_else(|| {
                    std::io::Error::other(format!(
                        "{}: tensor `{name}` has an invalid shape",
                        path.display()
                    ))
                })?;
            params = params.saturating_add(n);
        }
    }
    Ok(found.then_some((params, bytes)))
}

/// Where a model would run, for sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Gpu,
    Host,
}

/// The engine settings that decide memory beyond the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineBudget {
    pub max_num_seqs: u64,
    pub max_batch_tokens: u64,
    pub kv_cache_blocks: Option<u64>,
    pub kv_cache_bytes: Option<u64>,
    pub block_size: u64,
}

impl Default for EngineBudget {
    fn default() -> Self {
        EngineBudget {
            max_num_seqs: 16,
            max_batch_tokens: 512,
            kv_cache_blocks: None,
            kv_cache_bytes: None,
            block_size: 16,
        }
    }
}

/// The engine's default KV budget when none is configured: every sequence's full context,
/// capped at this, but never less than one full context (the engine's own rule).
pub const DEFAULT_KV_CAP_BYTES: u64 = 1 << 30;
/// CUDA context, cuBLAS workspace and allocator slack of one model on a GPU.
pub const GPU_RUNTIME_BYTES: u64 = 512 << 20;
/// Embedding requests run in batches of 32 inputs.
const EMBEDDING_BATCH: u64 = 32;

/// Memory one model needs on one kind of device, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub kv_cache: u64,
    pub activations: u64,
    /// Bytes per value the model computes in there.
    pub compute_bytes: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.activations)
    }

    pub fn dtype_label(&self, quantized: bool) -> &'static str {
        match (quantized, self.compute_bytes) {
            (true, _) => "quant",
            (false, 4) => "f32",
            _ => "bf16/f16",
        }
    }
}

impl ModelShape {
    /// Weights + KV budget + activations on `device` with `budget`, the way the engine will
    /// allocate them: f32 on the CPU, the checkpoint's dtype on a GPU, quantized weights as
    /// stored with f32 activations.
    pub fn estimate(&self, device: DeviceKind, budget: &EngineBudget) -> MemoryEstimate {
        let compute = match (self.quantized, device) {
            (true, _) | (false, DeviceKind::Host) => 4,
            (false, DeviceKind::Gpu) => self.dtype_bytes,
        };
        // The engine keeps the token embedding dequantized (f32) beside quantized weights,
        // and a tied output head as a second copy of the embedding matrix.
        let embed = self.vocab.saturating_mul(self.hidden);
        let weights = match (self.quantized, self.file_bytes) {
            (true, Some(b)) => b.saturating_add(embed.saturating_mul(4)),
            _ => self
                .parameters
                .saturating_add(if self.tied { embed } else { 0 })
                .saturating_mul(compute),
        };
        let per_token = self.kv_bytes_per_token(compute);
        let kv_cache = if per_token == 0 {
            0
        } else {
            let bs = budget.block_size.max(1);
            let per_block = per_token.saturating_mul(bs);
            // The engine's rule (flotilla-engine text.rs); a test checks the two agree.
            let blocks = match (budget.kv_cache_blocks, budget.kv_cache_bytes) {
                (Some(n), _) => n,
                (None, Some(bytes)) => bytes / per_block,
                (None, None) => {
                    let one = self.context.div_ceil(bs);
                    (budget.max_num_seqs.saturating_mul(one))
                        .min(DEFAULT_KV_CAP_BYTES / per_block)
                        .max(one)
                }
            };
            blocks.saturating_mul(per_block)
        };
        let tokens = if self.embedding {
            EMBEDDING_BATCH.saturating_mul(self.context.min(512))
        } else {
            budget.max_batch_tokens
        };
        let activations = if self.embedding {
            tokens
                .saturating_mul(4 * self.hidden + self.intermediate)
                .saturating_mul(4)
        } else {
            tokens
                .saturating_mul(4 * self.hidden + 3 * self.intermediate)
                .saturating_mul(compute)
                .saturating_add(
                    budget
                        .max_num_seqs
                        .saturating_mul(self.vocab)
                        .saturating_mul(4),
                )
        }
        .saturating_add(match device {
            DeviceKind::Gpu => GPU_RUNTIME_BYTES,
            DeviceKind::Host => 0,
        });
        MemoryEstimate {
            weights,
            kv_cache,
            activations,
            compute_bytes: compute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: f64 = (1u64 << 30) as f64;

    #[test]
    fn builtin_catalog_parses_and_covers_the_common_families() {
        let c = Catalog::parse(BUILTIN_CATALOG, "models/catalog.toml").unwrap();
        for id in [
            "llama-3.2-1b",
            "llama-3.2-3b",
            "llama-3.1-8b",
            "llama-3.1-70b",
            "qwen2.5-0.5b",
            "qwen2.5-72b",
            "mistral-7b",
            "mixtral-8x7b",
            "phi-3-mini",
            "gemma-2-9b",
        ] {
            assert!(c.by_id(id).is_some(), "{id} missing");
        }
        let mut ids: Vec<&str> = c.entries().iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), c.entries().len(), "duplicate ids");
        assert_eq!(
            c.by_source("meta-llama/llama-3.1-8b-instruct").unwrap().id,
            "llama-3.1-8b"
        );
        for e in c.entries() {
            assert!(e.heads % e.kv_heads == 0, "{}: heads/kv_heads", e.id);
            assert!(["chat", "embedding"].contains(&e.kind.as_str()), "{}", e.id);
        }
    }

    #[test]
    fn llama_8b_estimate_matches_hand_arithmetic() {
        let c = Catalog::builtin();
        let s = ModelShape::from_entry(c.by_id("llama-3.1-8b").unwrap());
        let b = EngineBudget {
            kv_cache_bytes: Some(2 << 30),
            ..EngineBudget::default()
        };
        let e = s.estimate(DeviceKind::Gpu, &b);
        // 8.03e9 parameters x 2 bytes.
        assert_eq!(e.weights, 16_060_000_000);
        // 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token; 2 GiB = 16384 tokens.
        assert_eq!(s.kv_bytes_per_token(2), 131_072);
        assert_eq!(e.kv_cache, 2 << 30);
        assert_eq!(
            e.activations,
            512 * (4 * 4096 + 3 * 14336) * 2 + 16 * 128_256 * 4 + GPU_RUNTIME_BYTES
        );
        // With no KV setting the engine keeps one full 128k context: 16 GiB.
        let d = s.estimate(DeviceKind::Gpu, &EngineBudget::default());
        assert_eq!(d.kv_cache, 16 << 30);
        // On the CPU everything is f32.
        let h = s.estimate(DeviceKind::Host, &b);
        assert_eq!(h.weights, 2 * e.weights);
        assert!((h.total() as f64 / GIB) > 31.0);
    }

    #[test]
    fn tied_heads_and_sliding_windows_follow_the_engine() {
        let c = Catalog::builtin();
        let one_b = ModelShape::from_entry(c.by_id("llama-3.2-1b").unwrap());
        let e = one_b.estimate(DeviceKind::Gpu, &EngineBudget::default());
        assert_eq!(e.weights, (1_236_000_000 + 128_256 * 2048) * 2);
        let v01 = ModelShape::from_entry(c.by_id("mistral-7b-v0.1").unwrap());
        assert_eq!(v01.context, 4096);
        assert_eq!(
            c.by_source("mistralai/Mistral-7B-Instruct-v0.3")
                .unwrap()
                .vocab,
            32768
        );
    }

    #[test]
    fn unknown_model_is_sized_from_config_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
                "max_position_embeddings": 256, "torch_dtype": "float32"}"#,
        )
        .unwrap();
        // A safetensors file of two tensors, 100x64 and 64 values, f32.
        let header = br#"{"a":{"dtype":"F32","shape":[100,64],"data_offsets":[0,25600]},"b":{"dtype":"F32","shape":[64],"data_offsets":[25600,25856]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend(std::iter::repeat_n(0u8, 25_856));
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let s = ModelShape::from_dir(dir.path(), false).unwrap();
        assert_eq!(s.parameters, 6464);
        assert_eq!(s.file_bytes, Some(bytes.len() as u64));
        assert_eq!((s.kv_heads, s.head_dim, s.dtype_bytes), (2, 16, 4));
        let e = s.estimate(DeviceKind::Host, &EngineBudget::default());
        assert_eq!(e.weights, 6464 * 4);
        // 16 sequences x 256 tokens x (2 x 2 x 2 x 16 x 4 bytes) = 1 MiB, under the cap.
        assert_eq!(e.kv_cache, 16 * 256 * 512);
        let err = ModelShape::from_dir(&dir.path().join("nope"), false).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
