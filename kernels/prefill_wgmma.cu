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
// Without sm_90a (CUDA_COMPUTE_CAP other than 90) the module defines no kernel.
#include "prefill_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define PW_THREADS 256
#define PW_BC 64
#define PW_PER_ROW (PW_THREADS / PW_BC)

// The 32 accumulator operands of an m64n64 wgmma, and their constraints.
#define PW_D32 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PW_ACC32(d) \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// wgmma m64n64k16 with f32 accumulators d[32]: `ss` reads A and B through shared-memory
// descriptors (both K-major; acc = 0 overwrites d), `rs_t` takes A from registers and B
// MN-major (transposed), accumulating.
template <typename T>
struct Wgmma;
#define PW_WGMMA(T, TY)                                                                         \
  template <>                                                                                   \
  struct Wgmma<T> {                                                                             \
    static __device__ __forceinline__ void ss(float* d, u64 da, u64 db, int acc) {              \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                  \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " PW_D32           \
                   ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                            \
                   : PW_ACC32(d)                                                                \
                   : "l"(da), "l"(db), "r"(acc));                                               \
    }                                                                                           \
    static __device__ __forceinline__ void rs_t(float* d, const u32* a, u64 db) {               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                  \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " PW_D32           \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                              \
                   : PW_ACC32(d)                                                                \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));              \
    }                                                                                           \
  };
PW_WGMMA(__nv_bfloat16, "bf16")
PW_WGMMA(__half, "f16")

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of accumulator registers across the
// asynchronous wgmma (which writes them after its asm statement returns).
template <int N>
__device__ __forceinline__ void reg_fence(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory matrix descriptor of a 128-byte-swizzled operand at shared address `a`:
// 8-row groups 1024 bytes apart (the stride offset; also given as the leading offset,
// which these shapes do not use), swizzle mode 1 (128 bytes).
__device__ __forceinline__ u64 sdesc(u32 a) {
  return (u64)((a & 0x3ffffu) >> 4) | ((u64)(1024 >> 4) << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

// Element offset of (row, col) in swizzled [rows][64] blocks, `rows` rows per block.
__device__ __forceinline__ int swz(int row, int col, int rows) {
  return (col >> 6) * rows * 64 + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

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

template <typename T, int D>
__device__ __forceinline__ void pw_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const T* __restrict__ pool, const u32* __restrict__ pages,
                                        const u32* __restrict__ kv_limit, const u32* __restrict__ tiles,
                                        float* __restrict__ out, int hq, int hkv, int s_count, int n, int p,
                                        u32 slots, float scale_log2, u64 lse_off) {
  constexpr int CB = D / 64;  // 64-column blocks
  constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
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
    const u32 kaddr = smem_addr(ks + st * KE);
    reg_fence<32>(s);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)  // columns 16kk..16kk + 15: block kk / 4, 32 bytes a step
      Wgmma<T>::ss(s, sdesc(qaddr + (u32)((kk >> 2) * SPIN_PREFILL_ROWS * 64 * sizeof(T)) + (u32)((kk & 3) * 32)),
                   sdesc(kaddr + (u32)((kk >> 2) * PW_BC * 64 * sizeof(T)) + (u32)((kk & 3) * 32)), kk > 0);
    wg_commit();
    wg_wait0();
    reg_fence<32>(s);

    // s[4j + c]: row r + 8·(c / 2), key 8j + 2·tig + c mod 2.
    if (masked) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const u32 kp = kpos[st][8 * j + 2 * tig + (c & 1)];
          if (kp == PF_INVALID || kp > qpos[c >> 1]) s[4 * j + c] = -INFINITY;
        }
    }
    // Online softmax (log2 units) per row; l stays a per-thread partial sum.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
      const float m_new = fmaxf(m[i], mx * scale_log2);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float corr = fast_exp2(m[i] - m_use);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[4 * j + 2 * i] = fast_exp2(fmaf(s[4 * j + 2 * i], scale_log2, -m_use));
        s[4 * j + 2 * i + 1] = fast_exp2(fmaf(s[4 * j + 2 * i + 1], scale_log2, -m_use));
        sum += s[4 * j + 2 * i] + s[4 * j + 2 * i + 1];
      }
      l[i] = l[i] * corr + sum;
#pragma unroll
      for (int b = 0; b < CB; ++b)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          o[b][4 * j + 2 * i] *= corr;
          o[b][4 * j + 2 * i + 1] *= corr;
        }
    }
    // O += P·V: k-step kk covers keys 16kk..16kk+15 (S columns j = 2kk, 2kk + 1).
    u32 pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    const u32 vaddr = smem_addr(vs + st * KE);
#pragma unroll
    for (int b = 0; b < CB; ++b) reg_fence<32>(o[b]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int b = 0; b < CB; ++b)
        Wgmma<T>::rs_t(o[b], pa[kk], sdesc(vaddr + (u32)((b * PW_BC * 64 + kk * 16 * 64) * sizeof(T))));
    wg_commit();
    wg_wait0();
#pragma unroll
    for (int b = 0; b < CB; ++b) reg_fence<32>(o[b]);
    // Every warp is done with this stage before the next iteration refills it.
    __syncthreads();
  }

  // Normalize and store this thread's rows.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lt = l[i];
    lt += __shfl_xor_sync(FULL_MASK, lt, 1);
    lt += __shfl_xor_sync(FULL_MASK, lt, 2);
    if (!live[i]) continue;
    const int rr = row_base + 8 * i;
    const int tok = rr / g, j = rr % g;
    const size_t qrow = ((size_t)tv.row0 + tv.tok0 + tok) * hq + (size_t)h * g + j;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    float* orow = out + qrow * D;
#pragma unroll
    for (int b = 0; b < CB; ++b)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
        *reinterpret_cast<float2*>(orow + b * 64 + jj * 8 + 2 * tig) =
            make_float2(o[b][4 * jj + 2 * i] * inv, o[b][4 * jj + 2 * i + 1] * inv);
    if (tig == 0) out[lse_off + qrow] = lt > 0.f ? (m[i] + log2f(lt)) * PF_LN2 : SPIN_EMPTY_LSE;
  }
}

#define PREFILL_WGMMA_KERNEL(NAME, T, D)                                                                    \
  extern "C" __global__ void __launch_bounds__(PW_THREADS, 2) NAME(                                            \
      const T* q, const T* k, const T* v, const T* pool, const u32* pages, const u32* kv_limit,             \
      const u32* tiles, float* out, int hq, int hkv, int s_count, int n, int p, u32 slots, float scale_log2, \
      u64 lse_off) {                                                                                        \
    pw_impl<T, D>(q, k, v, pool, pages, kv_limit, tiles, out, hq, hkv, s_count, n, p, slots, scale_log2,     \
                  lse_off);                                                                                 \
  }

PREFILL_WGMMA_KERNEL(prefill_wgmma_bf16_d64, __nv_bfloat16, 64)
PREFILL_WGMMA_KERNEL(prefill_wgmma_bf16_d128, __nv_bfloat16, 128)
PREFILL_WGMMA_KERNEL(prefill_wgmma_f16_d64, __half, 64)
PREFILL_WGMMA_KERNEL(prefill_wgmma_f16_d128, __half, 128)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
