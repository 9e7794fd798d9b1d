//! Padded decode steps: decode-only steps of a fixed [`PaddedShape`] whose device inputs
//! live in buffers kept per shape and written in place (ten words per row plus the
//! caller's own words, e.g. the engine's token ids, staged by `begin` in the shape's
//! [`Mailbox`]; the step's preparation — `prepare_padded_step` or its first `attend` —
//! copies them in and computes the per-layer destinations, table rows and RoPE tables
//! from them on the device), so that two steps of one shape run the same device work on
//! the same addresses. That is the form a CUDA graph of the whole model's decode step is
//! captured in and replayed with (`spinkv::engine` does): the graph then holds the copy
//! and those launches too, and the host makes none of them. Rows past the real
//! sequences are padding: `NONE` destinations and page-table rows, `kv_limit` 0, so they
//! store nothing and attend nothing (their outputs are zeros).

use super::plan::StepPlan;
use super::*;
use crate::ops::decode_plan::{expand_decode_plan, PlanWords};
use crate::ops::Mailbox;

/// Batch sizes padded steps round up to (each is one captured graph per page bucket).
pub const PADDED_BATCHES: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// Candidate pages round up to a multiple of this many (larger: fewer graphs, more
/// `NONE` candidates per row).
pub const PADDED_PAGE_QUANTUM: usize = 64;

/// The padded steps' device inputs: buffers per shape.
#[derive(Debug, Default)]
pub(super) struct Padded {
    shapes: HashMap<PaddedShape, PaddedBuffers>,
}

/// Device inputs of the padded steps of one shape, written in place every step.
#[derive(Debug)]
pub(super) struct PaddedBuffers {
    /// Every u32 input; the step plan's tensors are views of it.
    words: Tensor,
    /// The host words of the shape's next step (begin stages them; the step's
    /// preparation copies them into `words`, inside a captured graph at a replay).
    mailbox: Mailbox,
    /// Extra words per step of this shape (fixed by its first step).
    extra_len: usize,
    /// `[2, B, D/2]` RoPE tables (cosines, sines) in the cache's dtype, written on the
    /// device from the positions.
    rope: Tensor,
    /// LRU rounds and requests of the last step of this shape run through `attend`.
    rounds: u32,
    requests: u64,
    /// The views of `words` and `rope` a step's plan and state hold (made once: a step
    /// only clones them).
    views: PaddedViews,
}

/// Views of one shape's buffers, `B` its batch, `L` layers, `Hkv` KV heads.
#[derive(Debug)]
struct PaddedViews {
    /// `[L, B, Hkv]` destinations, their slots and rows.
    dst: Tensor,
    dst_slots: Tensor,
    dst_rows: Tensor,
    /// `[B, Hkv]` of `NONE`.
    none: Tensor,
    /// `[L, B, Hkv, 1]` page-table rows.
    table_rows: Tensor,
    /// `[B, 1, 1]` owners.
    owners: Tensor,
    /// `[B, 4]` token runs.
    runs: Tensor,
    /// `[pages]` logical page ids.
    page_ids: Tensor,
    /// `[B, 2]` query table.
    queries: Tensor,
    /// `[B]` key limits.
    kv_limit: Tensor,
    /// `[B, D/2]` RoPE cosines and sines.
    cos: Tensor,
    sin: Tensor,
    /// `[extra]` the caller's words.
    extra: Tensor,
}

impl PaddedViews {
    fn new(
        words: &Tensor,
        rope: &Tensor,
        lay: &PlanWords,
        layers: usize,
        hkv: usize,
        pages: usize,
        extra: usize,
    ) -> Result<Self> {
        let b = lay.b;
        let view = |at: usize, n: usize| words.narrow(0, at, n);
        let plane = layers * b * hkv;
        Ok(Self {
            dst: view(lay.dst, plane)?.reshape((layers, b, hkv))?,
            dst_slots: view(lay.dst_slots, plane)?.reshape((layers, b, hkv))?,
            dst_rows: view(lay.dst_rows, plane)?.reshape((layers, b, hkv))?,
            none: view(lay.none, b * hkv)?.reshape((b, hkv))?,
            table_rows: view(lay.table_rows, plane)?.reshape((layers, b, hkv, 1))?,
            owners: view(lay.owners, b)?.reshape((b, 1, 1))?,
            runs: view(lay.runs, 4 * b)?.reshape((b, 4))?,
            page_ids: view(lay.page_ids, pages)?,
            queries: view(lay.queries, 2 * b)?.reshape((b, 2))?,
            kv_limit: view(lay.kv_limit, b)?,
            cos: rope.get(0)?,
            sin: rope.get(1)?,
            extra: view(lay.extra, extra)?,
        })
    }
}

impl SpinCache {
    /// Whether this cache can run padded steps at all: the algorithm decodes on the
    /// device alone, and no tracing or `reject_non_finite` (a read-back per layer) needs
    /// the host.
    fn can_pad(&self) -> bool {
        self.algo.device_only_decode() && self.trace.is_none() && !self.cfg.reject_non_finite
    }

    /// See [`SparseKvCache::padded_shape`].
    pub(super) fn padded_shape_of(&self, inputs: &[StepInput]) -> Option<PaddedShape> {
        if !self.can_pad() || inputs.is_empty() {
            return None;
        }
        let ids: Vec<u64> = inputs.iter().map(|i| i.seq.id).collect();
        if !self.algo.decode_ready(&ids) {
            return None;
        }
        let batch = *PADDED_BATCHES.iter().find(|&&b| b >= inputs.len())?;
        let mut pages = 0;
        for inp in inputs {
            let len = *self.lens.get(&inp.seq.id).filter(|_| inp.seq.cache == self.id)?;
            if inp.new_tokens != 1 {
                return None;
            }
            pages = pages.max((len + 1).div_ceil(self.cfg.page_size));
        }
        Some(PaddedShape {
            batch,
            pages: pages.div_ceil(PADDED_PAGE_QUANTUM).max(1) * PADDED_PAGE_QUANTUM,
        })
    }

    /// The buffers of `shape` (created by the first padded step of that shape).
    pub(super) fn padded_buffers(&self, shape: PaddedShape) -> Result<&PaddedBuffers> {
        self.padded.shapes.get(&shape).ok_or_else(|| Error::Invalid {
            op: "SparseKvCache::begin_padded_decode",
            msg: format!("no buffers for padded shape {shape:?} (internal error)"),
        })
    }

    /// See [`SparseKvCache::begin_padded_decode_with`]: returns the device view of `extra`.
    pub(super) fn begin_padded(&mut self, inputs: &[StepInput], shape: PaddedShape, extra: &[u32]) -> Result<Tensor> {
        const OP: &str = "SparseKvCache::begin_padded_decode";
        if !self.can_pad() {
            crate::invalid!(
                OP,
                "{} cannot run padded decode steps (its selection needs the host, tracing is on, \
                 or CacheConfig::reject_non_finite reads the inputs back)",
                self.algo.name()
            );
        }
        if let Some(i) = inputs.iter().position(|i| i.new_tokens != 1) {
            crate::invalid!(
                OP,
                "input {i} brings {} tokens: a padded step decodes one token per sequence",
                inputs[i].new_tokens
            );
        }
        let ids: Vec<u64> = inputs.iter().map(|i| i.seq.id).collect();
        if !self.algo.decode_ready(&ids) {
            crate::invalid!(
                OP,
                "{} needs an ordinary step first for some of these sequences (e.g. ShadowKV's \
                 compression at a sequence's first decode step); padded_shape is None until then",
                self.algo.name()
            );
        }
        let span = crate::host_timing::span("padded.begin.entries");
        let (entries, rows) = self.step_entries(OP, inputs)?;
        drop(span);
        let pages = self.longest_pages(&entries);
        if shape.batch < rows || shape.pages < pages {
            crate::invalid!(
                OP,
                "shape {shape:?} is smaller than the step needs: {rows} rows and {pages} pages"
            );
        }
        if let Some(bufs) = self.padded.shapes.get(&shape).filter(|b| b.extra_len != extra.len()) {
            crate::invalid!(
                OP,
                "{} extra words for shape {shape:?}, whose steps carry {} (the count is fixed by a shape's \
                 first step: a captured graph reads them in place)",
                extra.len(),
                bufs.extra_len
            );
        }
        crate::fault::device_call(OP)?;
        let (p, hkv, layers, half) = (
            self.cfg.page_size,
            self.cfg.num_kv_heads,
            self.cfg.num_layers,
            self.cfg.head_dim / 2,
        );
        let (b, dev) = (shape.batch, self.cfg.device.clone());
        let lay = PlanWords::with_extra(b, layers, hkv, shape.pages, extra.len());
        if !self.padded.shapes.contains_key(&shape) {
            // The constant words: the NONE plane and the logical pages 0..pages.
            let mut init = vec![0u32; lay.total];
            init[lay.none..lay.none + b * hkv].fill(NONE);
            for (i, w) in init[lay.page_ids..].iter_mut().enumerate() {
                *w = i as u32;
            }
            let words = Tensor::from_vec(init, lay.total, &dev)?;
            let rope = Tensor::zeros((2, b, half), self.cfg.dtype, &dev)?;
            let views = PaddedViews::new(&words, &rope, &lay, layers, hkv, shape.pages, extra.len())?;
            let bufs = PaddedBuffers {
                words,
                mailbox: Mailbox::new(OP, lay.host_words(), &dev)?,
                extra_len: extra.len(),
                rope,
                rounds: 0,
                requests: 0,
                views,
            };
            self.padded.shapes.insert(shape, bufs);
        }
        // The host words: queries, limits, directory rows and owners (padding rows: row
        // r at position 0, limit 0, no directory row, owner 0).
        let mut words = vec![0u32; lay.host_words()];
        for r in 0..b {
            words[lay.queries + 2 * r] = r as u32;
        }
        words[lay.row0..lay.row0 + b].fill(NONE);
        words[lay.extra..lay.extra + extra.len()].copy_from_slice(extra);
        for (ei, e) in entries.iter().enumerate() {
            words[lay.positions + ei] = e.start as u32;
            words[lay.queries + 2 * ei + 1] = e.start as u32;
            words[lay.kv_limit + ei] = (e.start + 1) as u32;
        }
        let span = crate::host_timing::span("padded.begin.lru_step");
        self.lru.set_step(self.step_number())?;
        drop(span);
        let span = crate::host_timing::span("padded.begin.plan");
        let rows = self.reserve_and_plan(&entries, true, |c, en| c.padded_rows(en))?;
        drop(span);
        let mut owner_ids = vec![0u32; b];
        for (ei, (row0, owner)) in rows.into_iter().enumerate() {
            words[lay.row0 + ei] = row0;
            words[lay.owners + ei] = owner;
            owner_ids[ei] = owner;
            let run = [owner, entries[ei].start as u32, 1, ei as u32];
            words[lay.runs + 4 * ei..][..4].copy_from_slice(&run);
        }
        let span = crate::host_timing::span("padded.begin.write");
        let written = match self.padded.shapes.get_mut(&shape) {
            Some(bufs) => bufs.mailbox.stage(&words),
            None => self.padded_buffers(shape).map(|_| ()),
        };
        drop(span);
        if let Err(e) = written {
            for en in &entries {
                self.unreserve(en)?;
            }
            return Err(e);
        }
        let v = &self.padded_buffers(shape)?.views;
        let num_tokens: Vec<usize> = (0..b).map(|r| entries.get(r).map_or(0, |e| e.start + 1)).collect();
        let num_pages: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(p)).collect();
        let plan = StepPlan {
            decode: (0..b).collect(),
            dst: v.dst.clone(),
            dst_slots: v.dst_slots.clone(),
            dst_rows: v.dst_rows.clone(),
            none: v.none.clone(),
            table_rows: v.table_rows.clone(),
            owners: v.owners.clone(),
            token_runs: super::plan::token_runs(&entries, &owner_ids),
            owner_ids,
            runs: v.runs.clone(),
            page_ids: Some(v.page_ids.clone()),
            prefill_pages: None,
            decode_rows: None,
            decode_entries: None,
            decode_limit: None,
            memo: Default::default(),
            num_tokens,
            num_pages,
        };
        let real_pages: u64 = entries.iter().map(|e| (e.start + 1).div_ceil(p) as u64).sum();
        let stats = StepStats {
            steps: 1,
            decode_rows: (entries.len() * layers) as u64,
            pages_available: real_pages * (hkv * layers) as u64,
            ..Default::default()
        };
        let n_entries = entries.len();
        let extra_view = v.extra.clone();
        self.step = Some(StepState {
            entries,
            total: b,
            cos: v.cos.clone(),
            sin: v.sin.clone(),
            queries: v.queries.clone(),
            kv_limit: v.kv_limit.clone(),
            attended: vec![false; layers],
            attended_pages: None,
            plan,
            requested: vec![true; n_entries],
            stats,
            failed: None,
            padded: Some(shape),
            rounds: 0,
            requests: 0,
            prefill: None,
            padded_prep: Some(lay),
        });
        Ok(extra_view)
    }

    /// A padded step's device work before its first layer: its staged host words copied
    /// in, the plan expanded from them ([`expand_decode_plan`]) and the RoPE tables of
    /// their positions ([`rope_tables_into`](crate::ops::rope_tables_into)), into the
    /// shape's buffers.
    pub(super) fn prepare_padded(&self, shape: PaddedShape, lay: &PlanWords) -> Result<()> {
        crate::fault::device_call("SparseKvCache::attend (a padded step's plan and RoPE tables)")?;
        let bufs = self.padded_buffers(shape)?;
        let span = crate::host_timing::span("attend.padded_prep.load");
        bufs.mailbox.load(&bufs.words)?;
        drop(span);
        let span = crate::host_timing::span("attend.padded_prep.expand");
        let t = &self.device_tables;
        expand_decode_plan(&bufs.words, &t.directory, &t.leaves, lay, self.cfg.page_size)?;
        drop(span);
        let _span = crate::host_timing::span("attend.padded_prep.rope");
        let positions = bufs.words.narrow(0, lay.positions, lay.b)?;
        crate::ops::rope_tables_into(&bufs.rope, &positions, self.cfg.rope_theta)?;
        Ok(())
    }

    /// Per entry of a padded step: its device page-table row of (layer 0, head 0) and its
    /// owner index.
    fn padded_rows(&self, entries: &[StepEntry]) -> Result<Vec<(u32, u32)>> {
        entries
            .iter()
            .map(|e| {
                let row0 = self.device_tables.row(e.seq, 0).ok_or_else(|| Error::Invalid {
                    op: "SparseKvCache::begin_padded_decode",
                    msg: format!("sequence {} has no device page-table row (internal error)", e.seq),
                })?;
                let owner = self.owners.get(&e.seq).copied().ok_or(Error::UnknownSequence(e.seq))?;
                Ok((row0, owner))
            })
            .collect()
    }

    fn longest_pages(&self, entries: &[StepEntry]) -> usize {
        entries
            .iter()
            .map(|e| (e.start + e.n).div_ceil(self.cfg.page_size))
            .max()
            .unwrap_or(0)
    }

    /// See [`SparseKvCache::prepare_padded_step`].
    pub(super) fn prepare_open_padded(&mut self) -> Result<()> {
        const OP: &str = "SparseKvCache::prepare_padded_step";
        let (shape, prep) = match &self.step {
            Some(StepState {
                padded: Some(shape),
                failed: None,
                padded_prep,
                ..
            }) => (*shape, *padded_prep),
            Some(StepState { failed: Some(why), .. }) => {
                return Err(Error::StepMisuse {
                    op: OP,
                    msg: format!("the step is poisoned ({why}): call abort_step, then run the step again"),
                })
            }
            _ => {
                return Err(Error::StepMisuse {
                    op: OP,
                    msg: "no padded decode step is open".into(),
                })
            }
        };
        let Some(lay) = prep else {
            return Ok(());
        };
        let done = self.prepare_padded(shape, &lay);
        if let Some(step) = self.step.as_mut() {
            match &done {
                Ok(()) => step.padded_prep = None,
                Err(e) => step.failed = Some(format!("the padded step's preparation failed: {e}")),
            }
        }
        done
    }

    /// See [`SparseKvCache::padded_step_replayed`].
    pub(super) fn mark_replayed(&mut self) -> Result<()> {
        const OP: &str = "SparseKvCache::padded_step_replayed";
        let (shape, attended) = match &self.step {
            Some(StepState {
                padded: Some(shape),
                attended,
                failed: None,
                ..
            }) => (*shape, attended),
            _ => crate::invalid!(OP, "no padded decode step is open (or it is poisoned)"),
        };
        if attended.iter().any(|&a| a) {
            crate::invalid!(
                OP,
                "layers of this step were attended already: replay a graph or attend, not both"
            );
        }
        let (rounds, requests) = {
            let bufs = self.padded_buffers(shape)?;
            (bufs.rounds, bufs.requests)
        };
        self.lru.count_replayed_rounds(rounds, requests);
        if let Some(step) = self.step.as_mut() {
            // The graph ran the step's preparation and every layer.
            step.padded_prep = None;
            step.attended.fill(true);
        }
        Ok(())
    }

    /// After a padded step that ran through `attend`: what a replay of it runs.
    pub(super) fn record_padded_rounds(&mut self, step: &StepState) {
        if let Some(bufs) = step.padded.and_then(|s| self.padded.shapes.get_mut(&s)) {
            if step.rounds > 0 {
                bufs.rounds = step.rounds;
                bufs.requests = step.requests;
            }
        }
    }
}
