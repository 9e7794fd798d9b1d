//! The direct-mapped fast tier: when the fast tier has a slot for every host slot, host
//! slot `h` lives in fast slot `h` for as long as it is allocated. Nothing is ever
//! evicted, so there is no replacement to decide: a round is a hit for every valid
//! request (one kernel on CUDA, `lru_direct`, in place of the link / resolve / advance
//! kernels), there are no misses to fetch and no spills to attend from the host tier, and
//! the write-through destination of a token is its host destination. Recency, pins,
//! per-owner residency and reuse history are not kept (budgets cannot bind).
//!
//! The pages reach the fast tier by write-through: every token is written to its fast
//! slot when it is appended (all slots count as resident from the start), so a direct
//! LRU must be in place before the first page is written, as `SpinCache` does.

use super::{reference, u32s, DeviceLru, ResolveOutput, ResolveRequest, OP};
use crate::ops::NONE;
use crate::Result;
use candle_core::{DType, Device, Tensor};

impl DeviceLru {
    /// A direct-mapped LRU of `host_slots` fast slots (one per host slot) for owners
    /// `0..max_owners`, on `device`; see the module `direct.rs`. [`capacity`](Self::capacity)
    /// is `host_slots`, with one way per bucket.
    pub fn direct(max_owners: usize, host_slots: usize, device: &Device) -> Result<Self> {
        if host_slots == 0 || host_slots >= NONE as usize || max_owners == 0 || max_owners >= NONE as usize {
            crate::invalid!(
                OP,
                "direct: host_slots {host_slots} and max_owners {max_owners} must be in 1..2^32-1"
            );
        }
        Ok(Self {
            buckets: host_slots,
            ways: 1,
            max_owners,
            host_slots,
            device: device.clone(),
            direct: true,
            homes: super::FastHomes {
                base: host_slots as u32,
                count: 0,
                fast_base: host_slots as u32,
            },
            tags: u32s(1, NONE, device)?,
            owners: u32s(1, NONE, device)?,
            pinned: u32s(1, 0, device)?,
            stamps: Tensor::zeros(1, DType::I64, device)?,
            resident: u32s(max_owners, 0, device)?,
            resident_snapshot: u32s(1, 0, device)?,
            budgets: u32s(max_owners, u32::MAX, device)?,
            budgets_host: vec![u32::MAX; max_owners],
            last_seen: u32s(1, 0, device)?,
            reuse: u32s(max_owners, 0, device)?,
            counters: Tensor::zeros(3, DType::I64, device)?,
            head: u32s(1, NONE, device)?,
            next: u32s(1, NONE, device)?,
            state: u32s(4, 0, device)?,
            device_step: 0,
            epoch: 0,
            clock: 0,
            round: 0,
        })
    }

    /// Whether this LRU is direct-mapped ([`DeviceLru::direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// One round of a direct-mapped LRU, checked as [`resolve`](Self::resolve) checks its
    /// request: `[n, 2]` u32 (fast slot, logical) pairs, which for a direct LRU are (host
    /// slot, logical); (NONE, NONE) for [`NONE`] requests. The hits count in
    /// [`take_step_counters`](Self::take_step_counters). One kernel on CUDA.
    pub fn resolve_direct(&mut self, req: &ResolveRequest<'_>) -> Result<Tensor> {
        if !self.direct {
            crate::invalid!(
                "DeviceLru::resolve_direct",
                "this LRU of {} buckets × {} ways is not direct-mapped",
                self.buckets,
                self.ways
            );
        }
        let (n, _, round) = self.begin_round(req)?;
        let pairs = self.direct_pairs(req)?;
        self.end_round(n, round);
        Ok(pairs)
    }

    /// The output of a direct round (called by `resolve` after its checks): the pairs,
    /// and no spill or miss.
    pub(super) fn direct_output(&mut self, req: &ResolveRequest<'_>) -> Result<ResolveOutput> {
        let n = req.host_slots.dims1()?;
        let fast_pairs = self.direct_pairs(req)?;
        let none = Tensor::from_vec(vec![NONE; 2 * n.max(1)], (n.max(1), 2), &self.device)?.narrow(0, 0, n)?;
        Ok(ResolveOutput {
            ready_pairs: fast_pairs.clone(),
            tiered_pairs: fast_pairs.clone(),
            tiered_src: Tensor::from_vec(vec![NONE; n.max(1)], n.max(1), &self.device)?.narrow(0, 0, n)?,
            fast_pairs,
            fetched_pairs: none.clone(),
            spill_pairs: none.clone(),
            misses: none,
            miss_count: Tensor::zeros(1, DType::U32, &self.device)?,
        })
    }

    /// `[n, 2]` pairs of a direct round; the hits count. Uploads nothing on CUDA (one
    /// kernel), so that a captured step can replay it.
    fn direct_pairs(&mut self, req: &ResolveRequest<'_>) -> Result<Tensor> {
        let n = req.host_slots.dims1()?;
        Ok(match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => reference::resolve_direct_cuda(&self.counters, req, self.host_slots)?,
            _ => {
                let hs = req.host_slots.to_vec1::<u32>()?;
                let ow = req.owners.to_vec1::<u32>()?;
                if let Some(i) = (0..n).find(|&i| {
                    hs[i] != NONE && (hs[i] as usize >= self.host_slots || ow[i] as usize >= self.max_owners)
                }) {
                    crate::invalid!(
                        "DeviceLru::resolve",
                        "request {i}: host slot {} (of {}) or owner {} (of {}) out of range",
                        hs[i],
                        self.host_slots,
                        ow[i],
                        self.max_owners
                    );
                }
                let (pairs, hits) = reference::resolve_direct(&hs, &req.logical.to_vec1::<u32>()?, self.host_slots);
                let mut c = self.counters.to_vec1::<i64>()?;
                c[0] += hits as i64;
                self.counters = Tensor::from_vec(c, 3, &self.device)?;
                Tensor::from_vec(pairs, (n, 2), &self.device)?
            }
        })
    }

    /// `lookup` of a direct LRU: `q` `[n]` u32 → itself where `< host_slots`, else NONE.
    pub(super) fn direct_lookup(&self, q: &Tensor) -> Result<Tensor> {
        let out = reference::lookup_direct(self.host_slots, &q.to_vec1::<u32>()?);
        let n = out.len();
        Ok(Tensor::from_vec(out, n, &self.device)?)
    }

    /// `fast_destinations` of a direct LRU: `slot · page_size + row`, NONE where the
    /// slot is NONE or out of range.
    pub(super) fn direct_destinations(&self, q: &Tensor, rows: &Tensor, page_size: usize) -> Result<Tensor> {
        let rows = rows.to_vec1::<u32>()?;
        let out: Vec<u32> = reference::lookup_direct(self.host_slots, &q.to_vec1::<u32>()?)
            .into_iter()
            .zip(&rows)
            .map(|(f, &r)| if f == NONE { NONE } else { f * page_size as u32 + r })
            .collect();
        let n = out.len();
        Ok(Tensor::from_vec(out, n, &self.device)?)
    }
}
