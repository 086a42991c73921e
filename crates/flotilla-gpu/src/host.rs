//! The host's CPUs and memory from `/proc`: what a CPU-only agent reports instead of VRAM,
//! and what its models are placed into.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_api::protocol::HostStats;

use crate::{GpuProbe, ProbeKind, Telemetry};

/// CPU utilisation needs two readings of `/proc/stat` some time apart: the baseline and the
/// last figure are kept here, and readers closer together than [`CPU_WINDOW`] (a heartbeat
/// and a scrape, say) share the last figure instead of measuring a window of nothing.
pub struct HostProbe {
    cpu: Mutex<CpuState>,
}

#[derive(Default)]
struct CpuState {
    baseline: Option<(CpuTimes, Instant)>,
    last: Option<f64>,
}

/// The shortest window CPU utilisation is measured over.
const CPU_WINDOW: Duration = Duration::from_millis(500);

#[derive(Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl Default for HostProbe {
    fn default() -> Self {
        HostProbe::new()
    }
}

impl HostProbe {
    pub fn new() -> HostProbe {
        // The first reading only sets the baseline for the next.
        HostProbe {
            cpu: Mutex::new(CpuState {
                baseline: cpu_times().map(|t| (t, Instant::now())),
                last: None,
            }),
        }
    }

    fn cpu_utilization(&self) -> Option<f64> {
        let mut st = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some((_, at)) = st.baseline
            && now.duration_since(at) < CPU_WINDOW
        {
            return st.last;
        }
        let times = cpu_times()?;
        if let Some((base, _)) = st.baseline
            && times.total > base.total
        {
            st.last = Some(
                times.busy.saturating_sub(base.busy) as f64 / (times.total - base.total) as f64,
            );
        }
        st.baseline = Some((times, now));
        st.last
    }

    pub fn read_host(&self) -> Option<HostStats> {
        let (total, available) = meminfo()?;
        let cpu_utilization = self.cpu_utilization();
        Some(HostStats {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            cpu_utilization,
            memory_total_bytes: total,
            memory_available_bytes: available,
        })
    }
}

impl GpuProbe for HostProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Host
    }

    fn read(&self) -> Telemetry {
        Telemetry {
            gpus: Vec::new(),
            host: self.read_host(),
        }
    }
}

/// (MemTotal, MemAvailable) in bytes.
fn meminfo() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

fn cpu_times() -> Option<CpuTimes> {
    parse_cpu_line(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The aggregate `cpu` line: user nice system idle iowait irq softirq steal ...
fn parse_cpu_line(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n",
        );
        assert_eq!(m, Some((24_000_000 * 1024, 12_000_000 * 1024)));
        let c = parse_cpu_line("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5\n").unwrap();
        assert_eq!((c.busy, c.total), (150, 1000));
    }

    #[test]
    fn reads_this_host() {
        let p = HostProbe::new();
        let h = p.read_host().expect("/proc is readable on Linux");
        assert!(h.memory_total_bytes >= h.memory_available_bytes);
        assert!(h.memory_total_bytes > 0 && h.cpus > 0);
        assert_eq!(p.kind(), ProbeKind::Host);
        assert!(p.read().gpus.is_empty());
    }
}
