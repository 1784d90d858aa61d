// The call's device workspace (params.workspace): one buffer carved into the regions a call needs, each
// 256-byte aligned, in this order:
//  - FP8 inputs: V transposed (fp8_vt.h);
//  - split-KV (schedule.num_splits > 1): the float32 partial outputs and their LSEs, one slice per split,
//    written by the attention kernel and read by the combine kernel (combine.h).
// The layout is a function of the params with the schedule already resolved (api.cu plan_fwd), so the host
// that sizes the buffer and the launch code that fills it agree by construction.
#pragma once

#include <cstdint>

#include "fp8_vt.h"
#include "params.h"

namespace flash3 {

// Partial results of split-KV, shaped like out and lse with a leading split dimension:
//  o:   (split, batch entry, row, head, dim)  float32, dims contiguous
//  lse: (split, batch entry, head, row)       float32, rows contiguous (as the final lse)
// Batch entries: the batch for dense Q, 1 for packed (varlen) Q, whose sequences sit at their row offsets.
struct SplitAccumLayout {
  int32_t splits = 1;
  int32_t batches = 0;
  int32_t rows = 0;  // q.rows
  int32_t heads = 0;
  int32_t dims = 0;  // head_dim_v

  __host__ __device__ int64_t o_head_stride() const { return dims; }
  __host__ __device__ int64_t o_row_stride() const { return int64_t(heads) * dims; }
  __host__ __device__ int64_t o_batch_stride() const { return int64_t(rows) * heads * dims; }
  __host__ __device__ int64_t o_split_stride() const { return int64_t(batches) * rows * heads * dims; }
  __host__ __device__ int64_t lse_head_stride() const { return rows; }
  __host__ __device__ int64_t lse_batch_stride() const { return int64_t(heads) * rows; }
  __host__ __device__ int64_t lse_split_stride() const { return int64_t(batches) * heads * rows; }
  __host__ __device__ int64_t o_bytes() const { return o_split_stride() * splits * int64_t(sizeof(float)); }
  __host__ __device__ int64_t lse_bytes() const { return lse_split_stride() * splits * int64_t(sizeof(float)); }
};

__host__ __device__ inline int64_t round_up_256(int64_t x) { return (x + 255) / 256 * 256; }

struct WorkspaceLayout {
  int64_t vt_offset = 0;
  int64_t o_accum_offset = 0;
  int64_t lse_accum_offset = 0;
  int64_t total = 0;  // bytes; 0 = the call needs no workspace
  SplitAccumLayout accum;
};

// `p.schedule.num_splits` must be resolved (>= 1).
__host__ __device__ inline WorkspaceLayout workspace_layout(FwdParams const& p) {
  WorkspaceLayout w;
  int64_t offset = round_up_256(vt_workspace_bytes(p));
  int const splits = p.schedule.num_splits;
  if (splits > 1 && p.batch > 0 && p.q.rows > 0 && p.k.rows > 0 && p.num_heads > 0 && p.head_dim_v > 0) {
    w.accum.splits = splits;
    w.accum.batches = p.varlen.cu_seqlens_q != nullptr ? 1 : p.batch;
    w.accum.rows = p.q.rows;
    w.accum.heads = p.num_heads;
    w.accum.dims = p.head_dim_v;
    w.o_accum_offset = offset;
    offset += round_up_256(w.accum.o_bytes());
    w.lse_accum_offset = offset;
    offset += round_up_256(w.accum.lse_bytes());
  }
  w.total = offset;
  return w;
}

}  // namespace flash3
