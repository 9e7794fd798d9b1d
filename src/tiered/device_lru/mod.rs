//! The bucketed LRU with per-owner budgets, with all of its state in tensors on one
//! device: [`DeviceLru`]. One [`resolve`](DeviceLru::resolve) is exactly one round of
//! [`BucketedLru`](crate::pool::BucketedLru) — `begin_round` then `resolve_for` of each
//! request in order, under the snapshot budget rule (budget classes read the per-owner
//! resident counts as of the start of the round) — plus the reuse tracking of
//! [`BudgetTracker::observe`](crate::pool::BudgetTracker::observe), kept per host slot.
//!
//! On CUDA a round is three kernels (`kernels/lru_resolve.cu`) enqueued on the device's
//! stream, with no host synchronization and no device-to-host copy: one thread per
//! request links the requests of each bucket into a list (and counts reuse), one thread
//! per bucket resolves its requests in request order, and one thread advances the clock
//! and round number, which live on the device (so that a round captured in a CUDA graph
//! reads the values of each replay). Buckets are independent
//! given the round's snapshot, so the parallel result equals the sequential one. On the
//! CPU, the reference (`crate::ops::lru_resolve`) runs over a host copy of the state
//! (it copies the state tensors in and out each call: a reference, not a fast path).
//!
//! Requests with a host slot `>= host_slots` or an owner `>= max_owners` are rejected
//! with an error on the CPU and skipped (treated as [`NONE`]) by the CUDA kernels, which
//! cannot report them without a host synchronization.
//!
//! A fast tier with room for every host slot needs no replacement policy: a
//! [`DeviceLru::direct`] LRU maps host slot `h` to fast slot `h` (see `direct.rs`).
//!
//! Ids past the host tier can have their home in the fast tier
//! ([`DeviceLru::with_fast_homes`]): fast slots after the buckets' hold them for as long
//! as they are allocated, so the capacity is the host tier plus those slots. A request
//! for one is a hit without a bucket lookup; nothing of theirs is fetched, evicted or
//! spilled, and they take no part in budgets or reuse tracking.

use crate::ops::lru_resolve::{self as reference, LruState, RoundInput};
pub use crate::ops::lru_resolve::{FastHomes, ResolveOutput, ResolveRequest};
use crate::ops::NONE;
use crate::Result;
use candle_core::{DType, Device, Tensor};

mod direct;
mod homes;
mod state;

const OP: &str = "DeviceLru";

/// Most ways a bucket may have: `lru_resolve` holds a bucket's ways in one warp's lanes.
pub const MAX_WAYS: usize = 32;

/// Fast-tier residency of `buckets × ways` slots with per-owner budgets, on one device.
/// Slot id = `bucket * ways + way`; bucket = [`bucket_index`](crate::ops::lru_resolve::bucket_index)
/// of the host slot (the function of [`BucketedLru::bucket_of`](crate::pool::BucketedLru::bucket_of)).
#[derive(Debug)]
pub struct DeviceLru {
    buckets: usize,
    ways: usize,
    max_owners: usize,
    host_slots: usize,
    device: Device,
    /// Direct mapping (see [`DeviceLru::direct`]): the per-slot state below is unused.
    direct: bool,
    /// Ids `host_slots..` whose home is the fast tier ([`DeviceLru::with_fast_homes`]).
    homes: FastHomes,
    /// `[cap]` u32 host slot per fast slot, NONE = empty.
    tags: Tensor,
    /// `[cap]` u32 owner per fast slot, NONE = empty.
    owners: Tensor,
    /// `[cap]` u32 round that pinned the slot (0 = never).
    pinned: Tensor,
    /// `[cap]` i64 recency stamp.
    stamps: Tensor,
    /// `[max_owners]` u32 fast slots held per owner.
    resident: Tensor,
    /// `[max_owners]` u32 `resident` at the start of the round (CUDA scratch).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    resident_snapshot: Tensor,
    /// `[max_owners]` u32 budgets, u32::MAX = unlimited.
    budgets: Tensor,
    /// What `budgets` holds, on the host (a write of the same budgets is skipped).
    budgets_host: Vec<u32>,
    /// `[host_slots]` u32 step of each host slot's last request (0 = never).
    last_seen: Tensor,
    /// `[max_owners]` u32 reused pages per owner this step.
    reuse: Tensor,
    /// `[3]` i64 hits, misses, deferred.
    counters: Tensor,
    /// `[buckets]` u32 per-bucket request list heads, NONE between rounds (CUDA scratch).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    head: Tensor,
    /// `[>= 2n]` u32 request list links, then the round's active buckets (CUDA scratch,
    /// grown as needed).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    next: Tensor,
    /// `[6]` u32 clock (low, high), round, step, blocks done (of the running
    /// `lru_resolve`) and active buckets (listed by `lru_link`; both 0 between rounds) of the CUDA kernels: kept on the device so that a
    /// captured round reads them at replay (the host's `clock` and
    /// `round` drive the CPU reference and count rounds for the wrap-around reset).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    state: Tensor,
    /// The step last written into `state`.
    device_step: u32,
    /// Bumped whenever a state tensor is replaced rather than written in place.
    epoch: u64,
    clock: u64,
    round: u32,
}

fn u32s(n: usize, v: u32, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![v; n.max(1)], n.max(1), device)?)
}

impl DeviceLru {
    /// An empty LRU of `buckets × ways` fast slots for owners `0..max_owners` and host
    /// slots `0..host_slots`, every budget unlimited, on `device`.
    pub fn new(buckets: usize, ways: usize, max_owners: usize, host_slots: usize, device: &Device) -> Result<Self> {
        let cap = buckets.saturating_mul(ways);
        if buckets == 0
            || !(1..=MAX_WAYS).contains(&ways)
            || cap >= NONE as usize
            || max_owners == 0
            || max_owners >= NONE as usize
        {
            crate::invalid!(
                OP,
                "buckets {buckets} × ways {ways} must be >= 1 and < 2^32 slots, ways at most {MAX_WAYS}; max_owners {max_owners} must be in 1..2^32-1"
            );
        }
        if host_slots == 0 || host_slots >= NONE as usize {
            crate::invalid!(OP, "host_slots {host_slots} must be in 1..2^32-1");
        }
        Ok(Self {
            buckets,
            ways,
            max_owners,
            host_slots,
            device: device.clone(),
            direct: false,
            homes: FastHomes {
                base: host_slots as u32,
                count: 0,
                fast_base: cap as u32,
            },
            tags: u32s(cap, NONE, device)?,
            owners: u32s(cap, NONE, device)?,
            pinned: u32s(cap, 0, device)?,
            stamps: Tensor::zeros(cap, DType::I64, device)?,
            resident: u32s(max_owners, 0, device)?,
            resident_snapshot: u32s(max_owners, 0, device)?,
            budgets: u32s(max_owners, u32::MAX, device)?,
            budgets_host: vec![u32::MAX; max_owners],
            last_seen: u32s(host_slots, 0, device)?,
            reuse: u32s(max_owners, 0, device)?,
            counters: Tensor::zeros(3, DType::I64, device)?,
            head: u32s(buckets, NONE, device)?,
            next: u32s(1, NONE, device)?,
            state: u32s(6, 0, device)?,
            device_step: 0,
            epoch: 0,
            clock: 0,
            round: 0,
        })
    }

    /// Fast slots managed by replacement (`buckets × ways`): what budgets share.
    pub fn capacity(&self) -> usize {
        self.buckets * self.ways
    }

    /// Buckets.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Ways per bucket.
    pub fn ways(&self) -> usize {
        self.ways
    }

    /// The device holding the state.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets the per-owner budgets (`[max_owners]`, `u32::MAX` = unlimited): one H2D upload
    /// and a device copy into the existing buffer (in place), none when they equal the
    /// budgets set last.
    /// They apply from the next [`resolve`](Self::resolve).
    pub fn set_budgets(&mut self, budgets: &[u32]) -> Result<()> {
        if budgets.len() != self.max_owners {
            crate::invalid!(
                "DeviceLru::set_budgets",
                "budgets has {} entries, expected max_owners = {}",
                budgets.len(),
                self.max_owners
            );
        }
        if budgets == self.budgets_host.as_slice() {
            // Unchanged (a batch whose budgets settled, or a direct-mapped tier's): no upload.
            return Ok(());
        }
        crate::fault::device_call("DeviceLru::set_budgets")?;
        // In place: captured rounds keep reading the same buffer.
        self.budgets
            .slice_set(&Tensor::from_slice(budgets, budgets.len(), &self.device)?, 0, 0)?;
        self.budgets_host.copy_from_slice(budgets);
        Ok(())
    }

    /// Sets the step number the next rounds record (`>= 1`): one small in-place write on
    /// CUDA, done once per step so that rounds upload nothing. [`resolve`](Self::resolve)
    /// calls it when its request names another step. Also restarts the round numbers
    /// (which pins hold) well before they wrap.
    pub fn set_step(&mut self, step: u32) -> Result<()> {
        if step == 0 {
            crate::invalid!(
                "DeviceLru::set_step",
                "step must be >= 1 (0 marks never-seen host slots)"
            );
        }
        if self.round >= u32::MAX / 2 {
            self.restart_rounds()?;
        }
        // A direct-mapped round reads no state: nothing to write.
        if self.device.is_cuda() && !self.direct && step != self.device_step {
            crate::fault::device_call("DeviceLru::set_step")?;
            self.write_state_word(3, step)?;
        }
        self.device_step = step;
        Ok(())
    }

    /// Counts `rounds` rounds of `requests` requests in all that ran without a call to
    /// [`resolve`](Self::resolve) (replays of captured rounds): keeps the host's round
    /// count, which decides when round numbers restart, in step with the device's.
    pub fn count_replayed_rounds(&mut self, rounds: u32, requests: u64) {
        self.round = self.round.saturating_add(rounds);
        self.clock += requests;
    }

    /// Empties the fast tier, in place: every slot free, no page resident (recency,
    /// reuse history, budgets and counters stay). For a round whose effects are unknown
    /// (a failed launch or fetch after the tags changed): the pages are then fetched again.
    pub fn clear(&mut self) -> Result<()> {
        crate::fault::device_call("DeviceLru::clear")?;
        if self.direct {
            // Every page stays where it is: there is no residency to forget.
            return Ok(());
        }
        self.tags.const_set(NONE.into())?;
        self.owners.const_set(NONE.into())?;
        self.pinned.zero_set()?;
        self.stamps.zero_set()?;
        self.resident.zero_set()?;
        Ok(())
    }

    /// Changes whenever a state buffer is replaced instead of written in place (work
    /// captured before then reads stale buffers).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Unpins every slot and restarts round numbers at 0, in place.
    fn restart_rounds(&mut self) -> Result<()> {
        self.pinned.zero_set()?;
        if self.device.is_cuda() {
            self.write_state_word(2, 0)?;
        }
        self.round = 0;
        Ok(())
    }

    /// Writes `state[i] = v` in place (one small upload and a device copy).
    fn write_state_word(&self, i: usize, v: u32) -> Result<()> {
        Ok(self
            .state
            .slice_set(&Tensor::from_slice(&[v], 1, &self.device)?, 0, i)?)
    }

    /// One round (one layer of one step): see the module doc. Request `i` gets recency
    /// stamp `clock + i + 1`, then the clock advances by `n`. No host synchronization and
    /// no device-to-host copy on CUDA.
    pub fn resolve(&mut self, req: &ResolveRequest<'_>) -> Result<ResolveOutput> {
        let (n, clock, round) = self.begin_round(req)?;
        if self.direct {
            let out = self.direct_output(req)?;
            self.end_round(n, round);
            return Ok(out);
        }
        let out = match &self.device {
            Device::Cpu => self.resolve_cpu(req, clock, round)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                // Links of the n requests, then the round's active buckets.
                if self.next.dims()[0] < 2 * n {
                    self.next = u32s((2 * n).next_power_of_two(), NONE, &self.device)?;
                    self.epoch += 1;
                }
                reference::resolve_cuda(&self.buffers(), req, self.geometry())?
            }
            d => crate::invalid!("DeviceLru::resolve", "unsupported device {:?}", d.location()),
        };
        self.end_round(n, round);
        Ok(out)
    }

    /// The round's request checks and step bookkeeping: returns `n`, the clock the round
    /// stamps from and the round's number.
    fn begin_round(&mut self, req: &ResolveRequest<'_>) -> Result<(usize, u64, u32)> {
        const ROP: &str = "DeviceLru::resolve";
        let n = req.host_slots.dims1().unwrap_or(usize::MAX);
        for (name, t) in [
            ("host_slots", req.host_slots),
            ("logical", req.logical),
            ("owners", req.owners),
        ] {
            if t.rank() != 1 || t.dims()[0] != n || t.dtype() != DType::U32 || !t.is_contiguous() {
                crate::invalid!(
                    ROP,
                    "host_slots {:?}, logical {:?} and owners {:?} must be contiguous u32 [n]; {name} is {:?} {:?}",
                    req.host_slots.dims(),
                    req.logical.dims(),
                    req.owners.dims(),
                    t.dims(),
                    t.dtype()
                );
            }
            if !t.device().same_device(&self.device) {
                crate::invalid!(
                    ROP,
                    "{name} {:?} is on {:?} but the LRU is on {:?}",
                    t.dims(),
                    t.device().location(),
                    self.device.location()
                );
            }
        }
        if req.step == 0 {
            crate::invalid!(ROP, "step must be >= 1 (0 marks never-seen host slots)");
        }
        crate::fault::device_call(ROP)?;
        if req.step != self.device_step {
            // First: it may restart the round numbers, which the round below then uses.
            self.set_step(req.step)?;
        }
        if self.round == u32::MAX {
            // Pins hold round numbers: restart them before the counter wraps.
            self.restart_rounds()?;
        }
        Ok((n, self.clock, self.round + 1))
    }

    /// After a round of `n` requests numbered `round`.
    fn end_round(&mut self, n: usize, round: u32) {
        self.round = round;
        self.clock += n as u64;
    }

    fn resolve_cpu(&mut self, req: &ResolveRequest<'_>, clock: u64, round: u32) -> Result<ResolveOutput> {
        let hs = req.host_slots.to_vec1::<u32>()?;
        let lp = req.logical.to_vec1::<u32>()?;
        let ow = req.owners.to_vec1::<u32>()?;
        let mut st = self.read_state()?;
        let inp = RoundInput {
            host_slots: &hs,
            logical: &lp,
            owners: &ow,
            clock,
            round,
            step: req.step,
            reuse_steps: req.reuse_steps,
        };
        reference::check_round(&st, &inp)?;
        let out = reference::resolve_round(&mut st, &inp);
        self.write_state(st)?;
        let n = hs.len();
        Ok(ResolveOutput {
            fast_pairs: Tensor::from_vec(out.fast_pairs, (n, 2), &self.device)?,
            ready_pairs: Tensor::from_vec(out.ready_pairs, (n, 2), &self.device)?,
            fetched_pairs: Tensor::from_vec(out.fetched_pairs, (n, 2), &self.device)?,
            spill_pairs: Tensor::from_vec(out.spill_pairs, (n, 2), &self.device)?,
            tiered_pairs: Tensor::from_vec(out.tiered_pairs, (n, 2), &self.device)?,
            tiered_src: Tensor::from_vec(out.tiered_src, n, &self.device)?,
            misses: Tensor::from_vec(out.misses, (n, 2), &self.device)?,
            miss_count: Tensor::from_vec(vec![out.miss_count], 1, &self.device)?,
        })
    }

    /// Fast slot of each host slot: `host_slots` `[n]` u32 → `[n]` u32, [`NONE`] where not
    /// resident (or a [`NONE`] query). No recency change (used for write-through).
    pub fn lookup(&self, host_slots: &Tensor) -> Result<Tensor> {
        const LOP: &str = "DeviceLru::lookup";
        if host_slots.rank() != 1 || host_slots.dtype() != DType::U32 {
            crate::invalid!(
                LOP,
                "host_slots must be u32 [n], got {:?} {:?}",
                host_slots.dims(),
                host_slots.dtype()
            );
        }
        if !host_slots.device().same_device(&self.device) {
            crate::invalid!(
                LOP,
                "host_slots {:?} is on {:?} but the LRU is on {:?}",
                host_slots.dims(),
                host_slots.device().location(),
                self.device.location()
            );
        }
        let q = host_slots.contiguous()?;
        if self.direct {
            return self.direct_lookup(&q);
        }
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => reference::lookup_cuda(&self.tags, &q, self.geometry()),
            _ => {
                let tags = self.tags.to_vec1::<u32>()?;
                let out = reference::lookup(&tags, self.buckets, self.ways, self.homes, &q.to_vec1::<u32>()?);
                let n = out.len();
                Ok(Tensor::from_vec(out, n, &self.device)?)
            }
        }
    }

    /// Write-through targets of new tokens: `slots` `[n]` u32 host slots and `rows` `[n]`
    /// u32 rows within their pages → `[n]` u32 `fast slot · page_size + row`, [`NONE`]
    /// where the page is not resident (or a [`NONE`] slot). One kernel on CUDA.
    pub fn fast_destinations(&self, slots: &Tensor, rows: &Tensor, page_size: usize) -> Result<Tensor> {
        const FOP: &str = "DeviceLru::fast_destinations";
        let n = slots.dims1().unwrap_or(usize::MAX);
        let ok = |t: &Tensor| t.rank() == 1 && t.dims()[0] == n && t.dtype() == DType::U32;
        if !ok(slots) || !ok(rows) {
            crate::invalid!(
                FOP,
                "slots and rows must be u32 [n] of one length, got {:?} {:?} and {:?} {:?}",
                slots.dims(),
                slots.dtype(),
                rows.dims(),
                rows.dtype()
            );
        }
        if ![slots, rows].iter().all(|t| t.device().same_device(&self.device)) {
            crate::invalid!(
                FOP,
                "slots and rows must be on the LRU's device {:?}",
                self.device.location()
            );
        }
        // Destinations must fit u32 (checked once: fast slots · page size).
        if (self.fast_slots() as u64) * (page_size as u64) >= NONE as u64 {
            crate::invalid!(
                FOP,
                "{} fast slots of {page_size} rows overflow u32 destinations",
                self.fast_slots()
            );
        }
        let (q, r) = (slots.contiguous()?, rows.contiguous()?);
        if self.direct {
            return self.direct_destinations(&q, &r, page_size);
        }
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => reference::fast_destinations_cuda(&self.tags, &q, &r, self.geometry(), page_size as u32),
            _ => {
                let tags = self.tags.to_vec1::<u32>()?;
                let out = reference::fast_destinations(
                    &tags,
                    self.buckets,
                    self.ways,
                    self.homes,
                    &q.to_vec1::<u32>()?,
                    &r.to_vec1::<u32>()?,
                    page_size as u32,
                );
                Ok(Tensor::from_vec(out, n, &self.device)?)
            }
        }
    }

    /// Host slots freed (sequence removed, step aborted): their fast copies become empty
    /// ways, their owners' resident counts drop and their reuse history is cleared.
    /// [`NONE`] entries and ids with a fast home are ignored; every other entry must be
    /// `< host_slots`.
    pub fn invalidate(&mut self, host_slots: &[u32]) -> Result<()> {
        let bad = |h: u32| h != NONE && h as usize >= self.host_slots && self.homes.slot(h).is_none();
        if let Some(&bad) = host_slots.iter().find(|&&h| bad(h)) {
            crate::invalid!(
                "DeviceLru::invalidate",
                "host slot {bad} out of range (host_slots = {}, fast homes {}, list of {})",
                self.host_slots,
                self.homes.count,
                host_slots.len()
            );
        }
        if host_slots.is_empty() || self.direct {
            // (Direct: a freed slot's fast copy is simply overwritten by its next owner.)
            return Ok(());
        }
        crate::fault::device_call("DeviceLru::invalidate")?;
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let list = Tensor::from_slice(host_slots, host_slots.len(), &self.device)?;
                reference::invalidate_cuda(&self.buffers(), &list, self.geometry())
            }
            _ => {
                let mut st = self.read_state()?;
                reference::invalidate(&mut st, host_slots);
                self.write_state(st)
            }
        }
    }
}
