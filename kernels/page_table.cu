// spinkv CUDA kernels: two-level page-table lookup on the device, and the scatter that
// updates the tables in place. Lookup: out[i] = the host slot of (directory row,
// logical page) queries[i]: leaf = directory[row, page / LEAF_PAGES], then
// leaves[leaf, page % LEAF_PAGES]; NONE for out-of-range rows/pages, NONE queries or leaves.
// Launch glue: src/ops/cuda/page_table.rs. CPU reference: src/ops/page_table.rs.
#include "common.cuh"

// The slot of (row, page), or NONE (see the rules above).
__device__ __forceinline__ u32 slot_of(const u32* __restrict__ directory, const u32* __restrict__ leaves, u32 row,
                                       u32 page, u32 rows, u32 max_leaves, u32 n_leaves) {
  const u32 li = page / SPIN_LEAF_PAGES;
  if (row == SPIN_NONE || page == SPIN_NONE || row >= rows || li >= max_leaves) return SPIN_NONE;
  const u32 leaf = directory[(size_t)row * max_leaves + li];
  if (leaf == SPIN_NONE || leaf >= n_leaves) return SPIN_NONE;
  return leaves[(size_t)leaf * SPIN_LEAF_PAGES + page % SPIN_LEAF_PAGES];
}

extern "C" __global__ void page_slots(const u32* __restrict__ directory, const u32* __restrict__ leaves,
                                      const u32* __restrict__ queries, u32* __restrict__ out, int n,
                                      u32 rows, u32 max_leaves, u32 n_leaves) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    out[i] = slot_of(directory, leaves, queries[2 * i], queries[2 * i + 1], rows, max_leaves, n_leaves);
  }
}

// Lookup of a grid of queries: out[g * k + j] = slot of (rows[g], pages[g * k + j]), or of
// (rows[g], j) when pages is null (every page of each row). Same rules as page_slots.
// With `limit` (nullable): grid row g holds ceil(limit[g / group] / page_size) pages;
// pages from there on give NONE (a sequence's pages held past its length).
extern "C" __global__ void page_slots_grid(const u32* __restrict__ directory, const u32* __restrict__ leaves,
                                           const u32* __restrict__ row_of, const u32* __restrict__ pages,
                                           u32* __restrict__ out, int n, int k, u32 rows, u32 max_leaves,
                                           u32 n_leaves, const u32* __restrict__ limit, int group,
                                           u32 page_size) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 page = pages ? pages[i] : (u32)(i % k);
    const bool past = limit != nullptr && (u64)page * page_size >= (u64)limit[(i / k) / group];
    out[i] = past ? SPIN_NONE : slot_of(directory, leaves, row_of[i / k], page, rows, max_leaves, n_leaves);
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

// A padded decode step's plan from its host words (layout: src/ops/decode_plan.rs,
// PlanWords; CPU reference there): one thread per (layer, row, KV head) of `plane`.
extern "C" __global__ void padded_plan(u32* __restrict__ w, const u32* __restrict__ directory,
                                       const u32* __restrict__ leaves, int plane, int b, int hkv, u32 page_size,
                                       int queries, int row0_at, int dst, int dst_slots, int dst_rows, int table_rows,
                                       u32 rows, u32 max_leaves, u32 n_leaves) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < plane; i += gridDim.x * blockDim.x) {
    const int layer = i / (b * hkv), r = (i / hkv) % b, h = i % hkv;
    const u32 row0 = w[row0_at + r];
    u32 slot = SPIN_NONE, in_page = 0, trow = SPIN_NONE;
    if (row0 != SPIN_NONE) {
      const u32 pos = w[queries + 2 * r + 1];
      trow = row0 + (u32)(layer * hkv + h);
      slot = slot_of(directory, leaves, trow, pos / page_size, rows, max_leaves, n_leaves);
      in_page = pos % page_size;
    }
    w[dst_slots + i] = slot;
    w[dst_rows + i] = in_page;
    w[dst + i] = slot == SPIN_NONE ? SPIN_NONE : slot * page_size + in_page;
    w[table_rows + i] = trow;
  }
}

// counts[index] += the number of n (index, page) pairs whose index is not NONE: a grid-
// strided count (a pair per thread and pass), a block reduction (blockDim a multiple of
// 32), then one atomicAdd per block. The partial counts are whole numbers, so their f32
// sum is exact, in any order, while the total stays below 2^24.
extern "C" __global__ void count_listed(float* __restrict__ counts, const u32* __restrict__ pairs, u64 n, u32 index) {
  __shared__ float sh[32];
  float c = 0.f;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    c += pairs[2 * i] != SPIN_NONE ? 1.f : 0.f;
  c = block_reduce(c, false, sh);
  if (threadIdx.x == 0 && c != 0.f) atomicAdd(counts + index, c);
}
