// spinkv CUDA kernels: paged append (K/V rows into pool pages), the Quest metadata
// update (per-page element-wise min/max of keys), and the fused form of the two.
// Launch glue: src/cuda/append.rs. CPU reference: src/ops/append.rs.
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
template <typename T>
__device__ __forceinline__ void meta_impl(T* __restrict__ meta, const T* __restrict__ k,
                                          const u32* __restrict__ dst, int tokens, int heads,
                                          int d, u32 page_size, u32 slots) {
  const int e = blockIdx.x;
  const int t = e / heads, h = e % heads;
  const u32 code = dst[e];
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

#define META_KERNEL(NAME, T)                                                                \
  extern "C" __global__ void NAME(T* meta, const T* k, const u32* dst, int tokens, int heads, \
                                  int d, u32 page_size, u32 slots) {                          \
    meta_impl<T>(meta, k, dst, tokens, heads, d, page_size, slots);                           \
  }
META_KERNEL(quest_meta_update_f32, float)
META_KERNEL(quest_meta_update_f16, __half)
META_KERNEL(quest_meta_update_bf16, __nv_bfloat16)
