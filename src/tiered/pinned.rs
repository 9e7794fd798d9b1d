//! The capacity tier of the GPU cache: a page pool `[slots, 2, P, D]` in page-locked
//! host memory, allocated mapped (`CU_MEMHOSTALLOC_DEVICEMAP | PORTABLE`) so that under
//! unified addressing kernels read it directly. A step's misses are then fetched by one
//! gather launch over any number of scattered pages ([`PinnedPagePool::gather_into`]),
//! instead of one `memcpy` per page; the launch is enqueued on the device's stream and
//! never synchronizes with the host.
//!
//! For a decode step without host synchronization the pool also takes
//! [`gather_counted`](PinnedPagePool::gather_counted) (the number of pairs lives on the
//! device), [`append_rows`](PinnedPagePool::append_rows) (new K/V rows written into the
//! host pages by a kernel) and [`attend`](PinnedPagePool::attend) (sparse paged attention
//! reading pages straight from host memory, for pages the fast tier could not take).

use crate::ops::cuda::attention::{sparse_paged_attention_at, PoolRef};
use crate::ops::cuda::tier_copy::{copy_pages_counted_from, copy_pages_from};
use crate::ops::{util, AttentionPartial, PageList, SideStream};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{self as drv, sys};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Storage, Tensor};

const OP: &str = "PinnedPagePool";

/// Pages in mapped page-locked host memory (see the module docs).
///
/// Every method that writes the pages takes `&mut self` ([`write_pages`](Self::write_pages)
/// from the host, [`append_rows`](Self::append_rows) by a kernel); the `&self` methods
/// only read them (kernels enqueued on the device's stream, or the host after a stream
/// synchronization). Dropping the pool waits for the stream before the memory is freed.
///
/// `Send` and `Sync` are derived from the fields (cudarc's `PinnedHostSlice` and
/// candle's `CudaDevice` are both): no raw pointer is kept. Sharing `&PinnedPagePool`
/// between threads is sound because shared references only read the pages, and kernels
/// that write them are enqueued through `&mut self` on the one stream that every reader
/// also uses (host reads synchronize that stream first), so a read never overlaps a
/// write.
pub struct PinnedPagePool {
    /// The allocation. `ManuallyDrop`: [`Drop`] frees it only after the device's stream
    /// finished every kernel that may still read or write it through `dev_ptr`
    /// (cudarc's own drop waits only for copies cudarc itself enqueued).
    buf: std::mem::ManuallyDrop<drv::PinnedHostSlice<u8>>,
    /// Host address of `buf` (an integer, so the pool holds no raw pointer).
    host_addr: usize,
    dev_ptr: u64,
    slots: usize,
    page_size: usize,
    head_dim: usize,
    dtype: DType,
    device: CudaDevice,
}

impl std::fmt::Debug for PinnedPagePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedPagePool")
            .field("slots", &self.slots)
            .field("page_size", &self.page_size)
            .field("head_dim", &self.head_dim)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Drop for PinnedPagePool {
    fn drop(&mut self) {
        // Kernels enqueued on the stream read and write `buf` through its device address
        // without cudarc knowing: wait for them before the pages are unpinned and freed.
        match self.device.cuda_stream().synchronize() {
            // SAFETY: `buf` is dropped exactly once, here, and never used afterwards.
            Ok(()) => unsafe { std::mem::ManuallyDrop::drop(&mut self.buf) },
            // The stream could not be waited for (a sticky context error): freeing could
            // let a kernel still in flight touch freed memory, so the allocation is leaked
            // and the error recorded on the context (`CudaContext::check_err`).
            Err(e) => self.device.cuda_stream().context().record_err::<()>(Err(e)),
        }
    }
}

impl PinnedPagePool {
    /// A zeroed pool of `slots` pages of `page_size × head_dim` K and V elements in
    /// `dtype` (f32, f16 or bf16), mapped into `device`'s address space.
    pub fn new(device: &Device, slots: usize, page_size: usize, head_dim: usize, dtype: DType) -> Result<Self> {
        let cuda = match device {
            Device::Cuda(c) => c.clone(),
            d => crate::invalid!(OP, "needs a CUDA device, got {:?}", d.location()),
        };
        if !util::FLOAT_DTYPES.contains(&dtype) || slots == 0 || page_size == 0 || head_dim == 0 {
            crate::invalid!(
                OP,
                "slots ({slots}), page_size ({page_size}) and head_dim ({head_dim}) must be >= 1 and dtype \
                 ({dtype:?}) f32, f16 or bf16"
            );
        }
        let Some(bytes) = util::pool_bytes(slots, page_size, head_dim, dtype.size_in_bytes()) else {
            crate::invalid!(
                OP,
                "{slots} slots of [2, {page_size}, {head_dim}] {dtype:?} overflow the size of one allocation \
                 (or {slots} slots exceed the u32 slot ids)"
            );
        };
        let ctx = cuda.cuda_stream().context().clone();
        // SAFETY: the buffer is zeroed below before any use.
        let mut buf = unsafe {
            ctx.alloc_pinned_with_flags::<u8>(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE)
        }
        .map_err(|e| Error::Invalid {
            op: OP,
            msg: format!("cannot pin {bytes} bytes of host memory ({slots} pages): {e:?}"),
        })?;
        buf.as_mut_slice().w()?.fill(0);
        let host = buf.as_mut_ptr().w()?;
        let mut dev_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live mapped pinned allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev_ptr, host as *mut std::ffi::c_void, 0) }
            .result()
            .w()?;
        Ok(Self {
            buf: std::mem::ManuallyDrop::new(buf),
            host_addr: host as usize,
            dev_ptr,
            slots,
            page_size,
            head_dim,
            dtype,
            device: cuda,
        })
    }

    /// Page slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of one page (K and V).
    pub fn page_bytes(&self) -> usize {
        2 * self.page_size * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes pinned.
    pub fn bytes(&self) -> usize {
        self.slots * self.page_bytes()
    }

    /// Host address of the first page (for benchmarks comparing copy methods; writes
    /// through it race with kernels reading the pool).
    pub fn host_ptr(&self) -> *const u8 {
        self.host_addr as *const u8
    }

    fn check_slots(&self, slots: &[u32]) -> Result<()> {
        if let Some(&s) = slots.iter().find(|&&s| s as usize >= self.slots) {
            crate::invalid!(OP, "slot {s} out of range ({} slots)", self.slots);
        }
        Ok(())
    }

    /// Writes whole pages from the host: `pages` `[n, 2, P, D]` (any device, the pool's
    /// dtype) into `slots` (`n` entries). Waits for the device's pending work first.
    pub fn write_pages(&mut self, slots: &[u32], pages: &Tensor) -> Result<()> {
        let want = [slots.len(), 2, self.page_size, self.head_dim];
        if pages.dims() != want || pages.dtype() != self.dtype {
            crate::invalid!(
                OP,
                "write_pages: pages {:?} {:?}, expected {want:?} {:?}",
                pages.dims(),
                pages.dtype(),
                self.dtype
            );
        }
        self.check_slots(slots)?;
        let bytes = tensor_bytes(&pages.to_device(&Device::Cpu)?)?;
        self.device.cuda_stream().synchronize().w()?;
        let pb = self.page_bytes();
        let dst = self.buf.as_mut_slice().w()?;
        for (i, &s) in slots.iter().enumerate() {
            dst[s as usize * pb..][..pb].copy_from_slice(&bytes[i * pb..][..pb]);
        }
        Ok(())
    }

    /// Reads whole pages to the CPU: `[n, 2, P, D]`. Waits for the device's pending work.
    pub fn read_pages(&self, slots: &[u32]) -> Result<Tensor> {
        self.check_slots(slots)?;
        self.device.cuda_stream().synchronize().w()?;
        let pb = self.page_bytes();
        let src = self.buf.as_slice().w()?;
        let mut out = Vec::with_capacity(slots.len() * pb);
        for &s in slots {
            out.extend_from_slice(&src[s as usize * pb..][..pb]);
        }
        let shape = (slots.len(), 2, self.page_size, self.head_dim);
        Ok(Tensor::from_raw_buffer(
            &out,
            self.dtype,
            &[shape.0, shape.1, shape.2, shape.3],
            &Device::Cpu,
        )?)
    }

    /// Gathers pages into a fast-tier pool on the GPU in one launch:
    /// `fast[pairs[i, 1]] = self[pairs[i, 0]]`.
    ///
    /// * `fast` — `[fast_slots, 2, P, D]` on this pool's device, same dtype.
    /// * `pairs` — `[n, 2]` u32 `(host slot, fast slot)` on the device; out-of-range
    ///   pairs are skipped by the kernel (checking them would need a host sync).
    pub fn gather_into(&self, fast: &Tensor, pairs: &Tensor) -> Result<()> {
        let fast_slots = fast.dims().first().copied().unwrap_or(0);
        if fast.dims() != [fast_slots, 2, self.page_size, self.head_dim] || fast.dtype() != self.dtype {
            crate::invalid!(
                OP,
                "gather_into: fast pool {:?} {:?} must be [slots, 2, {}, {}] {:?}",
                fast.dims(),
                fast.dtype(),
                self.page_size,
                self.head_dim,
                self.dtype
            );
        }
        util::check_shape(OP, "pairs", pairs, &[None, Some(2)], "[n, 2]")?;
        util::check_dtype(OP, "pairs", pairs, &[DType::U32])?;
        util::check_contiguous(OP, &[("fast", fast), ("pairs", pairs)])?;
        if !fast.device().same_device(&Device::Cuda(self.device.clone())) || !pairs.device().same_device(fast.device())
        {
            crate::invalid!(OP, "gather_into: fast pool and pairs must be on the pool's CUDA device");
        }
        if pairs.dims()[0] == 0 {
            return Ok(());
        }
        fast.inplace_op1(&Gather {
            src: self.dev_ptr,
            slots: self.slots,
            pairs: pairs.clone(),
        })?;
        Ok(())
    }

    /// [`gather_into`](Self::gather_into) with the number of pairs on the device:
    /// `fast[pairs[i, 1]] = self[pairs[i, 0]]` for `i < count[0]`.
    ///
    /// * `fast` — `[fast_slots, 2, P, D]` on this pool's device, same dtype.
    /// * `pairs` — `[cap, 2]` u32 `(host slot, fast slot)` on the device; rows from
    ///   `count[0]` on are ignored (may hold garbage), out-of-range pairs are skipped.
    /// * `count` — `[1]` u32 on the device, e.g. written by a GPU resolve kernel.
    ///
    /// The launch grid depends on `cap` only; the kernel reads the count, so nothing is
    /// read back to the host.
    pub fn gather_counted(&self, fast: &Tensor, pairs: &Tensor, count: &Tensor) -> Result<()> {
        self.gather_counted_impl(fast, pairs, count, None)
    }

    fn gather_counted_impl(
        &self,
        fast: &Tensor,
        pairs: &Tensor,
        count: &Tensor,
        side: Option<&SideStream>,
    ) -> Result<()> {
        const GC: &str = "PinnedPagePool::gather_counted";
        self.check_fast(GC, fast)?;
        util::check_shape(GC, "pairs", pairs, &[None, Some(2)], "[cap, 2]")?;
        util::check_shape(GC, "count", count, &[Some(1)], "[1]")?;
        util::check_dtype(GC, "pairs", pairs, &[DType::U32])?;
        util::check_dtype(GC, "count", count, &[DType::U32])?;
        util::check_contiguous(GC, &[("fast", fast), ("pairs", pairs), ("count", count)])?;
        util::check_device(GC, &self.cuda(), &[("fast", fast), ("pairs", pairs), ("count", count)])?;
        if pairs.dims()[0] == 0 {
            return Ok(());
        }
        fast.inplace_op1(&GatherCounted {
            src: self.dev_ptr,
            slots: self.slots,
            pairs: pairs.clone(),
            count: count.clone(),
            stream: side.map(|s| s.inner.stream().clone()),
        })?;
        Ok(())
    }

    /// [`gather_counted`](Self::gather_counted) enqueued on `side` (a side stream of this
    /// pool's device, already [forked](SideStream::fork)): the copy runs concurrently with
    /// the device's stream until the caller [joins](SideStream::join) `side`. Until then
    /// the caller must not touch the destination slots of `pairs` on the device's stream,
    /// nor free `fast`, `pairs` or `count`.
    pub fn gather_counted_on(&self, fast: &Tensor, pairs: &Tensor, count: &Tensor, side: &SideStream) -> Result<()> {
        if !Device::Cuda(side.inner.device().clone()).same_device(&self.cuda()) {
            crate::invalid!(
                "PinnedPagePool::gather_counted_on",
                "the side stream belongs to another device than the pool's {:?}",
                self.cuda().location()
            );
        }
        self.gather_counted_impl(fast, pairs, count, Some(side))
    }

    /// Writes new K/V rows into the host pages by a kernel (the paged append of
    /// [`paged_append`](crate::ops::paged_append), through the pool's device address):
    /// `self[slot, 0|1, row] = k|v[t, h]` for every `dst[t, h] = slot * P + row`.
    ///
    /// * `k`, `v` — `[T, Hkv, D]` on this pool's device, the pool's dtype.
    /// * `dst` — `[T, Hkv]` u32 on the device; [`NONE`](crate::ops::NONE) skips an entry,
    ///   slots `>= slots()` are skipped by the kernel (checking needs a host sync).
    ///
    /// The writes are enqueued on the device's stream; host reads
    /// ([`read_pages`](Self::read_pages)) synchronize first.
    pub fn append_rows(&mut self, k: &Tensor, v: &Tensor, dst: &Tensor) -> Result<()> {
        const AR: &str = "PinnedPagePool::append_rows";
        let d = self.head_dim;
        util::check_shape(AR, "k", k, &[None, None, Some(d)], &format!("[T, Hkv, {d}]"))?;
        let (t, h, _) = k.dims3()?;
        util::check_shape(
            AR,
            "v",
            v,
            &[Some(t), Some(h), Some(d)],
            &format!("[{t}, {h}, {d}] like k"),
        )?;
        util::check_shape(AR, "dst", dst, &[Some(t), Some(h)], &format!("[{t}, {h}]"))?;
        util::check_dtype(AR, "k", k, &[self.dtype])?;
        util::check_dtype(AR, "v", v, &[self.dtype])?;
        util::check_dtype(AR, "dst", dst, &[DType::U32])?;
        util::check_device(AR, &self.cuda(), &[("k", k), ("v", v), ("dst", dst)])?;
        util::check_contiguous(AR, &[("k", k), ("v", v), ("dst", dst)])?;
        if t * h == 0 {
            return Ok(());
        }
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        match (&*ks, &*vs) {
            (Storage::Cuda(kc), Storage::Cuda(vc)) => crate::ops::cuda::append::paged_append_to(
                self.dev_ptr,
                self.slots,
                self.page_size,
                d,
                kc,
                kl,
                vc,
                vl,
                dst,
            )?,
            _ => crate::invalid!(AR, "k and v must be on the pool's CUDA device"),
        }
        Ok(())
    }

    /// [`sparse_paged_attention`](crate::ops::sparse_paged_attention) over this pool: the
    /// same kernels, reading the listed pages straight from mapped host memory (for pages
    /// the fast tier could not take this step). Merge the result with the fast tier's
    /// partial by [`merge_partials`](crate::ops::merge_partials).
    ///
    /// * `q` — `[T, Hq, D]` on this pool's device, the pool's dtype and head dim.
    /// * `list` — `pages` `[S, Hkv, N, 2]` `(host slot, logical page)`, `queries` `[T, 2]`,
    ///   `kv_limit` `[S]`, all u32 on the device.
    ///
    /// Returns `out` `[T, Hq, D]` f32 and `lse` `[T, Hq]` f32
    /// ([`EMPTY_LSE`](crate::ops::EMPTY_LSE) where nothing was attended).
    pub fn attend(&self, q: &Tensor, list: &PageList, scale: f32) -> Result<AttentionPartial> {
        crate::ops::attention::check_query_and_list(q, list, &self.cuda())?;
        let (t, hq, d) = q.dims3()?;
        if d != self.head_dim || q.dtype() != self.dtype {
            crate::invalid!(
                OP,
                "attend: q {:?} {:?} must have head_dim {} and dtype {:?}",
                q.dims(),
                q.dtype(),
                self.head_dim,
                self.dtype
            );
        }
        if t == 0 {
            return crate::ops::attention::empty_partial(q);
        }
        let packed = q.apply_op1_no_bwd(&PinnedAttention {
            pool: PoolRef {
                ptr: self.dev_ptr,
                slots: self.slots,
                page_size: self.page_size,
                head_dim: self.head_dim,
            },
            list: list.clone(),
            scale,
        })?;
        crate::ops::attention::unpack(&packed, t, hq, d)
    }

    /// [`ops::tiered_paged_attention`](crate::ops::tiered_paged_attention) with this pool
    /// as the host tier: one fused launch that attends each entry from `fast`
    /// `[fast_slots, 2, P, D]` or from these pages (`src` `[S, Hkv, N]` u32, NONE: the
    /// fast slot) and fills the entries that name both into `fast` (written).
    /// Fails where no fused kernel fits (see
    /// [`ops::tiered_attention_fused`](crate::ops::tiered_attention_fused)).
    pub fn attend_tiered(
        &self,
        q: &Tensor,
        fast: &Tensor,
        list: &PageList,
        src: &Tensor,
        scale: f32,
    ) -> Result<AttentionPartial> {
        const TOP: &str = "PinnedPagePool::attend_tiered";
        crate::ops::tiered_attention::check(q, fast, list, src)?;
        self.check_fast(TOP, fast)?;
        if !crate::ops::tiered_attention::fused_fits(q, list.pages.dims()[1]) {
            crate::invalid!(
                TOP,
                "no fused kernel for q {:?} {:?} (bf16/f16, head dim 64 or 128, at most 16 query heads per KV head)",
                q.dims(),
                q.dtype()
            );
        }
        if q.dims()[0] == 0 {
            return crate::ops::attention::empty_partial(q);
        }
        let host = PoolRef {
            ptr: self.dev_ptr,
            slots: self.slots,
            page_size: self.page_size,
            head_dim: self.head_dim,
        };
        crate::ops::tiered_attention::fused(q, fast, host, list, src, scale)
    }

    fn cuda(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    fn check_fast(&self, op: &'static str, fast: &Tensor) -> Result<()> {
        let fast_slots = fast.dims().first().copied().unwrap_or(0);
        if fast.dims() != [fast_slots, 2, self.page_size, self.head_dim] || fast.dtype() != self.dtype {
            crate::invalid!(
                op,
                "fast pool {:?} {:?} must be [slots, 2, {}, {}] {:?}",
                fast.dims(),
                fast.dtype(),
                self.page_size,
                self.head_dim,
                self.dtype
            );
        }
        Ok(())
    }
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&t.to_vec1::<f32>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&t.to_vec1::<half::f16>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&t.to_vec1::<half::bf16>()?).to_vec(),
        dt => crate::invalid!(OP, "unsupported dtype {dt:?}"),
    })
}

struct Gather {
    src: u64,
    slots: usize,
    pairs: Tensor,
}

impl InplaceOp1 for Gather {
    fn name(&self) -> &'static str {
        "pinned_gather"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("pinned_gather: the fast pool must be on the CUDA device")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, dl: &Layout) -> candle_core::Result<()> {
        copy_pages_from(dst, dl, self.src, self.slots, &self.pairs)
    }
}

struct GatherCounted {
    src: u64,
    slots: usize,
    pairs: Tensor,
    count: Tensor,
    /// A side stream to launch on (else the device's stream).
    stream: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

impl InplaceOp1 for GatherCounted {
    fn name(&self) -> &'static str {
        "pinned_gather_counted"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("pinned_gather_counted: the fast pool must be on the CUDA device")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, dl: &Layout) -> candle_core::Result<()> {
        copy_pages_counted_from(
            dst,
            dl,
            self.src,
            self.slots,
            &self.pairs,
            &self.count,
            self.stream.as_ref(),
        )
    }
}

struct PinnedAttention {
    pool: PoolRef,
    list: PageList,
    scale: f32,
}

impl CustomOp1 for PinnedAttention {
    fn name(&self) -> &'static str {
        "pinned_sparse_paged_attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("pinned_sparse_paged_attention: q must be on the CUDA device")
    }

    fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        sparse_paged_attention_at(q, ql, self.pool, &self.list, self.scale)
    }
}
