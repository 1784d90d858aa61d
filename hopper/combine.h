// The split-KV combine: merges the float32 partial results of num_splits key ranges into one output,
//   lse = log sum_i exp(lse_i),   out = sum_i exp(lse_i - lse) * out_i,
// where a split with a non-finite or zero weight (lse_i = -inf: it saw no key) contributes nothing, so a row
// that no split saw ends with out = 0, lse = -inf (the convention of the attention kernel's empty rows).
// One kernel serves both callers: the split-KV path of the forward (partials in the workspace, workspace.h,
// rows located through the sequence metadata so that only the rows the attention kernel wrote are read and
// only the rows it would write are written) and the public flash_attn_combine (any strides, every row).
// Torch-free; no CuTe.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "seqlen.h"

namespace flash3 {

enum class CombineOut : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CombineParams {
  int num_splits = 0;  // 1..256
  int batch = 0;       // batch entries to walk
  int rows = 0;        // rows per batch entry (without metadata) or the longest sequence (with it)
  int heads = 0;
  int head_dim = 0;

  // Partials, element strides: o (split, batch, row, head, dim) with dim contiguous; lse (split, batch, row,
  // head).
  float const* o_partial = nullptr;
  int64_t o_split_stride = 0, o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  float const* lse_partial = nullptr;
  int64_t lse_split_stride = 0, lse_batch_stride = 0, lse_row_stride = 0, lse_head_stride = 0;

  // Results: out (batch, row, head, dim) with dim contiguous, in out_type; lse float32 (may be null).
  void* out = nullptr;
  CombineOut out_type = CombineOut::kFloat32;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;
  int64_t lse_out_batch_stride = 0, lse_out_row_stride = 0, lse_out_head_stride = 0;

  // With use_seqlen, sequence b covers rows [offset_q, offset_q + seqlen_q) of batch entry batch_q
  // (SeqlenInfo of the Q side); rows past its length are neither read nor written. Without it, batch entry b
  // has `rows` rows from row 0.
  bool use_seqlen = false;
  SeqlenArgs seqlen;

  // Attention sinks (float32, one logit per head, may be null): join every row's denominator, as if one more
  // split with that LSE and an output of zero.
  float const* sinks = nullptr;
};

// Launches the combine on `stream`; the caller has checked the params (api.cu).
cudaError_t launch_combine(CombineParams const& p, cudaStream_t stream);

}  // namespace flash3
