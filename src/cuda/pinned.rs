//! The capacity tier of the GPU cache: a page pool `[slots, 2, P, D]` in page-locked
//! host memory, allocated mapped (`CU_MEMHOSTALLOC_DEVICEMAP | PORTABLE`) so that under
//! unified addressing kernels read it directly. A step's misses are then fetched by one
//! gather launch over any number of scattered pages ([`PinnedPagePool::gather_into`]),
//! instead of one `memcpy` per page; the launch is enqueued on the device's stream and
//! never synchronizes with the host.

use super::tier_copy::copy_pages_from;
use crate::ops::util;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{self as drv, sys};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};

const OP: &str = "PinnedPagePool";

/// Pages in mapped page-locked host memory (see the module docs).
pub struct PinnedPagePool {
    buf: drv::PinnedHostSlice<u8>,
    buf_ptr: *const u8,
    dev_ptr: u64,
    slots: usize,
    page_size: usize,
    head_dim: usize,
    dtype: DType,
    device: CudaDevice,
}

// SAFETY: the raw pointer is the pinned allocation owned by `buf`, which is Send + Sync.
unsafe impl Send for PinnedPagePool {}
unsafe impl Sync for PinnedPagePool {}

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
        let bytes = slots * 2 * page_size * head_dim * dtype.size_in_bytes();
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
            buf,
            buf_ptr: host as *const u8,
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
        self.buf_ptr
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
