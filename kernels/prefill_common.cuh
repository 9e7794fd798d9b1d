// spinkv CUDA kernels: what the two prefill attention kernels share (prefill.cu,
// mma.sync; prefill_wgmma.cu, Hopper's wgmma): cp.async copies into shared memory and
// the walk over a tile's "virtual key rows" (its list's pages, then the chunk's own
// tokens). Launch glue: src/ops/cuda/prefill.rs.
#pragma once
#include "common.cuh"

// A masked virtual key row's position.
#define PF_INVALID 0xffffffffu
#define PF_LN2 0.69314718055994530942f

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Where one virtual key row lives, and its position (PF_INVALID: masked, zero-filled).
template <typename T>
struct KeyRow {
  const T* k;
  const T* v;
  u32 pos;
};

// Virtual key row vk of a tile: the list's entries first (P rows each: key position
// lp·P + r, visible iff the slot is not NONE and below `slots` and the position is below
// `limit`), then the chunk's own tokens (position start + i).
template <typename T, int D>
__device__ __forceinline__ KeyRow<T> key_row(int vk, int npre, int nown, const u32* __restrict__ list,
                                             const T* __restrict__ pool, const T* __restrict__ kown,
                                             const T* __restrict__ vown, int p, u32 slots, u64 limit, u32 start,
                                             size_t own_stride) {
  KeyRow<T> kr{nullptr, nullptr, PF_INVALID};
  if (vk < npre) {
    const int e = vk / p, r = vk - e * p;
    const u32 slot = list[2 * e], lp = list[2 * e + 1];
    const u64 pos = (u64)lp * (u64)p + (u64)r;
    if (slot != SPIN_NONE && slot < slots && pos < limit) {
      kr.k = pool + ((size_t)slot * 2 * p + r) * D;
      kr.v = kr.k + (size_t)p * D;
      kr.pos = (u32)pos;
    }
  } else if (vk - npre < nown) {
    const int i = vk - npre;
    kr.k = kown + (size_t)i * own_stride;
    kr.v = vown + (size_t)i * own_stride;
    kr.pos = start + (u32)i;
  }
  return kr;
}

// A block's tile (block = (tile, KV head): tile blockIdx.x / hkv, head h = blockIdx.x %
// hkv): its description (SPIN_PREFILL_TILE_WORDS u32: seq, row0, start, tok0, ntok,
// nlist) and what follows from it for head h. `ok` is false for a tile without tokens or
// with more (token, head) rows than a block holds: the block then writes nothing.
template <typename T>
struct TileView {
  bool ok;
  int h, g;
  u32 seq, row0, start, tok0, ntok;
  int npre, nown, nkeys;
  u64 limit;
  const u32* list;
  const T* kown;
  const T* vown;
  size_t own_stride;
  u32 qmin;
};

template <typename T, int D>
__device__ __forceinline__ TileView<T> tile_view(const u32* __restrict__ tiles, const u32* __restrict__ pages,
                                                 const u32* __restrict__ kv_limit, const T* __restrict__ k,
                                                 const T* __restrict__ v, int hq, int hkv, int s_count, int n,
                                                 int p) {
  TileView<T> tv;
  const int h = blockIdx.x % hkv;
  const u32* tw = tiles + (size_t)(blockIdx.x / hkv) * SPIN_PREFILL_TILE_WORDS;
  tv.h = h, tv.g = hq / hkv;
  tv.seq = tw[0], tv.row0 = tw[1], tv.start = tw[2], tv.tok0 = tw[3], tv.ntok = tw[4];
  tv.ok = tv.ntok != 0 && (int)tv.ntok * tv.g <= SPIN_PREFILL_ROWS;
  const bool seq_ok = tv.seq < (u32)s_count;
  const int nlist = seq_ok ? min((int)tw[5], n) : 0;
  tv.limit = seq_ok ? (u64)kv_limit[tv.seq] : 0;
  tv.list = pages + ((size_t)(seq_ok ? tv.seq : 0) * hkv + h) * (size_t)n * 2;
  tv.npre = nlist * p;
  tv.nown = (int)(tv.tok0 + tv.ntok);
  tv.nkeys = tv.npre + tv.nown;
  tv.own_stride = (size_t)hkv * D;
  tv.kown = k + (size_t)tv.row0 * tv.own_stride + (size_t)h * D;
  tv.vown = v + (size_t)tv.row0 * tv.own_stride + (size_t)h * D;
  tv.qmin = tv.start + tv.tok0;
  return tv;
}
