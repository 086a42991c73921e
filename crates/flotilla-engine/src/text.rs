//! The text engine: a handle on the caller's side and one std::thread that owns the model and
//! the paged KV cache and runs the continuous-batching loop. Each step it drops cancelled
//! sequences, plans one batched forward pass (one token for every decoding sequence, prefill
//! chunks for the rest of the token budget), admits waiting sequences while blocks allow,
//! preempts the newest sequences when blocks run out, runs the pass, and samples.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use candle_core::Device;
use flotilla_api::metrics::{self, Histogram, HistogramSnapshot};
use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::kv::{BlockPool, KvCache, SeqSlice};
use crate::models::{Batch, LlamaModel};
use crate::sequence::Sequence;
use crate::textmodel::{TextTokenizer, load_text_model, panic_message};
use crate::types::{EngineStatus, GenerateEvent, GenerateRequest, Prompt, TextEngineConfig};
use indicatif::ProgressBar;

/// Counters shared between the handle and the engine thread.
pub(crate) struct Counters {
    running: AtomicUsize,
    waiting: AtomicUsize,
    blocks_used: AtomicUsize,
    blocks_free: AtomicUsize,
    prompt_tokens_total: AtomicU64,
    prefix_hit_tokens_total: AtomicU64,
    generated_tokens_total: AtomicU64,
    preemptions_total: AtomicU64,
    steps_total: AtomicU64,
    /// Generated tokens per second over the last few seconds, times 1000.
    tokens_per_s_milli: AtomicU64,
    /// From a sequence's arrival to its first token, seconds.
    ttft: Histogram,
    /// Between two tokens of one sequence, seconds.
    tpot: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            blocks_used: AtomicUsize::new(0),
            blocks_free: AtomicUsize::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            prefix_hit_tokens_total: AtomicU64::new(0),
            generated_tokens_total: AtomicU64::new(0),
            preemptions_total: AtomicU64::new(0),
            steps_total: AtomicU64::new(0),
            tokens_per_s_milli: AtomicU64::new(0),
            ttft: Histogram::new(metrics::TTFT_BUCKETS),
            tpot: Histogram::new(metrics::TPOT_BUCKETS),
        }
    }
}

/// Latency histograms of one engine, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLatency {
    pub time_to_first_token: HistogramSnapshot,
    pub time_per_output_token: HistogramSnapshot,
}

/// What the handle needs to know about the loaded model.
struct Shape {
    context_length: usize,
    block_size: usize,
    num_blocks: usize,
    max_num_seqs: usize,
    max_batch_tokens: usize,
}

struct Inner {
    name: String,
    shape: Shape,
    tokenizer: Arc<TextTokenizer>,
    tx: std_mpsc::Sender<Sequence>,
    counters: Arc<Counters>,
}

/// Cheap, cloneable handle on one loaded text model. The engine thread exits when the last
/// handle is dropped and its queued work is done.
#[derive(Clone)]
pub struct TextEngine {
    inner: Arc<Inner>,
}

/// Default KV budget when the config gives none: room for every sequence's full context,
/// but not more than this.
const DEFAULT_KV_BYTES_CAP: u64 = 1 << 30;

impl TextEngine {
    /// Spawns the engine thread, loads the model on it, and returns once loading finished.
    pub fn load(name: &str, dir: &Path, cfg: TextEngineConfig) -> Result<TextEngine, EngineError> {
        TextEngine::load_with_progress(name, dir, cfg, ProgressBar::hidden())
    }

    /// `load`, counting the bytes of weights read on `progress` (its length set to their
    /// total).
    pub fn load_with_progress(
        name: &str,
        dir: &Path,
        cfg: TextEngineConfig,
        progress: ProgressBar,
    ) -> Result<TextEngine, EngineError> {
        let dir = dir.to_path_buf();
        TextEngine::spawn(name, cfg, move |device| {
            load_text_model(&dir, device, &progress)
        })
    }

    /// Like `load`, with the model and tokenizer made by `load` on the engine thread.
    pub(crate) fn spawn<F>(name: &str, cfg: TextEngineConfig, load: F) -> Result<Self, EngineError>
    where
        F: FnOnce(&Device) -> Result<(LlamaModel, TextTokenizer), EngineError> + Send + 'static,
    {
        cfg.validate()?;
        cfg.device.check_build()?;
        let device_spec = cfg.device;
        let thread_name = name.to_string();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (tx, rx) = std_mpsc::channel::<Sequence>();
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        // The loop runs on a worker of its own rayon pool, the pool candle's gemm and our
        // attention split work over. On the global pool the loop's thread would be one more
        // runnable thread beside workers that spin after each parallel section, and on two
        // cores the serial parts of every step (sampling, small ops) would crawl.
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name({
                let name = name.to_string();
                move |i| format!("flotilla-engine-{name}-{i}")
            })
            .build()
            .map_err(|e| EngineError::Panicked(format!("could not start engine threads: {e}")))?;
        std::thread::Builder::new()
            .name(format!("flotilla-engine-{name}"))
            .spawn(move || {
                pool.install(move || {
                    let setup = device_spec.open().and_then(|device| {
                        tracing::info!(
                            model = %thread_name,
                            device = %device_spec,
                            kernels = if device.is_cpu() {
                                "cpu: candle ops + paged attention in Rust"
                            } else {
                                "cuda: cuBLAS matmuls + flotilla paged attention, fused add+RMSNorm, in-place rotary"
                            },
                            "engine device"
                        );
                        load(&device)
                    });
                    let setup = setup.and_then(|(model, tokenizer)| {
                        EngineLoop::new(model, tokenizer, &cfg, rx, thread_counters)
                    });
                    match setup {
                        Ok((engine, shape, tokenizer)) => {
                            if ready_tx.send(Ok((shape, tokenizer))).is_ok() {
                                engine.run();
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
            })
            .map_err(|e| EngineError::Panicked(format!("could not spawn engine thread: {e}")))?;
        let (shape, tokenizer) = ready_rx
            .recv()
            .map_err(|_| EngineError::Panicked("engine thread died while loading".into()))??;
        tracing::info!(
            model = name,
            context_length = shape.context_length,
            kv_blocks = shape.num_blocks,
            block_size = shape.block_size,
            max_num_seqs = shape.max_num_seqs,
            max_batch_tokens = shape.max_batch_tokens,
            "text model loaded"
        );
        Ok(TextEngine {
            inner: Arc::new(Inner {
                name: name.to_string(),
                shape,
                tokenizer,
                tx,
                counters,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Prompt plus completion must fit in this many tokens: the model's context, or the KV
    /// pool when that is smaller.
    pub fn context_length(&self) -> usize {
        self.inner.shape.context_length
    }

    /// Exactly the number `Finished::prompt_tokens` will report for this prompt.
    pub fn count_prompt_tokens(&self, prompt: &Prompt) -> Result<usize, EngineError> {
        Ok(self.inner.tokenizer.encode_prompt(prompt)?.len())
    }

    /// Tokens of `text` without special tokens.
    pub fn count_text_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.inner.tokenizer.encode(text, false)?.len())
    }

    /// Validates the request and queues it. Dropping the receiver cancels the sequence and
    /// frees its KV blocks at the next step.
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>, EngineError> {
        req.sampling.validate()?;
        let prompt_ids = self.inner.tokenizer.encode_prompt(&req.prompt)?;
        if prompt_ids.is_empty() {
            return Err(EngineError::invalid("prompt encodes to zero tokens"));
        }
        let context_length = self.context_length();
        let room = context_length.saturating_sub(prompt_ids.len());
        let max_tokens = req.sampling.max_tokens.unwrap_or(room);
        let fits = prompt_ids
            .len()
            .checked_add(max_tokens)
            .is_some_and(|t| t <= context_length);
        if !fits || max_tokens == 0 {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_ids.len(),
                max_tokens,
                context_length,
            });
        }
        // Continuing an answer: its text so far was generated, not prompted.
        let earlier = match &req.prompt {
            Prompt::ContinueChat(messages) => match messages.last() {
                Some(m) => self.inner.tokenizer.encode(&m.content, false)?,
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = Sequence::new(prompt_ids, max_tokens, &req.sampling, tx).resuming(&earlier);
        self.inner.counters.waiting.fetch_add(1, Ordering::SeqCst);
        if self.inner.tx.send(seq).is_err() {
            self.inner.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::EngineStopped(self.inner.name.clone()));
        }
        Ok(rx)
    }

    /// TTFT and time-per-output-token histograms since the engine started.
    pub fn latency(&self) -> EngineLatency {
        EngineLatency {
            time_to_first_token: self.inner.counters.ttft.snapshot(),
            time_per_output_token: self.inner.counters.tpot.snapshot(),
        }
    }

    pub fn status(&self) -> EngineStatus {
        let c = &self.inner.counters;
        let s = &self.inner.shape;
        EngineStatus {
            running: c.running.load(Ordering::SeqCst),
            waiting: c.waiting.load(Ordering::SeqCst),
            max_running: s.max_num_seqs,
            max_batch_tokens: s.max_batch_tokens,
            kv_blocks_total: s.num_blocks,
            kv_blocks_used: c.blocks_used.load(Ordering::SeqCst),
            kv_blocks_free: c.blocks_free.load(Ordering::SeqCst),
            kv_block_size: s.block_size,
            prompt_tokens_total: c.prompt_tokens_total.load(Ordering::SeqCst),
            prefix_hit_tokens_total: c.prefix_hit_tokens_total.load(Ordering::SeqCst),
            generated_tokens_total: c.generated_tokens_total.load(Ordering::SeqCst),
            preemptions_total: c.preemptions_total.load(Ordering::SeqCst),
            steps_total: c.steps_total.load(Ordering::SeqCst),
            tokens_per_second: c.tokens_per_s_milli.load(Ordering::SeqCst) as f64 / 1000.0,
        }
    }
}

/// How long the tokens/s figure looks back.
const RATE_WINDOW: Duration = Duration::from_secs(5);

struct EngineLoop {
    model: LlamaModel,
    tokenizer: Arc<TextTokenizer>,
    rx: std_mpsc::Receiver<Sequence>,
    counters: Arc<Counters>,
    pool: BlockPool,
    store: KvCache,
    prefix_caching: bool,
    max_num_seqs: usize,
    max_batch_tokens: usize,
    /// Admission order: the last one is preempted first.
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    /// (time, generated_tokens_total) samples for the tokens/s figure.
    rate: VecDeque<(Instant, u64)>,
}

/// One sequence's part of a step: `chunk` tokens from `computed` on.
struct Planned {
    index: usize,
    chunk: usize,
}

impl EngineLoop {
    fn new(
        model: LlamaModel,
        tokenizer: TextTokenizer,
        cfg: &TextEngineConfig,
        rx: std_mpsc::Receiver<Sequence>,
        counters: Arc<Counters>,
    ) -> Result<(EngineLoop, Shape, Arc<TextTokenizer>), EngineError> {
        let mc = model.config();
        let bs = cfg.block_size;
        let per_token = model.kv_bytes_per_token();
        let per_block = (per_token * bs) as u64;
        let num_blocks = match (cfg.kv_cache_blocks, cfg.kv_cache_bytes) {
            (Some(n), _) => n,
            (None, Some(bytes)) => (bytes / per_block) as usize,
            (None, None) => {
                let full = cfg
                    .max_num_seqs
                    .saturating_mul(mc.context_length.div_ceil(bs));
                full.min((DEFAULT_KV_BYTES_CAP / per_block) as usize)
                    .max(mc.context_length.div_ceil(bs))
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::invalid(format!(
                "the KV cache must hold at least one block of {bs} tokens ({per_block} bytes)"
            )));
        }
        let context_length = mc.context_length.min(num_blocks * bs);
        let mut tokenizer = tokenizer;
        tokenizer.context_length = context_length;
        let tokenizer = Arc::new(tokenizer);
        let store = model.new_kv_cache(num_blocks, bs)?;
        tracing::debug!(
            model_type = %mc.model_type,
            layers = mc.num_layers,
            heads = mc.num_heads,
            kv_heads = mc.num_kv_heads,
            kv_bytes = num_blocks as u64 * per_block,
            "KV cache allocated"
        );
        let shape = Shape {
            context_length,
            block_size: bs,
            num_blocks,
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
        };
        counters.blocks_free.store(num_blocks, Ordering::SeqCst);
        let engine = EngineLoop {
            model,
            tokenizer: tokenizer.clone(),
            rx,
            counters,
            pool: BlockPool::new(num_blocks, bs),
            store,
            prefix_caching: cfg.prefix_caching,
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            running: Vec::new(),
            waiting: VecDeque::new(),
            rate: VecDeque::new(),
        };
        Ok((engine, shape, tokenizer))
    }

    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                // Idle: block until work arrives or every handle is gone.
                match self.rx.recv() {
                    Ok(seq) => self.waiting.push_back(seq),
                    Err(_) => break,
                }
            }
            while let Ok(seq) = self.rx.try_recv() {
                self.waiting.push_back(seq);
            }
            self.drop_cancelled();
            let plan = self.plan();
            if !plan.is_empty() {
                self.step(plan);
            }
            self.publish();
        }
        tracing::debug!("engine thread exiting: all handles dropped");
    }

    /// A client that went away frees its blocks now, whether it runs or waits.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_cancelled() {
                let seq = self.running.remove(i);
                self.pool.release(&seq.blocks);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.is_cancelled());
        let gone = before - self.waiting.len();
        self.counters.waiting.fetch_sub(gone, Ordering::SeqCst);
    }

    /// Decides what the next forward pass computes, allocating blocks for it: first every
    /// running sequence (one token each when decoding, prefill chunks from what is left of
    /// the token budget), preempting the newest when blocks run out; then admissions.
    fn plan(&mut self) -> Vec<Planned> {
        let bs = self.pool.block_size();
        let decoding = self.running.iter().filter(|s| s.uncomputed() == 1).count();
        let mut prefill_budget = self.max_batch_tokens.saturating_sub(decoding);
        let mut plan: Vec<Planned> = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].uncomputed();
            let chunk = if need == 1 {
                1
            } else {
                need.min(prefill_budget)
            };
            if chunk == 0 {
                i += 1;
                continue;
            }
            let want = self.pool.blocks_for(self.running[i].computed + chunk);
            let mut fits = true;
            while self.running[i].blocks.len() < want {
                if let Some(id) = self.pool.allocate() {
                    self.running[i].blocks.push(id);
                    continue;
                }
                // Out of blocks: the newest sequence gives its blocks back and is
                // recomputed later; if that is this one, it waits too.
                preempted = true;
                let victim = self.running.len() - 1;
                self.preempt(victim);
                if victim == i {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            if need != 1 {
                prefill_budget -= chunk;
            }
            plan.push(Planned { index: i, chunk });
            i += 1;
        }
        // Admit in arrival order while slots, budget and blocks allow (not in a step that
        // had to preempt: the pool is already short).
        while !preempted
            && self.running.len() < self.max_num_seqs
            && prefill_budget > 0
            && let Some(front) = self.waiting.front()
        {
            let total = front.tokens.len() + 1;
            if self.pool.available() < self.pool.blocks_for(total) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            if self.prefix_caching {
                // At least the last token is computed: its logits are needed.
                let max_blocks = (seq.tokens.len() - 1) / bs;
                let (hits, last) = self.pool.lookup_prefix(&seq.tokens, max_blocks);
                seq.computed = hits.len() * bs;
                seq.registered = hits.len();
                seq.last_hash = last;
                seq.blocks = hits;
                if seq.computed > 0 {
                    self.counters
                        .prefix_hit_tokens_total
                        .fetch_add(seq.computed as u64, Ordering::Relaxed);
                }
            }
            let chunk = seq.uncomputed().min(prefill_budget);
            let want = self.pool.blocks_for(seq.computed + chunk);
            while seq.blocks.len() < want {
                match self.pool.allocate() {
                    Some(id) => seq.blocks.push(id),
                    None => break,
                }
            }
            prefill_budget -= chunk;
            seq.admitted(std::time::Instant::now());
            self.running.push(seq);
            plan.push(Planned {
                index: self.running.len() - 1,
                chunk,
            });
        }
        plan
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        let blocks = seq.reset_for_recompute();
        self.pool.release(&blocks);
        self.counters
            .preemptions_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            tokens = seq.tokens.len(),
            preemptions = seq.preemptions,
            "preempted a sequence: out of KV blocks"
        );
        self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(seq);
    }

    /// Runs one batched forward pass over the plan and samples where a sequence is caught up.
    fn step(&mut self, plan: Vec<Planned>) {
        let mut batch = Batch {
            tokens: Vec::new(),
            positions: Vec::new(),
            seqs: Vec::with_capacity(plan.len()),
            logits_rows: Vec::new(),
        };
        // Which planned sequences sample after this pass, in logits-row order.
        let mut samplers = Vec::new();
        for p in &plan {
            let seq = &self.running[p.index];
            let row = batch.tokens.len();
            let start = seq.computed;
            batch
                .tokens
                .extend_from_slice(&seq.tokens[start..start + p.chunk]);
            batch
                .positions
                .extend((start..start + p.chunk).map(|x| x as u32));
            batch.seqs.push(SeqSlice {
                row,
                len: p.chunk,
                pos: start,
                blocks: &seq.blocks,
            });
            if start + p.chunk == seq.tokens.len() {
                batch.logits_rows.push((row + p.chunk - 1) as u32);
                samplers.push(p.index);
            }
        }
        let (model, store) = (&self.model, &mut self.store);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model
                .forward(&batch, store)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
        }))
        .unwrap_or_else(|p| Err(EngineError::Panicked(panic_message(&p))));
        drop(batch);
        self.counters.steps_total.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "forward pass failed; failing its sequences");
                let mut gone: Vec<usize> = plan.iter().map(|p| p.index).collect();
                gone.sort_unstable();
                for &i in gone.iter().rev() {
                    let seq = self.running.remove(i);
                    seq.fail(EngineError::Panicked(e.to_string()));
                    self.pool.release(&seq.blocks);
                }
                return;
            }
        };
        let mut prompt_tokens = 0u64;
        for p in &plan {
            let seq = &mut self.running[p.index];
            let before = seq.computed;
            seq.computed += p.chunk;
            prompt_tokens += seq.prompt_len.min(seq.computed).saturating_sub(before) as u64;
            if self.prefix_caching {
                register_full_blocks(&mut self.pool, seq);
            }
        }
        self.counters
            .prompt_tokens_total
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        let mut finished = Vec::new();
        for (row, &index) in samplers.iter().enumerate() {
            // Counted before the token goes out, so a client that saw Finished also sees
            // it in the status.
            self.counters
                .generated_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            let seq = &mut self.running[index];
            let tok = &self.tokenizer;
            let accepted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                seq.accept(&logits[row], tok)
            }))
            .unwrap_or_else(|p| Err(EngineError::Panicked(panic_message(&p))));
            match seq.token_out(Instant::now()) {
                (Some(ttft), _) => self.counters.ttft.observe(ttft.as_secs_f64()),
                (None, Some(gap)) => self.counters.tpot.observe(gap.as_secs_f64()),
                _ => {}
            }
            match accepted {
                Ok(None) => {}
                Ok(Some(_)) => finished.push(index),
                Err(e) => {
                    tracing::warn!(error = %e, "sequence failed");
                    seq.fail(e);
                    finished.push(index);
                }
            }
        }
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let seq = self.running.remove(i);
            self.pool.release(&seq.blocks);
        }
    }

    /// Copies the loop's state into the counters the handle reads.
    fn publish(&mut self) {
        let c = &self.counters;
        c.running.store(self.running.len(), Ordering::SeqCst);
        c.blocks_used.store(self.pool.used(), Ordering::SeqCst);
        c.blocks_free.store(self.pool.available(), Ordering::SeqCst);
        let now = Instant::now();
        let total = c.generated_tokens_total.load(Ordering::Relaxed);
        self.rate.push_back((now, total));
        while self
            .rate
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.rate.pop_front();
        }
        let rate = match self.rate.front() {
            Some(&(t, n)) if now > t => (total - n) as f64 / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        c.tokens_per_s_milli
            .store((rate * 1000.0) as u64, Ordering::SeqCst);
    }
}

/// Registers the sequence's newly filled blocks so later prompts with the same prefix
/// share them.
fn register_full_blocks(pool: &mut BlockPool, seq: &mut Sequence) {
    let bs = pool.block_size();
    while seq.registered < seq.computed / bs {
        let b = seq.registered;
        let hash = pool.register(
            seq.blocks[b],
            seq.last_hash,
            &seq.tokens[b * bs..(b + 1) * bs],
        );
        seq.last_hash = Some(hash);
        seq.registered += 1;
    }
}
