//! Per-request fast-tier (HBM) budgets under one global limit. Each request's share
//! follows its measured reuse: its *demand* is the number of pages per step that it
//! selected again within `reuse_steps` steps of their previous selection (the working set
//! that a cache of that size turns into hits), averaged over the last `window_steps`
//! steps. Pages selected once, as by a scan, or reused only at long distances, do not
//! count: keeping them would cost far more slots than the hits they bring.
//! Budgets are assigned by water-filling: every request gets `min(demand, fair share)`,
//! and what the small requests leave is shared again among the larger ones, until the
//! capacity is used or every demand is met; leftover capacity is shared in proportion to
//! the demands (a request that reuses nothing gets little of it). The bucketed LRU
//! uses the budgets to pick victims ([`BucketedLru::resolve_for`](super::BucketedLru::resolve_for)).
//! The same code drives the cache and the trace-driven simulator (`spinkv::sim`).

use std::collections::HashMap;

pub use crate::config::BudgetPolicy;

/// Demand of one request.
#[derive(Debug, Default, Clone)]
struct Demand {
    /// Step each recent page was last selected in.
    last_seen: HashMap<u32, u64>,
    /// Pages reused in the current step.
    current: usize,
    /// Reused pages per step, the last `window_steps` steps.
    history: std::collections::VecDeque<usize>,
}

/// Tracks per-request demand and turns it into budgets.
#[derive(Debug, Clone)]
pub struct BudgetTracker {
    policy: BudgetPolicy,
    capacity: usize,
    step: u64,
    demand: HashMap<u64, Demand>,
    budgets: HashMap<u64, usize>,
}

impl BudgetTracker {
    /// A tracker for a fast tier of `capacity` slots.
    pub fn new(policy: BudgetPolicy, capacity: usize) -> Self {
        Self {
            policy,
            capacity,
            step: 0,
            demand: HashMap::new(),
            budgets: HashMap::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> BudgetPolicy {
        self.policy
    }

    /// Records that `request` selected `pages` (fast-tier page ids) in the current step.
    pub fn observe(&mut self, request: u64, pages: impl IntoIterator<Item = u32>) {
        if let BudgetPolicy::Dynamic { reuse_steps, .. } = self.policy {
            let step = self.step;
            let d = self.demand.entry(request).or_default();
            for p in pages {
                match d.last_seen.insert(p, step) {
                    Some(prev) if prev != step && step - prev <= reuse_steps => d.current += 1,
                    _ => {}
                }
            }
        } else {
            self.demand.entry(request).or_default();
        }
    }

    /// Records that `request` reused `reused` pages in the current step, as counted
    /// elsewhere (the device LRU counts reuse on the GPU with the same rule as
    /// [`observe`](Self::observe)); registers the request as active.
    pub fn observe_count(&mut self, request: u64, reused: usize) {
        let d = self.demand.entry(request).or_default();
        if matches!(self.policy, BudgetPolicy::Dynamic { .. }) {
            d.current += reused;
        }
    }

    /// A request left: its demand and budget are dropped.
    pub fn remove(&mut self, request: u64) {
        self.demand.remove(&request);
        self.budgets.remove(&request);
    }

    /// Closes the step: ages demand out of the window and recomputes every budget.
    pub fn end_step(&mut self) {
        let active: Vec<u64> = self.demand.keys().copied().collect();
        self.budgets.clear();
        if active.is_empty() {
            self.step += 1;
            return;
        }
        match self.policy {
            BudgetPolicy::Unlimited => {
                for r in active {
                    self.budgets.insert(r, self.capacity);
                }
            }
            BudgetPolicy::FixedEqual => {
                let share = (self.capacity / active.len()).max(1);
                for r in active {
                    self.budgets.insert(r, share);
                }
            }
            BudgetPolicy::Dynamic {
                window_steps,
                reuse_steps,
                floor_pages,
            } => {
                let horizon = self.step.saturating_sub(reuse_steps);
                let mut demands: Vec<(u64, usize)> = Vec::with_capacity(active.len());
                for (&r, d) in self.demand.iter_mut() {
                    d.last_seen.retain(|_, s| *s >= horizon);
                    d.history.push_back(std::mem::take(&mut d.current));
                    while d.history.len() as u64 > window_steps.max(1) {
                        d.history.pop_front();
                    }
                    let mean = d.history.iter().sum::<usize>().div_ceil(d.history.len().max(1));
                    demands.push((r, mean.max(floor_pages)));
                }
                for (r, b) in water_fill(self.capacity, &demands) {
                    self.budgets.insert(r, b);
                }
            }
        }
        self.step += 1;
    }

    /// The budget of `request` (the whole capacity before its first step ends).
    pub fn budget(&self, request: u64) -> usize {
        self.budgets.get(&request).copied().unwrap_or(self.capacity)
    }

    /// Sets `request`'s budget to `pages` until the next [`end_step`](Self::end_step)
    /// recomputes it (budgets decided elsewhere: tests, an external policy).
    pub fn set_budget(&mut self, request: u64, pages: usize) {
        self.budgets.insert(request, pages);
    }

    /// Pages `request` reused (within `reuse_steps`) so far in the current step: what
    /// [`end_step`](Self::end_step) adds to its demand history (0 without a dynamic policy).
    pub fn step_reuse(&self, request: u64) -> usize {
        self.demand.get(&request).map_or(0, |d| d.current)
    }

    /// Every current budget.
    pub fn budgets(&self) -> &HashMap<u64, usize> {
        &self.budgets
    }
}

/// Water-filling of `capacity` among `demands` (request, pages): small demands are met in
/// full, the rest share what remains equally; capacity left once every demand is met is
/// shared in proportion to the demands, so the budgets sum to `capacity` (each at least 1).
pub fn water_fill(capacity: usize, demands: &[(u64, usize)]) -> Vec<(u64, usize)> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (demands[i].1, demands[i].0));
    let mut out = vec![0usize; demands.len()];
    let mut left = capacity;
    for (k, &i) in order.iter().enumerate() {
        let share = left / (order.len() - k);
        let give = demands[i].1.min(share).max(1).min(left.max(1));
        out[i] = give;
        left = left.saturating_sub(give);
    }
    // Spare capacity: in proportion to the demands, the rounding remainder to the largest.
    if left > 0 && !order.is_empty() {
        let total: usize = demands.iter().map(|d| d.1.max(1)).sum();
        let mut given = 0;
        for &i in &order {
            let extra = left * demands[i].1.max(1) / total;
            out[i] += extra;
            given += extra;
        }
        if let Some(&largest) = order.last() {
            out[largest] += left - given;
        }
    }
    demands.iter().zip(out).map(|(&(r, _), b)| (r, b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_fill_meets_small_demands_and_sums_to_capacity() {
        let b = water_fill(100, &[(1, 10), (2, 200), (3, 30)]);
        assert_eq!(b, vec![(1, 10), (2, 60), (3, 30)]);
        let b = water_fill(100, &[(1, 10), (2, 20)]);
        assert_eq!(b, vec![(1, 33), (2, 67)]);
        let b = water_fill(10, &[(1, 50), (2, 50), (3, 50)]);
        assert_eq!(b.iter().map(|x| x.1).sum::<usize>(), 10);
        assert!(b.iter().all(|x| (3..=4).contains(&x.1)));
    }

    #[test]
    fn dynamic_budgets_follow_reuse() {
        let mut t = BudgetTracker::new(
            BudgetPolicy::Dynamic {
                window_steps: 4,
                reuse_steps: 2,
                floor_pages: 2,
            },
            64,
        );
        // Request 1 reuses 40 pages every step; request 2 scans 40 new pages per step
        // (it reuses nothing, its demand is the floor).
        for step in 0..10u32 {
            t.observe(1, 0..40);
            t.observe(2, (0..40).map(|i| 1000 + step * 40 + i));
            t.end_step();
        }
        // Demands 40 and 2 (the floor): spare 22 shared 40:2.
        assert_eq!(t.budget(2), 2 + 1, "the scanner gets its floor + 2/42 of the spare");
        assert_eq!(t.budget(1), 64 - 3, "the reusing request gets the rest");
        t.remove(2);
        t.observe(1, 0..8);
        t.end_step();
        assert_eq!(t.budget(1), 64);
        let mut f = BudgetTracker::new(BudgetPolicy::FixedEqual, 64);
        f.observe(1, 0..8);
        f.observe(2, 0..40);
        f.end_step();
        assert_eq!((f.budget(1), f.budget(2)), (32, 32));
    }
}
