//! The two-level page tables mirrored on a device: a directory matrix
//! `[rows, max_leaves]` (one row per (sequence, layer, KV head), leaf ids, `NONE`
//! padded) and the leaf arena `[leaves, 64]` of host slots. [`page_slots`] translates
//! (row, logical page) pairs to slots on the device — two dependent loads per entry —
//! so that selections made on the GPU become page lists without a trip to the host.
//!
//! This session's version uploads a snapshot ([`DeviceTables::upload`]); keeping it in
//! step with appends (writing only the changed leaf entries) is the next step.

use super::page_table::{PageTables, LEAF_PAGES};
use crate::ops::NONE;
use crate::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use std::collections::HashMap;

const OP: &str = "page_slots";

/// A device copy of [`PageTables`] (see the module docs).
#[derive(Debug, Clone)]
pub struct DeviceTables {
    /// `[rows, max_leaves]` u32 leaf ids (`NONE` past a directory's end).
    pub directory: Tensor,
    /// `[leaves, 64]` u32 host slots (`NONE` for unused entries).
    pub leaves: Tensor,
    rows: HashMap<u64, u32>,
    dirs_per_seq: usize,
}

impl DeviceTables {
    /// Copies `tables` to `device`.
    pub fn upload(tables: &PageTables, device: &Device) -> Result<Self> {
        let seqs = tables.sequences();
        let dps = tables.dirs_per_seq();
        let max_leaves = seqs
            .iter()
            .flat_map(|(_, dirs, _)| dirs.iter().map(Vec::len))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut dir = vec![NONE; (seqs.len() * dps).max(1) * max_leaves];
        let mut rows = HashMap::new();
        for (i, (seq, dirs, _)) in seqs.iter().enumerate() {
            rows.insert(*seq, (i * dps) as u32);
            for (d, leaves) in dirs.iter().enumerate() {
                let base = (i * dps + d) * max_leaves;
                dir[base..base + leaves.len()].copy_from_slice(leaves);
            }
        }
        let arena = tables.leaf_arena();
        let flat: Vec<u32> = if arena.is_empty() {
            vec![NONE; LEAF_PAGES]
        } else {
            arena.iter().flatten().copied().collect()
        };
        let n_leaves = flat.len() / LEAF_PAGES;
        Ok(Self {
            directory: Tensor::from_vec(dir, ((seqs.len() * dps).max(1), max_leaves), device)?,
            leaves: Tensor::from_vec(flat, (n_leaves, LEAF_PAGES), device)?,
            rows,
            dirs_per_seq: dps,
        })
    }

    /// Directory row of (`seq`, `dir` = layer·Hkv + head), if `seq` was uploaded.
    pub fn row(&self, seq: u64, dir: usize) -> Option<u32> {
        (dir < self.dirs_per_seq).then_some(())?;
        self.rows.get(&seq).map(|r| r + dir as u32)
    }

    /// Device bytes of the directory and the leaf arena.
    pub fn bytes(&self) -> usize {
        (self.directory.elem_count() + self.leaves.elem_count()) * std::mem::size_of::<u32>()
    }

    /// Device bytes an upload of `tables` takes (without allocating it).
    pub fn bytes_for(tables: &PageTables) -> usize {
        let seqs = tables.sequences();
        let max_leaves = seqs
            .iter()
            .flat_map(|(_, dirs, _)| dirs.iter().map(Vec::len))
            .max()
            .unwrap_or(0)
            .max(1);
        let dir = (seqs.len() * tables.dirs_per_seq()).max(1) * max_leaves;
        let leaves = tables.leaf_arena().len().max(1) * LEAF_PAGES;
        (dir + leaves) * std::mem::size_of::<u32>()
    }

    /// Slots of `queries` `[n, 2]` u32 (directory row, logical page): see [`page_slots`].
    pub fn lookup(&self, queries: &Tensor) -> Result<Tensor> {
        page_slots(&self.directory, &self.leaves, queries)
    }
}

struct PageSlots;

fn lookup_cpu(dir: &[u32], max_leaves: usize, leaves: &[u32], q: &[u32]) -> Vec<u32> {
    q.chunks_exact(2)
        .map(|rq| {
            let (row, page) = (rq[0] as usize, rq[1] as usize);
            let li = page / LEAF_PAGES;
            if rq[0] == NONE || rq[1] == NONE || li >= max_leaves || row >= dir.len() / max_leaves {
                return NONE;
            }
            let leaf = dir[row * max_leaves + li];
            if leaf == NONE || (leaf as usize) >= leaves.len() / LEAF_PAGES {
                return NONE;
            }
            leaves[leaf as usize * LEAF_PAGES + page % LEAF_PAGES]
        })
        .collect()
}

impl CustomOp3 for PageSlots {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        d: &CpuStorage,
        dl: &Layout,
        l: &CpuStorage,
        ll: &Layout,
        q: &CpuStorage,
        ql: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let slice = |s: &CpuStorage, lay: &Layout| -> candle_core::Result<Vec<u32>> {
            match (s, lay.contiguous_offsets()) {
                (CpuStorage::U32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
                _ => candle_core::bail!("{OP}: operands must be contiguous u32"),
            }
        };
        let max_leaves = dl.dims()[1];
        let out = lookup_cpu(&slice(d, dl)?, max_leaves, &slice(l, ll)?, &slice(q, ql)?);
        let n = out.len();
        Ok((CpuStorage::U32(out), Shape::from_dims(&[n])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        d: &candle_core::CudaStorage,
        dl: &Layout,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        q: &candle_core::CudaStorage,
        ql: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::page_table::page_slots(d, dl, l, ll, q, ql)
    }
}

/// Translates `queries` `[n, 2]` u32 (directory row, logical page) to host slots `[n]`
/// u32 through `directory` `[rows, max_leaves]` and `leaves` `[leaves, 64]` (as built by
/// [`DeviceTables::upload`]), on their device. Out-of-range rows, pages past a
/// directory's leaves and `NONE` queries give `NONE`.
pub fn page_slots(directory: &Tensor, leaves: &Tensor, queries: &Tensor) -> Result<Tensor> {
    let ok = directory.rank() == 2
        && leaves.dims().get(1) == Some(&LEAF_PAGES)
        && leaves.rank() == 2
        && queries.rank() == 2
        && queries.dims()[1] == 2
        && [directory, leaves, queries].iter().all(|t| t.dtype() == DType::U32);
    if !ok {
        crate::invalid!(
            OP,
            "directory {:?} {:?}, leaves {:?} {:?}, queries {:?} {:?}: expected u32 [rows, L], [n_leaves, {LEAF_PAGES}], [n, 2]",
            directory.dims(),
            directory.dtype(),
            leaves.dims(),
            leaves.dtype(),
            queries.dims(),
            queries.dtype()
        );
    }
    if !directory.device().same_device(leaves.device()) || !directory.device().same_device(queries.device()) {
        crate::invalid!(OP, "directory, leaves and queries must be on one device");
    }
    if queries.dims()[0] == 0 {
        return Ok(Tensor::zeros(0, DType::U32, queries.device())?);
    }
    let (d, l, q) = (directory.contiguous()?, leaves.contiguous()?, queries.contiguous()?);
    Ok(d.apply_op3_no_bwd(&l, &q, &PageSlots)?)
}
