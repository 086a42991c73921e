use crate::error::EngineError;

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Keep only the k most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 is off.
    pub min_p: f64,
    /// Multiplicative penalty on tokens seen in the prompt or the output (1 is off),
    /// as Hugging Face and vLLM define it.
    pub repetition_penalty: f64,
    /// OpenAI's additive penalties on generated tokens, in [-2, 2].
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// Fixed seed makes sampling reproducible; `None` draws a random seed.
    pub seed: Option<u64>,
    /// Defaults to the room left in the context window.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// Report the chosen token's log-probability with every token.
    pub logprobs: bool,
    /// Also report this many most likely alternatives per position (0..=20).
    pub top_logprobs: usize,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (vLLM's extension;
    /// benchmarks use it so every sequence does the same work).
    pub ignore_eos: bool,
}

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.top_k == Some(0) {
            return Err(EngineError::invalid("top_k must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(EngineError::invalid(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(EngineError::invalid(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(EngineError::invalid(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(EngineError::invalid(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            )));
        }
        if self.max_tokens == Some(0) {
            return Err(EngineError::invalid("max_tokens must be at least 1"));
        }
        Ok(())
    }
}

/// One alternative at a position: its token text, raw bytes and log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The log-probability of one generated token (log-softmax of the model's raw logits, as
/// vLLM and OpenAI report it) and, when asked, the most likely alternatives, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
    /// A conversation whose last message, the assistant's partial answer, the model goes
    /// on writing (no new turn).
    ContinueChat(Vec<ChatMessage>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
}

#[derive(Debug)]
pub enum GenerateEvent {
    /// New text. Never contains any part of a stop string and never splits a UTF-8 char.
    Delta {
        text: String,
        /// One entry per token generated since the last delta, when logprobs were asked for.
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Its time in the running batch, from joining it to finishing (a wait after a
        /// preemption not counted): the engine time the sequence took, what its GPU time
        /// is priced by.
        busy: std::time::Duration,
    },
    Failed(EngineError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TextEngineConfig {
    /// Sequences decoded together; more wait in FIFO order.
    pub max_num_seqs: usize,
    /// Tokens one forward pass may compute (decode tokens plus prefill chunks); longer
    /// prompts are prefilled in chunks of what is left.
    pub max_batch_tokens: usize,
    /// KV cache size in blocks; wins over `kv_cache_bytes`.
    pub kv_cache_blocks: Option<usize>,
    /// KV cache size in bytes. With neither set, the cache holds `max_num_seqs` full
    /// contexts, capped at 1 GiB.
    pub kv_cache_bytes: Option<u64>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Share full blocks of identical prompt prefixes between sequences.
    pub prefix_caching: bool,
    /// Where the model runs (`cpu`, `cuda:N`); a GPU needs a `cuda` build.
    pub device: crate::DeviceSpec,
}

impl Default for TextEngineConfig {
    fn default() -> Self {
        TextEngineConfig {
            max_num_seqs: 16,
            max_batch_tokens: 512,
            kv_cache_blocks: None,
            kv_cache_bytes: None,
            block_size: 16,
            prefix_caching: true,
            device: crate::DeviceSpec::Cpu,
        }
    }
}

impl TextEngineConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.max_num_seqs == 0 {
            return Err(EngineError::invalid("max_num_seqs must be at least 1"));
        }
        if self.block_size == 0 {
            return Err(EngineError::invalid("block_size must be at least 1"));
        }
        if self.max_batch_tokens < self.max_num_seqs {
            return Err(EngineError::invalid(format!(
                "max_batch_tokens ({}) must be at least max_num_seqs ({}): every running \
                 sequence decodes one token per step",
                self.max_batch_tokens, self.max_num_seqs
            )));
        }
        Ok(())
    }
}

/// A snapshot of one text engine, for the agent's status, heartbeats and metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStatus {
    pub running: usize,
    pub waiting: usize,
    /// `max_num_seqs`.
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub kv_blocks_total: usize,
    /// Blocks referenced by running sequences.
    pub kv_blocks_used: usize,
    /// Blocks free or holding an unreferenced cached prefix (reusable).
    pub kv_blocks_free: usize,
    pub kv_block_size: usize,
    /// Prompt tokens run through the model (prefix-cache hits are not).
    pub prompt_tokens_total: u64,
    /// Prompt tokens whose K/V came from shared prefix blocks instead.
    pub prefix_hit_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub preemptions_total: u64,
    pub steps_total: u64,
    /// Generated tokens per second over the last five seconds.
    pub tokens_per_second: f64,
}
