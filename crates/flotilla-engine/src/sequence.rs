//! One generation in flight: its tokens, how many of them have K/V in the paged cache, its
//! block table, sampler, detokeniser and stop matcher, and the channel to its request.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::detok::IncrementalDecoder;
use crate::error::EngineError;
use crate::kv::{BlockHash, BlockId};
use crate::sampling::{Sampled, Sampler};
use crate::stop::StopMatcher;
use crate::textmodel::TextTokenizer;
use crate::types::{FinishReason, GenerateEvent, SamplingParams, TokenLogprob, TopLogprob};

pub(crate) struct Sequence {
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache; the rest are computed by coming steps.
    pub computed: usize,
    pub blocks: Vec<BlockId>,
    /// Leading full blocks already registered for prefix sharing, and the last one's hash.
    pub registered: usize,
    pub last_hash: Option<BlockHash>,
    /// Times it was preempted (its blocks taken back, to be recomputed).
    pub preemptions: u32,
    max_tokens: usize,
    sampler: Sampler,
    logprobs: bool,
    ignore_eos: bool,
    stop: StopMatcher,
    detok: IncrementalDecoder,
    tx: mpsc::UnboundedSender<GenerateEvent>,
    /// Logprobs of tokens whose text has not gone out yet.
    pending_logprobs: Vec<TokenLogprob>,
    /// When the request queued it, and when its latest token was sampled.
    queued_at: Instant,
    last_token_at: Option<Instant>,
    /// Time in the running batch so far, and since when it has been there now (None
    /// while it waits, first or after a preemption): its busy time is their sum.
    busy: std::time::Duration,
    running_since: Option<Instant>,
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
            prompt_len: prompt_ids.len(),
            tokens: prompt_ids,
            computed: 0,
            blocks: Vec::new(),
            registered: 0,
            last_hash: None,
            preemptions: 0,
            max_tokens,
            logprobs: sampling.logprobs,
            ignore_eos: sampling.ignore_eos,
            stop: StopMatcher::new(&sampling.stop),
            detok: IncrementalDecoder::default(),
            tx,
            pending_logprobs: Vec::new(),
            queued_at: Instant::now(),
            last_token_at: None,
            busy: std::time::Duration::ZERO,
            running_since: None,
        }
    }

    /// A sequence that goes on with an answer whose `earlier` tokens end its prompt (see
    /// [`crate::sampling::Sampler::resume`]).
    pub(crate) fn resuming(mut self, earlier: &[u32]) -> Self {
        self.sampler.resume(earlier);
        self
    }

    /// Notes that a token was sampled at `now`: returns the time to the first token, or
    /// the gap since the previous one.
    pub(crate) fn token_out(&mut self, now: Instant) -> (Option<Duration>, Option<Duration>) {
        let prev = self.last_token_at.replace(now);
        match prev {
            None => (Some(now.saturating_duration_since(self.queued_at)), None),
            Some(t) => (None, Some(now.saturating_duration_since(t))),
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens the next steps must run through the model before it can sample again.
    pub(crate) fn uncomputed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub(crate) fn fail(&self, e: EngineError) {
        let _ = self.tx.send(GenerateEvent::Failed(e));
    }

    /// Takes one sampled token: streams its text, and says whether the sequence is done.
    pub(crate) fn accept(
        &mut self,
        logits: &[f32],
        tok: &TextTokenizer,
    ) -> Result<Option<FinishReason>, EngineError> {
        let sampled = self.sampler.sample(logits);
        let token = sampled.token;
        self.tokens.push(token);
        if self.logprobs {
            self.pending_logprobs.push(token_logprob(&sampled, tok));
        }
        if !self.ignore_eos && tok.eos_ids.contains(&token) {
            let rest = self.detok.flush(|ids| tok.decode(ids))?;
            let rest = self.stop.push(&rest);
            let tail = if rest.stopped {
                rest.emit
            } else {
                rest.emit + &self.stop.finish()
            };
            self.send_text(tail, true);
            return Ok(Some(self.finish(FinishReason::Stop)));
        }
        let text = self.detok.push(token, |ids| tok.decode(ids))?;
        let out = self.stop.push(&text);
        if out.stopped {
            self.send_text(out.emit, true);
            return Ok(Some(self.finish(FinishReason::Stop)));
        }
        if self.generated() >= self.max_tokens {
            let mut emit = out.emit;
            let rest = self.detok.flush(|ids| tok.decode(ids))?;
            let out = self.stop.push(&rest);
            emit += &out.emit;
            if out.stopped {
                self.send_text(emit, true);
                return Ok(Some(self.finish(FinishReason::Stop)));
            }
            emit += &self.stop.finish();
            self.send_text(emit, true);
            return Ok(Some(self.finish(FinishReason::Length)));
        }
        self.send_text(out.emit, false);
        Ok(None)
    }

    /// Sends the text with the logprobs of the tokens behind it. A token that completes no
    /// text yet (half a character, or held back by a stop string) keeps its logprob for the
    /// next delta; at the end (`last`) whatever is left goes out.
    fn send_text(&mut self, text: String, last: bool) {
        if text.is_empty() && (!last || self.pending_logprobs.is_empty()) {
            return;
        }
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let _ = self.tx.send(GenerateEvent::Delta { text, logprobs });
    }

    /// Notes that the sequence joins the running batch.
    pub(crate) fn admitted(&mut self, now: Instant) {
        self.running_since.get_or_insert(now);
    }

    /// Its time in the running batch, spells before preemptions included, waits not.
    fn busy(&self) -> std::time::Duration {
        self.busy
            + self
                .running_since
                .map_or(std::time::Duration::ZERO, |t| t.elapsed())
    }

    fn finish(&mut self, finish_reason: FinishReason) -> FinishReason {
        let busy = self.busy();
        let _ = self.tx.send(GenerateEvent::Finished {
            finish_reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            busy,
        });
        finish_reason
    }

    /// Forgets the cached K/V (the caller releases the blocks): the next admission
    /// recomputes prompt and generated tokens, then sampling continues where it stopped.
    pub(crate) fn reset_for_recompute(&mut self) -> Vec<BlockId> {
        if let Some(t) = self.running_since.take() {
            self.busy += t.elapsed();
        }
        self.computed = 0;
        self.registered = 0;
        self.last_hash = None;
        self.preemptions += 1;
        std::mem::take(&mut self.blocks)
    }
}

fn token_logprob(s: &Sampled, tok: &TextTokenizer) -> TokenLogprob {
    let text = |id: u32| tok.token_text(id);
    let token = text(s.token);
    TokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: s.logprob,
        top: s
            .top
            .iter()
            .map(|&(id, logprob)| {
                let token = text(id);
                TopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn busy_time_counts_running_spells_and_not_the_wait_after_a_preemption() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut seq = Sequence::new(vec![1, 2, 3], 4, &SamplingParams::default(), tx);
        assert_eq!(seq.busy(), Duration::ZERO, "waiting is not busy");
        let t0 = Instant::now() - Duration::from_millis(300);
        seq.admitted(t0);
        // Preempted now, after ~300 ms running; then waits; then runs again.
        seq.reset_for_recompute();
        let ran = seq.busy();
        assert!(ran >= Duration::from_millis(300), "{ran:?}");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            seq.busy(),
            ran,
            "the wait after a preemption is not counted"
        );
        seq.admitted(Instant::now() - Duration::from_millis(100));
        assert!(seq.busy() >= ran + Duration::from_millis(100));
        // A second admission while running changes nothing.
        let before = seq.busy();
        seq.admitted(Instant::now());
        assert!(seq.busy() >= before);
    }
}
