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
        let y = self.w.forward(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    mlp_norm: RmsNorm,
    gate: Proj,
    up: Proj,
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
                q: Proj::load(src, &format!("{p}.self_attn.q_proj"), q_dim, h)?,
                k: Proj::load(src, &format!("{p}.self_attn.k_proj"), kv_dim, h)?,
                v: Proj::load(src, &format!("{p}.self_attn.v_proj"), kv_dim, h)?,
                o: Proj::load(src, &format!("{p}.self_attn.o_proj"), h, q_dim)?,
                mlp_norm: norm(src, &format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                gate: Proj::load(src, &format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h)?,
                up: Proj::load(src, &format!("{p}.mlp.up_proj"), cfg.intermediate_size, h)?,
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
            let q = layer.q.forward(&h)?.reshape((1, t, nh, hd))?;
            let k = layer.k.forward(&h)?.reshape((1, t, nkv, hd))?;
            let v = layer.v.forward(&h)?;
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
            let mlp = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (layer.down.forward(&mlp)? + x)?;
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?.contiguous()?)
    }
}
