// spinkv CUDA kernels: paged append (K/V rows into pool pages), the Quest metadata
// update (per-page element-wise min/max of keys, in the key dtype or as int8 bounds), and
// the fused form of the two (paged_append_minmax_*: one launch, each key row read once
// for both).
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
// The slot whose run entry (t, h) starts, or SPIN_NONE: the entry is NONE, the nearest
// earlier non-NONE entry of head h has the same slot (not a run start), or the slot is
// past `slots`.
__device__ __forceinline__ u32 run_start_slot(const u32* __restrict__ dst, int t, int h, int heads, u32 page_size,
                                              u32 slots) {
  const u32 code = dst[t * heads + h];
  if (code == SPIN_NONE) return SPIN_NONE;
  const u32 slot = code / page_size;
  for (int tp = t - 1; tp >= 0; --tp) {
    const u32 c = dst[tp * heads + h];
    if (c == SPIN_NONE) continue;
    if (c / page_size == slot) return SPIN_NONE;
    break;
  }
  return slot < slots ? slot : SPIN_NONE;
}

template <typename T>
__device__ __forceinline__ void meta_run(T* __restrict__ meta, const T* __restrict__ k,
                                         const u32* __restrict__ dst, int t, int h, int tokens,
                                         int heads, int d, u32 page_size, u32 slots) {
  const u32 slot = run_start_slot(dst, t, h, heads, page_size, slots);
  if (slot == SPIN_NONE) return;
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

// Quest's int8 page bounds (src/ops/quest_q8.rs has the format and the CPU reference):
// a row is 2*d int8 (mins, then maxes) and the page's scale 2^e as f32, padded to
// 2*d + SPIN_Q8_TAIL_BYTES bytes. Outward rounding with a power-of-two scale makes a row a
// function of the page's keys alone, so widening it run by run here gives the bytes the
// CPU op gives token by token.
__device__ __forceinline__ int q8_exponent_for(float m) {
  const u32 bits = __float_as_uint(m);
  const int biased = (bits >> 23) & 0xff;
  if (biased == 0) return SPIN_Q8_EXP_MIN;
  const int e = biased - 127 - 6 + ((bits & 0x7fffffu) > 0x7e0000u ? 1 : 0);
  return min(max(e, SPIN_Q8_EXP_MIN), SPIN_Q8_EXP_MAX);
}

__device__ __forceinline__ float q8_pow2(int e) { return __uint_as_float((u32)(e + 127) << 23); }

__device__ __forceinline__ int q8_clamp(float x) { return min(max((int)x, -127), 127); }

// Max of v over the block (every thread gets it); s holds one float per warp.
__device__ __forceinline__ float block_max(float v, float* s) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
  const int nw = (blockDim.x + 31) >> 5;
  if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
  __syncthreads();
  v = s[0];
  for (int i = 1; i < nw; ++i) v = fmaxf(v, s[i]);
  __syncthreads();
  return v;
}

// meta_run for int8 bounds: the run's keys (from its last row-0 token, which resets the
// page) widen the row; the exponent grows to fit them and the old integers shift right
// by the growth (floor for mins, ceil for maxes). Block-uniform control flow.
template <typename T>
__device__ __forceinline__ void meta_run_q8(unsigned char* __restrict__ meta, const T* __restrict__ k,
                                            const u32* __restrict__ dst, int t, int h, int tokens,
                                            int heads, int d, u32 page_size, u32 slots) {
  __shared__ float s_red[32];
  const u32 slot = run_start_slot(dst, t, h, heads, page_size, slots);
  if (slot == SPIN_NONE) return;
  int start = t, end = t;
  bool reset = false;
  for (int tt = t; tt < tokens; ++tt) {
    const u32 c = dst[tt * heads + h];
    if (c == SPIN_NONE) continue;
    if (c / page_size != slot) break;
    if (c % page_size == 0) {
      start = tt;
      reset = true;
    }
    end = tt + 1;
  }
  unsigned char* row = meta + (size_t)slot * (2 * d + SPIN_Q8_TAIL_BYTES);
  float* scale = reinterpret_cast<float*>(row + 2 * d);
  const float old_scale = *scale;
  float m = 0.f;
  for (int tt = start; tt < end; ++tt) {
    if (dst[tt * heads + h] == SPIN_NONE) continue;
    const T* kr = k + ((size_t)tt * heads + h) * d;
    for (int x = threadIdx.x; x < d; x += blockDim.x) m = fmaxf(m, fabsf(to_f32(kr[x])));
  }
  m = block_max(m, s_red);  // also orders every thread's read of old_scale before the write
  int e = q8_exponent_for(m), shift = 0;
  if (!reset) {
    const int biased = (__float_as_uint(old_scale) >> 23) & 0xff;
    const int e_old = min(max(biased - 127, SPIN_Q8_EXP_MIN), SPIN_Q8_EXP_MAX);
    const int e_new = max(e_old, e);
    shift = min(e_new - e_old, 31);
    e = e_new;
  }
  const float inv = q8_pow2(-e);
  for (int x = threadIdx.x; x < d; x += blockDim.x) {
    int lo = 128, hi = -128;
    if (!reset) {
      lo = (int)(signed char)row[x] >> shift;
      hi = -((-(int)(signed char)row[d + x]) >> shift);
    }
    for (int tt = start; tt < end; ++tt) {
      if (dst[tt * heads + h] == SPIN_NONE) continue;
      const float y = to_f32(k[((size_t)tt * heads + h) * d + x]) * inv;
      lo = min(lo, q8_clamp(floorf(y)));
      hi = max(hi, q8_clamp(ceilf(y)));
    }
    row[x] = (unsigned char)(signed char)lo;
    row[d + x] = (unsigned char)(signed char)hi;
  }
  if (threadIdx.x == 0) *scale = q8_pow2(e);
  if (threadIdx.x < SPIN_Q8_TAIL_BYTES - 4) row[2 * d + 4 + threadIdx.x] = 0;
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

#define META_Q8_KERNEL(NAME, T)                                                                    \
  extern "C" __global__ void NAME(unsigned char* meta, const T* k, const u32* dst, int tokens,     \
                                  int heads, int d, u32 page_size, u32 slots) {                    \
    const int e = blockIdx.x;                                                                      \
    meta_run_q8<T>(meta, k, dst, e / heads, e % heads, tokens, heads, d, page_size, slots);        \
  }
META_Q8_KERNEL(quest_meta_update_q8_f32, float)
META_Q8_KERNEL(quest_meta_update_q8_f16, __half)
META_Q8_KERNEL(quest_meta_update_q8_bf16, __nv_bfloat16)

// Fused paged append + Quest min/max update: one block per (token t, head h) entry
// (grid-stride). The block copies the entry's K and V rows to `pool_dst[e]` (NONE: the
// page is not in this pool; skipped) in words of `word_bytes` (16, 4 or 2; rows and
// pointers aligned to it), then, if the entry starts a run of `meta_dst` (see meta_impl),
// applies that run's min/max. `pool_dst` and `meta_dst` index different slot spaces (the
// fast tier's slots and the host slots that key the metadata) with one page size.
template <typename T, bool Q8>
__device__ __forceinline__ void append_minmax_impl(T* __restrict__ pool, void* __restrict__ meta,
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
    if (Q8) {
      meta_run_q8<T>((unsigned char*)meta, k, meta_dst, e / heads, e % heads, tokens, heads, d,
                     page_size, meta_slots);
    } else {
      meta_run<T>((T*)meta, k, meta_dst, e / heads, e % heads, tokens, heads, d, page_size,
                  meta_slots);
    }
  }
}

#define APPEND_MINMAX_KERNEL(NAME, T, Q8)                                                    \
  extern "C" __global__ void NAME(T* pool, void* meta, const T* k, const T* v,               \
                                  const u32* pool_dst, const u32* meta_dst, int tokens,      \
                                  int heads, int d, u32 page_size, u32 pool_slots,           \
                                  u32 meta_slots, int word_bytes) {                          \
    append_minmax_impl<T, Q8>(pool, meta, k, v, pool_dst, meta_dst, tokens, heads, d,        \
                              page_size, pool_slots, meta_slots, word_bytes);                \
  }
APPEND_MINMAX_KERNEL(paged_append_minmax_f32, float, false)
APPEND_MINMAX_KERNEL(paged_append_minmax_f16, __half, false)
APPEND_MINMAX_KERNEL(paged_append_minmax_bf16, __nv_bfloat16, false)
APPEND_MINMAX_KERNEL(paged_append_minmax_q8_f32, float, true)
APPEND_MINMAX_KERNEL(paged_append_minmax_q8_f16, __half, true)
APPEND_MINMAX_KERNEL(paged_append_minmax_q8_bf16, __nv_bfloat16, true)
