//! Launch glue for `kernels/infllm.cu`: InfLLM's ring writes, window masses, block
//! finalization, block scores and pages on CUDA (used by the ops of
//! [`crate::ops::infllm`]).

use super::{alloc, cfg3, field_ptr, func, launch, ptr, ptr_mut, suffix, INFLLM};
use crate::ops::infllm::InfLlmGeometry;
use crate::ops::kernel_consts::INFLLM_MAX_GROUP as MAX_GROUP;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

const OP: &str = "infllm";
const THREADS: u32 = 128;

fn grid(op: &str, name: &str, n: usize) -> Result<u32> {
    if n > 65535 {
        candle_core::bail!("{op}: {name} = {n} exceeds the 65535 a grid dimension allows");
    }
    Ok(n as u32)
}

/// The runs table's row count (`[R, 4]`) and device address.
fn runs_ptr(runs: &Tensor) -> Result<(usize, u64)> {
    Ok((runs.dim(0)?, field_ptr(OP, "runs", runs)?))
}

pub(crate) fn ring_keys(r: &mut CudaStorage, rl: &Layout, k: &CudaStorage, kl: &Layout, runs: &Tensor) -> Result<()> {
    let (s, w, h, d) = rl.shape().dims4()?;
    let t = kl.dims()[0];
    let (nr, rp) = runs_ptr(runs)?;
    let name = format!("infllm_ring_keys_{}", suffix(OP, k.dtype())?);
    let (kp, dev) = (ptr(OP, k, kl)?, super::device(k).clone());
    let pp = ptr_mut(OP, r, rl)?;
    let f = func(&dev, &INFLLM, &name)?;
    let cfg = cfg3((grid(OP, "runs", nr)?, grid(OP, "Hkv", h)?, 1), THREADS, 0);
    launch!(f, cfg, pp, kp, rp, s as i32, w as i32, h as i32, d as i32, t as i32)
}

pub(crate) fn ring_meta(
    m: &mut CudaStorage,
    ml: &Layout,
    dst: &CudaStorage,
    dl: &Layout,
    runs: &Tensor,
    page_size: usize,
) -> Result<()> {
    let (s, _, w, h) = ml.shape().dims4()?;
    let t = dl.dims()[0];
    let (nr, rp) = runs_ptr(runs)?;
    let dev = super::device(dst).clone();
    let dp = ptr(OP, dst, dl)?;
    let mp = ptr_mut(OP, m, ml)?;
    let f = func(&dev, &INFLLM, "infllm_ring_meta")?;
    launch!(
        f,
        super::cfg(grid(OP, "runs", nr)?, 256, 0),
        mp,
        dp,
        rp,
        s as i32,
        w as i32,
        h as i32,
        t as i32,
        page_size as u32
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn window_mass(
    m: &mut CudaStorage,
    ml: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    q: &CudaStorage,
    ql: &Layout,
    runs: &Tensor,
    window: usize,
    scale: f32,
    max_n: usize,
) -> Result<()> {
    let (s, w, h, d) = rl.shape().dims4()?;
    let (t, hq, _) = ql.shape().dims3()?;
    let (nr, rp) = runs_ptr(runs)?;
    if max_n == 0 || nr == 0 {
        return Ok(());
    }
    let g = hq / h;
    if g > MAX_GROUP {
        candle_core::bail!("{OP}: {g} query heads per KV head; the CUDA window mass takes at most {MAX_GROUP}");
    }
    let dev = super::device(q).clone();
    let (qp, kp) = (ptr(OP, q, ql)?, ptr(OP, r, rl)?);
    let mp = ptr_mut(OP, m, ml)?;
    let sfx = suffix(OP, q.dtype())?;
    if max_n > 1 {
        // Runs of several tokens: log-sum-exps by a warp per query, then masses by a
        // warp per key, through an `[R, Hkv, max_n, G]` f32 buffer (`run_mass` reads only
        // the entries `run_lse` writes: queries j < n of the runs both kernels skip alike).
        let (lse, lp) = alloc::<f32>(&dev, nr * h * max_n * g)?;
        let z = |n: usize| grid(OP, "run tiles", n.div_ceil(8));
        let args = (
            s as i32,
            w as i32,
            h as i32,
            d as i32,
            hq as i32,
            window as i32,
            scale,
            t as i32,
            max_n as i32,
        );
        let f = func(&dev, &INFLLM, &format!("infllm_run_lse_{sfx}"))?;
        let cfg = cfg3((grid(OP, "runs", nr)?, grid(OP, "Hkv", h)?, z(max_n)?), 256, 0);
        launch!(f, cfg, lp, kp, qp, rp, args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8)?;
        let f = func(&dev, &INFLLM, &format!("infllm_run_mass_{sfx}"))?;
        let cfg = cfg3(
            (grid(OP, "runs", nr)?, grid(OP, "Hkv", h)?, z(max_n + window - 1)?),
            256,
            0,
        );
        launch!(f, cfg, mp, lp, kp, qp, rp, args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8)?;
        drop(lse);
        return Ok(());
    }
    let f = func(&dev, &INFLLM, &format!("infllm_window_mass_{sfx}"))?;
    // Threads per query head: a warp multiple covering the window, G of them <= 1024.
    let tph = window.next_multiple_of(32).min(1024 / g / 32 * 32);
    let smem = (g * d + 64 + g + g * tph) * 4;
    // Scores kept between the two passes where G·window floats fit beside the rest.
    let cached = smem + g * window * 4 <= 48 * 1024;
    let smem = if cached { smem + g * window * 4 } else { smem };
    if smem > 48 * 1024 {
        candle_core::bail!(
            "{OP}: Hq/Hkv·D = {} floats exceed the window mass's 48 KiB of shared memory",
            g * d
        );
    }
    let cfg = cfg3(
        (grid(OP, "runs", nr)?, grid(OP, "Hkv", h)?, 1),
        (g * tph) as u32,
        smem as u32,
    );
    launch!(
        f,
        cfg,
        mp,
        kp,
        qp,
        rp,
        s as i32,
        w as i32,
        h as i32,
        d as i32,
        hq as i32,
        window as i32,
        scale,
        t as i32,
        cached as i32
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize(
    rep: &mut CudaStorage,
    pl: &Layout,
    r: &CudaStorage,
    rl: &Layout,
    m: &CudaStorage,
    ml: &Layout,
    runs: &Tensor,
    geo: &InfLlmGeometry,
    max_n: usize,
) -> Result<()> {
    let (s, w, h, d) = rl.shape().dims4()?;
    let (slots, kpp, _) = pl.shape().dims3()?;
    let (nr, rp) = runs_ptr(runs)?;
    if max_n == 0 || nr == 0 || slots == 0 {
        return Ok(());
    }
    if geo.block > 1024 {
        candle_core::bail!(
            "{OP}: blocks of {} tokens: the CUDA finalize holds at most 1024",
            geo.block
        );
    }
    let dev = super::device(r).clone();
    let name = format!("infllm_finalize_{}", suffix(OP, r.dtype())?);
    let (kp, mp) = (ptr(OP, r, rl)?, ptr(OP, m, ml)?);
    let pp = ptr_mut(OP, rep, pl)?;
    let f = func(&dev, &INFLLM, &name)?;
    let ends = max_n / geo.block + 1;
    let cfg = cfg3(
        (
            grid(OP, "runs", nr)?,
            grid(OP, "Hkv", h)?,
            grid(OP, "blocks per run", ends)?,
        ),
        32,
        0,
    );
    launch!(
        f,
        cfg,
        pp,
        kp,
        mp,
        rp,
        s as i32,
        w as i32,
        h as i32,
        d as i32,
        slots as u32,
        kpp as i32,
        geo.window as i32,
        geo.block as i32,
        geo.repr as i32,
        geo.page_size as i32
    )
}

pub(crate) fn block_scores(
    q: &CudaStorage,
    ql: &Layout,
    rep: &CudaStorage,
    pl: &Layout,
    candidates: &Tensor,
    rows: &Tensor,
    geo: &InfLlmGeometry,
) -> Result<(CudaStorage, Shape)> {
    let (b, hq, d) = ql.shape().dims3()?;
    let (slots, kpp, _) = pl.shape().dims3()?;
    let (_, h, n) = candidates.dims3()?;
    let bp = geo.block_pages();
    let nb = n.div_ceil(bp);
    let dev = super::device(q).clone();
    let (out, op) = alloc::<f32>(&dev, b * nb)?;
    let shape = Shape::from_dims(&[b, nb]);
    let smem = (h * d + 8 * h * geo.repr) * 4;
    if smem > 48 * 1024 {
        candle_core::bail!(
            "infllm_block_scores: Hkv·D = {} floats and 8·Hkv·repr = {} slots exceed the kernel's 48 KiB of shared memory",
            h * d,
            8 * h * geo.repr
        );
    }
    let (qp, pp) = (ptr(OP, q, ql)?, ptr(OP, rep, pl)?);
    let cp = field_ptr(OP, "candidates", candidates)?;
    let rp = field_ptr(OP, "rows", rows)?;
    let f = func(
        &dev,
        &INFLLM,
        &format!("infllm_block_scores_{}", suffix(OP, q.dtype())?),
    )?;
    let cfg = cfg3(
        (grid(OP, "B", b)?, grid(OP, "block tiles", nb.div_ceil(8))?, 1),
        256,
        smem as u32,
    );
    launch!(
        f,
        cfg,
        op,
        qp,
        pp,
        cp,
        rp,
        hq as i32,
        h as i32,
        d as i32,
        n as i32,
        nb as i32,
        slots as u32,
        kpp as i32,
        geo.window as i32,
        geo.block as i32,
        geo.repr as i32,
        bp as i32,
        geo.sink_pages as i32
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

pub(crate) fn pages(
    t: &CudaStorage,
    tl: &Layout,
    rows: &Tensor,
    geo: &InfLlmGeometry,
    hkv: usize,
    width: usize,
) -> Result<(CudaStorage, Shape)> {
    let (b, k) = tl.shape().dims2()?;
    let dev = super::device(t).clone();
    let (out, op) = alloc::<u32>(&dev, b * hkv * width)?;
    let tp = ptr(OP, t, tl)?;
    let rp = field_ptr(OP, "rows", rows)?;
    let smem = (width + 3 * k + 1) * 4;
    if smem > 48 * 1024 {
        candle_core::bail!(
            "infllm_pages: {width} pages per row and {k} blocks exceed the kernel's 48 KiB of shared memory"
        );
    }
    let f = func(&dev, &INFLLM, "infllm_pages")?;
    launch!(
        f,
        super::cfg(b as u32, 128, smem as u32),
        op,
        tp,
        rp,
        b as i32,
        k as i32,
        hkv as i32,
        width as i32,
        geo.page_size as i32,
        geo.window as i32,
        geo.block as i32,
        geo.block_pages() as i32,
        geo.sink_pages as i32
    )?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from_dims(&[b, hkv, width]),
    ))
}

pub(crate) fn mass_add(
    m: &mut CudaStorage,
    ml: &Layout,
    add: &CudaStorage,
    al: &Layout,
    owner: u32,
    first: usize,
) -> Result<()> {
    let (_, _, w, h) = ml.shape().dims4()?;
    let l = al.dims()[0];
    if l * h == 0 {
        return Ok(());
    }
    let dev = super::device(add).clone();
    let ap = ptr(OP, add, al)?;
    let mp = ptr_mut(OP, m, ml)?;
    let f = func(&dev, &INFLLM, "infllm_mass_add")?;
    launch!(
        f,
        super::cfg((l * h).div_ceil(256) as u32, 256, 0),
        mp,
        ap,
        w as i32,
        h as i32,
        l as i32,
        owner,
        (first % w) as u32
    )
}

pub(crate) fn restore(m: &mut CudaStorage, ml: &Layout, owner: u32, start: u32) -> Result<()> {
    let (s, _, w, h) = ml.shape().dims4()?;
    if owner as usize >= s {
        candle_core::bail!("{OP}: owner {owner} out of range ({s} owners)");
    }
    let dev = m.device().clone();
    let mp = ptr_mut(OP, m, ml)?;
    let f = func(&dev, &INFLLM, "infllm_restore")?;
    launch!(f, super::cfg(1, 256, 0), mp, w as i32, h as i32, owner, start)
}
