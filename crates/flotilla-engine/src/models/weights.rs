//! Where the model code gets its tensors. Names are always Hugging Face's
//! (`model.layers.0.self_attn.q_proj.weight`); a GGUF source maps them to llama.cpp's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;

use crate::error::EngineError;

pub(crate) trait WeightSource {
    fn has(&self, name: &str) -> bool;
    /// A dense tensor (embeddings, norms, biases), in the file's type or f32; callers
    /// convert once to the type they compute in.
    fn tensor(&self, name: &str) -> Result<Tensor, EngineError>;
    /// A weight matrix `[out, in]` for `x @ w.T`, quantized where the file is.
    fn matmul(&self, name: &str) -> Result<QMatMul, EngineError>;
    /// Where the weights came from, for error messages.
    fn origin(&self) -> &Path;
}

/// All `*.safetensors` files of a Hugging Face checkpoint, each tensor in its stored type
/// (a bf16 checkpoint stays bf16 on a GPU instead of passing through f32).
pub(crate) struct SafetensorsWeights {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl SafetensorsWeights {
    /// Reads every file, counting its bytes on `progress`.
    pub(crate) fn load(
        dir: &Path,
        device: &Device,
        progress: &ProgressBar,
    ) -> Result<Self, EngineError> {
        Ok(SafetensorsWeights {
            tensors: load_all(dir, device, progress)?,
            dir: dir.to_path_buf(),
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<Tensor, EngineError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::files(&self.dir, format!("tensor `{name}` is missing")))?;
        Ok(t.clone())
    }

    fn matmul(&self, name: &str) -> Result<QMatMul, EngineError> {
        Ok(QMatMul::Tensor(self.tensor(name)?))
    }

    fn origin(&self) -> &Path {
        &self.dir
    }
}

pub(crate) fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| EngineError::io(dir, e))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(EngineError::files(dir, "no *.safetensors weights found"));
    }
    Ok(files)
}

/// All safetensors of `dir` as a candle VarBuilder converting to f32 (for candle-nn models
/// such as the BERT embedder).
pub(crate) fn var_builder(
    dir: &Path,
    device: &Device,
    progress: &ProgressBar,
) -> Result<candle_nn::VarBuilder<'static>, EngineError> {
    Ok(candle_nn::VarBuilder::from_tensors(
        load_all(dir, device, progress)?,
        DType::F32,
        device,
    ))
}

/// Files are read in pieces of this size, so a bar moves while a 5 GB shard is read.
const READ_PIECE: usize = 16 << 20;

fn load_all(
    dir: &Path,
    device: &Device,
    progress: &ProgressBar,
) -> Result<HashMap<String, Tensor>, EngineError> {
    let files = safetensor_files(dir)?;
    let mut total = 0;
    for file in &files {
        total += std::fs::metadata(file)
            .map_err(|e| EngineError::io(file, e))?
            .len();
    }
    progress.set_length(total);
    let mut tensors = HashMap::new();
    for file in files {
        let bytes = read_counted(&file, progress)?;
        let part = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| EngineError::files(&file, e.to_string()))?;
        tensors.extend(part);
    }
    Ok(tensors)
}

/// The whole file, its bytes counted on `progress` as they arrive.
fn read_counted(file: &Path, progress: &ProgressBar) -> Result<Vec<u8>, EngineError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(file).map_err(|e| EngineError::io(file, e))?;
    let len = f.metadata().map_err(|e| EngineError::io(file, e))?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    loop {
        let got = (&mut f)
            .take(READ_PIECE as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| EngineError::io(file, e))?;
        if got == 0 {
            return Ok(bytes);
        }
        progress.inc(got as u64);
    }
}
