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

// Window log-sum-exp: grid (R, nmax, Hq), one block per (run, query, query head); each
// thread scores keys of the window, then the block reduces. lse [R, nmax, Hq].
template <typename T>
__device__ void window_lse(float* lse, const T* ring, const T* q, const u32* runs, int S, int W, int H,
                           int D, int Hq, int nmax, int window, float scale, int T_rows) {
  extern __shared__ float sq[];  // D floats, then 32 for the reduction
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  const u32 j = blockIdx.y;
  const int qh = blockIdx.z;
  if (n == 0 || j >= n || o >= (u32)S || row + n > (u32)T_rows) return;
  const int g = Hq / H, h = qh / g;
  const T* qv = q + ((size_t)(row + j) * Hq + qh) * D;
  for (int x = threadIdx.x; x < D; x += blockDim.x) sq[x] = to_f32(qv[x]);
  __syncthreads();
  const u32 a = start + j;
  const u32 lo = a + 1 > (u32)window ? a + 1 - window : 0;
  float mx = -INFINITY, sum = 0.f;
  for (u32 t = lo + threadIdx.x; t <= a; t += blockDim.x) {
    const T* kv = ring + (((size_t)o * W + t % W) * H + h) * D;
    float s = 0.f;
    for (int x = 0; x < D; ++x) s += sq[x] * to_f32(kv[x]);
    s *= scale;
    if (s > mx) {
      sum = sum * __expf(mx - s) + 1.f;
      mx = s;
    } else {
      sum += __expf(s - mx);
    }
  }
  float* sh = sq + D;
  const float gmx = block_reduce(mx, true, sh);
  const float part = mx == -INFINITY ? 0.f : sum * __expf(mx - gmx);
  const float tot = block_reduce(part, false, sh);
  if (threadIdx.x == 0) lse[((size_t)blockIdx.x * nmax + j) * Hq + qh] = gmx + logf(tot);
}

// Window mass: grid (R, tiles); thread i of the run's keys×heads range sums, for key t and
// KV head h, exp(q·k·scale - lse) over the run's queries whose window holds t and the
// query heads of h, and adds it to the mass plane (one writer per entry).
template <typename T>
__device__ void window_mass(u32* m, const T* ring, const T* q, const float* lse, const u32* runs, int S,
                            int W, int H, int D, int Hq, int nmax, int window, float scale, int T_rows) {
  const u32* r = runs + 4 * blockIdx.x;
  const u32 o = r[0], start = r[1], n = r[2], row = r[3];
  if (n == 0 || o >= (u32)S || row + n > (u32)T_rows) return;
  const u32 lo = start + 1 > (u32)window ? start + 1 - window : 0;
  const size_t count = (size_t)(start + n - lo) * H;
  const size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const u32 t = lo + (u32)(i / H);
  const int h = (int)(i % H), g = Hq / H;
  const T* kv = ring + (((size_t)o * W + t % W) * H + h) * D;
  const u32 a0 = t > start ? t : start;
  const u32 a1 = min(t + (u32)window, start + n);  // exclusive
  float total = 0.f;
  for (u32 a = a0; a < a1; ++a) {
    const u32 j = a - start;
    for (int qh = h * g; qh < (h + 1) * g; ++qh) {
      const T* qv = q + ((size_t)(row + j) * Hq + qh) * D;
      float s = 0.f;
      for (int x = 0; x < D; ++x) s += to_f32(qv[x]) * to_f32(kv[x]);
      total += __expf(s * scale - lse[((size_t)blockIdx.x * nmax + j) * Hq + qh]);
    }
  }
  const size_t plane = (size_t)W * H;
  u32* mp = m + (size_t)o * 4 * plane + plane + (size_t)(t % W) * H + h;
  *mp = __float_as_uint(__uint_as_float(*mp) + total);
}

#define WINDOW(NAME_LSE, NAME_MASS, T)                                                                \
  extern "C" __global__ void NAME_LSE(float* lse, const T* ring, const T* q, const u32* runs, int S,  \
                                      int W, int H, int D, int Hq, int nmax, int window, float scale, \
                                      int T_rows) {                                                   \
    window_lse<T>(lse, ring, q, runs, S, W, H, D, Hq, nmax, window, scale, T_rows);                  \
  }                                                                                                   \
  extern "C" __global__ void NAME_MASS(u32* m, const T* ring, const T* q, const float* lse,           \
                                       const u32* runs, int S, int W, int H, int D, int Hq, int nmax, \
                                       int window, float scale, int T_rows) {                         \
    window_mass<T>(m, ring, q, lse, runs, S, W, H, D, Hq, nmax, window, scale, T_rows);              \
  }
WINDOW(infllm_window_lse_f32, infllm_window_mass_f32, float)
WINDOW(infllm_window_lse_f16, infllm_window_mass_f16, __half)
WINDOW(infllm_window_lse_bf16, infllm_window_mass_bf16, __nv_bfloat16)

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
// query [Hkv, D] is staged in shared memory.
template <typename T>
__device__ void block_scores(float* out, const T* q, const T* rep, const u32* cand, const u32* rows,
                             int Hq, int H, int D, int N, int NB, u32 slots, int kpp, int window,
                             int block, int repr, int bp, int sink_pages) {
  extern __shared__ float qs[];  // H * D
  const int b = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
  float total = 0.f;
  for (int h = 0; ok && h < H; ++h) {
    for (int k = 0; k < repr; ++k) {
      const int page = j * bp + k / kpp;
      const u32 slot = page < N ? cand[((size_t)b * H + h) * N + page] : SPIN_NONE;
      if (slot == SPIN_NONE || slot >= slots) {
        ok = false;
        break;
      }
      const T* key = rep + ((size_t)slot * kpp + k % kpp) * D;
      for (int x = lane; x < D; x += 32) total += qs[h * D + x] * to_f32(key[x]);
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

// Pages: one thread per (row, KV head) writes the row's list (the same for every head):
// the sink, the chosen blocks in ascending order and the pending pages, NONE after them.
extern "C" __global__ void infllm_pages(u32* out, const u32* top, const u32* rows, int B, int k, int H,
                                        int width, int P, int window, int block, int bp, int sink_pages) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * H) return;
  const int b = i / H;
  u32* o = out + (size_t)i * width;
  const u32 pos = rows[4 * b + 1], live = rows[4 * b + 2];
  int w = 0;
  if (live != 0) {
    const u32 np = (pos + P) / P;  // ⌈(pos + 1) / P⌉
    const u32 blocks = pos + 1 > (u32)window ? (pos + 1 - window) / block : 0;
    const u32 forced = blocks * bp, sink = (u32)sink_pages;
    for (u32 x = 0; x < min(sink, np) && w < width; ++x) o[w++] = x;
    long long prev = -1;
    for (;;) {
      u32 next = SPIN_NONE;
      for (int j = 0; j < k; ++j) {
        const u32 jb = top[(size_t)b * k + j];
        if (jb != SPIN_NONE && jb < blocks && (long long)jb > prev && jb < next) next = jb;
      }
      if (next == SPIN_NONE) break;
      prev = next;
      const u32 end = min(min((next + 1) * bp, forced), np);
      for (u32 x = max(next * bp, sink); x < end && w < width; ++x) o[w++] = x;
    }
    for (u32 x = max(forced, sink); x < np && w < width; ++x) o[w++] = x;
  }
  for (int x = w; x < width; ++x) o[x] = SPIN_NONE;
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
