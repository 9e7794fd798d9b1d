//! Launch glue for `kernels/page_table.cu`: the device page-table lookup behind
//! [`page_slots`](crate::meta::page_slots).

use super::{alloc, cfg, func, launch, ptr, PAGE_TABLE};
use candle_core::{CudaStorage, Layout, Result, Shape};

const OP: &str = "page_slots";

/// One thread per query: two dependent loads (directory, leaf).
pub(crate) fn page_slots(
    d: &CudaStorage,
    dl: &Layout,
    l: &CudaStorage,
    ll: &Layout,
    q: &CudaStorage,
    ql: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, max_leaves) = dl.shape().dims2()?;
    let n_leaves = ll.dims()[0];
    let n = ql.dims()[0];
    let dev = super::device(q).clone();
    let (out, op) = alloc::<u32>(&dev, n)?;
    if n > 0 {
        let f = func(&dev, &PAGE_TABLE, "page_slots")?;
        let blocks = n.div_ceil(256).min(65535) as u32;
        launch!(
            f,
            cfg(blocks, 256, 0),
            ptr(OP, d, dl)?,
            ptr(OP, l, ll)?,
            ptr(OP, q, ql)?,
            op,
            n as i32,
            rows as u32,
            max_leaves as u32,
            n_leaves as u32
        )?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from_dims(&[n])))
}
