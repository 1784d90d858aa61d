// C++ face of the torch-free entry points (csrc/flash_api.cpp and hopper/standalone call these; C programs
// call the same functions through flash_attn3.h). Every function returns a Status; a CUDA failure is
// reported as FLASH3_CUDA_ERROR with the cudaError_t stored in *cuda_error so the caller can name it.
// Nothing here prints, synchronises the host or calls exit().
#pragma once

#include <cuda_runtime_api.h>

#include "flash_attn3.h"
#include "params.h"

namespace flash3 {

// How a call will run, as run_fwd resolves it: the kernel's tile, the split-KV and PackGQA choices (the
// heuristics of params.h's flash3_schedule applied) and the persistent grid.
struct FwdPlan {
  int block_m = 0;
  int block_n = 0;
  int num_splits = 1;
  bool pack_gqa = false;
  int num_m_blocks = 0;   // query tiles per (sequence, tile head), of packed rows with PackGQA
  int64_t num_tiles = 0;  // work tiles of the attention kernel
  int grid = 0;           // its CTAs (at most one per SM; two on the short FP8 tile)
  int num_sms = 0;
  int64_t workspace_bytes = 0;
};

// Checks `params` as run_fwd does and fills `plan` (which the call with these params would follow). The
// number of SMs is params.num_sms, or the current device's when 0.
Status plan_fwd(FwdParams const& params, FwdPlan* plan);

// Checks every rule the kernels rely on (see api.cu), then runs the forward pass described by `params` on
// `stream` with the compiled kernel for (dtype, head dim rounded up to a compiled one, mask). Returns
// FLASH3_NOT_COMPILED if that kernel was not built into this library; nothing is launched on any error.
Status run_fwd(FwdParams const& params, cudaStream_t stream, cudaError_t* cuda_error);

// FLASH3_NOT_COMPILED with a message naming the feature if the linked kernels cannot run `params` (a
// dtype, head dims or feature this build did not compile), FLASH3_SUCCESS otherwise. run_fwd calls it after
// the argument rules; the torch binding reaches it through run_fwd, so there is one such predicate.
Status check_supported(FwdParams const& params);

// The compiled head dim that serves a real head dim (the next compiled one), or 0 if none was built.
int compiled_head_dim(DType dtype, int head_dim);

// Human-readable text for a status, for error messages.
char const* status_string(Status status);

// Split-KV combine for flash_attn_combine (combine.h): checks the sizes and pointers, then launches.
struct CombineParams;
Status run_combine(CombineParams const& params, cudaStream_t stream, cudaError_t* cuda_error);

// Records `detail` as the message of the failure `status` (for front ends such as mha_fwd_standalone that
// reject a call before run_fwd) and returns `status`.
Status report_failure(Status status, char const* detail);

// Details of the last FLASH3_INVALID_ARGUMENT / FLASH3_NOT_COMPILED / FLASH3_CUDA_ERROR returned on this host
// thread ("" if none).
char const* last_error_detail();

}  // namespace flash3
