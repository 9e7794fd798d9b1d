//! How well cheap predictors name the pages a step selects that the step before did not
//! (the misses of a fast tier that holds the working set): the basis for deciding whether
//! cross-layer prefetch (fetching layer l's likely pages while layer l − 1 computes) can
//! pay. For every request, step `t ≥ 1` and layer `l` after the first traced one, per KV
//! head, the *new* pages are `sel(t, l) − sel(t − 1, l)`; a predictor names a set of
//! pages before layer l runs, and is charged for the pages it names that were not already
//! selected at `(t − 1, l)` (what a prefetch would fetch).

use super::RequestTrace;
use std::collections::HashSet;

/// Counts of one predictor over a set of traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PredictorCounts {
    /// New pages the predictor named.
    pub named: u64,
    /// Pages it would fetch: named, and not selected by the layer the step before.
    pub fetched: u64,
}

impl PredictorCounts {
    /// Share of the new pages named (0 when there are none).
    pub fn coverage(&self, new: u64) -> f64 {
        self.named as f64 / new.max(1) as f64
    }

    /// Pages fetched per new page.
    pub fn fetched_per_new(&self, new: u64) -> f64 {
        self.fetched as f64 / new.max(1) as f64
    }
}

/// What [`predictors`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PredictorReport {
    /// Pages selected in the (step, layer, head) cells measured.
    pub selected: u64,
    /// Of those, pages the same layer and head did not select the step before.
    pub new: u64,
    /// The layer below's selection in the same step, same KV head.
    pub below_same_head: PredictorCounts,
    /// The layer below's selection in the same step, all its KV heads together.
    pub below_all_heads: PredictorCounts,
}

/// Measures the two cross-layer predictors over `requests` (cells where the layer has a
/// predecessor in the step's selections and was selected the step before).
pub fn predictors(requests: &[RequestTrace]) -> PredictorReport {
    let mut rep = PredictorReport::default();
    for req in requests {
        for t in 1..req.steps.len() {
            let (prev_step, step) = (&req.steps[t - 1], &req.steps[t]);
            for i in 1..step.len() {
                let (below, cur) = (&step[i - 1], &step[i]);
                let Some(prev) = prev_step.iter().find(|s| s.layer == cur.layer) else {
                    continue;
                };
                let below_all: HashSet<u32> = below.heads.iter().flatten().copied().collect();
                for (h, pages) in cur.heads.iter().enumerate() {
                    let before: HashSet<u32> = prev.heads.get(h).into_iter().flatten().copied().collect();
                    let new: HashSet<u32> = pages.iter().copied().filter(|p| !before.contains(p)).collect();
                    rep.selected += pages.len() as u64;
                    rep.new += new.len() as u64;
                    let same: HashSet<u32> = below.heads.get(h).into_iter().flatten().copied().collect();
                    for (set, counts) in [
                        (&same, &mut rep.below_same_head),
                        (&below_all, &mut rep.below_all_heads),
                    ] {
                        counts.named += set.intersection(&new).count() as u64;
                        counts.fetched += set.iter().filter(|p| !before.contains(p)).count() as u64;
                    }
                }
            }
        }
    }
    rep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::LayerSelection;

    fn layer(layer: u32, heads: &[&[u32]]) -> LayerSelection {
        LayerSelection {
            layer,
            heads: heads.iter().map(|h| h.to_vec()).collect(),
        }
    }

    #[test]
    fn counts_new_pages_and_what_the_layer_below_names() {
        // Two heads, layers 3 and 4. Step 1 of layer 4: head 0 selects {1, 2, 5} after
        // {1, 2, 3} (new: 5), head 1 selects {7, 8} after {7, 9} (new: 8). Layer 3 in
        // step 1: head 0 {5, 6}, head 1 {2}.
        let req = RequestTrace {
            name: "t".into(),
            dirs: 4,
            kv_heads: 2,
            steps: vec![
                vec![layer(3, &[&[0], &[0]]), layer(4, &[&[1, 2, 3], &[7, 9]])],
                vec![layer(3, &[&[5, 6], &[2]]), layer(4, &[&[1, 2, 5], &[7, 8]])],
            ],
        };
        let rep = predictors(&[req]);
        assert_eq!((rep.selected, rep.new), (5, 2));
        // Same head: head 0 names 5 (fetches 5 and 6), head 1 names nothing (fetches 2).
        assert_eq!(rep.below_same_head, PredictorCounts { named: 1, fetched: 3 });
        // All heads {2, 5, 6}: head 0 names 5 (fetches 5, 6: 2 was selected before),
        // head 1 nothing (fetches 2, 5, 6).
        assert_eq!(rep.below_all_heads, PredictorCounts { named: 1, fetched: 5 });
        assert!((rep.below_same_head.coverage(rep.new) - 0.5).abs() < 1e-12);
        assert!((rep.below_all_heads.fetched_per_new(rep.new) - 2.5).abs() < 1e-12);
    }
}
