//! The host-side view of one batch over the paged KV cache.

use crate::{Result, shape_err};

/// One sequence's run of consecutive new tokens in a batch: `len` tokens at positions
/// `[pos, pos + len)`, stored in `blocks` (its block table).
#[derive(Clone, Copy, Debug)]
pub struct SeqRun<'a> {
    pub blocks: &'a [u32],
    pub pos: usize,
    pub len: usize,
}

/// Built only by [`PagedBatch::new`], which checks it, so its indices are in bounds.
/// Everything the KV write and the attention need, per token (query row) and per sequence.
/// Tokens are numbered in the order of the runs given to [`PagedBatch::new`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PagedBatch {
    pub(crate) block_size: usize,
    /// Cache slot (`block * block_size + offset`) each new token's K/V is written to.
    pub(crate) slots: Vec<u32>,
    /// Position of each token in its sequence (rotary).
    pub(crate) positions: Vec<u32>,
    /// Which sequence (row of `block_tables`) each token belongs to.
    pub(crate) query_seq: Vec<u32>,
    /// How many cached tokens each token attends over (its position + 1: causal).
    pub(crate) context_lens: Vec<u32>,
    /// `[num_seqs, max_blocks]`, padded with block 0 (never read past a context length).
    pub(crate) block_tables: Vec<u32>,
    pub(crate) max_blocks: usize,
}

impl PagedBatch {
    /// Checks every block table against `num_blocks` and the positions against the tables,
    /// so nothing built from it can index outside the cache.
    pub fn new(runs: &[SeqRun<'_>], block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 {
            return shape_err("block_size must be positive");
        }
        let tokens: usize = runs.iter().map(|r| r.len).sum();
        let max_blocks = runs.iter().map(|r| r.blocks.len()).max().unwrap_or(0);
        let mut b = PagedBatch {
            block_size,
            slots: Vec::with_capacity(tokens),
            positions: Vec::with_capacity(tokens),
            query_seq: Vec::with_capacity(tokens),
            context_lens: Vec::with_capacity(tokens),
            block_tables: vec![0; runs.len() * max_blocks],
            max_blocks,
        };
        for (s, run) in runs.iter().enumerate() {
            if let Some(&bad) = run.blocks.iter().find(|&&id| id as usize >= num_blocks) {
                return shape_err(format!("sequence {s} uses block {bad} of {num_blocks}"));
            }
            let end = run.pos + run.len;
            if end > run.blocks.len() * block_size {
                return shape_err(format!(
                    "sequence {s} reaches position {end} with {} blocks of {block_size}",
                    run.blocks.len()
                ));
            }
            b.block_tables[s * max_blocks..][..run.blocks.len()].copy_from_slice(run.blocks);
            for p in run.pos..end {
                let block = run.blocks[p / block_size] as usize;
                b.slots.push((block * block_size + p % block_size) as u32);
                b.positions.push(p as u32);
                b.query_seq.push(s as u32);
                b.context_lens.push(p as u32 + 1);
            }
        }
        Ok(b)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Position of each token in its sequence.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Cache slot each new token's K/V goes to.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    pub fn tokens(&self) -> usize {
        self.slots.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.block_tables
            .len()
            .checked_div(self.max_blocks)
            .unwrap_or(0)
    }

    /// Offset of token `t`'s `j`-th cached position, in slots.
    pub(crate) fn slot_of(&self, t: usize, j: usize) -> usize {
        let table = &self.block_tables[self.query_seq[t] as usize * self.max_blocks..];
        table[j / self.block_size] as usize * self.block_size + j % self.block_size
    }
}
