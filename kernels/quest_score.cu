// spinkv CUDA kernels: Quest page scoring, score = max over the GQA group of
// sum_i max(q_i * max_i, q_i * min_i), forced pages (sink, window) = +inf, padding = -inf.
// Launch glue: src/ops/cuda/quest_score.rs. CPU reference: src/ops/quest_score.rs.
//
// Candidate j of row (b, h) is forced when j < sink or j + window >= valid, where valid is
// the index of the first NONE (padding only at the end): that is `window >= N - j` or
// `cand[j + window] == NONE`, one extra coalesced load instead of a search.
#include "common.cuh"

#define QS_UNROLL 4

__device__ __forceinline__ bool qs_forced(const u32* row, int j, int n, int sink, int window) {
  return j < sink || window >= n - j || row[j + window] == SPIN_NONE;
}

// Stages a block's candidates j0 + i (i < cnt) of one list in shared memory: s_slot[i] is
// the slot to score, or SPIN_NONE where the score is written here already (-inf for NONE
// and out-of-range slots, +inf for forced sink and window pages). The caller syncs.
__device__ __forceinline__ void qs_stage(const u32* crow, float* orow, u32* s_slot, int j0, int cnt, int n,
                                         int sink, int window, u32 slots) {
  for (int i = threadIdx.x; i < cnt; i += blockDim.x) {
    const int j = j0 + i;
    const u32 c = crow[j];
    u32 code = SPIN_NONE;
    if (c == SPIN_NONE || c >= slots) {
      orow[j] = -INFINITY;
    } else if (qs_forced(crow, j, n, sink, window)) {
      orow[j] = INFINITY;
    } else {
      code = c;
    }
    s_slot[i] = code;
  }
}

// Fast path: a group of L = D / V lanes scores one candidate, each lane holding one
// 16-byte chunk (V elements) of the page's min and max rows (L a power of two <= 32).
// The block first stages its candidates' slots in shared memory (writing the scores of
// padding and forced pages right away), then its lane groups stream the metadata with
// QS_UNROLL candidates per group in flight and the next round's loads issued before the
// current round is reduced (two register buffers). Heads are processed in blocks of
// QS_MAXG (4 or 8) with the query chunk in registers.
#define QS_MAX_CPB 2048

template <typename T, int QS_MAXG>
__device__ __forceinline__ void scores_vec(const T* __restrict__ q, const T* __restrict__ meta,
                                           const u32* __restrict__ cand, float* __restrict__ out,
                                           int hq, int hkv, int n, int d, int sink, int window,
                                           u32 slots, int cpb) {
  constexpr int V = 16 / sizeof(T);
  constexpr int U = QS_UNROLL;
  __shared__ u32 s_slot[QS_MAX_CPB];
  const int L = d / V;
  const int row = blockIdx.y;
  const int b = row / hkv, h = row % hkv, g = hq / hkv;
  const int grp = threadIdx.x / L, lane = threadIdx.x % L;
  const int groups = blockDim.x / L;
  const int per_round = groups * U;
  const int j0 = blockIdx.x * cpb;
  const int cnt = min(n, j0 + cpb) - j0;
  const u32* crow = cand + (size_t)row * n;
  float* orow = out + (size_t)row * n;
  qs_stage(crow, orow, s_slot, j0, cnt, n, sink, window, slots);
  __syncthreads();
  const int rounds = (cnt + per_round - 1) / per_round;
  for (int r0 = 0; r0 < g; r0 += QS_MAXG) {
    const int nr = min(QS_MAXG, g - r0);
    float qr[QS_MAXG][V];
#pragma unroll
    for (int r = 0; r < QS_MAXG; ++r) {
      if (r < nr) {
        const uint4 qv = *reinterpret_cast<const uint4*>(q + ((size_t)b * hq + h * g + r0 + r) * d + lane * V);
        unpack16<T>(qv, qr[r]);
      } else {
#pragma unroll
        for (int w = 0; w < V; ++w) qr[r][w] = 0.f;
      }
    }
    auto load = [&](int rd, uint4 (&mn)[U], uint4 (&mx)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = rd * per_round + u * groups + grp;
        const u32 c = (rd < rounds && i < cnt) ? s_slot[i] : SPIN_NONE;
        if (c != SPIN_NONE) {
          const T* base = meta + (size_t)c * 2 * d + lane * V;
          mn[u] = ld_stream16(base);
          mx[u] = ld_stream16(base + d);
        } else {
          mn[u] = make_uint4(0, 0, 0, 0);
          mx[u] = mn[u];
        }
      }
    };
    // Every lane of the warp runs the reductions (warp-uniform control flow).
    auto reduce = [&](int rd, const uint4 (&mn)[U], const uint4 (&mx)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = rd * per_round + u * groups + grp;
        float fmn[V], fmx[V];
        unpack16<T>(mn[u], fmn);
        unpack16<T>(mx[u], fmx);
        float best = -INFINITY;
#pragma unroll
        for (int r = 0; r < QS_MAXG; ++r) {
          if (r < nr) {
            float sc = 0.f;
#pragma unroll
            for (int w = 0; w < V; ++w) {
              const float qx = qr[r][w];
              sc = fmaf(qx, qx >= 0.f ? fmx[w] : fmn[w], sc);
            }
            for (int off = L >> 1; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, off);
            best = fmaxf(best, sc);
          }
        }
        if (lane == 0 && i < cnt && s_slot[i] != SPIN_NONE) {
          const int j = j0 + i;
          orow[j] = r0 > 0 ? fmaxf(best, orow[j]) : best;
        }
      }
    };
    uint4 amn[U], amx[U], bmn[U], bmx[U];
    load(0, amn, amx);
    for (int rd = 0; rd < rounds; rd += 2) {
      load(rd + 1, bmn, bmx);
      reduce(rd, amn, amx);
      load(rd + 2, amn, amx);
      if (rd + 1 < rounds) reduce(rd + 1, bmn, bmx);
    }
  }
}

// Tensor-core path (bf16/f16, D = 64 or 128, g <= 16): a page's score for head h is
// Q'[h] · [min | max] with Q'[h] = [min(q_h, 0) | max(q_h, 0)] (exact in the storage
// type), i.e. a [g x 2D] by [2D x candidates] product: each warp takes 16 candidates at a
// time as the B operand (like keys in attention, 16-byte loads straight into fragments
// with the dimension order permuted identically in A and B), then maxes the 16 rows
// (heads >= g masked) with three shuffles.
template <typename T, int D, bool G16>
__device__ __forceinline__ void scores_mma(const T* __restrict__ q, const T* __restrict__ meta,
                                           const u32* __restrict__ cand, float* __restrict__ out,
                                           int hq, int hkv, int n, int sink, int window, u32 slots,
                                           int cpb) {
  constexpr int DK = 2 * D;   // [min | max]
  constexpr int KS = DK / 16; // k-steps
  constexpr int S2 = DK / 32; // 16-byte chunks per lane per candidate row
  __shared__ u32 s_slot[QS_MAX_CPB];
  const int row = blockIdx.y;
  const int b = row / hkv, h = row % hkv, g = hq / hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int r = lane >> 2, tig = lane & 3;
  const int j0 = blockIdx.x * cpb;
  const int cnt = min(n, j0 + cpb) - j0;
  const u32* crow = cand + (size_t)row * n;
  float* orow = out + (size_t)row * n;
  qs_stage(crow, orow, s_slot, j0, cnt, n, sink, window, slots);
  // A fragments of Q' (rows = heads of the group, zero beyond g).
  u32 qa[KS][4];
  const T* qbase = q + ((size_t)b * hq + (size_t)h * g) * D;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int x0 = 32 * (ks >> 1) + 8 * tig + 4 * (ks & 1);  // in [0, 2D); 4 never straddle D
    const bool neg = x0 < D;
    const int xd = neg ? x0 : x0 - D;
    u32 lo[2] = {0u, 0u}, hi[2] = {0u, 0u};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int rr = r + 8 * half;
      if (rr < g && (half == 0 || G16)) {
        const T* qr = qbase + (size_t)rr * D + xd;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = to_f32(qr[e]);
          v[e] = neg ? fminf(x, 0.f) : fmaxf(x, 0.f);
        }
        const u32 w01 = Mma<T>::pack(v[0], v[1]), w23 = Mma<T>::pack(v[2], v[3]);
        if (half == 0) {
          lo[0] = w01;
          lo[1] = w23;
        } else {
          hi[0] = w01;
          hi[1] = w23;
        }
      }
    }
    qa[ks][0] = lo[0];
    qa[ks][1] = hi[0];
    qa[ks][2] = lo[1];
    qa[ks][3] = hi[1];
  }
  __syncthreads();
  const int tiles = (cnt + 15) / 16;
  for (int tt = warp; tt < tiles; tt += warps) {
    const int i0 = tt * 16 + r, i1 = i0 + 8;
    const u32 c0 = i0 < cnt ? s_slot[i0] : SPIN_NONE;
    const u32 c1 = i1 < cnt ? s_slot[i1] : SPIN_NONE;
    uint4 k0[S2], k1[S2];
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int s2 = 0; s2 < S2; ++s2) {
      k0[s2] = c0 != SPIN_NONE ? ld_stream16(meta + (size_t)c0 * DK + 32 * s2 + 8 * tig) : zero;
      k1[s2] = c1 != SPIN_NONE ? ld_stream16(meta + (size_t)c1 * DK + 32 * s2 + 8 * tig) : zero;
    }
    float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int s2 = ks >> 1;
      const bool up = ks & 1;
      Mma<T>::run(sa, qa[ks], up ? k0[s2].z : k0[s2].x, up ? k0[s2].w : k0[s2].y);
      Mma<T>::run(sb, qa[ks], up ? k1[s2].z : k1[s2].x, up ? k1[s2].w : k1[s2].y);
    }
    // Rows r (and r + 8) are heads; columns 2tig, 2tig+1 of each tile are candidates.
    const bool ok0 = r < g, ok1 = G16 && r + 8 < g;
    float v[4];
    v[0] = fmaxf(ok0 ? sa[0] : -INFINITY, ok1 ? sa[2] : -INFINITY);
    v[1] = fmaxf(ok0 ? sa[1] : -INFINITY, ok1 ? sa[3] : -INFINITY);
    v[2] = fmaxf(ok0 ? sb[0] : -INFINITY, ok1 ? sb[2] : -INFINITY);
    v[3] = fmaxf(ok0 ? sb[1] : -INFINITY, ok1 ? sb[3] : -INFINITY);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 4));
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 8));
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 16));
    }
    if (r == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = tt * 16 + 2 * tig + (e & 1) + 8 * (e >> 1);
        if (i < cnt && s_slot[i] != SPIN_NONE) orow[j0 + i] = v[e];
      }
    }
  }
}

#define SCORE_MMA_KERNEL(NAME, T, D, G16)                                                        \
  extern "C" __global__ void __launch_bounds__(128) NAME(                                       \
      const T* q, const T* meta, const u32* cand, float* out, int hq, int hkv, int n, int d,      \
      int sink, int window, u32 slots, int cpb) {                                                 \
    scores_mma<T, D, G16>(q, meta, cand, out, hq, hkv, n, sink, window, slots, cpb);              \
  }
SCORE_MMA_KERNEL(quest_scores_mma_bf16_d128_g8, __nv_bfloat16, 128, false)
SCORE_MMA_KERNEL(quest_scores_mma_bf16_d128_g16, __nv_bfloat16, 128, true)
SCORE_MMA_KERNEL(quest_scores_mma_bf16_d64_g8, __nv_bfloat16, 64, false)
SCORE_MMA_KERNEL(quest_scores_mma_bf16_d64_g16, __nv_bfloat16, 64, true)
SCORE_MMA_KERNEL(quest_scores_mma_f16_d128_g8, __half, 128, false)
SCORE_MMA_KERNEL(quest_scores_mma_f16_d128_g16, __half, 128, true)
SCORE_MMA_KERNEL(quest_scores_mma_f16_d64_g8, __half, 64, false)
SCORE_MMA_KERNEL(quest_scores_mma_f16_d64_g16, __half, 64, true)

// Int8 bounds (format: src/ops/quest_q8.rs; rows of 2D int8 + the page's f32 scale,
// RB = 2D + SPIN_Q8_TAIL_BYTES bytes). Tensor-core path as above with f16 operands: a
// lane's 16-byte load holds 16 bounds, so k-step ks covers bytes
// x0 = 64*(ks>>2) + 16*tig + 4*(ks&3) (the A fragments use the same order); int8 becomes
// f16 exactly (0x6400 | (x + 128) is 1152 + x as f16, minus 1152); the query is cast to
// f16 (clamped to its range); each candidate's column is scaled by its page's 2^e after
// the max over heads (2^e > 0).
__device__ __forceinline__ void i8x4_to_f16x4(u32 w, u32& lo, u32& hi) {
  const u32 u = w ^ 0x80808080u;
  const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
  u32 a = __byte_perm(u, 0x64646464u, 0x4140), b = __byte_perm(u, 0x64646464u, 0x4342);
  __half2 ha = __hsub2(*reinterpret_cast<__half2*>(&a), bias);
  __half2 hb = __hsub2(*reinterpret_cast<__half2*>(&b), bias);
  lo = *reinterpret_cast<u32*>(&ha);
  hi = *reinterpret_cast<u32*>(&hb);
}

__device__ __forceinline__ u32 q8_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int D, bool G16>
__device__ __forceinline__ void scores_mma_q8(const T* __restrict__ q, const unsigned char* __restrict__ meta,
                                              const u32* __restrict__ cand, float* __restrict__ out,
                                              int hq, int hkv, int n, int sink, int window, u32 slots,
                                              int cpb) {
  constexpr int DK = 2 * D;
  constexpr int KS = DK / 16;
  constexpr int S4 = DK / 64;  // 16-byte chunks per lane per candidate row
  constexpr int RB = DK + SPIN_Q8_TAIL_BYTES;
  __shared__ u32 s_slot[QS_MAX_CPB];
  const int row = blockIdx.y;
  const int b = row / hkv, h = row % hkv, g = hq / hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int r = lane >> 2, tig = lane & 3;
  const int j0 = blockIdx.x * cpb;
  const int cnt = min(n, j0 + cpb) - j0;
  const u32* crow = cand + (size_t)row * n;
  float* orow = out + (size_t)row * n;
  qs_stage(crow, orow, s_slot, j0, cnt, n, sink, window, slots);
  u32 qa[KS][4];
  const T* qbase = q + ((size_t)b * hq + (size_t)h * g) * D;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int x0 = 64 * (ks >> 2) + 16 * tig + 4 * (ks & 3);
    const bool neg = x0 < D;
    const int xd = neg ? x0 : x0 - D;
    u32 lo[2] = {0u, 0u}, hi[2] = {0u, 0u};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int rr = r + 8 * half;
      if (rr < g && (half == 0 || G16)) {
        const T* qr = qbase + (size_t)rr * D + xd;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = fminf(fmaxf(to_f32(qr[e]), -65504.f), 65504.f);
          v[e] = neg ? fminf(x, 0.f) : fmaxf(x, 0.f);
        }
        const u32 w01 = Mma<__half>::pack(v[0], v[1]), w23 = Mma<__half>::pack(v[2], v[3]);
        if (half == 0) {
          lo[0] = w01;
          lo[1] = w23;
        } else {
          hi[0] = w01;
          hi[1] = w23;
        }
      }
    }
    qa[ks][0] = lo[0];
    qa[ks][1] = hi[0];
    qa[ks][2] = lo[1];
    qa[ks][3] = hi[1];
  }
  __syncthreads();
  const int tiles = (cnt + 15) / 16;
  // Two register buffers: tile tt + warps is loaded while tile tt is computed.
  uint4 k0[S4], k1[S4], n0[S4], n1[S4];
  float sc0, sc1, nsc0, nsc1;
  auto load = [&](int t, uint4 (&a)[S4], uint4 (&b)[S4], float& sa_, float& sb_) {
    const int i0 = t * 16 + r, i1 = i0 + 8;
    const u32 c0 = t < tiles && i0 < cnt ? s_slot[i0] : SPIN_NONE;
    const u32 c1 = t < tiles && i1 < cnt ? s_slot[i1] : SPIN_NONE;
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int s4 = 0; s4 < S4; ++s4) {
      a[s4] = c0 != SPIN_NONE ? ld_stream16(meta + (size_t)c0 * RB + 64 * s4 + 16 * tig) : zero;
      b[s4] = c1 != SPIN_NONE ? ld_stream16(meta + (size_t)c1 * RB + 64 * s4 + 16 * tig) : zero;
    }
    sa_ = c0 != SPIN_NONE ? *reinterpret_cast<const float*>(meta + (size_t)c0 * RB + DK) : 0.f;
    sb_ = c1 != SPIN_NONE ? *reinterpret_cast<const float*>(meta + (size_t)c1 * RB + DK) : 0.f;
  };
  load(warp, k0, k1, sc0, sc1);
  for (int tt = warp; tt < tiles; tt += warps) {
    load(tt + warps, n0, n1, nsc0, nsc1);
    float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 b0, b1;
      i8x4_to_f16x4(q8_word(k0[ks >> 2], ks & 3), b0, b1);
      Mma<__half>::run(sa, qa[ks], b0, b1);
      i8x4_to_f16x4(q8_word(k1[ks >> 2], ks & 3), b0, b1);
      Mma<__half>::run(sb, qa[ks], b0, b1);
    }
    const bool ok0 = r < g, ok1 = G16 && r + 8 < g;
    float v[4];
    v[0] = fmaxf(ok0 ? sa[0] : -INFINITY, ok1 ? sa[2] : -INFINITY);
    v[1] = fmaxf(ok0 ? sa[1] : -INFINITY, ok1 ? sa[3] : -INFINITY);
    v[2] = fmaxf(ok0 ? sb[0] : -INFINITY, ok1 ? sb[2] : -INFINITY);
    v[3] = fmaxf(ok0 ? sb[1] : -INFINITY, ok1 ? sb[3] : -INFINITY);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 4));
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 8));
      v[e] = fmaxf(v[e], __shfl_xor_sync(0xffffffffu, v[e], 16));
    }
    // Column 2tig + c of a tile is the candidate that lane (2tig + c) * 4 loaded.
    const float s_e[4] = {__shfl_sync(0xffffffffu, sc0, 8 * tig), __shfl_sync(0xffffffffu, sc0, 8 * tig + 4),
                          __shfl_sync(0xffffffffu, sc1, 8 * tig), __shfl_sync(0xffffffffu, sc1, 8 * tig + 4)};
    if (r == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = tt * 16 + 2 * tig + (e & 1) + 8 * (e >> 1);
        if (i < cnt && s_slot[i] != SPIN_NONE) orow[j0 + i] = v[e] * s_e[e];
      }
    }
#pragma unroll
    for (int s4 = 0; s4 < S4; ++s4) {
      k0[s4] = n0[s4];
      k1[s4] = n1[s4];
    }
    sc0 = nsc0;
    sc1 = nsc1;
  }
}

#define SCORE_MMA_Q8_KERNEL(NAME, T, D, G16)                                                      \
  extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
      const T* q, const unsigned char* meta, const u32* cand, float* out, int hq, int hkv, int n, \
      int d, int sink, int window, u32 slots, int cpb) {                                           \
    scores_mma_q8<T, D, G16>(q, meta, cand, out, hq, hkv, n, sink, window, slots, cpb);           \
  }
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_bf16_d128_g8, __nv_bfloat16, 128, false)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_bf16_d128_g16, __nv_bfloat16, 128, true)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_bf16_d64_g8, __nv_bfloat16, 64, false)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_bf16_d64_g16, __nv_bfloat16, 64, true)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_f16_d128_g8, __half, 128, false)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_f16_d128_g16, __half, 128, true)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_f16_d64_g8, __half, 64, false)
SCORE_MMA_Q8_KERNEL(quest_scores_q8_mma_f16_d64_g16, __half, 64, true)

// Generic int8 path (any D and query dtype): one warp per candidate, lanes over dims.
template <typename T>
__device__ __forceinline__ void scores_generic_q8(const T* __restrict__ q, const unsigned char* __restrict__ meta,
                                                  const u32* __restrict__ cand, float* __restrict__ out,
                                                  int hq, int hkv, int n, int d, int sink, int window,
                                                  u32 slots, int cpb) {
  const int row = blockIdx.y;
  const int b = row / hkv, h = row % hkv, g = hq / hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int j0 = blockIdx.x * cpb;
  const int j1 = min(n, j0 + cpb);
  const size_t rb = 2 * (size_t)d + SPIN_Q8_TAIL_BYTES;
  const u32* crow = cand + (size_t)row * n;
  for (int j = j0 + warp; j < j1; j += warps) {
    const u32 c = crow[j];
    float v;
    if (c == SPIN_NONE || c >= slots) {
      v = -INFINITY;
    } else if (qs_forced(crow, j, n, sink, window)) {
      v = INFINITY;
    } else {
      const signed char* mins = reinterpret_cast<const signed char*>(meta + (size_t)c * rb);
      const signed char* maxs = mins + d;
      v = -INFINITY;
      for (int r = 0; r < g; ++r) {
        const T* qv = q + ((size_t)b * hq + h * g + r) * d;
        float s = 0.f;
        for (int x = lane; x < d; x += 32) {
          const float qx = to_f32(qv[x]);
          s += qx * (float)(qx >= 0.f ? maxs[x] : mins[x]);
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        v = fmaxf(v, s);
      }
      v *= *reinterpret_cast<const float*>(meta + (size_t)c * rb + 2 * d);
    }
    if (lane == 0) out[(size_t)row * n + j] = v;
  }
}

#define SCORE_GENERIC_Q8_KERNEL(NAME, T)                                                          \
  extern "C" __global__ void NAME(const T* q, const unsigned char* meta, const u32* cand,         \
                                  float* out, int hq, int hkv, int n, int d, int sink, int window, \
                                  u32 slots, int cpb) {                                            \
    scores_generic_q8<T>(q, meta, cand, out, hq, hkv, n, d, sink, window, slots, cpb);             \
  }
SCORE_GENERIC_Q8_KERNEL(quest_scores_q8_generic_f32, float)
SCORE_GENERIC_Q8_KERNEL(quest_scores_q8_generic_f16, __half)
SCORE_GENERIC_Q8_KERNEL(quest_scores_q8_generic_bf16, __nv_bfloat16)

// Generic path (any D, dtype): one warp per candidate, lanes stride over dims.
template <typename T>
__device__ __forceinline__ void scores_generic(const T* __restrict__ q, const T* __restrict__ meta,
                                               const u32* __restrict__ cand, float* __restrict__ out,
                                               int hq, int hkv, int n, int d, int sink, int window,
                                               u32 slots, int cpb) {
  const int row = blockIdx.y;
  const int b = row / hkv, h = row % hkv, g = hq / hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int j0 = blockIdx.x * cpb;
  const int j1 = min(n, j0 + cpb);
  const u32* crow = cand + (size_t)row * n;
  for (int j = j0 + warp; j < j1; j += warps) {
    const u32 c = crow[j];
    float v;
    if (c == SPIN_NONE || c >= slots) {
      v = -INFINITY;
    } else if (qs_forced(crow, j, n, sink, window)) {
      v = INFINITY;
    } else {
      const T* mins = meta + (size_t)c * 2 * d;
      const T* maxs = mins + d;
      v = -INFINITY;
      for (int r = 0; r < g; ++r) {
        const T* qv = q + ((size_t)b * hq + h * g + r) * d;
        float s = 0.f;
        for (int x = lane; x < d; x += 32) {
          const float qx = to_f32(qv[x]);
          s += fmaxf(qx * to_f32(maxs[x]), qx * to_f32(mins[x]));
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        v = fmaxf(v, s);
      }
    }
    if (lane == 0) out[(size_t)row * n + j] = v;
  }
}

#define SCORE_KERNELS(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(128, 3) quest_scores_vec4_##SUFFIX(                    \
      const T* q, const T* meta, const u32* cand, float* out, int hq, int hkv, int n, int d,        \
      int sink, int window, u32 slots, int cpb) {                                                   \
    scores_vec<T, 4>(q, meta, cand, out, hq, hkv, n, d, sink, window, slots, cpb);                  \
  }                                                                                                 \
  extern "C" __global__ void __launch_bounds__(128) quest_scores_vec8_##SUFFIX(                    \
      const T* q, const T* meta, const u32* cand, float* out, int hq, int hkv, int n, int d,        \
      int sink, int window, u32 slots, int cpb) {                                                   \
    scores_vec<T, 8>(q, meta, cand, out, hq, hkv, n, d, sink, window, slots, cpb);                  \
  }                                                                                                 \
  extern "C" __global__ void quest_scores_generic_##SUFFIX(                                         \
      const T* q, const T* meta, const u32* cand, float* out, int hq, int hkv, int n, int d,        \
      int sink, int window, u32 slots, int cpb) {                                                   \
    scores_generic<T>(q, meta, cand, out, hq, hkv, n, d, sink, window, slots, cpb);                 \
  }
SCORE_KERNELS(f32, float)
SCORE_KERNELS(f16, __half)
SCORE_KERNELS(bf16, __nv_bfloat16)
