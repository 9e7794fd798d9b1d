// spinkv CUDA kernels: two-level page-table lookup on the device, and the scatter that
// updates the tables in place. Lookup: out[i] = the host slot of (directory row,
// logical page) queries[i]: leaf = directory[row, page / LEAF_PAGES], then
// leaves[leaf, page % LEAF_PAGES]; NONE for out-of-range rows/pages, NONE queries or leaves.
// Launch glue: src/ops/cuda/page_table.rs. CPU reference: src/ops/page_table.rs.
#include "common.cuh"

extern "C" __global__ void page_slots(const u32* __restrict__ directory, const u32* __restrict__ leaves,
                                      const u32* __restrict__ queries, u32* __restrict__ out, int n,
                                      u32 rows, u32 max_leaves, u32 n_leaves) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 row = queries[2 * i], page = queries[2 * i + 1];
    u32 slot = SPIN_NONE;
    const u32 li = page / SPIN_LEAF_PAGES;
    if (row != SPIN_NONE && page != SPIN_NONE && row < rows && li < max_leaves) {
      const u32 leaf = directory[(size_t)row * max_leaves + li];
      if (leaf != SPIN_NONE && leaf < n_leaves) slot = leaves[(size_t)leaf * SPIN_LEAF_PAGES + page % SPIN_LEAF_PAGES];
    }
    out[i] = slot;
  }
}

// Lookup of a grid of queries: out[g * k + j] = slot of (rows[g], pages[g * k + j]), or of
// (rows[g], j) when pages is null (every page of each row). Same rules as page_slots.
extern "C" __global__ void page_slots_grid(const u32* __restrict__ directory, const u32* __restrict__ leaves,
                                           const u32* __restrict__ row_of, const u32* __restrict__ pages,
                                           u32* __restrict__ out, int n, int k, u32 rows, u32 max_leaves,
                                           u32 n_leaves) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 row = row_of[i / k], page = pages ? pages[i] : (u32)(i % k);
    u32 slot = SPIN_NONE;
    const u32 li = page / SPIN_LEAF_PAGES;
    if (row != SPIN_NONE && page != SPIN_NONE && row < rows && li < max_leaves) {
      const u32 leaf = directory[(size_t)row * max_leaves + li];
      if (leaf != SPIN_NONE && leaf < n_leaves) slot = leaves[(size_t)leaf * SPIN_LEAF_PAGES + page % SPIN_LEAF_PAGES];
    }
    out[i] = slot;
  }
}

// In-place update of a device table: dst[writes[2 i]] = writes[2 i + 1] for i < n
// (flat indices, distinct; indices >= len are skipped). Used by DeviceTables::apply.
extern "C" __global__ void scatter_u32(u32* __restrict__ dst, const u32* __restrict__ writes, int n, u32 len) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 idx = writes[2 * i];
    if (idx < len) dst[idx] = writes[2 * i + 1];
  }
}

// In-place fill of whole rows of a [rows, cols] table: dst[r[i], :] = value for i < n
// (rows >= `rows` skipped). Empties freed directory rows and leaves in DeviceTables::apply.
extern "C" __global__ void fill_rows_u32(u32* __restrict__ dst, const u32* __restrict__ r, int n, int cols, u32 rows,
                                         u32 value) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n * cols; i += gridDim.x * blockDim.x) {
    const u32 row = r[i / cols];
    if (row < rows) dst[(size_t)row * cols + i % cols] = value;
  }
}
