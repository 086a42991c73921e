//! CPU reference implementations, one per kernel, on `f32` slices in the kernels'
//! layouts. Written for clarity, not speed: they are what the CUDA kernels are tested
//! against. (The engine's own CPU path has a parallel, vectorised attention; its tests
//! check it against [`paged_attention`].)

use crate::{PagedBatch, Result, shape_err};

/// `x[r] += residual[r]` (when given), then `out[r] = x[r] / rms(x[r]) * weight` for every
/// row `r` of width `weight.len()`.
pub fn add_rms_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    let hidden = weight.len();
    if hidden == 0 || !x.len().is_multiple_of(hidden) || out.len() != x.len() {
        return shape_err(format!(
            "rms norm: x has {} values, out {}, weight {hidden}",
            x.len(),
            out.len()
        ));
    }
    if let Some(r) = residual {
        if r.len() != x.len() {
            return shape_err(format!(
                "rms norm: residual has {} values, x {}",
                r.len(),
                x.len()
            ));
        }
        for (a, b) in x.iter_mut().zip(r) {
            *a += b;
        }
    }
    for (row, out_row) in x.chunks(hidden).zip(out.chunks_mut(hidden)) {
        let mean_sq = row
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            / hidden as f64;
        let inv = 1.0 / (mean_sq + f64::from(eps)).sqrt();
        for ((o, v), w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = (f64::from(*v) * inv) as f32 * w;
        }
    }
    Ok(())
}

/// Shapes of a rotary call: Q is `[tokens, q_heads, head_dim]`, K `[tokens, kv_heads,
/// head_dim]`; `cos`/`sin` are `[max_position, head_dim / 2]`.
#[derive(Clone, Copy, Debug)]
pub struct RotaryDims {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl RotaryDims {
    pub(crate) fn check(&self, q: usize, k: usize, positions: &[u32], table: usize) -> Result<()> {
        let (t, hd) = (positions.len(), self.head_dim);
        if hd == 0 || !hd.is_multiple_of(2) {
            return shape_err(format!("rotary: head_dim {hd} must be even and positive"));
        }
        if q != t * self.q_heads * hd || k != t * self.kv_heads * hd {
            return shape_err(format!(
                "rotary: q has {q} values and k {k}, expected {t} tokens x {}/{} heads x {hd}",
                self.q_heads, self.kv_heads
            ));
        }
        let max_pos = table / (hd / 2);
        if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
            return shape_err(format!(
                "rotary: position {p} is past the table's {max_pos}"
            ));
        }
        Ok(())
    }
}

/// Rotates pairs `(i, i + head_dim / 2)` of every head of Q and K by each token's angle.
pub fn rotary_inplace(
    q: &mut [f32],
    k: &mut [f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    dims: RotaryDims,
) -> Result<()> {
    dims.check(q.len(), k.len(), positions, cos.len().min(sin.len()))?;
    let hd = dims.head_dim;
    let half = hd / 2;
    for (t, &p) in positions.iter().enumerate() {
        let c = &cos[p as usize * half..][..half];
        let s = &sin[p as usize * half..][..half];
        let rows = q[t * dims.q_heads * hd..][..dims.q_heads * hd]
            .chunks_mut(hd)
            .chain(k[t * dims.kv_heads * hd..][..dims.kv_heads * hd].chunks_mut(hd));
        for row in rows {
            for d in 0..half {
                let (x1, x2) = (row[d], row[d + half]);
                row[d] = x1 * c[d] - x2 * s[d];
                row[d + half] = x2 * c[d] + x1 * s[d];
            }
        }
    }
    Ok(())
}

/// Copies each new token's K and V (`[tokens, kv_width]`) into its cache slot.
pub fn write_kv(
    k: &[f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    batch: &PagedBatch,
) -> Result<()> {
    let t = batch.tokens();
    if t == 0 {
        return Ok(());
    }
    let width = k.len() / t;
    check_cache(k_cache.len(), v_cache.len(), width, batch)?;
    if width == 0 || k.len() != t * width || v.len() != k.len() {
        return shape_err(format!(
            "write kv: k {} and v {} values for {t} tokens",
            k.len(),
            v.len()
        ));
    }
    for (i, &slot) in batch.slots.iter().enumerate() {
        let dst = slot as usize * width;
        k_cache[dst..dst + width].copy_from_slice(&k[i * width..][..width]);
        v_cache[dst..dst + width].copy_from_slice(&v[i * width..][..width]);
    }
    Ok(())
}

pub(crate) fn check_cache(k: usize, v: usize, width: usize, batch: &PagedBatch) -> Result<()> {
    if k != v || width == 0 || !k.is_multiple_of(width * batch.block_size) {
        return shape_err(format!(
            "kv cache: k has {k} values, v {v}; not whole blocks of {} x {width}",
            batch.block_size
        ));
    }
    let blocks = k / (width * batch.block_size);
    if let Some(&b) = batch.block_tables.iter().find(|&&b| b as usize >= blocks) {
        return shape_err(format!("kv cache: block {b} of a cache with {blocks}"));
    }
    Ok(())
}

/// Heads of an attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl AttentionDims {
    /// The usual scale, `1 / sqrt(head_dim)`.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttentionDims {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    pub(crate) fn check(
        &self,
        q: usize,
        k_cache: usize,
        v_cache: usize,
        b: &PagedBatch,
    ) -> Result<()> {
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if kvh == 0 || !h.is_multiple_of(kvh) || hd == 0 || hd > crate::MAX_HEAD_DIM {
            return shape_err(format!(
                "attention: {h} heads over {kvh} kv heads of dim {hd} (at most {})",
                crate::MAX_HEAD_DIM
            ));
        }
        if q != b.tokens() * h * hd {
            return shape_err(format!(
                "attention: q has {q} values, expected {} x {h} x {hd}",
                b.tokens()
            ));
        }
        check_cache(k_cache, v_cache, kvh * hd, b)
    }
}

/// Softmax attention of every token's query heads over the first `context_lens[t]` cached
/// K/V of its sequence. `q` and the result are `[tokens, num_heads, head_dim]`.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    batch: &PagedBatch,
    dims: AttentionDims,
) -> Result<Vec<f32>> {
    dims.check(q.len(), k_cache.len(), v_cache.len(), batch)?;
    let (h, hd) = (dims.num_heads, dims.head_dim);
    let group = h / dims.num_kv_heads;
    let width = dims.num_kv_heads * hd;
    let mut out = vec![0.0f32; q.len()];
    for t in 0..batch.tokens() {
        let ctx = batch.context_lens[t] as usize;
        for head in 0..h {
            let qh = &q[(t * h + head) * hd..][..hd];
            let off = |j: usize| batch.slot_of(t, j) * width + (head / group) * hd;
            let scores: Vec<f64> = (0..ctx)
                .map(|j| {
                    let kj = &k_cache[off(j)..][..hd];
                    qh.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        * f64::from(dims.scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let o = &mut out[(t * h + head) * hd..][..hd];
            for d in 0..hd {
                let acc: f64 = (0..ctx)
                    .map(|j| weights[j] * f64::from(v_cache[off(j) + d]))
                    .sum();
                o[d] = (acc / total) as f32;
            }
        }
    }
    Ok(out)
}
