//! The text engine: a handle on the caller's side and one std::thread that owns the model and
//! steps every running sequence in turn (prefill, then one token per step), so concurrent
//! requests make progress together.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::sequence::{Sequence, StepOutcome};
use crate::textmodel::{TextModel, TextTokenizer, load_text_model};
use crate::types::{EngineStatus, GenerateEvent, GenerateRequest, Prompt, TextEngineConfig};

/// Counters shared between the handle and the engine thread.
#[derive(Default)]
pub(crate) struct Counters {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
}

struct Inner {
    name: String,
    max_running: usize,
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

impl TextEngine {
    /// Spawns the engine thread, loads the model on it, and returns once loading finished.
    pub fn load(name: &str, dir: &Path, cfg: TextEngineConfig) -> Result<TextEngine, EngineError> {
        let max_running = cfg.max_running.max(1);
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (tx, rx) = std_mpsc::channel::<Sequence>();
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let dir = dir.to_path_buf();
        let thread_name = format!("flotilla-engine-{name}");
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let (model, tokenizer) = match load_text_model(&dir) {
                    Ok((model, tokenizer)) => (model, Arc::new(tokenizer)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(tokenizer.clone())).is_err() {
                    return;
                }
                EngineLoop {
                    model,
                    tokenizer,
                    rx,
                    counters: thread_counters,
                    max_running,
                    active: Vec::new(),
                    waiting: VecDeque::new(),
                }
                .run();
            })
            .map_err(|e| EngineError::Panicked(format!("could not spawn engine thread: {e}")))?;
        let tokenizer = ready_rx
            .recv()
            .map_err(|_| EngineError::Panicked("engine thread died while loading".into()))??;
        tracing::info!(
            model = name,
            context_length = tokenizer.context_length,
            max_running,
            "text model loaded"
        );
        Ok(TextEngine {
            inner: Arc::new(Inner {
                name: name.to_string(),
                max_running,
                tokenizer,
                tx,
                counters,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The model's max_position_embeddings: prompt plus completion must fit in it.
    pub fn context_length(&self) -> usize {
        self.inner.tokenizer.context_length
    }

    /// Exactly the number `Finished::prompt_tokens` will report for this prompt.
    pub fn count_prompt_tokens(&self, prompt: &Prompt) -> Result<usize, EngineError> {
        Ok(self.inner.tokenizer.encode_prompt(prompt)?.len())
    }

    /// Tokens of `text` without special tokens.
    pub fn count_text_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.inner.tokenizer.encode(text, false)?.len())
    }

    /// Validates the request and queues it. Dropping the receiver cancels the sequence at
    /// its next step.
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
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = Sequence::new(prompt_ids, max_tokens, &req.sampling, tx);
        self.inner.counters.waiting.fetch_add(1, Ordering::SeqCst);
        if self.inner.tx.send(seq).is_err() {
            self.inner.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::EngineStopped(self.inner.name.clone()));
        }
        Ok(rx)
    }

    pub fn status(&self) -> EngineStatus {
        let c = &self.inner.counters;
        EngineStatus {
            running: c.running.load(Ordering::SeqCst),
            waiting: c.waiting.load(Ordering::SeqCst),
            max_running: self.inner.max_running,
            prompt_tokens_total: c.prompt_tokens_total.load(Ordering::SeqCst),
            generated_tokens_total: c.generated_tokens_total.load(Ordering::SeqCst),
        }
    }
}

struct EngineLoop {
    model: TextModel,
    tokenizer: Arc<TextTokenizer>,
    rx: std_mpsc::Receiver<Sequence>,
    counters: Arc<Counters>,
    max_running: usize,
    active: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
}

impl EngineLoop {
    fn run(mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                // Idle: block until work arrives or every handle is gone.
                match self.rx.recv() {
                    Ok(seq) => self.waiting.push_back(seq),
                    Err(_) => break,
                }
            }
            while let Ok(seq) = self.rx.try_recv() {
                self.waiting.push_back(seq);
            }
            self.admit();
            let mut i = 0;
            while i < self.active.len() {
                let outcome = self.active[i].step(&self.model, &self.tokenizer, &self.counters);
                if outcome == StepOutcome::Done {
                    self.active.swap_remove(i);
                    self.counters
                        .running
                        .store(self.active.len(), Ordering::SeqCst);
                } else {
                    i += 1;
                }
            }
        }
        tracing::debug!("engine thread exiting: all handles dropped");
    }

    /// Moves waiting sequences into free slots, oldest first; skips ones already cancelled.
    fn admit(&mut self) {
        while self.active.len() < self.max_running {
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            if seq.is_cancelled() {
                continue;
            }
            self.active.push(seq);
        }
        self.counters
            .running
            .store(self.active.len(), Ordering::SeqCst);
    }
}
