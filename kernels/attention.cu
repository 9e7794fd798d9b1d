// spinkv CUDA kernels: sparse paged decode attention (flash-decoding over a page list,
// split along the list, with a merge) and its generic fallback.
// Launch glue: src/ops/cuda/attention.rs. CPU reference: src/ops/attention.rs.
//
// Output: one flat f32 buffer, the normalized output [T, Hq, D] followed by the
// natural-log lse [T, Hq] at element `lse_off` = T * Hq * D (SPIN_EMPTY_LSE and zeros
// for a row that sees no key), so both halves are contiguous views. Key at logical page lp, row r has
// position lp * P + r and is visible iff it is <= the query's position and < kv_limit[seq].
//
// Fast path (bf16/f16, D = 64 or 128, GQA group g <= 16): one block of 4 warps per
// (token, KV head, split); each warp walks every 4th list entry of the split, 16 key rows
// at a time, with tensor-core mma.m16n8k16: S = Q·Kᵀ with the g query heads as the 16
// rows of A, then O += P·V with P reused from S's accumulator registers (FlashAttention-2
// layout). K and V rows are read with 16-byte loads straight into B fragments: the dot
// product's dimension order is permuted identically in Q and K, and V's dimension order
// in the B fragment and the output, so no shared memory or transpose is needed.
// Per warp (m, l, O) states are merged in shared memory; splits are merged by spa_merge.
#include "common.cuh"

#define SPA_WARPS 4
#define LN2_F 0.69314718055994530942f

__device__ __forceinline__ u32 word_of(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// Writes the merged state of one (token, query head) row: final output when the list
// is not split, else the split's unnormalized partial (m in log2 units, l, O).
__device__ __forceinline__ void spa_store(float* __restrict__ out, float* __restrict__ part, size_t qrow,
                                          int splits, int split, int d, int dim, float m, float l, float o,
                                          u64 lse_off) {
  if (splits == 1) {
    out[qrow * d + dim] = l > 0.f ? o / l : 0.f;
    if (dim == 0) out[lse_off + qrow] = l > 0.f ? (m + log2f(l)) * LN2_F : SPIN_EMPTY_LSE;
  } else {
    float* prow = part + (qrow * splits + split) * (d + 2);
    prow[2 + dim] = o;
    if (dim == 0) {
      prow[0] = l > 0.f ? m : -INFINITY;
      prow[1] = l;
    }
  }
}

// One 16-row tile of a page held in registers: K rows r and r + 8 (chunks 32*s2 + 8*tig),
// V rows 2tig, 2tig+1, 2tig+8, 2tig+9 (chunks 64*hf + 8*r).
template <int D>
struct KvTile {
  uint4 k0[D / 32], k1[D / 32], vv[4][D / 64];
};

// Loads the tile whose first key row is kt (its value rows start p * D further on); rows
// at or past tr read as zero.
template <typename T, int D>
__device__ __forceinline__ void kv_load(KvTile<D>& x, const T* kt, int p, int tr, int r, int tig) {
  const T* vt = kt + (size_t)p * D;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s2 = 0; s2 < D / 32; ++s2) {
    x.k0[s2] = r < tr ? ld_stream16(kt + (size_t)r * D + 32 * s2 + 8 * tig) : zero;
    x.k1[s2] = r + 8 < tr ? ld_stream16(kt + (size_t)(r + 8) * D + 32 * s2 + 8 * tig) : zero;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int vr = 2 * tig + (i & 1) + 8 * (i >> 1);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf) x.vv[i][hf] = vr < tr ? ld_stream16(vt + (size_t)vr * D + 64 * hf + 8 * r) : zero;
  }
}

// Stores the rows [0, tr) of a loaded tile at fk (values p * D further on): the miss's fill.
template <typename T, int D>
__device__ __forceinline__ void kv_store(const KvTile<D>& x, T* fk, int p, int tr, int r, int tig) {
  T* fv = fk + (size_t)p * D;
#pragma unroll
  for (int s2 = 0; s2 < D / 32; ++s2) {
    if (r < tr) *reinterpret_cast<uint4*>(fk + (size_t)r * D + 32 * s2 + 8 * tig) = x.k0[s2];
    if (r + 8 < tr) *reinterpret_cast<uint4*>(fk + (size_t)(r + 8) * D + 32 * s2 + 8 * tig) = x.k1[s2];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int vr = 2 * tig + (i & 1) + 8 * (i >> 1);
#pragma unroll
    for (int hf = 0; hf < D / 64; ++hf)
      if (vr < tr) *reinterpret_cast<uint4*>(fv + (size_t)vr * D + 64 * hf + 8 * r) = x.vv[i][hf];
  }
}

// The running state of one warp: row maxima m (log2 units) and sums l of the query
// heads r and r + 8, and O's accumulators (OC per n-tile).
template <int D, bool G16>
struct SpaState {
  static constexpr int OC = G16 ? 4 : 2;
  float m0, m1, l0, l1;
  float o[D / 8][OC];
};

// The online softmax of one half of a tile's rows (query heads r, or r + 8): s0..s3 are
// its scores for keys 2tig, 2tig+1, 2tig+8 and 2tig+9 (keys at or past tr are masked).
// Updates the half's max m (log2 units) and sum l, writes the probabilities to pr and
// returns the factor that rescales the half's earlier output.
__device__ __forceinline__ float row_softmax(float s0, float s1, float s2, float s3, int c0, int tr, float scale_log2,
                                             float& m, float& l, float (&pr)[4]) {
  const float x0 = c0 < tr ? s0 * scale_log2 : -INFINITY;
  const float x1 = c0 + 1 < tr ? s1 * scale_log2 : -INFINITY;
  const float x2 = c0 + 8 < tr ? s2 * scale_log2 : -INFINITY;
  const float x3 = c0 + 9 < tr ? s3 * scale_log2 : -INFINITY;
  float mx = fmaxf(fmaxf(x0, x1), fmaxf(x2, x3));
  mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
  const float n = fmaxf(m, mx);
  const float cr = fast_exp2(m - n);
  pr[0] = fast_exp2(x0 - n);
  pr[1] = fast_exp2(x1 - n);
  pr[2] = fast_exp2(x2 - n);
  pr[3] = fast_exp2(x3 - n);
  l = l * cr + ((pr[0] + pr[1]) + (pr[2] + pr[3]));
  m = n;
  return cr;
}

// One loaded tile of tr valid rows: S = Q·Kᵀ (keys 0-7 in sa, 8-15 in sb), the online
// softmax, and O += P·V with P taken from S's accumulators.
template <typename T, int D, bool G16>
__device__ __forceinline__ void kv_tile(const KvTile<D>& x, int tr, const u32 (&qa)[D / 16][4], float scale_log2,
                                        int tig, SpaState<D, G16>& st) {
  constexpr int KS = D / 16, NT = D / 8, OC = SpaState<D, G16>::OC;
  float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int s2 = ks >> 1;
    const bool up = ks & 1;
    Mma<T>::run(sa, qa[ks], up ? x.k0[s2].z : x.k0[s2].x, up ? x.k0[s2].w : x.k0[s2].y);
    Mma<T>::run(sb, qa[ks], up ? x.k1[s2].z : x.k1[s2].x, up ? x.k1[s2].w : x.k1[s2].y);
  }
  const int c0 = 2 * tig;
  float px[4], py[4] = {0.f, 0.f, 0.f, 0.f};
  const float cr0 = row_softmax(sa[0], sa[1], sb[0], sb[1], c0, tr, scale_log2, st.m0, st.l0, px);
  const float cr1 = G16 ? row_softmax(sa[2], sa[3], sb[2], sb[3], c0, tr, scale_log2, st.m1, st.l1, py) : 1.f;
  const u32 pa[4] = {Mma<T>::pack(px[0], px[1]), G16 ? Mma<T>::pack(py[0], py[1]) : 0u,
                     Mma<T>::pack(px[2], px[3]), G16 ? Mma<T>::pack(py[2], py[3]) : 0u};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int hf = nt >> 3, jj = nt & 7, w = jj >> 1;
    const u32 sel = (jj & 1) ? 0x7632u : 0x5410u;
    const u32 b0 = __byte_perm(word_of(x.vv[0][hf], w), word_of(x.vv[1][hf], w), sel);
    const u32 b1 = __byte_perm(word_of(x.vv[2][hf], w), word_of(x.vv[3][hf], w), sel);
    float c[4] = {st.o[nt][0] * cr0, st.o[nt][1] * cr0, 0.f, 0.f};
    if (G16) {
      c[2] = st.o[nt][OC - 2] * cr1;
      c[3] = st.o[nt][OC - 1] * cr1;
    }
    Mma<T>::run(c, pa, b0, b1);
#pragma unroll
    for (int i = 0; i < OC; ++i) st.o[nt][i] = c[i];
  }
}

// G16: the GQA group may exceed 8 heads (rows 8-15 of the mma tiles are live). Without
// it those rows are compile-time zeros and their accumulators and softmax are skipped.
// TIER: the fused tiered variant (see tiered_attention.rs). Entry e of a list may also
// name a host page src[e] (a second pool, `host`, of host_slots pages: mapped pinned
// memory): its K/V are read from there, and when its slot is a fast slot the warp writes
// every row it loaded (and the rows past the query's limit) into that slot (the miss's
// fill). A filled slot is never read in the same launch (the LRU pins it for its one
// request), so the pools' non-coherent loads stay valid.
//
// Each warp takes every 4th entry of its split. The list is read 32 entries at a time
// (one per lane, then shuffled). Without TIER the loads of a warp's next tile are issued
// before the current tile is computed, so two tiles per warp are in flight.
template <typename T, int D, bool G16, bool TIER>
__device__ __forceinline__ void spa_mma_impl(const T* __restrict__ q, const T* __restrict__ pool,
                                             const u32* __restrict__ pages, const u32* __restrict__ queries,
                                             const u32* __restrict__ kv_limit, float* __restrict__ out,
                                             float* __restrict__ part, int hq, int hkv, int s_count, int n,
                                             int p, u32 slots, int splits, int per_split, float scale_log2,
                                             u64 lse_off, const u32* __restrict__ src, const T* __restrict__ host,
                                             u32 host_slots, T* fill) {
  constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;   // n-tiles of P·V
  constexpr int OC = SpaState<D, G16>::OC;
  __shared__ float sm_m[SPA_WARPS][16];
  __shared__ float sm_l[SPA_WARPS][16];
  __shared__ float sm_o[SPA_WARPS][16][D];

  const int bid = blockIdx.x;
  const int split = bid % splits;
  const int h = (bid / splits) % hkv;
  const int t = bid / (splits * hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane >> 2, tig = lane & 3;
  const int g = hq / hkv;
  const u32 seq = queries[2 * t], pos = queries[2 * t + 1];
  const bool seq_ok = seq < (u32)s_count;
  const u64 limit = seq_ok ? min((u64)kv_limit[seq], (u64)pos + 1) : 0;

  // A fragments of Q (rows = query heads of the group, zero beyond g).
  u32 qa[KS][4];
  const T* qbase = q + ((size_t)t * hq + (size_t)h * g) * D;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int d0 = 32 * (ks >> 1) + 8 * tig + 4 * (ks & 1);
    const uint2 lo = r < g ? *reinterpret_cast<const uint2*>(qbase + (size_t)r * D + d0) : make_uint2(0, 0);
    const uint2 hi = (G16 && r + 8 < g) ? *reinterpret_cast<const uint2*>(qbase + (size_t)(r + 8) * D + d0) : make_uint2(0, 0);
    qa[ks][0] = lo.x;
    qa[ks][1] = hi.x;
    qa[ks][2] = lo.y;
    qa[ks][3] = hi.y;
  }

  SpaState<D, G16> st;
  st.m0 = -INFINITY;
  st.m1 = -INFINITY;
  st.l0 = 0.f;
  st.l1 = 0.f;
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int c = 0; c < OC; ++c) st.o[i][c] = 0.f;

  const int e_begin = split * per_split;
  const int e_end = min(n, e_begin + per_split);
  if (seq_ok) {
    const size_t row_off = ((size_t)seq * hkv + h) * (size_t)n;
    const u32* list = pages + row_off * 2;
    const size_t page_elems = (size_t)2 * p * D;
    // The warp's cursor: a chunk of up to 32 of its entries (entry base + lane * 4 in lane
    // `lane`), the entry j of the chunk, and the tile's first row t0 within that page.
    int base = e_begin + warp - SPA_WARPS * 32, cnt = 0, j = 0, t0 = 0;
    u32 ent_slot = SPIN_NONE, ent_lp = 0, ent_src = SPIN_NONE;
    auto load_chunk = [&]() {
      const int my_e = base + lane * SPA_WARPS;
      ent_slot = SPIN_NONE;
      ent_lp = 0;
      ent_src = SPIN_NONE;
      if (my_e < e_end) {
        ent_slot = list[2 * my_e];
        ent_lp = list[2 * my_e + 1];
        if (TIER) ent_src = src[row_off + my_e];
      }
      cnt = min(32, (e_end - base + SPA_WARPS - 1) / SPA_WARPS);
      j = 0;
      t0 = 0;
    };
    if constexpr (!TIER) {
      // Moves the cursor to the next tile with visible rows: its key rows kt and its
      // count tr (0: the warp's entries are done).
      auto next = [&](const T*& kt, int& tr) {
        for (;;) {
          if (j >= cnt) {
            base += SPA_WARPS * 32;
            if (base >= e_end) {
              tr = 0;
              return;
            }
            load_chunk();
          }
          const u32 slot = __shfl_sync(FULL_MASK, ent_slot, j);
          const u32 lp = __shfl_sync(FULL_MASK, ent_lp, j);
          const u64 first = (u64)lp * (u64)p;
          const int rows = (slot == SPIN_NONE || slot >= slots || first >= limit) ? 0 : (int)min(limit - first, (u64)p);
          if (t0 < rows) {
            kt = pool + (size_t)slot * page_elems + (size_t)t0 * D;
            tr = min(rows - t0, 16);
            t0 += 16;
            if (t0 >= rows) {
              ++j;
              t0 = 0;
            }
            return;
          }
          ++j;
          t0 = 0;
        }
      };
      const T* kt = nullptr;
      int tr = 0;
      next(kt, tr);
      KvTile<D> cur;
      if (tr > 0) kv_load<T, D>(cur, kt, p, tr, r, tig);
      while (tr > 0) {
        const T* kn = nullptr;
        int trn = 0;
        next(kn, trn);
        KvTile<D> nxt;
        if (trn > 0) kv_load<T, D>(nxt, kn, p, trn, r, tig);
        kv_tile<T, D, G16>(cur, tr, qa, scale_log2, tig, st);
        cur = nxt;
        tr = trn;
      }
    } else {
      for (;;) {
        base += SPA_WARPS * 32;
        if (base >= e_end) break;
        load_chunk();
        for (j = 0; j < cnt; ++j) {
          const u32 slot = __shfl_sync(FULL_MASK, ent_slot, j);
          const u32 lp = __shfl_sync(FULL_MASK, ent_lp, j);
          const u32 hsrc = __shfl_sync(FULL_MASK, ent_src, j);
          const T* kpage;
          T* fpage = nullptr;  // the fast slot a host page is filled into
          if (hsrc != SPIN_NONE) {
            if (hsrc >= host_slots) continue;
            kpage = host + (size_t)hsrc * page_elems;
            if (slot != SPIN_NONE && slot < slots) fpage = fill + (size_t)slot * page_elems;
          } else {
            if (slot == SPIN_NONE || slot >= slots) continue;
            kpage = pool + (size_t)slot * page_elems;
          }
          const u64 first = (u64)lp * (u64)p;
          const int rows = first >= limit ? 0 : (int)min(limit - first, (u64)p);
          if (fpage != nullptr && rows < p) {
            // The rows this query does not see are copied here; the tile loop stores the rest.
            constexpr int CPR = D / 8;  // 16-byte chunks per row
            const int total = 2 * (p - rows) * CPR;
            for (int c = lane; c < total; c += 32) {
              const int half = c / ((p - rows) * CPR), rem = c % ((p - rows) * CPR);
              const size_t off = (size_t)half * p * D + (size_t)(rows + rem / CPR) * D + 8 * (rem % CPR);
              *reinterpret_cast<uint4*>(fpage + off) = ld_stream16(kpage + off);
            }
          }
          for (int tt = 0; tt < rows; tt += 16) {
            const int tr = min(rows - tt, 16);
            KvTile<D> x;
            kv_load<T, D>(x, kpage + (size_t)tt * D, p, tr, r, tig);
            if (fpage != nullptr) kv_store<T, D>(x, fpage + (size_t)tt * D, p, tr, r, tig);
            kv_tile<T, D, G16>(x, tr, qa, scale_log2, tig, st);
          }
        }
      }
    }
  }
  float m0 = st.m0, m1 = st.m1, l0 = st.l0, l1 = st.l1;
  auto& o = st.o;
  l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
  l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
  l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
  l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
  if (tig == 0) {
    sm_m[warp][r] = m0;
    sm_m[warp][r + 8] = m1;
    sm_l[warp][r] = l0;
    sm_l[warp][r + 8] = l1;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int hf = nt >> 3, jj = nt & 7;
    const int da = 64 * hf + 16 * tig + jj;
    sm_o[warp][r][da] = o[nt][0];
    sm_o[warp][r][da + 8] = o[nt][1];
    if (G16) {
      sm_o[warp][r + 8][da] = o[nt][OC - 2];
      sm_o[warp][r + 8][da + 8] = o[nt][OC - 1];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < g * D; idx += blockDim.x) {
    const int row = idx / D, dim = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < SPA_WARPS; ++w) mm = fmaxf(mm, sm_m[w][row]);
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int w = 0; w < SPA_WARPS; ++w) {
      const float mw = sm_m[w][row];
      if (mw == -INFINITY) continue;
      const float wt = exp2f(mw - mm);
      ll += sm_l[w][row] * wt;
      oo += sm_o[w][row][dim] * wt;
    }
    spa_store(out, part, (size_t)t * hq + (size_t)h * g + row, splits, split, D, dim, mm, ll, oo, lse_off);
  }
}

#define SPA_MMA_KERNEL(NAME, T, D, G16, MINB)                                                           \
  extern "C" __global__ void __launch_bounds__(128, MINB)                                               \
      NAME(const T* q, const T* pool, const u32* pages, const u32* queries, const u32* kv_limit,        \
           float* out, float* part, int hq, int hkv, int s_count, int n, int p, u32 slots, int splits,   \
           int per_split, float scale_log2, u64 lse_off) {                                               \
    spa_mma_impl<T, D, G16, false>(q, pool, pages, queries, kv_limit, out, part, hq, hkv, s_count, n, p, \
                                   slots, splits, per_split, scale_log2, lse_off, nullptr, nullptr, 0u,  \
                                   nullptr);                                                             \
  }
SPA_MMA_KERNEL(spa_mma_bf16_d128_g16, __nv_bfloat16, 128, true, 2)
SPA_MMA_KERNEL(spa_mma_bf16_d64_g16, __nv_bfloat16, 64, true, 2)
SPA_MMA_KERNEL(spa_mma_f16_d128_g16, __half, 128, true, 2)
SPA_MMA_KERNEL(spa_mma_f16_d64_g16, __half, 64, true, 2)
SPA_MMA_KERNEL(spa_mma_bf16_d128_g8, __nv_bfloat16, 128, false, 2)
SPA_MMA_KERNEL(spa_mma_bf16_d64_g8, __nv_bfloat16, 64, false, 2)
SPA_MMA_KERNEL(spa_mma_f16_d128_g8, __half, 128, false, 2)
SPA_MMA_KERNEL(spa_mma_f16_d64_g8, __half, 64, false, 2)

// The fused tiered kernels: the same, plus each entry's host page src[S, Hkv, N] (NONE:
// read the fast slot) in `host`, filled into its fast slot of `pool` (now written).
#define SPA_TIER_KERNEL(NAME, T, D, G16, MINB)                                                          \
  extern "C" __global__ void __launch_bounds__(128, MINB)                                               \
      NAME(const T* q, T* pool, const u32* pages, const u32* queries, const u32* kv_limit, float* out,  \
           float* part, int hq, int hkv, int s_count, int n, int p, u32 slots, int splits, int per_split, \
           float scale_log2, u64 lse_off, const u32* src, const T* host, u32 host_slots) {               \
    spa_mma_impl<T, D, G16, true>(q, pool, pages, queries, kv_limit, out, part, hq, hkv, s_count, n, p,  \
                                  slots, splits, per_split, scale_log2, lse_off, src, host, host_slots,  \
                                  pool);                                                                 \
  }
SPA_TIER_KERNEL(spa_tier_bf16_d128_g16, __nv_bfloat16, 128, true, 2)
SPA_TIER_KERNEL(spa_tier_bf16_d64_g16, __nv_bfloat16, 64, true, 2)
SPA_TIER_KERNEL(spa_tier_f16_d128_g16, __half, 128, true, 2)
SPA_TIER_KERNEL(spa_tier_f16_d64_g16, __half, 64, true, 2)
SPA_TIER_KERNEL(spa_tier_bf16_d128_g8, __nv_bfloat16, 128, false, 2)
SPA_TIER_KERNEL(spa_tier_bf16_d64_g8, __nv_bfloat16, 64, false, 2)
SPA_TIER_KERNEL(spa_tier_f16_d128_g8, __half, 128, false, 2)
SPA_TIER_KERNEL(spa_tier_f16_d64_g8, __half, 64, false, 2)

// Merges the splits of each (token, query head) row: one block per row. The block
// reduces the splits' maxima and weighted sums; then each thread owns output dims and
// reads every split's partial with loads independent of one another (unrolled, so many
// are in flight), where a warp per row waited for one split after the other.
extern "C" __global__ void spa_merge(const float* __restrict__ part, float* __restrict__ out, int rows,
                                     int splits, int d, u64 lse_off) {
  __shared__ float sh[32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const size_t stride = (size_t)d + 2;
  const float* pr = part + (size_t)row * splits * stride;
  float mm = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) mm = fmaxf(mm, pr[s * stride]);
  mm = block_reduce(mm, true, sh);
  float ll = 0.f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float ms = pr[s * stride];
    if (ms != -INFINITY) ll += pr[s * stride + 1] * exp2f(ms - mm);
  }
  ll = block_reduce(ll, false, sh);
  float* orow = out + (size_t)row * d;
  for (int dim = threadIdx.x; dim < d; dim += blockDim.x) {
    float oo = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float ms = pr[s * stride];
      const float os = pr[s * stride + 2 + dim];
      oo += ms != -INFINITY ? os * exp2f(ms - mm) : 0.f;
    }
    orow[dim] = ll > 0.f ? oo / ll : 0.f;
  }
  if (threadIdx.x == 0) out[lse_off + row] = ll > 0.f ? (mm + log2f(ll)) * LN2_F : SPIN_EMPTY_LSE;
}

// Generic path (any float dtype, D <= 512, any GQA ratio): one block of 4 warps per
// (token, query head); warps take every 4th key row, lanes stride over dims.
#define GEN_MAXD 512
template <typename T>
__device__ __forceinline__ void spa_generic_impl(const T* __restrict__ q, const T* __restrict__ pool,
                                                 const u32* __restrict__ pages, const u32* __restrict__ queries,
                                                 const u32* __restrict__ kv_limit, float* __restrict__ out, int hq,
                                                 int hkv, int s_count, int n, int p, int d, u32 slots, float scale,
                                                 u64 lse_off) {
  constexpr int R = GEN_MAXD / 32;
  __shared__ float gm[SPA_WARPS], gl[SPA_WARPS];
  __shared__ float go[SPA_WARPS][GEN_MAXD];
  const int t = blockIdx.x / hq, qh = blockIdx.x % hq;
  const int g = hq / hkv, h = qh / g;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const u32 seq = queries[2 * t], pos = queries[2 * t + 1];
  const bool seq_ok = seq < (u32)s_count;
  const u64 limit = seq_ok ? min((u64)kv_limit[seq], (u64)pos + 1) : 0;
  float qv[R], acc[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int x = lane + 32 * i;
    qv[i] = x < d ? to_f32(q[((size_t)t * hq + qh) * d + x]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  if (seq_ok) {
    const u32* list = pages + ((size_t)seq * hkv + h) * (size_t)n * 2;
    const long long total = (long long)n * p;
    for (long long idx = warp; idx < total; idx += SPA_WARPS) {
      const int e = (int)(idx / p), row = (int)(idx % p);
      const u32 slot = list[2 * e], lp = list[2 * e + 1];
      if (slot == SPIN_NONE || slot >= slots) continue;
      if ((u64)lp * p + row >= limit) continue;
      const T* key = pool + ((size_t)slot * 2 * p + row) * d;
      const T* val = key + (size_t)p * d;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int x = lane + 32 * i;
        if (x < d) s += qv[i] * to_f32(key[x]);
      }
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
      const float mn = fmaxf(m, s);
      const float corr = expf(m - mn);
      const float pe = expf(s - mn);
      l = l * corr + pe;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int x = lane + 32 * i;
        if (x < d) acc[i] = acc[i] * corr + pe * to_f32(val[x]);
      }
      m = mn;
    }
  }
  if (lane == 0) {
    gm[warp] = m;
    gl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int x = lane + 32 * i;
    if (x < d) go[warp][x] = acc[i];
  }
  __syncthreads();
  float mm = -INFINITY;
  for (int w = 0; w < SPA_WARPS; ++w) mm = fmaxf(mm, gm[w]);
  float ll = 0.f;
  for (int w = 0; w < SPA_WARPS; ++w)
    if (gm[w] != -INFINITY) ll += gl[w] * expf(gm[w] - mm);
  float* orow = out + ((size_t)t * hq + qh) * d;
  for (int x = threadIdx.x; x < d; x += blockDim.x) {
    float oo = 0.f;
    for (int w = 0; w < SPA_WARPS; ++w)
      if (gm[w] != -INFINITY) oo += go[w][x] * expf(gm[w] - mm);
    orow[x] = ll > 0.f ? oo / ll : 0.f;
  }
  if (threadIdx.x == 0) out[lse_off + (size_t)t * hq + qh] = ll > 0.f ? mm + logf(ll) : SPIN_EMPTY_LSE;
}

#define SPA_GENERIC_KERNEL(NAME, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(128)                                                      \
      NAME(const T* q, const T* pool, const u32* pages, const u32* queries, const u32* kv_limit,         \
           float* out, int hq, int hkv, int s_count, int n, int p, int d, u32 slots, float scale,        \
           u64 lse_off) {                                                                                \
    spa_generic_impl<T>(q, pool, pages, queries, kv_limit, out, hq, hkv, s_count, n, p, d, slots, scale, \
                        lse_off);                                                                        \
  }
SPA_GENERIC_KERNEL(spa_generic_f32, float)
SPA_GENERIC_KERNEL(spa_generic_f16, __half)
SPA_GENERIC_KERNEL(spa_generic_bf16, __nv_bfloat16)

// Merge of two partial attention states (src/ops/merge.rs is the reference): y = the
// merged out [rows, d], then the merged lse [rows], flat. Grid-stride, one element each.
extern "C" __global__ void merge_partials_f32(const float* __restrict__ oa, const float* __restrict__ ob,
                                              const float* __restrict__ la, const float* __restrict__ lb,
                                              float* __restrict__ y, int rows, int d) {
  const size_t n = (size_t)rows * d;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n + rows; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i < n ? i / d : i - n;
    const float a = la[r], b = lb[r];
    const float m = fmaxf(a, b);
    const float wa = expf(a - m), wb = expf(b - m);
    const float s = wa + wb;
    if (i < n) {
      y[i] = __fadd_rn(__fmul_rn(oa[i], wa / s), __fmul_rn(ob[i], wb / s));
    } else {
      y[i] = m + logf(s);
    }
  }
}
