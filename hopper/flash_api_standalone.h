/* flash_api_standalone.h: mha_fwd_standalone, the call of the original standalone guide
 * (shared/spec/standalone-guide.md, "API Usage"), with its argument order, so that code written against the
 * guide compiles and links unchanged against libflash_attn3.so. It only fills a flash3_fwd_params and calls
 * flash3_fwd (flash_attn3.h), which is the primary entry point; new code should use that directly.
 *
 * Conventions of the guide that this wrapper keeps:
 *  - Without cu_seqlens_q the operands are dense (batch, seqlen, heads, dim) with max_seqlen_q rows per batch
 *    entry; with it they are packed (total_q, heads, dim). Likewise for k/v with cu_seqlens_k.
 *  - softmax_lse is (num_heads, total_q) when packed, (batch, num_heads, max_seqlen_q) when dense.
 *  - softmax_scale < 0 means 1/sqrt(head_size) (the guide passes -1.0 for "auto").
 *  - window_size -1 = unbounded; is_causal sets the right side to 0.
 *  - num_splits: -1 (or 0) = heuristic, 1 = no split-KV, 2..256 forced; pack_gqa: -1 = heuristic, 0 off, 1 on;
 *    sm_margin SMs are left free. Split-KV partials live in the library's workspace (taken from
 *    cudaMallocAsync on `stream`); out_accum / softmax_lse_accum are accepted and not used.
 *  - scheduler_metadata (optional, >= 1 int32 of device memory) is used as the kernel's tile-counter
 *    workspace: its first int32 is zeroed on `stream` before each launch, so one allocation serves every
 *    call on that stream. NULL selects the static schedule.
 * Arguments for features this build does not have (k_new/v_new, q_v, paged KV, kv_batch_idx, leftpad_k,
 * rotary, attention_chunk, softcap) must be NULL / 0; otherwise the
 * call returns FLASH3_NOT_COMPILED naming the feature. Pointer arguments are untyped so that callers may
 * pass int*, float* or void* device pointers as the guide's snippet does. */
#ifndef FLASH3_FLASH_API_STANDALONE_H_
#define FLASH3_FLASH_API_STANDALONE_H_

#include <stdbool.h>
#include <stdint.h>

#include "flash_attn3.h"

#ifdef __cplusplus
extern "C" {
#endif

flash3_status mha_fwd_standalone(
    void const* q, void const* k, void const* v, void const* k_new, void const* v_new, void const* q_v, void* out,
    void const* cu_seqlens_q, void const* cu_seqlens_k, void const* cu_seqlens_k_new, void const* seqused_q,
    void const* seqused_k, int max_seqlen_q, int max_seqlen_k, void const* page_table, void const* kv_batch_idx,
    void const* leftpad_k, void const* rotary_cos, void const* rotary_sin, void const* seqlens_rotary,
    void const* q_descale, void const* k_descale, void const* v_descale, void* scheduler_metadata, bool is_bf16,
    bool is_e4m3, int batch_size, int total_q, int num_heads, int head_size, int batch_size_k, int total_k,
    int num_heads_k, int head_size_v, int num_pages, int page_size, int seqlen_k_new, int rotary_dim,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride,
    int64_t k_row_stride, int64_t k_head_stride, int64_t v_batch_stride, int64_t v_row_stride,
    int64_t v_head_stride, int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride,
    int64_t k_new_batch_stride, int64_t k_new_row_stride, int64_t k_new_head_stride, int64_t v_new_batch_stride,
    int64_t v_new_row_stride, int64_t v_new_head_stride, int64_t q_v_batch_stride, int64_t q_v_row_stride,
    int64_t q_v_head_stride, int64_t page_table_batch_stride, int64_t q_descale_batch_stride,
    int64_t q_descale_head_stride, int64_t k_descale_batch_stride, int64_t k_descale_head_stride,
    int64_t v_descale_batch_stride, int64_t v_descale_head_stride, float softmax_scale, bool is_causal,
    int window_size_left, int window_size_right, int attention_chunk, float softcap, bool is_rotary_interleaved,
    int num_splits, int pack_gqa, int sm_margin, void* softmax_lse, void* out_accum, void* softmax_lse_accum,
    cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif /* FLASH3_FLASH_API_STANDALONE_H_ */
