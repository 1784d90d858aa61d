// FwdParams: the one seam between the torch binding (csrc/) and the torch-free kernels (hopper/).
// It is a plain struct of device pointers, element strides and sizes named after the maths. It holds no
// torch and no CuTe types, so csrc/ can fill it, the standalone runner can fill it, and the launch layer
// turns it into per-component CuTe Arguments. Booleans that can be derived are not stored: varlen Q is
// `cu_seqlens_q != nullptr`, GQA is `num_heads != num_heads_k`.
#pragma once

#include <cstdint>

namespace flash3 {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat8E4M3 = 2 };

// One attention operand: element pointer plus element strides of a (batch, row, head, dim) view whose last
// dimension is contiguous. For varlen operands (total, head, dim) batch_stride is unused (0).
struct Operand {
  void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
};

// Variable-length batches. All pointers are int32 device arrays; any of them may be null.
//  cu_seqlens_*: (batch + 1) prefix sums: sequence b spans rows [cu[b], cu[b+1]) of the packed operand.
//  seqused_*:    (batch) number of rows of sequence b actually used (<= its allocated length).
struct Varlen {
  int32_t const* cu_seqlens_q = nullptr;
  int32_t const* cu_seqlens_k = nullptr;
  int32_t const* seqused_q = nullptr;
  int32_t const* seqused_k = nullptr;
};

// Key range each query row may see, bottom-right aligned (query i of a sequence with lengths (sq, sk) sees
// keys [i + sk - sq - window_left, i + sk - sq + window_right]); negative means unbounded on that side.
// Causal is window_right == 0 with window_left < 0.
struct MaskSpec {
  int32_t window_left = -1;
  int32_t window_right = -1;
  bool is_causal() const { return window_left < 0 && window_right == 0; }
  bool is_local() const { return (window_left >= 0 || window_right >= 0) && !is_causal(); }
};

struct FwdParams {
  DType dtype = DType::kBFloat16;      // of q, k, v
  DType out_dtype = DType::kBFloat16;  // of out (bf16 when inputs are fp8)

  Operand q, k, v, out;
  // softmax_lse, fp32, natural log: dense (batch, num_heads, seqlen_q); varlen (num_heads, total_q).
  float* softmax_lse = nullptr;
  int64_t lse_batch_stride = 0;
  int64_t lse_head_stride = 0;

  int32_t batch = 0;
  int32_t seqlen_q = 0;  // dense: the sequence length; varlen: max_seqlen_q (grid sizing only)
  int32_t seqlen_k = 0;  // dense: the sequence length; varlen: max_seqlen_k
  int32_t total_q = 0;   // rows of the packed q (varlen), batch * seqlen_q otherwise
  int32_t total_k = 0;   // rows of the packed k/v (varlen), batch * seqlen_k otherwise
  int32_t num_heads = 0;
  int32_t num_heads_k = 0;
  int32_t head_dim = 0;    // real head dim of q and k (<= the compiled one)
  int32_t head_dim_v = 0;  // real head dim of v and out

  Varlen varlen;
  MaskSpec mask;
  float softmax_scale = 0.f;
  float softcap = 0.f;  // 0 = off

  int32_t num_sms = 0;  // multiprocessors available to this call (device count minus sm_margin)

  // Optional workspace: one zeroed int32 the kernel uses as a tile counter, so that causal and varlen
  // problems (tiles of unequal cost) are scheduled dynamically; null selects the static schedule.
  int32_t* tile_counter = nullptr;
};

// Status codes of the torch-free API. csrc/ turns them into Python exceptions with the message from
// status_string(); CUDA errors are passed through as kCudaError with the cudaError_t kept by the caller.
enum class Status : int32_t {
  kSuccess = 0,
  kNotCompiled = 1,     // no kernel was built for this (dtype, head dim, feature) combination
  kInvalidArgument = 2, // a params field breaks a rule the Python/C++ checks should have caught
  kCudaError = 3,
};

}  // namespace flash3
