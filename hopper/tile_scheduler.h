// Persistent tile scheduler: the grid holds at most one CTA per SM and each CTA walks several tiles, so
// the next tile's loads overlap the current tile's epilogue and the per-CTA set-up (barrier init,
// descriptor prefetch) is paid once per SM instead of once per tile. Each CTA starts at tile blockIdx.x;
// after that it either strides by gridDim.x (static: every tile costs the same) or claims the next
// unclaimed tile from a global counter (dynamic: causal and varlen tiles of unequal cost).
//
// Tile order. Non-causal tiles all cost the same: m blocks are innermost, so CTAs running at the same time
// share one (head, batch)'s K/V in L2. Causal tiles cost in proportion to their m block: heads are cut into
// sections whose K/V fit in a share of L2, and inside a section the order is m block outermost, heaviest
// first (longest-processing-time first), while the section's K/V stay cached across its m blocks.
// Measured on H100 (benchmarks/NOTES.md): one global heaviest-first order re-reads K/V from HBM for every
// m block (b 32, s 512, causal: -20%); sections with static striding leave some SMs with twice the work
// of others on (b 1, s 16k, causal: 416 vs 578 TFLOPS); sections with the dynamic counter: 614.
#pragma once

#include <cstdint>

#include <cute/arch/cluster_sm90.hpp>  // elect_one_sync

namespace flash3 {

struct TileCoord {
  int m_block;
  int head;
  int batch;
};

template <bool kHeaviestFirst>
struct PersistentScheduler {
  int num_m_blocks;
  int num_heads;
  int batch;
  int heads_per_section;  // (head, batch) pairs per L2 section; used when kHeaviestFirst
  // Zeroed int32 in global memory, or null. When set, tiles after each CTA's first are claimed from this
  // counter, so an SM that drew light tiles takes more of them.
  int* tile_counter;

  __host__ __device__ int num_tiles() const { return num_m_blocks * num_heads * batch; }

  __device__ TileCoord tile(int idx) const {
    int hb, m;
    if constexpr (kHeaviestFirst) {
      int const section_tiles = heads_per_section * num_m_blocks;
      int const section = idx / section_tiles;
      int const within = idx - section * section_tiles;
      int const num_hb = num_heads * batch;
      int const heads_here = min(heads_per_section, num_hb - section * heads_per_section);
      int const m_rank = within / heads_here;
      m = num_m_blocks - 1 - m_rank;
      hb = section * heads_per_section + (within - m_rank * heads_here);
    } else {
      hb = idx / num_m_blocks;
      m = idx - hb * num_m_blocks;
    }
    return {m, hb % num_heads, hb / num_heads};
  }

  // The tile this CTA's producer warp takes after `current` (the whole claimer warp calls it, one tile ahead
  // of the producer, so the atomic's round trip overlaps the producer's loads).
  __device__ int claim_next_tile(int current) const {
    if (tile_counter != nullptr) {
      int claimed = 0;  // one lane claims; the others hold 0, so the max broadcasts the claim
      if (cute::elect_one_sync()) { claimed = atomicAdd(tile_counter, 1); }
      return int(gridDim.x) + int(__reduce_max_sync(0xffffffff, unsigned(claimed)));
    }
    return current + int(gridDim.x);
  }

  // Sections hold as many (head, batch) pairs as fit `l2_budget_bytes` of K + V.
  static int heads_per_l2_section(int num_heads, int batch, int64_t kv_bytes_per_head, int64_t l2_budget_bytes) {
    int64_t fit = kv_bytes_per_head > 0 ? l2_budget_bytes / kv_bytes_per_head : 1;
    int64_t const num_hb = int64_t(num_heads) * batch;
    return int(fit < 1 ? 1 : (fit > num_hb ? num_hb : fit));
  }
};

}  // namespace flash3
