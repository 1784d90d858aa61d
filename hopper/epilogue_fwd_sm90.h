// Epilogue of the SM90 forward kernel: writes this thread's rows of O (converted to the output type) and
// their LSE straight from the accumulator registers, predicated on the sequence's rows and the real head
// dim (which may be smaller than the compiled one), so nothing outside the sequence is written.
// `store_zero` writes O = 0 and LSE = -inf for a tile whose rows see no key at all.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "cute_utils.h"
#include "seqlen.h"

namespace flash3 {

using namespace cute;

// Element: the output's type (the input's, or bfloat16 for FP8 inputs).
template <class Element, int kBlockM, int kHeadDim, int kRowsPerThread, class TiledMmaPV>
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
  };
  using Params = Arguments;  // nothing to precompute on the host
  static Params to_params(Arguments const& a) { return a; }

  template <class FragO>
  __device__ static void store(Params const& p, FragO const& tOrO, float const (&lse)[kRowsPerThread],
                               int thread_idx, int m_block, int head, SeqlenInfo const& seqlen) {
    Tensor rO = convert_fragment<Element>(tOrO);
    Tensor rO_rc = make_tensor(rO.data(), acc_rowcol(rO.layout()));  // (rows, cols)
    TiledMmaPV mma_pv;
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (M, d) -> (row, col)
    Tensor tOcO = mma_pv.get_slice(thread_idx).partition_C(cO);             // (MMA, MMA_M, MMA_N)
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));  // (rows, cols)

    // The sequence's rows: a batch entry of a dense operand, or rows from offset_q on of a packed one.
    Element* out = p.out + int64_t(seqlen.batch_q) * p.out_batch_stride + int64_t(seqlen.offset_q) * p.out_row_stride +
                   int64_t(head) * p.out_head_stride;
    float* lse_ptr = p.lse + int64_t(seqlen.batch_q) * p.lse_batch_stride + int64_t(head) * p.lse_head_stride +
                     seqlen.offset_q;

    static_assert(decltype(size<1>(rO_rc))::value % 2 == 0);
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < size<0>(rO_rc); ++m) {
      int const row = m_block * kBlockM + get<0>(tOcO_rc(m, 0));
      if (row >= seqlen.seqlen_q) { continue; }
      Element* out_row = out + int64_t(row) * p.out_row_stride;
      // Columns come in adjacent pairs (the first mode of the column layout): one 32-bit store each.
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(rO_rc); n += 2) {
        int const col = get<1>(tOcO_rc(m, n));
        if (col < p.head_dim_v) {
          cutlass::AlignedArray<Element, 2> pair;
          pair[0] = rO_rc(m, n);
          pair[1] = rO_rc(m, n + 1);
          *reinterpret_cast<cutlass::AlignedArray<Element, 2>*>(out_row + col) = pair;
        }
      }
      if (get<1>(tOcO_rc(m, 0)) == 0) { lse_ptr[row] = lse[m]; }
    }
  }

  __device__ static void store_zero(Params const& p, int thread_idx, int m_block, int head,
                                    SeqlenInfo const& seqlen) {
    TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(tOrO);
    float lse[kRowsPerThread];
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRowsPerThread; ++m) { lse[m] = -INFINITY; }
    store(p, tOrO, lse, thread_idx, m_block, head, seqlen);
  }
};

}  // namespace flash3
