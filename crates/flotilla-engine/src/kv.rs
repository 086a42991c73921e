//! The paged KV cache: one pool of fixed-size blocks per model, a block table per sequence,
//! reference counts so sequences with the same prompt prefix share full blocks, and the
//! attention that reads K/V through a block table.
//!
//! Block accounting (`BlockPool`) is separate from the storage (`KvStore`) so the policy is
//! unit-tested without tensors. A block is in exactly one of three states: in use
//! (refcount > 0), cached (refcount 0 but still holding a registered prefix, reusable until
//! evicted, oldest first) or free (refcount 0, no content). Cached blocks count as free
//! capacity: allocation evicts them when the free list is empty.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use crate::sampling::exp_le0;

pub(crate) type BlockId = u32;

/// Hash of a full block's tokens chained with the hash of everything before it, so equal
/// hashes mean equal prefixes (up to 64-bit collisions, which also compare the tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BlockHash(u64);

impl BlockHash {
    pub(crate) fn chain(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        // FNV-1a: deterministic across runs and processes (unlike RandomState).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(parent.map_or(0, |p| p.0));
        for &t in tokens {
            eat(u64::from(t));
        }
        BlockHash(h)
    }
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    refs: u32,
    /// Registered prefix this block holds, with the tokens (to rule out hash collisions).
    hash: Option<(BlockHash, Vec<u32>)>,
    /// Tick at which it last became unreferenced (eviction order).
    released_at: u64,
}

pub(crate) struct BlockPool {
    block_size: usize,
    meta: Vec<BlockMeta>,
    free: Vec<BlockId>,
    /// Cached (refcount 0, registered) blocks by release tick: the eviction queue.
    cached: BTreeMap<u64, BlockId>,
    index: HashMap<BlockHash, BlockId>,
    tick: u64,
    #[cfg(test)]
    prefix_hit_blocks: u64,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockPool {
            block_size,
            meta: vec![BlockMeta::default(); num_blocks],
            // Popped from the back: hand out low ids first (easier to read in logs).
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: BTreeMap::new(),
            index: HashMap::new(),
            tick: 0,
            #[cfg(test)]
            prefix_hit_blocks: 0,
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that an allocation could hand out now (free plus evictable cached ones).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// Blocks referenced by at least one sequence.
    pub(crate) fn used(&self) -> usize {
        self.num_blocks() - self.available()
    }

    #[cfg(test)]
    pub(crate) fn prefix_hit_blocks(&self) -> u64 {
        self.prefix_hit_blocks
    }

    pub(crate) fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// One empty block, evicting the oldest cached prefix when nothing is free.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.cached.pop_first()?;
                if let Some((hash, _)) = self.meta[id as usize].hash.take() {
                    self.index.remove(&hash);
                }
                id
            }
        };
        let m = &mut self.meta[id as usize];
        debug_assert_eq!(m.refs, 0);
        m.refs = 1;
        Some(id)
    }

    /// Drops one reference to each block; unreferenced registered blocks stay cached.
    pub(crate) fn release(&mut self, blocks: &[BlockId]) {
        for &id in blocks {
            self.tick += 1;
            let tick = self.tick;
            let m = &mut self.meta[id as usize];
            debug_assert!(m.refs > 0, "double free of block {id}");
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                if m.hash.is_some() {
                    m.released_at = tick;
                    self.cached.insert(tick, id);
                } else {
                    self.free.push(id);
                }
            }
        }
    }

    /// Records that `id`, now full, holds `tokens` after the prefix `parent`.
    pub(crate) fn register(
        &mut self,
        id: BlockId,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> BlockHash {
        let hash = BlockHash::chain(parent, tokens);
        let m = &mut self.meta[id as usize];
        if m.hash.is_none() && !self.index.contains_key(&hash) {
            m.hash = Some((hash, tokens.to_vec()));
            self.index.insert(hash, id);
        }
        hash
    }

    /// The longest run of cached full blocks matching the start of `tokens`, each with one
    /// more reference; at most `max_blocks`.
    pub(crate) fn lookup_prefix(
        &mut self,
        tokens: &[u32],
        max_blocks: usize,
    ) -> (Vec<BlockId>, Option<BlockHash>) {
        let mut hits = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = BlockHash::chain(parent, chunk);
            let Some(&id) = self.index.get(&hash) else {
                break;
            };
            let m = &mut self.meta[id as usize];
            if m.hash.as_ref().is_none_or(|(_, t)| t != chunk) {
                break;
            }
            if m.refs == 0 {
                let at = m.released_at;
                self.cached.remove(&at);
            }
            m.refs += 1;
            #[cfg(test)]
            {
                self.prefix_hit_blocks += 1;
            }
            hits.push(id);
            parent = Some(hash);
        }
        (hits, parent)
    }
}

/// The paged cache's storage on the model's device.
pub(crate) enum KvCache {
    Cpu(KvStore),
    #[cfg(feature = "cuda")]
    Gpu(GpuKv),
}

/// K and V per layer on a GPU, `[num_blocks, block_size, kv_heads, head_dim]` in the
/// model's compute type: the layout our CUDA kernels read through the block tables.
#[cfg(feature = "cuda")]
pub(crate) struct GpuKv {
    pub k: Vec<candle_core::Tensor>,
    pub v: Vec<candle_core::Tensor>,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// K and V for every layer, laid out `[block, slot, kv_head, head_dim]` in f32.
pub(crate) struct KvStore {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One sequence's share of a batched forward pass: rows `[row, row + len)` of the batch
/// hold its tokens at positions `[pos, pos + len)`.
#[derive(Clone, Debug)]
pub(crate) struct SeqSlice<'a> {
    pub row: usize,
    pub len: usize,
    pub pos: usize,
    pub blocks: &'a [BlockId],
}

#[cfg(any(test, feature = "cuda"))]
impl SeqSlice<'_> {
    /// The same run as the kernels crate describes it.
    pub(crate) fn run(&self) -> flotilla_kernels::SeqRun<'_> {
        flotilla_kernels::SeqRun {
            blocks: self.blocks,
            pos: self.pos,
            len: self.len,
        }
    }
}

impl KvStore {
    pub(crate) fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        KvStore {
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            block_size,
            kv_heads,
            head_dim,
        }
    }

    fn slot_offset(&self, blocks: &[BlockId], pos: usize) -> usize {
        let block = blocks[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_heads * self.head_dim
    }

    /// Stores the new tokens' K and V (`[rows, kv_heads * head_dim]`, row-major) at their
    /// positions.
    pub(crate) fn write(&mut self, layer: usize, seqs: &[SeqSlice<'_>], k: &[f32], v: &[f32]) {
        let width = self.kv_heads * self.head_dim;
        for s in seqs {
            for i in 0..s.len {
                let dst = self.slot_offset(s.blocks, s.pos + i);
                let src = (s.row + i) * width;
                self.k[layer][dst..dst + width].copy_from_slice(&k[src..src + width]);
                self.v[layer][dst..dst + width].copy_from_slice(&v[src..src + width]);
            }
        }
    }

    /// Causal attention of each query row over its own sequence's cached keys.
    /// `q` is `[rows, heads, head_dim]`; the result has the same layout.
    pub(crate) fn attend(
        &self,
        layer: usize,
        seqs: &[SeqSlice<'_>],
        q: &[f32],
        heads: usize,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let group = heads / self.kv_heads;
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        let mut out = vec![0.0f32; rows * heads * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        // Each output row is one (token, head): independent, so they run in parallel.
        let mut jobs: Vec<(usize, &SeqSlice<'_>, usize)> = Vec::with_capacity(rows);
        for s in seqs {
            for i in 0..s.len {
                jobs.push((s.row + i, s, s.pos + i));
            }
        }
        let (k, v) = (&self.k[layer], &self.v[layer]);
        out.par_chunks_mut(heads * hd)
            .zip(jobs.par_iter())
            .for_each(|(out_row, &(row, s, pos))| {
                let mut scores = vec![0.0f32; pos + 1];
                // Where each earlier position's K/V rows start, shared by all heads.
                let offs: Vec<usize> = (0..=pos).map(|j| self.slot_offset(s.blocks, j)).collect();
                for h in 0..heads {
                    let kvh = h / group;
                    let qh = &q[(row * heads + h) * hd..][..hd];
                    let mut max = f32::NEG_INFINITY;
                    for (score, &base) in scores.iter_mut().zip(&offs) {
                        let off = base + kvh * hd;
                        let kj = &k[off..off + hd];
                        let d = dot(qh, kj);
                        *score = d * scale;
                        max = max.max(*score);
                    }
                    for score in scores.iter_mut() {
                        *score = exp_le0(*score - max);
                    }
                    let sum = sum(&scores);
                    let o = &mut out_row[h * hd..(h + 1) * hd];
                    o.fill(0.0);
                    for (&w, &base) in scores.iter().zip(&offs) {
                        let off = base + kvh * hd;
                        let w = w / sum;
                        for (x, vj) in o.iter_mut().zip(&v[off..off + hd]) {
                            *x += w * vj;
                        }
                    }
                }
            });
        out
    }
}

/// Dot product in eight independent lanes: a plain `.sum()` is a serial chain of float adds
/// that the compiler may not reorder, so it never vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum in eight lanes (vectorises, unlike a serial `.sum()`).
#[inline]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_round_trip() {
        let mut p = BlockPool::new(3, 4);
        let a: Vec<_> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(p.allocate(), None);
        assert_eq!(p.used(), 3);
        p.release(&a);
        assert_eq!(p.available(), 3);
        assert_eq!(p.used(), 0);
    }

    #[test]
    fn registered_prefix_is_shared_then_evicted_last_used_last() {
        let mut p = BlockPool::new(4, 2);
        let tokens = [1, 2, 3, 4, 5];
        let b0 = p.allocate().unwrap();
        let b1 = p.allocate().unwrap();
        let h0 = p.register(b0, None, &tokens[0..2]);
        p.register(b1, Some(h0), &tokens[2..4]);
        // Another sequence with the same first four tokens finds both blocks.
        let (hits, _) = p.lookup_prefix(&tokens, 8);
        assert_eq!(hits, vec![b0, b1]);
        assert_eq!(p.prefix_hit_blocks(), 2);
        // Different second block: only the first hits.
        let (hits2, _) = p.lookup_prefix(&[1, 2, 9, 9], 8);
        assert_eq!(hits2, vec![b0]);
        p.release(&hits2);
        p.release(&hits);
        p.release(&[b0, b1]);
        // Unreferenced but cached: still found, still counted as available.
        assert_eq!(p.available(), 4);
        let (again, _) = p.lookup_prefix(&tokens, 8);
        assert_eq!(again, vec![b0, b1]);
        p.release(&again);
        // Exhausting the pool evicts cached blocks, after which the prefix is gone.
        let all: Vec<_> = (0..4).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(p.lookup_prefix(&tokens, 8).0, Vec::<BlockId>::new());
        p.release(&all);
        assert_eq!(p.available(), 4);
    }

    #[test]
    fn lane_sums_match_serial_sums() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let serial_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let serial_sum: f32 = a.iter().sum();
            assert!((dot(&a, &b) - serial_dot).abs() < 1e-4, "dot, n = {n}");
            assert!((sum(&a) - serial_sum).abs() < 1e-4, "sum, n = {n}");
        }
    }

    /// The engine's parallel CPU attention and the kernels' reference (what the CUDA
    /// kernels are tested against) agree on a mixed batch over scattered blocks.
    #[test]
    fn attention_matches_the_kernel_reference() {
        use flotilla_kernels::PagedBatch;
        use flotilla_kernels::cpu::{self, AttentionDims};
        let (layers, blocks, bs, heads, kv_heads, hd) = (1, 10, 4, 4, 2, 8);
        let tables: [&[BlockId]; 3] = [&[6, 1, 3], &[0, 9], &[2, 5, 7, 8]];
        let spans = [(0usize, 9usize), (5, 1), (10, 4)];
        let width = kv_heads * hd;
        let rows: usize = spans.iter().map(|s| s.1).sum();
        let val = |i: usize, salt: f32| (i as f32 * 0.731 + salt).sin() * 1.5;
        let k: Vec<f32> = (0..rows * width).map(|i| val(i, 0.3)).collect();
        let v: Vec<f32> = (0..rows * width).map(|i| val(i, 1.7)).collect();
        let q: Vec<f32> = (0..rows * heads * hd).map(|i| val(i, 2.9)).collect();
        let mut row = 0;
        let seqs: Vec<SeqSlice<'_>> = tables
            .iter()
            .zip(spans)
            .map(|(b, (pos, len))| {
                let s = SeqSlice {
                    row,
                    len,
                    pos,
                    blocks: b,
                };
                row += len;
                s
            })
            .collect();
        // Earlier positions of each sequence hold K/V from before this batch.
        let mut store = KvStore::new(layers, blocks, bs, kv_heads, hd);
        let mut kc = vec![0.0; blocks * bs * width];
        let mut vc = kc.clone();
        for (si, s) in seqs.iter().enumerate() {
            for p in 0..s.pos {
                let slot = store.slot_offset(s.blocks, p);
                for d in 0..width {
                    let x = val(si * 1000 + p * width + d, 4.1);
                    store.k[0][slot + d] = x;
                    store.v[0][slot + d] = -x;
                    kc[slot + d] = x;
                    vc[slot + d] = -x;
                }
            }
        }
        store.write(0, &seqs, &k, &v);
        let ours = store.attend(0, &seqs, &q, heads);
        let runs: Vec<_> = seqs.iter().map(SeqSlice::run).collect();
        let batch = PagedBatch::new(&runs, bs, blocks).unwrap();
        cpu::write_kv(&k, &v, &mut kc, &mut vc, &batch).unwrap();
        assert_eq!(kc, store.k[0]);
        let dims = AttentionDims::new(heads, kv_heads, hd);
        let reference = cpu::paged_attention(&q, &kc, &vc, &batch, dims).unwrap();
        for (a, b) in ours.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn attention_matches_dense_reference() {
        // One sequence, 3 positions scattered over two non-adjacent blocks of size 2.
        let (heads, kv_heads, hd) = (2, 1, 2);
        let mut store = KvStore::new(1, 4, 2, kv_heads, hd);
        let blocks = [3u32, 1];
        let k = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let s = [SeqSlice {
            row: 0,
            len: 3,
            pos: 0,
            blocks: &blocks,
        }];
        store.write(0, &s, &k, &v);
        let q = [1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 3.0, -1.0];
        let out = store.attend(0, &s, &q, heads);
        // Dense reference: softmax(q.k / sqrt(2)) over positions 0..=row.
        for row in 0..3 {
            for h in 0..heads {
                let qh = &q[(row * heads + h) * 2..][..2];
                let w: Vec<f32> = (0..=row)
                    .map(|j| ((qh[0] * k[j * 2] + qh[1] * k[j * 2 + 1]) / 2f32.sqrt()).exp())
                    .collect();
                let z: f32 = w.iter().sum();
                for d in 0..2 {
                    let want: f32 = (0..=row).map(|j| w[j] / z * v[j * 2 + d]).sum();
                    let got = out[(row * heads + h) * 2 + d];
                    assert!(
                        (want - got).abs() < 1e-5,
                        "row {row} head {h}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
