//! Synthetic selection traces with controlled reuse: each request keeps, per layer and
//! KV head, a sink page, a two-page local window that moves as the context grows, and a
//! hot set of retrieved pages of which a fraction `drift` is replaced by random pages each
//! step (0 = the same pages every step, 1 = a fresh random set: a scan).

use super::{LayerSelection, RequestTrace};

/// Shape and behaviour of one synthetic request.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Label.
    pub name: String,
    /// Layers.
    pub layers: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Pages of context at the first decode step.
    pub context_pages: u32,
    /// Decode steps.
    pub steps: usize,
    /// Pages selected per head and step (sink and window included).
    pub selected_pages: usize,
    /// Fraction of the retrieved pages replaced each step.
    pub drift: f64,
    /// Decode steps per new page (the page size).
    pub page_tokens: u32,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n.max(1) as u64) as u32
    }
}

/// The trace of one synthetic request.
pub fn generate(spec: &SyntheticSpec, seed: u64) -> RequestTrace {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let retrieved = spec.selected_pages.saturating_sub(3);
    let dirs = (spec.layers * spec.kv_heads) as usize;
    // Hot sets per direction, drawn from the middle pages [1, n - 2).
    let middle = spec.context_pages.saturating_sub(3).max(1);
    let mut hot: Vec<Vec<u32>> = (0..dirs)
        .map(|_| (0..retrieved).map(|_| 1 + rng.below(middle)).collect())
        .collect();
    let mut steps = Vec::with_capacity(spec.steps);
    for t in 0..spec.steps {
        let n = spec.context_pages + t as u32 / spec.page_tokens.max(1);
        let middle = n.saturating_sub(3).max(1);
        let mut layers = Vec::with_capacity(spec.layers as usize);
        for layer in 0..spec.layers {
            let mut heads = Vec::with_capacity(spec.kv_heads as usize);
            for h in 0..spec.kv_heads {
                let set = &mut hot[(layer * spec.kv_heads + h) as usize];
                for p in set.iter_mut() {
                    if rng.unit() < spec.drift {
                        *p = 1 + rng.below(middle);
                    }
                }
                let mut pages: Vec<u32> = vec![0, n.saturating_sub(2), n.saturating_sub(1)];
                pages.extend(set.iter().copied());
                pages.sort_unstable();
                pages.dedup();
                heads.push(pages);
            }
            layers.push(LayerSelection { layer, heads });
        }
        steps.push(layers);
    }
    RequestTrace {
        name: spec.name.clone(),
        dirs: dirs as u32,
        kv_heads: spec.kv_heads,
        steps,
    }
}

/// A mixed batch of `n` requests: one in four *focused* (2% drift: a stable working set,
/// 64 pages per head), the others *scanning* (100% drift, 32 pages per head), with
/// contexts from 256 to 2048 pages, 4 layers × 2 KV heads, 64 decode steps.
pub fn mixed_workload(n: usize, seed: u64) -> Vec<RequestTrace> {
    (0..n)
        .map(|i| {
            let focused = i % 4 == 0;
            let spec = SyntheticSpec {
                name: format!("{}{i}", if focused { "focused" } else { "scan" }),
                layers: 4,
                kv_heads: 2,
                context_pages: 256 << (i % 4),
                steps: 64,
                selected_pages: if focused { 64 } else { 32 },
                drift: if focused { 0.02 } else { 1.0 },
                page_tokens: 16,
            };
            generate(&spec, seed + i as u64)
        })
        .collect()
}

/// `n` requests that all behave alike (drift `drift`), contexts 256 to 2048 pages.
pub fn uniform_workload(n: usize, drift: f64, seed: u64) -> Vec<RequestTrace> {
    (0..n)
        .map(|i| {
            let spec = SyntheticSpec {
                name: format!("drift{drift}-{i}"),
                layers: 4,
                kv_heads: 2,
                context_pages: 256 << (i % 4),
                steps: 64,
                selected_pages: 32,
                drift,
                page_tokens: 16,
            };
            generate(&spec, seed + 100 + i as u64)
        })
        .collect()
}
