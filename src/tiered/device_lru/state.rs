//! A [`DeviceLru`]'s state read back to the host and written from it: the step's
//! counters, residency, snapshots for tests, the whole state for the CPU reference's
//! rounds, and the views the CUDA rounds launch over.

#[cfg(feature = "cuda")]
use super::reference;
use super::{DeviceLru, LruState};
use crate::ops::NONE;
use crate::Result;
use candle_core::Tensor;

impl DeviceLru {
    /// Per-owner reuse counts of the step (`[max_owners]`) and the `[hits, misses,
    /// deferred]` counters since the last call; both are reset to 0. A device-to-host copy
    /// (meant for the end of a step); direct-mapped, one (the reuse counts are zeros).
    pub fn take_step_counters(&mut self) -> Result<(Vec<u32>, [u64; 3])> {
        crate::fault::device_call("DeviceLru::take_step_counters")?;
        // A direct-mapped round tracks no reuse: `reuse` stays zeros, not read.
        let reuse = if self.direct {
            vec![0; self.max_owners]
        } else {
            self.reuse.to_vec1::<u32>()?
        };
        let c = self.counters.to_vec1::<i64>()?;
        // In place: captured rounds keep counting into the same buffers.
        if !self.direct {
            self.reuse.zero_set()?;
        }
        self.counters.zero_set()?;
        Ok((reuse, [c[0] as u64, c[1] as u64, c[2] as u64]))
    }

    /// Fast slots holding a page: a device-to-host copy (diagnostics, pool usage). Direct:
    /// every fast slot stands for its host slot, so this is the capacity.
    pub fn resident_count(&self) -> Result<usize> {
        if self.direct {
            return Ok(self.capacity());
        }
        let tags = self.tags.to_vec1::<u32>()?;
        Ok(tags.iter().filter(|&&t| t != NONE).count())
    }

    /// Fast slots held per owner (`[max_owners]`): a device-to-host copy, for tests.
    pub fn resident_counts(&self) -> Result<Vec<u32>> {
        Ok(self.resident.to_vec1::<u32>()?)
    }

    /// Host view of the state, for tests: per fast slot its host slot (tag), owner
    /// ([`NONE`] for both when empty) and recency stamp (0 when empty). Direct: three
    /// empty vectors (no slot has state of its own).
    pub fn snapshot(&self) -> Result<(Vec<u32>, Vec<u32>, Vec<i64>)> {
        if self.direct {
            return Ok((Vec::new(), Vec::new(), Vec::new()));
        }
        Ok((
            self.tags.to_vec1::<u32>()?,
            self.owners.to_vec1::<u32>()?,
            self.stamps.to_vec1::<i64>()?,
        ))
    }

    pub(super) fn read_state(&self) -> Result<LruState> {
        let c = self.counters.to_vec1::<i64>()?;
        Ok(LruState {
            buckets: self.buckets,
            ways: self.ways,
            homes: self.homes,
            tags: self.tags.to_vec1()?,
            owners: self.owners.to_vec1()?,
            pinned: self.pinned.to_vec1()?,
            stamps: self.stamps.to_vec1()?,
            resident: self.resident.to_vec1()?,
            budgets: self.budgets.to_vec1()?,
            last_seen: self.last_seen.to_vec1()?,
            reuse: self.reuse.to_vec1()?,
            counters: [c[0] as u64, c[1] as u64, c[2] as u64],
        })
    }

    pub(super) fn write_state(&mut self, st: LruState) -> Result<()> {
        self.epoch += 1;
        let d = &self.device;
        let t = |v: Vec<u32>| -> Result<Tensor> {
            let n = v.len();
            Ok(Tensor::from_vec(v, n, d)?)
        };
        self.tags = t(st.tags)?;
        self.owners = t(st.owners)?;
        self.pinned = t(st.pinned)?;
        self.stamps = Tensor::from_vec(st.stamps, self.buckets * self.ways, d)?;
        self.resident = t(st.resident)?;
        self.last_seen = t(st.last_seen)?;
        self.reuse = t(st.reuse)?;
        self.counters = Tensor::from_vec(st.counters.map(|c| c as i64).to_vec(), 3, d)?;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    pub(super) fn geometry(&self) -> reference::Geometry {
        reference::Geometry {
            buckets: self.buckets,
            ways: self.ways,
            max_owners: self.max_owners,
            host_slots: self.host_slots,
            homes: self.homes,
        }
    }

    #[cfg(feature = "cuda")]
    pub(super) fn buffers(&self) -> reference::Buffers<'_> {
        reference::Buffers {
            tags: &self.tags,
            owners: &self.owners,
            pinned: &self.pinned,
            stamps: &self.stamps,
            resident: &self.resident,
            resident_snapshot: &self.resident_snapshot,
            budgets: &self.budgets,
            last_seen: &self.last_seen,
            reuse: &self.reuse,
            counters: &self.counters,
            head: &self.head,
            next: &self.next,
            state: &self.state,
        }
    }
}
