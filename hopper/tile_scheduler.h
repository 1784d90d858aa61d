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
#include <cutlass/fast_math.h>          // FastDivmod

namespace flash3 {

// head: the q head, or with PackGQA the kv head whose q heads share the tile's rows. split: which of the
// schedule's key ranges (0 without split-KV).
struct TileCoord {
  int m_block;
  int head;
  int batch;
  int split;
};

// A unit is one (split, head, batch) triple, split fastest: the m blocks of a unit share its keys.
template <bool kHeaviestFirst>
struct PersistentScheduler {
  int num_m_blocks;
  int num_heads;  // tile heads: q heads, or kv heads with PackGQA
  int batch;
  int num_splits;
  int heads_per_section;  // units per L2 section; used when kHeaviestFirst
  // Zeroed int32 in global memory, or null. When set, tiles after each CTA's first are claimed from this
  // counter, so an SM that drew light tiles takes more of them.
  int* tile_counter;
  // The divisions of tile(), precomputed on the host (set_divisors): each role derives every tile's
  // coordinates, and a division by a run-time value is ~15 dependent instructions.
  cutlass::FastDivmod m_blocks_div, splits_div, heads_div, section_tiles_div, section_units_div;

  // After every count above (heads_per_section included) is final.
  void set_divisors() {
    m_blocks_div = cutlass::FastDivmod(num_m_blocks);
    splits_div = cutlass::FastDivmod(num_splits);
    heads_div = cutlass::FastDivmod(num_heads);
    section_tiles_div = cutlass::FastDivmod(heads_per_section * num_m_blocks);
    section_units_div = cutlass::FastDivmod(heads_per_section);
  }

  __host__ __device__ int64_t num_units() const { return int64_t(num_splits) * num_heads * batch; }
  __host__ __device__ int64_t num_tiles() const { return num_units() * num_m_blocks; }

  __host__ __device__ TileCoord tile(int idx) const {
    int unit, m;
    if constexpr (kHeaviestFirst) {
      int within;
      int const section = section_tiles_div.divmod(within, idx);
      // int arithmetic: the host checked that every tile index fits an int32 (api.cu).
      int const units_here = min(heads_per_section, num_splits * num_heads * batch - section * heads_per_section);
      int m_rank, unit_in_section;
      if (units_here == heads_per_section) {
        m_rank = section_units_div.divmod(unit_in_section, within);
      } else {  // the last section, when the units do not fill it
        m_rank = within / units_here;
        unit_in_section = within - m_rank * units_here;
      }
      m = num_m_blocks - 1 - m_rank;
      unit = section * heads_per_section + unit_in_section;
    } else {
      unit = m_blocks_div.divmod(m, idx);
    }
    int split, head;
    int const hb = splits_div.divmod(split, unit);
    int const b = heads_div.divmod(head, hb);
    return {m, head, b, split};
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

  // Sections hold as many units as fit `l2_budget_bytes` of K + V.
  static int units_per_l2_section(int64_t num_units, int64_t kv_bytes_per_unit, int64_t l2_budget_bytes) {
    int64_t fit = kv_bytes_per_unit > 0 ? l2_budget_bytes / kv_bytes_per_unit : 1;
    return int(fit < 1 ? 1 : (fit > num_units ? num_units : fit));
  }
};

}  // namespace flash3
