//! Launch glue for `kernels/lru_resolve.cu`: the rounds, lookups and invalidations of
//! `DeviceLru` (`crate::tiered::DeviceLru`) on CUDA. The LRU's state tensors are written
//! through their device addresses (the `DeviceLru` owns them and never shares them);
//! outputs are fresh buffers. Everything is enqueued on the device's stream: no host
//! synchronization, and the launch grids depend only on host-known sizes.

use super::{alloc, cfg, func, launch, ptr, LRU_RESOLVE};
use crate::ops::kernel_consts::LRU_RESOLVE_WARPS;
use crate::ops::lru_resolve::{FastHomes, ResolveOutput, ResolveRequest};
use crate::Result;
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

const OP: &str = "DeviceLru";

/// Sizes of a device LRU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub buckets: usize,
    pub ways: usize,
    pub max_owners: usize,
    pub host_slots: usize,
    pub homes: FastHomes,
}

/// The state tensors of a device LRU (see `DeviceLru`'s fields for shapes and dtypes).
pub(crate) struct Buffers<'a> {
    pub tags: &'a Tensor,
    pub owners: &'a Tensor,
    pub pinned: &'a Tensor,
    pub stamps: &'a Tensor,
    pub resident: &'a Tensor,
    pub resident_snapshot: &'a Tensor,
    pub budgets: &'a Tensor,
    pub last_seen: &'a Tensor,
    pub reuse: &'a Tensor,
    pub counters: &'a Tensor,
    pub head: &'a Tensor,
    pub next: &'a Tensor,
    /// `[4]` u32: clock low, clock high, round, step.
    pub state: &'a Tensor,
}

/// Device address of a contiguous u32 or i64 CUDA tensor.
fn addr(name: &str, t: &Tensor, dt: DType) -> candle_core::Result<u64> {
    if t.dtype() != dt {
        candle_core::bail!("{OP}: {name} must be {dt:?}, got {:?}", t.dtype());
    }
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => ptr(OP, c, l),
        _ => candle_core::bail!("{OP}: {name} {:?} must be on the CUDA device", t.dims()),
    }
}

fn cuda_device(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => candle_core::bail!("{OP}: expected a CUDA tensor, got one on {:?}", d.location()),
    }
}

fn wrap(buf: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>, dev: &CudaDevice, dims: &[usize]) -> Tensor {
    let s = CudaStorage::wrap_cuda_slice(buf, dev.clone());
    Tensor::from_storage(Storage::Cuda(s), dims, BackpropOp::none(), false)
}

/// One round: `lru_link` (one thread per request or owner), then `lru_resolve` (one
/// warp per bucket, its lanes holding the ways; its last block advances the round's clock and number, kept on the
/// device in `b.state`, by `n` and 1), or `lru_advance` for a round of no requests.
pub(crate) fn resolve(b: &Buffers<'_>, req: &ResolveRequest<'_>, g: Geometry) -> Result<ResolveOutput> {
    let n = req.host_slots.dims()[0];
    let dev = cuda_device(b.tags)?;
    let (fast, fp) = alloc::<u32>(&dev, 2 * n)?;
    let (ready, rp) = alloc::<u32>(&dev, 2 * n)?;
    let (fetched, xp) = alloc::<u32>(&dev, 2 * n)?;
    let (spill, sp) = alloc::<u32>(&dev, 2 * n)?;
    let (tiered, tp) = alloc::<u32>(&dev, 2 * n)?;
    let (tsrc, tsp) = alloc::<u32>(&dev, n)?;
    let (miss, mp) = alloc::<u32>(&dev, 2 * n)?;
    let (count, cp) = alloc::<u32>(&dev, 1)?;
    let u = DType::U32;
    let hs = addr("host_slots", req.host_slots, u)?;
    let lp = addr("logical", req.logical, u)?;
    let ow = addr("owners", req.owners, u)?;
    let head = addr("head", b.head, u)?;
    let next = addr("next", b.next, u)?;
    let total = n.max(g.max_owners);
    let link = func(&dev, &LRU_RESOLVE, "lru_link")?;
    launch!(
        link,
        cfg(total.div_ceil(256).min(65535) as u32, 256, 0),
        hs,
        lp,
        ow,
        n as i32,
        g.host_slots as u32,
        g.max_owners as u32,
        g.buckets as u32,
        head,
        next,
        addr("last_seen", b.last_seen, u)?,
        addr("reuse", b.reuse, u)?,
        addr("resident", b.resident, u)?,
        addr("resident_snapshot", b.resident_snapshot, u)?,
        fp,
        rp,
        xp,
        sp,
        tp,
        tsp,
        mp,
        cp,
        addr("state", b.state, u)?,
        req.reuse_steps,
        g.homes.base,
        g.homes.count,
        g.homes.fast_base,
        addr("counters", b.counters, DType::I64)?
    )?;
    if n > 0 {
        let res = func(&dev, &LRU_RESOLVE, "lru_resolve")?;
        launch!(
            res,
            // One warp per bucket with requests (at most n).
            cfg(
                n.min(g.buckets).div_ceil(LRU_RESOLVE_WARPS).min(65535) as u32,
                32 * LRU_RESOLVE_WARPS as u32,
                0
            ),
            hs,
            lp,
            ow,
            head,
            next,
            addr("tags", b.tags, u)?,
            addr("owners", b.owners, u)?,
            addr("pinned", b.pinned, u)?,
            addr("stamps", b.stamps, DType::I64)?,
            addr("resident", b.resident, u)?,
            addr("resident_snapshot", b.resident_snapshot, u)?,
            addr("budgets", b.budgets, u)?,
            fp,
            rp,
            xp,
            sp,
            tp,
            tsp,
            mp,
            cp,
            addr("counters", b.counters, DType::I64)?,
            g.ways as u32,
            addr("state", b.state, u)?,
            n as u32
        )?;
    } else {
        let adv = func(&dev, &LRU_RESOLVE, "lru_advance")?;
        launch!(adv, cfg(1, 32, 0), addr("state", b.state, u)?, n as u32)?;
    }
    Ok(ResolveOutput {
        fast_pairs: wrap(fast, &dev, &[n, 2]),
        ready_pairs: wrap(ready, &dev, &[n, 2]),
        fetched_pairs: wrap(fetched, &dev, &[n, 2]),
        spill_pairs: wrap(spill, &dev, &[n, 2]),
        tiered_pairs: wrap(tiered, &dev, &[n, 2]),
        tiered_src: wrap(tsrc, &dev, &[n]),
        misses: wrap(miss, &dev, &[n, 2]),
        miss_count: wrap(count, &dev, &[1]),
    })
}

/// One round of a direct-mapped fast tier (`lru_direct`): `[n, 2]` (host slot, logical)
/// pairs of the requests with a host slot `< host_slots`, (NONE, NONE) for the rest; the
/// hits are added to `counters[0]` (`[3]` i64, in place).
pub(crate) fn resolve_direct(counters: &Tensor, req: &ResolveRequest<'_>, host_slots: usize) -> Result<Tensor> {
    let n = req.host_slots.dims()[0];
    let dev = cuda_device(counters)?;
    let (fast, fp) = alloc::<u32>(&dev, 2 * n)?;
    if n > 0 {
        let f = func(&dev, &LRU_RESOLVE, "lru_direct")?;
        launch!(
            f,
            cfg(n.div_ceil(256).min(1024) as u32, 256, 0),
            addr("host_slots", req.host_slots, DType::U32)?,
            addr("logical", req.logical, DType::U32)?,
            n as i32,
            host_slots as u32,
            fp,
            addr("counters", counters, DType::I64)?
        )?;
    }
    Ok(wrap(fast, &dev, &[n, 2]))
}

/// `[n]` fast slot of each host slot (one thread per query).
pub(crate) fn lookup(tags: &Tensor, q: &Tensor, g: Geometry) -> Result<Tensor> {
    let n = q.dims()[0];
    let dev = cuda_device(tags)?;
    let (out, op) = alloc::<u32>(&dev, n)?;
    if n > 0 {
        let f = func(&dev, &LRU_RESOLVE, "lru_lookup")?;
        launch!(
            f,
            cfg(n.div_ceil(256).min(65535) as u32, 256, 0),
            addr("host_slots", q, DType::U32)?,
            op,
            n as i32,
            addr("tags", tags, DType::U32)?,
            g.buckets as u32,
            g.ways as u32,
            g.homes.base,
            g.homes.count,
            g.homes.fast_base
        )?;
    }
    Ok(wrap(out, &dev, &[n]))
}

/// Fast-tier destinations of `q` `[n]` (host slots) with rows `rows` `[n]` (one thread each).
pub(crate) fn fast_destinations(
    tags: &Tensor,
    q: &Tensor,
    rows: &Tensor,
    g: Geometry,
    page_size: u32,
) -> Result<Tensor> {
    let n = q.dims()[0];
    let dev = cuda_device(tags)?;
    let (out, op) = alloc::<u32>(&dev, n)?;
    if n > 0 {
        let f = func(&dev, &LRU_RESOLVE, "lru_fast_destinations")?;
        launch!(
            f,
            cfg(n.div_ceil(256).min(65535) as u32, 256, 0),
            addr("host_slots", q, DType::U32)?,
            addr("rows", rows, DType::U32)?,
            op,
            n as i32,
            addr("tags", tags, DType::U32)?,
            g.buckets as u32,
            g.ways as u32,
            page_size,
            g.homes.base,
            g.homes.count,
            g.homes.fast_base
        )?;
    }
    Ok(wrap(out, &dev, &[n]))
}

/// Frees the host slots of `list` (`[n]` u32, one thread per entry).
pub(crate) fn invalidate(b: &Buffers<'_>, list: &Tensor, g: Geometry) -> Result<()> {
    let n = list.dims()[0];
    let dev = cuda_device(b.tags)?;
    let u = DType::U32;
    let f = func(&dev, &LRU_RESOLVE, "lru_invalidate")?;
    launch!(
        f,
        cfg(n.div_ceil(256).min(65535) as u32, 256, 0),
        addr("list", list, u)?,
        n as i32,
        addr("tags", b.tags, u)?,
        addr("owners", b.owners, u)?,
        addr("stamps", b.stamps, DType::I64)?,
        addr("resident", b.resident, u)?,
        addr("last_seen", b.last_seen, u)?,
        g.host_slots as u32,
        g.buckets as u32,
        g.ways as u32
    )?;
    Ok(())
}
