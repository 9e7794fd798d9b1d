//! The step plan: every fact about a step that does not change from layer to layer,
//! computed once in `begin_step` — which entries decode, how many tokens and pages each
//! sees, the new tokens' destinations in every layer (expanded on the device from a few
//! words per row), the device page-table rows and owners of the entries, the prefill
//! entries' earlier pages — with one host-to-device upload per tensor. Layers then only
//! slice it and run device ops: no host walk of the page tables and no upload per layer
//! on the decode path (the device page tables are its only table).

use super::*;
use crate::ops::decode_plan::{expand_decode_plan, PlanWords};

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
    /// The real entries as the algorithms see them (owners included), built once.
    pub token_runs: Vec<TokenRun>,
    /// `[S, 4]` u32 runs table `(owner, start, n, row)` of the entries
    /// ([`TokenRun::table`]; padding entries have `n = 0`).
    pub runs: Tensor,
    /// `[Nmax]` u32 logical pages `0..Nmax`, Nmax = the largest `num_pages` (decode only).
    pub page_ids: Option<Tensor>,
    /// `[S, Hkv, Np]` u32 logical pages a prefill entry attends besides its own tokens,
    /// `0..⌈start/P⌉` from column 0, `NONE` elsewhere (and in every other entry's rows);
    /// `None` when no prefill entry has earlier tokens. Each layer looks up their slots
    /// on the device, so prefills need no host walk of the tables and no upload per layer.
    pub prefill_pages: Option<Tensor>,
    /// `[D]` u32 query rows of the decode entries, when the step mixes decode and prefill.
    pub decode_rows: Option<Tensor>,
    /// `[D]` u32 entry indices of the decode entries, when the step mixes decode and prefill.
    pub decode_entries: Option<Tensor>,
    /// `[D]` u32 tokens each decode entry attends (its key limit), when the step mixes
    /// decode and prefill; otherwise the step's `kv_limit` is that already.
    pub decode_limit: Option<Tensor>,
    /// Broadcasts every layer would otherwise copy again (made by the first that needs
    /// them).
    pub memo: PlanMemo,
}

/// Broadcasts of a step plan that the layers of a decode-only step share: one copy per
/// step instead of one per layer.
#[derive(Debug, Default)]
pub(super) struct PlanMemo {
    /// `[S, Hkv, Nmax]` u32: [`StepPlan::page_ids`] for every (entry, KV head), the
    /// requests of a selection of every page.
    pub all_pages: Option<Tensor>,
    /// `[S, Hkv, K]` u32: [`StepPlan::owners`] for every request, with its `K`.
    pub owners: Option<(usize, Tensor)>,
}

/// The host side of a step plan: `[L, S, Hkv]` table rows and `[S]` owners (S entries),
/// and the words [`expand_decode_plan`] expands into the `[L, R, Hkv]` destinations
/// (R rows: each row's position and its entry's table row of (layer 0, head 0)); rows
/// and entries past the real ones are padding (`NONE` rows, owner 0).
pub(super) struct PlanVectors {
    pub table_rows: Vec<u32>,
    pub owners: Vec<u32>,
    pub lay: PlanWords,
    pub words: Vec<u32>,
}

/// The entries as [`TokenRun`]s, with their owner indices (`owners[i]` is entry `i`'s).
pub(super) fn token_runs(entries: &[StepEntry], owners: &[u32]) -> Vec<TokenRun> {
    entries
        .iter()
        .zip(owners)
        .map(|(e, &owner)| TokenRun {
            seq: e.seq,
            start: e.start,
            n: e.n,
            row: e.row,
            owner,
        })
        .collect()
}

/// [`StepPlan::prefill_pages`] of `entries` (pages of `p` tokens, `hkv` KV heads).
fn prefill_pages(entries: &[StepEntry], p: usize, hkv: usize, dev: &Device) -> Result<Option<Tensor>> {
    let earlier = |e: &StepEntry| if e.n > 1 { e.start.div_ceil(p) } else { 0 };
    let np = entries.iter().map(earlier).max().unwrap_or(0);
    if np == 0 {
        return Ok(None);
    }
    let mut v = vec![NONE; entries.len() * hkv * np];
    for (ei, e) in entries.iter().enumerate() {
        for h in 0..hkv {
            let row = &mut v[(ei * hkv + h) * np..][..earlier(e)];
            for (j, x) in row.iter_mut().enumerate() {
                *x = j as u32;
            }
        }
    }
    Ok(Some(Tensor::from_vec(v, (entries.len(), hkv, np), dev)?))
}

impl SpinCache {
    /// Writes the host words `host` at the start of `words` `[lay.total]` u32 and expands
    /// the `[L, rows, Hkv]` destinations, slots, rows in page and table rows from them on
    /// the device ([`expand_decode_plan`]): the step plan's and a padded step's.
    pub(super) fn expand_plan(&self, words: &Tensor, host: &[u32], lay: &PlanWords) -> Result<()> {
        words.slice_set(&Tensor::from_slice(host, host.len(), &self.cfg.device)?, 0, 0)?;
        let t = &self.device_tables;
        expand_decode_plan(words, &t.directory, &t.leaves, lay, self.cfg.page_size)
    }

    /// The host vectors of a plan over `entries` with `rows >= their tokens` rows and
    /// `slots >= entries.len()` entries.
    pub(super) fn plan_vectors(&self, entries: &[StepEntry], rows: usize, slots: usize) -> Result<PlanVectors> {
        let (hkv, layers) = (self.cfg.num_kv_heads, self.cfg.num_layers);
        let lay = PlanWords::new(rows, layers, hkv, 0);
        let mut v = PlanVectors {
            table_rows: vec![NONE; layers * slots * hkv],
            owners: vec![0; slots],
            lay,
            words: vec![0; lay.host_words()],
        };
        v.words[lay.row0..lay.row0 + rows].fill(NONE);
        // One table-row lookup per entry (a sequence's directories own consecutive rows);
        // the destinations are looked up on the device.
        for (ei, e) in entries.iter().enumerate() {
            let row0 = self.device_tables.row(e.seq, 0).ok_or_else(|| Error::Invalid {
                op: "SparseKvCache::begin_step",
                msg: format!("sequence {} has no device page-table row (internal error)", e.seq),
            })?;
            for layer in 0..layers {
                for h in 0..hkv {
                    v.table_rows[(layer * slots + ei) * hkv + h] = row0 + (layer * hkv + h) as u32;
                }
            }
            for i in 0..e.n {
                let r = e.row + i;
                v.words[lay.queries + 2 * r] = r as u32;
                v.words[lay.queries + 2 * r + 1] = (e.start + i) as u32;
                v.words[lay.row0 + r] = row0;
            }
        }
        for (ei, e) in entries.iter().enumerate() {
            v.owners[ei] = self.owners.get(&e.seq).copied().ok_or(Error::UnknownSequence(e.seq))?;
        }
        Ok(v)
    }

    /// Builds the plan of a step whose pages are allocated and mirrored on the device.
    pub(super) fn step_plan(&self, entries: &[StepEntry], total: usize) -> Result<StepPlan> {
        let (p, hkv, layers) = (self.cfg.page_size, self.cfg.num_kv_heads, self.cfg.num_layers);
        let dev = &self.cfg.device;
        let s = entries.len();
        let decode: Vec<usize> = (0..s).filter(|&ei| entries[ei].n == 1).collect();
        let num_tokens: Vec<usize> = decode.iter().map(|&ei| entries[ei].start + 1).collect();
        let num_pages: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(p)).collect();
        let v = self.plan_vectors(entries, total, s)?;
        let shape = (layers, total, hkv);
        // `[L, T, Hkv]` destinations, slots and rows in page, from the device page tables:
        // one upload of a few words per row, not of the `L · T · Hkv` planes.
        let lay = v.lay;
        let plane = lay.plane();
        let words = Tensor::zeros(lay.total, DType::U32, dev)?;
        self.expand_plan(&words, &v.words, &lay)?;
        let part = |at: usize| -> Result<Tensor> { Ok(words.narrow(0, at, plane)?.reshape(shape)?) };
        let nmax = num_pages.iter().copied().max().unwrap_or(0);
        let page_ids = if decode.is_empty() {
            None
        } else {
            Some(Tensor::from_vec((0..nmax as u32).collect::<Vec<u32>>(), nmax, dev)?)
        };
        let (decode_rows, decode_entries, decode_limit) = if decode.is_empty() || decode.len() == s {
            (None, None, None)
        } else {
            let r: Vec<u32> = decode.iter().map(|&ei| entries[ei].row as u32).collect();
            let e: Vec<u32> = decode.iter().map(|&ei| ei as u32).collect();
            let t: Vec<u32> = num_tokens.iter().map(|&t| t as u32).collect();
            (
                Some(Tensor::from_vec(r, decode.len(), dev)?),
                Some(Tensor::from_vec(e, decode.len(), dev)?),
                Some(Tensor::from_vec(t, decode.len(), dev)?),
            )
        };
        let token_runs = token_runs(entries, &v.owners);
        let prefill_pages = prefill_pages(entries, p, hkv, dev)?;
        Ok(StepPlan {
            runs: TokenRun::table(&token_runs, dev)?,
            token_runs,
            dst: part(lay.dst)?,
            dst_slots: part(lay.dst_slots)?,
            dst_rows: part(lay.dst_rows)?,
            none: Tensor::from_vec(vec![NONE; total * hkv], (total, hkv), dev)?,
            table_rows: Tensor::from_vec(v.table_rows, (layers, s, hkv, 1), dev)?,
            owners: Tensor::from_vec(v.owners.clone(), (s, 1, 1), dev)?,
            owner_ids: v.owners,
            page_ids,
            prefill_pages,
            decode_rows,
            decode_entries,
            decode_limit,
            memo: PlanMemo::default(),
            decode,
            num_tokens,
            num_pages,
        })
    }

    /// `[D, Hkv, Nmax]` u32 host slots of every page of each decode entry in `layer`
    /// (`NONE` past an entry's pages, held past its length ones included), looked up in
    /// the device page tables on the device.
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
        // Each decode entry's tokens (its key limit): pages from there on are reserved.
        let tokens = plan.decode_limit.as_ref().unwrap_or(&step.kv_limit);
        // Pages 0..Nmax of every (entry, head) row: one grid lookup.
        let rows = rows.flatten_all()?;
        let limit = ops::GridLimit {
            tokens,
            group: hkv,
            page_size: self.cfg.page_size,
        };
        Ok(self
            .device_tables
            .lookup_grid_limited(&rows, None, nmax, limit)?
            .reshape((d, hkv, nmax))?)
    }
}

impl SpinCache {
    /// The tensor-core prefill plan of a step (`None` when the step has no prefill chunk,
    /// or the cache's device, dtype or head dim has no such kernel: CUDA, f16/bf16, head
    /// dim 64/96/128). A chunk walks the page list of its earlier pages, `0..⌈start/P⌉`,
    /// in the order the requests lay them out. `queries` is the step's host query
    /// placement, `(entry, position)` per row.
    pub(super) fn prefill_plan(&self, entries: &[StepEntry], queries: &[u32]) -> Result<Option<PrefillPlan>> {
        let c = &self.cfg;
        let on = c.device.is_cuda() && ops::prefill_attention_supported(c.dtype, c.head_dim, &c.device);
        if !on || entries.iter().all(|e| e.n <= 1) {
            return Ok(None);
        }
        let chunks: Vec<ops::PrefillChunk> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.n > 1)
            .map(|(ei, e)| ops::PrefillChunk {
                seq: ei as u32,
                row: e.row as u32,
                start: e.start as u32,
                n: e.n as u32,
                list_len: e.start.div_ceil(c.page_size) as u32,
            })
            .collect();
        let group = c.num_q_heads / c.num_kv_heads;
        let tiles = ops::PrefillTiles::new(&chunks, group, c.page_size, &c.device)?;
        // The chunks' rows name no sequence.
        let mut decode_queries = queries.to_vec();
        for e in entries.iter().filter(|e| e.n > 1) {
            for r in e.row..e.row + e.n {
                decode_queries[2 * r] = NONE;
            }
        }
        let rows = decode_queries.len() / 2;
        Ok(Some(PrefillPlan {
            tiles,
            decode_queries: Tensor::from_vec(decode_queries, (rows, 2), &c.device)?,
            no_pages: Tensor::zeros((entries.len(), c.num_kv_heads, 0, 2), DType::U32, &c.device)?,
        }))
    }

    /// The number the next step gets (1-based), as the LRU records it.
    pub(super) fn step_number(&self) -> u32 {
        (self.total.steps + 1).min(u32::MAX as u64) as u32
    }

    /// Checks `inputs` and lays out the step's entries (rows in input order); fails with
    /// back-pressure when the host tier lacks the pages. Returns the entries and their
    /// total tokens. Changes nothing.
    pub(super) fn step_entries(&self, op: &'static str, inputs: &[StepInput]) -> Result<(Vec<StepEntry>, usize)> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op,
                msg: "a step is already open: call end_step or abort_step first".into(),
            });
        }
        if inputs.is_empty() {
            crate::invalid!(op, "a step needs at least one sequence");
        }
        let p = self.cfg.page_size;
        let mut entries = Vec::with_capacity(inputs.len());
        let mut row = 0usize;
        let mut needed = 0usize;
        for (i, inp) in inputs.iter().enumerate() {
            let seq = self.live(op, inp.seq)?;
            let len = self.lens[&seq];
            if inputs[..i].iter().any(|o| o.seq == inp.seq) {
                crate::invalid!(op, "sequence {seq} appears twice in one step");
            }
            if inp.new_tokens == 0 {
                crate::invalid!(op, "sequence {seq} brings 0 new tokens (need >= 1)");
            }
            // Checked: a huge `new_tokens` must not wrap around the limit.
            let total = len.checked_add(inp.new_tokens).filter(|&t| t <= self.cfg.max_seq_len);
            let Some(total) = total else {
                crate::invalid!(
                    op,
                    "sequence {seq} holds {len} tokens and brings {} new ones: more than max_seq_len {}",
                    inp.new_tokens,
                    self.cfg.max_seq_len
                );
            };
            // Pages the sequence holds past its length (`reserve`) take the tokens first.
            let new_pages = total.div_ceil(p).saturating_sub(self.tables.num_pages(seq)?);
            needed = needed.saturating_add(new_pages.saturating_mul(self.dirs()));
            entries.push(StepEntry {
                seq,
                start: len,
                n: inp.new_tokens,
                row,
                new_pages,
            });
            // Cannot wrap: each sequence holds at most max_seq_len (< 2^32) tokens and at
            // most max_sequences (< 2^32) sequences are live.
            row += inp.new_tokens;
        }
        self.check_room(needed)?;
        Ok((entries, row))
    }

    /// [`Error::PoolExhausted`] (back-pressure) unless `needed` host slots are free.
    pub(super) fn check_room(&self, needed: usize) -> Result<()> {
        let free = self.host_alloc.free_count();
        if needed > free {
            return Err(Error::PoolExhausted {
                tier: Tier::Host,
                needed,
                free,
            });
        }
        Ok(())
    }

    /// Appends `n` new logical pages (a page group each) to `seq`'s tables; the device
    /// tables take them at the next apply. The room was checked ([`check_room`](Self::check_room)).
    pub(super) fn push_pages(&mut self, seq: u64, n: usize) -> Result<()> {
        for _ in 0..n {
            let slots = self.host_alloc.alloc_group()?;
            self.tables.push_page(seq, &slots)?;
        }
        Ok(())
    }

    /// Reserves the entries' pages, mirrors them on the device and plans the step with
    /// `plan`; if any of that fails, gives the pages back (the device tables' change log
    /// keeps both, so the next apply ends consistent).
    pub(super) fn reserve_and_plan<P>(
        &mut self,
        entries: &[StepEntry],
        padded: bool,
        plan: impl FnOnce(&mut Self, &[StepEntry]) -> Result<P>,
    ) -> Result<P> {
        // Padded (decode-only) steps report their parts apart from ordinary steps'.
        let names = if padded {
            ["padded.plan.reserve", "padded.plan.apply_tables", "padded.plan.vectors"]
        } else {
            ["plan.reserve", "plan.apply_tables", "plan.vectors"]
        };
        let span = crate::host_timing::span(names[0]);
        for e in entries {
            self.push_pages(e.seq, e.new_pages)?;
            *self.lens.get_mut(&e.seq).ok_or(Error::UnknownSequence(e.seq))? += e.n;
        }
        drop(span);
        let span = crate::host_timing::span(names[1]);
        let applied = self.device_tables.apply(&mut self.tables);
        drop(span);
        let _span = crate::host_timing::span(names[2]);
        let planned = applied.and_then(|()| plan(self, entries));
        match planned {
            Ok(p) => Ok(p),
            Err(e) => {
                for en in entries {
                    self.unreserve(en)?;
                }
                Err(e)
            }
        }
    }
}
