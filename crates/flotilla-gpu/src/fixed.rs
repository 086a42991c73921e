//! GPUs described rather than read: for tests, and for planning placement on hardware one
//! does not have (`[[agent.fixed_gpus]]` with `flotilla agent --plan`). Models placed on
//! them still run on the CPU.

use std::sync::{Arc, Mutex};

use flotilla_api::protocol::GpuStats;
use serde::{Deserialize, Serialize};

use crate::{GpuProbe, HostProbe, ProbeKind, Telemetry};

/// One described GPU, as written in config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedGpu {
    pub name: String,
    /// Memory in GiB (1 GiB = 2^30 bytes).
    pub memory_gib: f64,
    #[serde(default)]
    pub used_gib: f64,
    #[serde(default)]
    pub utilization_pct: Option<u32>,
    #[serde(default)]
    pub memory_utilization_pct: Option<u32>,
    #[serde(default)]
    pub temperature_c: Option<u32>,
    #[serde(default)]
    pub power_draw_w: Option<f64>,
    #[serde(default)]
    pub power_limit_w: Option<f64>,
    #[serde(default)]
    pub sm_clock_mhz: Option<u32>,
    #[serde(default)]
    pub memory_clock_mhz: Option<u32>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl FixedGpu {
    /// An idle GPU of `memory_gib` with no other readings.
    pub fn new(name: &str, memory_gib: f64) -> FixedGpu {
        FixedGpu {
            name: name.into(),
            memory_gib,
            used_gib: 0.0,
            utilization_pct: None,
            memory_utilization_pct: None,
            temperature_c: None,
            power_draw_w: None,
            power_limit_w: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
        }
    }

    pub fn stats(&self, index: u32) -> GpuStats {
        let total = (self.memory_gib * GIB) as u64;
        let used = ((self.used_gib * GIB) as u64).min(total);
        GpuStats {
            index,
            uuid: format!("GPU-00000000-0000-0000-0000-{index:012}"),
            name: self.name.clone(),
            memory_total_bytes: total,
            memory_used_bytes: used,
            memory_free_bytes: total - used,
            gpu_utilization_pct: self.utilization_pct,
            memory_utilization_pct: self.memory_utilization_pct,
            temperature_c: self.temperature_c,
            power_draw_w: self.power_draw_w,
            power_limit_w: self.power_limit_w,
            sm_clock_mhz: self.sm_clock_mhz,
            memory_clock_mhz: self.memory_clock_mhz,
            processes: Vec::new(),
        }
    }
}

/// Answers with whatever GPUs it holds; a test may change them between readings.
#[derive(Clone)]
pub struct FixedProbe {
    gpus: Arc<Mutex<Vec<GpuStats>>>,
    host: Arc<HostProbe>,
}

impl FixedProbe {
    pub fn new(gpus: Vec<GpuStats>) -> FixedProbe {
        FixedProbe {
            gpus: Arc::new(Mutex::new(gpus)),
            host: Arc::new(HostProbe::new()),
        }
    }

    pub fn from_config(gpus: &[FixedGpu]) -> FixedProbe {
        FixedProbe::new(
            gpus.iter()
                .enumerate()
                .map(|(i, g)| g.stats(i as u32))
                .collect(),
        )
    }

    /// Replaces the readings (a test's way of moving the needles).
    pub fn set(&self, gpus: Vec<GpuStats>) {
        *self.gpus.lock().unwrap_or_else(|p| p.into_inner()) = gpus;
    }
}

impl GpuProbe for FixedProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Fixed
    }

    fn read(&self) -> Telemetry {
        Telemetry {
            gpus: self.gpus.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            host: self.host.read_host(),
        }
    }
}
