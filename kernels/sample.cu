// spinkv CUDA kernels: one token drawn per row of logits, on the device, so that a
// captured decode step ends with its sampled ids. One block per row:
//   greedy rows (temperature <= 0 or top_k == 1): the first index of the largest logit;
//   others: z = logit / temperature; keep z >= the k-th largest z (top_k > 0), then keep
//   the smallest head of the kept tokens, by z, whose softmax mass reaches top_p (ties at
//   the cut kept); draw argmax(z + Gumbel noise) over the kept tokens, the noise a
//   counter-based hash of (seed, counter, index), computed in f64.
// Thresholds are found by radix selection over order-preserving u32 keys of z (4 passes
// of 8 bits; weights are counts for top-k, softmax masses for top-p).
// Params per row, u32 [6]: temperature (f32 bits), top_k, top_p (f32 bits), seed low,
// seed high, counter. Launch glue: src/ops/cuda/sample.rs. CPU reference: src/ops/sample.rs.
#include "common.cuh"

#define SAMPLE_THREADS 1024

__device__ __forceinline__ unsigned long long splitmix(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Order-preserving key of a float (larger float, larger key).
__device__ __forceinline__ u32 order_key(float z) {
  const u32 b = __float_as_uint(z);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Best {
  double score;
  int index;
};

// Larger score wins; on equal scores the lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.score > a.score || (b.score == a.score && b.index < a.index)) return b;
  return a;
}

struct SampleShared {
  float hist[256];
  float red[32];
  double best_score[32];
  int best_index[32];
  u32 sel;
  float rest;
};

__device__ Best block_best(Best b, SampleShared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffu, b.score, o), __shfl_xor_sync(0xffffffffu, b.index, o)};
    b = better(b, other);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    sh.best_score[threadIdx.x >> 5] = b.score;
    sh.best_index[threadIdx.x >> 5] = b.index;
  }
  __syncthreads();
  Best t{0.0, -1};
  for (int w = 0; w < (int)(blockDim.x >> 5); w++) t = better(t, Best{sh.best_score[w], sh.best_index[w]});
  return t;
}

// The largest key t with W(key >= t) >= target, W the total weight of the tokens at or
// above a key (weights from `mass`: counts when false, exp(z - m) of keys >= floor when
// true). 0 (keep everything) when the total weight is below the target.
__device__ u32 radix_select(const float* __restrict__ l, int v, float inv_t, bool mass, float m, u32 floor,
                            float target, SampleShared& sh) {
  u32 prefix = 0, mask = 0;
  if (threadIdx.x == 0) sh.rest = target;
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0.f;
    __syncthreads();
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
      const float z = l[i] * inv_t;
      if (isnan(z)) continue;
      const u32 key = order_key(z);
      if ((key & mask) != prefix || key < floor) continue;
      atomicAdd(&sh.hist[(key >> shift) & 255u], mass ? expf(z - m) : 1.f);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // rest < 0: the weight fell short of the target (too few tokens, or rounding):
      // from then on the lowest bin, so that everything is kept.
      float c = 0.f;
      int sel = -1, lowest = 0;
      for (int b = 255; b >= 0; b--) {
        if (sh.hist[b] > 0.f) lowest = b;
      }
      for (int b = 255; b >= 0 && sh.rest >= 0.f; b--) {
        if (sh.hist[b] > 0.f && c + sh.hist[b] >= sh.rest) {
          sel = b;
          break;
        }
        c += sh.hist[b];
      }
      if (sel < 0) {
        sel = lowest;
        sh.rest = -1.f;
      } else {
        sh.rest -= c;
      }
      sh.sel = (u32)sel;
    }
    __syncthreads();
    prefix |= sh.sel << shift;
    mask |= 255u << shift;
  }
  return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* __restrict__ logits, const u32* __restrict__ params, u32* __restrict__ out, int v) {
  __shared__ SampleShared sh;
  const int row = blockIdx.x;
  const float* l = logits + (size_t)row * v;
  const u32* p = params + (size_t)row * 6;
  const float temp = __uint_as_float(p[0]);
  const u32 top_k = p[1];
  const float top_p = __uint_as_float(p[2]);
  const unsigned long long seed = (unsigned long long)p[3] | ((unsigned long long)p[4] << 32);
  const u32 counter = p[5];
  if (!(temp > 0.f) || top_k == 1) {
    Best b{0.0, -1};
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
      if (!isnan(l[i])) b = better(b, Best{(double)l[i], i});
    }
    b = block_best(b, sh);
    if (threadIdx.x == 0) out[row] = b.index < 0 ? 0u : (u32)b.index;
    return;
  }
  const float inv_t = 1.f / temp;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float z = l[i] * inv_t;
    if (!isnan(z)) mx = fmaxf(mx, z);
  }
  mx = block_reduce(mx, true, sh.red);
  u32 floor = 0;
  if (top_k > 0 && top_k < (u32)v) floor = radix_select(l, v, inv_t, false, mx, 0, (float)top_k, sh);
  if (top_p < 1.f) {
    float s = 0.f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
      const float z = l[i] * inv_t;
      if (!isnan(z) && order_key(z) >= floor) s += expf(z - mx);
    }
    s = block_reduce(s, false, sh.red);
    const u32 cut = radix_select(l, v, inv_t, true, mx, floor, top_p * s, sh);
    floor = max(floor, cut);
  }
  const unsigned long long base = splitmix(seed ^ splitmix((unsigned long long)counter));
  Best b{0.0, -1};
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float z = l[i] * inv_t;
    if (isnan(z) || order_key(z) < floor || z == -INFINITY) continue;
    const unsigned long long h = splitmix(base + (unsigned long long)i);
    const double u = ((double)(h >> 11) + 0.5) * 0x1.0p-53;
    b = better(b, Best{(double)z - log(-log(u)), i});
  }
  b = block_best(b, sh);
  if (threadIdx.x == 0) out[row] = b.index < 0 ? 0u : (u32)b.index;
}
