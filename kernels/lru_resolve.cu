// spinkv CUDA kernels: the device LRU (bucketed LRU with per-owner budgets). One round =
// lru_link (one thread per request: per-bucket request lists, reuse tracking, output
// initialization, resident-count snapshot) then lru_resolve (one thread per bucket: its
// requests in request order, exactly as the sequential BucketedLru with the round's
// snapshot budgets), then lru_advance (one thread: the round's clock and number, kept on
// the device in `state`). Plus lru_direct (the round of a direct-mapped fast tier),
// lru_lookup, lru_fast_destinations and lru_invalidate.
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
                                    const u32* __restrict__ state, u32 reuse_steps, u32 home_base,
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
    next[i] = atomicExch(&head[bucket_of(hs, buckets)], (u32)i);
  }
}

// The round's clock and number live on the device, in `state` = [clock low, clock high,
// last round, step] (the step is written by the host once per step): a captured round
// reads them at replay, not the values of the capture. A round uses the clock as it is
// and the number last round + 1 (as the host's reference does); one thread then
// advances them: clock += n, last round += 1.
extern "C" __global__ void lru_advance(u32* state, u32 n) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const u64 clock = (((u64)state[1] << 32) | (u64)state[0]) + (u64)n;
    state[0] = (u32)clock;
    state[1] = (u32)(clock >> 32);
    state[2] += 1u;
  }
}

// One thread per bucket: sort the bucket's list by request index, then resolve each
// request in order (hit: pin + stamp; miss: victim among unpinned ways by (class, stamp),
// ties to the lower way; none: deferred). Resets head[b] for the next round.
extern "C" __global__ void lru_resolve(const u32* __restrict__ host_slots, const u32* __restrict__ logical,
                                       const u32* __restrict__ owners, u32* head, u32* next, u32* tags,
                                       u32* slot_owner, u32* pinned, i64* stamps, u32* resident,
                                       const u32* __restrict__ snapshot, const u32* __restrict__ budgets,
                                       u32* fast_pairs, u32* ready_pairs, u32* fetched_pairs, u32* spill_pairs,
                                       u32* tiered_pairs, u32* tiered_src, u32* misses, u32* miss_count, u64* counters, u32 buckets, u32 ways,
                                       const u32* __restrict__ state) {
  const i64 clock = (i64)(((u64)state[1] << 32) | (u64)state[0]);
  const u32 round = state[2] + 1u;  // state[2] = the last round's number (0: none yet)
  for (u32 b = blockIdx.x * blockDim.x + threadIdx.x; b < buckets; b += gridDim.x * blockDim.x) {
    u32 h = head[b];
    if (h == SPIN_NONE) continue;
    head[b] = SPIN_NONE;
    // Insertion sort of the linked list (arrival order is roughly descending: the common
    // case inserts at the front).
    u32 sorted = SPIN_NONE;
    while (h != SPIN_NONE) {
      const u32 nx = next[h];
      if (sorted == SPIN_NONE || h < sorted) {
        next[h] = sorted;
        sorted = h;
      } else {
        u32 p = sorted;
        while (next[p] != SPIN_NONE && next[p] < h) p = next[p];
        next[h] = next[p];
        next[p] = h;
      }
      h = nx;
    }
    const u32 base = b * ways;
    u64 hits = 0, miss = 0, deferred = 0;
    for (u32 i = sorted; i != SPIN_NONE; i = next[i]) {
      const u32 hs = host_slots[i], o = owners[i], lp = logical[i];
      const i64 stamp = clock + (i64)i + 1;
      u32 hit = SPIN_NONE;
      for (u32 w = 0; w < ways; ++w) {
        if (tags[base + w] == hs) {
          hit = base + w;
          break;
        }
      }
      if (hit != SPIN_NONE) {
        // A slot an earlier request of this round pinned may be fetched in this round:
        // the fused attention reads such a repeat from the host tier.
        const bool repeat = pinned[hit] == round;
        u32* split = repeat ? fetched_pairs : ready_pairs;
        split[2 * i] = hit;
        split[2 * i + 1] = lp;
        tiered_pairs[2 * i] = repeat ? SPIN_NONE : hit;
        tiered_pairs[2 * i + 1] = lp;
        tiered_src[i] = repeat ? hs : SPIN_NONE;
        stamps[hit] = stamp;
        pinned[hit] = round;
        fast_pairs[2 * i] = hit;
        fast_pairs[2 * i + 1] = lp;
        ++hits;
        continue;
      }
      u32 best = SPIN_NONE, best_class = 3;
      i64 best_stamp = 0;
      for (u32 w = 0; w < ways; ++w) {
        const u32 s = base + w;
        if (pinned[s] == round) continue;
        const u32 t = tags[s];
        u32 cls = 0;
        i64 st = 0;
        if (t != SPIN_NONE) {
          const u32 ow = slot_owner[s];
          const u32 bud = budgets[ow];
          cls = (bud != 0xffffffffu && snapshot[ow] >= bud) ? 1 : 2;
          st = stamps[s];
        }
        if (best == SPIN_NONE || cls < best_class || (cls == best_class && st < best_stamp)) {
          best = s;
          best_class = cls;
          best_stamp = st;
        }
      }
      if (best == SPIN_NONE) {
        spill_pairs[2 * i] = hs;
        spill_pairs[2 * i + 1] = lp;
        tiered_pairs[2 * i + 1] = lp;
        tiered_src[i] = hs;
        ++deferred;
        continue;
      }
      if (tags[best] != SPIN_NONE) atomicSub(&resident[slot_owner[best]], 1u);
      tags[best] = hs;
      slot_owner[best] = o;
      atomicAdd(&resident[o], 1u);
      stamps[best] = stamp;
      pinned[best] = round;
      fast_pairs[2 * i] = best;
      fast_pairs[2 * i + 1] = lp;
      fetched_pairs[2 * i] = best;
      fetched_pairs[2 * i + 1] = lp;
      tiered_pairs[2 * i] = best;
      tiered_pairs[2 * i + 1] = lp;
      tiered_src[i] = hs;
      const u32 k = atomicAdd(miss_count, 1u);
      misses[2 * k] = hs;
      misses[2 * k + 1] = best;
      ++miss;
    }
    if (hits) atomicAdd((unsigned long long*)&counters[0], (unsigned long long)hits);
    if (miss) atomicAdd((unsigned long long*)&counters[1], (unsigned long long)miss);
    if (deferred) atomicAdd((unsigned long long*)&counters[2], (unsigned long long)deferred);
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
