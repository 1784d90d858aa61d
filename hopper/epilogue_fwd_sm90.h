// Epilogue of the SM90 forward kernel: writes this thread's rows of O (converted to the output type) and
// their LSE straight from the accumulator registers, predicated on the sequence's rows and the real head
// dim (which may be smaller than the compiled one), so nothing outside the sequence is written.
// `store_zero` writes O = 0 and LSE = -inf for a tile whose rows see no key at all (or, split-KV, whose
// split holds none of its keys).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "cute_utils.h"
#include "seqlen.h"
#include "tile_scheduler.h"
#include "workspace.h"

namespace flash3 {

using namespace cute;

// Element: the output's type (the input's, or bfloat16 for FP8 inputs).
// Split-KV (kSplit, a compile-time switch so that the kernels without it carry none of its code): the tile writes its split's float32 partial O and LSE into the workspace
// (workspace.h) instead, for the combine kernel; the same rows and columns, another type and address.
// PackGQA (pack > 1): packed row r of the tile is query r / pack of q head tile.head * pack + r % pack.
template <class Element, int kBlockM, int kHeadDim, int kRowsPerThread, class TiledMmaPV, bool kSplit>
struct EpilogueFwdSm90 {

  struct Arguments {
    Element* out;
    int64_t out_batch_stride;  // of dense Q; a packed Q's sequences are located by their row offset
    int64_t out_row_stride;
    int64_t out_head_stride;
    float* lse;
    int64_t lse_batch_stride;
    int64_t lse_head_stride;
    int head_dim_v;
    int pack;
    // Every row of out starts 16-byte aligned (the pointer, and the row, head and batch strides in multiples of
    // 8 elements): rows may then go out as 16-byte stores (write_rows).
    bool out_aligned16;
    float* o_accum;  // (split, batch entry, row, head, dim), layout SplitAccumLayout
    float* lse_accum;
    SplitAccumLayout accum;
  };
  using Params = Arguments;  // nothing to precompute on the host
  static Params to_params(Arguments const& a) { return a; }

  template <class FragO>
  __device__ static void store(Params const& p, FragO const& tOrO, float const (&lse)[kRowsPerThread],
                               int thread_idx, TileCoord const& tile, SeqlenInfo const& seqlen) {
    if constexpr (kSplit) {
      SplitAccumLayout const& a = p.accum;
      write_rows<float>(p, tOrO, lse, thread_idx, tile, seqlen,
                        p.o_accum + tile.split * a.o_split_stride() + seqlen.batch_q * a.o_batch_stride(),
                        a.o_row_stride(), a.o_head_stride(),
                        p.lse_accum + tile.split * a.lse_split_stride() + seqlen.batch_q * a.lse_batch_stride(),
                        a.lse_head_stride());
    } else {
      write_rows<Element>(p, tOrO, lse, thread_idx, tile, seqlen, p.out + int64_t(seqlen.batch_q) * p.out_batch_stride,
                          p.out_row_stride, p.out_head_stride,
                          p.lse + int64_t(seqlen.batch_q) * p.lse_batch_stride, p.lse_head_stride);
    }
  }

  // A 4 x 4 transpose of 32-bit words across the four lanes of a quad (lane q holds w[c] of chunk c and
  // gets word q of every chunk, i.e. w[p] = lane p's w[q]): two exchange stages, lanes 2 apart, then 1.
  __device__ static void quad_transpose(uint32_t (&w)[4], int q) {
    CUTLASS_PRAGMA_UNROLL
    for (int k = 2; k >= 1; k /= 2) {
      bool const upper = (q & k) != 0;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 4; ++c) {
        if (c & k) { continue; }
        // The lane keeps the word whose chunk bit k matches its own and swaps the other with lane q ^ k.
        uint32_t const sent = upper ? w[c] : w[c | k];
        uint32_t const got = __shfl_xor_sync(0xffffffff, sent, k);
        if (upper) { w[c] = got; } else { w[c | k] = got; }
      }
    }
  }

  // Rows of this thread into `out` (the batch entry's row 0, head 0) and `lse` (likewise, rows contiguous).
  template <class T, class FragO>
  __device__ static void write_rows(Params const& p, FragO const& tOrO, float const (&lse)[kRowsPerThread],
                                    int thread_idx, TileCoord const& tile, SeqlenInfo const& seqlen, T* out,
                                    int64_t row_stride, int64_t head_stride, float* lse_out, int64_t lse_head_stride) {
    // float partials straight from the accumulator; other types through a converted copy.
    auto rows_cols = [&] {
      if constexpr (std::is_same_v<T, float>) {
        return make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
      } else {
        return convert_fragment<T>(tOrO);
      }
    };
    auto rO = rows_cols();
    Tensor rO_rc = [&] {
      if constexpr (std::is_same_v<T, float>) { return rO; } else { return make_tensor(rO.data(), acc_rowcol(rO.layout())); }
    }();  // (rows, cols)
    TiledMmaPV mma_pv;
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (M, d) -> (row, col)
    Tensor tOcO = mma_pv.get_slice(thread_idx).partition_C(cO);             // (MMA, MMA_M, MMA_N)
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));  // (rows, cols)

    static_assert(decltype(size<1>(rO_rc))::value % 2 == 0);
    // Columns come in adjacent pairs (the first mode of the column layout): one 32- or 64-bit store each,
    // at a compile-time offset from the thread's first column of the row.
    auto store_pairs = [&](int m, T* row_at_first_col, auto all_columns) __attribute__((always_inline)) {
      int const first_col = get<1>(tOcO_rc(m, 0));
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(rO_rc); n += 2) {
        int const offset = get<1>(tOcO_rc(m, n)) - first_col;
        if (decltype(all_columns)::value || first_col + offset < p.head_dim_v) {
          cutlass::AlignedArray<T, 2> pair;
          pair[0] = rO_rc(m, n);
          pair[1] = rO_rc(m, n + 1);
          *reinterpret_cast<cutlass::AlignedArray<T, 2>*>(row_at_first_col + offset) = pair;
        }
      }
    };
    // The compiled head dim is the real one on nearly every call: then the stores go out unconditionally.
    // With a test per column (a smaller real dim), the compiler sinks the row's 64-bit address arithmetic into
    // every store's branch: ~20 instructions per store, ~5600 cycles of a 21000-cycle tile at b 32 s 512
    // (tools/trace_tiles.py, H200, 2026-12-02).
    bool const all_columns = p.head_dim_v == kHeadDim;
    // 16-bit output, full rows, aligned: 16-byte stores. The accumulator gives the four lanes of a quad the
    // same row, lane q the column pairs 2q + 8j; after a transpose of each group of four pairs (j = 4g..4g+3)
    // lane q holds the eight adjacent columns 32g + 8q.., one 16-byte store, a whole 32-byte sector per two
    // lanes (4-byte stores write half sectors: Nsight Compute counted 50% of the kernel's sectors excessive).
    constexpr int kPairs = decltype(size<1>(rO_rc))::value / 2;
    if constexpr (!std::is_same_v<T, float> && sizeof(T) == 2 && kPairs % 4 == 0) {
      // Also when the real head dim is a multiple of 8 below the compiled one (d 80 on the d 96 kernel: the
      // guide's four cases): each 16-byte chunk is then wholly inside it or wholly past it, one predicate
      // per chunk instead of the per-pair tests below.
      if (p.head_dim_v % 8 == 0 && p.out_aligned16) {
        constexpr int kRows = decltype(size<0>(rO_rc))::value;
        uint32_t words[kRows][kPairs / 4][4];
        int const q = get<1>(tOcO_rc(0, 0)) / 2;  // the lane's place in its quad
        CUTLASS_PRAGMA_UNROLL
        for (int m = 0; m < kRows; ++m) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kPairs; ++j) {
            cutlass::AlignedArray<T, 2> pair;
            pair[0] = rO_rc(m, 2 * j);
            pair[1] = rO_rc(m, 2 * j + 1);
            words[m][j / 4][j % 4] = reinterpret_cast<uint32_t const&>(pair);
          }
          // Every lane, whether its row is inside the sequence or not: the shuffles take the whole warp.
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kPairs / 4; ++g) { quad_transpose(words[m][g], q); }
        }
        // Chunk g of this lane holds columns 32 g + 8 q ..+7: stored when 32 g < lane_cols. One bit per chunk,
        // set before the row loop, so that each store is predicated on a bit rather than on arithmetic the
        // compiler could sink next to it.
        int const lane_cols = p.head_dim_v - 8 * q;
        uint32_t chunk_bits = 0;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kPairs / 4; ++g) { chunk_bits |= uint32_t(32 * g < lane_cols) << g; }
        CUTLASS_PRAGMA_UNROLL
        for (int m = 0; m < kRows; ++m) {
          int const packed_row = tile.m_block * kBlockM + get<0>(tOcO_rc(m, 0));
          if (packed_row >= seqlen.seqlen_q * p.pack) { continue; }
          int const row = p.pack == 1 ? packed_row : packed_row / p.pack;
          int const head = tile.head * p.pack + (packed_row - row * p.pack);
          int64_t const q_row = int64_t(seqlen.offset_q) + row;
          T* const row_at_chunk = out + q_row * row_stride + int64_t(head) * head_stride + 8 * q;
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kPairs / 4; ++g) {
            uint4 const v = make_uint4(words[m][g][0], words[m][g][1], words[m][g][2], words[m][g][3]);
            if (chunk_bits & (1u << g)) { *reinterpret_cast<uint4*>(row_at_chunk + 32 * g) = v; }
          }
          if (q == 0) { lse_out[int64_t(head) * lse_head_stride + q_row] = lse[m]; }
        }
        return;
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < size<0>(rO_rc); ++m) {
      int const packed_row = tile.m_block * kBlockM + get<0>(tOcO_rc(m, 0));
      if (packed_row >= seqlen.seqlen_q * p.pack) { continue; }
      int const row = p.pack == 1 ? packed_row : packed_row / p.pack;
      int const head = tile.head * p.pack + (packed_row - row * p.pack);
      int64_t const q_row = int64_t(seqlen.offset_q) + row;
      int const first_col = get<1>(tOcO_rc(m, 0));
      T* const row_at_first_col = out + q_row * row_stride + int64_t(head) * head_stride + first_col;
      if (all_columns) {
        store_pairs(m, row_at_first_col, cute::true_type{});
      } else {
        store_pairs(m, row_at_first_col, cute::false_type{});
      }
      if (first_col == 0) { lse_out[int64_t(head) * lse_head_stride + q_row] = lse[m]; }
    }
  }

  __device__ static void store_zero(Params const& p, int thread_idx, TileCoord const& tile, SeqlenInfo const& seqlen) {
    TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(tOrO);
    float lse[kRowsPerThread];
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRowsPerThread; ++m) { lse[m] = -INFINITY; }
    store(p, tOrO, lse, thread_idx, tile, seqlen);
  }
};

}  // namespace flash3
