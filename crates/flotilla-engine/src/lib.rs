//! flotilla-engine: local model inference with candle.
//!
//! This crate owns everything that touches model weights: loading (local directory or the
//! Hugging Face cache), tokenisation and chat templates, sampling, the per-model engine thread
//! that interleaves many sequences, and sentence embeddings. It never depends on axum or any
//! HTTP stack; the agent wraps it.

pub mod bench;
mod detok;
mod device;
mod embed;
mod error;
mod kv;
mod models;
mod sampling;
mod sequence;
mod source;
mod stop;
mod template;
mod testmodel;
mod text;
mod textmodel;
mod types;

pub use device::DeviceSpec;
pub use embed::{EmbeddingEngine, Embeddings, find_minilm_dir};
pub use error::EngineError;
pub use models::{GgufDims, GgufQuant, gguf_dims, write_gguf};
pub use source::{Hub, pull_model, resolve_model_source, resolve_model_source_with};
pub use template::ChatTemplate;
pub use testmodel::{TestModelSize, make_test_model, make_test_model_sized};
pub use text::{EngineLatency, TextEngine};
pub use types::{
    ChatMessage, EngineStatus, FinishReason, GenerateEvent, GenerateRequest, MAX_TOP_LOGPROBS,
    Prompt, SamplingParams, TextEngineConfig, TokenLogprob, TopLogprob,
};
