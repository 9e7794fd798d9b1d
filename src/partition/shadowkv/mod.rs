//! `ShadowKV` (Sun et al., 2024): keys of the prefill are kept as a low-rank factor of
//! the **pre-RoPE** keys `[L, Hkv·D]` (truncated SVD, per layer and sequence) in the fast
//! tier, values stay in the capacity tier. Per chunk (= one page) a landmark — the mean of
//! its post-RoPE keys — is scored against the query; the top chunks per KV head are
//! **rebuilt**: keys from the factor, RoPE at their positions, values fetched from the
//! capacity tier. Outlier chunks (the lowest minimum cosine similarity of their keys to
//! their landmark), the local window and every token added after the prefill stay exact
//! and are always attended.
//!
//! The factor is computed at a sequence's first decode step in each layer over the full
//! chunks seen so far (the prefill, chunked or not): until then the algorithm buffers the
//! pre-RoPE keys; afterwards new tokens are exact and nothing is buffered.
//!
//! Two modes, chosen at `init`: with a fast tier that holds every page, the **device
//! mode** (`device.rs`) selects and rebuilds on the device from tables it keeps there, so
//! that decode steps of compressed sequences run padded and inside CUDA graphs; otherwise
//! the **host mode** below chooses on the device but hands the cache host lists, and
//! rebuilds per sequence and head.

mod compress;
mod device;

use super::{
    forget_seq, truncate_seq, DeviceRebuilt, IndexInput, MaterializeInput, Materialized, RebuiltKeys, SelectInput,
    Selection, SeqStates, SparseAlgorithm,
};
use crate::ops::{topk_indices, NONE};
use crate::rope::apply_rope;
use crate::{CacheConfig, Error, Result};
use candle_core::{DType, Device, Tensor};
use compress::rope_tables_upto;
use device::DeviceTables;

/// Configuration of [`ShadowKv`] (defaults: the ShadowKV paper's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowKvConfig {
    /// Tokens per chunk; must equal the cache's page size. Default 8.
    pub chunk_tokens: usize,
    /// Rank of the key factor (capped by the prefill length; must be <= Hkv·D). Default 160.
    pub rank: usize,
    /// Tokens of rebuilt chunks per decode step and KV head (`/ chunk_tokens` chunks).
    /// Default 2048.
    pub sparse_budget_tokens: usize,
    /// Outlier chunks per KV head kept exact and always attended. Default 48.
    pub outlier_chunks: usize,
    /// Most recent tokens always attended exactly. Default 32.
    pub window_tokens: usize,
}

impl Default for ShadowKvConfig {
    fn default() -> Self {
        Self {
            chunk_tokens: 8,
            rank: 160,
            sparse_budget_tokens: 2048,
            outlier_chunks: 48,
            window_tokens: 32,
        }
    }
}

impl ShadowKvConfig {
    /// Tokens attended per decode step and KV head once the prefill is compressed (tokens
    /// decoded since are added to this).
    pub fn budget_tokens(&self) -> usize {
        self.sparse_budget_tokens + self.outlier_chunks * self.chunk_tokens + self.window_tokens
    }

    /// A configuration attending about `budget_tokens` per step in total: outliers scale
    /// as in the paper (48 chunks per 2048 tokens, at least 1), the window is 32 tokens,
    /// the rest is the rebuilt-chunk budget.
    pub fn for_budget(budget_tokens: usize) -> Self {
        let d = Self::default();
        let outliers = (budget_tokens * d.outlier_chunks / d.sparse_budget_tokens).max(1);
        Self {
            outlier_chunks: outliers,
            sparse_budget_tokens: budget_tokens.saturating_sub(outliers * d.chunk_tokens + d.window_tokens),
            ..d
        }
    }
}

/// The compressed prefill of one (layer, sequence).
#[derive(Debug)]
struct Compressed {
    /// Compressed chunks (`chunks · P` tokens from position 0).
    chunks: usize,
    /// `[chunks·P, r]` f32 left factor (orthonormal columns).
    left: Option<Tensor>,
    /// `[r, Hkv·D]` f32 right factor.
    right: Option<Tensor>,
    /// `[Hkv, chunks, D]` f32 landmarks (mean post-RoPE key per chunk).
    landmarks: Option<Tensor>,
    /// `outlier[h][c]`: chunk `c` of head `h` is kept exact.
    outlier: Vec<Vec<bool>>,
    /// The outlier chunks of each head, ascending.
    outlier_ids: Vec<Vec<u32>>,
    /// `[Hkv, chunks]` f32: `-inf` at the outliers, 0 elsewhere (added to the landmark
    /// scores so that the device top-k skips them).
    outlier_mask: Option<Tensor>,
    /// Device mode: the left-factor pages holding this state's rows (the factors and
    /// landmarks live in the device tables then, not above).
    left_pages: Vec<u32>,
}

#[derive(Debug, Default)]
struct SeqState {
    len: usize,
    /// The sequence's owner index in the cache.
    owner: u32,
    /// `[len, Hkv, D]` pre-RoPE keys, until the prefill is compressed.
    prefill_k: Option<Tensor>,
    comp: Option<Compressed>,
    /// Compressed in an earlier layer's step ([`ShadowKv::compress_ahead`]), not yet
    /// taken by this layer (its `select` takes it when the chunk count still matches).
    ahead: Option<Compressed>,
}

/// ShadowKV: low-rank pre-RoPE keys, landmarks, outliers, rebuilt keys at decode.
#[derive(Debug)]
pub struct ShadowKv {
    cfg: ShadowKvConfig,
    page_size: usize,
    kv_heads: usize,
    q_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    dtype: DType,
    scale: f64,
    seqs: SeqStates<SeqState>,
    /// `cos`, `sin` `[positions, D/2]` f32 RoPE tables on the cache device, for the
    /// compression and the rebuilt keys (grown on demand; rows are gathered by position;
    /// [`rope_tables_upto`]).
    rope: Option<(Tensor, Tensor)>,
    /// Device mode's tables (`None`: host mode).
    device: Option<DeviceTables>,
    /// Layers compressed per sequence (a sequence is ready for device-only decode steps
    /// when all `layers` are).
    compressed_layers: std::collections::HashMap<u64, usize>,
    layers: usize,
    /// Whether a layer's first decode step also compresses the later layers' prefills of
    /// the same sequences ([`compress_ahead`](Self::compress_ahead)); `None`: on where the
    /// cache is on a CUDA device (resolved into `ahead_on` at `init`).
    ahead: Option<bool>,
    ahead_on: bool,
}

impl ShadowKv {
    /// A ShadowKV selector; checks the configuration (rank and page size are checked
    /// against the cache at `init`).
    pub fn new(cfg: ShadowKvConfig) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(format!("shadowkv: {m}")));
        if cfg.chunk_tokens == 0 || cfg.rank == 0 {
            return bad(format!(
                "chunk_tokens ({}) and rank ({}) must be >= 1",
                cfg.chunk_tokens, cfg.rank
            ));
        }
        if cfg.sparse_budget_tokens < cfg.chunk_tokens {
            return bad(format!(
                "the budget leaves no chunk to retrieve: sparse_budget_tokens = {} < one chunk of {} \
                 (a total budget must exceed outliers ({} chunks) + window ({} tokens))",
                cfg.sparse_budget_tokens, cfg.chunk_tokens, cfg.outlier_chunks, cfg.window_tokens
            ));
        }
        Ok(Self {
            cfg,
            page_size: 0,
            kv_heads: 0,
            q_heads: 0,
            head_dim: 0,
            rope_theta: 0.0,
            dtype: DType::F32,
            scale: 1.0,
            seqs: SeqStates::new(),
            rope: None,
            device: None,
            compressed_layers: Default::default(),
            layers: 0,
            ahead: None,
            ahead_on: false,
        })
    }

    /// Whether the first layer to decode a sequence also compresses that sequence's prefill
    /// in the later layers, in the same batched factorization. The later layers take their
    /// state when they reach it in the same step. It applies while a step compresses fewer
    /// sequences than the host has threads (rayon's pool), up to 128 matrices and 2^28 key
    /// elements in one batch: then the host's small Cholesky and eigen problems, one per
    /// matrix, keep its threads busy, and the layers share the device round trips. Off,
    /// each layer factorizes its own prefills. The results are the same either way (each
    /// matrix is factorized alone).
    ///
    /// Default: on where the cache lives on a CUDA device, off on the CPU, where the larger
    /// batches are slower (each temporary is a fresh allocation the size of the batch and
    /// falls out of the caches; see `docs/BENCHMARKS.md`).
    pub fn compress_ahead(mut self, on: bool) -> Self {
        self.ahead = Some(on);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ShadowKvConfig {
        &self.cfg
    }

    /// Chunks of `seq`'s prefill compressed in `layer` (`None` before its first decode).
    pub fn compressed_chunks(&self, layer: usize, seq: u64) -> Option<usize> {
        self.seqs.get(&(layer, seq))?.comp.as_ref().map(|c| c.chunks)
    }

    /// Outlier flags `[Hkv][chunks]` of `seq` in `layer`, once compressed.
    pub fn outliers(&self, layer: usize, seq: u64) -> Option<&[Vec<bool>]> {
        Some(&self.seqs.get(&(layer, seq))?.comp.as_ref()?.outlier)
    }

    /// First page that is always exact for a sequence of `num_tokens` tokens: the window
    /// and everything after the compressed chunks.
    fn exact_from(&self, comp: &Compressed, num_tokens: usize) -> usize {
        comp.chunks
            .min(num_tokens.saturating_sub(self.cfg.window_tokens) / self.page_size)
    }
}

impl SparseAlgorithm for ShadowKv {
    fn name(&self) -> String {
        format!(
            "shadowkv(rank={}, budget={}, outliers={}, window={})",
            self.cfg.rank, self.cfg.sparse_budget_tokens, self.cfg.outlier_chunks, self.cfg.window_tokens
        )
    }

    fn page_size_hint(&self) -> Option<usize> {
        Some(self.cfg.chunk_tokens)
    }

    fn rebuilds_keys(&self) -> bool {
        // Device mode rebuilds through `materialize_device` (and `materialize` in steps
        // whose requests cross to the host anyway).
        self.device.is_none()
    }

    fn device_only_decode(&self) -> bool {
        self.device.is_some()
    }

    fn decode_ready(&self, seqs: &[u64]) -> bool {
        seqs.iter()
            .all(|s| self.compressed_layers.get(s).is_some_and(|&n| n >= self.layers))
    }

    fn init(&mut self, cfg: &CacheConfig) -> Result<()> {
        if cfg.page_size != self.cfg.chunk_tokens {
            return Err(Error::Config(format!(
                "shadowkv: chunk_tokens ({}) must equal the cache page size ({}); build the cache with page_size {}",
                self.cfg.chunk_tokens, cfg.page_size, self.cfg.chunk_tokens
            )));
        }
        let n = cfg.num_kv_heads * cfg.head_dim;
        if self.cfg.rank > n {
            return Err(Error::Config(format!(
                "shadowkv: rank ({}) exceeds Hkv·D = {} · {} = {n}",
                self.cfg.rank, cfg.num_kv_heads, cfg.head_dim
            )));
        }
        self.page_size = cfg.page_size;
        self.kv_heads = cfg.num_kv_heads;
        self.q_heads = cfg.num_q_heads;
        self.head_dim = cfg.head_dim;
        self.rope_theta = cfg.rope_theta;
        self.dtype = cfg.dtype;
        self.scale = 1.0 / (cfg.head_dim as f64).sqrt();
        self.layers = cfg.num_layers;
        self.ahead_on = self.ahead.unwrap_or(cfg.device.is_cuda());
        self.device = if device::wanted(cfg) {
            Some(DeviceTables::new(cfg, self.cfg.rank, self.cfg.outlier_chunks)?)
        } else {
            None
        };
        Ok(())
    }

    fn index(&mut self, input: &IndexInput<'_>) -> Result<()> {
        for run in input.runs {
            let key = (input.layer, run.seq);
            let (len, compressed, buffered) = match self.seqs.get(&key) {
                Some(st) => (st.len, st.comp.is_some(), st.prefill_k.as_ref()),
                None => (0, false, None),
            };
            // Device mode: decode steps replayed from a CUDA graph run no host code, so a
            // compressed state's count may lag; it needs none (the tokens are exact).
            let lagging = self.device.is_some() && compressed && len < run.start;
            if len != run.start && !lagging {
                return Err(Error::Invalid {
                    op: "ShadowKv::index",
                    msg: format!(
                        "sequence {} layer {}: {len} tokens indexed but the step starts at {}",
                        run.seq, input.layer, run.start
                    ),
                });
            }
            // The fallible work first: on an error the state is left as it was.
            let prefill_k = if compressed {
                None
            } else {
                let k_new = input.k_pre_rope.narrow(0, run.row, run.n)?;
                Some(match buffered {
                    None => k_new.contiguous()?,
                    Some(old) => Tensor::cat(&[old, &k_new], 0)?,
                })
            };
            let st = self.seqs.entry(key).or_default();
            if prefill_k.is_some() {
                st.prefill_k = prefill_k;
            }
            st.len = run.start + run.n;
            st.owner = run.owner;
        }
        Ok(())
    }

    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        let (p, hkv) = (self.page_size, self.kv_heads);
        let g = self.q_heads / hkv;
        let per_head = self.cfg.sparse_budget_tokens / p;
        let layer = input.layer;
        let done = self.compress_for_select(input)?;
        // Device mode: the page slots of the compressed chunks, read once for all rows.
        let slots = match (&self.device, done.is_empty()) {
            (Some(_), false) => input.candidates.to_device(&Device::Cpu)?.to_vec3::<u32>()?,
            _ => Vec::new(),
        };
        for (seq, mut comp) in done {
            let st = self.seqs.get_mut(&(layer, seq)).ok_or(Error::UnknownSequence(seq))?;
            if let Some(dev) = self.device.as_mut() {
                let b = input.seqs.iter().position(|&s| s == seq).unwrap_or(0);
                dev.store(layer, st.owner, &mut comp, &slots[b])?;
            }
            st.comp = Some(comp);
            st.prefill_k = None;
            *self.compressed_layers.entry(seq).or_default() += 1;
        }
        if let Some(dev) = self.device.as_mut() {
            let per_head = self.cfg.sparse_budget_tokens / p;
            return dev.select(input.layer, input, per_head, self.cfg.window_tokens, self.scale);
        }
        let mut lists = Vec::with_capacity(input.seqs.len());
        for (b, &seq) in input.seqs.iter().enumerate() {
            let (nt, np) = (input.num_tokens[b], input.num_pages[b]);
            let key = (input.layer, seq);
            let comp = self
                .seqs
                .get(&key)
                .and_then(|s| s.comp.as_ref())
                .ok_or(Error::UnknownSequence(seq))?;
            let exact_from = self.exact_from(comp, nt);
            // The top `per_head` non-outlier chunks before `exact_from` per KV head, by
            // landmark score (descending, ties to the lower chunk), chosen on the device:
            // only `[Hkv, per_head]` ids cross to the host.
            let top = match (comp.landmarks.as_ref(), comp.outlier_mask.as_ref()) {
                (Some(lm), Some(mask)) if exact_from > 0 && per_head > 0 => {
                    let d = lm.dim(2)?;
                    let q = input.q.get(b)?.to_dtype(DType::F32)?.reshape((hkv, g, d))?;
                    let logits = (q.matmul(&lm.transpose(1, 2)?.contiguous()?)? * self.scale)?; // [Hkv, G, C]
                    let scores = candle_nn::ops::softmax_last_dim(&logits)?
                        .max(1)? // [Hkv, C]
                        .narrow(1, 0, exact_from)?
                        .add(&mask.narrow(1, 0, exact_from)?)?;
                    topk_indices(&scores.contiguous()?, per_head)?
                        .to_device(&Device::Cpu)?
                        .to_vec2::<u32>()?
                }
                _ => vec![Vec::new(); hkv],
            };
            let mut heads = vec![Vec::new(); hkv];
            for (h, pages) in heads.iter_mut().enumerate() {
                let outliers = &comp.outlier_ids[h];
                pages.extend(outliers.iter().copied().take_while(|&c| (c as usize) < exact_from));
                pages.extend(top[h].iter().copied().filter(|&c| c != NONE));
                pages.extend(exact_from as u32..np as u32);
                pages.sort_unstable();
            }
            lists.push(heads);
        }
        Selection::from_lists(&lists, hkv, input.q.device())
    }

    fn materialize(&mut self, input: &MaterializeInput<'_>) -> Result<Materialized> {
        if let Some(dev) = self.device.as_mut() {
            return dev.rebuild_lists(input);
        }
        let (p, d) = (self.page_size, self.head_dim);
        let mut rebuilt = Vec::with_capacity(input.seqs.len());
        let mut pieces = Vec::new();
        for (b, &seq) in input.seqs.iter().enumerate() {
            let comp = self
                .seqs
                .get(&(input.layer, seq))
                .and_then(|s| s.comp.as_ref())
                .ok_or(Error::UnknownSequence(seq))?;
            let exact_from = self.exact_from(comp, input.num_tokens[b]);
            let heads: Vec<Vec<u32>> = input.pages[b]
                .iter()
                .enumerate()
                .map(|(h, sel)| {
                    sel.iter()
                        .copied()
                        .filter(|&c| (c as usize) < exact_from && !comp.outlier[h][c as usize])
                        .collect()
                })
                .collect();
            if let (Some(left), Some(right)) = (comp.left.as_ref(), comp.right.as_ref()) {
                // Every head's token rows in one upload; their RoPE rows gathered by position.
                let rows: Vec<u32> = heads
                    .iter()
                    .flatten()
                    .flat_map(|&c| c * p as u32..(c + 1) * p as u32)
                    .collect();
                if !rows.is_empty() {
                    let (cos_t, sin_t) =
                        rope_tables_upto(&mut self.rope, comp.chunks * p, d, self.rope_theta, left.device())?;
                    let n_all = rows.len();
                    let idx = Tensor::from_vec(rows, n_all, left.device())?;
                    let (cos, sin) = (cos_t.index_select(&idx, 0)?, sin_t.index_select(&idx, 0)?);
                    let left_rows = left.index_select(&idx, 0)?; // [rows, r]
                    let mut off = 0;
                    for (h, chunks) in heads.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
                        let n = chunks.len() * p;
                        let k_pre = left_rows
                            .narrow(0, off, n)?
                            .matmul(&right.narrow(1, h * d, d)?.contiguous()?)? // [n, D]
                            .reshape((n, 1, d))?;
                        let k = apply_rope(&k_pre, &cos.narrow(0, off, n)?, &sin.narrow(0, off, n)?)?;
                        pieces.push(k.reshape((chunks.len(), p, d))?);
                        off += n;
                    }
                }
            }
            rebuilt.push(heads);
        }
        if pieces.is_empty() {
            return Ok(Materialized::FetchFromTiers);
        }
        let keys = Tensor::cat(&pieces, 0)?.to_dtype(self.dtype)?;
        Ok(Materialized::Rebuilt(RebuiltKeys { pages: rebuilt, keys }))
    }

    fn materialize_device(&mut self, layer: usize, values: &Tensor) -> Result<Option<DeviceRebuilt>> {
        match self.device.as_mut() {
            Some(dev) => dev.rebuild(layer, Some(values)),
            None => Ok(None),
        }
    }

    fn forget(&mut self, seq: u64) {
        if let Some(dev) = self.device.as_mut() {
            for ((_, s), st) in self.seqs.iter_mut() {
                if let (true, Some(c)) = (*s == seq, st.comp.as_mut()) {
                    dev.release(c);
                }
            }
        }
        self.compressed_layers.remove(&seq);
        forget_seq(&mut self.seqs, seq);
    }

    fn truncate(&mut self, seq: u64, len: usize) {
        // A compressed prefill cannot shrink below its compressed tokens: drop it then.
        let p = self.page_size;
        let (dev, counts) = (&mut self.device, &mut self.compressed_layers);
        truncate_seq(
            &mut self.seqs,
            seq,
            len,
            |st| st.len,
            |st| match st.comp.as_mut() {
                Some(c) if c.chunks * p > len => {
                    if let Some(dev) = dev.as_mut() {
                        dev.release(c);
                    }
                    if let Some(n) = counts.get_mut(&seq) {
                        *n = n.saturating_sub(1);
                    }
                    false
                }
                Some(_) => {
                    st.len = len;
                    true
                }
                None => {
                    st.prefill_k = st.prefill_k.as_ref().and_then(|k| k.narrow(0, 0, len).ok());
                    st.ahead = None;
                    st.len = len;
                    true
                }
            },
        );
    }
}
