// Torch-free entry points of the kernel library. csrc/flash_api.cpp and hopper/standalone call only these.
// Every function returns a Status; a CUDA failure is reported as Status::kCudaError with the cudaError_t
// stored in *cuda_error so the caller can name it. Nothing here synchronises the host or calls exit().
#pragma once

#include <cuda_runtime_api.h>

#include "params.h"

namespace flash3 {

// Runs the forward pass described by `params` on `stream`. Chooses the compiled kernel for
// (dtype, head dim rounded up to a compiled one, causal) and returns kNotCompiled if that kernel was not
// built into this library.
Status run_fwd(FwdParams const& params, cudaStream_t stream, cudaError_t* cuda_error);

// The compiled head dim that serves a real head dim (the next compiled one), or 0 if none was built.
int compiled_head_dim(DType dtype, int head_dim);

// Human-readable text for a status, for error messages.
char const* status_string(Status status);

// Details of the last kInvalidArgument / kNotCompiled returned on this host thread ("" if none).
char const* last_error_detail();

}  // namespace flash3
