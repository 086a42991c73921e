//! The llama family (Llama 2/3, Mistral, Qwen2 with its q/k/v biases, SmolLM, TinyLlama):
//! one forward pass over a flat batch of tokens from many sequences, each at its own
//! positions, with K/V in the paged cache.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm};

use crate::error::EngineError;
use crate::kv::{KvStore, SeqSlice};
use crate::models::config::ModelConfig;
use crate::models::weights::WeightSource;

/// A projection `x @ w.T + b`, dense or quantized.
struct Proj {
    w: QMatMul,
    b: Option<Tensor>,
}

impl Proj {
    fn load(
        src: &dyn WeightSource,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Proj, EngineError> {
        let name = format!("{prefix}.weight");
        let w = src.matmul(&name)?;
        let dims = match &w {
            QMatMul::QTensor(q) => q.shape().dims().to_vec(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims().to_vec(),
        };
        if dims != [out_dim, in_dim] {
            return Err(EngineError::files(
                src.origin(),
                format!("`{name}` has shape {dims:?}, config says [{out_dim}, {in_dim}]"),
            ));
        }
        let bias = format!("{prefix}.bias");
        let b = if src.has(&bias) {
            let b = src.tensor(&bias)?;
            if b.dims() != [out_dim] {
                return Err(EngineError::files(
                    src.origin(),
                    format!("`{bias}` has shape {:?}, expected [{out_dim}]", b.dims()),
                ));
            }
            Some(b)
        } else {
            None
        };
        Ok(Proj { w, b })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.w {
            // `(W @ x.T).T` rather than `x @ W.T` for decode-sized batches: with the weights
            // as the left operand candle's CPU gemm streams them from memory with less
            // repacking; measured 1.5x faster at 16-32 rows with weights in DRAM, the same
            // at 1 row, slower for long prefill chunks (BENCHMARKS.md).
            QMatMul::Tensor(w) if x.rank() == 2 && x.dim(0)? <= 64 => {
                w.matmul(&x.t()?)?.t()?.contiguous()?
            }
            w => w.forward(x)?,
        };
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Projections of the same input computed together: one matmul over the stacked weights
/// when all are dense (fewer, wider gemm calls), one each when quantized.
enum Stacked {
    One { proj: Proj, widths: Vec<usize> },
    Each(Vec<Proj>),
}

impl Stacked {
    fn new(parts: Vec<Proj>) -> Result<Stacked, EngineError> {
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match &p.w {
                QMatMul::Tensor(t) => Some(t),
                _ => None,
            })
            .collect();
        let Some(ws) = dense else {
            return Ok(Stacked::Each(parts));
        };
        let widths = ws
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = Tensor::cat(&ws, 0)?;
        let b = if parts.iter().any(|p| p.b.is_some()) {
            let mut bs = Vec::with_capacity(parts.len());
            for (p, &n) in parts.iter().zip(&widths) {
                bs.push(match &p.b {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(n, DType::F32, w.device())?,
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Stacked::One {
            proj: Proj {
                w: QMatMul::Tensor(w),
                b,
            },
            widths,
        })
    }

    /// One output per part, in order (views into one result when stacked).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Stacked::Each(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Stacked::One { proj, widths } => {
                let y = proj.forward(x)?;
                let mut out = Vec::with_capacity(widths.len());
                let mut start = 0;
                for &n in widths {
                    out.push(y.narrow(1, start, n)?);
                    start += n;
                }
                Ok(out)
            }
        }
    }
}

fn norm(src: &dyn WeightSource, name: &str, dim: usize, eps: f64) -> Result<RmsNorm, EngineError> {
    let w = src.tensor(name)?;
    if w.dims() != [dim] {
        return Err(EngineError::files(
            src.origin(),
            format!("`{name}` has shape {:?}, expected [{dim}]", w.dims()),
        ));
    }
    Ok(RmsNorm::new(w, eps))
}

struct Layer {
    attn_norm: RmsNorm,
    /// q, k, v.
    qkv: Stacked,
    o: Proj,
    mlp_norm: RmsNorm,
    /// gate, up.
    gate_up: Stacked,
    down: Proj,
}

pub(crate) struct LlamaModel {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// The work of one engine step: tokens of many sequences, flattened.
pub(crate) struct Batch<'a> {
    pub tokens: Vec<u32>,
    /// Position of each token in its own sequence.
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice<'a>>,
    /// Rows whose logits are wanted (the last token of each sequence that samples).
    pub logits_rows: Vec<u32>,
}

impl LlamaModel {
    pub(crate) fn load(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        device: &Device,
    ) -> Result<LlamaModel, EngineError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_dim = cfg.num_heads * hd;
        let kv_dim = cfg.num_kv_heads * hd;
        let embed_w = src.tensor("model.embed_tokens.weight")?;
        if embed_w.dims() != [cfg.vocab_size, h] {
            return Err(EngineError::files(
                src.origin(),
                format!(
                    "`model.embed_tokens.weight` has shape {:?}, config says [{}, {h}]",
                    embed_w.dims(),
                    cfg.vocab_size
                ),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let eps = cfg.rms_norm_eps;
            layers.push(Layer {
                attn_norm: norm(src, &format!("{p}.input_layernorm.weight"), h, eps)?,
                qkv: Stacked::new(vec![
                    Proj::load(src, &format!("{p}.self_attn.q_proj"), q_dim, h)?,
                    Proj::load(src, &format!("{p}.self_attn.k_proj"), kv_dim, h)?,
                    Proj::load(src, &format!("{p}.self_attn.v_proj"), kv_dim, h)?,
                ])?,
                o: Proj::load(src, &format!("{p}.self_attn.o_proj"), h, q_dim)?,
                mlp_norm: norm(src, &format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                gate_up: Stacked::new(vec![
                    Proj::load(src, &format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h)?,
                    Proj::load(src, &format!("{p}.mlp.up_proj"), cfg.intermediate_size, h)?,
                ])?,
                down: Proj::load(src, &format!("{p}.mlp.down_proj"), h, cfg.intermediate_size)?,
            });
        }
        let lm_head = if !cfg.tie_word_embeddings && src.has("lm_head.weight") {
            Proj::load(src, "lm_head", cfg.vocab_size, h)?
        } else {
            Proj::load(src, "model.embed_tokens", cfg.vocab_size, h)?
        };
        // Rotary tables for every position, computed as candle-transformers does (f32).
        let inv_freq = Tensor::new(cfg.inv_freq(), device)?;
        let half = inv_freq.elem_count();
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq.reshape((1, half))?)?;
        Ok(LlamaModel {
            embed: Embedding::new(embed_w, h),
            norm: norm(src, "model.norm.weight", h, cfg.rms_norm_eps)?,
            layers,
            lm_head,
            cos: angles.cos()?,
            sin: angles.sin()?,
            device: device.clone(),
            cfg,
        })
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs the batch, storing every token's K/V, and returns `[logits_rows, vocab]` f32.
    pub(crate) fn forward(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvStore,
    ) -> Result<Tensor, EngineError> {
        let t = batch.tokens.len();
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let pos = Tensor::new(batch.positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed.forward(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv[0].reshape((1, t, nh, hd))?;
            let k = qkv[1].reshape((1, t, nkv, hd))?;
            let v = &qkv[2];
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?;
            let k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            kv.write(li, &batch.seqs, &k, &v);
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let att = kv.attend(li, &batch.seqs, &q, nh);
            let att = Tensor::from_vec(att, (t, nh * hd), &self.device)?;
            x = (layer.o.forward(&att)? + x)?;
            let h = layer.mlp_norm.forward(&x)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let mlp = (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?;
            x = (layer.down.forward(&mlp)? + x)?;
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?.contiguous()?)
    }
}
