//! `InfLLM` (Xiao et al., 2024): the context is cut into blocks of `block_tokens`; every
//! query attends a sink, a local window and the top-k blocks, scored by the dot product
//! of the head-concatenated query with each block's *representative keys* — the
//! `repr_topk` keys of the block that received the most attention while they were in
//! the local window. One block selection is shared by all heads.
//!
//! Metadata per (layer, sequence), on the cache device: the representative keys
//! `[Hkv, blocks · repr_topk, D]` of finalized blocks, plus, for tokens not yet in a
//! finalized block (the window and the block leaving it), their post-RoPE keys and the
//! attention mass they accumulated (host `f32`). A block is finalized when its last
//! token leaves the window of every later query.

use super::{
    forced_pages, forget_seq, truncate_seq, IndexInput, SelectInput, Selection, SeqStates, SparseAlgorithm, TokenRun,
};
use crate::ops::{topk_indices, NONE};
use crate::{CacheConfig, Error, Result};
use candle_core::{DType, Tensor, D};

/// Configuration of [`InfLlm`] (defaults: the InfLLM paper's Llama settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfLlmConfig {
    /// Tokens per block (a multiple of the page size). Default 128.
    pub block_tokens: usize,
    /// Leading tokens always attended. Default 128.
    pub sink_tokens: usize,
    /// Most recent tokens always attended; also the span over which keys collect attention
    /// mass. Default 4096.
    pub window_tokens: usize,
    /// Blocks retrieved per decode step. Default 16.
    pub topk_blocks: usize,
    /// Representative keys per block and KV head. Default 4.
    pub repr_topk: usize,
}

impl Default for InfLlmConfig {
    fn default() -> Self {
        Self {
            block_tokens: 128,
            sink_tokens: 128,
            window_tokens: 4096,
            topk_blocks: 16,
            repr_topk: 4,
        }
    }
}

impl InfLlmConfig {
    /// Tokens attended per decode step (at most): sink + window + retrieved blocks.
    pub fn budget_tokens(&self) -> usize {
        self.sink_tokens + self.window_tokens + self.topk_blocks * self.block_tokens
    }

    /// A configuration attending about `budget_tokens` per step, scaled down from the
    /// defaults for short contexts: block = `budget/16` rounded down to a power of two in
    /// `[16, 128]`, sink = `budget/16` in `[16, 128]`, window = `budget/4` in
    /// `[32, 4096]`, and as many blocks as fit in the rest.
    pub fn for_budget(budget_tokens: usize) -> Self {
        let block = (budget_tokens / 16).clamp(16, 128);
        Self::for_budget_with_block(budget_tokens, 1 << (usize::BITS - 1 - block.leading_zeros()))
    }

    /// [`for_budget`](Self::for_budget) with blocks of `block_tokens` instead: the same
    /// sink and window, and as many blocks as fit in the rest of the budget.
    pub fn for_budget_with_block(budget_tokens: usize, block_tokens: usize) -> Self {
        let sink = (budget_tokens / 16).clamp(16, 128);
        let window = (budget_tokens / 4).clamp(32, 4096);
        Self {
            block_tokens,
            sink_tokens: sink,
            window_tokens: window,
            topk_blocks: budget_tokens.saturating_sub(sink + window) / block_tokens.max(1),
            repr_topk: 4,
        }
    }
}

/// Per (layer, sequence) state (cheap to clone: tensors are shared, the mass vectors
/// hold at most a block and a window of tokens).
#[derive(Debug, Default, Clone)]
struct SeqState {
    /// Tokens indexed.
    len: usize,
    /// First token not in a finalized block (a multiple of the block size).
    pending_start: usize,
    /// `[len - pending_start, Hkv, D]` post-RoPE keys of the pending tokens.
    pending_k: Option<Tensor>,
    /// `[(len - pending_start) · Hkv]` attention mass of the pending tokens.
    mass: Vec<f32>,
    /// `[Hkv, blocks · R, D]` representative keys of the finalized blocks.
    repr: Option<Tensor>,
    /// Finalized blocks.
    blocks: usize,
    /// `(len, mass)` before the latest `index` call, to roll an aborted step back.
    undo: Option<(usize, Vec<f32>)>,
}

/// InfLLM block retrieval with representative keys.
#[derive(Debug)]
pub struct InfLlm {
    cfg: InfLlmConfig,
    page_size: usize,
    kv_heads: usize,
    q_heads: usize,
    scale: f64,
    seqs: SeqStates<SeqState>,
}

/// The mass one chunk of queries gives the pending keys: its first key, its key count
/// `Lk`, and the `[Hkv · Lk]` f32 mass (on the device).
type MassPart = (usize, usize, Tensor);

/// Largest `[Hq, queries, keys]` f32 score buffer of one mass chunk, in elements (64 MiB).
const MASS_ELEMS: usize = 1 << 24;

impl InfLlm {
    /// An InfLLM selector; checks the configuration (the page size is checked by the
    /// cache at `init`).
    pub fn new(cfg: InfLlmConfig) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(format!("infllm: {m}")));
        if cfg.block_tokens == 0 || cfg.window_tokens == 0 {
            return bad(format!(
                "block_tokens ({}) and window_tokens ({}) must be >= 1",
                cfg.block_tokens, cfg.window_tokens
            ));
        }
        if cfg.repr_topk == 0 || cfg.repr_topk > cfg.block_tokens {
            return bad(format!(
                "repr_topk ({}) must be in 1..=block_tokens ({})",
                cfg.repr_topk, cfg.block_tokens
            ));
        }
        if cfg.topk_blocks == 0 {
            return bad(format!(
                "the budget leaves no block to retrieve: sink ({}) + window ({}) use it all, topk_blocks = 0 \
                 (give a budget of at least sink + window + one block of {})",
                cfg.sink_tokens, cfg.window_tokens, cfg.block_tokens
            ));
        }
        Ok(Self {
            cfg,
            page_size: 0,
            kv_heads: 0,
            q_heads: 0,
            scale: 1.0,
            seqs: SeqStates::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &InfLlmConfig {
        &self.cfg
    }

    /// Finalized blocks of `seq` in `layer` (representative keys exist for them).
    pub fn finalized_blocks(&self, layer: usize, seq: u64) -> usize {
        self.seqs.get(&(layer, seq)).map_or(0, |s| s.blocks)
    }

    /// Finalizes the `nb` oldest pending blocks at once: each block's representative keys
    /// are the `repr_topk` keys per head with the most accumulated mass (ties: the earlier
    /// token), gathered with one `index_select`.
    fn finalize_blocks(&self, st: &mut SeqState, nb: usize) -> Result<()> {
        if nb == 0 {
            return Ok(());
        }
        let (bt, hkv, r) = (self.cfg.block_tokens, self.kv_heads, self.cfg.repr_topk);
        let pk = st
            .pending_k
            .as_ref()
            .ok_or_else(|| Error::Config("infllm: finalizing a block without keys".into()))?;
        let rows = pk.dim(0)?;
        let d = pk.dim(2)?;
        if rows < nb * bt || st.mass.len() < nb * bt * hkv {
            return Err(Error::Config(format!(
                "infllm: finalizing {nb} blocks of {bt} tokens with {rows} pending keys"
            )));
        }
        let mut idx = Vec::with_capacity(nb * hkv * r);
        let mut order: Vec<usize> = Vec::with_capacity(bt);
        for b in 0..nb {
            for h in 0..hkv {
                order.clear();
                order.extend(b * bt..(b + 1) * bt);
                order.sort_by(|&x, &y| st.mass[y * hkv + h].total_cmp(&st.mass[x * hkv + h]).then(x.cmp(&y)));
                idx.extend(order[..r].iter().map(|&t| (t * hkv + h) as u32));
            }
        }
        let idx = Tensor::from_vec(idx, nb * hkv * r, pk.device())?;
        // [nb, Hkv, R, D] → [Hkv, nb · R, D] (block-major within each head).
        let new = pk
            .narrow(0, 0, nb * bt)?
            .reshape((nb * bt * hkv, d))?
            .index_select(&idx, 0)?
            .reshape((nb, hkv, r, d))?
            .transpose(0, 1)?
            .reshape((hkv, nb * r, d))?;
        st.repr = Some(match st.repr.take() {
            None => new,
            Some(old) => Tensor::cat(&[&old, &new], 1)?,
        });
        st.pending_k = Some(pk.narrow(0, nb * bt, rows - nb * bt)?);
        st.mass.drain(..nb * bt * hkv);
        st.pending_start += nb * bt;
        st.blocks += nb;
        Ok(())
    }

    /// Query rows per mass chunk: the most (a power of two, 64 to 1024) whose `[Hq, rows,
    /// rows + window]` f32 scores stay within [`MASS_ELEMS`].
    fn mass_chunk(&self) -> usize {
        let (hq, w) = (self.q_heads.max(1), self.cfg.window_tokens);
        let mut c = 1024;
        while c > 64 && hq * c * (c + w) > MASS_ELEMS {
            c /= 2;
        }
        c
    }

    /// The attention mass the run's queries give the pending keys, each query over its
    /// local window `[p - window + 1, p]` (softmax normalized over that window, summed
    /// over the query heads of each KV head), left on the device: per chunk of queries,
    /// its first key, its key count `Lk` and the `[Hkv · Lk]` mass. The window mask is
    /// built on the device.
    fn window_mass(&self, st: &SeqState, run: &TokenRun, q: &Tensor) -> Result<Vec<MassPart>> {
        let (hkv, hq, w) = (self.kv_heads, self.q_heads, self.cfg.window_tokens);
        let g = hq / hkv;
        let pk = match st.pending_k.as_ref() {
            Some(pk) => pk.to_dtype(DType::F32)?,
            None => return Ok(Vec::new()),
        };
        let d = pk.dim(2)?;
        let dev = q.device();
        let ps = st.pending_start;
        let chunk = self.mass_chunk();
        let mut parts = Vec::new();
        let mut a = run.start;
        while a < run.start + run.n {
            let c = chunk.min(run.start + run.n - a);
            let lo = ps.max((a + 1).saturating_sub(w));
            let lk = a + c - lo;
            let keys = pk.narrow(0, lo - ps, lk)?.permute((1, 2, 0))?; // [Hkv, D, Lk]
            let qs = q
                .narrow(0, run.row + (a - run.start), c)?
                .to_dtype(DType::F32)?
                .reshape((c, hkv, g, d))?
                .permute((1, 2, 0, 3))?
                .reshape((hkv, g * c, d))?;
            // Query a + i sees key lo + j iff lo + j <= a + i < lo + j + w.
            let qpos = Tensor::arange(a as u32, (a + c) as u32, dev)?.reshape((c, 1))?;
            let kpos = Tensor::arange(lo as u32, (lo + lk) as u32, dev)?.reshape((1, lk))?;
            let kend = Tensor::arange((lo + w) as u32, (lo + lk + w) as u32, dev)?.reshape((1, lk))?;
            let visible = kpos.broadcast_le(&qpos)?.mul(&kend.broadcast_gt(&qpos)?)?;
            let mask = visible.where_cond(
                &Tensor::zeros((c, lk), DType::F32, dev)?,
                &Tensor::full(f32::NEG_INFINITY, (c, lk), dev)?,
            )?;
            let logits = (qs.contiguous()?.matmul(&keys.contiguous()?)? * self.scale)?
                .reshape((hkv, g, c, lk))?
                .broadcast_add(&mask.reshape((1, 1, c, lk))?)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            parts.push((lo, lk, probs.sum(2)?.sum(1)?.flatten_all()?)); // [Hkv · Lk]
            a += c;
        }
        Ok(parts)
    }

    /// Adds the masses of [`window_mass`](Self::window_mass) to the states' pending
    /// keys, all of them read from the device at once: `work[i]` is a state with the
    /// parts computed for it.
    fn add_masses(&self, work: &mut [(SeqState, Vec<MassPart>)]) -> Result<()> {
        let flat: Vec<&Tensor> = work.iter().flat_map(|(_, parts)| parts.iter().map(|p| &p.2)).collect();
        if flat.is_empty() {
            return Ok(());
        }
        let all = Tensor::cat(&flat, 0)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        let hkv = self.kv_heads;
        let mut off = 0;
        for (st, parts) in work.iter_mut() {
            let ps = st.pending_start;
            for (lo, lk, _) in parts.iter() {
                for h in 0..hkv {
                    for (j, &x) in all[off + h * lk..off + (h + 1) * lk].iter().enumerate() {
                        st.mass[(lo - ps + j) * hkv + h] += x;
                    }
                }
                off += hkv * lk;
            }
        }
        Ok(())
    }
}

impl SparseAlgorithm for InfLlm {
    fn name(&self) -> String {
        format!(
            "infllm(block={}, sink={}, window={}, topk={})",
            self.cfg.block_tokens, self.cfg.sink_tokens, self.cfg.window_tokens, self.cfg.topk_blocks
        )
    }

    fn partition_pages(&self, page_size: usize) -> usize {
        (self.cfg.block_tokens / page_size.max(1)).max(1)
    }

    fn init(&mut self, cfg: &CacheConfig) -> Result<()> {
        if self.cfg.block_tokens % cfg.page_size != 0 {
            return Err(Error::Config(format!(
                "infllm: block_tokens ({}) must be a multiple of the page size ({})",
                self.cfg.block_tokens, cfg.page_size
            )));
        }
        self.page_size = cfg.page_size;
        self.kv_heads = cfg.num_kv_heads;
        self.q_heads = cfg.num_q_heads;
        self.scale = 1.0 / (cfg.head_dim as f64).sqrt();
        Ok(())
    }

    fn index(&mut self, input: &IndexInput<'_>) -> Result<()> {
        let (bt, w) = (self.cfg.block_tokens, self.cfg.window_tokens);
        // Work on copies, stored only once every fallible step of every run succeeded: on
        // an error each sequence keeps the state it had before this call.
        let mut work = Vec::with_capacity(input.runs.len());
        for run in input.runs {
            let mut st = self.seqs.get(&(input.layer, run.seq)).cloned().unwrap_or_default();
            if st.len != run.start {
                return Err(Error::Invalid {
                    op: "InfLlm::index",
                    msg: format!(
                        "sequence {} layer {}: {} tokens indexed but the step starts at {}",
                        run.seq, input.layer, st.len, run.start
                    ),
                });
            }
            // Blocks whose last token is outside the window of every query from now on.
            let ready = (run.start + 1).saturating_sub(w + st.pending_start) / bt;
            self.finalize_blocks(&mut st, ready)?;
            st.undo = Some((run.start, st.mass.clone()));
            let k_new = input.k.narrow(0, run.row, run.n)?;
            st.pending_k = Some(match st.pending_k.take() {
                None => k_new.contiguous()?,
                Some(old) => Tensor::cat(&[&old, &k_new], 0)?,
            });
            st.mass.resize(st.mass.len() + run.n * self.kv_heads, 0.0);
            let parts = self.window_mass(&st, run, input.q)?;
            st.len += run.n;
            work.push((st, parts));
        }
        // One read from the device for every run's masses.
        self.add_masses(&mut work)?;
        for (run, (st, _)) in input.runs.iter().zip(work) {
            self.seqs.insert((input.layer, run.seq), st);
        }
        Ok(())
    }

    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        let p = self.page_size;
        let bp = self.cfg.block_tokens / p;
        let (sink_pages, _) = forced_pages(self.cfg.sink_tokens, 1, p);
        let hkv = self.kv_heads;
        let g = self.q_heads / hkv;
        let k = self.cfg.topk_blocks;
        // Per sequence: its forced pages, and the first block of its eligible range with
        // the `[1, k]` ids (within the range) of its top blocks, chosen on the device.
        let mut forced = Vec::with_capacity(input.seqs.len());
        let mut tops: Vec<(usize, usize, Tensor)> = Vec::new();
        for (b, &seq) in input.seqs.iter().enumerate() {
            let (nt, np) = (input.num_tokens[b], input.num_pages[b]);
            let st = self.seqs.get(&(input.layer, seq)).ok_or(Error::UnknownSequence(seq))?;
            let forced_from = st.pending_start.min(nt.saturating_sub(self.cfg.window_tokens)) / p;
            forced.push(
                (0..np as u32)
                    .filter(|&j| (j as usize) < sink_pages || j as usize >= forced_from)
                    .collect::<Vec<u32>>(),
            );
            // Eligible blocks: past the sink, before the forced tail.
            let (lo, hi) = (sink_pages / bp, forced_from.div_ceil(bp).min(st.blocks));
            if let (Some(repr), true) = (st.repr.as_ref(), lo < hi) {
                let d = repr.dim(2)?;
                let q = input.q.get(b)?.to_dtype(DType::F32)?.reshape((hkv, g, d))?;
                let kt = repr.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?; // [Hkv, D, NB·R]
                let scores = q
                    .matmul(&kt)? // [Hkv, G, NB·R]
                    .sum(1)?
                    .sum(0)?
                    .reshape((st.blocks, self.cfg.repr_topk))?
                    .mean(D::Minus1)?
                    .narrow(0, lo, hi - lo)?
                    .reshape((1, hi - lo))?;
                tops.push((b, lo, topk_indices(&scores, k)?));
            }
        }
        // One read from the device for every sequence's top blocks.
        let ids = if tops.is_empty() {
            Vec::new()
        } else {
            let t: Vec<&Tensor> = tops.iter().map(|x| &x.2).collect();
            Tensor::cat(&t, 0)?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec2::<u32>()?
        };
        for ((b, lo, _), row) in tops.iter().zip(&ids) {
            let (np, pages) = (input.num_pages[*b], &mut forced[*b]);
            for j in row.iter().filter(|&&j| j != NONE).map(|&j| lo + j as usize) {
                pages.extend((j * bp..((j + 1) * bp).min(np)).map(|x| x as u32));
            }
            pages.sort_unstable();
            pages.dedup();
        }
        let lists: Vec<Vec<Vec<u32>>> = forced.into_iter().map(|pages| vec![pages; hkv]).collect();
        Selection::from_lists(&lists, hkv, input.q.device())
    }

    fn forget(&mut self, seq: u64) {
        forget_seq(&mut self.seqs, seq);
    }

    fn truncate(&mut self, seq: u64, len: usize) {
        // An exact roll back needs the undo record of the step being aborted; otherwise
        // the sequence's metadata starts afresh.
        truncate_seq(
            &mut self.seqs,
            seq,
            len,
            |st| st.len,
            |st| match st.undo.take() {
                Some((at, mass)) if at == len && len >= st.pending_start => {
                    st.pending_k = st
                        .pending_k
                        .as_ref()
                        .and_then(|k| k.narrow(0, 0, len - st.pending_start).ok());
                    st.mass = mass;
                    st.len = len;
                    true
                }
                _ => false,
            },
        );
    }
}
