// mha_fwd_standalone: the original standalone guide's call (flash_api_standalone.h says which conventions it
// keeps). It only translates the guide's arguments into one flash3_fwd_params and calls run_fwd; every rule
// is checked there. Features this build lacks are refused here by name, before anything is launched.
#include "flash_api_standalone.h"

#include <cmath>

#include "api.h"

namespace {

// The first argument, among those of features not built, that a caller set; nullptr if none.
char const* unbuilt_feature(void const* k_new, void const* v_new, void const* q_v, void const* cu_seqlens_k_new,
                            void const* page_table, void const* kv_batch_idx, void const* leftpad_k,
                            void const* rotary_cos, void const* rotary_sin, int attention_chunk, float softcap) {
  if (k_new || v_new || cu_seqlens_k_new) return "k_new/v_new: appending new keys and values is not implemented yet";
  if (q_v) return "q_v: is not implemented yet";
  if (page_table) return "page_table: paged KV is not implemented yet";
  if (kv_batch_idx) return "kv_batch_idx: is not implemented yet";
  if (leftpad_k) return "leftpad_k: is not implemented yet";
  if (rotary_cos || rotary_sin) return "rotary_cos/rotary_sin: rotary embedding is not implemented yet";
  if (attention_chunk != 0) return "attention_chunk: chunked attention is not implemented yet";
  if (softcap != 0.f) return "softcap: is not implemented yet";
  return nullptr;
}

}  // namespace

extern "C" flash3_status mha_fwd_standalone(
    void const* q, void const* k, void const* v, void const* k_new, void const* v_new, void const* q_v, void* out,
    void const* cu_seqlens_q, void const* cu_seqlens_k, void const* cu_seqlens_k_new, void const* seqused_q,
    void const* seqused_k, int max_seqlen_q, int max_seqlen_k, void const* page_table, void const* kv_batch_idx,
    void const* leftpad_k, void const* rotary_cos, void const* rotary_sin, void const* /*seqlens_rotary*/,
    void const* q_descale, void const* k_descale, void const* v_descale, void* scheduler_metadata, bool is_bf16,
    bool is_e4m3, int batch_size, int total_q, int num_heads, int head_size, int batch_size_k, int total_k,
    int num_heads_k, int head_size_v, int /*num_pages*/, int /*page_size*/, int /*seqlen_k_new*/,
    int /*rotary_dim*/, int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride,
    int64_t k_row_stride, int64_t k_head_stride, int64_t v_batch_stride, int64_t v_row_stride,
    int64_t v_head_stride, int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride,
    int64_t /*k_new_batch_stride*/, int64_t /*k_new_row_stride*/, int64_t /*k_new_head_stride*/,
    int64_t /*v_new_batch_stride*/, int64_t /*v_new_row_stride*/, int64_t /*v_new_head_stride*/,
    int64_t /*q_v_batch_stride*/, int64_t /*q_v_row_stride*/, int64_t /*q_v_head_stride*/,
    int64_t /*page_table_batch_stride*/, int64_t q_descale_batch_stride, int64_t q_descale_head_stride,
    int64_t k_descale_batch_stride, int64_t k_descale_head_stride, int64_t v_descale_batch_stride,
    int64_t v_descale_head_stride, float softmax_scale, bool is_causal, int window_size_left,
    int window_size_right, int attention_chunk, float softcap, bool /*is_rotary_interleaved*/, int num_splits,
    int pack_gqa, int sm_margin, void* softmax_lse, void* /*out_accum*/, void* /*softmax_lse_accum*/,
    cudaStream_t stream) {
  if (char const* what = unbuilt_feature(k_new, v_new, q_v, cu_seqlens_k_new, page_table, kv_batch_idx, leftpad_k,
                                         rotary_cos, rotary_sin, attention_chunk, softcap)) {
    return flash3::report_failure(FLASH3_NOT_COMPILED, what);
  }
  if (batch_size_k != batch_size) {
    return flash3::report_failure(FLASH3_INVALID_ARGUMENT, "batch_size_k: must equal batch_size");
  }
  bool const packed_q = cu_seqlens_q != nullptr, packed_k = cu_seqlens_k != nullptr;

  flash3::FwdParams p;
  p.dtype = is_e4m3 ? FLASH3_FLOAT8_E4M3 : is_bf16 ? FLASH3_BFLOAT16 : FLASH3_FLOAT16;
  p.out_dtype = is_e4m3 ? FLASH3_BFLOAT16 : p.dtype;
  p.q = {const_cast<void*>(q), q_batch_stride, q_row_stride, q_head_stride, packed_q ? total_q : max_seqlen_q};
  p.k = {const_cast<void*>(k), k_batch_stride, k_row_stride, k_head_stride, packed_k ? total_k : max_seqlen_k};
  p.v = {const_cast<void*>(v), v_batch_stride, v_row_stride, v_head_stride, packed_k ? total_k : max_seqlen_k};
  p.out = {out, o_batch_stride, o_row_stride, o_head_stride, p.q.rows};
  p.lse.ptr = static_cast<float*>(softmax_lse);
  p.lse.head_stride = p.q.rows;
  p.lse.batch_stride = packed_q ? 0 : int64_t(num_heads) * p.q.rows;
  p.batch = batch_size;
  p.num_heads = num_heads;
  p.num_heads_k = num_heads_k;
  p.head_dim = head_size;
  p.head_dim_v = head_size_v;
  p.varlen.cu_seqlens_q = static_cast<int32_t const*>(cu_seqlens_q);
  p.varlen.cu_seqlens_k = static_cast<int32_t const*>(cu_seqlens_k);
  p.varlen.seqused_q = static_cast<int32_t const*>(seqused_q);
  p.varlen.seqused_k = static_cast<int32_t const*>(seqused_k);
  p.varlen.max_seqlen_q = max_seqlen_q;
  p.varlen.max_seqlen_k = max_seqlen_k;
  p.mask.window_left = window_size_left < 0 ? -1 : window_size_left;
  p.mask.window_right = is_causal ? 0 : (window_size_right < 0 ? -1 : window_size_right);
  if ((q_descale || k_descale || v_descale) && !is_e4m3) {
    return flash3::report_failure(FLASH3_INVALID_ARGUMENT, "q/k/v_descale: only valid with is_e4m3 inputs");
  }
  // float32 (batch, num_heads_k) with the given element strides; NULL = 1.
  p.fp8.q = {static_cast<float const*>(q_descale), q_descale_batch_stride, q_descale_head_stride};
  p.fp8.k = {static_cast<float const*>(k_descale), k_descale_batch_stride, k_descale_head_stride};
  p.fp8.v = {static_cast<float const*>(v_descale), v_descale_batch_stride, v_descale_head_stride};
  p.softmax_scale = softmax_scale < 0.f ? 1.f / std::sqrt(float(head_size)) : softmax_scale;

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) { err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); }
  if (err != cudaSuccess) { return flash3::report_failure(FLASH3_CUDA_ERROR, cudaGetErrorString(err)); }
  if (sm_margin < 0 || sm_margin >= sms) {
    return flash3::report_failure(FLASH3_INVALID_ARGUMENT, "sm_margin: must be in [0, number of SMs)");
  }
  p.num_sms = sms - sm_margin;
  // The guide's "auto" is -1 for both; split-KV partials go to the library's own workspace (out_accum and
  // softmax_lse_accum, FA3's buffers of its own layout, are not needed and not written).
  p.schedule.num_splits = num_splits < 0 ? 0 : num_splits;
  p.schedule.pack_gqa = pack_gqa < 0 ? -1 : (pack_gqa > 0 ? 1 : 0);

  if (scheduler_metadata != nullptr) {
    err = cudaMemsetAsync(scheduler_metadata, 0, sizeof(int32_t), stream);
    if (err != cudaSuccess) { return flash3::report_failure(FLASH3_CUDA_ERROR, cudaGetErrorString(err)); }
    p.tile_counter = static_cast<int32_t*>(scheduler_metadata);
  }
  return flash3::run_fwd(p, stream, nullptr);
}
