// spinkv CUDA kernels: paged append (K/V rows into pool pages), the Quest metadata
// update (per-page element-wise min/max of keys), and the fused form of the two
// (paged_append_minmax_*: one launch, each key row read once for both).
// Launch glue: src/ops/cuda/append.rs. CPU reference: src/ops/append.rs.
#include "common.cuh"

// One warp per (token, head) entry copies the key and value rows, `row_words` words of
// type W each (W = uint4 when rows and pointers are 16-byte aligned).
template <typename W>
__device__ __forceinline__ void append_impl(W* __restrict__ pool, const W* __restrict__ k,
                                            const W* __restrict__ v, const u32* __restrict__ dst,
                                            int entries, u32 page_size, int row_words, u32 slots) {
  const int lane = threadIdx.x & 31;
  const int warps = (gridDim.x * blockDim.x) >> 5;
  for (int e = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; e < entries; e += warps) {
    const u32 code = dst[e];
    if (code == SPIN_NONE) continue;
    const u32 slot = code / page_size, row = code % page_size;
    if (slot >= slots) continue;  // the CPU op fails here; the kernel skips the entry
    const size_t kb = ((size_t)slot * 2 * page_size + row) * row_words;
    const size_t vb = kb + (size_t)page_size * row_words;
    const size_t src = (size_t)e * row_words;
    for (int i = lane; i < row_words; i += 32) {
      pool[kb + i] = k[src + i];
      pool[vb + i] = v[src + i];
    }
  }
}

#define APPEND_KERNEL(NAME, W)                                                             \
  extern "C" __global__ void NAME(W* pool, const W* k, const W* v, const u32* dst,        \
                                  int entries, u32 page_size, int row_words, u32 slots) { \
    append_impl<W>(pool, k, v, dst, entries, page_size, row_words, slots);                 \
  }
APPEND_KERNEL(paged_append_w16, uint4)
APPEND_KERNEL(paged_append_w4, u32)
APPEND_KERNEL(paged_append_w2, unsigned short)

// Quest min/max update. One block per (token t, head h) entry; the block that starts a
// run of same-slot entries of head h (the nearest earlier non-NONE entry of that head
// has another slot) applies the whole run in token order, so results are deterministic
// and need no atomics. Entries of one slot must form one run (the cache appends each
// page's tokens in order, one sequence per page), as the CPU op's semantics assume.
// meta_run applies the run of entry (t, h), if it starts one; meta_impl is one block
// per entry.
template <typename T>
__device__ __forceinline__ void meta_run(T* __restrict__ meta, const T* __restrict__ k,
                                         const u32* __restrict__ dst, int t, int h, int tokens,
                                         int heads, int d, u32 page_size, u32 slots) {
  const u32 code = dst[t * heads + h];
  if (code == SPIN_NONE) return;
  const u32 slot = code / page_size;
  for (int tp = t - 1; tp >= 0; --tp) {
    const u32 c = dst[tp * heads + h];
    if (c == SPIN_NONE) continue;
    if (c / page_size == slot) return;  // not the start of the run
    break;
  }
  if (slot >= slots) return;
  T* mins = meta + (size_t)slot * 2 * d;
  T* maxs = mins + d;
  for (int x = threadIdx.x; x < d; x += blockDim.x) {
    T mn = mins[x], mx = maxs[x];
    for (int tt = t; tt < tokens; ++tt) {
      const u32 c = dst[tt * heads + h];
      if (c == SPIN_NONE) continue;
      if (c / page_size != slot) break;
      const T key = k[((size_t)tt * heads + h) * d + x];
      if (c % page_size == 0) {
        mn = key;
        mx = key;
      } else {
        const float xf = to_f32(key);
        if (xf < to_f32(mn)) mn = key;
        if (xf > to_f32(mx)) mx = key;
      }
    }
    mins[x] = mn;
    maxs[x] = mx;
  }
}

template <typename T>
__device__ __forceinline__ void meta_impl(T* __restrict__ meta, const T* __restrict__ k,
                                          const u32* __restrict__ dst, int tokens, int heads,
                                          int d, u32 page_size, u32 slots) {
  const int e = blockIdx.x;
  meta_run<T>(meta, k, dst, e / heads, e % heads, tokens, heads, d, page_size, slots);
}

#define META_KERNEL(NAME, T)                                                                \
  extern "C" __global__ void NAME(T* meta, const T* k, const u32* dst, int tokens, int heads, \
                                  int d, u32 page_size, u32 slots) {                          \
    meta_impl<T>(meta, k, dst, tokens, heads, d, page_size, slots);                           \
  }
META_KERNEL(quest_meta_update_f32, float)
META_KERNEL(quest_meta_update_f16, __half)
META_KERNEL(quest_meta_update_bf16, __nv_bfloat16)

// Fused paged append + Quest min/max update: one block per (token t, head h) entry
// (grid-stride). The block copies the entry's K and V rows to `pool_dst[e]` (NONE: the
// page is not in this pool; skipped) in words of `word_bytes` (16, 4 or 2; rows and
// pointers aligned to it), then, if the entry starts a run of `meta_dst` (see meta_impl),
// applies that run's min/max. `pool_dst` and `meta_dst` index different slot spaces (the
// fast tier's slots and the host slots that key the metadata) with one page size.
template <typename T>
__device__ __forceinline__ void append_minmax_impl(T* __restrict__ pool, T* __restrict__ meta,
                                                   const T* __restrict__ k, const T* __restrict__ v,
                                                   const u32* __restrict__ pool_dst,
                                                   const u32* __restrict__ meta_dst, int tokens,
                                                   int heads, int d, u32 page_size, u32 pool_slots,
                                                   u32 meta_slots, int word_bytes) {
  const int entries = tokens * heads;
  const int row_bytes = d * (int)sizeof(T);
  for (int e = blockIdx.x; e < entries; e += gridDim.x) {
    const u32 code = pool_dst[e];
    if (code != SPIN_NONE && code / page_size < pool_slots) {
      const u32 slot = code / page_size, row = code % page_size;
      char* kd = (char*)pool + ((size_t)slot * 2 * page_size + row) * row_bytes;
      char* vd = kd + (size_t)page_size * row_bytes;
      const char* ks = (const char*)k + (size_t)e * row_bytes;
      const char* vs = (const char*)v + (size_t)e * row_bytes;
      if (word_bytes == 16) {
        for (int i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
          ((uint4*)kd)[i] = ((const uint4*)ks)[i];
          ((uint4*)vd)[i] = ((const uint4*)vs)[i];
        }
      } else if (word_bytes == 4) {
        for (int i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) {
          ((u32*)kd)[i] = ((const u32*)ks)[i];
          ((u32*)vd)[i] = ((const u32*)vs)[i];
        }
      } else {
        for (int i = threadIdx.x; i < row_bytes / 2; i += blockDim.x) {
          ((unsigned short*)kd)[i] = ((const unsigned short*)ks)[i];
          ((unsigned short*)vd)[i] = ((const unsigned short*)vs)[i];
        }
      }
    }
    meta_run<T>(meta, k, meta_dst, e / heads, e % heads, tokens, heads, d, page_size, meta_slots);
  }
}

#define APPEND_MINMAX_KERNEL(NAME, T)                                                        \
  extern "C" __global__ void NAME(T* pool, T* meta, const T* k, const T* v,                  \
                                  const u32* pool_dst, const u32* meta_dst, int tokens,      \
                                  int heads, int d, u32 page_size, u32 pool_slots,           \
                                  u32 meta_slots, int word_bytes) {                          \
    append_minmax_impl<T>(pool, meta, k, v, pool_dst, meta_dst, tokens, heads, d, page_size, \
                          pool_slots, meta_slots, word_bytes);                               \
  }
APPEND_MINMAX_KERNEL(paged_append_minmax_f32, float)
APPEND_MINMAX_KERNEL(paged_append_minmax_f16, __half)
APPEND_MINMAX_KERNEL(paged_append_minmax_bf16, __nv_bfloat16)
