//! CUDA backend of the ops (feature `cuda`): the PTX modules that `build.rs` compiles from
//! `kernels/*.cu`, loaded through candle's `CudaDevice::get_or_load_custom_func`, and the
//! launch glue that the ops' `cuda_fwd` methods call.
//!
//! Everything is enqueued on the candle device's stream; no op synchronizes with the host
//! (the only exception is [`topk_indices`](crate::ops::topk_indices) with more than
//! 16384 selected entries per row, which falls back to the CPU).
//!
//! Kernels skip out-of-range slots (where the CPU ops fail with an error) instead of
//! reporting them, since reporting would need a host synchronization.

pub(crate) mod append;
pub(crate) mod attention;
pub(crate) mod graph;
pub(crate) mod infllm;
pub(crate) mod lru;
pub(crate) mod model_ops;
pub(crate) mod page_table;
pub(crate) mod prefill;
pub(crate) mod quest_score;
pub(crate) mod sample;
pub(crate) mod shadowkv;
pub(crate) mod side;
pub(crate) mod tier_copy;
pub(crate) mod topk;

pub use tier_copy::selection_to_pages;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{self as drv, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// A PTX module compiled by `build.rs`.
pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
    /// The kernels it defines (its PTX's `.entry` names).
    pub entries: &'static [&'static str],
    /// Built for `compute_90a` (Hopper's wgmma): it loads only at compute capability 9.0.
    pub sm90a: bool,
}

/// Loads every kernel of every module on `dev` (the driver JIT-compiles each module's
/// PTX on its first load, seconds in all): done once at start, it keeps that cost out
/// of the first step that uses each kernel. Returns the number of kernels loaded.
pub(crate) fn preload(dev: &CudaDevice) -> Result<usize> {
    let mut n = 0;
    for m in MODULES {
        if !module_loadable(dev, m)? {
            continue;
        }
        for e in m.entries {
            dev.get_or_load_custom_func(e, m.name, m.ptx)?;
            n += 1;
        }
    }
    Ok(n)
}

// APPEND, QUEST_SCORE, TOPK, ATTENTION, TIER_COPY, PAGE_TABLE, LRU_RESOLVE, MODEL_OPS, SAMPLE (one per
// entry of build.rs's kernel list) and MODULES, all of them.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

static POISON: AtomicBool = AtomicBool::new(false);
static ATTENTION_WAVES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Tuning knob of the sparse attention kernel: it splits page lists so that the launch
/// fills the GPU `waves` times over (default 1; more splits mean shorter chains per
/// warp but more partial states to merge).
pub fn set_attention_waves(waves: u32) {
    ATTENTION_WAVES.store(waves.max(1), Ordering::Relaxed);
}

static SIDE_COPY_BLOCKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(32);

/// Tuning knob of the overlapped miss fetch: the most blocks the page copy on a
/// [`SideStream`](crate::ops::SideStream) launches (default 32; at least 1). The copy
/// streams over PCIe while the attention runs on the device's stream: a copy with as
/// many blocks as the SMs hold would keep the attention from starting.
pub fn set_side_copy_blocks(blocks: u32) {
    SIDE_COPY_BLOCKS.store(blocks.max(1), Ordering::Relaxed);
}

pub(crate) fn side_copy_blocks() -> u32 {
    SIDE_COPY_BLOCKS.load(Ordering::Relaxed)
}

static PREFILL_WGMMA_ON: AtomicBool = AtomicBool::new(true);

/// Tuning knob of [`prefill_attention`](crate::ops::prefill_attention): with `on` (the
/// default), head dims 64 and 128 run the Hopper kernel (wgmma, `kernels/prefill_wgmma.cu`)
/// where the build targets compute capability 9.0 and the device is one; off, or
/// elsewhere, the mma.sync kernel (`kernels/prefill.cu`) runs. Both give the same results
/// within the op's tolerance.
pub fn set_prefill_wgmma(on: bool) {
    PREFILL_WGMMA_ON.store(on, Ordering::Relaxed);
}

pub(crate) fn prefill_wgmma() -> bool {
    PREFILL_WGMMA_ON.load(Ordering::Relaxed)
}

static PREFILL_PINGPONG: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// When [`prefill_attention`](crate::ops::prefill_attention)'s Hopper kernel runs its
/// two warpgroups in ping-pong (they take turns on the tensor cores, so that one's softmax
/// runs while the other's Q·Kᵀ does: the `prefill_wgmma_pp_*` entries of
/// `kernels/prefill_wgmma.cu`). Same results either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillPingPong {
    /// Where most keys a launch walks are earlier pages
    /// ([`PrefillTiles::mostly_earlier_pages`](crate::ops::PrefillTiles::mostly_earlier_pages)):
    /// measured on the H200 (docs/BENCHMARKS.md, 2026-12-05), ping-pong is 3% faster over
    /// a 128K prompt's 8K chunks and 10% slower over one 128K chunk.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Sets [`PrefillPingPong`] for the process (a tuning knob; [`PrefillPingPong::Auto`] by
/// default).
pub fn set_prefill_pingpong(mode: PrefillPingPong) {
    PREFILL_PINGPONG.store(mode as u8, Ordering::Relaxed);
}

pub(crate) fn prefill_pingpong() -> PrefillPingPong {
    match PREFILL_PINGPONG.load(Ordering::Relaxed) {
        1 => PrefillPingPong::Always,
        2 => PrefillPingPong::Never,
        _ => PrefillPingPong::Auto,
    }
}

/// Compute capability `(major, minor)` of `dev` (cached: one device kind per process).
pub(crate) fn compute_cap(dev: &CudaDevice) -> Result<(i32, i32)> {
    static CAP: OnceLock<(i32, i32)> = OnceLock::new();
    if let Some(c) = CAP.get() {
        return Ok(*c);
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let major = ctx
        .attribute(drv::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(drv::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    let _ = CAP.set((major, minor));
    Ok((major, minor))
}

/// Whether `m`'s PTX can load on `dev`: PTX for an architecture-specific target
/// (`sm_90a`: wgmma) loads only on that exact compute capability.
pub(crate) fn module_loadable(dev: &CudaDevice, m: &Module) -> Result<bool> {
    if m.entries.is_empty() {
        return Ok(false);
    }
    Ok(!m.sm90a || compute_cap(dev)? == (9, 0))
}

static ATTENTION_G8: AtomicBool = AtomicBool::new(true);

/// Tuning knob of the sparse attention kernel: with `on` (the default), GQA groups of at
/// most 8 heads take the kernel variant that keeps only those 8 rows of the tensor-core
/// tiles (fewer registers, 3 resident blocks per SM); off forces the 16-row variant.
pub fn set_attention_g8(on: bool) {
    ATTENTION_G8.store(on, Ordering::Relaxed);
}

pub(crate) fn attention_g8() -> bool {
    ATTENTION_G8.load(Ordering::Relaxed)
}

pub(crate) fn attention_waves() -> usize {
    ATTENTION_WAVES.load(Ordering::Relaxed) as usize
}

/// When on, every output buffer the CUDA ops allocate is filled with `0xFF` bytes (NaN
/// for f32, [`NONE`](crate::ops::NONE) for u32) before the kernel runs, so that tests
/// see any element a kernel fails to write. Off by default (it costs a memset).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// A loaded kernel and the stream it launches on (the candle device's stream).
pub(crate) struct Kernel {
    pub f: drv::CudaFunction,
    pub stream: std::sync::Arc<drv::CudaStream>,
}

impl Kernel {
    pub fn builder(&self) -> drv::LaunchArgs<'_> {
        self.stream.launch_builder(&self.f)
    }
}

/// Loads (once per device) and returns kernel `name` of module `m`.
pub(crate) fn func(dev: &CudaDevice, m: &Module, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, m.name, m.ptx)?.into_cuda_function();
    Ok(Kernel {
        f,
        stream: dev.cuda_stream(),
    })
}

/// Number of streaming multiprocessors of `dev`.
pub(crate) fn sm_count(dev: &CudaDevice) -> Result<u32> {
    static SMS: OnceLock<u32> = OnceLock::new();
    if let Some(n) = SMS.get() {
        return Ok(*n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(drv::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let n = (n.max(1)) as u32;
    let _ = SMS.set(n);
    Ok(n)
}

/// Largest dynamic shared memory a block of `dev` may opt in to, in bytes.
pub(crate) fn max_smem_optin(dev: &CudaDevice) -> Result<usize> {
    static SMEM: OnceLock<usize> = OnceLock::new();
    if let Some(n) = SMEM.get() {
        return Ok(*n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(drv::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    let n = (n.max(48 * 1024)) as usize;
    let _ = SMEM.set(n);
    Ok(n)
}

/// Resident blocks per SM of kernel `name` at `threads` threads (cached per name).
pub(crate) fn occupancy(k: &Kernel, name: &'static str, threads: u32) -> Result<u32> {
    occupancy_smem(k, name, threads, 0)
}

/// Resident blocks per SM of kernel `name` at `threads` threads and `smem` bytes of
/// dynamic shared memory (cached per name).
pub(crate) fn occupancy_smem(k: &Kernel, name: &'static str, threads: u32, smem: usize) -> Result<u32> {
    static OCC: OnceLock<Mutex<HashMap<&'static str, u32>>> = OnceLock::new();
    let map = OCC.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(n) = map
        .lock()
        .map_err(|_| candle_core::Error::Msg("occupancy cache poisoned".into()))?
        .get(name)
    {
        return Ok(*n);
    }
    let n =
        k.f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .w()?
            .max(1);
    map.lock()
        .map_err(|_| candle_core::Error::Msg("occupancy cache poisoned".into()))?
        .insert(name, n);
    Ok(n)
}

fn start_of(op: &str, l: &Layout) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => candle_core::bail!("{op}: operand must be contiguous, got layout {l:?}"),
    }
}

/// Device address of the first element of a contiguous CUDA operand.
pub(crate) fn ptr(op: &str, s: &CudaStorage, l: &Layout) -> Result<u64> {
    address_at(op, s, start_of(op, l)?)
}

/// Device address of the first element of a strided CUDA operand whose last dimension is
/// dense (stride 1); the kernel is given the other strides.
pub(crate) fn strided_ptr(op: &str, s: &CudaStorage, l: &Layout) -> Result<u64> {
    if l.stride().last().is_some_and(|&st| st != 1) {
        candle_core::bail!("{op}: operand's last dimension must be dense, got layout {l:?}");
    }
    address_at(op, s, l.start_offset())
}

/// Device address of element `start` of a CUDA storage.
fn address_at(op: &str, s: &CudaStorage, start: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    macro_rules! p {
        ($t:ty) => {{
            let sl = s.as_cuda_slice::<$t>()?;
            let (p, _sync) = sl.device_ptr(&stream);
            p + (start * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match s.dtype() {
        DType::F32 => p!(f32),
        DType::F16 => p!(half::f16),
        DType::BF16 => p!(half::bf16),
        DType::U32 => p!(u32),
        DType::I64 => p!(i64),
        DType::U8 => p!(u8),
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?} on CUDA"),
    })
}

/// Device address of the first element of a contiguous CUDA operand written in place.
pub(crate) fn ptr_mut(op: &str, s: &mut CudaStorage, l: &Layout) -> Result<u64> {
    let start = start_of(op, l)?;
    let stream = s.device.cuda_stream();
    macro_rules! p {
        ($t:ty) => {{
            let sl = s.as_cuda_slice_mut::<$t>()?;
            let (p, _sync) = sl.device_ptr_mut(&stream);
            p + (start * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match s.dtype() {
        DType::F32 => p!(f32),
        DType::F16 => p!(half::f16),
        DType::BF16 => p!(half::bf16),
        DType::U32 => p!(u32),
        DType::I64 => p!(i64),
        DType::U8 => p!(u8),
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?} on CUDA"),
    })
}

/// Device address of a contiguous u32 index tensor held by an op (it must live on the
/// CUDA device; the op struct keeps the tensor alive while the kernel is enqueued, and
/// candle frees device memory in stream order).
pub(crate) fn field_ptr(op: &str, name: &str, t: &Tensor) -> Result<u64> {
    field_ptr_of(op, name, t, DType::U32)
}

/// [`field_ptr`] for a tensor of `dtype`.
pub(crate) fn field_ptr_of(op: &str, name: &str, t: &Tensor, dtype: DType) -> Result<u64> {
    if t.dtype() != dtype {
        candle_core::bail!("{op}: {name} must be {dtype:?}, got {:?}", t.dtype());
    }
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => ptr(op, c, l),
        _ => candle_core::bail!("{op}: {name} {:?} must be on the CUDA device of the op", t.dims()),
    }
}

/// An uninitialized device buffer of `n` elements (poisoned when
/// [`set_poison_outputs`] is on) and its address.
pub(crate) fn alloc<T: drv::DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<(drv::CudaSlice<T>, u64)> {
    // SAFETY: every kernel that receives the buffer writes all of its elements (tests
    // check this with poisoned buffers).
    let mut buf = unsafe { dev.alloc::<T>(n.max(1))? };
    let stream = dev.cuda_stream();
    let p = {
        let (p, _sync) = buf.device_ptr_mut(&stream);
        p
    };
    if POISON.load(Ordering::Relaxed) {
        // SAFETY: `p` addresses `n.max(1) * size_of::<T>()` bytes owned by `buf`.
        unsafe { drv::result::memset_d8_async(p, 0xff, n.max(1) * std::mem::size_of::<T>(), stream.cu_stream()) }
            .w()?;
    }
    Ok((buf, p))
}

/// An uninitialized `n`-element buffer of `dt` (f32, f16 or bf16) and its address.
pub(crate) fn alloc_as(op: &str, dev: &CudaDevice, dt: DType, n: usize) -> Result<(CudaStorage, u64)> {
    Ok(match dt {
        DType::F32 => {
            let (b, p) = alloc::<f32>(dev, n)?;
            (CudaStorage::wrap_cuda_slice(b, dev.clone()), p)
        }
        DType::F16 => {
            let (b, p) = alloc::<half::f16>(dev, n)?;
            (CudaStorage::wrap_cuda_slice(b, dev.clone()), p)
        }
        DType::BF16 => {
            let (b, p) = alloc::<half::bf16>(dev, n)?;
            (CudaStorage::wrap_cuda_slice(b, dev.clone()), p)
        }
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?}"),
    })
}

/// A launch configuration of a 3-D grid of 1-D blocks.
pub(crate) fn cfg3(grid: (u32, u32, u32), threads: u32, smem: u32) -> drv::LaunchConfig {
    drv::LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// A 1-D launch configuration.
pub(crate) fn cfg(blocks: u32, threads: u32, smem: u32) -> drv::LaunchConfig {
    drv::LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Launches `f` with `cfg`, pushing each argument in order.
macro_rules! launch {
    ($f:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let f = &$f;
        let mut b = f.builder();
        $( let a = $arg; b.arg(&a); )+
        // SAFETY: argument lists match the kernel signatures in kernels/*.cu; every
        // address is a live device buffer of the sizes the kernel is told.
        unsafe { b.launch($cfg) }.w().map(|_| ())
    }};
}
pub(crate) use launch;

/// Word width (16, 4 or 2 bytes) for copying rows of `row_bytes` bytes between the given
/// addresses.
pub(crate) fn word_bytes(row_bytes: usize, ptrs: &[u64]) -> usize {
    let aligned = |w: usize| row_bytes % w == 0 && ptrs.iter().all(|p| p % w as u64 == 0);
    if aligned(16) {
        16
    } else if aligned(4) {
        4
    } else {
        2
    }
}

/// The device of a CUDA storage.
pub(crate) fn device(s: &CudaStorage) -> &CudaDevice {
    &s.device
}

/// Element-size suffix of kernel names.
pub(crate) fn suffix(op: &str, dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?}"),
    })
}
