//! Sizing the configured models and placing them on this host's devices before anything
//! loads, so a model that cannot fit is refused in one line instead of failing half-way
//! through a 140 GB load.

use std::path::Path;

use flotilla_api::protocol::ModelKind;
use flotilla_engine::DeviceSpec;
use flotilla_gpu::catalog::{DeviceKind, EngineBudget};
use flotilla_gpu::placement::Pin;
use flotilla_gpu::{
    Catalog, Device, GpuProbe, ModelDemand, ModelShape, PlacementPlan, ProbeKind, Telemetry,
};

use crate::AgentError;
use crate::config::{AgentConfig, ModelSpec};

/// The placement and, per model, the device its engine opens.
#[derive(Debug, Clone)]
pub struct AgentPlan {
    pub plan: PlacementPlan,
    pub probe: ProbeKind,
    /// CUDA ordinal by NVML index, for the GPUs this process may use.
    pub ordinals: Vec<(u32, u32)>,
    /// Why placement and execution differ (described GPUs or a build without CUDA run
    /// on the CPU; a device order CUDA may number differently), for the table's header.
    pub note: Option<String>,
}

impl AgentPlan {
    /// The device the engine of `spec` opens: its pin, else where it was placed.
    pub fn engine_device(&self, spec: &ModelSpec) -> DeviceSpec {
        if let Some(d) = spec.device {
            return d;
        }
        let gpu = self.plan.device_of(&spec.name).and_then(|d| d.gpu);
        match self.ordinals.iter().find(|&&(i, _)| Some(i) == gpu) {
            Some(&(_, ordinal)) if self.probe == ProbeKind::Nvml => {
                DeviceSpec::Cuda(ordinal as usize)
            }
            _ => DeviceSpec::Cpu,
        }
    }

    /// The refusals as one error, or Ok.
    pub fn check(&self) -> Result<(), AgentError> {
        if self.plan.refusals.is_empty() {
            return Ok(());
        }
        Err(AgentError::Placement(
            self.plan
                .refusals
                .iter()
                .map(|r| r.reason.clone())
                .collect(),
        ))
    }

    pub fn table(&self) -> String {
        match &self.note {
            Some(n) => format!("note: {n}\n{}", self.plan.table()),
            None => self.plan.table(),
        }
    }
}

pub fn catalog(cfg: &AgentConfig) -> Result<Catalog, AgentError> {
    match &cfg.catalog_file {
        Some(p) => Catalog::with_extra(p).map_err(|e| AgentError::Config(e.to_string())),
        None => Ok(Catalog::builtin()),
    }
}

/// Sizes `spec` from what is on disk already (a directory, a GGUF file, the Hugging Face
/// cache) or from the catalog. A repo id known to neither is downloaded first when `fetch`
/// (it is about to be loaded anyway), and refused otherwise (`--plan` downloads nothing).
pub async fn model_shape(
    spec: &ModelSpec,
    catalog: &Catalog,
    cfg: &AgentConfig,
    fetch: bool,
) -> Result<ModelShape, AgentError> {
    let embedding = spec.kind == ModelKind::Embedding;
    let err = |reason: String| AgentError::Load {
        model: spec.name.clone(),
        reason,
    };
    if let Some(id) = &spec.catalog {
        return catalog
            .by_id(id)
            .map(ModelShape::from_entry)
            .ok_or_else(|| {
                err(format!(
                    "`catalog = \"{id}\"` names no models/catalog.toml entry"
                ))
            });
    }
    if let Some(e) = catalog.by_source(&spec.source)
        && spec.source.starts_with("builtin:")
    {
        return Ok(ModelShape::from_entry(e));
    }
    let local = if Path::new(&spec.source).exists() {
        Some(Path::new(&spec.source).to_path_buf())
    } else if spec.source.contains('/') && !spec.source.starts_with("builtin:") {
        // Already in the hub cache? Offline resolution never touches the network.
        flotilla_engine::resolve_model_source(&spec.source, Some(&cfg.hf_cache_dir), true)
            .await
            .ok()
    } else {
        None
    };
    if let Some(path) = local {
        return shape_from_files(&path, embedding).map_err(err);
    }
    if let Some(e) = catalog.by_source(&spec.source) {
        return Ok(ModelShape::from_entry(e));
    }
    if fetch && !cfg.offline {
        let dir = crate::source::resolve_configured(&spec.source, cfg).await?;
        return shape_from_files(&dir, embedding).map_err(err);
    }
    Err(err(format!(
        "cannot size `{}` before downloading it: it is neither on disk nor in \
                 models/catalog.toml; set `catalog = \"<id>\"` on the model or add an entry \
                 with `agent.catalog_file`",
        spec.source
    )))
}

fn shape_from_files(path: &Path, embedding: bool) -> Result<ModelShape, String> {
    if let Some(d) = flotilla_engine::gguf_dims(path).map_err(|e| e.to_string())? {
        return Ok(ModelShape {
            origin: path.display().to_string(),
            parameters: 0,
            layers: d.layers,
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            hidden: d.hidden,
            intermediate: d.intermediate,
            vocab: d.vocab,
            context: d.context,
            dtype_bytes: 4,
            file_bytes: Some(d.file_bytes),
            quantized: true,
            embedding,
            tied: false,
        });
    }
    ModelShape::from_dir(path, embedding).map_err(|e| e.to_string())
}

/// The engine settings of `spec` that decide its memory beyond the weights.
pub fn budget(spec: &ModelSpec) -> EngineBudget {
    let e = spec.engine_config();
    EngineBudget {
        max_num_seqs: e.max_num_seqs as u64,
        max_batch_tokens: e.max_batch_tokens as u64,
        kv_cache_blocks: e.kv_cache_blocks.map(|b| b as u64),
        kv_cache_bytes: e.kv_cache_bytes,
        block_size: e.block_size as u64,
    }
}

/// Places every configured model on the devices `telemetry` shows (`fetch`: see
/// [`model_shape`]).
pub async fn plan_models(
    cfg: &AgentConfig,
    probe: &dyn GpuProbe,
    telemetry: &Telemetry,
    fetch: bool,
) -> Result<AgentPlan, AgentError> {
    let catalog = catalog(cfg)?;
    let cuda_build = DeviceSpec::Cuda(0).check_build().is_ok();
    let mut note = None;
    let use_gpus = match probe.kind() {
        ProbeKind::Fixed => {
            note = Some(
                "GPUs described in agent.fixed_gpus: models placed on them run on the CPU".into(),
            );
            true
        }
        ProbeKind::Nvml if !cuda_build => {
            note = Some(format!(
                "{} GPU(s) found, but this build has no CUDA (build with --features cuda): models run on the CPU",
                telemetry.gpus.len()
            ));
            false
        }
        ProbeKind::Nvml => true,
        ProbeKind::Host => false,
    };
    let ordinals = if probe.kind() == ProbeKind::Nvml {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let distinct = telemetry.gpus.windows(2).any(|w| w[0].name != w[1].name);
        if distinct && std::env::var("CUDA_DEVICE_ORDER").as_deref() != Ok("PCI_BUS_ID") {
            note = Some(
                "GPUs of different models: set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers \
                 them in NVML's order"
                    .into(),
            );
        }
        flotilla_gpu::cuda_ordinals(&telemetry.gpus, visible.as_deref())
    } else {
        telemetry.gpus.iter().map(|g| (g.index, g.index)).collect()
    };
    let mut devices: Vec<Device> = if use_gpus {
        telemetry
            .gpus
            .iter()
            .filter(|g| ordinals.iter().any(|&(i, _)| i == g.index))
            .map(|g| Device::from_gpu(g, cfg.gpu_memory_utilization))
            .collect()
    } else {
        Vec::new()
    };
    devices.push(match &telemetry.host {
        Some(h) => Device::host(
            h.memory_available_bytes,
            h.memory_total_bytes,
            cfg.gpu_memory_utilization,
        ),
        // Unreadable (no /proc): nothing to check against, so nothing is refused.
        None => Device {
            gpu: None,
            name: "host (memory unknown)".into(),
            total_bytes: 0,
            usable_bytes: u64::MAX,
        },
    });
    let have_gpus = devices.iter().any(|d| d.gpu.is_some());
    let mut demands = Vec::with_capacity(cfg.models.len());
    for spec in &cfg.models {
        if matches!(spec.device, Some(DeviceSpec::Cuda(_))) && !have_gpus {
            // No reading of that GPU: opening the device at load says what is wrong.
            continue;
        }
        let shape = model_shape(spec, &catalog, cfg, fetch).await?;
        let b = budget(spec);
        let pin = match (spec.kind, spec.device) {
            // Embedding models run on the CPU.
            (ModelKind::Embedding, _) => Some(Pin::Host),
            (_, Some(DeviceSpec::Cpu)) => Some(Pin::Host),
            // `cuda:N` is a CUDA ordinal; placement counts in NVML indices.
            (_, Some(DeviceSpec::Cuda(n))) => Some(Pin::Gpu(
                ordinals
                    .iter()
                    .find(|&&(_, o)| o as usize == n)
                    .map_or(n as u32, |&(i, _)| i),
            )),
            (_, None) => None,
        };
        demands.push(ModelDemand {
            name: spec.name.clone(),
            origin: shape.origin.clone(),
            quantized: shape.quantized,
            pin,
            on_gpu: shape.estimate(DeviceKind::Gpu, &b),
            on_host: shape.estimate(DeviceKind::Host, &b),
        });
    }
    Ok(AgentPlan {
        plan: flotilla_gpu::plan(devices, &demands),
        probe: probe.kind(),
        ordinals,
        note,
    })
}
