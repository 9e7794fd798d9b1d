// spinkv CUDA kernels: flash-style prefill attention. A tile of a prefill chunk's query
// rows attends, in one pass with an online softmax, its sequence's earlier pages through
// a page list and then the chunk's own tokens causally.
// Launch glue: src/ops/cuda/prefill.rs. CPU reference: src/ops/prefill.rs.
//
// Block = (tile, KV head), 4 warps. Its SPIN_PREFILL_ROWS = 128 query rows are the
// (token, head-in-group) pairs of up to 128 / g tokens of one chunk, so every query head of
// the KV group shares each K/V tile loaded into shared memory (GQA). Each warp owns 32
// rows (two m-tiles, so each K/V fragment read from shared memory feeds two MMAs) and
// runs tensor-core mma.m16n8k16 (bf16/f16 in, f32 accumulate), Q fragments by ldmatrix
// from the block's Q rows in shared memory:
// S = Q·Kᵀ with K fragments from ldmatrix, then O += P·V with P taken from S's
// accumulator registers and V fragments from ldmatrix.trans (FlashAttention-2 layout).
//
// Keys are walked as one sequence of "virtual rows": the list's entries (P rows each:
// key position lp·P + r, visible iff the slot is not NONE and the position is below
// kv_limit[seq]), then the chunk's own tokens up to the tile's last one (position
// start + i, visible iff <= the query's position). Tiles of 64 virtual rows are copied
// into two stages of shared memory with cp.async: the next tile's K and V load while
// this one is computed. Masks are applied only to tiles that need them. Dynamic shared
// memory: (128 + 4 · 64) · (D + 8) elements (104 KB at D = 128, opted in by the launch
// glue; two blocks fit an SM).
//
// Tile words (SPIN_PREFILL_TILE_WORDS = 6 u32): seq (index into pages / kv_limit), row0
// (step row of the chunk's first token), start (its position), tok0 (first token of the
// tile, relative to the chunk), ntok (tokens in the tile), nlist (list entries to walk).
//
// Output: one flat f32 buffer, out [T, Hq, D] then lse [T, Hq] at lse_off; rows no tile
// covers are written by prefill_init (zeros, SPIN_EMPTY_LSE).
#include "prefill_common.cuh"

#define PF_WARPS (SPIN_PREFILL_ROWS / 32)
#define PF_THREADS (32 * PF_WARPS)
#define PF_BC 64
#define PF_PER_ROW (PF_THREADS / PF_BC)

extern "C" __global__ void prefill_init(float* __restrict__ out, u64 out_elems, u64 lse_elems) {
  const u64 n = out_elems + lse_elems;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    out[i] = i < out_elems ? 0.f : SPIN_EMPTY_LSE;
}

__device__ __forceinline__ void ldsm_x4(u32* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Copies this thread's share (1/PF_PER_ROW) of one K (or V) row into shared memory;
// a masked row is zero-filled so that its zero weight never meets a NaN.
template <typename T, int D>
__device__ __forceinline__ void load_part(T* dst_row, const T* src, int part) {
  constexpr int CH = D / 8 / PF_PER_ROW;  // 16-byte chunks per thread
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int col = (part * CH + c) * 8;
    if (src != nullptr)
      cp_async16(dst_row + col, src + col);
    else
      *reinterpret_cast<uint4*>(dst_row + col) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T>
__device__ __forceinline__ u32 pack2(float a, float b);
template <>
__device__ __forceinline__ u32 pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<u32*>(&h);
}
template <>
__device__ __forceinline__ u32 pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<u32*>(&h);
}

template <typename T, int D>
__device__ __forceinline__ void prefill_impl(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, const T* __restrict__ pool,
                                             const u32* __restrict__ pages, const u32* __restrict__ kv_limit,
                                             const u32* __restrict__ tiles, float* __restrict__ out, int hq, int hkv,
                                             int s_count, int n, int p, u32 slots, float scale_log2, u64 lse_off) {
  constexpr int KS = D / 16;     // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;      // n-tiles of O
  constexpr int ST = PF_BC / 8;  // n-tiles of S
  constexpr int MT = 2;          // 16-row m-tiles per warp
  // Shared memory (dynamic, rows padded by 8 elements so that ldmatrix rows fall in
  // distinct banks): the block's Q rows, then two stages of K and V tiles.
  extern __shared__ __align__(16) unsigned char pf_smem[];
  typedef T Tile[PF_BC][D + 8];
  typedef T QTile[SPIN_PREFILL_ROWS][D + 8];
  QTile& qs = *reinterpret_cast<QTile*>(pf_smem);
  Tile* kbuf = reinterpret_cast<Tile*>(pf_smem + sizeof(QTile));  // kbuf[0], kbuf[1]
  Tile* vbuf = kbuf + 2;                                           // vbuf[0], vbuf[1]
  __shared__ u32 kpos[2][PF_BC];

  const TileView<T> tv = tile_view<T, D>(tiles, pages, kv_limit, k, v, hq, hkv, s_count, n, p);
  if (!tv.ok) return;
  const int h = tv.h, g = tv.g;
  const u32 row0 = tv.row0, start = tv.start, tok0 = tv.tok0, ntok = tv.ntok, qmin = tv.qmin;
  const int npre = tv.npre, nown = tv.nown, nkeys = tv.nkeys;
  const u64 limit = tv.limit;
  const u32* list = tv.list;
  const T* kown = tv.kown;
  const T* vown = tv.vown;
  const size_t own_stride = tv.own_stride;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = lane >> 2, tig = lane & 3;

  // Q rows into shared memory (row rr = (token rr / g, head rr % g); dead rows zero).
  for (int rr = tid; rr < SPIN_PREFILL_ROWS; rr += PF_THREADS) {
    const int tok = rr / g, j = rr % g;
    const T* src =
        tok < (int)ntok ? q + (((size_t)row0 + tok0 + tok) * hq + (size_t)h * g + j) * D : nullptr;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      if (src != nullptr)
        cp_async16(&qs[rr][c * 8], src + c * 8);
      else
        *reinterpret_cast<uint4*>(&qs[rr][c * 8]) = make_uint4(0, 0, 0, 0);
    }
  }
  // This thread's four query rows: m-tile mt, rows r and r + 8.
  u32 qpos[MT][2];
  bool live[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tok = (warp * 32 + mt * 16 + r + 8 * i) / g;
      live[mt][i] = tok < (int)ntok;
      qpos[mt][i] = live[mt][i] ? qmin + (u32)tok : 0u;
    }

  float o[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  // Loader role: thread tid copies part (tid % PF_PER_ROW) of virtual row tid / PF_PER_ROW
  // of each tile, K and V together; `bad` says whether that row needs a mask.
  const int lrow = tid / PF_PER_ROW, lpart = tid % PF_PER_ROW;
  const int ntiles = (nkeys + PF_BC - 1) / PF_BC;
  auto issue = [&](int t, int st) -> int {
    const KeyRow<T> kr =
        key_row<T, D>(t * PF_BC + lrow, npre, nown, list, pool, kown, vown, p, slots, limit, start, own_stride);
    load_part<T, D>(&kbuf[st][lrow][0], kr.k, lpart);
    load_part<T, D>(&vbuf[st][lrow][0], kr.v, lpart);
    if (lpart == 0) kpos[st][lrow] = kr.pos;
    return kr.pos == PF_INVALID || kr.pos > qmin;
  };
  int bad = issue(0, 0);
  cp_async_commit();  // Q and the first tile

  for (int t = 0; t < ntiles; ++t) {
    const int st = t & 1;
    // The next tile loads into the other stage while this one is computed.
    int bad_next = 0;
    if (t + 1 < ntiles) bad_next = issue(t + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait_one();
    const bool masked = __syncthreads_or(bad);
    bad = bad_next;

    // S = Q·Kᵀ over this tile's 64 keys, two k-steps at a time: each K fragment from
    // shared memory feeds both m-tiles.
    float sc[MT][ST][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < ST; ++nt) sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
#pragma unroll
    for (int s = 0; s < KS; s += 2) {
      u32 qa[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          ldsm_x4(qa[mt][e], &qs[warp * 32 + mt * 16 + (lane & 15)][(s + e) * 16 + (lane >> 4) * 8]);
#pragma unroll
      for (int nt = 0; nt < ST; ++nt) {
        u32 b[4];
        ldsm_x4(b, &kbuf[st][nt * 8 + (lane & 7)][s * 16 + (lane >> 3) * 8]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(sc[mt][nt], qa[mt][0], b[0], b[1]);
          Mma<T>::run(sc[mt][nt], qa[mt][1], b[2], b[3]);
        }
      }
    }
    if (masked) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < ST; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const u32 kp = kpos[st][nt * 8 + 2 * tig + (c & 1)];
            if (kp == PF_INVALID || kp > qpos[mt][c >> 1]) sc[mt][nt][c] = -INFINITY;
          }
    }
    // Online softmax (log2 units) per row; l stays a per-thread partial sum.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < ST; ++nt) mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * i], sc[mt][nt][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][i], mx * scale_log2);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float corr = fast_exp2(m[mt][i] - m_use);
        m[mt][i] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < ST; ++nt) {
          sc[mt][nt][2 * i] = fast_exp2(fmaf(sc[mt][nt][2 * i], scale_log2, -m_use));
          sc[mt][nt][2 * i + 1] = fast_exp2(fmaf(sc[mt][nt][2 * i + 1], scale_log2, -m_use));
          sum += sc[mt][nt][2 * i] + sc[mt][nt][2 * i + 1];
        }
        l[mt][i] = l[mt][i] * corr + sum;
#pragma unroll
        for (int d = 0; d < NT; ++d) {
          o[mt][d][2 * i] *= corr;
          o[mt][d][2 * i + 1] *= corr;
        }
      }
    // O += P·V: P's A fragments come from S's accumulators; each V fragment feeds both
    // m-tiles.
#pragma unroll
    for (int kk = 0; kk < PF_BC / 16; ++kk) {
      u32 pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<T>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
        pa[mt][1] = pack2<T>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
        pa[mt][2] = pack2<T>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<T>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < NT / 2; ++dn) {
        u32 b[4];
        ldsm_x4_t(b, &vbuf[st][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][dn * 16 + (lane >> 4) * 8]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(o[mt][2 * dn], pa[mt], b[0], b[1]);
          Mma<T>::run(o[mt][2 * dn + 1], pa[mt], b[2], b[3]);
        }
      }
    }
    // Every warp is done with this stage before the next iteration refills it.
    __syncthreads();
  }

  // Normalize and store this thread's rows.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float lt = l[mt][i];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      if (!live[mt][i]) continue;
      const int rr = warp * 32 + mt * 16 + r + 8 * i;
      const int tok = rr / g, j = rr % g;
      const size_t qrow = ((size_t)row0 + tok0 + tok) * hq + (size_t)h * g + j;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      float* orow = out + qrow * D;
#pragma unroll
      for (int d = 0; d < NT; ++d)
        *reinterpret_cast<float2*>(orow + d * 8 + 2 * tig) =
            make_float2(o[mt][d][2 * i] * inv, o[mt][d][2 * i + 1] * inv);
      if (tig == 0) out[lse_off + qrow] = lt > 0.f ? (m[mt][i] + log2f(lt)) * PF_LN2 : SPIN_EMPTY_LSE;
    }
}

#define PREFILL_KERNEL(NAME, T, D)                                                                          \
  extern "C" __global__ void __launch_bounds__(PF_THREADS, 2) NAME(                                            \
      const T* q, const T* k, const T* v, const T* pool, const u32* pages, const u32* kv_limit,             \
      const u32* tiles, float* out, int hq, int hkv, int s_count, int n, int p, u32 slots, float scale_log2, \
      u64 lse_off) {                                                                                        \
    prefill_impl<T, D>(q, k, v, pool, pages, kv_limit, tiles, out, hq, hkv, s_count, n, p, slots,           \
                       scale_log2, lse_off);                                                                \
  }

PREFILL_KERNEL(prefill_bf16_d64, __nv_bfloat16, 64)
PREFILL_KERNEL(prefill_bf16_d96, __nv_bfloat16, 96)
PREFILL_KERNEL(prefill_bf16_d128, __nv_bfloat16, 128)
PREFILL_KERNEL(prefill_f16_d64, __half, 64)
PREFILL_KERNEL(prefill_f16_d96, __half, 96)
PREFILL_KERNEL(prefill_f16_d128, __half, 128)
