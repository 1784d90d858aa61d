// Mask policies: which key blocks a query tile visits, which of them need per-element masking, and the
// masking itself. Bottom-right aligned as in FA3: query row i of a sequence with lengths (sq, sk) sees key
// j iff j < sk and, when causal, j <= i + sk - sq. Rows that see no key at all end with O = 0, LSE = -inf
// (the softmax handles that). The reference in flash_attn3/reference.py states the same rule.
#pragma once

#include <cute/tensor.hpp>

namespace flash3 {

using namespace cute;

template <int kBlockM, int kBlockN, bool kCausal>
struct MaskPolicy {
  int seqlen_q;
  int seqlen_k;
  int m_block;

  // Exclusive bound on the keys visible to query row `row` (tile-independent coordinates).
  __device__ int key_limit(int row) const {
    return kCausal ? min(seqlen_k, row + 1 + seqlen_k - seqlen_q) : seqlen_k;
  }

  // Key blocks [0, n_block_end) hold every key some row of this tile may see (0 blocks: nothing to do).
  __device__ int n_block_end() const {
    int last_row = min((m_block + 1) * kBlockM, seqlen_q) - 1;
    return cute::ceil_div(max(key_limit(last_row), 0), kBlockN);
  }

  // Blocks [0, n_block_unmasked_end) are visible to every row of the tile and need no element mask; the
  // ones after it, up to n_block_end, do.
  __device__ int n_block_unmasked_end() const {
    int first_row = m_block * kBlockM;
    return max(key_limit(first_row), 0) / kBlockN;
  }

  // Sets invisible scores of key block `n_block` to `masked` (the softmax's masked_score(): -inf, or +inf for
  // a negative scale). tSrS_rc is the accumulator as (rows, cols), tScS_rc the matching (row, col)
  // coordinates inside the (kBlockM, kBlockN) tile. Assignment (not arithmetic) so that NaN/Inf read from
  // keys outside the sequence cannot leak through.
  template <class TensorS, class TensorC>
  __device__ void apply(TensorS& tSrS_rc, TensorC const& tScS_rc, int n_block, float masked) const {
    int const col0 = n_block * kBlockN;
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < size<0>(tSrS_rc); ++m) {
      int const limit = key_limit(m_block * kBlockM + get<0>(tScS_rc(m, 0))) - col0;
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(tSrS_rc); ++n) {
        if (get<1>(tScS_rc(m, n)) >= limit) { tSrS_rc(m, n) = masked; }
      }
    }
  }
};

}  // namespace flash3
