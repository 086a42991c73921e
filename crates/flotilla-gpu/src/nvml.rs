//! Real GPUs through NVML (the library the NVIDIA driver installs). nvml-wrapper loads
//! `libnvidia-ml.so.1` at run time, so the same binary runs on hosts without the driver.

use flotilla_api::protocol::{GpuProcess, GpuStats};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;

use crate::{GpuError, GpuProbe, HostProbe, ProbeKind, Telemetry};

pub struct NvmlProbe {
    nvml: Nvml,
    host: HostProbe,
}

impl NvmlProbe {
    /// Loads NVML and checks that it sees at least one GPU.
    pub fn init() -> Result<NvmlProbe, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NvmlUnavailable(e.to_string()))?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::NvmlUnavailable(e.to_string()))?;
        if count == 0 {
            return Err(GpuError::NvmlUnavailable(
                "the driver reports no GPU".into(),
            ));
        }
        Ok(NvmlProbe {
            nvml,
            host: HostProbe::new(),
        })
    }

    fn gpu(&self, index: u32) -> Option<GpuStats> {
        let d = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(gpu = index, error = %e, "GPU unreadable");
                return None;
            }
        };
        let mem = d.memory_info().ok();
        let util = d.utilization_rates().ok();
        let processes = d
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                name: process_name(p.pid),
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
        Some(GpuStats {
            index,
            uuid: d.uuid().unwrap_or_default(),
            name: d.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
            memory_total_bytes: mem.as_ref().map_or(0, |m| m.total),
            memory_used_bytes: mem.as_ref().map_or(0, |m| m.used),
            memory_free_bytes: mem.as_ref().map_or(0, |m| m.free),
            gpu_utilization_pct: util.as_ref().map(|u| u.gpu),
            memory_utilization_pct: util.as_ref().map(|u| u.memory),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            // NVML reports milliwatts.
            power_draw_w: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
            power_limit_w: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
            processes,
        })
    }
}

fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

impl GpuProbe for NvmlProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Nvml
    }

    fn read(&self) -> Telemetry {
        let count = self.nvml.device_count().unwrap_or(0);
        Telemetry {
            gpus: (0..count).filter_map(|i| self.gpu(i)).collect(),
            host: self.host.read_host(),
        }
    }

    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}
