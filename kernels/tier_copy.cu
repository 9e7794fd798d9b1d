// spinkv CUDA kernels: batched whole-page copy between two page pools on one GPU (a
// gather kernel, one block per (src, dst) pair), and the conversion of a top-k
// selection into an attention page list.
// Launch glue: src/ops/cuda/tier_copy.rs. CPU reference: src/ops/tier_copy.rs.
#include "common.cuh"

template <typename W>
__device__ __forceinline__ void copy_impl(W* __restrict__ dst, const W* __restrict__ src,
                                          const u32* __restrict__ pairs, int n, int page_words,
                                          u32 nd, u32 ns) {
  for (int p = blockIdx.x; p < n; p += gridDim.x) {
    const u32 s = pairs[2 * p], d = pairs[2 * p + 1];
    if (s >= ns || d >= nd) continue;  // the CPU op fails here; the kernel skips the pair
    const W* from = src + (size_t)s * page_words;
    W* to = dst + (size_t)d * page_words;
    for (int i = threadIdx.x; i < page_words; i += blockDim.x) to[i] = from[i];
  }
}

#define COPY_KERNEL(NAME, W)                                                                \
  extern "C" __global__ void NAME(W* dst, const W* src, const u32* pairs, int n,           \
                                  int page_words, u32 nd, u32 ns) {                         \
    copy_impl<W>(dst, src, pairs, n, page_words, nd, ns);                                   \
  }
COPY_KERNEL(copy_pages_w16, uint4)
COPY_KERNEL(copy_pages_w4, u32)
COPY_KERNEL(copy_pages_w2, unsigned short)

// pages[r, e] = (candidates[r, sel[r, e]], sel[r, e]) for a selection of candidate
// indices (logical page numbers); NONE entries (or indices >= n) give (NONE, NONE).
extern "C" __global__ void selection_to_pages(const u32* __restrict__ cand, const u32* __restrict__ sel,
                                              u32* __restrict__ pages, int rows, int n, int k) {
  const size_t total = (size_t)rows * k;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / k;
    const u32 idx = sel[i];
    u32 slot = SPIN_NONE, lp = SPIN_NONE;
    if (idx != SPIN_NONE && idx < (u32)n) {
      slot = cand[r * n + idx];
      lp = slot == SPIN_NONE ? SPIN_NONE : idx;
    }
    pages[2 * i] = slot;
    pages[2 * i + 1] = lp;
  }
}

// copy_pages with the pair count on the device: `pairs` holds `cap` rows, of which only
// the first `*count` are valid (the rest may be garbage). The grid depends on `cap` only,
// so the host never reads the count; blocks past it exit at once.
#define COPY_COUNTED_KERNEL(NAME, W)                                                        \
  extern "C" __global__ void NAME(W* dst, const W* src, const u32* pairs, const u32* count, \
                                  int cap, int page_words, u32 nd, u32 ns) {                \
    const u32 c = *count;                                                                   \
    const int n = c < (u32)cap ? (int)c : cap;                                              \
    copy_impl<W>(dst, src, pairs, n, page_words, nd, ns);                                   \
  }
COPY_COUNTED_KERNEL(copy_pages_counted_w16, uint4)
COPY_COUNTED_KERNEL(copy_pages_counted_w4, u32)
COPY_COUNTED_KERNEL(copy_pages_counted_w2, unsigned short)
