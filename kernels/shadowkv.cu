// spinkv CUDA kernels: ShadowKV's decode-time ops (its device mode). shadowkv_scores (the
// landmark scores of the compressed chunks), shadowkv_lists (the always-attended pages and
// the rebuilt chunks' pairs) and shadowkv_rebuild (keys rebuilt from the low-rank factor
// with RoPE, beside their values). Launch glue: src/ops/cuda/shadowkv.rs. CPU references
// and semantics: src/ops/shadowkv/. Out-of-range slots, owners and pages read as zero rows.
#include "common.cuh"

#define SKV_MAXG SPIN_SHADOWKV_MAX_GROUP
// The widest logits kernel below is instantiated for 16 heads.
static_assert(SKV_MAXG == 16, "shadowkv_logits_*_g16 must cover SPIN_SHADOWKV_MAX_GROUP");

// A decode row's owner and exact region (see src/ops/shadowkv/mod.rs): ef = np = 0 for
// padding rows and out-of-range owners.
struct SkvRow {
  u32 owner;
  long ef, np;
  int chunk;
};

__device__ __forceinline__ SkvRow skv_row(const u32* rows, const u32* chunks, int b, u32 owners, int p, int window) {
  SkvRow r;
  r.owner = rows[4 * b];
  r.ef = 0;
  r.np = 0;
  r.chunk = 0;
  const u32 pos = rows[4 * b + 1], live = rows[4 * b + 2];
  if (live == 0 || r.owner >= owners) return r;
  r.chunk = (int)chunks[r.owner];
  const long nt = (long)pos + 1;
  r.ef = min((long)r.chunk, max(nt - window, 0L) / p);
  r.np = (nt + p - 1) / p;
  return r;
}

// The g logits of one candidate against the scaled queries qs [g, d] (shared memory);
// a slot out of range (NONE included) reads as a zero landmark. MG >= g bounds the
// per-head registers.
template <int MG>
__device__ __forceinline__ void skv_logits(const float* __restrict__ lm, u32 slot, u32 slots, const float* qs, int g,
                                           int d, float* l) {
#pragma unroll
  for (int gi = 0; gi < MG; ++gi) l[gi] = 0.f;
  if (slot >= slots) return;
  const float* row = lm + (size_t)slot * d;
  if ((d & 3) == 0) {
#pragma unroll 4
    for (int i = 0; i < d; i += 4) {
      const float4 x = *reinterpret_cast<const float4*>(row + i);
#pragma unroll
      for (int gi = 0; gi < MG; ++gi) {
        if (gi < g) {
          const float4 y = *reinterpret_cast<const float4*>(qs + gi * d + i);
          l[gi] += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
        }
      }
    }
  } else {
    for (int i = 0; i < d; ++i) {
      const float x = row[i];
#pragma unroll
      for (int gi = 0; gi < MG; ++gi)
        if (gi < g) l[gi] += x * qs[gi * d + i];
    }
  }
}

// Scores in two kernels over a grid of (row·KV head, split), each split a run of `cps`
// chunks. shadowkv_logits: a thread per chunk computes the g scaled logits (kept in
// `logits` [B·Hkv, g, N] for the chunks before nc) and the block's online max and sum per
// query head (written to `part` [B·Hkv, splits, 2, g]). shadowkv_scores: the splits'
// partials combined per head, then per chunk the max over the group of the
// probabilities plus the outlier flag, or -inf at and past ef. Dynamic shared memory of
// the first: (g * d + 32) floats.
template <typename T, int MG>
__device__ void skv_logits_k(const T* __restrict__ q, const float* __restrict__ lm, const u32* __restrict__ cand,
                             const u32* __restrict__ rows, const u32* __restrict__ chunks, float* __restrict__ logits,
                             float* __restrict__ part, int hq, int hkv, int n, int d, int p, int window, u32 slots,
                             u32 owners, float scale, int cps) {
  extern __shared__ __align__(16) float skv_sm[];
  const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y, b = bh / hkv, h = bh % hkv;
  const int g = hq / hkv, tid = threadIdx.x;
  const SkvRow row = skv_row(rows, chunks, b, owners, p, window);
  const int nc = min(row.chunk, n);
  float* pt = part + ((size_t)bh * splits + split) * 2 * g;
  if (min(row.ef, (long)nc) <= 0) {
    if (tid < g) {
      pt[tid] = -INFINITY;
      pt[g + tid] = 0.f;
    }
    return;
  }
  float* qs = skv_sm;
  float* red = qs + g * d;
  for (int i = tid; i < g * d; i += blockDim.x) qs[i] = to_f32(q[((size_t)b * hq + (size_t)h * g) * d + i]) * scale;
  __syncthreads();
  const u32* c = cand + (size_t)bh * n;
  float* lg = logits + (size_t)bh * g * n;
  float m[MG], s[MG], l[MG];
#pragma unroll
  for (int gi = 0; gi < MG; ++gi) {
    m[gi] = -INFINITY;
    s[gi] = 0.f;
  }
  const int j1 = min(nc, (split + 1) * cps);
  for (int j = split * cps + tid; j < j1; j += blockDim.x) {
    skv_logits<MG>(lm, c[j], slots, qs, g, d, l);
#pragma unroll
    for (int gi = 0; gi < MG; ++gi) {
      if (gi < g) {
        lg[(size_t)gi * n + j] = l[gi];
        if (l[gi] > m[gi]) {
          s[gi] = s[gi] * expf(m[gi] - l[gi]) + 1.f;
          m[gi] = l[gi];
        } else {
          s[gi] += expf(l[gi] - m[gi]);
        }
      }
    }
  }
#pragma unroll
  for (int gi = 0; gi < MG; ++gi) {
    if (gi < g) {
      const float mx = block_reduce(m[gi], true, red);
      const float sum = block_reduce(m[gi] == -INFINITY ? 0.f : s[gi] * expf(m[gi] - mx), false, red);
      if (tid == 0) {
        pt[gi] = mx;
        pt[g + gi] = sum;
      }
    }
  }
}

#define SKV_LOGITS(T, SFX, MG)                                                                                        \
  extern "C" __global__ void shadowkv_logits_##SFX##_g##MG(const T* q, const float* lm, const u32* cand,               \
                                                           const u32* rows, const u32* chunks, float* logits,          \
                                                           float* part, int hq, int hkv, int n, int d, int p,          \
                                                           int window, u32 slots, u32 owners, float scale, int cps) {  \
    skv_logits_k<T, MG>(q, lm, cand, rows, chunks, logits, part, hq, hkv, n, d, p, window, slots, owners, scale, cps); \
  }
SKV_LOGITS(float, f32, 4)
SKV_LOGITS(float, f32, 8)
SKV_LOGITS(float, f32, 16)
SKV_LOGITS(__half, f16, 4)
SKV_LOGITS(__half, f16, 8)
SKV_LOGITS(__half, f16, 16)
SKV_LOGITS(__nv_bfloat16, bf16, 4)
SKV_LOGITS(__nv_bfloat16, bf16, 8)
SKV_LOGITS(__nv_bfloat16, bf16, 16)

extern "C" __global__ void shadowkv_scores(const float* __restrict__ logits, const float* __restrict__ part,
                                           const float* __restrict__ outlier, const u32* __restrict__ cand,
                                           const u32* __restrict__ rows, const u32* __restrict__ chunks,
                                           float* __restrict__ out, int g, int hkv, int n, int p, int window,
                                           u32 slots, u32 owners, int cps) {
  __shared__ float stat[2 * SKV_MAXG];
  const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y, b = bh / hkv, tid = threadIdx.x;
  const SkvRow row = skv_row(rows, chunks, b, owners, p, window);
  const long ef = min(row.ef, (long)min(row.chunk, n));
  float* o = out + (size_t)bh * n;
  const int j0 = split * cps, j1 = min(n, j0 + cps);
  if (ef <= 0) {
    for (int j = j0 + tid; j < j1; j += blockDim.x) o[j] = -INFINITY;
    return;
  }
  if (tid < g) {
    const float* pt = part + (size_t)bh * splits * 2 * g;
    float mx = -INFINITY;
    for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, pt[sp * 2 * g + tid]);
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float ms = pt[sp * 2 * g + tid];
      if (ms != -INFINITY) sum += pt[sp * 2 * g + g + tid] * expf(ms - mx);
    }
    stat[tid] = mx;
    stat[SKV_MAXG + tid] = sum;
  }
  __syncthreads();
  const u32* c = cand + (size_t)bh * n;
  const float* lg = logits + (size_t)bh * g * n;
  for (int j = j0 + tid; j < j1; j += blockDim.x) {
    if (j >= ef) {
      o[j] = -INFINITY;
      continue;
    }
    float best = -INFINITY;
    for (int gi = 0; gi < g; ++gi) best = fmaxf(best, expf(lg[(size_t)gi * n + j] - stat[gi]) / stat[SKV_MAXG + gi]);
    const u32 slot = c[j];
    o[j] = best + (slot < slots ? outlier[slot] : 0.f);
  }
}

// One block per (row, KV head): the selection row [w] (outliers before ef at their index,
// the exact region at n_out + j, then top when with_top) and the pairs [k, 2].
extern "C" __global__ void shadowkv_lists(const u32* __restrict__ top, const u32* __restrict__ rows,
                                          const u32* __restrict__ chunks, const u32* __restrict__ oids,
                                          u32* __restrict__ sel, u32* __restrict__ pairs, int hkv, int k, int n,
                                          int n_out, int w, int p, int window, u32 owners, int with_top) {
  const int bh = blockIdx.x, b = bh / hkv, h = bh % hkv;
  const SkvRow row = skv_row(rows, chunks, b, owners, p, window);
  u32* s = sel + (size_t)bh * w;
  for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
    const u32 id = row.owner < owners ? oids[((size_t)row.owner * hkv + h) * n_out + j] : SPIN_NONE;
    s[j] = (id != SPIN_NONE && (long)id < row.ef) ? id : SPIN_NONE;
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) s[n_out + j] = (j >= row.ef && j < row.np) ? (u32)j : SPIN_NONE;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const size_t e = (size_t)bh * k + j;
    const u32 t = top[e];
    if (with_top) s[n_out + n + j] = t;
    pairs[2 * e] = t == SPIN_NONE ? SPIN_NONE : (u32)e;
    pairs[2 * e + 1] = t;
  }
}

// The source of one rebuilt row: entry e's chunk t, its left row and position (ok = false
// when t is NONE or anything is out of range: the row's key is written as zeros), and
// the host slot of its values (NONE without a chunk).
struct SkvSrc {
  bool ok;
  u32 t, pos, slot;
  size_t arow;
};

__device__ __forceinline__ SkvSrc skv_src(size_t e, int i, int b, int bh, int hkv, int n, int p, int r,
                                          const u32* top, const u32* cand, const float* lmap, u32 owner, u32 owners,
                                          u32 slots, u32 lps, u32 positions) {
  SkvSrc x;
  x.ok = false;
  x.t = top[e];
  x.pos = 0;
  x.slot = SPIN_NONE;
  x.arow = 0;
  if (x.t == SPIN_NONE || x.t >= (u32)n) return x;
  // Both candidate reads are issued before either is used.
  const u32 s0 = cand[(size_t)b * hkv * n + x.t];
  x.slot = cand[(size_t)bh * n + x.t];
  if (owner >= owners) return x;
  const u32 page = s0 < slots ? (u32)lmap[s0] : SPIN_NONE;
  const u32 pos = x.t * (u32)p + (u32)i;
  if (page >= lps || pos >= positions) return x;
  x.ok = true;
  x.pos = pos;
  x.arow = ((size_t)page * p + i) * r;
  return x;
}

// Generic rebuild (any float type, any even head dim, any rank): a thread per (entry,
// row, dim c < D/2) computes dims c and c + D/2 (two dot products over the rank), applies
// RoPE and copies the same dims of the values.
template <typename T>
__device__ void skv_rebuild_generic(T* __restrict__ out, const T* __restrict__ left, const T* __restrict__ right,
                                    const u32* __restrict__ top, const u32* __restrict__ cand,
                                    const u32* __restrict__ rows, const float* __restrict__ lmap,
                                    const T* __restrict__ cos, const T* __restrict__ sin,
                                    const T* __restrict__ values, int hkv, int k, int n, int p, int r, int d,
                                    u32 slots, u32 lps, u32 owners, u32 positions, u32 vslots, u64 total) {
  const int half = d / 2;
  for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (u64)gridDim.x * blockDim.x) {
    const int c = (int)(idx % half);
    const int i = (int)((idx / half) % p);
    const size_t e = idx / ((u64)half * p);
    const int bh = (int)(e / k), b = bh / hkv, h = bh % hkv;
    const u32 owner = rows[4 * b];
    const SkvSrc x = skv_src(e, i, b, bh, hkv, n, p, r, top, cand, lmap, owner, owners, slots, lps, positions);
    T* key = out + (e * 2 * p + i) * d;
    T* val = key + (size_t)p * d;
    float y1 = 0.f, y2 = 0.f, v1 = 0.f, v2 = 0.f;
    if (x.ok) {
      const T* rr = right + (size_t)owner * r * hkv * d + (size_t)h * d;
      float x1 = 0.f, x2 = 0.f;
      for (int j = 0; j < r; ++j) {
        const float a = to_f32(left[x.arow + j]);
        x1 += a * to_f32(rr[(size_t)j * hkv * d + c]);
        x2 += a * to_f32(rr[(size_t)j * hkv * d + c + half]);
      }
      const float cs = to_f32(cos[(size_t)x.pos * half + c]), sn = to_f32(sin[(size_t)x.pos * half + c]);
      y1 = x1 * cs - x2 * sn;
      y2 = x1 * sn + x2 * cs;
    }
    if (values != nullptr && x.t != SPIN_NONE && x.t < (u32)n) {
      const u32 slot = cand[(size_t)bh * n + x.t];
      if (slot < vslots) {
        const T* vs = values + ((size_t)slot * 2 * p + p + i) * d;
        v1 = to_f32(vs[c]);
        v2 = to_f32(vs[c + half]);
      }
    }
    store(key + c, y1);
    store(key + c + half, y2);
    store(val + c, v1);
    store(val + c + half, v2);
  }
}

#define SKV_REBUILD_GENERIC(T, SFX)                                                                                    \
  extern "C" __global__ void shadowkv_rebuild_generic_##SFX(                                                           \
      T* out, const T* left, const T* right, const u32* top, const u32* cand, const u32* rows, const float* lmap,       \
      const T* cos, const T* sin, const T* values, int hkv, int k, int n, int p, int r, int d, u32 slots, u32 lps,     \
      u32 owners, u32 positions, u32 vslots, u64 total) {                                                              \
    skv_rebuild_generic<T>(out, left, right, top, cand, rows, lmap, cos, sin, values, hkv, k, n, p, r, d, slots, lps, \
                           owners, positions, vslots, total);                                                          \
  }
SKV_REBUILD_GENERIC(float, f32)
SKV_REBUILD_GENERIC(__half, f16)
SKV_REBUILD_GENERIC(__nv_bfloat16, bf16)

#define SKV_WARPS 4

// Tensor-core rebuild (f16/bf16, D = 64 or 128, r a multiple of 16): one block per (row,
// KV head) and run of 16-row tiles of its K·P rebuilt rows. Shared memory: the head's
// right factor [r, D] transposed ([D][r + 8]; loaded with 16-byte reads, a warp's lanes
// on consecutive rows so that the transposed stores hit distinct banks) and a [16][r + 8]
// staging tile per warp; the pads of 8 elements spread the fragment reads over the
// banks. Each warp takes a tile: the sources of its 16 rows are found once (chunk, left
// row, value slot; the two candidate reads in flight together), the RoPE pairs of the
// lane's rows are loaded, then the tile's value rows are copied and its left rows staged
// with 16-byte loads, all issued before their first use. A and B fragments come from
// shared memory, f32 accumulators hold the tile's [16, D] pre-RoPE keys; dim c and
// c + D/2 live in the same lane, so RoPE is applied in registers before one rounding.
template <typename T, int D>
__device__ void skv_rebuild_mma(T* __restrict__ out, const T* __restrict__ left, const T* __restrict__ right,
                                const u32* __restrict__ top, const u32* __restrict__ cand,
                                const u32* __restrict__ rows, const float* __restrict__ lmap,
                                const T* __restrict__ cos, const T* __restrict__ sin, const T* __restrict__ values,
                                int hkv, int k, int n, int p, int r, u32 slots, u32 lps, u32 owners, u32 positions,
                                u32 vslots, int tiles_per_block) {
  extern __shared__ __align__(16) unsigned char skv_raw[];
  const int rs = r + 8;
  T* rt = reinterpret_cast<T*>(skv_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  T* as = rt + D * rs + warp * 16 * rs;
  __shared__ size_t src_row[SKV_WARPS][16];
  __shared__ size_t val_row[SKV_WARPS][16];
  const int bh = blockIdx.x, b = bh / hkv, h = bh % hkv;
  const u32 owner = rows[4 * b];
  const int hd = hkv * D, rc = r / 8;
  constexpr size_t NO_ROW = ~(size_t)0;
  if (owner < owners) {
    const T* src = right + (size_t)owner * r * hd + (size_t)h * D;
    for (int idx = threadIdx.x; idx < r * (D / 8); idx += blockDim.x) {
      const int j = idx % r, c8 = (idx / r) * 8;
      const uint4 v = *reinterpret_cast<const uint4*>(src + (size_t)j * hd + c8);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int x = 0; x < 8; ++x) rt[(c8 + x) * rs + j] = e[x];
    }
  }
  __syncthreads();
  const int total_rows = k * p;
  const int tiles = (total_rows + 15) / 16;
  const int t0 = blockIdx.y * tiles_per_block, t1 = min(tiles, t0 + tiles_per_block);
  constexpr int NT = D / 8, HN = D / 16;
  for (int t = t0 + warp; t < t1; t += SKV_WARPS) {
    SkvSrc x[2];
    size_t e[2];
    int i[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = t * 16 + gid + 8 * hr;
      e[hr] = (size_t)bh * k + row / p;
      i[hr] = row % p;
      if (row < total_rows) {
        x[hr] = skv_src(e[hr], i[hr], b, bh, hkv, n, p, r, top, cand, lmap, owner, owners, slots, lps, positions);
      } else {
        x[hr].ok = false;
        x[hr].t = SPIN_NONE;
        x[hr].slot = SPIN_NONE;
        x[hr].pos = 0;
        x[hr].arow = 0;
      }
      if (tig == 0) {
        src_row[warp][gid + 8 * hr] = x[hr].ok ? x[hr].arow : NO_ROW;
        val_row[warp][gid + 8 * hr] = values != nullptr && x[hr].slot < vslots
                                          ? ((size_t)x[hr].slot * 2 * p + p + i[hr]) * D
                                          : NO_ROW;
      }
    }
    // The RoPE pairs of this lane's columns, for both of its rows.
    u32 cw[2][HN], sw[2][HN];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
      for (int nt = 0; nt < HN; ++nt) {
        const size_t at = (size_t)x[hr].pos * (D / 2) + nt * 8 + 2 * tig;
        cw[hr][nt] = x[hr].ok ? *reinterpret_cast<const u32*>(cos + at) : 0u;
        sw[hr][nt] = x[hr].ok ? *reinterpret_cast<const u32*>(sin + at) : 0u;
      }
    }
    __syncwarp();
    // The tile's value rows (zeros without a source), then its left rows staged.
    constexpr int VCH = 16 * (D / 8) / 32;
    uint4 vv[VCH];
#pragma unroll
    for (int u = 0; u < VCH; ++u) {
      const int idx = lane + 32 * u, rr = idx / (D / 8), ch = idx % (D / 8);
      const size_t a = val_row[warp][rr];
      vv[u] = a != NO_ROW ? ld_stream16(values + a + ch * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll 4
    for (int idx = lane; idx < 16 * rc; idx += 32) {
      const int rr = idx / rc, ch = idx % rc;
      const size_t a = src_row[warp][rr];
      const uint4 v = a != NO_ROW ? ld_stream16(left + a + ch * 8) : make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(as + rr * rs + ch * 8) = v;
    }
#pragma unroll
    for (int u = 0; u < VCH; ++u) {
      const int idx = lane + 32 * u, rr = idx / (D / 8), ch = idx % (D / 8), row = t * 16 + rr;
      if (row < total_rows) {
        const size_t ee = (size_t)bh * k + row / p;
        *reinterpret_cast<uint4*>(out + (ee * 2 * p + p + row % p) * D + ch * 8) = vv[u];
      }
    }
    __syncwarp();
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    if (__any_sync(FULL_MASK, x[0].ok || x[1].ok)) {
#pragma unroll 2
      for (int kk = 0; kk < r; kk += 16) {
        u32 a[4];
        a[0] = *reinterpret_cast<const u32*>(as + gid * rs + kk + 2 * tig);
        a[1] = *reinterpret_cast<const u32*>(as + (gid + 8) * rs + kk + 2 * tig);
        a[2] = *reinterpret_cast<const u32*>(as + gid * rs + kk + 8 + 2 * tig);
        a[3] = *reinterpret_cast<const u32*>(as + (gid + 8) * rs + kk + 8 + 2 * tig);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const T* bp = rt + (nt * 8 + gid) * rs + kk + 2 * tig;
          Mma<T>::run(acc[nt], a, *reinterpret_cast<const u32*>(bp), *reinterpret_cast<const u32*>(bp + 8));
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = t * 16 + gid + 8 * hr;
      if (row >= total_rows) continue;
      T* key = out + (e[hr] * 2 * p + i[hr]) * D;
#pragma unroll
      for (int nt = 0; nt < HN; ++nt) {
        const int c = nt * 8 + 2 * tig;
        u32 y1 = 0u, y2 = 0u;
        if (x[hr].ok) {
          T* tag = nullptr;
          const float x1a = acc[nt][2 * hr], x1b = acc[nt][2 * hr + 1];
          const float x2a = acc[nt + HN][2 * hr], x2b = acc[nt + HN][2 * hr + 1];
          const float c0 = lo_f32(cw[hr][nt], tag), c1 = hi_f32(cw[hr][nt], tag);
          const float s0 = lo_f32(sw[hr][nt], tag), s1 = hi_f32(sw[hr][nt], tag);
          y1 = Mma<T>::pack(x1a * c0 - x2a * s0, x1b * c1 - x2b * s1);
          y2 = Mma<T>::pack(x1a * s0 + x2a * c0, x1b * s1 + x2b * c1);
        }
        *reinterpret_cast<u32*>(key + c) = y1;
        *reinterpret_cast<u32*>(key + D / 2 + c) = y2;
      }
    }
  }
}

#define SKV_REBUILD_MMA(T, SFX, DIM)                                                                                   \
  extern "C" __global__ void __launch_bounds__(SKV_WARPS * 32) shadowkv_rebuild_mma_##SFX##_d##DIM(                   \
      T* out, const T* left, const T* right, const u32* top, const u32* cand, const u32* rows, const float* lmap,       \
      const T* cos, const T* sin, const T* values, int hkv, int k, int n, int p, int r, u32 slots, u32 lps,             \
      u32 owners, u32 positions, u32 vslots, int tiles_per_block) {                                                   \
    skv_rebuild_mma<T, DIM>(out, left, right, top, cand, rows, lmap, cos, sin, values, hkv, k, n, p, r, slots, lps,   \
                            owners, positions, vslots, tiles_per_block);                                               \
  }
SKV_REBUILD_MMA(__half, f16, 64)
SKV_REBUILD_MMA(__half, f16, 128)
SKV_REBUILD_MMA(__nv_bfloat16, bf16, 64)
SKV_REBUILD_MMA(__nv_bfloat16, bf16, 128)
