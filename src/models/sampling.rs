//! Next-token sampling: greedy (default), or temperature with optional top-p, seeded;
//! the draw itself is [`ops::sample_rows`](crate::ops::sample_rows).

use crate::Result;
use candle_core::Tensor;

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 299792458,
        }
    }
}

/// A seeded sampler: each draw is [`ops::sample_rows`](crate::ops::sample_rows) on the
/// logits' device, keyed by the seed and this sampler's draw counter (no generator
/// state), so it draws what the serving engine draws for a request with the same
/// settings (`top_k` 0), deterministic across runs and platforms up to float rounding at
/// a cut.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    draws: u32,
}

impl Sampler {
    /// A sampler with `cfg`.
    pub fn new(cfg: SamplingConfig) -> Self {
        Self { cfg, draws: 0 }
    }

    /// The [`SampleRow`](crate::ops::SampleRow) of the next draw.
    fn row(&self) -> crate::ops::SampleRow {
        crate::ops::SampleRow {
            temperature: self.cfg.temperature as f32,
            top_k: 0,
            top_p: self.cfg.top_p as f32,
            seed: self.cfg.seed,
            counter: self.draws,
        }
    }

    /// Picks a token from `logits` `[vocab]` (any float dtype, any device): one kernel
    /// on CUDA, and only the id comes back to the host.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let l = logits.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let n = l.dims1()?;
        let params = crate::ops::sample_params(&[self.row()], l.device())?;
        let id = crate::ops::sample_rows(&l.reshape((1, n))?, &params)?.to_vec1::<u32>()?[0];
        self.draws = self.draws.wrapping_add(1);
        Ok(id)
    }

    /// Picks a token from raw logits (0 for an empty slice).
    pub fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        // Neither step can fail on a non-empty CPU slice.
        match Tensor::from_slice(logits, logits.len(), &candle_core::Device::Cpu) {
            Ok(t) => self.sample(&t).unwrap_or(0),
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(SamplingConfig::default()).sample_slice(&logits), 1);
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let a: Vec<u32> = (0..50)
            .scan(Sampler::new(cfg), |s, _| Some(s.sample_slice(&logits)))
            .collect();
        let b: Vec<u32> = (0..50)
            .scan(Sampler::new(cfg), |s, _| Some(s.sample_slice(&logits)))
            .collect();
        assert_eq!(a, b, "same seed, same tokens");
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-p 0.9 keeps the two likely tokens: {a:?}"
        );
        assert!(a.contains(&1) && a.contains(&2));
    }
}
