// spinkv CUDA kernels: exact top-k per row (descending score, ties to the lower index,
// -inf and NaN never chosen, NONE padding) — bit-for-bit the CPU op's result.
// Launch glue: src/ops/cuda/topk.rs. CPU reference: src/ops/topk.rs.
//
// One block per row: an 8-bit radix select (up to 4 passes) finds the k-th largest key,
// an ordered compaction (a contiguous chunk of the row per thread, one scan of the tie
// counts) takes every key above it plus the first ties by index, and the
// (key, index) pairs are ordered in shared memory (rank counting for small selections,
// else a bitonic sort). The row's
// keys are staged in shared memory when they fit.
#include "common.cuh"

#define TOPK_INVALID 0xffffffffu
// Selections up to this size are ordered by rank counting instead of a bitonic sort.
#define TOPK_RANK_MAX 256

// Order-preserving map: a larger score gives a smaller key; -0.0 == +0.0 (as the CPU's
// partial_cmp); -inf and NaN map to TOPK_INVALID (never a valid key).
__device__ __forceinline__ u32 desc_key(float f) {
  if (!(f > -INFINITY)) return TOPK_INVALID;
  f += 0.0f;  // -0.0 -> +0.0
  const u32 u = __float_as_uint(f);
  const u32 asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~asc;
}

struct TopkShared {
  u32 hist[256];
  u32 warp_sums[32];
  u32 digit;
  u32 remaining;
  u32 done;
  u32 count;
};

// Dynamic shared memory: TopkShared, then `sort_cap` u64 sort slots, then (if staged)
// `n` u32 keys.
extern "C" __global__ void topk_rows(const float* __restrict__ scores, u32* __restrict__ out,
                                     int n, int k, int sort_cap, int staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TopkShared& sh = *reinterpret_cast<TopkShared*>(smem_raw);
  u64* buf = reinterpret_cast<u64*>(smem_raw + ((sizeof(TopkShared) + 15) / 16) * 16);
  u32* keys = reinterpret_cast<u32*>(buf + sort_cap);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const float* row = scores + (size_t)blockIdx.x * n;

  if (staged) {
    for (int i = tid; i < n; i += nt) keys[i] = desc_key(row[i]);
  }
  auto key_at = [&](int i) -> u32 { return staged ? keys[i] : desc_key(row[i]); };

  // Radix select of the k-th smallest valid key, 8 bits a pass. It stops early when the
  // bin holding the k-th key is needed whole (done = 1), or when at most k keys are
  // valid (done = 2: all are taken).
  u32 prefix = 0, mask = 0;
  if (tid == 0) {
    sh.remaining = (u32)k;
    sh.done = 0;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nt) sh.hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += nt) {
      const u32 key = key_at(i);
      if (key != TOPK_INVALID && (key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // Read before the warp's shuffles: the lane that writes `remaining` below does so
      // only after every lane has passed them.
      const u32 want = sh.remaining;
      u32 local[8];
      u32 sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        local[i] = sh.hist[lane * 8 + i];
        sum += local[i];
      }
      u32 incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      const u32 total = __shfl_sync(0xffffffffu, incl, 31);
      if (shift == 24 && total <= want) {
        if (lane == 0) {
          sh.done = 2;
          sh.remaining = total;
        }
      } else {
        const u32 excl = incl - sum;
        // The lane whose bins cross `want`.
        if (excl < want && incl >= want) {
          u32 c = excl;
          int dgt = 0;
          for (int i = 0; i < 8; ++i) {
            if (c + local[i] >= want) {
              dgt = i;
              break;
            }
            c += local[i];
          }
          sh.digit = (u32)(lane * 8 + dgt);
          sh.remaining = want - c;
          if (local[dgt] == want - c) sh.done = 1;
        }
      }
    }
    __syncthreads();
    const u32 done = sh.done;
    if (done == 2) break;
    prefix |= sh.digit << shift;
    mask |= 0xffu << shift;
    if (done == 1) break;
    __syncthreads();
  }
  // Ordered compaction: every valid key whose masked value is below `prefix`, plus the
  // first `need_eq` (by index) whose masked value equals it. Each thread owns a
  // contiguous chunk of the row, so one block-wide scan of the per-chunk tie counts
  // orders the ties (where a pass per blockDim.x keys needed three barriers each).
  const u32 need_eq = sh.remaining;
  __syncthreads();
  if (tid == 0) sh.count = 0;
  const int per = (n + nt - 1) / nt;
  const int lo = min(n, tid * per), hi = min(n, lo + per);
  u32 my_eq = 0;
  for (int i = lo; i < hi; ++i) {
    const u32 key = key_at(i);
    my_eq += key != TOPK_INVALID && (key & mask) == prefix;
  }
  u32 incl = my_eq;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const u32 y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) sh.warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const u32 own = lane < nwarps ? sh.warp_sums[lane] : 0u;
    u32 wincl = own;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const u32 y = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += y;
    }
    if (lane < nwarps) sh.warp_sums[lane] = wincl - own;  // exclusive
  }
  __syncthreads();
  u32 before = sh.warp_sums[warp] + incl - my_eq;
  for (int i = lo; i < hi; ++i) {
    const u32 key = key_at(i);
    if (key == TOPK_INVALID) continue;
    const u32 m = key & mask;
    bool take = m < prefix;
    if (m == prefix) take = before++ < need_eq;
    if (take) buf[atomicAdd(&sh.count, 1u)] = ((u64)key << 32) | (u32)i;
  }
  __syncthreads();
  const int sel = (int)sh.count;  // == min(k, valid)
  u32* orow = out + (size_t)blockIdx.x * k;
  for (int e = sel + tid; e < k; e += nt) orow[e] = SPIN_NONE;
  if (sel <= TOPK_RANK_MAX) {
    // Small selections: each entry's rank is the number of smaller (key, index) pairs.
    for (int i = tid; i < sel; i += nt) {
      const u64 mine = buf[i];
      int rank = 0;
      for (int j = 0; j < sel; ++j) rank += buf[j] < mine;
      orow[rank] = (u32)(mine & 0xffffffffu);
    }
    return;
  }
  int p2 = 1;
  while (p2 < sel) p2 <<= 1;
  for (int i = sel + tid; i < p2; i += nt) buf[i] = ~0ull;
  __syncthreads();
  // Bitonic sort, ascending (key, index): descending score, ties to the lower index.
  for (int size = 2; size <= p2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (p2 >> 1); i += nt) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool up = (lo & size) == 0;
        const u64 a = buf[lo], b = buf[hi];
        if ((a > b) == up) {
          buf[lo] = b;
          buf[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int e = tid; e < sel; e += nt) orow[e] = (u32)(buf[e] & 0xffffffffu);
}
