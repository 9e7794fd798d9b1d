// spinkv CUDA kernels: fused model ops of the decoder layers. add_rms_norm (the residual
// add and the RMSNorm that follows it, one block per row; add_rms_norm_vec with 16-byte
// accesses), silu_mul (SwiGLU's
// silu(gate) * up over a fused [T, 2I] projection) and rope_qkv (RoPE of q and k plus
// contiguous copies of q, k, v), and rope_tables (RoPE tables from positions). Launch glue: src/ops/cuda/model_ops.rs. CPU references:
// src/ops/model_ops.rs and src/ops/rope.rs (the same roundings, in the same order).
#include "common.cuh"

__device__ __forceinline__ float round_to(float x, float*) { return x; }
__device__ __forceinline__ float round_to(float x, __half*) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float round_to(float x, __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(x)); }

// One block per row of x [rows, cols]: s = x + delta rounded to T (s = x when delta is
// null), written to sum (when not null); norm = T(s * rsqrt(mean(s^2) + eps) * alpha).
// Two passes over the row (the second re-reads x and delta, from cache).
template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ alpha,
                             T* __restrict__ sum, T* __restrict__ norm, int cols, float eps) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dr = delta ? delta + row * cols : nullptr;
  T* tag = nullptr;
  float sq = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float s = to_f32(xr[c]);
    if (dr) s = round_to(s + to_f32(dr[c]), tag);
    if (sum) store(sum + row * cols + c, s);
    sq += s * s;
  }
  __shared__ float part[32];
  const float scale = rsqrtf(block_reduce(sq, false, part) / (float)cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float s = to_f32(xr[c]);
    if (dr) s = round_to(s + to_f32(dr[c]), tag);
    store(norm + row * cols + c, s * scale * to_f32(alpha[c]));
  }
}

// The same op with 16-byte loads and stores (V = 16 / sizeof(T) elements per chunk;
// cols % V == 0 and every pointer 16-byte aligned, checked by the launch glue): each
// thread holds up to RN_CHUNKS chunks of its row in registers, so the row is read once
// and every load of a thread is in flight together (the scalar loop above waits for one
// load per element). Rows of at most RN_CHUNKS * blockDim.x * V elements.
#define RN_CHUNKS 4
template <typename T>
__device__ void add_rms_norm_vec(const T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ alpha,
                                 T* __restrict__ sum, T* __restrict__ norm, int cols, float eps) {
  constexpr int V = 16 / sizeof(T);
  const size_t row = blockIdx.x;
  const int chunks = cols / V;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * cols);
  const uint4* dr = delta ? reinterpret_cast<const uint4*>(delta + row * cols) : nullptr;
  T* tag = nullptr;
  float s[RN_CHUNKS][V];
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < RN_CHUNKS; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    if (c >= chunks) continue;
    const uint4 xv = xr[c];
    const uint4 dv = dr ? dr[c] : make_uint4(0, 0, 0, 0);
    const T* xe = reinterpret_cast<const T*>(&xv);
    const T* de = reinterpret_cast<const T*>(&dv);
    uint4 sv;
    T* se = reinterpret_cast<T*>(&sv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = to_f32(xe[j]);
      if (dr) v = round_to(v + to_f32(de[j]), tag);
      s[k][j] = v;
      sq += v * v;
      store(se + j, v);
    }
    if (sum) reinterpret_cast<uint4*>(sum + row * cols)[c] = sv;
  }
  __shared__ float part[32];
  const float scale = rsqrtf(block_reduce(sq, false, part) / (float)cols + eps);
  const uint4* ar = reinterpret_cast<const uint4*>(alpha);
#pragma unroll
  for (int k = 0; k < RN_CHUNKS; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    if (c >= chunks) continue;
    const uint4 av = ar[c];
    const T* ae = reinterpret_cast<const T*>(&av);
    uint4 nv;
    T* ne = reinterpret_cast<T*>(&nv);
#pragma unroll
    for (int j = 0; j < V; ++j) store(ne + j, s[k][j] * scale * to_f32(ae[j]));
    reinterpret_cast<uint4*>(norm + row * cols)[c] = nv;
  }
}

// out[t, i] = T(T(silu(gu[t, i])) * gu[t, inter + i]) for gu [rows, 2 * inter]. 16-bit
// types with inter a multiple of 8 and 16-byte aligned pointers take 8 elements a thread
// in 16-byte accesses; the rest one element a thread.
template <typename T>
__device__ __forceinline__ float silu_mul1(float g, float u) {
  T* tag = nullptr;
  return round_to(g / (1.f + expf(-g)), tag) * u;
}
template <typename T>
__device__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int rows, int inter) {
  const size_t step = (size_t)gridDim.x * blockDim.x, first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if constexpr (sizeof(T) == 2) {
    const u32 per_row = (u32)inter / 8;
    const size_t n8 = (size_t)rows * per_row;
    if ((inter & 7) == 0 && ((reinterpret_cast<size_t>(gu) | reinterpret_cast<size_t>(out)) & 15) == 0 &&
        n8 <= 0xffffffffull) {
      for (size_t k = first; k < n8; k += step) {
        const u32 t = (u32)k / per_row, i = ((u32)k - t * per_row) * 8;
        const T* g = gu + (size_t)t * 2 * inter + i;
        const uint4 gv = *reinterpret_cast<const uint4*>(g);
        const uint4 uv = *reinterpret_cast<const uint4*>(g + inter);
        const T* ge = reinterpret_cast<const T*>(&gv);
        const T* ue = reinterpret_cast<const T*>(&uv);
        uint4 ov;
        T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
        for (int j = 0; j < 8; ++j) store(oe + j, silu_mul1<T>(to_f32(ge[j]), to_f32(ue[j])));
        *reinterpret_cast<uint4*>(out + k * 8) = ov;
      }
      return;
    }
  }
  const size_t n = (size_t)rows * inter;
  for (size_t k = first; k < n; k += step) {
    const size_t t = k / inter, i = k % inter;
    store(out + k, silu_mul1<T>(to_f32(gu[t * 2 * inter + i]), to_f32(gu[t * 2 * inter + inter + i])));
  }
}

// Blocks (t, y): token t's (head, i) pairs y·blockDim.x + threadIdx.x, strided by
// blockDim.x·gridDim.y (the launch gives every pair a thread of its own, so a decode
// step's few tokens do not wait on a loop of dependent loads): rotate-half RoPE of q's
// and k's heads and a copy of v's, into
// out = [q_rot [T, hq, d] | k_rot [T, hkv, d] | v [T, hkv, d]]. Inputs are strided
// (row stride, head stride; the last dimension is dense). Products and sums are rounded
// separately (no FMA contraction), as the CPU reference computes them.
template <typename T>
__device__ void rope_qkv(const T* __restrict__ q, long long qs0, long long qs1, const T* __restrict__ k,
                         long long ks0, long long ks1, const T* __restrict__ v, long long vs0, long long vs1,
                         const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out, int rows,
                         int hq, int hkv, int d) {
  const int t = blockIdx.x, half = d / 2, heads = hq + 2 * hkv;
  const size_t nq = (size_t)rows * hq * d, nk = (size_t)rows * hkv * d;
  for (int w = blockIdx.y * blockDim.x + threadIdx.x; w < heads * half; w += blockDim.x * gridDim.y) {
    const int h = w / half, i = w % half;
    const T* src;
    size_t dst;
    bool rotate = true;
    if (h < hq) {
      src = q + t * qs0 + h * qs1;
      dst = ((size_t)t * hq + h) * d;
    } else if (h < hq + hkv) {
      src = k + t * ks0 + (h - hq) * ks1;
      dst = nq + ((size_t)t * hkv + (h - hq)) * d;
    } else {
      src = v + t * vs0 + (h - hq - hkv) * vs1;
      dst = nq + nk + ((size_t)t * hkv + (h - hq - hkv)) * d;
      rotate = false;
    }
    const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
    if (rotate) {
      const float c = to_f32(cos[(size_t)t * half + i]), s = to_f32(sin[(size_t)t * half + i]);
      store(out + dst + i, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
      store(out + dst + i + half, __fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c)));
    } else {
      store(out + dst + i, x1);
      store(out + dst + i + half, x2);
    }
  }
}

// RoPE tables from positions: out [2, b, half] (cosines, then sines) of angle
// pos[r] * theta^(-2i / (2 half)), computed in f64, rounded to f32, then to T (the CPU
// reference's roundings: src/ops/rope_tables.rs). One thread per (row, i).
template <typename T>
__device__ void rope_tables(const u32* __restrict__ pos, T* __restrict__ out, int b, int half, double theta) {
  const int n = b * half;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
    const int r = j / half, i = j % half;
    const double inv = 1.0 / pow(theta, 2.0 * i / (double)(2 * half));
    double s, c;
    sincos((double)pos[r] * inv, &s, &c);
    store(out + j, (float)c);
    store(out + n + j, (float)s);
  }
}

#define MODEL_OPS(T, SUFFIX)                                                                          \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* delta, const T* alpha, T* sum, \
                                                   T* norm, int cols, float eps) {                     \
    add_rms_norm<T>(x, delta, alpha, sum, norm, cols, eps);                                            \
  }                                                                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                                 \
      add_rms_norm_vec_##SUFFIX(const T* x, const T* delta, const T* alpha, T* sum, T* norm, int cols,  \
                                float eps) {                                                           \
    add_rms_norm_vec<T>(x, delta, alpha, sum, norm, cols, eps);                                            \
  }                                                                                                    \
  extern "C" __global__ void silu_mul_##SUFFIX(const T* gu, T* out, int rows, int inter) {            \
    silu_mul<T>(gu, out, rows, inter);                                                                 \
  }                                                                                                    \
  extern "C" __global__ void rope_qkv_##SUFFIX(const T* q, long long qs0, long long qs1, const T* k,  \
                                               long long ks0, long long ks1, const T* v, long long vs0, \
                                               long long vs1, const T* cos, const T* sin, T* out,       \
                                               int rows, int hq, int hkv, int d) {                      \
    rope_qkv<T>(q, qs0, qs1, k, ks0, ks1, v, vs0, vs1, cos, sin, out, rows, hq, hkv, d);               \
  }                                                                                                    \
  extern "C" __global__ void rope_tables_##SUFFIX(const u32* pos, T* out, int b, int half, double theta) { \
    rope_tables<T>(pos, out, b, half, theta);                                                          \
  }

MODEL_OPS(float, f32)
MODEL_OPS(__half, f16)
MODEL_OPS(__nv_bfloat16, bf16)
