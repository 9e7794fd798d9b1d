//! The rebuilt part of a decode step: attention over pages whose keys the algorithm
//! rebuilt (ShadowKV rebuilds keys from a low-rank factor), with values gathered from
//! their homes.

use super::*;

impl SpinCache {
    /// Attends the decode queries over pages whose keys the algorithm rebuilt: a
    /// step-local pool of those keys plus values gathered from their homes.
    pub(super) fn rebuilt_part(
        &self,
        step: &mut StepState,
        layer: usize,
        q_rot: &Tensor,
        decode: &[usize],
        rk: &RebuiltKeys,
    ) -> Result<AttentionPartial> {
        const OP: &str = "SparseAlgorithm::materialize";
        let (p, d, hkv) = (self.cfg.page_size, self.cfg.head_dim, self.cfg.num_kv_heads);
        let total: usize = rk.pages.iter().flatten().map(Vec::len).sum();
        if rk.pages.len() != decode.len() || rk.pages.iter().any(|h| h.len() != hkv) {
            crate::invalid!(
                OP,
                "{} rebuilt pages for {} sequences, expected {} sequences × {hkv} KV heads",
                self.algo.name(),
                rk.pages.len(),
                decode.len()
            );
        }
        if rk.keys.dims() != [total, p, d] || rk.keys.dtype() != self.cfg.dtype {
            crate::invalid!(
                OP,
                "{} rebuilt keys {:?} {:?}, expected [{total}, {p}, {d}] {:?}",
                self.algo.name(),
                rk.keys.dims(),
                rk.keys.dtype(),
                self.cfg.dtype
            );
        }
        let mut pairs = Vec::with_capacity(2 * total);
        let nmax = rk.pages.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1);
        let s = step.entries.len();
        let mut list = vec![NONE; s * hkv * nmax * 2];
        for (bi, &ei) in decode.iter().enumerate() {
            let e = &step.entries[ei];
            for (h, pages) in rk.pages[bi].iter().enumerate() {
                let base = (ei * hkv + h) * nmax * 2;
                for (j, &lp) in pages.iter().enumerate() {
                    if lp as usize >= (e.start + 1).div_ceil(p) {
                        crate::invalid!(OP, "{} rebuilt page {lp} past the sequence's end", self.algo.name());
                    }
                    let i = (pairs.len() / 2) as u32;
                    list[base + 2 * j] = i;
                    list[base + 2 * j + 1] = lp;
                    pairs.push(self.tables.get(e.seq, layer * hkv + h, lp as usize)?);
                    pairs.push(i);
                }
            }
        }
        let dev = &self.cfg.device;
        let gathered = Tensor::zeros((total, 2, p, d), self.cfg.dtype, dev)?;
        let from_host = self.gather_homes(&gathered, &pairs)?;
        let values = gathered.narrow(1, 1, 1)?;
        let pool = Tensor::cat(&[&rk.keys.unsqueeze(1)?, &values], 1)?.contiguous()?;
        step.stats.rebuilt_pages += total as u64;
        // Values read from the host tier (pages with a fixed fast slot are read in HBM).
        step.stats.bytes_moved += (from_host * self.cfg.page_bytes() / 2) as u64;
        let list = PageList {
            pages: Tensor::from_vec(list, (s, hkv, nmax, 2), dev)?,
            queries: step.queries.clone(),
            kv_limit: step.kv_limit.clone(),
        };
        ops::sparse_paged_attention(q_rot, &pool, &list, self.scale)
    }
}

impl SpinCache {
    /// Attends the decode queries over pages the algorithm rebuilt on the device
    /// ([`SparseAlgorithm::materialize_device`]): its step-local pool of rebuilt keys and
    /// their values (read from the direct-mapped fast tier). Device work only: nothing
    /// crosses to the host.
    pub(super) fn rebuilt_part_device(
        &self,
        step: &StepState,
        layer: usize,
        q_rot: &Tensor,
        rb: &DeviceRebuilt,
    ) -> Result<AttentionPartial> {
        const OP: &str = "SparseAlgorithm::materialize_device";
        let (p, d, hkv) = (self.cfg.page_size, self.cfg.head_dim, self.cfg.num_kv_heads);
        let rows = q_rot.dim(0)?;
        let dims = rb.pairs.dims();
        if dims.len() != 4 || dims[0] != rows || dims[1] != hkv || dims[3] != 2 {
            crate::invalid!(
                OP,
                "{} rebuilt pairs {dims:?}, expected [{rows}, {hkv}, K, 2] (rows, KV heads)",
                self.algo.name()
            );
        }
        let n = rows * hkv * dims[2];
        if rb.pool.dims() != [n, 2, p, d] || rb.pool.dtype() != self.cfg.dtype {
            crate::invalid!(
                OP,
                "{} rebuilt pool {:?} {:?}, expected [{n}, 2, {p}, {d}] {:?}",
                self.algo.name(),
                rb.pool.dims(),
                rb.pool.dtype(),
                self.cfg.dtype
            );
        }
        if !self.lru.is_direct() {
            crate::invalid!(
                OP,
                "{} rebuilt pages on the device, which needs a fast tier holding every page \
                 (CacheConfig::fast_tier_holds_every_page)",
                self.algo.name()
            );
        }
        // Counted on the device (no sync): `end_step` reads the step's total.
        ops::count_listed_into(&self.rebuilt_counts, layer, &rb.pairs)?;
        let list = PageList {
            pages: rb.pairs.clone(),
            queries: step.queries.clone(),
            kv_limit: step.kv_limit.clone(),
        };
        ops::sparse_paged_attention(q_rot, &rb.pool, &list, self.scale)
    }
}
