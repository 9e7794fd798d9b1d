//! One token drawn per row of logits on the logits' device ([`sample_rows`]), with the
//! randomness a pure function of (seed, counter, token index): no generator state lives
//! anywhere, so a captured decode step can end with its sampled ids, and a request draws
//! the same tokens in any batch and on any path. `cpu_fwd` is the reference;
//! `cuda_fwd` launches `kernels/sample.cu` (one block per row).
//!
//! Per row: greedy (temperature `<= 0`, or `top_k == 1`) takes the first index of the
//! largest logit. Otherwise `z = logit · (1 / temperature)` (f32); `top_k > 0` keeps the
//! tokens with `z >=` the k-th largest `z`; `top_p < 1` then keeps the tokens with `z >=`
//! the `z` at which the softmax mass of the kept tokens, summed from the largest down,
//! first reaches `top_p` (ties at both cuts kept); the token is the argmax over the kept
//! ones of `z + g`, with Gumbel noise `g = −ln(−ln u)` (f64) and `u` from a SplitMix64
//! hash of (seed, counter, index): a draw from the kept tokens' renormalized softmax.
//! NaN logits are never drawn. The two backends agree except where rounding moves a
//! token across a cut or two scores tie to the last bit.

use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp3, Layout, Shape, Tensor};

const OP: &str = "sample_rows";

/// u32 words per row of the params tensor of [`sample_rows`].
pub const SAMPLE_PARAM_WORDS: usize = 6;

/// How one row is sampled (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    /// `<= 0`: greedy.
    pub temperature: f32,
    /// 0: no top-k cut.
    pub top_k: u32,
    /// `>= 1`: no top-p cut.
    pub top_p: f32,
    /// The request's seed.
    pub seed: u64,
    /// The draw's number within its request (the noise differs per counter).
    pub counter: u32,
}

impl SampleRow {
    /// The row's params words, in the layout the kernel reads.
    pub fn words(&self) -> [u32; SAMPLE_PARAM_WORDS] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.counter,
        ]
    }

    fn from_words(w: &[u32]) -> Self {
        Self {
            temperature: f32::from_bits(w[0]),
            top_k: w[1],
            top_p: f32::from_bits(w[2]),
            seed: w[3] as u64 | (w[4] as u64) << 32,
            counter: w[5],
        }
    }

    fn greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }
}

/// `[B, 6]` u32 params of `rows` on `device` (see [`SampleRow::words`]).
pub fn sample_params(rows: &[SampleRow], device: &candle_core::Device) -> Result<Tensor> {
    let words: Vec<u32> = rows.iter().flat_map(|r| r.words()).collect();
    Ok(Tensor::from_vec(words, (rows.len(), SAMPLE_PARAM_WORDS), device)?)
}

/// One token id per row of `logits` `[B, V]` f32, drawn by `params` `[B, 6]` u32 (one
/// [`SampleRow`] per row, see [`sample_params`]); returns `[B]` u32. Runs on the logits'
/// device; nothing is copied to the host.
pub fn sample_rows(logits: &Tensor, params: &Tensor) -> Result<Tensor> {
    let b = check(logits, params)?;
    if b == 0 {
        return Ok(Tensor::zeros(0, DType::U32, logits.device())?);
    }
    Ok(logits
        .contiguous()?
        .apply_op2_no_bwd(&params.contiguous()?, &SampleRows)?)
}

/// [`sample_rows`] written into `out` `[B]` u32 (contiguous, on the logits' device) in
/// place: a step captured in a CUDA graph samples into a buffer allocated before the
/// capture, so that the graph keeps no allocation of its own alive across replays.
pub fn sample_rows_into(logits: &Tensor, params: &Tensor, out: &Tensor) -> Result<()> {
    let b = check(logits, params)?;
    if out.dims() != [b] || out.dtype() != DType::U32 || !out.is_contiguous() {
        crate::invalid!(
            OP,
            "out must be contiguous u32 [{b}] for logits {:?}, got {:?} {:?}",
            logits.dims(),
            out.dims(),
            out.dtype()
        );
    }
    if !out.device().same_device(logits.device()) {
        crate::invalid!(OP, "out must be on the logits' device");
    }
    if b > 0 {
        out.inplace_op3(&logits.contiguous()?, &params.contiguous()?, &SampleRows)?;
    }
    Ok(())
}

/// Validates [`sample_rows`]' operands; returns B.
fn check(logits: &Tensor, params: &Tensor) -> Result<usize> {
    let (b, v) = logits.dims2().unwrap_or((usize::MAX, 0));
    let ok = b != usize::MAX
        && v > 0
        && v <= i32::MAX as usize
        && logits.dtype() == DType::F32
        && params.dims() == [b, SAMPLE_PARAM_WORDS]
        && params.dtype() == DType::U32;
    if !ok {
        crate::invalid!(
            OP,
            "logits must be f32 [B, V] (V >= 1) and params u32 [B, {SAMPLE_PARAM_WORDS}]: got logits {:?} {:?}, \
             params {:?} {:?}",
            logits.dims(),
            logits.dtype(),
            params.dims(),
            params.dtype()
        );
    }
    if !logits.device().same_device(params.device()) {
        crate::invalid!(OP, "logits and params must be on one device");
    }
    Ok(b)
}

struct SampleRows;

/// SplitMix64's output function.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The uniform in (0, 1) of token `i` for (seed, counter).
fn uniform(seed: u64, counter: u32, i: usize) -> f64 {
    let base = splitmix(seed ^ splitmix(counter as u64));
    let h = splitmix(base.wrapping_add(i as u64));
    ((h >> 11) as f64 + 0.5) * 2f64.powi(-53)
}

/// The reference draw of one row (see the module docs).
fn sample_one(l: &[f32], p: &SampleRow) -> u32 {
    let mut best: Option<(f64, usize)> = None;
    let mut offer = |score: f64, i: usize| {
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    };
    if p.greedy() {
        for (i, &x) in l.iter().enumerate().filter(|(_, x)| !x.is_nan()) {
            offer(x as f64, i);
        }
        return best.map_or(0, |(_, i)| i as u32);
    }
    let inv_t = 1.0f32 / p.temperature;
    let z: Vec<f32> = l.iter().map(|&x| x * inv_t).collect();
    let mut sorted: Vec<f32> = z.iter().copied().filter(|x| !x.is_nan()).collect();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut floor = f32::NEG_INFINITY;
    if p.top_k > 0 && (p.top_k as usize) < z.len() {
        if let Some(&kth) = sorted.get(p.top_k as usize - 1) {
            floor = kth;
        }
    }
    if p.top_p < 1.0 {
        let m = sorted.first().copied().unwrap_or(0.0);
        let kept: Vec<f32> = sorted.iter().copied().filter(|&x| x >= floor).collect();
        let mass: Vec<f64> = kept.iter().map(|&x| (x - m).exp() as f64).collect();
        let target = p.top_p as f64 * mass.iter().sum::<f64>();
        let mut c = 0.0;
        for (x, w) in kept.iter().zip(&mass) {
            c += w;
            if *w > 0.0 && c >= target {
                floor = floor.max(*x);
                break;
            }
        }
    }
    for (i, &x) in z.iter().enumerate() {
        if x.is_nan() || x < floor || x == f32::NEG_INFINITY {
            continue;
        }
        offer(x as f64 - (-uniform(p.seed, p.counter, i).ln()).ln(), i);
    }
    best.map_or(0, |(_, i)| i as u32)
}

/// The reference draws of every row.
fn sample_cpu(l: &CpuStorage, ll: &Layout, p: &CpuStorage, pl: &Layout) -> candle_core::Result<Vec<u32>> {
    let logits = super::util::float_values(OP, l, ll)?;
    let params = super::util::u32_slice(OP, p, pl)?;
    let (b, v) = ll.shape().dims2()?;
    Ok((0..b)
        .map(|r| {
            let row = SampleRow::from_words(&params[r * SAMPLE_PARAM_WORDS..][..SAMPLE_PARAM_WORDS]);
            sample_one(&logits[r * v..][..v], &row)
        })
        .collect())
}

impl InplaceOp3 for SampleRows {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        o: &mut CpuStorage,
        ol: &Layout,
        l: &CpuStorage,
        ll: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let ids = sample_cpu(l, ll, p, pl)?;
        match (o, ol.contiguous_offsets()) {
            (CpuStorage::U32(o), Some((a, _))) => o[a..a + ids.len()].copy_from_slice(&ids),
            _ => candle_core::bail!("{OP}: out must be contiguous u32"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        o: &mut candle_core::CudaStorage,
        ol: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::sample::sample_rows_into(o, ol, l, ll, p, pl)
    }
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        l: &CpuStorage,
        ll: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = sample_cpu(l, ll, p, pl)?;
        let b = out.len();
        Ok((CpuStorage::U32(out), Shape::from_dims(&[b])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::sample::sample_rows(l, ll, p, pl)
    }
}
