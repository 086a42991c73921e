//! The llama family (Llama 2/3, Mistral, Qwen2 with its q/k/v biases, SmolLM, TinyLlama):
//! one forward pass over a flat batch of tokens from many sequences, each at its own
//! positions, with K/V in the paged cache.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

use crate::error::EngineError;
use crate::kv::{KvCache, KvStore, SeqSlice};
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
        dtype: DType,
    ) -> Result<Proj, EngineError> {
        let name = format!("{prefix}.weight");
        let w = match src.matmul(&name)? {
            QMatMul::Tensor(t) => QMatMul::Tensor(t.to_dtype(dtype)?),
            quantized => quantized,
        };
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
            Some(b.to_dtype(dtype)?)
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
            QMatMul::Tensor(w) if x.device().is_cpu() && x.rank() == 2 && x.dim(0)? <= 64 => {
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
                    None => Tensor::zeros(n, w.dtype(), w.device())?,
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

/// RMSNorm weights. On the CPU candle's fused `rms_norm`; on CUDA our kernel, fused with
/// the residual add before it.
struct Norm {
    w: Tensor,
    eps: f64,
}

impl Norm {
    fn load(
        src: &dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        dtype: DType,
    ) -> Result<Norm, EngineError> {
        let w = src.tensor(name)?;
        if w.dims() != [dim] {
            return Err(EngineError::files(
                src.origin(),
                format!("`{name}` has shape {:?}, expected [{dim}]", w.dims()),
            ));
        }
        Ok(Norm {
            w: w.to_dtype(dtype)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.w, self.eps as f32)
    }
}

struct Layer {
    attn_norm: Norm,
    /// q, k, v.
    qkv: Stacked,
    o: Proj,
    mlp_norm: Norm,
    /// gate, up.
    gate_up: Stacked,
    down: Proj,
}

pub(crate) struct LlamaModel {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Proj,
    /// Rotary tables `[context_length, head_dim / 2]`, f32 whatever the compute type.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Weights, activations and KV cache.
    dtype: DType,
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
        let dtype = cfg.compute_dtype(device);
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
                attn_norm: Norm::load(src, &format!("{p}.input_layernorm.weight"), h, eps, dtype)?,
                qkv: Stacked::new(vec![
                    Proj::load(src, &format!("{p}.self_attn.q_proj"), q_dim, h, dtype)?,
                    Proj::load(src, &format!("{p}.self_attn.k_proj"), kv_dim, h, dtype)?,
                    Proj::load(src, &format!("{p}.self_attn.v_proj"), kv_dim, h, dtype)?,
                ])?,
                o: Proj::load(src, &format!("{p}.self_attn.o_proj"), h, q_dim, dtype)?,
                mlp_norm: Norm::load(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                    dtype,
                )?,
                gate_up: Stacked::new(vec![
                    Proj::load(
                        src,
                        &format!("{p}.mlp.gate_proj"),
                        cfg.intermediate_size,
                        h,
                        dtype,
                    )?,
                    Proj::load(
                        src,
                        &format!("{p}.mlp.up_proj"),
                        cfg.intermediate_size,
                        h,
                        dtype,
                    )?,
                ])?,
                down: Proj::load(
                    src,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    dtype,
                )?,
            });
        }
        let lm_head = if !cfg.tie_word_embeddings && src.has("lm_head.weight") {
            Proj::load(src, "lm_head", cfg.vocab_size, h, dtype)?
        } else {
            Proj::load(src, "model.embed_tokens", cfg.vocab_size, h, dtype)?
        };
        // Rotary tables for every position, computed as candle-transformers does (f32).
        let inv_freq = Tensor::new(cfg.inv_freq(), device)?;
        let half = inv_freq.elem_count();
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq.reshape((1, half))?)?;
        Ok(LlamaModel {
            embed: Embedding::new(embed_w.to_dtype(dtype)?, h),
            norm: Norm::load(src, "model.norm.weight", h, cfg.rms_norm_eps, dtype)?,
            layers,
            lm_head,
            cos: angles.cos()?,
            sin: angles.sin()?,
            device: device.clone(),
            dtype,
            cfg,
        })
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes one token's K and V take across all layers.
    pub(crate) fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers
            * self.cfg.num_kv_heads
            * self.cfg.head_dim
            * self.dtype.size_in_bytes()
    }

    /// An empty paged KV cache of `num_blocks` blocks on the model's device.
    pub(crate) fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<KvCache, EngineError> {
        let c = &self.cfg;
        if self.device.is_cpu() {
            return Ok(KvCache::Cpu(KvStore::new(
                c.num_layers,
                num_blocks,
                block_size,
                c.num_kv_heads,
                c.head_dim,
            )));
        }
        #[cfg(feature = "cuda")]
        {
            let shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim);
            let zeros = || Tensor::zeros(shape, self.dtype, &self.device);
            let mut k = Vec::with_capacity(c.num_layers);
            let mut v = Vec::with_capacity(c.num_layers);
            for _ in 0..c.num_layers {
                k.push(zeros()?);
                v.push(zeros()?);
            }
            Ok(KvCache::Gpu(crate::kv::GpuKv {
                k,
                v,
                num_blocks,
                block_size,
            }))
        }
        #[cfg(not(feature = "cuda"))]
        Err(EngineError::Device(format!(
            "no KV cache for device {:?} in this build",
            self.device
        )))
    }

    /// Runs the batch, storing every token's K/V, and returns `[logits_rows, vocab]` f32.
    pub(crate) fn forward(
        &self,
        batch: &Batch<'_>,
        kv: &mut KvCache,
    ) -> Result<Tensor, EngineError> {
        match kv {
            KvCache::Cpu(store) => self.forward_cpu(batch, store),
            #[cfg(feature = "cuda")]
            KvCache::Gpu(gpu) => self.forward_cuda(batch, gpu),
        }
    }

    fn forward_cpu(&self, batch: &Batch<'_>, kv: &mut KvStore) -> Result<Tensor, EngineError> {
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

#[cfg(feature = "cuda")]
impl LlamaModel {
    /// The CUDA forward pass: candle's cuBLAS matmuls for the projections, our kernels for
    /// everything between them (rotary in place, the K/V write and paged attention over the
    /// block tables, residual add fused with each RMSNorm).
    fn forward_cuda(
        &self,
        batch: &Batch<'_>,
        kv: &mut crate::kv::GpuKv,
    ) -> Result<Tensor, EngineError> {
        use flotilla_kernels::PagedBatch;
        use flotilla_kernels::cpu::AttentionDims;
        use flotilla_kernels::cuda as k;

        let t = batch.tokens.len();
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let runs: Vec<_> = batch.seqs.iter().map(SeqSlice::run).collect();
        let paged = PagedBatch::new(&runs, kv.block_size, kv.num_blocks).map_err(kernel_err)?;
        if paged.tokens() != t {
            return Err(EngineError::Panicked(format!(
                "batch of {t} tokens, {} in its runs",
                paged.tokens()
            )));
        }
        let dev_batch = k::DeviceBatch::upload(paged, &self.device).map_err(kernel_err)?;
        let positions = dev_batch.positions().map_err(kernel_err)?;
        let dims = AttentionDims::new(nh, nkv, hd);
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        // The residual stream; `pending` is the output to add into it before the next norm.
        let x = self.embed.forward(&ids)?.contiguous()?;
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let eps = layer.attn_norm.eps as f32;
            let h = k::add_rms_norm(&x, pending.as_ref(), &layer.attn_norm.w, eps)
                .map_err(kernel_err)?;
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv[0].contiguous()?.reshape((t, nh, hd))?;
            let kk = qkv[1].contiguous()?.reshape((t, nkv, hd))?;
            let v = qkv[2].contiguous()?.reshape((t, nkv, hd))?;
            let host_positions = dev_batch.host().positions();
            k::rotary_inplace(&q, &kk, &positions, host_positions, &self.cos, &self.sin)
                .map_err(kernel_err)?;
            k::write_kv(&kk, &v, &kv.k[li], &kv.v[li], &dev_batch).map_err(kernel_err)?;
            let att = k::paged_attention(&q, &kv.k[li], &kv.v[li], &dev_batch, dims)
                .map_err(kernel_err)?;
            let att = att.reshape((t, nh * hd))?;
            let o = layer.o.forward(&att)?.contiguous()?;
            let eps = layer.mlp_norm.eps as f32;
            let h = k::add_rms_norm(&x, Some(&o), &layer.mlp_norm.w, eps).map_err(kernel_err)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let mlp = (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?;
            pending = Some(layer.down.forward(&mlp)?.contiguous()?);
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let normed = k::add_rms_norm(&x, pending.as_ref(), &self.norm.w, self.norm.eps as f32)
            .map_err(kernel_err)?;
        let last = normed.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&last)?;
        Ok(logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }
}

#[cfg(feature = "cuda")]
fn kernel_err(e: flotilla_kernels::KernelError) -> EngineError {
    match e {
        flotilla_kernels::KernelError::Candle(e) => EngineError::Candle(e),
        other => EngineError::Panicked(other.to_string()),
    }
}
