//! Page requests of a step: where the new tokens go (host-tier destinations), and which
//! logical pages each (entry, KV head) attends in a layer, as selected by the algorithm —
//! left on the device for a decode-only step, built on the host otherwise.

use super::*;

impl SpinCache {
    /// Per entry and KV head, the logical pages to attend in the paged part, and whether
    /// the algorithm returned a page selection (not `All`). A decode-only step whose
    /// selection is a tensor stays on the device ([`Requests::Device`]); otherwise the
    /// lists are built on the host.
    pub(super) fn page_requests(
        &mut self,
        step: &mut StepState,
        layer: usize,
        q_rot: &Tensor,
    ) -> Result<(Requests, bool)> {
        let (p, hkv) = (self.cfg.page_size, self.cfg.num_kv_heads);
        let mut req: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); hkv]; step.entries.len()];
        // Prefill entries attend every page holding earlier tokens (dense): the plan's
        // `prefill_pages`, looked up on the device (`list_requests`), not host lists.
        for (ei, e) in step.entries.iter().enumerate() {
            if e.n > 1 && e.start > 0 {
                step.requested[ei] = true;
            }
        }
        let plan = &step.plan;
        let (decode, num_tokens, num_pages) = (&plan.decode, &plan.num_tokens, &plan.num_pages);
        if decode.is_empty() {
            return Ok((Requests::Lists(req), false));
        }
        let candidates = self.decode_candidates(step, layer)?;
        let q_dec = match &plan.decode_rows {
            // Every entry decodes: one query row each, in order.
            None => q_rot.clone(),
            Some(rows) => q_rot.index_select(rows, 0)?.contiguous()?,
        };
        // (Padding rows of a padded step have no sequence: u64::MAX.)
        let seqs: Vec<u64> = decode
            .iter()
            .map(|&ei| step.entries.get(ei).map_or(u64::MAX, |e| e.seq))
            .collect();
        let rows = match &plan.decode_entries {
            Some(idx) => plan.runs.index_select(idx, 0)?,
            None => plan.runs.clone(),
        };
        // A decode-only step keeps its requests on the device unless they must be seen
        // on the host (tracing) or rebuilt there (algorithms that rebuild keys).
        let device_ok = (step.padded.is_some() || decode.len() == step.entries.len())
            && self.trace.is_none()
            && !self.algo.rebuilds_keys();
        let input = SelectInput {
            layer,
            seqs: &seqs,
            q: &q_dec,
            rows: &rows,
            candidates: &candidates,
            num_pages,
            num_tokens,
            page_size: p,
            to_host: !device_ok,
        };
        let selection = self.algo.select(&input)?;
        let selected = matches!(selection, Selection::Pages(_));
        let chosen = match selection {
            Selection::All if device_ok => {
                // Every page: the logical ids 0..Nmax of each row; the device page tables
                // give NONE past a row's pages, and NONE requests are skipped.
                let (d, h, n) = candidates.dims3()?;
                let all = match (&step.plan.memo.all_pages, &step.plan.page_ids) {
                    (Some(all), _) if all.dims() == [d, h, n] => all.clone(),
                    (_, Some(ids)) => {
                        let all = ids.reshape((1, 1, n))?.broadcast_as((d, h, n))?.contiguous()?;
                        step.plan.memo.all_pages = Some(all.clone());
                        all
                    }
                    (_, None) => {
                        crate::invalid!("SparseKvCache::attend", "decode step without page ids (internal error)")
                    }
                };
                // Their host slots are the candidates, looked up already.
                return Ok((Requests::Device(all, Some(candidates)), false));
            }
            Selection::All => None,
            Selection::Pages(t) => {
                let (b, h2, k) = t.dims3()?;
                if b != decode.len() || h2 != hkv {
                    return Err(Error::Invalid {
                        op: "SparseAlgorithm::select",
                        msg: format!(
                            "{} returned a selection of shape {:?}, expected [{}, {hkv}, K]",
                            self.algo.name(),
                            t.dims(),
                            decode.len()
                        ),
                    });
                }
                let on_device = device_ok && t.dtype() == DType::U32 && t.device().same_device(&self.cfg.device);
                if on_device {
                    return Ok((Requests::Device(t, None), true));
                }
                // Host lists: the selection crosses to the host (mixed prefill/decode
                // steps, tracing, algorithms that rebuild keys).
                Some((t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()?, k))
            }
        };
        if step.padded.is_some() {
            // Host lists have a row per real entry only (padding rows have none).
            crate::invalid!(
                "SparseKvCache::attend",
                "{} returned a selection that must cross to the host, in a padded step \
                 (tracing turned on inside the step, or a selection that is not u32 on the \
                 cache's device)",
                self.algo.name()
            );
        }
        let step_no = self.total.steps + 1;
        for (bi, &ei) in decode.iter().enumerate() {
            let n = num_pages[bi];
            for h in 0..hkv {
                req[ei][h] = match &chosen {
                    None => (0..n as u32).collect(),
                    Some((sel, k)) => {
                        let mut v: Vec<u32> = sel[(bi * hkv + h) * k..][..*k]
                            .iter()
                            .copied()
                            .filter(|&x| x != NONE && (x as usize) < n)
                            .collect();
                        v.sort_unstable();
                        v.dedup();
                        v
                    }
                };
                if let Some(tr) = self.trace.as_mut() {
                    tr.push(SelectionRecord {
                        step: step_no,
                        layer: layer as u32,
                        seq: step.entries[ei].seq,
                        kv_head: h as u32,
                        num_pages: n as u32,
                        pages: req[ei][h].clone(),
                    });
                }
            }
        }
        Ok((Requests::Lists(req), selected))
    }

    /// Requests of a decode-only step from a selection `[S, Hkv, K]` left on the device:
    /// logical pages → host slots through the device page tables (unless `slots` holds
    /// them already). No host sync.
    pub(super) fn device_requests(
        &self,
        step: &mut StepState,
        layer: usize,
        sel: &Tensor,
        slots: Option<Tensor>,
    ) -> Result<PageRequests> {
        let hkv = self.cfg.num_kv_heads;
        let (s, _, k) = sel.dims3()?;
        let plan = &step.plan;
        let logical = sel.contiguous()?;
        let host_slots = match slots {
            Some(h) => h,
            None => {
                let rows = plan.table_rows.get(layer)?.flatten_all()?;
                let sel2 = logical.reshape((s * hkv, k))?;
                self.device_tables
                    .lookup_grid(&rows, Some(&sel2), k)?
                    .reshape((s, hkv, k))?
            }
        };
        let owners = match &step.plan.memo.owners {
            Some((kk, o)) if *kk == k && o.dim(0)? == s => o.clone(),
            _ => {
                let o = plan.owners.broadcast_as((s, hkv, k))?.contiguous()?;
                step.plan.memo.owners = Some((k, o.clone()));
                o
            }
        };
        if step.padded.is_none() {
            // (A padded step's rounds all come from here: its attended pages are the
            // LRU's resolved requests, counted at `end_step` without a kernel per layer.)
            let attended = host_slots.ne(NONE as f64)?.to_dtype(DType::F32)?.sum_all()?;
            step.attended_pages = Some(match step.attended_pages.take() {
                None => attended,
                Some(a) => (a + attended)?,
            });
        }
        Ok(PageRequests {
            host_slots,
            logical,
            owners,
        })
    }

    /// Requests of a step that is not decode-only: the decode entries' pages from host
    /// `lists` (per entry and KV head), and the prefill entries' earlier pages from the
    /// plan's `prefill_pages`, their slots looked up on the device. The two never share
    /// an entry's row, so they merge by an elementwise minimum (`NONE` is `u32::MAX`).
    /// `None` when no page is asked.
    pub(super) fn list_requests(
        &self,
        step: &StepState,
        layer: usize,
        lists: &[Vec<Vec<u32>>],
    ) -> Result<Option<PageRequests>> {
        let plan = &step.plan;
        let Some(pre) = &plan.prefill_pages else {
            return self.host_requests(step, layer, lists, 0);
        };
        let (s, hkv, np) = pre.dims3()?;
        let rows = plan.table_rows.get(layer)?.flatten_all()?;
        let slots = self
            .device_tables
            .lookup_grid(&rows, Some(&pre.reshape((s * hkv, np))?), np)?
            .reshape((s, hkv, np))?;
        let Some(host) = self.host_requests(step, layer, lists, np)? else {
            return Ok(Some(PageRequests {
                host_slots: slots,
                logical: pre.clone(),
                owners: plan.owners.broadcast_as((s, hkv, np))?.contiguous()?,
            }));
        };
        let n = host.host_slots.dim(2)?;
        let widen = |t: &Tensor| -> Result<Tensor> {
            if n == np {
                return Ok(t.clone());
            }
            let none = Tensor::full(NONE, (s, hkv, n - np), t.device())?;
            Ok(Tensor::cat(&[t, &none], 2)?)
        };
        Ok(Some(PageRequests {
            host_slots: host.host_slots.minimum(&widen(&slots)?)?,
            logical: host.logical.minimum(&widen(pre)?)?,
            owners: plan.owners.broadcast_as((s, hkv, n))?.contiguous()?,
        }))
    }

    /// Requests from host lists (per entry and KV head), at least `min_n` wide; `None`
    /// when no list has a page.
    fn host_requests(
        &self,
        step: &StepState,
        layer: usize,
        lists: &[Vec<Vec<u32>>],
        min_n: usize,
    ) -> Result<Option<PageRequests>> {
        let hkv = self.cfg.num_kv_heads;
        let s = step.entries.len();
        let n = lists.iter().flatten().map(Vec::len).max().unwrap_or(0);
        if n == 0 {
            return Ok(None);
        }
        let n = n.max(min_n);
        let owners = &step.plan.owner_ids;
        let mut host_slots = vec![NONE; s * hkv * n];
        let mut logical = vec![NONE; s * hkv * n];
        let mut owner = vec![NONE; s * hkv * n];
        for (ei, heads) in lists.iter().enumerate() {
            let seq = step.entries[ei].seq;
            for (h, pages) in heads.iter().enumerate() {
                let base = (ei * hkv + h) * n;
                for (j, &lp) in pages.iter().enumerate() {
                    host_slots[base + j] = self.tables.get(seq, layer * hkv + h, lp as usize)?;
                    logical[base + j] = lp;
                    owner[base + j] = owners[ei];
                }
            }
        }
        let dev = &self.cfg.device;
        Ok(Some(PageRequests {
            host_slots: Tensor::from_vec(host_slots, (s, hkv, n), dev)?,
            logical: Tensor::from_vec(logical, (s, hkv, n), dev)?,
            owners: Tensor::from_vec(owner, (s, hkv, n), dev)?,
        }))
    }
}
