/* flash3_fwd_params: the one seam between the callers (the torch binding in csrc/, the standalone runner, C
 * programs through flash_attn3.h) and the torch-free kernels of hopper/. It is a plain C struct of device
 * pointers, element strides and sizes named after the maths, with no torch and no CuTe types, so that C and
 * C++ see the same layout; the launch layer turns it into per-component CuTe Arguments. Booleans that can be
 * derived are not stored: varlen Q is `varlen.cu_seqlens_q != NULL`, GQA is `num_heads != num_heads_k`.
 *
 * In C++ every field starts at its documented default (FLASH3_DEFAULT); C code starts from
 * flash3_fwd_params_default() (flash_attn3.h), which returns the same values. */
#ifndef FLASH3_PARAMS_H_
#define FLASH3_PARAMS_H_

#include <stdint.h>

#ifdef __cplusplus
#define FLASH3_DEFAULT(value) = value
extern "C" {
#else
#define FLASH3_DEFAULT(value)
#endif

typedef enum flash3_dtype { FLASH3_FLOAT16 = 0, FLASH3_BFLOAT16 = 1, FLASH3_FLOAT8_E4M3 = 2 } flash3_dtype;

typedef enum flash3_status {
  FLASH3_SUCCESS = 0,
  FLASH3_NOT_COMPILED = 1,      /* no kernel was built for this (dtype, head dim, feature) combination */
  FLASH3_INVALID_ARGUMENT = 2,  /* a params field breaks a documented rule; flash3_last_error() says which */
  FLASH3_CUDA_ERROR = 3,        /* a CUDA call failed; flash3_last_cuda_error() holds its cudaError_t */
} flash3_status;

/* One attention operand: element pointer plus element strides of a (batch, row, head, dim) view whose last
 * dimension is contiguous, and its row count. Dense operands: `rows` rows per batch entry (the sequence
 * length). Packed varlen operands (total, head, dim): `rows` is the total, batch_stride is unused. The kernels
 * never read or write a row outside [0, rows), whatever the sequence metadata says. */
typedef struct flash3_operand {
  void* ptr FLASH3_DEFAULT(nullptr);
  int64_t batch_stride FLASH3_DEFAULT(0);
  int64_t row_stride FLASH3_DEFAULT(0);
  int64_t head_stride FLASH3_DEFAULT(0);
  int32_t rows FLASH3_DEFAULT(0);
} flash3_operand;

/* softmax_lse, fp32, natural log: dense (batch, num_heads, q.rows); varlen (num_heads, q.rows); the row
 * dimension is contiguous. */
typedef struct flash3_lse {
  float* ptr FLASH3_DEFAULT(nullptr);
  int64_t batch_stride FLASH3_DEFAULT(0); /* unused when Q is packed */
  int64_t head_stride FLASH3_DEFAULT(0);
} flash3_lse;

/* Variable-length batches: int32 device arrays, each may be NULL.
 *  cu_seqlens_*: (batch + 1) prefix sums: sequence b spans rows [cu[b], cu[b+1]) of the packed operand.
 *  seqused_*:    (batch) rows of sequence b actually used (<= its length). */
typedef struct flash3_varlen {
  int32_t const* cu_seqlens_q FLASH3_DEFAULT(nullptr);
  int32_t const* cu_seqlens_k FLASH3_DEFAULT(nullptr);
  int32_t const* seqused_q FLASH3_DEFAULT(nullptr);
  int32_t const* seqused_k FLASH3_DEFAULT(nullptr);
  int32_t max_seqlen_q FLASH3_DEFAULT(0); /* with cu_seqlens_q: the longest q sequence (sizes the grid) */
  int32_t max_seqlen_k FLASH3_DEFAULT(0); /* with cu_seqlens_k: the longest k sequence */
} flash3_varlen;

/* Where each batch entry's keys live in a KV cache (FA3's flash_attn_with_kvcache arguments); every field
 * optional (NULL / 0 = off).
 *  batch_idx: int32 (batch): cache row of batch entry b (k/v's batch entry, or the page table's row), so that
 *    a batch can be a subset or a permutation of the cache's rows; NULL = the identity. Entries outside
 *    [0, batch_rows) make the entry's key range empty (it reads nothing; O = 0, LSE = -inf).
 *  batch_rows: rows of the cache (k's batch size, or the page table's rows); required with batch_idx.
 *  leftpad: int32 (batch): first valid key of batch entry b; its keys are [leftpad[b], seqused_k[b]) of the
 *    cache row (seqused_k counts from index 0, as FA3's cache_seqlens).
 *  page_table: int32 (batch_rows, max_pages), row stride page_table_stride elements: a paged cache. k and v
 *    then describe (num_pages, page_size, head, dim) arrays: ptr, batch_stride = the page stride, row_stride,
 *    head_stride, and rows = max_pages * page_size, the keys a cache row can hold. Logical key j of cache row
 *    r is row j % page_size of page page_table[r][j / page_size]. Any page size >= 1. Only entries below a
 *    sequence's length are read; an entry outside [0, num_pages) reads zeros instead of memory. */
typedef struct flash3_kv_cache {
  int32_t const* batch_idx FLASH3_DEFAULT(nullptr);
  int32_t batch_rows FLASH3_DEFAULT(0);
  int32_t const* leftpad FLASH3_DEFAULT(nullptr);
  int32_t const* page_table FLASH3_DEFAULT(nullptr);
  int64_t page_table_stride FLASH3_DEFAULT(0);
  int32_t max_pages FLASH3_DEFAULT(0);
  int32_t page_size FLASH3_DEFAULT(0);
  int32_t num_pages FLASH3_DEFAULT(0);
} flash3_kv_cache;

/* Keys each query row may see, bottom-right aligned: query i of a sequence with lengths (sq, sk) sees keys
 * [i + sk - sq - window_left, i + sk - sq + window_right]; -1 means unbounded on that side. Causal is
 * window_right == 0 with window_left == -1 (and no chunk). chunk > 0 (FA3's attention_chunk, Llama 4's
 * chunked attention): besides, only keys of the query's own chunk [c, c + chunk), c = floor((i + sk - sq) /
 * chunk) * chunk; 0 = off. */
typedef struct flash3_mask {
  int32_t window_left FLASH3_DEFAULT(-1);
  int32_t window_right FLASH3_DEFAULT(-1);
  int32_t chunk FLASH3_DEFAULT(0);
} flash3_mask;

/* Context parallelism over the keys (decode context parallelism; the cp_world_size / cp_rank /
 * cp_tot_seqused_k arguments of vLLM's FA3 fork): each sequence's keys are dealt round-robin over
 * world_size ranks and this call holds rank `rank`'s share, so its key j is global key j * world_size + rank
 * of total_seqlen_k[b] keys in all. Only the causal mask depends on it: query i of a sequence of sq queries
 * (global position i + total - sq, bottom-right aligned on all the keys) sees local key j iff
 * j * world_size + rank <= i + total - sq. Rows that see none of this rank's keys end with O = 0,
 * LSE = -inf; the caller merges the ranks' (out, lse) (flash_attn_combine's rule). Sinks, if given, join
 * every rank's denominator: pass them on one rank only. world_size 1 = off (rank 0, total_seqlen_k unread);
 * not with a window or a chunk.
 *  total_seqlen_k: int32 (batch) device array of the sequences' global key counts; required with
 *    world_size > 1. */
typedef struct flash3_context_parallel {
  int32_t world_size FLASH3_DEFAULT(1);
  int32_t rank FLASH3_DEFAULT(0);
  int32_t const* total_seqlen_k FLASH3_DEFAULT(nullptr);
} flash3_context_parallel;

/* FP8 dequantisation scales, float32 (batch, num_heads_k) with any element strides (0 broadcasts one value);
 * NULL = 1. The q heads of a kv group share their q_descale. The kernel folds q_descale * k_descale into the
 * softmax scale and v_descale into the output's normalisation. */
typedef struct flash3_descale {
  float const* ptr FLASH3_DEFAULT(nullptr);
  int64_t batch_stride FLASH3_DEFAULT(0);
  int64_t head_stride FLASH3_DEFAULT(0);
} flash3_descale;

typedef struct flash3_fp8 {
  flash3_descale q, k, v;
} flash3_fp8;

/* How the work is cut into CTAs, with FA3's meanings.
 *  num_splits: split-KV (flash-decoding): the keys of one (sequence, head, query tile) are cut into this many
 *    contiguous ranges, each run by its own CTA into float32 partial outputs in the workspace, which a combine
 *    kernel then merges into out and lse. 1 = off; 0 = heuristic (from the batch, heads, lengths and SM
 *    count: hopper/api.cu plan_fwd); 2..256 forced (never more than the longest sequence has key blocks).
 *  pack_gqa: the q heads that share a kv head are packed into the rows of one query tile (row r of a tile is
 *    query r / g of head r % g of the group, g = num_heads / num_heads_k), so their K/V is read once instead of
 *    g times and short queries (decode) fill the tile. -1 = heuristic, 0 = off, 1 = on. */
typedef struct flash3_schedule {
  int32_t num_splits FLASH3_DEFAULT(1);
  int32_t pack_gqa FLASH3_DEFAULT(-1);
} flash3_schedule;

typedef struct flash3_fwd_params {
  flash3_dtype dtype FLASH3_DEFAULT(FLASH3_BFLOAT16);     /* of q, k, v */
  flash3_dtype out_dtype FLASH3_DEFAULT(FLASH3_BFLOAT16); /* of out: the input dtype (bf16 for fp8 inputs) */

  flash3_operand q, k, v, out;
  flash3_lse lse;

  int32_t batch FLASH3_DEFAULT(0);
  int32_t num_heads FLASH3_DEFAULT(0);
  int32_t num_heads_k FLASH3_DEFAULT(0);
  int32_t head_dim FLASH3_DEFAULT(0);   /* of q and k; runs on the next compiled head dim (80 -> 96) */
  int32_t head_dim_v FLASH3_DEFAULT(0); /* of v and out */

  flash3_varlen varlen;
  flash3_kv_cache kv_cache;
  flash3_mask mask;
  float softmax_scale FLASH3_DEFAULT(0.f); /* any finite value; 1/sqrt(head_dim) is the usual one */
  float softcap FLASH3_DEFAULT(0.f);       /* 0 = off */
  /* Attention sinks (gpt-oss; vLLM's s_aux, SGLang's sinks): float32 (num_heads), one learned logit per q head
   * that joins every row's softmax denominator (it attends to no value): out = sum_j e^{s_j} v_j / (e^{sink} +
   * sum_j e^{s_j}), LSE = log(e^{sink} + sum_j e^{s_j}). NULL = none. */
  float const* sinks FLASH3_DEFAULT(nullptr);

  int32_t num_sms FLASH3_DEFAULT(0); /* multiprocessors this call may use; 0 = all of the current device */

  /* Optional workspace: one zeroed int32 the kernel uses as a tile counter, so that causal and varlen
   * problems (tiles of unequal cost) are scheduled dynamically; NULL selects the static schedule. The
   * kernel leaves it non-zero: zero it again before the next call that passes it. */
  int32_t* tile_counter FLASH3_DEFAULT(nullptr);

  flash3_fp8 fp8; /* only read for FLASH3_FLOAT8_E4M3 inputs */

  flash3_schedule schedule;

  /* Optional device scratch memory of flash3_fwd_workspace_size(&params) bytes, 256-byte aligned, needed by
   * FP8 calls (they stage V transposed there: FP8 tensor-core operands must be K-major) and by split-KV calls
   * (their float32 partial outputs and LSEs). NULL: the call
   * takes it from the stream-ordered allocator (cudaMallocAsync / cudaFreeAsync on the call's stream). That is
   * capturable too, but a captured graph then holds memory-allocation nodes (CUDA restricts how such graphs
   * are instantiated and updated) and the default pool may return the memory to the system between calls:
   * pass an explicit workspace for graph capture and for the lowest latency. */
  void* workspace FLASH3_DEFAULT(nullptr);
  int64_t workspace_bytes FLASH3_DEFAULT(0);

  /* Last, so that the fields above keep the offsets they had before context parallelism was added. */
  flash3_context_parallel cp;
} flash3_fwd_params;

#ifdef __cplusplus
}  // extern "C"

// Usable in kernels too when compiled by nvcc; plain inline functions for the host-only C++ of csrc/.
#if defined(__CUDACC__)
#define FLASH3_HOST_DEVICE __host__ __device__
#else
#define FLASH3_HOST_DEVICE
#endif

namespace flash3 {

using FwdParams = flash3_fwd_params;
using Operand = flash3_operand;
using DType = flash3_dtype;
using Status = flash3_status;

// A chunk makes any mask a local one (the kLocal kernels carry the chunk bounds), as in FA3.
FLASH3_HOST_DEVICE inline bool is_causal(flash3_mask const& m) {
  return m.window_left < 0 && m.window_right == 0 && m.chunk <= 0;
}
FLASH3_HOST_DEVICE inline bool is_local(flash3_mask const& m) {
  return (m.window_left >= 0 || m.window_right >= 0 || m.chunk > 0) && !is_causal(m);
}
FLASH3_HOST_DEVICE inline bool is_varlen_q(FwdParams const& p) { return p.varlen.cu_seqlens_q != nullptr; }
FLASH3_HOST_DEVICE inline bool is_varlen_k(FwdParams const& p) { return p.varlen.cu_seqlens_k != nullptr; }
FLASH3_HOST_DEVICE inline bool is_paged(FwdParams const& p) { return p.kv_cache.page_table != nullptr; }
// Paged K/V that TMA cannot load one key block (of block_n rows) per box: the gather variant's calls.
FLASH3_HOST_DEVICE inline bool paged_needs_gather(FwdParams const& p, int block_n) {
  return is_paged(p) && !(p.kv_cache.page_size % block_n == 0 && p.kv_cache.leftpad == nullptr);
}
// Grid sizing: the longest q / k sequence.
FLASH3_HOST_DEVICE inline int32_t max_seqlen_q(FwdParams const& p) { return is_varlen_q(p) ? p.varlen.max_seqlen_q : p.q.rows; }
FLASH3_HOST_DEVICE inline int32_t max_seqlen_k(FwdParams const& p) { return is_varlen_k(p) ? p.varlen.max_seqlen_k : p.k.rows; }

}  // namespace flash3
#undef FLASH3_HOST_DEVICE
#endif

#undef FLASH3_DEFAULT
#endif /* FLASH3_PARAMS_H_ */
