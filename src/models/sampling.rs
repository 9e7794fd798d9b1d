//! Next-token sampling: greedy (default), or temperature with optional top-p, seeded.

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

/// A seeded sampler (xorshift64*), deterministic across runs and platforms.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    state: u64,
}

impl Sampler {
    /// A sampler with `cfg`.
    pub fn new(cfg: SamplingConfig) -> Self {
        Self {
            cfg,
            state: cfg.seed.max(1),
        }
    }

    fn next_f64(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token from `logits` `[vocab]` f32.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let l = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.sample_slice(&l))
    }

    /// Picks a token from raw logits.
    pub fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0 as u32
        };
        if self.cfg.temperature <= 0.0 || logits.is_empty() {
            return argmax();
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut p: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i, ((x as f64 - m) / self.cfg.temperature).exp()))
            .collect();
        let z: f64 = p.iter().map(|x| x.1).sum();
        p.iter_mut().for_each(|x| x.1 /= z);
        if self.cfg.top_p < 1.0 {
            p.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
            let mut acc = 0.0;
            let keep = p.iter().position(|x| {
                acc += x.1;
                acc >= self.cfg.top_p
            });
            p.truncate(keep.map_or(p.len(), |k| k + 1));
        }
        let total: f64 = p.iter().map(|x| x.1).sum();
        let mut r = self.next_f64() * total;
        for (i, w) in &p {
            r -= w;
            if r <= 0.0 {
                return *i as u32;
            }
        }
        p.last().map_or_else(argmax, |x| x.0 as u32)
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
