// Where sequence `batch` lives in the (possibly packed) Q and K/V operands and how long it is.
// Precedence, as in FA3: seqused_* (rows actually used) > cu_seqlens_* difference > the static length.
#pragma once

#include <cstdint>

namespace flash3 {

struct SeqlenArgs {
  int32_t const* cu_seqlens_q = nullptr;
  int32_t const* cu_seqlens_k = nullptr;
  int32_t const* seqused_q = nullptr;
  int32_t const* seqused_k = nullptr;
  int seqlen_q = 0;  // static length (dense) or max_seqlen_q (varlen)
  int seqlen_k = 0;
};

struct SeqlenInfo {
  int offset_q;  // first row of this sequence in a packed Q/O (0 when dense: the batch index selects it)
  int offset_k;
  int seqlen_q;
  int seqlen_k;

  __device__ SeqlenInfo(SeqlenArgs const& a, int batch) {
    offset_q = a.cu_seqlens_q ? a.cu_seqlens_q[batch] : 0;
    offset_k = a.cu_seqlens_k ? a.cu_seqlens_k[batch] : 0;
    seqlen_q = a.seqused_q ? a.seqused_q[batch]
               : a.cu_seqlens_q ? a.cu_seqlens_q[batch + 1] - offset_q
                                : a.seqlen_q;
    seqlen_k = a.seqused_k ? a.seqused_k[batch]
               : a.cu_seqlens_k ? a.cu_seqlens_k[batch + 1] - offset_k
                                : a.seqlen_k;
  }
};

}  // namespace flash3
