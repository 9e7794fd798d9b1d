//! CPU reference of the device LRU ([`DeviceLru`](crate::tiered::device_lru::DeviceLru)):
//! one round of [`BucketedLru`](crate::pool::BucketedLru) (with its snapshot budget rule)
//! plus the per-slot reuse tracking of [`BudgetTracker::observe`](crate::pool::BudgetTracker::observe),
//! over a host copy of the LRU's state. `kernels/lru_resolve.cu` computes the same thing
//! on the GPU, one warp per bucket with requests; this sequential version defines the result.
//!
//! Unlike the other ops this is not a candle `CustomOp`: a round updates several state
//! tensors at once (tags, owners, pins, stamps, resident counts, reuse history), while a
//! candle in-place op writes only one. The CPU `DeviceLru` reads its state tensors into an
//! [`LruState`], runs these functions, and writes the state back.

use super::NONE;
use crate::Result;
use candle_core::Tensor;

#[cfg(feature = "cuda")]
pub(crate) use super::cuda::lru::{
    fast_destinations as fast_destinations_cuda, invalidate as invalidate_cuda, lookup as lookup_cuda,
    resolve as resolve_cuda, resolve_direct as resolve_direct_cuda, Buffers, Geometry,
};

/// Host-slot ids whose home is the fast tier ([`DeviceLru::with_fast_homes`](crate::tiered::DeviceLru::with_fast_homes)):
/// ids `base..base + count` live in fast slots `fast_base..fast_base + count` for as long
/// as they are allocated. They have no copy in the host tier and are never looked up in
/// the buckets, fetched, evicted or spilled: every request for one is a hit. `count = 0`
/// (the default) means none. `kernels/lru_resolve.cu`'s `fast_home` is the same function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastHomes {
    /// First id with a fast home (the number of ids whose home is the host tier).
    pub base: u32,
    /// Ids with a fast home.
    pub count: u32,
    /// Fast slot of id `base` (the bucketed slots come first: `buckets × ways`).
    pub fast_base: u32,
}

impl FastHomes {
    /// The fast slot of `id` when its home is the fast tier.
    pub fn slot(&self, id: u32) -> Option<u32> {
        (id != NONE && id >= self.base && id - self.base < self.count).then(|| self.fast_base + (id - self.base))
    }
}

/// The bucket of `page` among `buckets` (`>= 1`): [`BucketedLru::bucket_of`](crate::pool::BucketedLru::bucket_of), shared with
/// the device LRU (`kernels/lru_resolve.cu` computes the same function).
pub fn bucket_index(page: u32, buckets: usize) -> usize {
    let frac = (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((frac * buckets as u64) >> 32) as usize
}

/// One round's requests. All tensors are `[n]` u32, contiguous, on the LRU's device.
#[derive(Debug, Clone, Copy)]
pub struct ResolveRequest<'a> {
    /// `[n]` u32 host-tier slot of each requested page; [`NONE`] entries are skipped.
    pub host_slots: &'a Tensor,
    /// `[n]` u32 logical page ids (copied into the output pairs).
    pub logical: &'a Tensor,
    /// `[n]` u32 owner index `< max_owners` of each request.
    pub owners: &'a Tensor,
    /// Step number (`>= 1`), for reuse tracking.
    pub step: u32,
    /// Largest reuse distance, in steps, that counts as reuse (0 = no reuse tracking:
    /// the reuse history is neither read nor updated).
    pub reuse_steps: u32,
}

/// One round's results, on the LRU's device.
#[derive(Debug, Clone)]
pub struct ResolveOutput {
    /// `[n, 2]` u32 (fast slot, logical) for hits and misses; (NONE, NONE) for skipped
    /// and deferred requests.
    pub fast_pairs: Tensor,
    /// `[n, 2]` u32: the rows of `fast_pairs` whose slot holds its page before the round's
    /// fetch (hits on slots no earlier request of the round pinned, and fast homes);
    /// (NONE, NONE) elsewhere. Attention over these may run while the misses are copied.
    pub ready_pairs: Tensor,
    /// `[n, 2]` u32: the other rows of `fast_pairs` (misses, and hits on a slot an
    /// earlier request of the round pinned, which may be a miss being fetched); (NONE,
    /// NONE) elsewhere. `ready_pairs` and `fetched_pairs` split `fast_pairs`.
    pub fetched_pairs: Tensor,
    /// `[n, 2]` u32 (host slot, logical) for deferred requests (every way of their bucket
    /// was pinned by this round: retry next round); (NONE, NONE) otherwise.
    pub spill_pairs: Tensor,
    /// `[n, 2]` u32: the page list of [`ops::tiered_paged_attention`](crate::ops::tiered_paged_attention)
    /// (fast slot or NONE, logical): the ready rows' fast slots, the misses' fast slots
    /// (filled by that call), NONE with the logical page for repeats of a slot pinned
    /// earlier in the round and for deferred requests; (NONE, NONE) for skipped requests.
    pub tiered_pairs: Tensor,
    /// `[n]` u32: its `src`, the host slot of misses, repeats and deferred requests
    /// (read from the host tier), NONE elsewhere.
    pub tiered_src: Tensor,
    /// `[n, 2]` u32 (host slot, fast slot) of the misses (the pages to copy in), compacted
    /// to the front in unspecified order (request order on the CPU); (NONE, NONE) after.
    pub misses: Tensor,
    /// `[1]` u32 number of valid rows of `misses`.
    pub miss_count: Tensor,
}

const OP: &str = "DeviceLru::resolve";

/// Host copy of a device LRU's state. Slot `s = bucket * ways + way`.
#[derive(Debug, Clone)]
pub(crate) struct LruState {
    pub buckets: usize,
    pub ways: usize,
    /// Ids whose home is the fast tier (hits, never in the buckets).
    pub homes: FastHomes,
    /// `[buckets * ways]` host slot held by each fast slot, [`NONE`] = empty way.
    pub tags: Vec<u32>,
    /// `[buckets * ways]` owner of each fast slot's page, [`NONE`] = empty way.
    pub owners: Vec<u32>,
    /// `[buckets * ways]` round that last pinned each slot (0 = never).
    pub pinned: Vec<u32>,
    /// `[buckets * ways]` recency stamp of each slot (0 = empty).
    pub stamps: Vec<i64>,
    /// `[max_owners]` fast slots held per owner.
    pub resident: Vec<u32>,
    /// `[max_owners]` budgets, `u32::MAX` = unlimited.
    pub budgets: Vec<u32>,
    /// `[host_slots]` step each host slot was last requested in (0 = never).
    pub last_seen: Vec<u32>,
    /// `[max_owners]` reused pages per owner in the current step.
    pub reuse: Vec<u32>,
    /// hits, misses, deferred.
    pub counters: [u64; 3],
}

/// Per-request results of one round, flattened as in `ResolveOutput`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoundOutput {
    /// `[n * 2]` (fast slot, logical).
    pub fast_pairs: Vec<u32>,
    /// `[n * 2]` the rows of `fast_pairs` ready before the fetch (see [`ResolveOutput`]).
    pub ready_pairs: Vec<u32>,
    /// `[n * 2]` the other rows of `fast_pairs`.
    pub fetched_pairs: Vec<u32>,
    /// `[n * 2]` (host slot, logical).
    pub spill_pairs: Vec<u32>,
    /// `[n * 2]` (fast slot or NONE, logical) for the fused tiered attention.
    pub tiered_pairs: Vec<u32>,
    /// `[n]` host slot read by the fused tiered attention, or NONE.
    pub tiered_src: Vec<u32>,
    /// `[n * 2]` (host slot, fast slot), compacted to the front, [`NONE`] after.
    pub misses: Vec<u32>,
    /// Valid rows of `misses`.
    pub miss_count: u32,
}

impl RoundOutput {
    /// Request `i`'s entry of the fused tiered list: `slot` (a ready slot, a miss's fill
    /// target, or NONE) and the host slot it is read from (NONE: the fast slot).
    fn set_tiered(&mut self, i: usize, slot: u32, logical: u32, src: u32) {
        self.tiered_pairs[2 * i] = slot;
        self.tiered_pairs[2 * i + 1] = logical;
        self.tiered_src[i] = src;
    }

    /// Request `i`'s fast pair: in `fast_pairs`, and in `ready_pairs` or `fetched_pairs`.
    fn set(&mut self, i: usize, slot: u32, logical: u32, ready: bool) {
        for v in [
            &mut self.fast_pairs,
            if ready {
                &mut self.ready_pairs
            } else {
                &mut self.fetched_pairs
            },
        ] {
            v[2 * i] = slot;
            v[2 * i + 1] = logical;
        }
    }
}

/// The inputs of one round (all `[n]`).
pub(crate) struct RoundInput<'a> {
    pub host_slots: &'a [u32],
    pub logical: &'a [u32],
    pub owners: &'a [u32],
    /// Stamp base: request `i` gets `clock + i + 1`.
    pub clock: u64,
    /// Pins of this round carry this value (never 0).
    pub round: u32,
    pub step: u32,
    pub reuse_steps: u32,
}

/// Fails unless every non-[`NONE`] host slot is `< host_slots` and its owner `< max_owners`
/// (the CUDA kernels skip such requests instead, since reporting needs a host sync).
pub(crate) fn check_round(st: &LruState, inp: &RoundInput<'_>) -> Result<()> {
    for (i, (&hs, &o)) in inp.host_slots.iter().zip(inp.owners).enumerate() {
        if hs == NONE {
            continue;
        }
        let out_of_range = hs as usize >= st.last_seen.len() && st.homes.slot(hs).is_none();
        if out_of_range || o as usize >= st.resident.len() {
            crate::invalid!(
                OP,
                "request {i}: host slot {hs} (of {} in the host tier, {} with a fast home) or owner {o} (of {}) out of range",
                st.last_seen.len(),
                st.homes.count,
                st.resident.len()
            );
        }
    }
    Ok(())
}

/// One round: begin the round (snapshot the resident counts) and resolve every request
/// in order. Inputs must have passed [`check_round`].
pub(crate) fn resolve_round(st: &mut LruState, inp: &RoundInput<'_>) -> RoundOutput {
    let n = inp.host_slots.len();
    let mut out = RoundOutput {
        fast_pairs: vec![NONE; 2 * n],
        ready_pairs: vec![NONE; 2 * n],
        fetched_pairs: vec![NONE; 2 * n],
        spill_pairs: vec![NONE; 2 * n],
        tiered_pairs: vec![NONE; 2 * n],
        tiered_src: vec![NONE; n],
        misses: vec![NONE; 2 * n],
        miss_count: 0,
    };
    let snapshot = st.resident.clone();
    let ways = st.ways;
    for i in 0..n {
        let (hs, lp) = (inp.host_slots[i], inp.logical[i]);
        if hs == NONE {
            continue;
        }
        if let Some(f) = st.homes.slot(hs) {
            out.set(i, f, lp, true);
            out.set_tiered(i, f, lp, NONE);
            st.counters[0] += 1;
            continue;
        }
        let o = inp.owners[i];
        if inp.reuse_steps > 0 {
            let prev = std::mem::replace(&mut st.last_seen[hs as usize], inp.step);
            if prev != 0 && prev != inp.step && inp.step.wrapping_sub(prev) <= inp.reuse_steps {
                st.reuse[o as usize] += 1;
            }
        }
        let stamp = (inp.clock + i as u64 + 1) as i64;
        let b = bucket_index(hs, st.buckets) * ways;
        if let Some(s) = (b..b + ways).find(|&s| st.tags[s] == hs) {
            // A slot an earlier request of this round pinned may be fetched in this round.
            let ready = st.pinned[s] != inp.round;
            out.set(i, s as u32, lp, ready);
            if ready {
                out.set_tiered(i, s as u32, lp, NONE);
            } else {
                // Possibly a miss still being filled: read from the host tier.
                out.set_tiered(i, NONE, lp, hs);
            }
            st.stamps[s] = stamp;
            st.pinned[s] = inp.round;
            st.counters[0] += 1;
            continue;
        }
        let class = |s: usize| -> u8 {
            if st.tags[s] == NONE {
                return 0;
            }
            let owner = st.owners[s] as usize;
            let budget = st.budgets[owner];
            if budget != u32::MAX && snapshot[owner] >= budget {
                1
            } else {
                2
            }
        };
        let victim = (b..b + ways)
            .filter(|&s| st.pinned[s] != inp.round)
            .min_by_key(|&s| (class(s), if st.tags[s] == NONE { 0 } else { st.stamps[s] }));
        match victim {
            None => {
                out.spill_pairs[2 * i] = hs;
                out.spill_pairs[2 * i + 1] = lp;
                out.set_tiered(i, NONE, lp, hs);
                st.counters[2] += 1;
            }
            Some(s) => {
                if st.tags[s] != NONE {
                    st.resident[st.owners[s] as usize] -= 1;
                }
                st.tags[s] = hs;
                st.owners[s] = o;
                st.resident[o as usize] += 1;
                st.stamps[s] = stamp;
                st.pinned[s] = inp.round;
                out.set(i, s as u32, lp, false);
                out.set_tiered(i, s as u32, lp, hs);
                let k = out.miss_count as usize;
                out.misses[2 * k] = hs;
                out.misses[2 * k + 1] = s as u32;
                out.miss_count += 1;
                st.counters[1] += 1;
            }
        }
    }
    out
}

/// One round of a direct-mapped fast tier (a fast slot for every host slot): request `i`
/// hits fast slot `host_slots[i]` when that is `< host_cap`. Returns the `[n * 2]`
/// (fast slot, logical) pairs, (NONE, NONE) for [`NONE`] and out-of-range slots, and the
/// number of hits. `kernels/lru_resolve.cu`'s `lru_direct` computes the same.
pub(crate) fn resolve_direct(host_slots: &[u32], logical: &[u32], host_cap: usize) -> (Vec<u32>, u64) {
    let mut hits = 0;
    let pairs = host_slots
        .iter()
        .zip(logical)
        .flat_map(|(&hs, &lp)| {
            if hs != NONE && (hs as usize) < host_cap {
                hits += 1;
                [hs, lp]
            } else {
                [NONE, NONE]
            }
        })
        .collect();
    (pairs, hits)
}

/// [`lookup`] of a direct-mapped fast tier: a host slot `< host_cap` is its own fast slot.
pub(crate) fn lookup_direct(host_cap: usize, host_slots: &[u32]) -> Vec<u32> {
    host_slots
        .iter()
        .map(|&hs| {
            if hs != NONE && (hs as usize) < host_cap {
                hs
            } else {
                NONE
            }
        })
        .collect()
}

/// Fast slot of each host slot (`[n]`, [`NONE`] if not resident or a [`NONE`] query).
pub(crate) fn lookup(tags: &[u32], buckets: usize, ways: usize, homes: FastHomes, host_slots: &[u32]) -> Vec<u32> {
    host_slots
        .iter()
        .map(|&hs| {
            if hs == NONE {
                return NONE;
            }
            if let Some(f) = homes.slot(hs) {
                return f;
            }
            let b = bucket_index(hs, buckets) * ways;
            (b..b + ways).find(|&s| tags[s] == hs).map_or(NONE, |s| s as u32)
        })
        .collect()
}

/// Fast-tier destinations `fast slot · page_size + rows[i]` of the host slots `slots`
/// (`NONE` where the page is not resident, or a `NONE` query): the write-through
/// targets of new tokens.
pub(crate) fn fast_destinations(
    tags: &[u32],
    buckets: usize,
    ways: usize,
    homes: FastHomes,
    slots: &[u32],
    rows: &[u32],
    page_size: u32,
) -> Vec<u32> {
    lookup(tags, buckets, ways, homes, slots)
        .into_iter()
        .zip(rows)
        .map(|(f, &r)| if f == NONE { NONE } else { f * page_size + r })
        .collect()
}

/// Forgets host slots (already checked `< host_slots`, with a fast home, or [`NONE`]):
/// their fast copies become empty ways, their owners' resident counts drop, their reuse
/// history is cleared. Ids with a fast home have nothing to forget.
pub(crate) fn invalidate(st: &mut LruState, host_slots: &[u32]) {
    for &hs in host_slots {
        if hs == NONE || hs as usize >= st.last_seen.len() {
            continue;
        }
        st.last_seen[hs as usize] = 0;
        let b = bucket_index(hs, st.buckets) * st.ways;
        if let Some(s) = (b..b + st.ways).find(|&s| st.tags[s] == hs) {
            st.resident[st.owners[s] as usize] -= 1;
            st.tags[s] = NONE;
            st.owners[s] = NONE;
            st.stamps[s] = 0;
        }
    }
}
