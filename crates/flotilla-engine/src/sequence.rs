//! One generation in flight: its KV cache, sampler, detokeniser and stop matcher.

use std::sync::atomic::Ordering;

use candle_transformers::models::llama::Cache;
use tokio::sync::mpsc;

use crate::detok::IncrementalDecoder;
use crate::error::EngineError;
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use crate::text::Counters;
use crate::textmodel::{TextModel, TextTokenizer, panic_message};
use crate::types::{FinishReason, GenerateEvent, SamplingParams};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    Continue,
    Done,
}

pub(crate) struct Sequence {
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampler: Sampler,
    stop: StopMatcher,
    detok: IncrementalDecoder,
    tx: mpsc::UnboundedSender<GenerateEvent>,
    cache: Option<Cache>,
    /// Last sampled token, fed at the next decode step.
    last: Option<u32>,
    /// Positions already in the KV cache.
    pos: usize,
    generated: usize,
}

impl Sequence {
    pub(crate) fn new(
        prompt_ids: Vec<u32>,
        max_tokens: usize,
        sampling: &SamplingParams,
        tx: mpsc::UnboundedSender<GenerateEvent>,
    ) -> Self {
        Sequence {
            sampler: Sampler::new(sampling, &prompt_ids),
            prompt_ids,
            max_tokens,
            stop: StopMatcher::new(&sampling.stop),
            detok: IncrementalDecoder::default(),
            tx,
            cache: None,
            last: None,
            pos: 0,
            generated: 0,
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// One unit of work: the whole prompt's prefill, or one decode token.
    pub(crate) fn step(
        &mut self,
        model: &TextModel,
        tok: &TextTokenizer,
        counters: &Counters,
    ) -> StepOutcome {
        if self.is_cancelled() {
            return StepOutcome::Done;
        }
        // A panic anywhere in the step (sampler, detokeniser, forward) fails this sequence
        // only; the engine thread and every other sequence go on.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.try_step(model, tok, counters)
        }))
        .unwrap_or_else(|p| Err(EngineError::Panicked(panic_message(&p))));
        match stepped {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "sequence failed");
                let _ = self.tx.send(GenerateEvent::Failed(e));
                StepOutcome::Done
            }
        }
    }

    fn try_step(
        &mut self,
        model: &TextModel,
        tok: &TextTokenizer,
        counters: &Counters,
    ) -> Result<StepOutcome, EngineError> {
        let cache = self.cache.get_or_insert_with(|| model.new_cache());
        let input: Vec<u32> = match self.last {
            None => self.prompt_ids.clone(),
            Some(t) => vec![t],
        };
        let pos = self.pos;
        let logits = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward(&input, pos, cache)
        }))
        .map_err(|p| EngineError::Panicked(panic_message(&p)))??;
        if self.last.is_none() {
            counters
                .prompt_tokens_total
                .fetch_add(self.prompt_ids.len() as u64, Ordering::Relaxed);
        }
        self.pos += input.len();
        let token = self.sampler.sample(&logits).token;
        self.last = Some(token);
        self.generated += 1;
        counters
            .generated_tokens_total
            .fetch_add(1, Ordering::Relaxed);

        if tok.eos_ids.contains(&token) {
            let rest = self.detok.flush(|ids| tok.decode(ids))?;
            let rest = self.stop.push(&rest);
            let tail = if rest.stopped {
                rest.emit
            } else {
                rest.emit + &self.stop.finish()
            };
            self.send_text(tail);
            return Ok(self.finish(FinishReason::Stop));
        }
        let text = self.detok.push(token, |ids| tok.decode(ids))?;
        let out = self.stop.push(&text);
        self.send_text(out.emit);
        if out.stopped {
            return Ok(self.finish(FinishReason::Stop));
        }
        if self.generated >= self.max_tokens {
            let rest = self.detok.flush(|ids| tok.decode(ids))?;
            let out = self.stop.push(&rest);
            if out.stopped {
                self.send_text(out.emit);
                return Ok(self.finish(FinishReason::Stop));
            }
            let tail = out.emit + &self.stop.finish();
            self.send_text(tail);
            return Ok(self.finish(FinishReason::Length));
        }
        Ok(StepOutcome::Continue)
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            let _ = self.tx.send(GenerateEvent::Delta {
                text,
                logprobs: Vec::new(),
            });
        }
    }

    fn finish(&mut self, finish_reason: FinishReason) -> StepOutcome {
        let _ = self.tx.send(GenerateEvent::Finished {
            finish_reason,
            prompt_tokens: self.prompt_ids.len(),
            completion_tokens: self.generated,
        });
        // Release the KV memory now rather than when the slot is reused.
        self.cache = None;
        StepOutcome::Done
    }
}
