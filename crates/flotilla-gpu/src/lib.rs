//! What a host has and what fits on it: GPU and host telemetry behind one [`GpuProbe`]
//! trait (NVML on NVIDIA hosts, `/proc` on CPU hosts, a fixed set of described GPUs for
//! tests and for planning hardware one does not have), the model catalog with its memory
//! estimates, and the placement of models onto devices.
//!
//! Depends on flotilla-api for the wire types only; never on candle, axum or tokio. Probe
//! reads are blocking (NVML answers in milliseconds): async callers run them on a blocking
//! thread.

pub mod catalog;
mod fixed;
mod host;
mod nvml;
pub mod placement;

use std::sync::Arc;

pub use catalog::{Catalog, CatalogEntry, ModelShape};
pub use fixed::{FixedGpu, FixedProbe};
use flotilla_api::protocol::{GpuStats, HostStats};
pub use host::HostProbe;
pub use nvml::NvmlProbe;
pub use placement::{Device, ModelDemand, Placement, PlacementPlan, Refusal, cuda_ordinals, plan};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML is not available: {0}")]
    NvmlUnavailable(String),
    #[error("reading the model catalog {path}: {reason}")]
    Catalog { path: String, reason: String },
    #[error("sizing model `{model}`: {reason}")]
    Shape { model: String, reason: String },
}

/// Which probe produced the readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// Real GPUs read through the NVIDIA driver.
    Nvml,
    /// No GPU: the host's CPUs and memory.
    Host,
    /// GPUs described in config or by a test; nothing runs on them.
    Fixed,
}

/// One reading of the host.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Telemetry {
    pub gpus: Vec<GpuStats>,
    pub host: Option<HostStats>,
}

/// Reads GPUs and the host. Readings a device does not support are `None`, never zero;
/// a failed read of one field never hides the others.
pub trait GpuProbe: Send + Sync {
    fn kind(&self) -> ProbeKind;
    fn read(&self) -> Telemetry;
    /// The driver version, for labels and the status page.
    fn driver_version(&self) -> Option<String> {
        None
    }
}

/// How the agent chooses its probe (`agent.gpus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeChoice {
    /// NVML when the driver is there, the host probe otherwise.
    #[default]
    Auto,
    /// NVML or fail: for GPU hosts where a missing driver is a fault.
    Nvml,
    /// Ignore GPUs; report the host.
    None,
}

/// Opens the probe `choice` asks for, or the fixed probe when GPUs are described. Without
/// NVML, `Auto` says once why there is no GPU and reads the host instead.
pub fn open_probe(choice: ProbeChoice, fixed: &[FixedGpu]) -> Result<Arc<dyn GpuProbe>, GpuError> {
    if !fixed.is_empty() {
        return Ok(Arc::new(FixedProbe::from_config(fixed)));
    }
    match choice {
        ProbeChoice::None => Ok(Arc::new(HostProbe::new())),
        ProbeChoice::Nvml => Ok(Arc::new(NvmlProbe::init()?)),
        ProbeChoice::Auto => match NvmlProbe::init() {
            Ok(p) => Ok(Arc::new(p)),
            Err(e) => {
                tracing::info!(reason = %e, "no GPU found through NVML: reporting host memory; models not pinned to a GPU run on the CPU");
                Ok(Arc::new(HostProbe::new()))
            }
        },
    }
}
