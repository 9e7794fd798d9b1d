// spinkv CUDA kernels: the device LRU (bucketed LRU with per-owner budgets). One round =
// lru_link (one thread per request: per-bucket request lists, the list of buckets with
// requests, reuse tracking, output initialization, resident-count snapshot) then
// lru_resolve (one warp per listed bucket, its lanes holding the ways: the requests in
// request order, exactly as the sequential BucketedLru with the round's snapshot budgets;
// its last block to finish advances the round's clock and number, kept on the device in
// `state`; lru_advance does that for a round of no requests). Plus lru_direct (the round
// of a direct-mapped fast tier), lru_lookup, lru_fast_destinations and lru_invalidate.
// Launch glue: src/ops/cuda/lru.rs. CPU reference: src/ops/lru_resolve.rs.
#include "common.cuh"

typedef long long i64;

// BucketedLru::bucket_of (src/pool/bucketed_lru.rs: bucket_index): Fibonacci hashing.
__device__ __forceinline__ u32 bucket_of(u32 page, u32 buckets) {
  const u64 frac = ((u64)page * 0x9E3779B97F4A7C15ull) >> 32;
  return (u32)((frac * (u64)buckets) >> 32);
}

// FastHomes::slot (src/ops/lru_resolve.rs): ids home_base..home_base+home_count live in
// fast slots home_fast.. for as long as they are allocated (NONE for any other id).
__device__ __forceinline__ u32 fast_home(u32 hs, u32 home_base, u32 home_count, u32 home_fast) {
  return (hs != SPIN_NONE && hs >= home_base && hs - home_base < home_count) ? home_fast + (hs - home_base)
                                                                            : SPIN_NONE;
}

// Adds one per calling thread to *counter with one atomic per group of converged lanes.
__device__ __forceinline__ void count_lanes(unsigned long long* counter) {
  const unsigned m = __activemask();
  if ((int)(threadIdx.x & 31) == __ffs(m) - 1) atomicAdd(counter, (unsigned long long)__popc(m));
}

// Grid-stride over max(n, max_owners). Writes every output row (NONE) and miss_count = 0,
// copies resident -> snapshot, links valid requests into head[bucket] / next[i] and
// counts reuse (atomicExch on last_seen: of duplicate requests in a round, only the
// first sees the previous step, as in the sequential order). A request for an id with a
// fast home is resolved here: its pair, a hit, no link and no reuse tracking.
extern "C" __global__ void lru_link(const u32* __restrict__ host_slots, const u32* __restrict__ logical,
                                    const u32* __restrict__ owners, int n, u32 host_cap, u32 max_owners,
                                    u32 buckets, u32* head, u32* next, u32* last_seen, u32* reuse,
                                    const u32* __restrict__ resident, u32* __restrict__ snapshot,
                                    u32* __restrict__ fast_pairs, u32* __restrict__ ready_pairs,
                                    u32* __restrict__ fetched_pairs, u32* __restrict__ spill_pairs,
                                    u32* __restrict__ tiered_pairs, u32* __restrict__ tiered_src,
                                    u32* __restrict__ misses, u32* __restrict__ miss_count,
                                    u32* state, u32 reuse_steps, u32 home_base,
                                    u32 home_count, u32 home_fast, u64* counters) {
  const u32 step = state[3];
  const int total = max(n, (int)max_owners);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    if (i == 0) miss_count[0] = 0;
    if (i < (int)max_owners) snapshot[i] = resident[i];
    if (i >= n) continue;
    fast_pairs[2 * i] = SPIN_NONE;
    fast_pairs[2 * i + 1] = SPIN_NONE;
    ready_pairs[2 * i] = SPIN_NONE;
    ready_pairs[2 * i + 1] = SPIN_NONE;
    fetched_pairs[2 * i] = SPIN_NONE;
    fetched_pairs[2 * i + 1] = SPIN_NONE;
    spill_pairs[2 * i] = SPIN_NONE;
    spill_pairs[2 * i + 1] = SPIN_NONE;
    tiered_pairs[2 * i] = SPIN_NONE;
    tiered_pairs[2 * i + 1] = SPIN_NONE;
    tiered_src[i] = SPIN_NONE;
    misses[2 * i] = SPIN_NONE;
    misses[2 * i + 1] = SPIN_NONE;
    const u32 hs = host_slots[i], o = owners[i];
    if (hs == SPIN_NONE || o >= max_owners) continue;  // the CPU fails on a bad owner
    const u32 home = fast_home(hs, home_base, home_count, home_fast);
    if (home != SPIN_NONE) {
      fast_pairs[2 * i] = home;
      fast_pairs[2 * i + 1] = logical[i];
      ready_pairs[2 * i] = home;
      ready_pairs[2 * i + 1] = logical[i];
      tiered_pairs[2 * i] = home;
      tiered_pairs[2 * i + 1] = logical[i];
      count_lanes((unsigned long long*)&counters[0]);
      continue;
    }
    if (hs >= host_cap) continue;  // the CPU fails here
    if (reuse_steps != 0) {
      const u32 prev = atomicExch(&last_seen[hs], step);
      if (prev != 0 && prev != step && step - prev <= reuse_steps) atomicAdd(&reuse[o], 1u);
    }
    const u32 b = bucket_of(hs, buckets);
    const u32 prev = atomicExch(&head[b], (u32)i);
    next[i] = prev;
    // The first request of a bucket puts the bucket on the round's active list
    // (next[n..], counted in state[5]): lru_resolve visits only those.
    if (prev == SPIN_NONE) next[n + atomicAdd(&state[5], 1u)] = b;
  }
}

// The round's clock and number live on the device, in `state` = [clock low, clock high,
// last round, step, blocks done, active buckets] (the step is written by the host once
// per step): a
// captured round reads them at replay, not the values of the capture. A round uses the
// clock as it is and the number last round + 1 (as the host's reference does); one
// thread then advances them: clock += n, last round += 1. In a round with requests the
// last block of lru_resolve to finish does it (every block read them at its start; the
// blocks-done counter is reset for the next round); lru_advance does it for a round of
// none.
__device__ __forceinline__ void advance_round(u32* state, u32 n) {
  const u64 clock = (((u64)state[1] << 32) | (u64)state[0]) + (u64)n;
  state[0] = (u32)clock;
  state[1] = (u32)(clock >> 32);
  state[2] += 1u;
}

extern "C" __global__ void lru_advance(u32* state, u32 n) {
  if (blockIdx.x == 0 && threadIdx.x == 0) advance_round(state, n);
}

// Lane `lane` of a bucket's warp holds way `lane` (< ways <= 32) of the bucket in
// registers for the whole round: its tag, owner, stamp, replacement class (0 empty, 1
// owner at or over its budget by the round's snapshot, 2 other) and whether this round
// pinned it. Each request is then a ballot (hit) or two warp reductions (victim),
// instead of a thread walking every way through memory.
struct WayState {
  u32 tag, owner, pinned_before;
  i64 stamp;
  u32 cls;
  bool pinned_now, active;
};

__device__ __forceinline__ u32 class_of(u32 owner, const u32* __restrict__ budgets,
                                        const u32* __restrict__ snapshot) {
  const u32 bud = budgets[owner];
  return (bud != 0xffffffffu && snapshot[owner] >= bud) ? 1u : 2u;
}


__device__ __forceinline__ i64 warp_min_i64(i64 v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = min(v, (i64)__shfl_xor_sync(FULL_MASK, (long long)v, off));
  return v;
}

// Outputs of one round, and its counters (kept by lane 0).
struct RoundOut {
  u32 *fast_pairs, *ready_pairs, *fetched_pairs, *spill_pairs, *tiered_pairs, *tiered_src, *misses, *miss_count,
      *resident;
  const u32 *budgets, *snapshot;
  u64 hits, miss, deferred;
};

// Resolves request i (uniform across the warp) exactly as the sequential reference:
// hit, else the victim among unpinned ways minimizing (class, stamp), ties to the lower
// way, else deferred.
__device__ __forceinline__ void resolve_one(WayState& w, RoundOut& o, u32 i, u32 hs, u32 own, u32 lp, i64 stamp,
                                            u32 base, int lane) {
  const unsigned hit_mask = __ballot_sync(FULL_MASK, w.active && w.tag == hs);
  if (hit_mask) {
    if (lane == __ffs(hit_mask) - 1) {
      const u32 slot = base + lane;
      // A slot an earlier request of this round pinned may be fetched in this round:
      // the fused attention reads such a repeat from the host tier.
      const bool repeat = w.pinned_now;
      u32* split = repeat ? o.fetched_pairs : o.ready_pairs;
      split[2 * i] = slot;
      split[2 * i + 1] = lp;
      o.tiered_pairs[2 * i] = repeat ? SPIN_NONE : slot;
      o.tiered_pairs[2 * i + 1] = lp;
      o.tiered_src[i] = repeat ? hs : SPIN_NONE;
      o.fast_pairs[2 * i] = slot;
      o.fast_pairs[2 * i + 1] = lp;
      w.stamp = stamp;
      w.pinned_now = true;
    }
    ++o.hits;
    return;
  }
  const bool eligible = w.active && !w.pinned_now;
  u32 cmin = eligible ? w.cls : 3u;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) cmin = min(cmin, __shfl_xor_sync(FULL_MASK, cmin, off));
  if (cmin == 3u) {
    if (lane == 0) {
      o.spill_pairs[2 * i] = hs;
      o.spill_pairs[2 * i + 1] = lp;
      o.tiered_pairs[2 * i + 1] = lp;
      o.tiered_src[i] = hs;
    }
    ++o.deferred;
    return;
  }
  const bool in_class = eligible && w.cls == cmin;
  const i64 smin = warp_min_i64(in_class ? w.stamp : (i64)0x7fffffffffffffffll);
  const unsigned vm = __ballot_sync(FULL_MASK, in_class && w.stamp == smin);
  if (lane == __ffs(vm) - 1) {
    const u32 slot = base + lane;
    if (w.tag != SPIN_NONE) atomicSub(&o.resident[w.owner], 1u);
    w.tag = hs;
    w.owner = own;
    w.cls = class_of(own, o.budgets, o.snapshot);
    atomicAdd(&o.resident[own], 1u);
    w.stamp = stamp;
    w.pinned_now = true;
    o.fast_pairs[2 * i] = slot;
    o.fast_pairs[2 * i + 1] = lp;
    o.fetched_pairs[2 * i] = slot;
    o.fetched_pairs[2 * i + 1] = lp;
    o.tiered_pairs[2 * i] = slot;
    o.tiered_pairs[2 * i + 1] = lp;
    o.tiered_src[i] = hs;
    const u32 k = atomicAdd(o.miss_count, 1u);
    o.misses[2 * k] = hs;
    o.misses[2 * k + 1] = slot;
  }
  ++o.miss;
}

// One warp per bucket with requests (the round's active list, next[n..n + state[5]]):
// gather the bucket's request list, order it by request index, then
// resolve each request in order (resolve_one) with the bucket's ways held by the lanes,
// and write the ways back. Lists of up to 32 requests are collected into the lanes and
// ranked there; longer ones are insertion-sorted in place by lane 0 (the common case is
// a few requests per bucket). Resets head[b] for the next round. Needs ways <= 32.
extern "C" __global__ void lru_resolve(const u32* __restrict__ host_slots, const u32* __restrict__ logical,
                                       const u32* __restrict__ owners, u32* head, u32* next, u32* tags,
                                       u32* slot_owner, u32* pinned, i64* stamps, u32* resident,
                                       const u32* __restrict__ snapshot, const u32* __restrict__ budgets,
                                       u32* fast_pairs, u32* ready_pairs, u32* fetched_pairs, u32* spill_pairs,
                                       u32* tiered_pairs, u32* tiered_src, u32* misses, u32* miss_count,
                                       u64* counters, u32 ways, u32* state, u32 n) {
  const i64 clock = (i64)(((u64)state[1] << 32) | (u64)state[0]);
  const u32 round = state[2] + 1u;  // state[2] = the last round's number (0: none yet)
  const int lane = threadIdx.x & 31;
  const u32 warps = (gridDim.x * blockDim.x) >> 5;
  const u32 active = state[5];        // buckets with requests, listed by lru_link
  const u32* __restrict__ list = next + n;
  __shared__ u32 order[SPIN_LRU_RESOLVE_WARPS][32];
  u32* my_order = order[threadIdx.x >> 5];
  RoundOut o{fast_pairs, ready_pairs, fetched_pairs, spill_pairs, tiered_pairs, tiered_src, misses, miss_count,
             resident, budgets, snapshot, 0, 0, 0};
  for (u32 k = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; k < active; k += warps) {
    const u32 b = list[k];  // the same address in every lane
    u32 h = head[b];
    __syncwarp();
    if (lane == 0) head[b] = SPIN_NONE;
    // Collect the first 32 requests of the list into the lanes (lane k: the k-th).
    u32 mine = SPIN_NONE;
    int count = 0;
    while (h != SPIN_NONE && count < 32) {
      if (lane == count) mine = h;
      ++count;
      h = next[h];
    }
    const bool long_list = h != SPIN_NONE;
    const u32 base = b * ways;
    WayState w;
    w.active = (u32)lane < ways;
    w.tag = w.active ? tags[base + lane] : SPIN_NONE;
    w.owner = w.active ? slot_owner[base + lane] : SPIN_NONE;
    w.stamp = w.active ? stamps[base + lane] : 0;
    w.pinned_before = w.active ? pinned[base + lane] : 0u;
    w.pinned_now = w.active && w.pinned_before == round;
    w.cls = (w.active && w.tag != SPIN_NONE) ? class_of(w.owner, budgets, snapshot) : 0u;
    if (!long_list) {
      // Rank the collected requests by index: the lane of rank r resolves r-th.
      u32 rank = 0;
      for (int j = 0; j < count; ++j) {
        const u32 other = __shfl_sync(FULL_MASK, mine, j);
        if (lane < count && other < mine) ++rank;
      }
      if (lane < count) my_order[rank] = mine;
      __syncwarp();
      const u32 ri = lane < count ? my_order[lane] : SPIN_NONE;
      const u32 rhs = lane < count ? host_slots[ri] : 0u;
      const u32 rown = lane < count ? owners[ri] : 0u;
      const u32 rlp = lane < count ? logical[ri] : 0u;
      for (int r = 0; r < count; ++r) {
        const u32 i = __shfl_sync(FULL_MASK, ri, r);
        resolve_one(w, o, i, __shfl_sync(FULL_MASK, rhs, r), __shfl_sync(FULL_MASK, rown, r),
                    __shfl_sync(FULL_MASK, rlp, r), clock + (i64)i + 1, base, lane);
      }
      __syncwarp();
    } else {
      // Insertion sort of the whole linked list by lane 0 (arrival order is roughly
      // descending: the common case inserts at the front), then a walk in order.
      u32 sorted = SPIN_NONE;
      if (lane == 0) {
        u32 hh = mine;  // the list's first request
        while (hh != SPIN_NONE) {
          const u32 nx = next[hh];
          if (sorted == SPIN_NONE || hh < sorted) {
            next[hh] = sorted;
            sorted = hh;
          } else {
            u32 p = sorted;
            while (next[p] != SPIN_NONE && next[p] < hh) p = next[p];
            next[hh] = next[p];
            next[p] = hh;
          }
          hh = nx;
        }
      }
      sorted = __shfl_sync(FULL_MASK, sorted, 0);
      __syncwarp();
      for (u32 i = sorted; i != SPIN_NONE; i = next[i]) {
        resolve_one(w, o, i, host_slots[i], owners[i], logical[i], clock + (i64)i + 1, base, lane);
      }
    }
    if (w.active) {
      tags[base + lane] = w.tag;
      slot_owner[base + lane] = w.owner;
      stamps[base + lane] = w.stamp;
      pinned[base + lane] = w.pinned_now ? round : w.pinned_before;
    }
  }
  if (lane == 0) {
    if (o.hits) atomicAdd((unsigned long long*)&counters[0], (unsigned long long)o.hits);
    if (o.miss) atomicAdd((unsigned long long*)&counters[1], (unsigned long long)o.miss);
    if (o.deferred) atomicAdd((unsigned long long*)&counters[2], (unsigned long long)o.deferred);
  }
  // lru_advance, folded in: the last block to finish advances the clock and round.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&state[4], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    advance_round(state, n);
    state[4] = 0u;
    state[5] = 0u;
  }
}

// Direct mapping (a fast tier with a slot for every host slot, `DeviceLru::direct`): every
// request whose host slot is < host_cap hits the fast slot of the same number. Writes
// fast_pairs[i] = (host slot, logical), (NONE, NONE) for NONE or out-of-range slots, and
// adds the hits to counters[0] (one atomic per warp). No state is read or changed. The
// loop bound is uniform per warp (every lane of a warp shares `base`) for the ballot.
extern "C" __global__ void lru_direct(const u32* __restrict__ host_slots, const u32* __restrict__ logical, int n,
                                      u32 host_cap, u32* __restrict__ fast_pairs, u64* counters) {
  for (int base = blockIdx.x * blockDim.x; base < n; base += gridDim.x * blockDim.x) {
    const int i = base + threadIdx.x;
    bool hit = false;
    if (i < n) {
      const u32 hs = host_slots[i];
      hit = hs != SPIN_NONE && hs < host_cap;
      fast_pairs[2 * i] = hit ? hs : SPIN_NONE;
      fast_pairs[2 * i + 1] = hit ? logical[i] : SPIN_NONE;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    if ((threadIdx.x & 31) == 0 && mask != 0u)
      atomicAdd((unsigned long long*)&counters[0], (unsigned long long)__popc(mask));
  }
}

// out[i] = fast slot holding host slot q[i], NONE if not resident (or a NONE query).
extern "C" __global__ void lru_lookup(const u32* __restrict__ q, u32* __restrict__ out, int n,
                                      const u32* __restrict__ tags, u32 buckets, u32 ways, u32 home_base,
                                      u32 home_count, u32 home_fast) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 hs = q[i];
    u32 slot = fast_home(hs, home_base, home_count, home_fast);
    if (hs != SPIN_NONE && slot == SPIN_NONE) {
      const u32 base = bucket_of(hs, buckets) * ways;
      for (u32 w = 0; w < ways; ++w) {
        if (tags[base + w] == hs) {
          slot = base + w;
          break;
        }
      }
    }
    out[i] = slot;
  }
}

// Write-through targets of new tokens: out[i] = fast slot of host slot q[i] * page_size
// + rows[i], NONE if not resident (or a NONE query).
extern "C" __global__ void lru_fast_destinations(const u32* __restrict__ q, const u32* __restrict__ rows,
                                                 u32* __restrict__ out, int n, const u32* __restrict__ tags,
                                                 u32 buckets, u32 ways, u32 page_size, u32 home_base,
                                                 u32 home_count, u32 home_fast) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 hs = q[i];
    const u32 home = fast_home(hs, home_base, home_count, home_fast);
    u32 dst = home == SPIN_NONE ? SPIN_NONE : home * page_size + rows[i];
    if (hs != SPIN_NONE && home == SPIN_NONE) {
      const u32 base = bucket_of(hs, buckets) * ways;
      for (u32 w = 0; w < ways; ++w) {
        if (tags[base + w] == hs) {
          dst = (base + w) * page_size + rows[i];
          break;
        }
      }
    }
    out[i] = dst;
  }
}

// Frees host slots: their fast copies become empty ways (one thread wins per slot, so
// duplicates in the list are harmless), their owners' resident counts drop, their reuse
// history is cleared. Ids >= host_cap (fast homes among them) have nothing to forget.
extern "C" __global__ void lru_invalidate(const u32* __restrict__ list, int n, u32* tags, u32* slot_owner,
                                          i64* stamps, u32* resident, u32* last_seen, u32 host_cap,
                                          u32 buckets, u32 ways) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const u32 hs = list[i];
    if (hs == SPIN_NONE || hs >= host_cap) continue;
    last_seen[hs] = 0;
    const u32 base = bucket_of(hs, buckets) * ways;
    for (u32 w = 0; w < ways; ++w) {
      const u32 s = base + w;
      if (atomicCAS(&tags[s], hs, SPIN_NONE) == hs) {
        atomicSub(&resident[slot_owner[s]], 1u);
        slot_owner[s] = SPIN_NONE;
        stamps[s] = 0;
        break;
      }
    }
  }
}
