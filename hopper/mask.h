// Mask policies: which key blocks a query tile visits, which of them need per-element masking, and the
// masking itself. Bottom-right aligned as in FA3: query row i of a sequence with lengths (sq, sk) sees key
// j iff key_start(i) <= j < key_limit(i); with no mask that is [0, sk), causal ends it at i + sk - sq + 1.
// Rows that see no key at all end with O = 0, LSE = -inf (the softmax handles that). The reference in
// flash_attn3/reference.py states the same rule.
//
// range() describes a tile's key blocks as four bounds, begin <= unmasked_begin <= unmasked_end <= end:
// blocks [unmasked_begin, unmasked_end) are entirely visible to every row of the tile and need no element
// mask; the blocks on either side of them need one. The producer loads and the consumers process the same
// blocks, from end - 1 down to begin (the boundary block, with its partial V tail, comes first).
// A new mask kind (a sliding window) is a new MaskKind with its own key_start / key_limit; range(), apply()
// and the mainloop's three phases need no change. A split-KV key range is not a mask: the tile's range is
// clipped to the split's blocks (BlockRange::clip), which keeps the masked / unmasked phases right.
// PackGQA: the tile's rows are packed rows, `pack` of them per query (row r is query r / pack); the mask is
// a function of the query, so every row is divided by `pack` first.
#pragma once

#include <cute/tensor.hpp>

namespace flash3 {

using namespace cute;

// kLocal: FA3's sliding window (window_size = (left, right), -1 = unbounded on that side; causal is
// (-1, 0) and runs as kCausal): query i sees keys [i + sk - sq - left, i + sk - sq + right], and with a
// chunk (attention_chunk) only those of its own chunk [c, c + chunk), c = floor((i + sk - sq) / chunk) * chunk.
// Both bounds stay non-decreasing in i, which range() relies on.
enum class MaskKind { kNone, kCausal, kLocal };

struct BlockRange {
  int begin;
  int unmasked_begin;
  int unmasked_end;
  int end;
  __host__ __device__ bool empty() const { return end <= begin; }

  // The part of this range inside blocks [lo, hi), with its phases clipped alike.
  __host__ __device__ BlockRange clip(int lo, int hi) const {
    int const b = begin > lo ? begin : lo;
    int e = end < hi ? end : hi;
    e = e > b ? e : b;
    int ub = unmasked_begin > b ? unmasked_begin : b;
    ub = ub < e ? ub : e;
    int ue = unmasked_end > ub ? unmasked_end : ub;
    ue = ue < e ? ue : e;
    return {b, ub, ue, e};
  }

  // Split `split` of `num_splits` near-equal contiguous shares of this range.
  __host__ __device__ BlockRange split(int split_idx, int num_splits) const {
    int const per = (end - begin + num_splits - 1) / num_splits;
    int const lo = begin + split_idx * per;
    return clip(lo, lo + per);
  }
};

template <int kBlockM, int kBlockN, MaskKind kKind>
struct MaskPolicy {
  static constexpr MaskKind kMaskKind = kKind;
  // Whether key_start can be above 0 (a window's left edge): without one, apply() tests one bound only.
  static constexpr bool kHasKeyStart = kKind == MaskKind::kLocal;
  int seqlen_q;  // queries (not packed rows)
  int seqlen_k;
  int m_block;
  int pack;  // packed rows per query (PackGQA), 1 without packing
  int window_left;   // kLocal only: -1 = unbounded
  int window_right;  // kLocal only: -1 = unbounded
  int chunk;         // kLocal only: 0 = no chunks
  // kCausal only, context parallelism (params.h flash3_context_parallel): this call's key j is global key
  // j * cp_world + cp_rank of cp_seqlen_k; cp_world 1 = off (then cp_seqlen_k == seqlen_k).
  int cp_world;
  int cp_rank;
  int cp_seqlen_k;

  // kLocal with a chunk: the first key of query row `row`'s chunk, floor division (the aligned position is
  // negative for rows before the first key when sq > sk). Once per row and tile (row_bounds, range).
  __device__ int chunk_start(int row) const {
    int const pos = row + seqlen_k - seqlen_q;
    int const q = pos >= 0 ? pos / chunk : -((chunk - 1 - pos) / chunk);
    return q * chunk;
  }

  // First key visible to query row `row` (tile-independent coordinates); may be negative (then 0).
  __device__ int key_start(int row) const {
    if constexpr (kKind == MaskKind::kLocal) {
      int const start = window_left >= 0 ? row + seqlen_k - seqlen_q - window_left : 0;
      return chunk > 0 ? max(start, chunk_start(row)) : start;
    } else {
      return 0;
    }
  }

  // Exclusive bound on the keys visible to query row `row`.
  __device__ int key_limit(int row) const {
    if constexpr (kKind == MaskKind::kCausal) {
      if (cp_world == 1) { return min(seqlen_k, row + 1 + seqlen_k - seqlen_q); }
      // Keys j with j * cp_world + cp_rank <= last, the query's global position: (last - rank) / world + 1
      // of them (none when last < rank). Once per row and tile (row_bounds, range), so the division is cheap.
      int const last = row + cp_seqlen_k - seqlen_q;
      return last < cp_rank ? 0 : min(seqlen_k, (last - cp_rank) / cp_world + 1);
    } else if constexpr (kKind == MaskKind::kLocal) {
      int const limit = window_right >= 0 ? min(seqlen_k, row + 1 + seqlen_k - seqlen_q + window_right) : seqlen_k;
      return chunk > 0 ? min(limit, chunk_start(row) + chunk) : limit;
    } else {
      return seqlen_k;
    }
  }

  // Packed row -> query; without packing (nearly every call) no division.
  __device__ int query_of(int packed_row) const { return pack == 1 ? packed_row : packed_row / pack; }

  // Key blocks of this tile (see the header comment). A tile whose rows see no key has an empty range.
  __device__ BlockRange range() const {
    int const first_row = query_of(m_block * kBlockM);
    int const last_row = query_of(min(m_block * kBlockM + kBlockM, seqlen_q * pack) - 1);
    // key_start / key_limit never decrease with the row, so the tile's extremes give its bounds.
    // Without a key start both lower bounds are the constant 0, which keeps them out of registers.
    int const begin = kHasKeyStart ? max(key_start(first_row), 0) / kBlockN : 0;
    int const end = cute::ceil_div(max(key_limit(last_row), 0), kBlockN);
    int const unmasked_begin = kHasKeyStart ? min(cute::ceil_div(max(key_start(last_row), 0), kBlockN), end) : 0;
    int const unmasked_end = max(min(max(key_limit(first_row), 0) / kBlockN, end), unmasked_begin);
    return {begin, unmasked_begin, unmasked_end, end};
  }

  // The visible keys of each accumulator row this thread holds, [start, limit), computed once per tile so
  // that the per-block masking needs neither the row arithmetic (a division with PackGQA) nor the sequence
  // lengths in registers. tScS_rc: the (row, col) coordinates of the accumulator as (rows, cols).
  template <int kRows>
  struct RowBounds {
    int start[kRows];
    int limit[kRows];
  };
  template <class TensorC>
  __device__ auto row_bounds(TensorC const& tScS_rc) const {
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;
    RowBounds<kRows> b;
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRows; ++m) {
      int const row = query_of(m_block * kBlockM + get<0>(tScS_rc(m, 0)));
      b.start[m] = key_start(row);
      b.limit[m] = key_limit(row);
    }
    return b;
  }

  // Sets invisible scores of key block `n_block` to `masked` (the softmax's masked_score(): -inf, or +inf for
  // a negative scale). tSrS_rc is the accumulator as (rows, cols), tScS_rc the matching (row, col)
  // coordinates inside the (kBlockM, kBlockN) tile, `bounds` this thread's rows (row_bounds). Assignment (not
  // arithmetic) so that NaN/Inf read from keys outside the sequence cannot leak through.
  template <class TensorS, class TensorC, class Bounds>
  __device__ static void apply(TensorS& tSrS_rc, TensorC const& tScS_rc, Bounds const& bounds, int n_block,
                               float masked) {
    int const col0 = n_block * kBlockN;
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < size<0>(tSrS_rc); ++m) {
      int const start = bounds.start[m] - col0;
      int const limit = bounds.limit[m] - col0;
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(tSrS_rc); ++n) {
        int const col = get<1>(tScS_rc(m, n));
        if (col >= limit || (kHasKeyStart && col < start)) { tSrS_rc(m, n) = masked; }
      }
    }
  }
};

}  // namespace flash3
