// spinkv CUDA kernels: shared helpers (element conversion, sentinels, warp reductions).
// Owned by the CUDA backend (src/ops/cuda/); every .cu file in kernels/ includes this.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned int u32;
typedef unsigned long long u64;

// Every lane of a warp (the mask of full-warp shuffles, ballots and reductions).
#define FULL_MASK 0xffffffffu

// SPIN_NONE (sentinel of every u32 index tensor), SPIN_EMPTY_LSE (log-sum-exp of an
// empty attention row) and SPIN_LEAF_PAGES (pages per page-table leaf): written by
// build.rs from src/ops/kernel_consts.rs, their one source.
#include "spinkv_consts.cuh"

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Stores f32 x as T (round to nearest even).
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// The two 16-bit halves of a packed pair, as f32 (low half = lower index).
__device__ __forceinline__ float lo_f32(u32 w, __nv_bfloat16*) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f32(u32 w, __nv_bfloat16*) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float lo_f32(u32 w, __half*) {
  return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
}
__device__ __forceinline__ float hi_f32(u32 w, __half*) {
  return __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}

// Eight 16-bit elements or four f32 of a 16-byte vector, as f32.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* out);
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& v, float* o) {
  __nv_bfloat16* tag = nullptr;
  o[0] = lo_f32(v.x, tag); o[1] = hi_f32(v.x, tag);
  o[2] = lo_f32(v.y, tag); o[3] = hi_f32(v.y, tag);
  o[4] = lo_f32(v.z, tag); o[5] = hi_f32(v.z, tag);
  o[6] = lo_f32(v.w, tag); o[7] = hi_f32(v.w, tag);
}
template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& v, float* o) {
  __half* tag = nullptr;
  o[0] = lo_f32(v.x, tag); o[1] = hi_f32(v.x, tag);
  o[2] = lo_f32(v.y, tag); o[3] = hi_f32(v.y, tag);
  o[4] = lo_f32(v.z, tag); o[5] = hi_f32(v.z, tag);
  o[6] = lo_f32(v.w, tag); o[7] = hi_f32(v.w, tag);
}
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& v, float* o) {
  o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y);
  o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
}

// 16-byte load that bypasses L1 allocation for streamed data (K/V pages, metadata).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The max (is_max) or sum of every thread's v over the block, returned to every thread.
// blockDim.x is a multiple of 32, at most 1024; sh holds 32 floats of shared memory and
// may be reused by the next call (the leading barrier waits for this call's readers).
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* sh) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(FULL_MASK, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[warp] = v;
  __syncthreads();
  float r = is_max ? -INFINITY : 0.f;
  for (int w = 0; w < warps; ++w) r = is_max ? fmaxf(r, sh[w]) : r + sh[w];
  return r;
}

// Tensor-core mma.sync m16n8k16 with f32 accumulation for the 16-bit storage types, and
// packing of two f32 into one A/B register (low half = lower index).
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
  }
};

