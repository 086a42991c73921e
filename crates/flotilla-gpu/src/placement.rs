//! Which device each model goes on. Pure: devices with their usable memory and models with
//! their estimates in, a table and the refusals out.
//!
//! Models are placed biggest first, each on the device whose room fits it most tightly, so
//! the large devices stay free for the large models that come before the small ones.

use std::fmt::Write as _;

use flotilla_api::protocol::GpuStats;

use crate::catalog::{DeviceKind, MemoryEstimate};

const GIB: f64 = (1u64 << 30) as f64;

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / GIB)
}

/// A device models can be placed on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Device {
    /// GPU index; None for the host (CPU and RAM).
    pub gpu: Option<u32>,
    /// `NVIDIA H100 80GB HBM3`, or `host`.
    pub name: String,
    pub total_bytes: u64,
    /// What models may take: the utilisation share of the total, less what other
    /// processes already hold.
    pub usable_bytes: u64,
}

impl Device {
    /// `usable = min(total x utilization, free now)`, as vLLM's `gpu_memory_utilization`.
    pub fn from_gpu(g: &GpuStats, utilization: f64) -> Device {
        Device {
            gpu: Some(g.index),
            name: g.name.clone(),
            total_bytes: g.memory_total_bytes,
            usable_bytes: ((g.memory_total_bytes as f64 * utilization) as u64)
                .min(g.memory_free_bytes),
        }
    }

    pub fn host(available_bytes: u64, total_bytes: u64, utilization: f64) -> Device {
        Device {
            gpu: None,
            name: "host".into(),
            total_bytes,
            usable_bytes: (available_bytes as f64 * utilization) as u64,
        }
    }

    pub fn kind(&self) -> DeviceKind {
        if self.gpu.is_some() {
            DeviceKind::Gpu
        } else {
            DeviceKind::Host
        }
    }

    /// `cuda:N` or `cpu`: what the engine is told.
    pub fn spec(&self) -> String {
        match self.gpu {
            Some(i) => format!("cuda:{i}"),
            None => "cpu".into(),
        }
    }

    fn label(&self) -> String {
        match self.gpu {
            Some(i) => format!("GPU {i} ({})", self.name),
            None => "the host".into(),
        }
    }
}

/// The CUDA ordinal of each GPU (by NVML index) this process can use. NVML lists every GPU
/// in PCI order; CUDA numbers only those `CUDA_VISIBLE_DEVICES` lists (indices or UUID
/// prefixes), in its order, stopping at the first entry that matches none, as CUDA does.
pub fn cuda_ordinals(gpus: &[GpuStats], visible: Option<&str>) -> Vec<(u32, u32)> {
    let Some(list) = visible else {
        return gpus.iter().map(|g| (g.index, g.index)).collect();
    };
    let mut out: Vec<(u32, u32)> = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let found = match entry.parse::<u32>() {
            Ok(i) => gpus.iter().find(|g| g.index == i),
            Err(_) if !entry.is_empty() => gpus.iter().find(|g| g.uuid.starts_with(entry)),
            Err(_) => None,
        };
        match found {
            Some(g) if !out.iter().any(|&(i, _)| i == g.index) => {
                out.push((g.index, out.len() as u32))
            }
            _ => break,
        }
    }
    out
}

/// Where a model must go, when its config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Host,
    Gpu(u32),
}

/// One model to place, with what it needs on each kind of device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDemand {
    pub name: String,
    /// Where its figures came from (catalog id or directory).
    pub origin: String,
    pub quantized: bool,
    pub pin: Option<Pin>,
    pub on_gpu: MemoryEstimate,
    pub on_host: MemoryEstimate,
}

impl ModelDemand {
    fn need(&self, kind: DeviceKind) -> &MemoryEstimate {
        match kind {
            DeviceKind::Gpu => &self.on_gpu,
            DeviceKind::Host => &self.on_host,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Placement {
    pub model: String,
    pub origin: String,
    /// Index into [`PlacementPlan::devices`].
    pub device: usize,
    pub estimate: MemoryEstimate,
    pub dtype: &'static str,
    /// The device's usable memory left after this and every model placed before it.
    pub free_after: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refusal {
    pub model: String,
    pub need_bytes: u64,
    /// One line naming the shortfall.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlacementPlan {
    pub devices: Vec<Device>,
    /// In the order they were placed (biggest first).
    pub placements: Vec<Placement>,
    pub refusals: Vec<Refusal>,
}

/// Places `models` onto `devices`. Unpinned models go on the GPUs when there are any and
/// on the host otherwise; a pinned one only where it is pinned.
pub fn plan(devices: Vec<Device>, models: &[ModelDemand]) -> PlacementPlan {
    let have_gpus = devices.iter().any(|d| d.gpu.is_some());
    let mut room: Vec<u64> = devices.iter().map(|d| d.usable_bytes).collect();
    let mut order: Vec<&ModelDemand> = models.iter().collect();
    // Biggest first by what it needs where it would go; name breaks ties for a stable table.
    let default_kind = if have_gpus {
        DeviceKind::Gpu
    } else {
        DeviceKind::Host
    };
    order.sort_by(|a, b| {
        b.need(default_kind)
            .total()
            .cmp(&a.need(default_kind).total())
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut placements = Vec::new();
    let mut refusals = Vec::new();
    for m in order {
        let eligible: Vec<usize> = devices
            .iter()
            .enumerate()
            .filter(|(_, d)| match m.pin {
                Some(Pin::Host) => d.gpu.is_none(),
                Some(Pin::Gpu(i)) => d.gpu == Some(i),
                None => (d.gpu.is_some()) == have_gpus,
            })
            .map(|(i, _)| i)
            .collect();
        let fits = eligible
            .iter()
            .copied()
            .filter(|&i| m.need(devices[i].kind()).total() <= room[i])
            // Tightest fit; the lower index on ties.
            .min_by_key(|&i| (room[i] - m.need(devices[i].kind()).total(), i));
        match fits {
            Some(i) => {
                let est = *m.need(devices[i].kind());
                room[i] -= est.total();
                placements.push(Placement {
                    model: m.name.clone(),
                    origin: m.origin.clone(),
                    device: i,
                    estimate: est,
                    dtype: est.dtype_label(m.quantized),
                    free_after: room[i],
                });
            }
            None => refusals.push(refuse(m, &devices, &room, &eligible)),
        }
    }
    PlacementPlan {
        devices,
        placements,
        refusals,
    }
}

fn refuse(m: &ModelDemand, devices: &[Device], room: &[u64], eligible: &[usize]) -> Refusal {
    let Some(&best) = eligible.iter().max_by_key(|&&i| (room[i], usize::MAX - i)) else {
        let need = m.on_gpu.total();
        let reason = match m.pin {
            Some(Pin::Gpu(i)) => format!(
                "model `{}` is pinned to cuda:{i}, but this host has no GPU {i}",
                m.name
            ),
            _ => format!("model `{}`: no device to place it on", m.name),
        };
        return Refusal {
            model: m.name.clone(),
            need_bytes: need,
            reason,
        };
    };
    let d = &devices[best];
    let e = m.need(d.kind());
    let placed_here = d.usable_bytes - room[best];
    let already = if placed_here > 0 {
        format!(" after {} placed there", gib(placed_here))
    } else {
        String::new()
    };
    let which = if eligible.len() > 1 {
        format!("the roomiest device, {}", d.label())
    } else {
        d.label()
    };
    Refusal {
        model: m.name.clone(),
        need_bytes: e.total(),
        reason: format!(
            "model `{}` ({}, {}) needs {} (weights {} + KV cache {} + activations {}) but {} has {} usable{}: {} short{}",
            m.name,
            m.origin,
            e.dtype_label(m.quantized),
            gib(e.total()),
            gib(e.weights),
            gib(e.kv_cache),
            gib(e.activations),
            which,
            gib(room[best]),
            already,
            gib(e.total() - room[best]),
            if e.kv_cache > e.weights / 4 {
                "; a smaller kv_cache_bytes trades context for memory"
            } else {
                ""
            }
        ),
    }
}

impl PlacementPlan {
    pub fn device_of(&self, model: &str) -> Option<&Device> {
        self.placements
            .iter()
            .find(|p| p.model == model)
            .map(|p| &self.devices[p.device])
    }

    /// The table `flotilla agent --plan` prints, then one line per refusal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "devices:");
        for d in &self.devices {
            let _ = writeln!(
                out,
                "  {:<8} {:<28} total {:>10}  usable {:>10}",
                d.spec(),
                d.name,
                gib(d.total_bytes),
                gib(d.usable_bytes)
            );
        }
        let _ = writeln!(
            out,
            "\n{:<20} {:<8} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10}  SIZED FROM",
            "MODEL", "DEVICE", "DTYPE", "WEIGHTS", "KV CACHE", "ACTIV.", "TOTAL", "LEFT"
        );
        for p in &self.placements {
            let e = &p.estimate;
            let _ = writeln!(
                out,
                "{:<20} {:<8} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
                p.model,
                self.devices[p.device].spec(),
                p.dtype,
                gib(e.weights),
                gib(e.kv_cache),
                gib(e.activations),
                gib(e.total()),
                gib(p.free_after),
                p.origin
            );
        }
        for r in &self.refusals {
            let _ = writeln!(out, "{:<20} REFUSED  {}", r.model, r.reason);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, EngineBudget, ModelShape};
    use crate::fixed::FixedGpu;
    use flotilla_api::protocol::GpuStats;

    fn gpu(name: &str, gib: f64, index: u32) -> Device {
        Device::from_gpu(&FixedGpu::new(name, gib).stats(index), 0.9)
    }

    fn demand(name: &str, id: &str, budget: EngineBudget, pin: Option<Pin>) -> ModelDemand {
        let shape = ModelShape::from_entry(Catalog::builtin().by_id(id).unwrap());
        ModelDemand {
            name: name.into(),
            origin: shape.origin.clone(),
            quantized: false,
            pin,
            on_gpu: shape.estimate(DeviceKind::Gpu, &budget),
            on_host: shape.estimate(DeviceKind::Host, &budget),
        }
    }

    fn kv(gib: u64) -> EngineBudget {
        EngineBudget {
            kv_cache_bytes: Some(gib << 30),
            ..EngineBudget::default()
        }
    }

    #[test]
    fn eight_b_on_the_24g_card_seventy_b_refused() {
        let devices = vec![gpu("NVIDIA L4", 24.0, 0), gpu("NVIDIA A100 80GB", 80.0, 1)];
        let models = [
            demand("llama-8b", "llama-3.1-8b", kv(2), None),
            demand("llama-70b", "llama-3.1-70b", kv(4), None),
        ];
        let p = plan(devices, &models);
        assert_eq!(p.placements.len(), 1);
        assert_eq!(p.device_of("llama-8b").unwrap().spec(), "cuda:0");
        // 8.03e9 x 2 B = 14.96 GiB + 2 GiB KV + activations: fits 21.6 GiB usable.
        let placed = &p.placements[0];
        assert!(placed.estimate.total() < 21 << 30);
        assert_eq!(
            placed.free_after,
            p.devices[0].usable_bytes - placed.estimate.total()
        );
        assert_eq!(p.refusals.len(), 1);
        let r = &p.refusals[0];
        assert_eq!(r.model, "llama-70b");
        // 70.6e9 x 2 B = 131.5 GiB of weights alone against 72 GiB usable.
        assert!(r.reason.contains("needs 136.0 GiB"), "{}", r.reason);
        assert!(
            r.reason.contains("GPU 1 (NVIDIA A100 80GB)"),
            "{}",
            r.reason
        );
        assert!(r.reason.contains("72.0 GiB usable"), "{}", r.reason);
        assert!(r.reason.contains("64.0 GiB short"), "{}", r.reason);
        let t = p.table();
        assert!(t.contains("llama-8b"), "{t}");
        assert!(t.contains("REFUSED"), "{t}");
    }

    #[test]
    fn biggest_first_takes_the_big_card_and_small_ones_fill_in() {
        let devices = vec![gpu("L4", 24.0, 0), gpu("H100", 80.0, 1)];
        let models = [
            demand("small", "qwen2.5-0.5b", kv(1), None),
            demand("mid", "llama-3.1-8b", kv(2), None),
            demand("qwen32", "qwen2.5-32b", kv(4), None),
        ];
        let p = plan(devices, &models);
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        let order: Vec<&str> = p.placements.iter().map(|x| x.model.as_str()).collect();
        assert_eq!(order, ["qwen32", "mid", "small"]);
        assert_eq!(p.device_of("qwen32").unwrap().spec(), "cuda:1");
        // The tightest fit for the 8B is the L4, and the 0.5B fits beside it there.
        assert_eq!(p.device_of("mid").unwrap().spec(), "cuda:0");
        assert_eq!(p.device_of("small").unwrap().spec(), "cuda:0");
    }

    #[test]
    fn pins_and_memory_already_used_are_respected() {
        let mut busy = gpu("H100", 80.0, 0);
        // Another process holds 70 GiB: only 10 GiB is free.
        busy.usable_bytes = busy.usable_bytes.min(10 << 30);
        let devices = vec![
            busy,
            gpu("H100", 80.0, 1),
            Device::host(20 << 30, 32 << 30, 0.9),
        ];
        let models = [
            demand("pinned", "llama-3.1-8b", kv(2), Some(Pin::Gpu(0))),
            demand("cpu", "qwen2.5-0.5b", kv(1), Some(Pin::Host)),
            demand("ghost", "qwen2.5-0.5b", kv(1), Some(Pin::Gpu(7))),
        ];
        let p = plan(devices, &models);
        assert_eq!(p.device_of("cpu").unwrap().spec(), "cpu");
        let reasons: Vec<&str> = p.refusals.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("`pinned`") && r.contains("GPU 0 (H100) has 10.0 GiB")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("no GPU 7")),
            "{reasons:?}"
        );
    }

    #[test]
    fn cuda_ordinals_follow_cuda_visible_devices() {
        let gpus: Vec<GpuStats> = (0..4).map(|i| FixedGpu::new("g", 80.0).stats(i)).collect();
        assert_eq!(cuda_ordinals(&gpus, None), [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(cuda_ordinals(&gpus, Some("2,0")), [(2, 0), (0, 1)]);
        let uuid = gpus[3].uuid.clone();
        assert_eq!(cuda_ordinals(&gpus, Some(&uuid)), [(3, 0)]);
        // CUDA stops at the first entry that names no device.
        assert_eq!(cuda_ordinals(&gpus, Some("1,9,2")), [(1, 0)]);
        assert!(cuda_ordinals(&gpus, Some("")).is_empty());
    }

    #[test]
    fn without_gpus_models_go_to_host_memory() {
        let devices = vec![Device::host(16 << 30, 24 << 30, 0.9)];
        let models = [
            demand("a", "qwen2.5-0.5b", kv(1), None),
            demand("b", "llama-3.1-8b", kv(1), None),
        ];
        let p = plan(devices, &models);
        assert_eq!(p.device_of("a").unwrap().spec(), "cpu");
        // 8B in f32 is 30 GiB of weights: more than the host has.
        assert_eq!(p.refusals.len(), 1);
        assert!(
            p.refusals[0].reason.contains("the host"),
            "{:?}",
            p.refusals
        );
        assert!(p.refusals[0].reason.contains("f32"), "{:?}", p.refusals);
    }
}
