// spinkv CUDA kernels: the prefill attention on Hopper's warpgroup tensor cores (wgmma,
// sm_90a). Same op, tiles and output as prefill.cu (the mma.sync kernel, which stays for
// other GPUs and head dim 96); the launch glue (src/ops/cuda/prefill.rs) picks this one
// where its module has the entry point. CPU reference: src/ops/prefill.rs.
//
// Block = (tile, KV head), two warpgroups (8 warps). Each warpgroup owns 64 of the tile's
// SPIN_PREFILL_ROWS = 128 query rows, (token, head-in-group) pairs as in prefill.cu, and
// per 64-key tile runs:
// - S = Q·Kᵀ: wgmma m64n64k16, Q and K both read by the tensor cores from shared memory
//   (K-major), D / 16 instructions accumulating into 32 f32 registers a thread;
// - the mask and the online softmax on those registers (log2 units);
// - O += P·V: wgmma m64n64k16 per 64 columns of D, P from registers (the accumulator
//   layout is the A-fragment layout), V from shared memory read MN-major (transposed).
// Shared memory holds Q and two stages of K and V in 128-byte-swizzled blocks of
// [rows][64] elements (element (r, c) at r·64 + ((c/8) ⊕ (r mod 8))·8 + c mod 8, blocks
// 1024-byte aligned), filled by cp.async: the next tile loads while this one computes.
// Dynamic shared memory: (128 + 4 · 64) · D elements + 1 KB of alignment slack (97 KB
// at D = 128; two blocks fit an SM).
//
// The `_pp` entries ping-pong the two warpgroups (as FlashAttention-3 does): warpgroup 1
// issues a tile's S = Q·Kᵀ only once warpgroup 0's has finished (named barrier 1), so one
// warpgroup's softmax runs while the other's product holds the tensor cores. Without it
// both warpgroups, and the block sharing the SM when its tiles are as long (chunks over
// earlier pages), reach their softmax together and the tensor cores wait.
//
// Without sm_90a (CUDA_COMPUTE_CAP other than 90) the module defines no kernel.
#include "wgmma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define PW_THREADS 256
#define PW_BC 64
#define PW_PER_ROW (PW_THREADS / PW_BC)

// Copies this thread's share (1/PW_PER_ROW) of one K (or V) row into its swizzled place;
// a masked row is zero-filled so that its zero weight never meets a NaN.
template <typename T, int D>
__device__ __forceinline__ void pw_load_part(T* blk, int row, const T* src, int part) {
  constexpr int CH = D / 8 / PW_PER_ROW;  // 16-byte chunks per thread
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int col = (part * CH + c) * 8;
    T* dst = blk + swz(row, col, PW_BC);
    if (src != nullptr)
      cp_async16(dst, src + col);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int D, bool PP>
__device__ __forceinline__ void pw_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const T* __restrict__ pool, const u32* __restrict__ pages,
                                        const u32* __restrict__ kv_limit, const u32* __restrict__ tiles,
                                        float* __restrict__ out, int hq, int hkv, int s_count, int n, int p,
                                        u32 slots, float scale_log2, u64 lse_off) {
  constexpr int CB = D / 64;  // 64-column blocks
  constexpr int QE = SPIN_PREFILL_ROWS * D, KE = PW_BC * D;  // elements of Q and of one K/V stage
  extern __shared__ unsigned char pw_raw[];
  T* qs = reinterpret_cast<T*>(pw_raw + ((1024u - (smem_addr(pw_raw) & 1023u)) & 1023u));
  T* ks = qs + QE;      // stages 0, 1
  T* vs = ks + 2 * KE;  // stages 0, 1
  __shared__ u32 kpos[2][PW_BC];

  const TileView<T> tv = tile_view<T, D>(tiles, pages, kv_limit, k, v, hq, hkv, s_count, n, p);
  if (!tv.ok) return;
  const int h = tv.h, g = tv.g;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2, r = lane >> 2, tig = lane & 3;
  // This thread's two query rows in the tile: warpgroup rows 16·(warp mod 4) + r (+ 8).
  const int row_base = wg * 64 + (warp & 3) * 16 + r;

  // Q rows into shared memory (row rr = (token rr / g, head rr % g); dead rows zero).
  for (int i = tid; i < SPIN_PREFILL_ROWS * (D / 8); i += PW_THREADS) {
    const int rr = i / (D / 8), c = (i % (D / 8)) * 8;
    const int tok = rr / g, j = rr % g;
    T* dst = qs + swz(rr, c, SPIN_PREFILL_ROWS);
    if (tok < (int)tv.ntok)
      cp_async16(dst, q + (((size_t)tv.row0 + tv.tok0 + tok) * hq + (size_t)h * g + j) * D + c);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  u32 qpos[2];
  bool live[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = (row_base + 8 * i) / g;
    live[i] = tok < (int)tv.ntok;
    qpos[i] = live[i] ? tv.qmin + (u32)tok : 0u;
  }

  float o[CB][32];
#pragma unroll
  for (int b = 0; b < CB; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[b][i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // Loader role: thread tid copies part (tid % PW_PER_ROW) of virtual row tid / PW_PER_ROW
  // of each tile, K and V together; the return says whether that row needs a mask.
  const int lrow = tid / PW_PER_ROW, lpart = tid % PW_PER_ROW;
  const int ntiles = (tv.nkeys + PW_BC - 1) / PW_BC;
  auto issue = [&](int t, int st) -> int {
    const KeyRow<T> kr = key_row<T, D>(t * PW_BC + lrow, tv.npre, tv.nown, tv.list, pool, tv.kown, tv.vown, p,
                                       slots, tv.limit, tv.start, tv.own_stride);
    pw_load_part<T, D>(ks + st * KE, lrow, kr.k, lpart);
    pw_load_part<T, D>(vs + st * KE, lrow, kr.v, lpart);
    if (lpart == 0) kpos[st][lrow] = kr.pos;
    return kr.pos == PF_INVALID || kr.pos > tv.qmin;
  };
  int bad = issue(0, 0);
  cp_async_commit();  // Q and the first tile

  const u32 qaddr = smem_addr(qs) + (u32)(wg * 64 * 64 * sizeof(T));
  for (int t = 0; t < ntiles; ++t) {
    const int st = t & 1;
    int bad_next = 0;
    if (t + 1 < ntiles) bad_next = issue(t + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait_one();
    // cp.async and zero-fill stores are generic-proxy writes; the tensor cores read
    // through the async proxy.
    proxy_fence();
    const bool masked = __syncthreads_or(bad);
    bad = bad_next;

    // S = Q·Kᵀ over this tile's 64 keys.
    float s[32];
    if (PP && wg == 1) named_bar_sync(1, PW_THREADS);
    reg_fence<32>(s);
    wg_fence();
    pw_qk<T, D>(s, qaddr, SPIN_PREFILL_ROWS, smem_addr(ks + st * KE));
    wg_commit();
    wg_wait0();
    reg_fence<32>(s);
    if (PP && wg == 0) named_bar_arrive(1, PW_THREADS);
    float corr[2];
    pw_softmax(s, masked, kpos[st], qpos, tig, scale_log2, m, l, corr);
    pw_rescale<CB>(o, corr);
    // O += P·V.
    u32 pa[4][4];
    pw_pack<T>(s, pa);
#pragma unroll
    for (int b = 0; b < CB; ++b) reg_fence<32>(o[b]);
    wg_fence();
    pw_pv<T, CB>(o, pa, smem_addr(vs + st * KE));
    wg_commit();
    wg_wait0();
#pragma unroll
    for (int b = 0; b < CB; ++b) reg_fence<32>(o[b]);
    // Every warp is done with this stage before the next iteration refills it.
    __syncthreads();
  }

  pw_store<D>(o, m, l, live, row_base, tig, g, h, hq, (size_t)tv.row0 + tv.tok0, out, lse_off);
}

#define PREFILL_WGMMA_KERNEL(NAME, T, D, PP)                                                                  \
  extern "C" __global__ void __launch_bounds__(PW_THREADS, 2) NAME(                                            \
      const T* q, const T* k, const T* v, const T* pool, const u32* pages, const u32* kv_limit,             \
      const u32* tiles, float* out, int hq, int hkv, int s_count, int n, int p, u32 slots, float scale_log2, \
      u64 lse_off) {                                                                                        \
    pw_impl<T, D, PP>(q, k, v, pool, pages, kv_limit, tiles, out, hq, hkv, s_count, n, p, slots, scale_log2, \
                      lse_off);                                                                              \
  }

PREFILL_WGMMA_KERNEL(prefill_wgmma_bf16_d64, __nv_bfloat16, 64, false)
PREFILL_WGMMA_KERNEL(prefill_wgmma_bf16_d128, __nv_bfloat16, 128, false)
PREFILL_WGMMA_KERNEL(prefill_wgmma_f16_d64, __half, 64, false)
PREFILL_WGMMA_KERNEL(prefill_wgmma_f16_d128, __half, 128, false)
PREFILL_WGMMA_KERNEL(prefill_wgmma_pp_bf16_d64, __nv_bfloat16, 64, true)
PREFILL_WGMMA_KERNEL(prefill_wgmma_pp_bf16_d128, __nv_bfloat16, 128, true)
PREFILL_WGMMA_KERNEL(prefill_wgmma_pp_f16_d64, __half, 64, true)
PREFILL_WGMMA_KERNEL(prefill_wgmma_pp_f16_d128, __half, 128, true)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
