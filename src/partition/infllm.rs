//! `InfLLM` (Xiao et al., 2024): the context is cut into blocks of `block_tokens`; every
//! query attends a sink, a local window and the top-k blocks, scored by the dot product
//! of the head-concatenated query with each block's *representative keys* — the
//! `repr_topk` keys of the block that received the most attention while they were in
//! the local window. One block selection is shared by all heads.
//!
//! All state lives on the cache device ([`crate::ops::infllm`] has its layout): per
//! (layer, owner index) a ring of the latest tokens' keys and attention masses, and per
//! page slot the representative keys of the finalized blocks. `index` and `select` are
//! device ops only, fed by the step's device tables of runs and decode rows, so padded
//! decode steps and CUDA graphs run InfLLM ([`SparseAlgorithm::device_only_decode`]).
//! A block is finalized when its last token leaves the window of every later query.
//!
//! An aborted step is rolled back exactly. A run that fits in one round (every decode
//! step does) has its masses restored on the device from the ring's undo plane, where
//! its flag shows that the step's write ran. Before indexing a longer run (a prefill chunk
//! of more than [`InfLlmGeometry::max_run`] tokens), the (layer, sequence)'s ring is
//! copied (per layer and such run, `ring · Hkv · D` elements of the cache dtype and
//! `16 · ring · Hkv` bytes of planes, held until the step ends:
//! [`SparseAlgorithm::commit`]); an abort writes it back. Only if that copy
//! failed is the sequence marked: its later steps then fail with an error naming it.
//!
//! Memory: the ring takes `L · max_sequences · (window + block + 256) · Hkv · D` elements
//! of the cache dtype (at the 8B shape, budget 2048 and 7 sequences: 0.4 GB; with the
//! default 4096-token window and 64 sequences: 19 GB), and the representative keys
//! `total_pages · kpp · D`.

use super::{forced_pages, IndexInput, SelectInput, Selection, SparseAlgorithm, TokenRun};
use crate::ops::infllm::{
    infllm_block_scores, infllm_finalize, infllm_mass_add, infllm_pages, infllm_restore, infllm_ring_write,
    infllm_window_mass,
};
use crate::ops::{topk_indices, InfLlmGeometry};
use crate::{CacheConfig, Error, Result};
use candle_core::{DType, Tensor};
use std::collections::{HashMap, HashSet};

/// Tokens of a run indexed in one round (the ring holds a window, a block and this).
const ROUND_TOKENS: usize = 256;

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

/// The device state (allocated at `init`).
#[derive(Debug)]
struct State {
    /// `[L, S, ring, Hkv, D]` keys of the latest tokens (cache dtype).
    ring_k: Tensor,
    /// `[L, S, 4, ring, Hkv]` u32: page slot, mass (f32 bits), masses before the latest
    /// ring write (f32 bits), and that write's start in the fourth plane's first word.
    ring_m: Tensor,
    /// `[slots, kpp, D]` representative keys by page slot (cache dtype).
    repr: Tensor,
    geo: InfLlmGeometry,
}

/// The latest `index` call of one (layer, sequence) this host made (recorded before its
/// device work, so that a call that failed part-way is known too).
#[derive(Debug, Clone, Copy)]
struct LastIndex {
    start: usize,
    n: usize,
}

/// One (layer, owner)'s ring as it was before an index call of a run longer than one
/// round (whose undo plane cannot roll it back), kept until the step ends.
#[derive(Debug)]
struct Snapshot {
    /// The run's first token.
    start: usize,
    /// `[ring, Hkv, D]` keys.
    k: Tensor,
    /// `[4, ring, Hkv]` u32 planes.
    m: Tensor,
}

/// InfLLM block retrieval with representative keys.
#[derive(Debug)]
pub struct InfLlm {
    cfg: InfLlmConfig,
    kv_heads: usize,
    scale: f32,
    state: Option<State>,
    last: HashMap<(usize, u64), LastIndex>,
    /// The owner index of every sequence indexed.
    owners: HashMap<u64, u32>,
    /// Sequences whose state an aborted step left unrecoverable.
    broken: HashSet<u64>,
    /// The rings of the open step's long runs before it, by (layer, sequence).
    snapshots: HashMap<(usize, u64), Snapshot>,
}

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
            kv_heads: 0,
            scale: 1.0,
            state: None,
            last: HashMap::new(),
            owners: HashMap::new(),
            broken: HashSet::new(),
            snapshots: HashMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &InfLlmConfig {
        &self.cfg
    }

    /// Blocks of `seq` in `layer` finalized by the latest `index` call this host made
    /// (steps replayed from a CUDA graph are not seen here).
    pub fn finalized_blocks(&self, layer: usize, seq: u64) -> usize {
        match (self.last.get(&(layer, seq)), &self.state) {
            (Some(l), Some(st)) => (l.start + l.n + 1).saturating_sub(st.geo.window) / st.geo.block,
            _ => 0,
        }
    }

    fn state(&self) -> Result<&State> {
        self.state
            .as_ref()
            .ok_or_else(|| Error::Config("infllm: used before init".into()))
    }

    fn check_live(&self, op: &'static str, seqs: impl IntoIterator<Item = u64>) -> Result<()> {
        for seq in seqs {
            if self.broken.contains(&seq) {
                return Err(Error::Invalid {
                    op,
                    msg: format!(
                        "sequence {seq}: an aborted step of more than {} tokens left its InfLLM state \
                         unrecoverable; remove the sequence",
                        self.state()?.geo.max_run()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Writes one round of runs (`table` `[R, 4]`, none longer than `max_n`) into the
    /// layer's ring, adds their masses and finalizes the blocks they complete.
    fn round(&self, layer: usize, input: &IndexInput<'_>, table: &Tensor, max_n: usize) -> Result<()> {
        let st = self.state()?;
        let (rk, rm) = (st.ring_k.get(layer)?, st.ring_m.get(layer)?);
        infllm_ring_write(&rk, &rm, input.k, input.dst, table, st.geo.page_size)?;
        infllm_window_mass(&rm, &rk, input.q, table, (st.geo.window, self.scale), max_n)?;
        infllm_finalize(&st.repr, &rk, &rm, table, &st.geo, max_n)
    }

    /// A step with runs of several tokens, in rounds of at most `max_run` tokens per run
    /// (what the ring holds past a window and a block), with tables built here: each
    /// round writes its keys, adds the masses (on CUDA one [`infllm_window_mass`] for all
    /// runs; on the CPU single tokens by that op and longer runs by batched products,
    /// [`Self::run_mass`]) and finalizes the blocks the round completes.
    fn prefill_rounds(&self, input: &IndexInput<'_>, max_n: usize) -> Result<()> {
        let st = self.state()?;
        let (rk, rm) = (st.ring_k.get(input.layer)?, st.ring_m.get(input.layer)?);
        let (cap, dev) = (st.geo.max_run(), input.q.device());
        let mut off = 0;
        while off < max_n {
            // Every run keeps its row in every round's table (n = 0 once it is done).
            let rows: Vec<TokenRun> = input
                .runs
                .iter()
                .map(|r| TokenRun {
                    start: r.start + off.min(r.n),
                    n: cap.min(r.n.saturating_sub(off)),
                    row: r.row + off.min(r.n),
                    ..*r
                })
                .collect();
            let table = TokenRun::table(&rows, dev)?;
            infllm_ring_write(&rk, &rm, input.k, input.dst, &table, st.geo.page_size)?;
            let round_max = rows.iter().map(|r| r.n).max().unwrap_or(0);
            if dev.is_cuda() {
                // One op for every run of the round (its CUDA path takes runs of any length).
                infllm_window_mass(&rm, &rk, input.q, &table, (st.geo.window, self.scale), round_max)?;
            } else {
                // The op's CPU path is the plain reference; batched products are faster.
                let singles: Vec<TokenRun> = rows.iter().filter(|r| r.n == 1).copied().collect();
                if !singles.is_empty() {
                    let t = TokenRun::table(&singles, dev)?;
                    infllm_window_mass(&rm, &rk, input.q, &t, (st.geo.window, self.scale), 1)?;
                }
                for r in rows.iter().filter(|r| r.n > 1) {
                    self.run_mass(&rk, &rm, input.q, r)?;
                }
            }
            infllm_finalize(&st.repr, &rk, &rm, &table, &st.geo, round_max)?;
            off += cap;
        }
        Ok(())
    }

    /// Adds to the layer's ring (`rk` `[S, ring, Hkv, D]`, `rm` `[S, 4, ring, Hkv]`) the
    /// mass run `r`'s queries (rows of `q` `[T, Hq, D]`) give the keys of their windows,
    /// with batched products over the run's queries and the keys they see (the run's keys
    /// are in the ring already): per KV head `[G·n, D] × [D, Lk]`, masked to each query's
    /// window, softmax, summed over the queries and the group's heads.
    fn run_mass(&self, rk: &Tensor, rm: &Tensor, q: &Tensor, r: &TokenRun) -> Result<()> {
        let st = self.state()?;
        let (w, ring) = (st.geo.window, st.geo.ring);
        let (_, hq, d) = q.dims3()?;
        let (h, c) = (self.kv_heads, r.n);
        let g = hq / h;
        let lo = (r.start + 1).saturating_sub(w);
        let lk = r.start + c - lo;
        let keys = rk.get(r.owner as usize)?; // [ring, Hkv, D]
        let a = lo % ring;
        let keys = if a + lk <= ring {
            keys.narrow(0, a, lk)?
        } else {
            Tensor::cat(&[keys.narrow(0, a, ring - a)?, keys.narrow(0, 0, lk - (ring - a))?], 0)?
        };
        let keys = keys.to_dtype(DType::F32)?.permute((1, 2, 0))?.contiguous()?; // [Hkv, D, Lk]
        let qs = q
            .narrow(0, r.row, c)?
            .to_dtype(DType::F32)?
            .reshape((c, h, g, d))?
            .permute((1, 2, 0, 3))?
            .reshape((h, g * c, d))?
            .contiguous()?;
        // Query start + i sees key lo + j iff lo + j <= start + i < lo + j + w.
        let dev = q.device();
        let qpos = Tensor::arange(r.start as u32, (r.start + c) as u32, dev)?.reshape((c, 1))?;
        let kpos = Tensor::arange(lo as u32, (lo + lk) as u32, dev)?.reshape((1, lk))?;
        let kend = Tensor::arange((lo + w) as u32, (lo + lk + w) as u32, dev)?.reshape((1, lk))?;
        let visible = kpos.broadcast_le(&qpos)?.mul(&kend.broadcast_gt(&qpos)?)?;
        let mask = visible.where_cond(
            &Tensor::zeros((c, lk), DType::F32, dev)?,
            &Tensor::full(f32::NEG_INFINITY, (c, lk), dev)?,
        )?;
        let logits = (qs.matmul(&keys)? * self.scale as f64)?
            .reshape((h, g, c, lk))?
            .broadcast_add(&mask.reshape((1, 1, c, lk))?)?;
        let mass = candle_nn::ops::softmax_last_dim(&logits)?.sum(2)?.sum(1)?; // [Hkv, Lk]
        infllm_mass_add(rm, &mass.t()?.contiguous()?, r.owner, lo)
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
        let (sink_pages, _) = forced_pages(self.cfg.sink_tokens, 1, cfg.page_size);
        let geo = InfLlmGeometry {
            window: self.cfg.window_tokens,
            block: self.cfg.block_tokens,
            repr: self.cfg.repr_topk,
            page_size: cfg.page_size,
            sink_pages,
            ring: self.cfg.window_tokens + self.cfg.block_tokens + ROUND_TOKENS,
        };
        let (l, s, h, d) = (cfg.num_layers, cfg.max_sequences, cfg.num_kv_heads, cfg.head_dim);
        let dev = &cfg.device;
        self.kv_heads = h;
        self.scale = 1.0 / (d as f32).sqrt();
        self.state = Some(State {
            ring_k: Tensor::zeros((l, s, geo.ring, h, d), cfg.dtype, dev)?,
            ring_m: Tensor::zeros((l, s, 4, geo.ring, h), DType::U32, dev)?,
            repr: Tensor::zeros((cfg.total_pages(), geo.keys_per_page(), d), cfg.dtype, dev)?,
            geo,
        });
        Ok(())
    }

    /// The ring writes, masses and finalization are device ops over the step's runs
    /// table, and the selection is scoring, top-k and page lists on the device.
    fn device_only_decode(&self) -> bool {
        true
    }

    fn index(&mut self, input: &IndexInput<'_>) -> Result<()> {
        if input.runs.is_empty() {
            return Ok(());
        }
        self.check_live("InfLlm::index", input.runs.iter().map(|r| r.seq))?;
        for r in input.runs {
            let last = LastIndex { start: r.start, n: r.n };
            self.last.insert((input.layer, r.seq), last);
            self.owners.insert(r.seq, r.owner);
        }
        // A run longer than one round overwrites more of its ring than the undo plane
        // restores: its ring is copied first (device work before the ring write).
        let cap = self.state()?.geo.max_run();
        for r in input.runs {
            self.snapshots.remove(&(input.layer, r.seq));
            if r.n > cap {
                let st = self.state()?;
                let o = r.owner as usize;
                // `force_contiguous` copies the view alone (`Tensor::copy` would clone
                // the whole state's storage: every layer's and owner's ring).
                let snap = Snapshot {
                    start: r.start,
                    k: st.ring_k.get(input.layer)?.get(o)?.force_contiguous()?,
                    m: st.ring_m.get(input.layer)?.get(o)?.force_contiguous()?,
                };
                self.snapshots.insert((input.layer, r.seq), snap);
            }
        }
        let max_n = input.runs.iter().map(|r| r.n).max().unwrap_or(0);
        if max_n <= 1 {
            // Decode: the step's own table, device ops only (the form a padded step has).
            self.round(input.layer, input, input.runs_table, max_n)
        } else {
            self.prefill_rounds(input, max_n)
        }
    }

    fn select(&mut self, input: &SelectInput<'_>) -> Result<Selection> {
        self.check_live("InfLlm::select", input.seqs.iter().copied())?;
        let st = self.state()?;
        let scores = infllm_block_scores(input.q, &st.repr, input.candidates, input.rows, &st.geo)?;
        let top = topk_indices(&scores, self.cfg.topk_blocks)?;
        Ok(Selection::Pages(infllm_pages(
            &top,
            input.rows,
            &st.geo,
            self.kv_heads,
        )?))
    }

    fn forget(&mut self, seq: u64) {
        self.last.retain(|&(_, s), _| s != seq);
        self.owners.remove(&seq);
        self.broken.remove(&seq);
        self.snapshots.retain(|&(_, s), _| s != seq);
    }

    fn commit(&mut self) {
        self.snapshots.clear();
    }

    /// Every layer's masses are rolled back on the device where its latest ring write was
    /// this step's ([`infllm_restore`]: a step whose device work never ran, such as a
    /// failed graph capture, is left alone). A layer that indexed a run of more than one
    /// round gets its whole ring back from the copy taken before it (a `Snapshot`); were
    /// that copy missing (it failed), the sequence is marked, and its later steps fail.
    fn truncate(&mut self, seq: u64, len: usize) {
        let mine: Vec<(usize, u64)> = self.snapshots.keys().filter(|k| k.1 == seq).copied().collect();
        let mut snaps: HashMap<usize, Snapshot> = mine
            .into_iter()
            .filter_map(|k| self.snapshots.remove(&k).map(|sn| (k.0, sn)))
            .collect();
        let (Some(&owner), Ok(st)) = (self.owners.get(&seq), self.state()) else {
            return;
        };
        let cap = st.geo.max_run();
        let (layers, owners) = (st.ring_m.dim(0).unwrap_or(0), st.ring_m.dim(1).unwrap_or(0));
        let mut exact = true;
        for layer in 0..layers {
            let restored = st
                .ring_m
                .get(layer)
                .map_err(Error::from)
                .and_then(|rm| infllm_restore(&rm, owner, len));
            exact &= restored.is_ok();
            let long = self
                .last
                .get(&(layer, seq))
                .is_some_and(|l| l.start == len && l.n > cap);
            let snap = snaps.remove(&layer).filter(|sn| sn.start == len);
            if let Some(sn) = snap {
                exact &= restore_ring(st, layer, owner as usize, owners, &sn).is_ok();
            } else if long && len > 0 {
                exact = false;
            }
        }
        if !exact {
            self.broken.insert(seq);
        }
        self.last.retain(|&(_, s), l| s != seq || l.start + l.n <= len);
    }
}

/// Writes snapshot `sn` back over the ring of (`layer`, `owner`), in place (rows of the
/// state viewed as `[L·S, ...]`).
fn restore_ring(st: &State, layer: usize, owner: usize, owners: usize, sn: &Snapshot) -> Result<()> {
    let row = layer * owners + owner;
    let (l, k, m) = (st.ring_k.dim(0)?, &st.ring_k, &st.ring_m);
    let flat = |t: &Tensor| -> Result<Tensor> {
        let mut dims = t.dims()[1..].to_vec();
        dims[0] *= l;
        Ok(t.reshape(dims)?)
    };
    flat(k)?.slice_set(&sn.k.unsqueeze(0)?, 0, row)?;
    flat(m)?.slice_set(&sn.m.unsqueeze(0)?, 0, row)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CpuStorage, Device, Storage};

    /// Elements in `t`'s whole storage (CPU).
    fn storage_len(t: &Tensor) -> usize {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.len(),
            Storage::Cpu(CpuStorage::U32(v)) => v.len(),
            _ => panic!("a CPU f32 or u32 tensor"),
        }
    }

    /// A run longer than one round snapshots its own (layer, owner) ring, not a clone of
    /// the storage of every layer's and owner's rings (which `Tensor::copy` of the view
    /// made: 5× the KV cache's memory on the device at 64 prompts of 8K).
    #[test]
    fn long_run_snapshot_holds_its_ring_only() -> Result<()> {
        let cfg = CacheConfig::new(3, 2, 1, 8);
        let mut a = InfLlm::new(InfLlmConfig::for_budget(256))?;
        a.init(&cfg)?;
        let (n, dev) = (300usize, Device::Cpu);
        let run = TokenRun {
            seq: 7,
            start: 0,
            n,
            row: 0,
            owner: 1,
        };
        let table = TokenRun::table(&[run], &dev)?;
        let q = Tensor::randn(0f32, 1.0, (n, 2, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (n, 1, 8), &dev)?;
        let dst = Tensor::arange(0u32, n as u32, &dev)?.reshape((n, 1))?;
        let input = IndexInput {
            layer: 1,
            runs: &[run],
            runs_table: &table,
            q: &q,
            k: &k,
            k_pre_rope: &k,
            v: &k,
            dst: &dst,
            minmax_updated: false,
        };
        a.index(&input)?;
        let snap = a.snapshots.get(&(1, 7)).expect("a snapshot of the 300-token run");
        let st = a.state()?;
        assert_eq!(snap.k.dims(), &st.ring_k.dims()[2..]);
        assert_eq!(snap.m.dims(), &st.ring_m.dims()[2..]);
        for (what, t) in [("keys", &snap.k), ("masses", &snap.m)] {
            assert_eq!(storage_len(t), t.elem_count(), "{what}: the snapshot's storage");
        }
        assert!(
            storage_len(&st.ring_k) > 4 * snap.k.elem_count(),
            "the state holds more than one ring"
        );
        Ok(())
    }
}
