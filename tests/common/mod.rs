//! Test helpers: seeded random tensors and an independent f64 rotary embedding.
#![allow(dead_code, clippy::needless_range_loop)]

pub mod algo;
pub mod harness;
pub mod shadowkv;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// GPU 0, or `None` (after saying why `test` is skipped) on a machine without one.
/// Without the driver's device nodes, even probing the (stub) driver may crash, so the
/// nodes are checked first.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipping {test}: no /dev/nvidiactl (no GPU)");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping {test}: no CUDA device ({e})");
            None
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard-normal-ish values (sum of uniforms), shape `dims`, f32 on the CPU.
pub fn randn(r: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let s: f32 = (0..4).map(|_| r.random::<f32>()).sum();
            (s - 2.0) * 1.732 * scale
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Rotate-half RoPE in f64, written independently of the crate: `x` `[T, H, D]`,
/// `pos[t]` may be negative (used to plant keys aligned with a query after RoPE).
pub fn rope_f64(x: &Tensor, pos: &[f64], theta: f64) -> Tensor {
    let (t, h, d) = x.dims3().unwrap();
    let xs = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut out = xs.clone();
    let half = d / 2;
    for ti in 0..t {
        for hi in 0..h {
            let base = (ti * h + hi) * d;
            for i in 0..half {
                let f = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
                let (c, s) = ((pos[ti] * f).cos(), (pos[ti] * f).sin());
                let (a, b) = (xs[base + i], xs[base + i + half]);
                out[base + i] = a * c - b * s;
                out[base + i + half] = b * c + a * s;
            }
        }
    }
    Tensor::from_vec(out, (t, h, d), &Device::Cpu).unwrap()
}

/// Max absolute difference of two tensors (as f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den.max(1e-30)
}

/// A tensor's elements as u32, copied to the host (any shape).
pub fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

/// A float tensor's elements as f32, copied to the host (any shape and float dtype).
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Bit patterns of a float tensor in its own dtype (exact comparisons).
pub fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        d => panic!("bits: float tensor expected, got {d:?}"),
    }
}

/// An algorithm that behaves as `inner`, except that its `select` fails on the calls
/// whose numbers (1-based, over the algorithm's lifetime) are in `fail_on`: tests of the
/// failure contract of `attend`.
pub struct FailingSelect {
    pub inner: Box<dyn spinkv::partition::SparseAlgorithm>,
    pub fail_on: Vec<u64>,
    pub calls: u64,
}

impl FailingSelect {
    pub fn new(inner: Box<dyn spinkv::partition::SparseAlgorithm>, fail_on: &[u64]) -> Self {
        Self {
            inner,
            fail_on: fail_on.to_vec(),
            calls: 0,
        }
    }
}

impl spinkv::partition::SparseAlgorithm for FailingSelect {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn partition_pages(&self, page_size: usize) -> usize {
        self.inner.partition_pages(page_size)
    }
    fn init(&mut self, cfg: &spinkv::CacheConfig) -> spinkv::Result<()> {
        self.inner.init(cfg)
    }
    fn index(&mut self, input: &spinkv::partition::IndexInput<'_>) -> spinkv::Result<()> {
        self.inner.index(input)
    }
    fn page_minmax(&self) -> Option<&Tensor> {
        self.inner.page_minmax()
    }
    fn select(&mut self, input: &spinkv::partition::SelectInput<'_>) -> spinkv::Result<spinkv::partition::Selection> {
        self.calls += 1;
        if self.fail_on.contains(&self.calls) {
            return Err(spinkv::Error::Invalid {
                op: "FailingSelect::select",
                msg: format!("injected failure of select call {}", self.calls),
            });
        }
        self.inner.select(input)
    }
    fn materialize(
        &mut self,
        input: &spinkv::partition::MaterializeInput<'_>,
    ) -> spinkv::Result<spinkv::partition::Materialized> {
        self.inner.materialize(input)
    }
    fn materialize_device(
        &mut self,
        layer: usize,
        values: &Tensor,
    ) -> spinkv::Result<Option<spinkv::partition::DeviceRebuilt>> {
        self.inner.materialize_device(layer, values)
    }
    fn rebuilds_keys(&self) -> bool {
        self.inner.rebuilds_keys()
    }
    fn page_size_hint(&self) -> Option<usize> {
        self.inner.page_size_hint()
    }
    fn forget(&mut self, seq: u64) {
        self.inner.forget(seq)
    }
    fn truncate(&mut self, seq: u64, len: usize) {
        self.inner.truncate(seq, len)
    }
    fn commit(&mut self) {
        self.inner.commit()
    }
}

#[cfg(feature = "models")]
pub mod engine;
