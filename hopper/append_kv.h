// KV append with rotary embedding (FA3's flash_attn_with_kvcache(..., k=, v=, rotary_cos=, rotary_sin=)): before
// the attention of a decode / chunked-prefill step, the new keys and values are written into the cache at
// positions cache_seqlens[b] .. cache_seqlens[b] + s_new_b - 1 of the entry's cache row (dense or paged, through
// the same flash3_kv_cache as the attention), the new keys rotated; q is rotated into a copy; and the lengths
// after the append (cache_seqlens + s_new) are written for the attention to use as its seqused_k. One small
// kernel (16-byte chunks, one thread each), then the attention kernel in the same stream: the append is a
// separate launch (NOTES.md measures what it costs) rather than a stage of the attention kernel.
//
// Rotary (GPT-NeoX / GPT-J, FA3 semantics): cos/sin are (rows, rotary_dim / 2) in the element type, rows
// contiguous; dims [0, rotary_dim) of a row at position t are rotated by cos[t], sin[t]: interleaved pairs
// (2i, 2i + 1) with cos[t][i], or halves (i, i + rotary_dim / 2) with cos[t][i]; the rest is copied. The new
// key j of entry b is at position base_b + j, base_b = rotary_seqlens[b] if given, else cache_seqlens[b]; query
// i is at base_b + i when queries are causal / local (positions_per_query), else every query at base_b.
// Positions outside [0, rows) are clamped into it (the Python layer checks rows >= the cache's capacity).
//
// Memory safety: every write lands inside the cache row's capacity (positions outside it, cache rows or pages
// outside the cache are skipped), every read inside the new k/v / q operands (cu_seqlens_k_new clamped into
// k_new's rows). Torch-free; no CuTe.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "params.h"

namespace flash3 {

struct AppendKvParams {
  DType dtype = FLASH3_BFLOAT16;  // of the cache, k_new / v_new, q and cos / sin
  int32_t batch = 0;
  int32_t num_heads = 0;
  int32_t num_heads_k = 0;
  int32_t head_dim = 0;
  int32_t head_dim_v = 0;

  // The cache as the attention sees it: k/v operands (dense: rows = capacity per cache row; paged: see
  // flash3_kv_cache) and the entry -> cache row / page mapping. leftpad is not used here (positions count
  // from index 0 of the row, as cache_seqlens does).
  Operand k_cache, v_cache;
  flash3_kv_cache kv_cache;
  int32_t const* seqused_k = nullptr;  // cache_seqlens (batch)
  int32_t* seqused_out = nullptr;      // (batch): cache_seqlens + s_new, for the attention

  // New keys / values: (batch, s_new, head_k, dim) dense (rows = s_new), or packed (total, head_k, dim)
  // with cu_seqlens_k_new (rows = total).
  Operand k_new, v_new;
  int32_t const* cu_seqlens_k_new = nullptr;
  int32_t max_seqlen_k_new = 0;  // with cu_seqlens_k_new: the longest (checked; the grid covers k_new's rows)

  // Rotary (16-bit only); rotary_dim == 0: none (then q is not copied).
  void const* rotary_cos = nullptr;
  void const* rotary_sin = nullptr;
  int32_t rotary_dim = 0;
  int32_t rotary_rows = 0;
  int32_t const* rotary_seqlens = nullptr;
  bool rotary_interleaved = false;
  bool positions_per_query = false;
  // q and its rotated copy, same shape (strides of their own): dense (batch, s_q, head, dim) or packed with
  // cu_seqlens_q.
  Operand q, q_out;
  int32_t const* cu_seqlens_q = nullptr;
  int32_t max_seqlen_q = 0;
};

// Checks `params` (the rules above) and launches the append on `stream`.
Status run_append_kv(AppendKvParams const& params, cudaStream_t stream, cudaError_t* cuda_error);

}  // namespace flash3
