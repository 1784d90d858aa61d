/* flash_attn3.h: the torch-free C API of the flash_attn3 forward kernels (libflash_attn3.so, built by
 * build_standalone.sh). C and C++ programs fill one flash3_fwd_params (params.h) and call flash3_fwd on a
 * stream. Every function returns instead of aborting: a broken rule comes back as FLASH3_INVALID_ARGUMENT with
 * a message naming the field and the rule (flash3_last_error), before anything is launched. The library
 * never prints, never exits and never synchronises the host, so calls can be captured in a CUDA graph.
 *
 *   flash3_fwd_params p = flash3_fwd_params_default();
 *   p.dtype = p.out_dtype = FLASH3_FLOAT16;
 *   p.q = (flash3_operand){d_q, 0, num_heads * d, d, total_q};     // packed (total_q, heads, d)
 *   ...
 *   if (flash3_fwd(&p, stream) != FLASH3_SUCCESS) fprintf(stderr, "%s\n", flash3_last_error());
 *
 * hopper/standalone/example.c is a complete program. */
#ifndef FLASH3_FLASH_ATTN3_H_
#define FLASH3_FLASH_ATTN3_H_

#include <cuda_runtime_api.h>

#include "params.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A params struct holding every default (no mask, empty problem). */
flash3_fwd_params flash3_fwd_params_default(void);

/* Checks `params` and runs the forward pass on `stream`. */
flash3_status flash3_fwd(flash3_fwd_params const* params, cudaStream_t stream);

/* Bytes of device workspace the call described by `params` needs (params.workspace; 0 for 16-bit inputs).
 * FP8 calls stage V transposed there; without one they take it from cudaMallocAsync on the call's stream. */
int64_t flash3_fwd_workspace_size(flash3_fwd_params const* params);
/* The compiled head dim that serves `head_dim` (the next compiled one), or 0 if none was built. */
int flash3_compiled_head_dim(flash3_dtype dtype, int head_dim);

/* Text of a status code. */
char const* flash3_status_string(flash3_status status);

/* Details of the last failure on this host thread ("" after a success). */
char const* flash3_last_error(void);

/* The cudaError_t of the last FLASH3_CUDA_ERROR on this host thread (cudaSuccess otherwise). */
cudaError_t flash3_last_cuda_error(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif /* FLASH3_FLASH_ATTN3_H_ */
