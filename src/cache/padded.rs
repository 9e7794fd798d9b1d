//! Padded decode steps: decode-only steps of a fixed [`PaddedShape`] whose device inputs
//! live in buffers kept per shape and written in place (one upload of every integer
//! input, one of the RoPE tables), so that two steps of one shape run the same device
//! work on the same addresses. That is the form a CUDA graph of the whole model's decode
//! step is captured in and replayed with (`spinkv::engine` does). Rows past the real
//! sequences are padding: `NONE` destinations and page-table rows, `kv_limit` 0, so they
//! store nothing and attend nothing (their outputs are zeros).

use super::plan::StepPlan;
use super::*;

/// Batch sizes padded steps round up to (each is one captured graph per page bucket).
pub const PADDED_BATCHES: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// Candidate pages round up to a multiple of this many (larger: fewer graphs, more
/// `NONE` candidates per row).
pub const PADDED_PAGE_QUANTUM: usize = 64;

/// Offsets of the u32 inputs of a padded step in one buffer.
struct WordLayout {
    queries: usize,
    kv_limit: usize,
    dst: usize,
    dst_slots: usize,
    dst_rows: usize,
    none: usize,
    table_rows: usize,
    owners: usize,
    page_ids: usize,
    total: usize,
}

impl WordLayout {
    fn new(b: usize, layers: usize, hkv: usize, pages: usize) -> Self {
        let plane = layers * b * hkv;
        let queries = 0;
        let kv_limit = queries + 2 * b;
        let dst = kv_limit + b;
        let dst_slots = dst + plane;
        let dst_rows = dst_slots + plane;
        let none = dst_rows + plane;
        let table_rows = none + b * hkv;
        let owners = table_rows + plane;
        let page_ids = owners + b;
        Self {
            queries,
            kv_limit,
            dst,
            dst_slots,
            dst_rows,
            none,
            table_rows,
            owners,
            page_ids,
            total: page_ids + pages,
        }
    }
}

/// Device inputs of the padded steps of one shape, written in place every step.
#[derive(Debug)]
pub(super) struct PaddedBuffers {
    /// Every u32 input; the step plan's tensors are views of it.
    words: Tensor,
    /// `[B, D/2]` RoPE tables in the cache's dtype.
    cos: Tensor,
    sin: Tensor,
    /// LRU rounds and requests of the last step of this shape run through `attend`.
    rounds: u32,
    requests: u64,
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
        self.padded.get(&shape).ok_or(Error::Invalid {
            op: "SparseKvCache::begin_padded_decode",
            msg: format!("no buffers for padded shape {shape:?} (internal error)"),
        })
    }

    /// See [`SparseKvCache::begin_padded_decode`].
    pub(super) fn begin_padded(&mut self, inputs: &[StepInput], shape: PaddedShape) -> Result<()> {
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
        crate::fault::device_call(OP)?;
        let (p, hkv, layers, half) = (
            self.cfg.page_size,
            self.cfg.num_kv_heads,
            self.cfg.num_layers,
            self.cfg.head_dim / 2,
        );
        let (b, dev) = (shape.batch, self.cfg.device.clone());
        let lay = WordLayout::new(b, layers, hkv, shape.pages);
        if !self.padded.contains_key(&shape) {
            let bufs = PaddedBuffers {
                words: Tensor::zeros(lay.total, DType::U32, &dev)?,
                cos: Tensor::zeros((b, half), self.cfg.dtype, &dev)?,
                sin: Tensor::zeros((b, half), self.cfg.dtype, &dev)?,
                rounds: 0,
                requests: 0,
            };
            self.padded.insert(shape, bufs);
        }
        // Positions, queries and limits do not depend on the reservation.
        let mut positions = vec![0u32; b];
        let mut words = vec![0u32; lay.total];
        for r in 0..b {
            words[lay.queries + 2 * r] = r as u32;
        }
        for (ei, e) in entries.iter().enumerate() {
            positions[ei] = e.start as u32;
            words[lay.queries + 2 * ei + 1] = e.start as u32;
            words[lay.kv_limit + ei] = (e.start + 1) as u32;
        }
        let span = crate::host_timing::span("padded.begin.rope");
        let (cos, sin) = rope_tables(&positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.dtype, &dev)?;
        drop(span);
        let span = crate::host_timing::span("padded.begin.lru_step");
        self.lru.set_step(self.step_number())?;
        drop(span);
        let span = crate::host_timing::span("padded.begin.plan");
        let v = self.reserve_and_plan(&entries, true, |c, en| c.plan_vectors(en, b, b))?;
        drop(span);
        for (at, src) in [
            (lay.dst, &v.dst),
            (lay.dst_slots, &v.slots),
            (lay.dst_rows, &v.rows),
            (lay.table_rows, &v.table_rows),
            (lay.owners, &v.owners),
        ] {
            words[at..at + src.len()].copy_from_slice(src);
        }
        words[lay.none..lay.none + b * hkv].fill(NONE);
        for (i, w) in words[lay.page_ids..lay.total].iter_mut().enumerate() {
            *w = i as u32;
        }
        let span = crate::host_timing::span("padded.begin.write");
        let written = self.write_padded(shape, &words, &cos, &sin);
        drop(span);
        let bufs = match written {
            Ok(bufs) => bufs,
            Err(e) => {
                for en in &entries {
                    self.unreserve(en)?;
                }
                return Err(e);
            }
        };
        let view = |at: usize, n: usize| bufs.words.narrow(0, at, n);
        let plane = layers * b * hkv;
        let num_tokens: Vec<usize> = (0..b).map(|r| entries.get(r).map_or(0, |e| e.start + 1)).collect();
        let num_pages: Vec<usize> = num_tokens.iter().map(|t| t.div_ceil(p)).collect();
        let plan = StepPlan {
            decode: (0..b).collect(),
            dst: view(lay.dst, plane)?.reshape((layers, b, hkv))?,
            dst_slots: view(lay.dst_slots, plane)?.reshape((layers, b, hkv))?,
            dst_rows: view(lay.dst_rows, plane)?.reshape((layers, b, hkv))?,
            none: view(lay.none, b * hkv)?.reshape((b, hkv))?,
            table_rows: view(lay.table_rows, plane)?.reshape((layers, b, hkv, 1))?,
            owners: view(lay.owners, b)?.reshape((b, 1, 1))?,
            owner_ids: v.owners,
            page_ids: Some(view(lay.page_ids, shape.pages)?),
            decode_rows: None,
            decode_entries: None,
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
        self.step = Some(StepState {
            entries,
            total: b,
            cos: bufs.cos.clone(),
            sin: bufs.sin.clone(),
            queries: view(lay.queries, 2 * b)?.reshape((b, 2))?,
            kv_limit: view(lay.kv_limit, b)?,
            attended: vec![false; layers],
            attended_pages: None,
            plan,
            requested: vec![true; n_entries],
            stats,
            failed: None,
            padded: Some(shape),
            rounds: 0,
            requests: 0,
        });
        Ok(())
    }

    /// Writes a padded step's inputs in place: one upload and one copy per buffer.
    fn write_padded(&self, shape: PaddedShape, words: &[u32], cos: &Tensor, sin: &Tensor) -> Result<&PaddedBuffers> {
        let bufs = self.padded_buffers(shape)?;
        let dev = &self.cfg.device;
        bufs.words
            .slice_set(&Tensor::from_slice(words, words.len(), dev)?, 0, 0)?;
        bufs.cos.slice_set(cos, 0, 0)?;
        bufs.sin.slice_set(sin, 0, 0)?;
        Ok(bufs)
    }

    fn longest_pages(&self, entries: &[StepEntry]) -> usize {
        entries
            .iter()
            .map(|e| (e.start + e.n).div_ceil(self.cfg.page_size))
            .max()
            .unwrap_or(0)
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
            step.attended.fill(true);
        }
        Ok(())
    }

    /// After a padded step that ran through `attend`: what a replay of it runs.
    pub(super) fn record_padded_rounds(&mut self, step: &StepState) {
        if let Some(bufs) = step.padded.and_then(|s| self.padded.get_mut(&s)) {
            if step.rounds > 0 {
                bufs.rounds = step.rounds;
                bufs.requests = step.requests;
            }
        }
    }
}
