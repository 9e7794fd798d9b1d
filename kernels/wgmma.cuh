// spinkv CUDA kernels: Hopper's warpgroup tensor-core instructions (wgmma, sm_90a) as the
// prefill kernel uses them (prefill_wgmma.cu): m64n64k16 with f32
// accumulators, the fences around the asynchronous instructions, shared-memory matrix
// descriptors of 128-byte-swizzled operands, the swizzled element offset, and the steps
// of one 64-key tile (S = Q·Kᵀ, mask and online softmax, P, O += P·V, the store).
#pragma once
#include "prefill_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

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
// Named barrier `id` over `n` threads: sync waits for all n, arrive counts itself and goes on.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
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

// The mask and online softmax of one 64-key tile of S (log2 units), on this thread's
// accumulators s[4j + c] (row r + 8·(c / 2), key 8j + 2·tig + c mod 2, j < 8):
// keys whose position `kp[key]` is PF_INVALID or after the row's `qpos` are masked where
// `masked`. Leaves exp2 of the scaled scores in s, updates the running max m and the
// per-thread partial sum l of both rows, and returns in corr the factor the rows'
// earlier output must be scaled by.
__device__ __forceinline__ void pw_softmax(float* s, bool masked, const u32* kp, const u32* qpos, int tig,
                                           float scale_log2, float* m, float* l, float* corr) {
  constexpr int NJ = 8;
  if (masked) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const u32 k = kp[8 * j + 2 * tig + (c & 1)];
        if (k == PF_INVALID || k > qpos[c >> 1]) s[4 * j + c] = -INFINITY;
      }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
    const float m_new = fmaxf(m[i], mx * scale_log2);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    corr[i] = fast_exp2(m[i] - m_use);
    m[i] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      s[4 * j + 2 * i] = fast_exp2(fmaf(s[4 * j + 2 * i], scale_log2, -m_use));
      s[4 * j + 2 * i + 1] = fast_exp2(fmaf(s[4 * j + 2 * i + 1], scale_log2, -m_use));
      sum += s[4 * j + 2 * i] + s[4 * j + 2 * i + 1];
    }
    l[i] = l[i] * corr[i] + sum;
  }
}

// Scales both of this thread's rows of the output accumulators o[CB][32].
template <int CB>
__device__ __forceinline__ void pw_rescale(float (*o)[32], const float* corr) {
#pragma unroll
  for (int b = 0; b < CB; ++b)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      o[b][4 * j] *= corr[0];
      o[b][4 * j + 1] *= corr[0];
      o[b][4 * j + 2] *= corr[1];
      o[b][4 * j + 3] *= corr[1];
    }
}

// P as the A fragments of O += P·V: k-step kk < 4 covers keys 16kk..16kk + 15 (S
// columns j = 2kk, 2kk + 1; the accumulator layout is the A-fragment layout).
template <typename T>
__device__ __forceinline__ void pw_pack(const float* s, u32 (*pa)[4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) pa[kk][e] = Mma<T>::pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
}

// Issues O += P·V over one 64-key V tile (swizzled [64][64] blocks at shared address
// vaddr): 4 k-steps × CB column blocks, P from registers, V MN-major.
template <typename T, int CB>
__device__ __forceinline__ void pw_pv(float (*o)[32], const u32 (*pa)[4], u32 vaddr) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int b = 0; b < CB; ++b)
      Wgmma<T>::rs_t(o[b], pa[kk], sdesc(vaddr + (u32)((b * 64 * 64 + kk * 16 * 64) * sizeof(T))));
}

// Issues S = Q·Kᵀ over one 64-key K tile: D / 16 k-steps, Q (swizzled [rows_q][64]
// blocks from shared address qaddr) and K (swizzled [64][64] blocks at kaddr) both
// K-major; k-step kk reads column block kk / 4, 32 bytes further a step.
template <typename T, int D>
__device__ __forceinline__ void pw_qk(float* s, u32 qaddr, int rows_q, u32 kaddr) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    Wgmma<T>::ss(s, sdesc(qaddr + (u32)((kk >> 2) * rows_q * 64 * sizeof(T)) + (u32)((kk & 3) * 32)),
                 sdesc(kaddr + (u32)((kk >> 2) * 64 * 64 * sizeof(T)) + (u32)((kk & 3) * 32)), kk > 0);
}

// Normalizes and stores this thread's two rows (tile rows row_base and row_base + 8) of
// the output [T, Hq, D] f32 and their lse (at out + lse_off, natural log).
template <int D>
__device__ __forceinline__ void pw_store(float (*o)[32], const float* m, const float* l, const bool* live,
                                         int row_base, int tig, int g, int h, int hq, size_t tok_base,
                                         float* __restrict__ out, u64 lse_off) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lt = l[i];
    lt += __shfl_xor_sync(FULL_MASK, lt, 1);
    lt += __shfl_xor_sync(FULL_MASK, lt, 2);
    if (!live[i]) continue;
    const int rr = row_base + 8 * i;
    const int tok = rr / g, j = rr % g;
    const size_t qrow = (tok_base + tok) * hq + (size_t)h * g + j;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    float* orow = out + qrow * D;
#pragma unroll
    for (int b = 0; b < D / 64; ++b)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
        *reinterpret_cast<float2*>(orow + b * 64 + jj * 8 + 2 * tig) =
            make_float2(o[b][4 * jj + 2 * i] * inv, o[b][4 * jj + 2 * i + 1] * inv);
    if (tig == 0) out[lse_off + qrow] = lt > 0.f ? (m[i] + log2f(lt)) * PF_LN2 : SPIN_EMPTY_LSE;
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
