//! Our own model code. Every family here runs one batched forward pass over tokens from many
//! sequences at different positions, reading and writing K/V through the paged cache
//! (`crate::kv`), which is what continuous batching needs and what candle-transformers'
//! models (one position per batch, private caches) cannot do.

mod config;
mod gguf;
mod gguf_write;
mod llama;
mod weights;

pub(crate) use config::ModelConfig;
pub use gguf::{GgufDims, gguf_dims};
pub(crate) use gguf::{GgufWeights, find_gguf};
pub use gguf_write::{GgufQuant, write_gguf};
pub(crate) use llama::{Batch, LlamaModel};
pub(crate) use weights::{SafetensorsWeights, var_builder};
