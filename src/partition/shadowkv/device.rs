//! ShadowKV's device mode, for caches whose fast tier holds every page (direct-mapped):
//! the decode-time landmark scores, the top-k chunks, the always-attended pages and the
//! rebuilt keys are device work over tables kept by host page slot and by (layer, owner),
//! so that a decode step needs nothing from the host and can run padded, inside a CUDA
//! graph ([`SparseAlgorithm::device_only_decode`](crate::partition::SparseAlgorithm)).
//! A sequence's compression (at its first decode step, an ordinary step) writes the
//! tables in place.
//!
//! Tables (`S` host page slots, `M` owners, `L` layers, `r` the configured rank):
//! - `lm` `[S, D]` f32: the landmark of each page (its chunk's mean post-RoPE key for its
//!   KV head); `outlier` `[S]` f32: `-inf` at outlier pages, else 0;
//! - `left` `[S/Hkv, P, r]` (cache dtype): the left factor's rows, a page of them per
//!   compressed chunk, found through `left_map` `[S, 1]` from the chunk's page slot of
//!   KV head 0 (f32: page numbers stay below 2^24 under the 2^32-element cap);
//! - `right` `[L·M, r, Hkv·D]` (cache dtype), `chunks` `[L·M]` u32 (compressed chunks) and
//!   `outlier_ids` `[L·M, Hkv, n_out]` u32 (ascending, `NONE`-padded) per (layer, owner).
//!
//! Factors of a rank below `r` are zero-padded (the product is the same). The tables are
//! written with `copy_pages` (a block per row), where candle's `scatter_set` would loop
//! over the rows in one thread per column.

use super::Compressed;
use crate::ops::{self, topk_indices, NONE};
use crate::partition::{DeviceRebuilt, MaterializeInput, Materialized, RebuiltKeys, SelectInput, Selection};
use crate::rope::{apply_rope, rope_tables};
use crate::{CacheConfig, Result};
use candle_core::{DType, Device, Tensor};

const OP: &str = "ShadowKv (device mode)";

/// The choice of the last `select`, kept for the rebuild of its layer.
#[derive(Debug)]
struct Pending {
    layer: usize,
    /// `[B, Hkv, K]` u32 chosen chunks (logical pages), `NONE`-padded.
    top: Tensor,
    /// `top` with `NONE` replaced by 0, and the mask of those entries (u8).
    top_safe: Tensor,
    top_none: Tensor,
    /// `[B, Hkv, K]` u32 host slots of the chosen pages (0 where `top` is `NONE`).
    slots: Tensor,
    /// `[B, Hkv, K]` u32 host slots of the same chunks' KV-head-0 pages (0 where none).
    head0: Tensor,
    /// `[B]` u32 owner of each row.
    owner: Tensor,
}

/// The device tables of ShadowKV's device mode (see the module docs).
#[derive(Debug)]
pub(super) struct DeviceTables {
    p: usize,
    hkv: usize,
    d: usize,
    rank: usize,
    owners: usize,
    dtype: DType,
    lm: Tensor,
    outlier: Tensor,
    left_map: Tensor,
    left: Tensor,
    free_left: Vec<u32>,
    right: Tensor,
    chunks: Tensor,
    outlier_ids: Tensor,
    /// `cos`, `sin` `[max_seq_len, D/2]` in the cache dtype (allocated once: graphs keep
    /// their address; the rebuilt keys take RoPE in the cache dtype, as the cache's own
    /// keys do).
    cos: Tensor,
    sin: Tensor,
    /// `0..len` as u32 and as f32 (views of them stand for every `arange`, so that no
    /// step uploads one).
    arange_u: Tensor,
    arange_f: Tensor,
    /// Scalars broadcast by `where_cond`: u32 0 and `NONE`, f32 `-inf` and `-1e30`.
    zero: Tensor,
    none: Tensor,
    neg_inf: Tensor,
    masked: Tensor,
    pending: Option<Pending>,
}

/// Whether `cfg` puts ShadowKV in device mode: the fast tier holds every page, and the
/// tables stay under 2^32 elements (candle's gathers index with 32 bits).
pub(super) fn wanted(cfg: &CacheConfig, rank: usize) -> bool {
    let s = cfg.total_pages();
    let left = s.div_ceil(cfg.num_kv_heads.max(1)) * cfg.page_size * rank;
    cfg.fast_tier_holds_every_page() && s * cfg.head_dim < 1 << 32 && left < 1 << 32
}

impl DeviceTables {
    /// Allocates the tables for `cfg`, with `rank`, `n_out` outlier chunks and
    /// `per_head` retrieved chunks per KV head.
    pub(super) fn new(cfg: &CacheConfig, rank: usize, n_out: usize, per_head: usize) -> Result<Self> {
        let (p, hkv, d, dev) = (cfg.page_size, cfg.num_kv_heads, cfg.head_dim, &cfg.device);
        let s = cfg.total_pages();
        let (layers, owners) = (cfg.num_layers, cfg.max_sequences);
        let left_pages = s.div_ceil(hkv).max(1);
        let positions: Vec<u32> = (0..cfg.max_seq_len.max(1) as u32).collect();
        let (cos, sin) = rope_tables(&positions, d, cfg.rope_theta, cfg.dtype, dev)?;
        // The longest arange: a padded step's candidate pages, or its rebuilt pages.
        let rows = owners.next_power_of_two().max(1);
        let len = (cfg.max_seq_len.div_ceil(p) + 64)
            .max(rows * hkv * per_head.max(1))
            .max(p);
        let arange_u = Tensor::arange(0u32, len as u32, dev)?;
        Ok(Self {
            p,
            hkv,
            d,
            rank,
            owners,
            dtype: cfg.dtype,
            lm: Tensor::zeros((s, d), DType::F32, dev)?,
            outlier: Tensor::zeros((s, 1), DType::F32, dev)?,
            left_map: Tensor::zeros((s, 1), DType::F32, dev)?,
            left: Tensor::zeros((left_pages, p, rank), cfg.dtype, dev)?,
            free_left: (0..left_pages as u32).rev().collect(),
            right: Tensor::zeros((layers * owners, rank, hkv * d), cfg.dtype, dev)?,
            chunks: Tensor::zeros(layers * owners, DType::U32, dev)?,
            outlier_ids: Tensor::full(NONE, (layers * owners, hkv, n_out.max(1)), dev)?,
            cos,
            sin,
            arange_f: arange_u.to_dtype(DType::F32)?,
            arange_u,
            zero: Tensor::new(0u32, dev)?,
            none: Tensor::new(NONE, dev)?,
            neg_inf: Tensor::new(f32::NEG_INFINITY, dev)?,
            masked: Tensor::new(-1e30f32, dev)?,
            pending: None,
        })
    }

    /// Writes the compressed state of (`layer`, `owner`) into the tables: `comp`'s
    /// landmarks and outliers by page slot (`slots[h][c]`: host slot of chunk `c`'s page
    /// of KV head `h`), the factor `lr`'s left rows into fresh left pages (recorded in
    /// `comp.left_pages`), its right factor, the chunk count and the outlier ids. The
    /// landmarks and factors move out of `comp` (it keeps the host outlier flags).
    pub(super) fn store(&mut self, layer: usize, owner: u32, comp: &mut Compressed, slots: &[Vec<u32>]) -> Result<()> {
        let (p, hkv, d, c) = (self.p, self.hkv, self.d, comp.chunks);
        if owner as usize >= self.owners || slots.len() != hkv || slots.iter().any(|s| s.len() < c) {
            crate::invalid!(
                OP,
                "store of owner {owner} with slots for {} heads (internal error)",
                slots.len()
            );
        }
        let row = layer * self.owners + owner as usize;
        let dev = self.lm.device().clone();
        let n_out = self.outlier_ids.dim(2)?;
        let mut ids = vec![NONE; hkv * n_out];
        for (h, o) in comp.outlier_ids.iter().enumerate() {
            for (j, &id) in o.iter().take(n_out).enumerate() {
                ids[h * n_out + j] = id;
            }
        }
        self.outlier_ids
            .slice_set(&Tensor::from_vec(ids, (1, hkv, n_out), &dev)?, 0, row)?;
        self.chunks.slice_set(&Tensor::new(&[c as u32], &dev)?, 0, row)?;
        let parts = (
            comp.left.take(),
            comp.right.take(),
            comp.landmarks.take(),
            comp.outlier_mask.take(),
        );
        let (Some(left), Some(right), Some(lm), Some(mask), true) = (parts.0, parts.1, parts.2, parts.3, c > 0) else {
            return Ok(());
        };
        let flat: Vec<u32> = slots.iter().flat_map(|s| s[..c].iter().copied()).collect();
        if flat.contains(&NONE) {
            crate::invalid!(OP, "a compressed chunk of owner {owner} has no page (internal error)");
        }
        // (row of the source, slot) pairs: landmarks and flags by page slot.
        let to_slots: Vec<u32> = flat.iter().enumerate().flat_map(|(i, &s)| [i as u32, s]).collect();
        let to_slots = Tensor::from_vec(to_slots, (hkv * c, 2), &dev)?;
        ops::copy_pages(&self.lm, &lm.reshape((hkv * c, d))?.contiguous()?, &to_slots)?;
        ops::copy_pages(&self.outlier, &mask.reshape((hkv * c, 1))?.contiguous()?, &to_slots)?;
        // Left rows: a fresh page per chunk, named by the chunk's head-0 page slot.
        if self.free_left.len() < c {
            crate::invalid!(
                OP,
                "{c} left-factor pages wanted, {} free (internal error)",
                self.free_left.len()
            );
        }
        let pages: Vec<u32> = self.free_left.split_off(self.free_left.len() - c);
        let written = (|| -> Result<()> {
            let pad = |t: Tensor, dim: usize| -> Result<Tensor> {
                let have = t.dim(dim)?;
                Ok(if have < self.rank {
                    t.pad_with_zeros(dim, 0, self.rank - have)?
                } else {
                    t
                })
            };
            let left = pad(left, 1)?.to_dtype(self.dtype)?.reshape((c, p, self.rank))?;
            let right = pad(right, 0)?.to_dtype(self.dtype)?.unsqueeze(0)?.contiguous()?;
            let ids: Vec<f32> = pages.iter().map(|&x| x as f32).collect();
            let ids = Tensor::from_vec(ids, (c, 1), &dev)?;
            let to_head0: Vec<u32> = slots[0][..c]
                .iter()
                .enumerate()
                .flat_map(|(i, &s)| [i as u32, s])
                .collect();
            ops::copy_pages(&self.left_map, &ids, &Tensor::from_vec(to_head0, (c, 2), &dev)?)?;
            let to_pages: Vec<u32> = pages.iter().enumerate().flat_map(|(i, &s)| [i as u32, s]).collect();
            ops::copy_pages(
                &self.left,
                &left.contiguous()?,
                &Tensor::from_vec(to_pages, (c, 2), &dev)?,
            )?;
            self.right.slice_set(&right, 0, row)?;
            Ok(())
        })();
        match written {
            Ok(()) => {
                comp.left_pages = pages;
                Ok(())
            }
            Err(e) => {
                self.free_left.extend(pages);
                Err(e)
            }
        }
    }

    /// Gives a compressed state's left pages back.
    pub(super) fn release(&mut self, comp: &mut Compressed) {
        self.free_left.append(&mut comp.left_pages);
    }

    /// The pages of the decoding rows of `input` in `layer`: outliers before the exact
    /// region and the exact region (`Selection::Pages` `[B, Hkv, n_out + N]`); the
    /// `per_head` best-scoring other chunks are kept for [`rebuild`](Self::rebuild)
    /// (and also named in the selection when it goes to the host as lists).
    pub(super) fn select(
        &mut self,
        layer: usize,
        input: &SelectInput<'_>,
        per_head: usize,
        window: usize,
        scale: f64,
    ) -> Result<Selection> {
        self.pending = None;
        let (p, hkv, d) = (self.p, self.hkv, self.d);
        let cand = input.candidates.contiguous()?;
        let (b, _, n) = cand.dims3()?;
        let g = input.q.dim(1)? / hkv;
        let f32_ = DType::F32;
        // Per row: owner, tokens, pages, compressed chunks, first exact page.
        let rows = input.rows.to_dtype(f32_)?;
        let owner = input.rows.narrow(1, 0, 1)?.flatten_all()?.contiguous()?;
        let valid = rows.narrow(1, 2, 1)?.minimum(1.0)?; // [B, 1]: 0 for padding rows
        let nt = (rows.narrow(1, 1, 1)? + 1.0)?;
        let base = layer * self.owners;
        let chunks = self
            .chunks
            .narrow(0, base, self.owners)?
            .index_select(&owner, 0)?
            .to_dtype(f32_)?
            .unsqueeze(1)?;
        // floor(x / P) of integer-valued x, exact for any P: floor((x + 0.5) / P).
        let div_p = |x: Tensor| -> Result<Tensor> { Ok(((x + 0.5)? / p as f64)?.floor()?) };
        let np = div_p((nt.clone() + (p - 1) as f64)?)?.mul(&valid)?;
        let ef = div_p((nt - window as f64)?.relu()?)?.minimum(&chunks)?.mul(&valid)?;
        // Landmark scores: softmax over each query head's compressed chunks, max over the
        // group, outliers and the exact region masked.
        // (candle's gathers give zeros for `NONE` ids.)
        let flat = cand.flatten_all()?;
        let lm = self.lm.index_select(&flat, 0)?.reshape((b, hkv, n, d))?;
        let q = input.q.to_dtype(f32_)?.reshape((b, hkv, g, d))?;
        let logits = (q.matmul(&lm.transpose(2, 3)?)? * scale)?;
        let ids_f = self.arange_f.narrow(0, 0, n)?;
        let shape4 = (b, hkv, g, n);
        let in_comp = ids_f
            .reshape((1, 1, 1, n))?
            .broadcast_lt(&chunks.reshape((b, 1, 1, 1))?)?
            .broadcast_as(shape4)?;
        let logits = in_comp.where_cond(&logits, &self.masked.broadcast_as(shape4)?)?;
        // The max over the group, as G - 1 elementwise maxima (a reduction over a middle
        // dim of G elements launches a block per output).
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let mut best = probs.narrow(2, 0, 1)?;
        for gi in 1..g {
            best = best.maximum(&probs.narrow(2, gi, 1)?)?;
        }
        let probs = best.squeeze(2)?;
        let flags = self.outlier.index_select(&flat, 0)?.reshape((b, hkv, n))?;
        let keep = ids_f
            .reshape((1, 1, n))?
            .broadcast_lt(&ef.reshape((b, 1, 1))?)?
            .broadcast_as((b, hkv, n))?;
        let scores = keep.where_cond(&(probs + flags)?, &self.neg_inf.broadcast_as((b, hkv, n))?)?;
        let top = topk_indices(&scores.reshape((b * hkv, n))?, per_head.max(1))?.reshape((b, hkv, per_head.max(1)))?;
        // The attended exact pages: outliers before `ef`, and `ef..np`.
        let oid = self.outlier_ids.narrow(0, base, self.owners)?.index_select(&owner, 0)?;
        let keep_o = oid.to_dtype(f32_)?.broadcast_lt(&ef.reshape((b, 1, 1))?)?;
        let o_sel = keep_o.where_cond(&oid, &self.none.broadcast_as(oid.shape())?)?;
        let ids_row = ids_f.reshape((1, 1, n))?;
        let keep_e = ids_row
            .broadcast_ge(&ef.reshape((b, 1, 1))?)?
            .mul(&ids_row.broadcast_lt(&np.reshape((b, 1, 1))?)?)?;
        let e_sel = keep_e
            .where_cond(
                &self
                    .arange_u
                    .narrow(0, 0, n)?
                    .reshape((1, 1, n))?
                    .broadcast_as((b, 1, n))?,
                &self.none.broadcast_as((b, 1, n))?,
            )?
            .broadcast_as((b, hkv, n))?;
        // Lists for the host also name the rebuilt chunks (as in host mode: traced, counted,
        // then handed back by `materialize`).
        let sel = if input.to_host {
            Tensor::cat(&[&o_sel, &e_sel, &top], 2)?
        } else {
            Tensor::cat(&[&o_sel, &e_sel], 2)?
        };
        // Kept for the rebuild.
        let k = top.dim(2)?;
        let top_none = top.eq(NONE as f64)?;
        let top_safe = top_none.where_cond(&self.zero.broadcast_as((b, hkv, k))?, &top)?;
        let slots = top_none.where_cond(&self.zero.broadcast_as((b, hkv, k))?, &cand.gather(&top_safe, 2)?)?;
        let head0 = cand
            .narrow(1, 0, 1)?
            .broadcast_as((b, hkv, n))?
            .contiguous()?
            .gather(&top_safe, 2)?;
        self.pending = Some(Pending {
            layer,
            top,
            top_safe,
            top_none,
            slots,
            head0,
            owner,
        });
        Ok(Selection::Pages(sel))
    }

    /// The keys of the chunks the last [`select`](Self::select) of `layer` chose, rebuilt
    /// from the low-rank factors with RoPE at their positions (`None` when that select
    /// was of another layer or did not run).
    pub(super) fn rebuild(&mut self, layer: usize) -> Result<Option<DeviceRebuilt>> {
        let Some(pd) = self.pending.take().filter(|pd| pd.layer == layer) else {
            return Ok(None);
        };
        let (p, hkv, d, r) = (self.p, self.hkv, self.d, self.rank);
        let (b, _, k) = pd.top.dims3()?;
        let nn = b * hkv * k;
        let left_pages = self
            .left_map
            .index_select(&pd.head0.flatten_all()?, 0)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        let rows = self.left.index_select(&left_pages, 0)?.reshape((b, hkv, k * p, r))?;
        let right = self
            .right
            .narrow(0, layer * self.owners, self.owners)?
            .index_select(&pd.owner, 0)?
            .reshape((b, r, hkv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k_pre = rows.matmul(&right)?; // [B, Hkv, K·P, D]
        let pos = (pd.top_safe.to_dtype(DType::F32)? * p as f64)?
            .reshape((b, hkv, k, 1))?
            .broadcast_add(&self.arange_f.narrow(0, 0, p)?.reshape((1, 1, 1, p))?)?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        let (cos, sin) = (self.cos.index_select(&pos, 0)?, self.sin.index_select(&pos, 0)?);
        let keys = apply_rope(&k_pre.reshape((nn * p, 1, d))?, &cos, &sin)?.reshape((nn, p, d))?;
        let index = pd.top_none.where_cond(
            &self.none.broadcast_as((b, hkv, k))?,
            &self.arange_u.narrow(0, 0, nn)?.reshape((b, hkv, k))?,
        )?;
        let pairs = Tensor::stack(&[&index, &pd.top], 3)?;
        let copies = Tensor::stack(&[&pd.slots.flatten_all()?, &self.arange_u.narrow(0, 0, nn)?], 1)?;
        Ok(Some(DeviceRebuilt { pairs, copies, keys }))
    }

    /// [`rebuild`](Self::rebuild) in the form of host lists, for a step whose requests
    /// cross to the host (mixed prefill and decode, tracing): the chosen pages of each
    /// row and head ascending, their keys in that order.
    pub(super) fn rebuild_lists(&mut self, input: &MaterializeInput<'_>) -> Result<Materialized> {
        let Some(rb) = self.rebuild(input.layer)? else {
            return Ok(Materialized::FetchFromTiers);
        };
        let (b, hkv, k, _) = rb.pairs.dims4()?;
        if b != input.seqs.len() {
            crate::invalid!(
                OP,
                "{b} rows chosen for {} sequences (internal error)",
                input.seqs.len()
            );
        }
        let top = rb
            .pairs
            .narrow(3, 1, 1)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<u32>()?;
        let mut pages = vec![vec![Vec::new(); hkv]; b];
        let mut order = Vec::new();
        for (bi, heads) in pages.iter_mut().enumerate() {
            for (h, list) in heads.iter_mut().enumerate() {
                let base = (bi * hkv + h) * k;
                let mut chosen: Vec<(u32, u32)> = (0..k)
                    .filter(|&j| top[base + j] != NONE)
                    .map(|j| (top[base + j], (base + j) as u32))
                    .collect();
                chosen.sort_unstable();
                list.extend(chosen.iter().map(|c| c.0));
                order.extend(chosen.iter().map(|c| c.1));
            }
        }
        if order.is_empty() {
            return Ok(Materialized::FetchFromTiers);
        }
        let n = order.len();
        let keys = rb
            .keys
            .index_select(&Tensor::from_vec(order, n, rb.keys.device())?, 0)?;
        Ok(Materialized::Rebuilt(RebuiltKeys { pages, keys }))
    }
}
