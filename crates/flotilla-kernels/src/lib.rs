//! Flotilla's own GPU kernels (`kernels/*.cu`) and their CPU reference implementations.
//!
//! The kernels cover what the generic candle ops do with more memory traffic than needed
//! on the decode path: attention over the engine's paged KV cache (and the write of new
//! K/V into it), residual add fused with RMSNorm, and rotary embedding applied in place.
//!
//! - [`cpu`]: the reference for every kernel, on `f32` slices. Always built; the tests
//!   check it against an independent computation and, in a `cuda` build, check the kernels
//!   against it.
//! - [`PagedBatch`]: the host-side description of a batch over the paged cache (slots,
//!   block tables, per-query context), shared by both paths.
//! - `cuda` (feature `cuda`): launches the kernels on candle CUDA tensors. `build.rs`
//!   compiles the `.cu` files with nvcc for sm_80 and sm_90; without the feature it does
//!   nothing and no CUDA toolkit is needed.

mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use batch::{PagedBatch, SeqRun};

/// Largest head dimension the attention kernel handles (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// A kernel's inputs did not fit together. Checked on the host before any launch, so a bad
/// shape never reaches the GPU as an out-of-bounds access.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn shape_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(KernelError::Shape(msg.into()))
}
