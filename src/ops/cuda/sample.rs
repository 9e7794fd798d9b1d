//! Launch glue for `kernels/sample.cu`: [`sample_rows`](crate::ops::sample_rows) on CUDA,
//! one block of 1024 threads per row.

use super::{alloc, cfg, func, launch, ptr, SAMPLE};
use candle_core::{CudaStorage, Layout, Result, Shape};

const OP: &str = "sample_rows";

pub(crate) fn sample_rows(l: &CudaStorage, ll: &Layout, p: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, Shape)> {
    let (b, _) = ll.shape().dims2()?;
    let dev = super::device(l).clone();
    let (out, op) = alloc::<u32>(&dev, b)?;
    launch_rows(l, ll, p, pl, op)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from_dims(&[b])))
}

/// [`sample_rows`] into an existing `[B]` u32 buffer.
pub(crate) fn sample_rows_into(
    o: &mut CudaStorage,
    ol: &Layout,
    l: &CudaStorage,
    ll: &Layout,
    p: &CudaStorage,
    pl: &Layout,
) -> Result<()> {
    launch_rows(l, ll, p, pl, super::ptr_mut(OP, o, ol)?)
}

fn launch_rows(l: &CudaStorage, ll: &Layout, p: &CudaStorage, pl: &Layout, out: u64) -> Result<()> {
    let (b, v) = ll.shape().dims2()?;
    if b > u32::MAX as usize {
        candle_core::bail!("{OP}: {b} rows exceed the launch limit");
    }
    if b == 0 {
        return Ok(());
    }
    let dev = super::device(l).clone();
    let f = func(&dev, &SAMPLE, "sample_rows")?;
    launch!(
        f,
        cfg(b as u32, 1024, 0),
        ptr(OP, l, ll)?,
        ptr(OP, p, pl)?,
        out,
        v as i32
    )
}
