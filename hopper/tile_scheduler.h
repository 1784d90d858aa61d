// Persistent tile scheduler: the grid holds at most one CTA per SM and each CTA walks the work tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... so the next tile's loads overlap the current tile's epilogue and
// the per-CTA set-up (barrier init, descriptor prefetch) is paid once per SM instead of once per tile.
//
// Tile order: non-causal tiles all cost the same, so m blocks are innermost and neighbouring CTAs share one
// (head, batch)'s K/V in L2. Causal tiles cost in proportion to their m block, so the order is m block
// outermost, heaviest first (longest-processing-time first), which evens out the per-SM totals.
#pragma once

namespace flash3 {

struct TileCoord {
  int m_block;
  int head;
  int batch;
};

template <bool kHeaviestFirst>
struct StaticPersistentScheduler {
  int num_m_blocks;
  int num_heads;
  int batch;

  __host__ __device__ int num_tiles() const { return num_m_blocks * num_heads * batch; }

  __device__ TileCoord tile(int idx) const {
    if constexpr (kHeaviestFirst) {
      int const per_m = num_heads * batch;
      int const m = idx / per_m;
      int const hb = idx - m * per_m;
      return {num_m_blocks - 1 - m, hb % num_heads, hb / num_heads};
    } else {
      int const hb = idx / num_m_blocks;
      return {idx - hb * num_m_blocks, hb % num_heads, hb / num_heads};
    }
  }
};

}  // namespace flash3
