// InfLLM's device state (src/ops/infllm.rs has the layout and the CPU reference): the
// ring of each (layer, owner), written by a step's runs; the window masses; block
// finalization into the representative keys; block scores; the attended pages.
// A run is (owner, start, n, row) in a [R, 4] u32 table; n = 0 is padding. Kernels skip
// what is out of range (the CPU reference reports it).
#include "common.cuh"

// Ring keys: grid (R, Hkv), one block copies a run's rows of one KV head. Only the last
// W rows of a run are kept (as writing them in order would leave).
template <typename T>
__device__ void ring_keys(T* ring, const T* k, const u32* runs, int S, int W, int H, int D, int T_rows) {
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows) return;
  const int h = blockIdx.y;
  const u32 j0 = n > (u32)W ? n - W : 0;
  for (u32 j = j0; j < n; ++j) {
    const u32 e = (start + j) % W;
    T* dst = ring + (((size_t)o * W + e) * H + h) * D;
    const T* src = k + ((size_t)(row + j) * H + h) * D;
    for (int x = threadIdx.x; x < D; x += blockDim.x) dst[x] = src[x];
  }
}

#define RING_KEYS(NAME, T)                                                                     \
  extern "C" __global__ void NAME(T* ring, const T* k, const u32* runs, int S, int W, int H, \
                                  int D, int T_rows) {                                         \
    ring_keys<T>(ring, k, runs, S, W, H, D, T_rows);                                           \
  }
RING_KEYS(infllm_ring_keys_f32, float)
RING_KEYS(infllm_ring_keys_f16, __half)
RING_KEYS(infllm_ring_keys_bf16, __nv_bfloat16)

// Ring metadata: one block per run copies the mass plane to the undo plane and its start
// to the flag word, then writes each new token's page slot and a zero mass.
extern "C" __global__ void infllm_ring_meta(u32* m, const u32* dst, const u32* runs, int S, int W,
                                            int H, int T_rows, u32 P) {
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows) return;
  const size_t plane = (size_t)W * H;
  u32* base = m + (size_t)o * 4 * plane;
#pragma unroll 4
  for (size_t i = threadIdx.x; i < plane; i += blockDim.x) base[2 * plane + i] = base[plane + i];
  if (threadIdx.x == 0) base[3 * plane] = start;
  __syncthreads();
  const u32 j0 = n > (u32)W ? n - W : 0;
  for (size_t i = threadIdx.x; i < (size_t)(n - j0) * H; i += blockDim.x) {
    const u32 j = j0 + (u32)(i / H), hh = (u32)(i % H);
    const u32 e = (start + j) % W;
    const u32 code = dst[(size_t)(row + j) * H + hh];
    base[(size_t)e * H + hh] = code == SPIN_NONE ? SPIN_NONE : code / P;
    base[plane + (size_t)e * H + hh] = 0u;  // 0.0f
  }
}

// Window mass: grid (R, Hkv), G·tph threads (tph, the threads per query head, a multiple
// of 32 set by the host), G <= INFLLM_MAX_GROUP query heads per KV head. Thread (gi, i)
// scores head gi against keys i, i + tph, ... of each query's window, a whole key row per
// thread (16-byte loads where the rows allow them). For each query of the run in turn:
// pass 1 takes each head's log-sum-exp over its window (a thread's online max and sum,
// then the head's warps combined through shared memory); pass 2 puts exp(s - lse) of
// every (head, key) in shared memory, and head 0's threads add the G of each key to its
// mass. Scores persist from pass 1 to pass 2: a thread's first key in a register, the
// others in shared memory where `cached` (G·window floats fit), else scored again.
#define INFLLM_MAX_GROUP SPIN_INFLLM_MAX_GROUP
template <typename T>
__device__ __forceinline__ float row_dot(const float* qv, const T* kv, int D, bool vec) {
  float acc = 0.f;
  if (vec) {
    constexpr int E = 16 / sizeof(T);
#pragma unroll 4
    for (int x = 0; x < D; x += E) {
      float k[E];
      unpack16<T>(ld_stream16(kv + x), k);
#pragma unroll
      for (int e = 0; e < E; e += 4) {
        const float4 a = *reinterpret_cast<const float4*>(qv + x + e);
        acc += a.x * k[e] + a.y * k[e + 1] + a.z * k[e + 2] + a.w * k[e + 3];
      }
    }
  } else {
    for (int x = 0; x < D; ++x) acc += qv[x] * to_f32(kv[x]);
  }
  return acc;
}

// A thread's online log-sum-exp: adds score s to its running max and sum of exp(· − max).
__device__ __forceinline__ void online_add(float& mx, float& sum, float s) {
  if (s > mx) {
    sum = sum * __expf(mx - s) + 1.f;
    mx = s;
  } else {
    sum += __expf(s - mx);
  }
}

// The warp's max of the lanes' mx and its sum of exp(· − that max), to every lane.
__device__ __forceinline__ void warp_max_sum(float mx, float sum, float& gmx, float& part) {
  gmx = mx;
  for (int off = 16; off > 0; off >>= 1) gmx = fmaxf(gmx, __shfl_xor_sync(FULL_MASK, gmx, off));
  part = mx == -INFINITY ? 0.f : sum * __expf(mx - gmx);
  for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(FULL_MASK, part, off);
}

template <typename T>
__device__ void window_mass(u32* m, const T* ring, const T* q, const u32* runs, int S, int W, int H, int D,
                            int Hq, int window, float scale, int T_rows, int cached) {
  extern __shared__ float sm[];  // G·D query floats, 2·32 warp partials, G lse, G·tph terms, cached G·window scores
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows) return;
  const int h = blockIdx.y, G = Hq / H, tph = blockDim.x / G, wph = tph >> 5;
  const int gi = threadIdx.x / tph, i = threadIdx.x - gi * tph, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float *sq = sm, *pmx = sq + G * D, *psum = pmx + 32, *lse = psum + 32, *terms = lse + G;
  float* sc = terms + G * tph + (size_t)gi * window;  // this head's cached scores
  u32* mass = m + (size_t)o * 4 * W * H + (size_t)W * H;
  const T* keys = ring + (size_t)o * W * H * D;
  const bool vec = (D * sizeof(T)) % 16 == 0 && (reinterpret_cast<uintptr_t>(ring) & 15) == 0;
  const float* qv = sq + gi * D;
  for (u32 j = 0; j < n; ++j) {
    const u32 a = start + j, lo = a + 1 > (u32)window ? a + 1 - window : 0, cnt = a + 1 - lo;
    __syncthreads();  // the previous query's readers of sq, lse and terms are done
    const T* qrow = q + ((size_t)(row + j) * Hq + (size_t)h * G) * D;
    for (int x = threadIdx.x; x < G * D; x += blockDim.x) sq[x] = to_f32(qrow[x]);
    __syncthreads();
    float mx = -INFINITY, sum = 0.f, s0 = -INFINITY;
    for (u32 t = i; t < cnt; t += tph) {
      const float s = row_dot(qv, keys + ((size_t)((lo + t) % W) * H + h) * D, D, vec) * scale;
      if (t == (u32)i) s0 = s;
      else if (cached) sc[t] = s;
      online_add(mx, sum, s);
    }
    float gmx, part;
    warp_max_sum(mx, sum, gmx, part);
    if (lane == 0) pmx[warp] = gmx, psum[warp] = part;
    __syncthreads();
    if (threadIdx.x < G) {
      const int w0 = threadIdx.x * wph;
      float bm = -INFINITY, bs = 0.f;
      for (int w = w0; w < w0 + wph; ++w) bm = fmaxf(bm, pmx[w]);
      for (int w = w0; w < w0 + wph; ++w) bs += pmx[w] == -INFINITY ? 0.f : psum[w] * __expf(pmx[w] - bm);
      lse[threadIdx.x] = bm + logf(bs);
    }
    __syncthreads();
    const float l = lse[gi];
    for (u32 base = 0; base < cnt; base += tph) {  // the same trip count in every thread
      const u32 t = base + i;
      float p = 0.f;
      if (t < cnt) {
        const float s = t == (u32)i ? s0
                        : cached  ? sc[t]
                                  : row_dot(qv, keys + ((size_t)((lo + t) % W) * H + h) * D, D, vec) * scale;
        p = __expf(s - l);
      }
      terms[threadIdx.x] = p;
      __syncthreads();
      if (gi == 0 && t < cnt) {
        float total = 0.f;
        for (int g = 0; g < G; ++g) total += terms[g * tph + i];
        u32* mp = mass + (size_t)((lo + t) % W) * H + h;
        *mp = __float_as_uint(__uint_as_float(*mp) + total);
      }
      __syncthreads();
    }
  }
}

#define WINDOW(NAME, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024) NAME(u32* m, const T* ring, const T* q, const u32* runs, \
                                  int S, int W, int H, int D, int Hq, int window, float scale, int T_rows, \
                                  int cached) {                                                          \
    window_mass<T>(m, ring, q, runs, S, W, H, D, Hq, window, scale, T_rows, cached);                     \
  }
WINDOW(infllm_window_mass_f32, float)
WINDOW(infllm_window_mass_f16, __half)
WINDOW(infllm_window_mass_bf16, __nv_bfloat16)

// Run masses (prefill rounds: runs of several tokens), two kernels, no atomics. Both
// score with `row_dot_tt` (two rows of T, 16-byte loads where the rows allow them); the
// rows a warp re-reads stay in L1.
template <typename T>
__device__ __forceinline__ float row_dot_tt(const T* a, const T* b, int D, bool vec) {
  float acc = 0.f;
  if (vec) {
    constexpr int E = 16 / sizeof(T);
#pragma unroll 4
    for (int x = 0; x < D; x += E) {
      float u[E], v[E];
      unpack16<T>(*reinterpret_cast<const uint4*>(a + x), u);
      unpack16<T>(*reinterpret_cast<const uint4*>(b + x), v);
#pragma unroll
      for (int e = 0; e < E; ++e) acc += u[e] * v[e];
    }
  } else {
    for (int x = 0; x < D; ++x) acc += to_f32(a[x]) * to_f32(b[x]);
  }
  return acc;
}

// run_lse: grid (R, Hkv, ⌈max_n / 8⌉), a warp per query of the run: for each of its G
// heads the lanes stride over the query's window (online max and sum), and lane 0 writes
// the head's log-sum-exp to lse [R, Hkv, max_n, G].
template <typename T>
__device__ void run_lse(float* lse, const T* ring, const T* q, const u32* runs, int S, int W, int H, int D,
                        int Hq, int window, float scale, int T_rows, int max_n) {
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows || n > (u32)max_n) return;
  const int h = blockIdx.y, G = Hq / H, lane = threadIdx.x & 31;
  const u32 j = blockIdx.z * 8 + (threadIdx.x >> 5);
  if (j >= n) return;
  const u32 a = start + j, lo = a + 1 > (u32)window ? a + 1 - window : 0;
  const T* keys = ring + (size_t)o * W * H * D;
  const bool vec = (D * sizeof(T)) % 16 == 0 && ((reinterpret_cast<uintptr_t>(ring) | reinterpret_cast<uintptr_t>(q)) & 15) == 0;
  for (int g = 0; g < G; ++g) {
    const T* qv = q + ((size_t)(row + j) * Hq + (size_t)h * G + g) * D;
    float mx = -INFINITY, sum = 0.f;
    for (u32 t = lo + lane; t <= a; t += 32) {
      const float s = row_dot_tt(qv, keys + ((size_t)(t % W) * H + h) * D, D, vec) * scale;
      online_add(mx, sum, s);
    }
    float gmx, part;
    warp_max_sum(mx, sum, gmx, part);
    if (lane == 0) lse[(((size_t)blockIdx.x * H + h) * max_n + j) * G + g] = gmx + logf(part);
  }
}

// run_mass: grid (R, Hkv, ⌈(max_n + window - 1) / 8⌉), a warp per key t of the keys the
// run's queries see, [start + 1 - window, start + n): the lanes stride over the queries
// that see it, [max(t, start), min(t + window, start + n)), summing exp(s - lse) over
// their G heads; lane 0 adds the warp's sum to the key's mass (one writer per key).
template <typename T>
__device__ void run_mass(u32* m, const float* lse, const T* ring, const T* q, const u32* runs, int S, int W, int H,
                         int D, int Hq, int window, float scale, int T_rows, int max_n) {
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows || n > (u32)max_n) return;
  const int h = blockIdx.y, G = Hq / H, lane = threadIdx.x & 31;
  const u32 t0 = start + 1 > (u32)window ? start + 1 - window : 0;
  const u32 t = t0 + blockIdx.z * 8 + (threadIdx.x >> 5);
  if (t >= start + n) return;
  const T* kv = ring + (((size_t)o * W + t % W) * H + h) * D;
  const float* ls = lse + ((size_t)blockIdx.x * H + h) * max_n * G;
  const bool vec = (D * sizeof(T)) % 16 == 0 && ((reinterpret_cast<uintptr_t>(ring) | reinterpret_cast<uintptr_t>(q)) & 15) == 0;
  const u32 a0 = max(t, start), a1 = min(t + (u32)window, start + n);
  float total = 0.f;
  for (u32 a = a0 + lane; a < a1; a += 32) {
    const u32 j = a - start;
    for (int g = 0; g < G; ++g) {
      const T* qv = q + ((size_t)(row + j) * Hq + (size_t)h * G + g) * D;
      total += __expf(row_dot_tt(qv, kv, D, vec) * scale - ls[(size_t)j * G + g]);
    }
  }
  for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(FULL_MASK, total, off);
  if (lane == 0) {
    u32* mp = m + (size_t)o * 4 * W * H + (size_t)W * H + (size_t)(t % W) * H + h;
    *mp = __float_as_uint(__uint_as_float(*mp) + total);
  }
}

#define RUN_MASS(LSE, MASS, T)                                                                                  \
  extern "C" __global__ void LSE(float* lse, const T* ring, const T* q, const u32* runs, int S, int W, int H,    \
                                 int D, int Hq, int window, float scale, int T_rows, int max_n) {               \
    run_lse<T>(lse, ring, q, runs, S, W, H, D, Hq, window, scale, T_rows, max_n);                               \
  }                                                                                                             \
  extern "C" __global__ void MASS(u32* m, const float* lse, const T* ring, const T* q, const u32* runs, int S,   \
                                  int W, int H, int D, int Hq, int window, float scale, int T_rows, int max_n) { \
    run_mass<T>(m, lse, ring, q, runs, S, W, H, D, Hq, window, scale, T_rows, max_n);                           \
  }
RUN_MASS(infllm_run_lse_f32, infllm_run_mass_f32, float)
RUN_MASS(infllm_run_lse_f16, infllm_run_mass_f16, __half)
RUN_MASS(infllm_run_lse_bf16, infllm_run_mass_bf16, __nv_bfloat16)

// Finalize: grid (R, Hkv, most blocks a run ends), one warp. Block i of the run ends at
// e = first + i·block; its `repr` keys of most mass (ties: the earlier token) are copied
// to the page slots of the block. `chosen` marks picked tokens (block <= 1024).
template <typename T>
__device__ void finalize(T* rep, const T* ring, const u32* m, const u32* runs, int S, int W, int H, int D,
                         u32 slots, int kpp, int window, int block, int repr, int P) {
  __shared__ unsigned char chosen[1024];
  __shared__ u32 picks[1024];
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2];
  if (n == 0 || o >= (u32)S) return;
  const u32 lo = start + 1 > (u32)window ? start + 1 - window : 0;  // ends <= lo are done
  const u32 hi = start + n + 1 > (u32)window ? start + n + 1 - window : 0;
  const u32 e = (lo / block + 1) * block + blockIdx.z * block;
  if (e > hi || e < (u32)block) return;
  const u32 b0 = e - block;
  const int h = blockIdx.y, lane = threadIdx.x;
  const size_t plane = (size_t)W * H;
  const u32* base = m + (size_t)o * 4 * plane;
  for (int x = lane; x < block; x += 32) chosen[x] = 0;
  __syncwarp();
  for (int k = 0; k < repr; ++k) {
    float best = -INFINITY;
    int bt = -1;
    for (int x = lane; x < block; x += 32) {
      if (chosen[x]) continue;
      const float v = __uint_as_float(base[plane + (size_t)((b0 + x) % W) * H + h]);
      if (bt < 0 || v > best) {
        best = v;
        bt = x;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, best, off);
      const int ot = __shfl_xor_sync(FULL_MASK, bt, off);
      if (ot >= 0 && (bt < 0 || ov > best || (ov == best && ot < bt))) {
        best = ov;
        bt = ot;
      }
    }
    if (lane == 0) {
      chosen[bt] = 1;
      picks[k] = (u32)bt;
    }
    __syncwarp();
  }
  for (int k = 0; k < repr; ++k) {
    const u32 page_tok = b0 + (u32)((k / kpp) * P);
    const u32 slot = base[(size_t)(page_tok % W) * H + h];
    if (slot == SPIN_NONE || slot >= slots) continue;
    const u32 tok = b0 + picks[k];
    const T* src = ring + (((size_t)o * W + tok % W) * H + h) * D;
    T* dst = rep + ((size_t)slot * kpp + k % kpp) * D;
    for (int x = lane; x < D; x += 32) dst[x] = src[x];
  }
}

#define FINALIZE(NAME, T)                                                                           \
  extern "C" __global__ void NAME(T* rep, const T* ring, const u32* m, const u32* runs, int S, int W, \
                                  int H, int D, u32 slots, int kpp, int window, int block, int repr,  \
                                  int P) {                                                            \
    finalize<T>(rep, ring, m, runs, S, W, H, D, slots, kpp, window, block, repr, P);                  \
  }
FINALIZE(infllm_finalize_f32, float)
FINALIZE(infllm_finalize_f16, __half)
FINALIZE(infllm_finalize_bf16, __nv_bfloat16)

// Block scores: grid (B, ⌈NB / 8⌉), 8 warps, one block j per warp. The group-summed
// query [Hkv, D] is staged in shared memory, then each warp's Hkv·repr page slots; the
// lanes then stride over the 16-byte chunks of the Hkv·repr representative rows (single
// elements where a row is not a whole number of 16-byte chunks), independent loads.
template <typename T>
__device__ void block_scores(float* out, const T* q, const T* rep, const u32* cand, const u32* rows,
                             int Hq, int H, int D, int N, int NB, u32 slots, int kpp, int window,
                             int block, int repr, int bp, int sink_pages) {
  extern __shared__ float qs[];  // H·D floats, then 8 warps × H·repr slots
  const int b = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int pairs = H * repr;
  u32* sl = reinterpret_cast<u32*>(qs + H * D) + warp * pairs;
  const u32 pos = rows[4 * b + 1], live = rows[4 * b + 2];
  const int g = Hq / H;
  for (int i = threadIdx.x; i < H * D; i += blockDim.x) {
    float s = 0.f;
    for (int gi = 0; gi < g; ++gi) s += to_f32(q[((size_t)b * Hq + (i / D) * g + gi) * D + i % D]);
    qs[i] = s;
  }
  __syncthreads();
  const int j = blockIdx.y * 8 + warp;
  if (j >= NB) return;
  const u32 blocks = pos + 1 > (u32)window ? (pos + 1 - window) / block : 0;
  bool ok = live != 0 && (u32)j < blocks && (j + 1) * bp > sink_pages;
  if (ok) {
    bool bad = false;
    for (int p = lane; p < pairs; p += 32) {
      const int h = p / repr, k = p % repr, page = j * bp + k / kpp;
      const u32 slot = page < N ? cand[((size_t)b * H + h) * N + page] : SPIN_NONE;
      bad |= slot == SPIN_NONE || slot >= slots;
      sl[p] = slot;
    }
    ok = !__any_sync(FULL_MASK, bad);
  }
  float total = 0.f;
  if (ok) {
    __syncwarp();
    const bool vec = (D * sizeof(T)) % 16 == 0 && (reinterpret_cast<uintptr_t>(rep) & 15) == 0;
    if (vec) {
      // 16-byte chunks of the pairs' rows, independent loads.
      constexpr int E = 16 / sizeof(T);
      const int C = D / E;
#pragma unroll 4
      for (int e = lane; e < pairs * C; e += 32) {
        const int p = e / C, x = (e - p * C) * E;
        const int hh = p / repr, k = p - hh * repr;
        float kv[E];
        unpack16<T>(ld_stream16(rep + ((size_t)sl[p] * kpp + k % kpp) * D + x), kv);
        const float* qv = qs + hh * D + x;
#pragma unroll
        for (int y = 0; y < E; y += 4) {
          const float4 a = *reinterpret_cast<const float4*>(qv + y);
          total += a.x * kv[y] + a.y * kv[y + 1] + a.z * kv[y + 2] + a.w * kv[y + 3];
        }
      }
    } else {
#pragma unroll 4
      for (int e = lane; e < pairs * D; e += 32) {
        const int p = e / D, x = e - p * D;
        const int hh = p / repr, k = p - hh * repr;
        total += qs[hh * D + x] * to_f32(rep[((size_t)sl[p] * kpp + k % kpp) * D + x]);
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(FULL_MASK, total, off);
  if (lane == 0) out[(size_t)b * NB + j] = ok ? total / repr : -INFINITY;
}

#define SCORES(NAME, T)                                                                              \
  extern "C" __global__ void NAME(float* out, const T* q, const T* rep, const u32* cand, const u32* rows, \
                                  int Hq, int H, int D, int N, int NB, u32 slots, int kpp, int window, \
                                  int block, int repr, int bp, int sink_pages) {                       \
    block_scores<T>(out, q, rep, cand, rows, Hq, H, D, N, NB, slots, kpp, window, block, repr, bp,     \
                    sink_pages);                                                                       \
  }
SCORES(infllm_block_scores_f32, float)
SCORES(infllm_block_scores_f16, __half)
SCORES(infllm_block_scores_bf16, __nv_bfloat16)

// Pages: one block per row builds the row's list (the same for every head) in shared
// memory: the sink, the chosen blocks in ascending order (thread i places top i after
// the pages of the smaller chosen blocks; repeats and blocks out of range count for
// nothing), the pending pages, NONE after them; then the block writes it for each head.
extern "C" __global__ void infllm_pages(u32* out, const u32* top, const u32* rows, int B, int k, int H,
                                        int width, int P, int window, int block, int bp, int sink_pages) {
  extern __shared__ u32 sh[];  // width list entries, k top entries, k counts, k firsts, 1 total
  u32 *list = sh, *tops = sh + width, *counts = tops + k, *los = counts + k, *total = los + k;
  const int b = blockIdx.x;
  const u32 pos = rows[4 * b + 1], live = rows[4 * b + 2];
  const u32 np = live != 0 ? (pos + P) / P : 0;  // ⌈(pos + 1) / P⌉
  const u32 blocks = live != 0 && pos + 1 > (u32)window ? (pos + 1 - window) / block : 0;
  const u32 forced = blocks * bp, sink = (u32)sink_pages, sink_n = min(sink, np);
  for (int i = threadIdx.x; i < width; i += blockDim.x) list[i] = SPIN_NONE;
  for (int i = threadIdx.x; i < k; i += blockDim.x) tops[i] = top[(size_t)b * k + i];
  if (threadIdx.x == 0) *total = 0;
  __syncthreads();
  for (u32 x = threadIdx.x; x < sink_n && x < (u32)width; x += blockDim.x) list[x] = x;
  // Pages of chosen block jb: [max(jb·bp, sink), min((jb + 1)·bp, forced, np)); a repeat
  // of an earlier entry or a block out of range spans none.
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const u32 jb = tops[i];
    u32 c = 0, a = 0;
    if (jb != SPIN_NONE && jb < blocks) {
      bool first = true;
      for (int x = 0; x < i && first; ++x) first = tops[x] != jb;
      a = max(jb * bp, sink);
      const u32 e = min(min((jb + 1) * bp, forced), np);
      c = first && e > a ? e - a : 0;
    }
    counts[i] = c;
    los[i] = a;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const u32 c = counts[i];
    if (c == 0) continue;
    u32 off = sink_n;
    for (int x = 0; x < k; ++x) off += tops[x] < tops[i] ? counts[x] : 0;
    for (u32 y = 0; y < c && off + y < (u32)width; ++y) list[off + y] = los[i] + y;
    atomicAdd(total, c);
  }
  __syncthreads();
  const u32 p0 = sink_n + *total, first = max(forced, sink);
  for (u32 x = first + threadIdx.x; x < np; x += blockDim.x)
    if (p0 + (x - first) < (u32)width) list[p0 + (x - first)] = x;
  __syncthreads();
  for (int i = threadIdx.x; i < H * width; i += blockDim.x) out[((size_t)b * H) * width + i] = list[i % width];
}

// Mass add: adds add[i, h] (f32, [L, H]) to the mass of key first + i of owner `o`.
extern "C" __global__ void infllm_mass_add(u32* m, const float* add, int W, int H, int L, u32 o, u32 first) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= L * H) return;
  const size_t plane = (size_t)W * H;
  u32* mp = m + (size_t)o * 4 * plane + plane + (size_t)((first + i / H) % W) * H + i % H;
  *mp = __float_as_uint(__uint_as_float(*mp) + add[i]);
}

// Restore: one block; when the flag word says the undo plane was written by the call
// that started at `start`, copies it over the masses and clears the flag.
extern "C" __global__ void infllm_restore(u32* m, int W, int H, u32 o, u32 start) {
  const size_t plane = (size_t)W * H;
  u32* base = m + (size_t)o * 4 * plane;
  const bool hit = base[3 * plane] == start;
  __syncthreads();
  if (!hit) return;
  for (size_t i = threadIdx.x; i < plane; i += blockDim.x) base[plane + i] = base[2 * plane + i];
  if (threadIdx.x == 0) base[3 * plane] = SPIN_NONE;
}
