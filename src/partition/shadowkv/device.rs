//! ShadowKV's device mode, for caches whose fast tier holds every page (direct-mapped):
//! the decode-time landmark scores, the top-k chunks, the always-attended pages and the
//! rebuilt keys are device work over tables kept by host page slot and by (layer, owner),
//! so that a decode step needs nothing from the host and can run padded, inside a CUDA
//! graph ([`SparseAlgorithm::device_only_decode`](crate::partition::SparseAlgorithm)).
//! A sequence's compression (at its first decode step, an ordinary step) writes the
//! tables in place.
//!
//! Each decode step of a layer is four kernels (`ops::shadowkv`): the landmark scores, their
//! top-k, the page lists, and the rebuild of the chosen chunks' keys (tensor cores) beside
//! their values from the fast tier.
//!
//! Tables (`S` host page slots, `M` owners, `L` layers, `r` the configured rank rounded up
//! to a multiple of 16, the tensor cores' step):
//! - `lm` `[S, D]` f32: the landmark of each page (its chunk's mean post-RoPE key for its
//!   KV head); `outlier` `[S]` f32: `-inf` at outlier pages, else 0;
//! - `left` `[S/Hkv, P, r]` (cache dtype): the left factor's rows, a page of them per
//!   compressed chunk, found through `left_map` `[S, 1]` from the chunk's page slot of
//!   KV head 0 (f32, the dtype `copy_pages` writes; exact below 2^24 left pages);
//! - `right` `[L·M, r, Hkv·D]` (cache dtype), `chunks` `[L·M]` u32 (compressed chunks) and
//!   `outlier_ids` `[L·M, Hkv, n_out]` u32 (ascending, `NONE`-padded) per (layer, owner).
//!
//! Factors of a rank below `r` are zero-padded (the product is the same). The tables are
//! written with `copy_pages` (a block per row), where candle's `scatter_set` would loop
//! over the rows in one thread per column.

use super::Compressed;
use crate::ops::{self, topk_indices, ShadowKvGeometry, NONE};
use crate::partition::{DeviceRebuilt, MaterializeInput, Materialized, RebuiltKeys, SelectInput, Selection};
use crate::rope::rope_tables;
use crate::{CacheConfig, Result};
use candle_core::{DType, Device, Tensor};

const OP: &str = "ShadowKv (device mode)";

/// The choice of the last `select`, kept for the rebuild of its layer.
#[derive(Debug)]
struct Pending {
    layer: usize,
    /// `[B, Hkv, K]` u32 chosen chunks (logical pages), `NONE`-padded.
    top: Tensor,
    /// `[B, Hkv, K, 2]` u32 `(pool entry, chunk)` pairs of `top`.
    pairs: Tensor,
    /// `[B, Hkv, N]` u32 the step's candidates and `[B, 4]` u32 its rows.
    candidates: Tensor,
    rows: Tensor,
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
    /// their address).
    cos: Tensor,
    sin: Tensor,
    pending: Option<Pending>,
}

/// Whether `cfg` puts ShadowKV in device mode: the fast tier holds every page.
pub(super) fn wanted(cfg: &CacheConfig) -> bool {
    cfg.fast_tier_holds_every_page()
}

impl DeviceTables {
    /// Allocates the tables for `cfg`, with `rank` (rounded up to a multiple of 16) and
    /// `n_out` outlier chunks.
    pub(super) fn new(cfg: &CacheConfig, rank: usize, n_out: usize) -> Result<Self> {
        let (p, hkv, d, dev) = (cfg.page_size, cfg.num_kv_heads, cfg.head_dim, &cfg.device);
        let rank = rank.next_multiple_of(16);
        let s = cfg.total_pages();
        let (layers, owners) = (cfg.num_layers, cfg.max_sequences);
        let left_pages = s.div_ceil(hkv).max(1);
        let positions: Vec<u32> = (0..cfg.max_seq_len.max(1) as u32).collect();
        let (cos, sin) = rope_tables(&positions, d, cfg.rope_theta, cfg.dtype, dev)?;
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
            pending: None,
        })
    }

    /// Writes the compressed state of (`layer`, `owner`) into the tables: `comp`'s
    /// landmarks and outliers by page slot (`slots[h][c]`: host slot of chunk `c`'s page
    /// of KV head `h`), the factor `lr`'s left rows into fresh left pages (recorded in
    /// `comp.left_pages`), its right factor, the chunk count and the outlier ids. The
    /// landmarks and factors move out of `comp` (it keeps the host outlier flags).
    pub(super) fn store(&mut self, layer: usize, owner: u32, comp: &mut Compressed, slots: &[Vec<u32>]) -> Result<()> {
        let _span = crate::host_timing::span("shadowkv.store");
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
        let hkv = self.hkv;
        let candidates = input.candidates.contiguous()?;
        let (b, _, n) = candidates.dims3()?;
        let rows = input.rows.contiguous()?;
        let base = layer * self.owners;
        let chunks = self.chunks.narrow(0, base, self.owners)?;
        let geo = ShadowKvGeometry {
            page_size: self.p,
            window,
        };
        let scores = ops::shadowkv_scores(
            &input.q.contiguous()?,
            &self.lm,
            &self.outlier,
            &candidates,
            &rows,
            &chunks,
            &geo,
            scale as f32,
        )?;
        let k = per_head.max(1);
        let top = topk_indices(&scores.reshape((b * hkv, n))?, k)?.reshape((b, hkv, k))?;
        let oids = self.outlier_ids.narrow(0, base, self.owners)?;
        // Lists for the host also name the rebuilt chunks (as in host mode: traced, counted,
        // then handed back by `materialize`).
        let (sel, pairs) = ops::shadowkv_lists(&top, &rows, &chunks, &oids, n, &geo, input.to_host)?;
        self.pending = Some(Pending {
            layer,
            top,
            pairs,
            candidates,
            rows,
        });
        Ok(Selection::Pages(sel))
    }

    /// The chunks the last [`select`](Self::select) of `layer` chose, rebuilt: keys from
    /// the low-rank factors with RoPE at their positions, values from `values` (the
    /// direct-mapped fast tier `[S, 2, P, D]`; `None` leaves them zero). `None` when that
    /// select was of another layer or did not run.
    pub(super) fn rebuild(&mut self, layer: usize, values: Option<&Tensor>) -> Result<Option<DeviceRebuilt>> {
        let Some(pd) = self.pending.take().filter(|pd| pd.layer == layer) else {
            return Ok(None);
        };
        let right = self.right.narrow(0, layer * self.owners, self.owners)?;
        let pool = ops::shadowkv_rebuild(
            &self.left,
            &right,
            &pd.top,
            &pd.candidates,
            &pd.rows,
            &self.left_map,
            &self.cos,
            &self.sin,
            values,
        )?;
        Ok(Some(DeviceRebuilt { pairs: pd.pairs, pool }))
    }

    /// [`rebuild`](Self::rebuild) in the form of host lists, for a step whose requests
    /// cross to the host (mixed prefill and decode, tracing): the chosen pages of each
    /// row and head ascending, their keys in that order.
    pub(super) fn rebuild_lists(&mut self, input: &MaterializeInput<'_>) -> Result<Materialized> {
        let Some(rb) = self.rebuild(input.layer, None)? else {
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
            .pool
            .index_select(&Tensor::from_vec(order, n, rb.pool.device())?, 0)?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .contiguous()?;
        Ok(Materialized::Rebuilt(RebuiltKeys { pages, keys }))
    }
}
