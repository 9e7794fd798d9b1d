//! The step plan: every fact about a step that does not change from layer to layer,
//! computed once in `begin_step` — which entries decode, how many tokens and pages each
//! sees, the new tokens' destinations in every layer, the device page-table rows and
//! owners of the entries — with one host-to-device upload per tensor. Layers then only
//! slice it and run device ops: no host walk of the page tables and no upload per layer
//! on the decode path (the device page tables are its only table).

use super::*;

/// Per-step facts shared by all layers (see the module docs).
#[derive(Debug)]
pub(super) struct StepPlan {
    /// Entries with one new token (decode), in entry order.
    pub decode: Vec<usize>,
    /// Per decode entry: tokens it attends (its length after the step).
    pub num_tokens: Vec<usize>,
    /// Per decode entry: its pages after the step.
    pub num_pages: Vec<usize>,
    /// `[L, T, Hkv]` u32 host-tier destinations `slot * P + row` of the step's tokens.
    pub dst: Tensor,
    /// `[L, T, Hkv]` u32 host slot of each destination.
    pub dst_slots: Tensor,
    /// `[L, T, Hkv]` u32 row of each destination within its page.
    pub dst_rows: Tensor,
    /// `[T, Hkv]` u32 filled with `NONE`.
    pub none: Tensor,
    /// `[L, S, Hkv, 1]` u32 device page-table row of each (layer, entry, KV head).
    pub table_rows: Tensor,
    /// `[S, 1, 1]` u32 owner index of each entry (LRU budgets, reuse counters).
    pub owners: Tensor,
    /// The same owner indices on the host (for requests built from host lists).
    pub owner_ids: Vec<u32>,
    /// `[Nmax]` u32 logical pages `0..Nmax`, Nmax = the largest `num_pages` (decode only).
    pub page_ids: Option<Tensor>,
    /// `[D]` u32 query rows of the decode entries, when the step mixes decode and prefill.
    pub decode_rows: Option<Tensor>,
    /// `[D]` u32 entry indices of the decode entries, when the step mixes decode and prefill.
    pub decode_entries: Option<Tensor>,
}

impl SpinCache {
    /// Builds the plan of a step whose pages are allocated and mirrored on the device.
    pub(super) fn step_plan(&self, entries: &[StepEntry], total: usize) -> Result<StepPlan> {
        let (p, hkv, layers) = (self.cfg.page_size, self.cfg.num_kv_heads, self.cfg.num_layers);
        let dev = &self.cfg.device;
        let s = entries.len();
        let decode: Vec<usize> = (0..s).filter(|&ei| entries[ei].n == 1).collect();
        let num_tokens: Vec<usize> = decode.iter().map(|&ei| entries[ei].start + 1).collect();
        let num_pages: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(p)).collect();

        let plane = total * hkv;
        let mut slots = vec![NONE; layers * plane];
        let mut rows = vec![0u32; layers * plane];
        let mut dst = vec![NONE; layers * plane];
        let mut table_rows = vec![NONE; layers * s * hkv];
        for layer in 0..layers {
            for (ei, e) in entries.iter().enumerate() {
                for h in 0..hkv {
                    let dir = layer * hkv + h;
                    table_rows[(layer * s + ei) * hkv + h] =
                        self.device_tables.row(e.seq, dir).ok_or(Error::Invalid {
                            op: "SparseKvCache::begin_step",
                            msg: format!("sequence {} has no device page-table row (internal error)", e.seq),
                        })?;
                    for i in 0..e.n {
                        let pos = e.start + i;
                        let slot = self.tables.get(e.seq, dir, pos / p)?;
                        let at = layer * plane + (e.row + i) * hkv + h;
                        slots[at] = slot;
                        rows[at] = (pos % p) as u32;
                        dst[at] = slot * p as u32 + (pos % p) as u32;
                    }
                }
            }
        }
        let shape = (layers, total, hkv);
        let owners = entries
            .iter()
            .map(|e| self.owners.get(&e.seq).copied().ok_or(Error::UnknownSequence(e.seq)))
            .collect::<Result<Vec<u32>>>()?;
        let nmax = num_pages.iter().copied().max().unwrap_or(0);
        let page_ids = if decode.is_empty() {
            None
        } else {
            Some(Tensor::from_vec((0..nmax as u32).collect::<Vec<u32>>(), nmax, dev)?)
        };
        let (decode_rows, decode_entries) = if decode.is_empty() || decode.len() == s {
            (None, None)
        } else {
            let r: Vec<u32> = decode.iter().map(|&ei| entries[ei].row as u32).collect();
            let e: Vec<u32> = decode.iter().map(|&ei| ei as u32).collect();
            (
                Some(Tensor::from_vec(r, decode.len(), dev)?),
                Some(Tensor::from_vec(e, decode.len(), dev)?),
            )
        };
        Ok(StepPlan {
            dst: Tensor::from_vec(dst, shape, dev)?,
            dst_slots: Tensor::from_vec(slots, shape, dev)?,
            dst_rows: Tensor::from_vec(rows, shape, dev)?,
            none: Tensor::from_vec(vec![NONE; plane], (total, hkv), dev)?,
            table_rows: Tensor::from_vec(table_rows, (layers, s, hkv, 1), dev)?,
            owners: Tensor::from_vec(owners.clone(), (s, 1, 1), dev)?,
            owner_ids: owners,
            page_ids,
            decode_rows,
            decode_entries,
            decode,
            num_tokens,
            num_pages,
        })
    }

    /// `[D, Hkv, Nmax]` u32 host slots of every page of each decode entry in `layer`
    /// (`NONE` past an entry's pages), looked up in the device page tables on the device.
    pub(super) fn decode_candidates(&self, step: &StepState, layer: usize) -> Result<Tensor> {
        let plan = &step.plan;
        let hkv = self.cfg.num_kv_heads;
        let (Some(pages), d) = (&plan.page_ids, plan.decode.len()) else {
            crate::invalid!("SparseKvCache::attend", "no decode entry in this step (internal error)");
        };
        let nmax = pages.dims1()?;
        let mut rows = plan.table_rows.get(layer)?;
        if let Some(idx) = &plan.decode_entries {
            rows = rows.index_select(idx, 0)?;
        }
        let rows = rows.broadcast_as((d, hkv, nmax))?.contiguous()?;
        let pages = pages
            .reshape((1, 1, nmax))?
            .broadcast_as((d, hkv, nmax))?
            .contiguous()?;
        let queries = Tensor::stack(&[&rows, &pages], 3)?.reshape((d * hkv * nmax, 2))?;
        Ok(self.device_tables.lookup(&queries)?.reshape((d, hkv, nmax))?)
    }
}
