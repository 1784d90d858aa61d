// The KV append + rotary kernel (append_kv.h) and its checks.
#include "append_kv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "api.h"
#include "launch_utils.h"

namespace flash3 {
namespace {

constexpr int kThreads = 256;

template <class T>
__device__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}
template <class T>
__device__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Rows [begin, begin + count) of a new-keys / query operand hold entry b (packed: through cu_seqlens, clamped
// into the operand's rows; dense: batch entry b, all its rows).
struct Rows {
  int64_t first;  // element offset of row 0 of the entry (batch offset included)
  int64_t begin;  // packed: the entry's first row; dense: 0
  int count;
};
__device__ Rows entry_rows(Operand const& op, int32_t const* cu_seqlens, int b) {
  if (cu_seqlens == nullptr) { return {int64_t(b) * op.batch_stride, 0, op.rows}; }
  int64_t begin = cu_seqlens[b], end = cu_seqlens[b + 1];
  begin = begin < 0 ? 0 : (begin > op.rows ? op.rows : begin);
  end = end < begin ? begin : (end > op.rows ? op.rows : end);
  return {begin * op.row_stride, begin, int(end - begin)};
}

// The cache element of (entry b, position pos, head), or nullptr outside the cache (position past the row's
// capacity, cache row or page outside the cache).
template <class T>
__device__ T* cache_at(AppendKvParams const& p, Operand const& cache, int b, int64_t pos, int head) {
  flash3_kv_cache const& kv = p.kv_cache;
  int64_t row = b;
  if (kv.batch_idx != nullptr) {
    row = kv.batch_idx[b];
    if (row < 0 || row >= kv.batch_rows) { return nullptr; }
  }
  if (pos < 0 || pos >= cache.rows) { return nullptr; }
  T* const base = static_cast<T*>(cache.ptr) + int64_t(head) * cache.head_stride;
  if (kv.page_table != nullptr) {
    int64_t const page = kv.page_table[row * kv.page_table_stride + pos / kv.page_size];
    if (page < 0 || page >= kv.num_pages) { return nullptr; }
    return base + page * cache.batch_stride + (pos % kv.page_size) * cache.row_stride;
  }
  return base + row * cache.batch_stride + pos * cache.row_stride;
}

// The 16 bytes at column `col` of row `x`, rotated for position t (append_kv.h) where col < rotary_dim.
template <class T>
__device__ uint4 rotated_chunk(AppendKvParams const& p, T const* x, int col, int64_t t) {
  uint4 raw = *reinterpret_cast<uint4 const*>(x + col);
  if constexpr (sizeof(T) == 2) {
    if (col >= p.rotary_dim) { return raw; }
    constexpr int kElems = 8;
    int const half = p.rotary_dim / 2;
    t = t < 0 ? 0 : (t >= p.rotary_rows ? p.rotary_rows - 1 : t);
    T const* const cos = static_cast<T const*>(p.rotary_cos) + t * half;
    T const* const sin = static_cast<T const*>(p.rotary_sin) + t * half;
    T const* const v = reinterpret_cast<T const*>(&raw);
    T out[kElems];
    if (p.rotary_interleaved) {  // pairs (2i, 2i + 1), angle i
#pragma unroll
      for (int e = 0; e < kElems; e += 2) {
        int const i = (col + e) / 2;
        float const c = to_float(cos[i]), s = to_float(sin[i]);
        float const x0 = to_float(v[e]), x1 = to_float(v[e + 1]);
        out[e] = from_float<T>(x0 * c - x1 * s);
        out[e + 1] = from_float<T>(x0 * s + x1 * c);
      }
    } else {  // halves (i, i + half), angle i; half is a multiple of 8, so a chunk lies in one half
      bool const lower = col < half;
      uint4 const other_raw = *reinterpret_cast<uint4 const*>(x + (lower ? col + half : col - half));
      T const* const w = reinterpret_cast<T const*>(&other_raw);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        int const i = (lower ? col : col - half) + e;
        float const c = to_float(cos[i]), s = to_float(sin[i]);
        float const a = to_float(v[e]), o = to_float(w[e]);
        out[e] = from_float<T>(lower ? a * c - o * s : a * c + o * s);
      }
    }
    return *reinterpret_cast<uint4 const*>(out);
  } else {
    return raw;  // FP8: no rotary (checked on the host)
  }
}

// blockIdx.y == 0: the new K/V rows into the cache, and the lengths after the append; 1: q into q_out,
// rotated. One 16-byte chunk per thread and step of a grid-stride loop.
template <class T>
__global__ void __launch_bounds__(kThreads) append_kv_kernel(AppendKvParams p) {
  // The attention kernel after this one is a programmatic dependent (launch_fwd_sm90.h): let it launch now,
  // so that its CTAs' set-up (barriers, descriptor prefetch) overlaps this kernel; its griddepcontrol.wait
  // still waits for this grid's completion and writes before it touches memory. The trigger takes effect
  // once every CTA of this grid has run it or exited, so every CTA of this grid is resident by then.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  constexpr int kElems = 16 / int(sizeof(T));
  int64_t const stride = int64_t(gridDim.x) * kThreads;
  int64_t const first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (blockIdx.y == 0) {
    int const chunks_k = p.head_dim / kElems;
    int const chunks = chunks_k + p.head_dim_v / kElems;
    // Dense new tokens: (batch, s_new) rows. Packed: the total rows, each mapped to its entry by a binary
    // search of cu_seqlens_k_new (so the work is the rows, not batch x rows); a row outside its entry's clamped
    // range (lying metadata) is skipped.
    bool const packed = p.cu_seqlens_k_new != nullptr;
    int64_t const rows_total = packed ? int64_t(p.k_new.rows) : int64_t(p.batch) * p.k_new.rows;
    int64_t const total = rows_total * p.num_heads_k * chunks;
    for (int64_t i = first; i < total; i += stride) {
      int const c = int(i % chunks);
      int64_t rest = i / chunks;
      int const head = int(rest % p.num_heads_k);
      int64_t const row = rest / p.num_heads_k;  // new row: packed index, or b * s_new + j
      int b, j;
      if (packed) {
        int lo = 0, hi = p.batch - 1;  // the last entry whose start is <= t
        while (lo < hi) {
          int const mid = (lo + hi + 1) / 2;
          if (p.cu_seqlens_k_new[mid] <= row) { lo = mid; } else { hi = mid - 1; }
        }
        b = lo;
        Rows const r = entry_rows(p.k_new, p.cu_seqlens_k_new, b);
        int64_t const jj = row - r.begin;
        if (jj < 0 || jj >= r.count) { continue; }
        j = int(jj);
      } else {
        b = int(row / p.k_new.rows);
        j = int(row % p.k_new.rows);
      }
      bool const is_k = c < chunks_k;
      Operand const& src_op = is_k ? p.k_new : p.v_new;
      Rows const rows = entry_rows(src_op, p.cu_seqlens_k_new, b);
      if (j >= rows.count) { continue; }
      int64_t const base = p.seqused_k[b];
      T* const dst = cache_at<T>(p, is_k ? p.k_cache : p.v_cache, b, base + j, head);
      if (dst == nullptr) { continue; }
      T const* const src = static_cast<T const*>(src_op.ptr) + rows.first + int64_t(j) * src_op.row_stride +
                           int64_t(head) * src_op.head_stride;
      int const col = (is_k ? c : c - chunks_k) * kElems;
      int64_t const t = (p.rotary_seqlens != nullptr ? p.rotary_seqlens[b] : base) + j;
      *reinterpret_cast<uint4*>(dst + col) =
          is_k ? rotated_chunk(p, src, col, t) : *reinterpret_cast<uint4 const*>(src + col);
    }
    for (int64_t b = first; b < p.batch; b += stride) {
      p.seqused_out[b] = p.seqused_k[b] + entry_rows(p.k_new, p.cu_seqlens_k_new, int(b)).count;
    }
  } else {
    int const chunks = p.head_dim / kElems;
    int const max_q = p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.q.rows;
    int64_t const total = int64_t(p.batch) * max_q * p.num_heads * chunks;
    for (int64_t i = first; i < total; i += stride) {
      int const c = int(i % chunks);
      int64_t rest = i / chunks;
      int const head = int(rest % p.num_heads);
      rest /= p.num_heads;
      int const r = int(rest % max_q);
      int const b = int(rest / max_q);
      Rows const rows = entry_rows(p.q, p.cu_seqlens_q, b);
      if (r >= rows.count) { continue; }
      T const* const src = static_cast<T const*>(p.q.ptr) + rows.first + int64_t(r) * p.q.row_stride +
                           int64_t(head) * p.q.head_stride;
      // q_out has q's shape, with strides of its own.
      T* const dst = static_cast<T*>(p.q_out.ptr) + entry_rows(p.q_out, p.cu_seqlens_q, b).first +
                     int64_t(r) * p.q_out.row_stride + int64_t(head) * p.q_out.head_stride;
      int64_t const base = p.rotary_seqlens != nullptr ? p.rotary_seqlens[b] : p.seqused_k[b];
      int const col = c * kElems;
      *reinterpret_cast<uint4*>(dst + col) = rotated_chunk(p, src, col, p.positions_per_query ? base + r : base);
    }
  }
}

std::string str(int64_t v) { return std::to_string(v); }

bool aligned16(void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// An operand read or written in 16-byte chunks: aligned pointer, strides that keep rows aligned.
std::string chunk_rule(char const* name, Operand const& op, int elem_bytes, bool packed) {
  if (op.ptr == nullptr || !aligned16(op.ptr)) { return std::string(name) + ".ptr: must be a non-NULL 16-byte aligned pointer"; }
  for (int64_t s : {op.row_stride, op.head_stride, packed ? int64_t(0) : op.batch_stride}) {
    if (s < 0 || (s * elem_bytes) % 16 != 0) {
      return std::string(name) + ": strides must be non-negative multiples of 16 bytes, got " + str(s) + " elements";
    }
  }
  return {};
}

}  // namespace

Status run_append_kv(AppendKvParams const& p, cudaStream_t stream, cudaError_t* cuda_error) {
  if (cuda_error != nullptr) { *cuda_error = cudaSuccess; }
  auto bad = [](std::string const& m) { return report_failure(FLASH3_INVALID_ARGUMENT, m.c_str()); };
  bool const fp8 = p.dtype == FLASH3_FLOAT8_E4M3;
  if (p.dtype != FLASH3_FLOAT16 && p.dtype != FLASH3_BFLOAT16 && !fp8) { return bad("dtype: unknown value"); }
  int const elem_bytes = fp8 ? 1 : 2;
  int const chunk = 16 / elem_bytes;
  if (p.batch < 0 || p.num_heads <= 0 || p.num_heads_k <= 0) {
    return bad("batch, num_heads, num_heads_k: must be >= 0, >= 1, >= 1");
  }
  if (p.head_dim <= 0 || p.head_dim % chunk != 0 || p.head_dim_v <= 0 || p.head_dim_v % chunk != 0) {
    return bad("head_dim, head_dim_v: must be positive multiples of " + str(chunk) + " elements (16 bytes)");
  }
  if (p.seqused_k == nullptr || p.seqused_out == nullptr) {
    return bad("seqused_k, seqused_out: the cache lengths before and after the append are required");
  }
  if (p.k_new.rows < 0 || (p.cu_seqlens_k_new != nullptr && (p.max_seqlen_k_new < 0 || p.max_seqlen_k_new > p.k_new.rows))) {
    return bad("k_new.rows / max_seqlen_k_new: must be >= 0, and max_seqlen_k_new <= k_new.rows");
  }
  if (p.rotary_dim != 0) {
    if (fp8) { return report_failure(FLASH3_NOT_COMPILED, "rotary embedding of float8_e4m3fn inputs is not implemented"); }
    if (p.rotary_dim < 0 || p.rotary_dim % 16 != 0 || p.rotary_dim > p.head_dim || p.rotary_rows < 1 ||
        p.rotary_cos == nullptr || p.rotary_sin == nullptr) {
      return bad("rotary: rotary_dim must be a multiple of 16 in [16, head_dim] with cos/sin of >= 1 rows, got "
                 "rotary_dim " + str(p.rotary_dim) + ", rows " + str(p.rotary_rows));
    }
    if (p.q.rows < 0 || (p.cu_seqlens_q != nullptr && (p.max_seqlen_q < 0 || p.max_seqlen_q > p.q.rows))) {
      return bad("q.rows / max_seqlen_q: must be >= 0, and max_seqlen_q <= q.rows");
    }
  }
  if (p.batch == 0) { return FLASH3_SUCCESS; }
  std::string rule;
  for (auto [name, op, packed] : {std::tuple{"k_cache", &p.k_cache, false}, std::tuple{"v_cache", &p.v_cache, false},
                                  std::tuple{"k_new", &p.k_new, p.cu_seqlens_k_new != nullptr},
                                  std::tuple{"v_new", &p.v_new, p.cu_seqlens_k_new != nullptr}}) {
    if (rule.empty()) { rule = chunk_rule(name, *op, elem_bytes, packed); }
  }
  if (rule.empty() && p.rotary_dim != 0) {
    rule = chunk_rule("q", p.q, elem_bytes, p.cu_seqlens_q != nullptr);
    if (rule.empty()) { rule = chunk_rule("q_out", p.q_out, elem_bytes, p.cu_seqlens_q != nullptr); }
  }
  if (!rule.empty()) { return bad(rule); }
  flash3_kv_cache const& kv = p.kv_cache;
  if (kv.batch_idx != nullptr && kv.batch_rows <= 0) { return bad("kv_cache.batch_rows: must be >= 1 with batch_idx"); }
  if (kv.page_table != nullptr && (kv.page_size < 1 || kv.num_pages < 1)) {
    return bad("kv_cache: a page table needs page_size >= 1 and num_pages >= 1");
  }

  int64_t const new_rows = p.cu_seqlens_k_new != nullptr ? int64_t(p.k_new.rows) : int64_t(p.batch) * p.k_new.rows;
  int64_t const kv_chunks = new_rows * p.num_heads_k * (p.head_dim + p.head_dim_v) / chunk;
  int64_t const q_chunks = p.rotary_dim != 0 ? int64_t(p.batch) *
                                                   (p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.q.rows) *
                                                   p.num_heads * (p.head_dim / chunk)
                                             : 0;
  int64_t const most = kv_chunks > q_chunks ? kv_chunks : q_chunks;
  int64_t blocks = (most + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks);  // grid-stride beyond that
  dim3 const grid(unsigned(blocks), p.rotary_dim != 0 ? 2u : 1u);
  auto const kernel = p.dtype == FLASH3_FLOAT16    ? append_kv_kernel<__half>
                      : p.dtype == FLASH3_BFLOAT16 ? append_kv_kernel<__nv_bfloat16>
                                                   : append_kv_kernel<uint8_t>;
  cudaError_t err = prefer_max_shared_carveout(kernel);
  if (err == cudaSuccess) {
    kernel<<<grid, kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) {
    if (cuda_error != nullptr) { *cuda_error = err; }
    return report_failure(FLASH3_CUDA_ERROR, cudaGetErrorString(err));
  }
  return FLASH3_SUCCESS;
}

}  // namespace flash3
