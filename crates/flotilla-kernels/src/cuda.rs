//! Launching the kernels on candle CUDA tensors (feature `cuda`).
//!
//! Tensors must be contiguous and on the same CUDA device; every shape and index is
//! checked on the host first ([`PagedBatch`] is validated when built, the tensor shapes
//! here), so a mismatch is an error, never an out-of-bounds access on the GPU. Everything
//! runs on candle's stream for the device, so it is ordered with candle's own ops.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{DType, Device, Storage, Tensor};

use crate::cpu::{AttentionDims, RotaryDims, check_cache};
use crate::{KernelError, PagedBatch, Result, shape_err};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));
}

fn driver(e: impl std::fmt::Display) -> KernelError {
    KernelError::Shape(format!("CUDA driver: {e}"))
}

/// Loaded modules (one per `.cu` file) and the functions looked up in them, per device.
#[derive(Default)]
struct Loaded {
    modules: HashMap<(DeviceId, &'static str), Arc<CudaModule>>,
    functions: HashMap<(DeviceId, &'static str, &'static str), CudaFunction>,
}

/// `flotilla_{name}_{dtype}` from the fatbin of one `.cu` file; the module is loaded once
/// per device and each function looked up once, so a launch costs one map lookup.
fn function(
    dev: &CudaDevice,
    file: &'static str,
    image: &'static [u8],
    name: &'static str,
    dtype: DType,
) -> Result<CudaFunction> {
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => return shape_err(format!("{name}: no kernel for {other:?} (f32, f16, bf16)")),
    };
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .expect("kernel cache");
    if let Some(f) = loaded.functions.get(&(dev.id(), name, suffix)) {
        return Ok(f.clone());
    }
    let module = match loaded.modules.get(&(dev.id(), file)) {
        Some(m) => m.clone(),
        None => {
            let ctx = dev.cuda_stream().context().clone();
            let m = ctx
                .load_module(Ptx::from_binary(image.to_vec()))
                .map_err(driver)?;
            loaded.modules.insert((dev.id(), file), m.clone());
            m
        }
    };
    let f = module
        .load_function(&format!("flotilla_{name}_{suffix}"))
        .map_err(driver)?;
    loaded.functions.insert((dev.id(), name, suffix), f.clone());
    Ok(f)
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => shape_err(format!("expected a CUDA tensor, got one on {other:?}")),
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// The device address of a contiguous tensor's first element.
fn addr(t: &Tensor, dtype: DType, what: &str, stream: &CudaStream) -> Result<u64> {
    if t.dtype() != dtype {
        return shape_err(format!("{what} is {:?}, expected {dtype:?}", t.dtype()));
    }
    if !t.is_contiguous() {
        return shape_err(format!("{what} must be contiguous"));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return shape_err(format!("{what} is not on a CUDA device"));
    };
    let base = slice_addr(cs, dtype, stream)?;
    Ok(base + (layout.start_offset() * dtype.size_in_bytes()) as u64)
}

fn slice_addr(cs: &CudaStorage, dtype: DType, stream: &CudaStream) -> Result<u64> {
    Ok(match dtype {
        DType::F32 => ptr(cs.as_cuda_slice::<f32>()?, stream),
        DType::F16 => ptr(cs.as_cuda_slice::<half::f16>()?, stream),
        DType::BF16 => ptr(cs.as_cuda_slice::<half::bf16>()?, stream),
        DType::U32 => ptr(cs.as_cuda_slice::<u32>()?, stream),
        other => return shape_err(format!("no kernels take {other:?} tensors")),
    })
}

fn same_device(a: &CudaDevice, t: &Tensor, what: &str) -> Result<()> {
    match t.device() {
        Device::Cuda(d) if d.id() == a.id() => Ok(()),
        _ => shape_err(format!("{what} is on another device")),
    }
}

fn i32_of(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| KernelError::Shape(format!("{what} {n} does not fit in i32")))
}

fn threads_for(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Residual add fused with RMSNorm: `x += residual` in place (when given), returns
/// `rms_norm(x) * weight`. `x` is `[rows, hidden]`, `weight` `[hidden]`.
pub fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (rows, hidden) = x.dims2()?;
    if weight.dims() != [hidden] {
        return shape_err(format!(
            "rms norm: weight {:?} for rows of {hidden}",
            weight.dims()
        ));
    }
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            return shape_err(format!(
                "rms norm: residual {:?} vs x {:?}",
                r.dims(),
                x.dims()
            ));
        }
        same_device(&dev, r, "residual")?;
    }
    same_device(&dev, weight, "weight")?;
    let out = Tensor::zeros((rows, hidden), x.dtype(), x.device())?;
    if rows == 0 {
        return Ok(out);
    }
    let stream = dev.cuda_stream();
    let dt = x.dtype();
    let f = function(&dev, "rms_norm", fatbins::RMS_NORM, "add_rms_norm", dt)?;
    let px = addr(x, dt, "x", &stream)?;
    let pr = match residual {
        Some(r) => addr(r, dt, "residual", &stream)?,
        None => 0u64,
    };
    let pw = addr(weight, dt, "weight", &stream)?;
    let po = addr(&out, dt, "out", &stream)?;
    let h = i32_of(hidden, "hidden size")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&px).arg(&pr).arg(&pw).arg(&po).arg(&h).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads_for(hidden.min(1024)), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the kernel's signature (four pointers, int, float);
    // every pointer is a live, contiguous allocation of `rows * hidden` (x, residual, out)
    // or `hidden` (weight) elements of the kernel's type, checked above; the kernel indexes
    // only `[row * hidden, (row + 1) * hidden)` of each. `out` is fresh, so it aliases
    // nothing; x is written only at the indices it is read at.
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(out)
}

/// Rotary embedding in place on `q` `[tokens, q_heads, head_dim]` and `k`
/// `[tokens, kv_heads, head_dim]`; `positions` is u32 `[tokens]` on the device, `cos`/`sin`
/// f32 `[max_position, head_dim / 2]`. `host_positions` are the same positions on the host,
/// to check them against the tables before the launch.
pub fn rotary_inplace(
    q: &Tensor,
    k: &Tensor,
    positions: &Tensor,
    host_positions: &[u32],
    cos: &Tensor,
    sin: &Tensor,
) -> Result<()> {
    let dev = cuda_device(q)?;
    let (t, qh, hd) = q.dims3()?;
    let (tk, kvh, hdk) = k.dims3()?;
    if tk != t || hdk != hd || positions.dims() != [t] || host_positions.len() != t {
        return shape_err(format!(
            "rotary: q {:?}, k {:?}, {} positions",
            q.dims(),
            k.dims(),
            host_positions.len()
        ));
    }
    if cos.dims() != sin.dims() || cos.dims().get(1) != Some(&(hd / 2)) {
        return shape_err(format!(
            "rotary: tables {:?} / {:?} for head_dim {hd}",
            cos.dims(),
            sin.dims()
        ));
    }
    let dims = RotaryDims {
        q_heads: qh,
        kv_heads: kvh,
        head_dim: hd,
    };
    dims.check(
        q.elem_count(),
        k.elem_count(),
        host_positions,
        cos.elem_count(),
    )?;
    for (t, what) in [
        (k, "k"),
        (positions, "positions"),
        (cos, "cos"),
        (sin, "sin"),
    ] {
        same_device(&dev, t, what)?;
    }
    if t == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let dt = q.dtype();
    let f = function(&dev, "rotary", fatbins::ROTARY, "rotary_inplace", dt)?;
    let (pq, pk) = (addr(q, dt, "q", &stream)?, addr(k, dt, "k", &stream)?);
    let pp = addr(positions, DType::U32, "positions", &stream)?;
    let pc = addr(cos, DType::F32, "cos", &stream)?;
    let ps = addr(sin, DType::F32, "sin", &stream)?;
    let (a, b_, c) = (
        i32_of(qh, "heads")?,
        i32_of(kvh, "kv heads")?,
        i32_of(hd, "head dim")?,
    );
    let mut b = stream.launch_builder(&f);
    b.arg(&pq)
        .arg(&pk)
        .arg(&pp)
        .arg(&pc)
        .arg(&ps)
        .arg(&a)
        .arg(&b_)
        .arg(&c);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (threads_for((qh * hd / 2).min(256)), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel (five pointers, three ints); q and k hold
    // `t * heads * head_dim` elements, positions `t` u32 each below the tables' row count
    // (checked on the host copy, which the caller uploaded to `positions`), the tables
    // `rows * head_dim / 2` f32. Each thread reads and writes only its own pair.
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(())
}

/// A [`PagedBatch`] uploaded to the device in one copy:
/// `[slots | positions | query_seq | context_lens | block_tables]`, all u32.
pub struct DeviceBatch {
    host: PagedBatch,
    meta: Tensor,
}

impl DeviceBatch {
    pub fn upload(host: PagedBatch, device: &Device) -> Result<Self> {
        let t = host.tokens();
        let mut all = Vec::with_capacity(4 * t + host.block_tables.len());
        for part in [
            &host.slots,
            &host.positions,
            &host.query_seq,
            &host.context_lens,
            &host.block_tables,
        ] {
            all.extend_from_slice(part);
        }
        let n = all.len();
        let meta = Tensor::from_vec(all, n, device)?;
        Ok(DeviceBatch { host, meta })
    }

    pub fn host(&self) -> &PagedBatch {
        &self.host
    }

    /// The token positions as a device tensor (for [`rotary_inplace`]).
    pub fn positions(&self) -> Result<Tensor> {
        let t = self.host.tokens();
        Ok(self.meta.narrow(0, t, t)?)
    }

    /// Device address of part `i` (0 slots, 1 positions, 2 query_seq, 3 context_lens,
    /// 4 block_tables).
    fn part(&self, i: usize, stream: &CudaStream) -> Result<u64> {
        let base = addr(&self.meta, DType::U32, "batch metadata", stream)?;
        Ok(base + (i * self.host.tokens() * 4) as u64)
    }
}

/// Stores the new tokens' K and V (`[tokens, kv_heads, head_dim]`) into the caches
/// (`[num_blocks, block_size, kv_heads, head_dim]`) at the batch's slots.
pub fn write_kv(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &DeviceBatch,
) -> Result<()> {
    let dev = cuda_device(k)?;
    let host = batch.host();
    let t = host.tokens();
    let width = k.elem_count().checked_div(t).unwrap_or(0);
    if k.dims() != v.dims() || k.dims().first() != Some(&t) {
        return shape_err(format!(
            "write kv: k {:?}, v {:?} for {t} tokens",
            k.dims(),
            v.dims()
        ));
    }
    check_cache(k_cache.elem_count(), v_cache.elem_count(), width, host)?;
    for (x, what) in [(v, "v"), (k_cache, "k cache"), (v_cache, "v cache")] {
        same_device(&dev, x, what)?;
    }
    if t == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let dt = k.dtype();
    let f = function(
        &dev,
        "paged_attention",
        fatbins::PAGED_ATTENTION,
        "write_kv",
        dt,
    )?;
    let (pk, pv) = (addr(k, dt, "k", &stream)?, addr(v, dt, "v", &stream)?);
    let (pkc, pvc) = (
        addr(k_cache, dt, "k cache", &stream)?,
        addr(v_cache, dt, "v cache", &stream)?,
    );
    let slots = batch.part(0, &stream)?;
    let w = i32_of(width, "kv width")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&pk).arg(&pv).arg(&pkc).arg(&pvc).arg(&slots).arg(&w);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (threads_for(width.min(512)), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel (five pointers, int). k and v hold `t * width`
    // elements; every slot is below the cache's `num_blocks * block_size` (the block ids
    // were checked against the cache size), so each write stays inside the caches.
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(())
}

/// Attention of `q` (`[tokens, num_heads, head_dim]`) over the paged caches; returns
/// `[tokens, num_heads, head_dim]` in q's type.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &DeviceBatch,
    dims: AttentionDims,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let host = batch.host();
    dims.check(
        q.elem_count(),
        k_cache.elem_count(),
        v_cache.elem_count(),
        host,
    )?;
    for (x, what) in [(k_cache, "k cache"), (v_cache, "v cache")] {
        same_device(&dev, x, what)?;
    }
    let t = host.tokens();
    let out = Tensor::zeros((t, dims.num_heads, dims.head_dim), q.dtype(), q.device())?;
    if t == 0 {
        return Ok(out);
    }
    let stream = dev.cuda_stream();
    let dt = q.dtype();
    let f = function(
        &dev,
        "paged_attention",
        fatbins::PAGED_ATTENTION,
        "paged_attention",
        dt,
    )?;
    let po = addr(&out, dt, "out", &stream)?;
    let pq = addr(q, dt, "q", &stream)?;
    let (pkc, pvc) = (
        addr(k_cache, dt, "k cache", &stream)?,
        addr(v_cache, dt, "v cache", &stream)?,
    );
    let (tables, qseq, ctx) = (
        batch.part(4, &stream)?,
        batch.part(2, &stream)?,
        batch.part(3, &stream)?,
    );
    let max_blocks = i32_of(host.max_blocks, "blocks per sequence")?;
    let heads = i32_of(dims.num_heads, "heads")?;
    let kv_heads = i32_of(dims.num_kv_heads, "kv heads")?;
    let hd = i32_of(dims.head_dim, "head dim")?;
    let bs = i32_of(host.block_size, "block size")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&po)
        .arg(&pq)
        .arg(&pkc)
        .arg(&pvc)
        .arg(&tables)
        .arg(&max_blocks);
    b.arg(&qseq)
        .arg(&ctx)
        .arg(&heads)
        .arg(&kv_heads)
        .arg(&hd)
        .arg(&bs)
        .arg(&dims.scale);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, dims.num_heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel (five pointers, int, two pointers, four ints, a
    // float); 128 threads are the kernel's four warps. q and out hold `t * heads *
    // head_dim` elements; head_dim <= 256 (the kernel's per-lane arrays) and heads divide
    // by kv heads (checked); every query's context is at most its table's blocks times the
    // block size and every block id is inside the caches (PagedBatch::new, check_cache).
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(out)
}
