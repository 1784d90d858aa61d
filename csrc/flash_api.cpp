// flash_api.cpp: the one C++ file that includes torch. It registers the `flash_attn3::fwd` operator schema and
// its CUDA implementation, re-checks the arguments that Python has already validated (cheaply, with messages
// that name the argument and the rule, so that a direct `torch.ops.flash_attn3.fwd` call with bad input raises
// a Python exception instead of faulting on the device), rejects features the kernels do not implement yet
// with NotImplementedError, translates tensors into the torch-free `flash3::FwdParams`, and calls
// `flash3::run_fwd` on the current stream, turning its Status into an exception. It never synchronises the
// host, so the op can be captured in a CUDA graph. It also defines the empty Python module `flash_attn3._C`,
// whose only purpose is that `import flash_attn3._C` loads this library and runs the static registrations.
// Python.h first: it sets feature macros that must precede the standard headers.
#include <Python.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../hopper/api.h"
#include "../hopper/append_kv.h"
#include "../hopper/combine.h"
#include "../hopper/params.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMaxHeadDim = 256;
// TMA (which loads Q/K/V and stores O) needs 16-byte aligned base addresses and non-unit strides.
constexpr int64_t kTmaAlignBytes = 16;

// Per-device facts the op needs on every call. Read once per device with cudaDeviceGetAttribute rather than
// through ATen's device-properties cache: that header drags in cuBLAS/cuSPARSE/cuSOLVER headers, which a
// minimal CUDA toolkit does not ship and this file has no other use for.
struct DeviceInfo {
  int num_sms = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

void check_cuda(cudaError_t err, char const* what) {
  TORCH_CHECK(err == cudaSuccess, "flash_attn3 fwd: CUDA error in ", what, ": ", cudaGetErrorString(err));
}

DeviceInfo const& device_info(c10::DeviceIndex device) {
  static std::array<DeviceInfo, C10_COMPILE_TIME_MAX_GPUS> infos;
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "flash_attn3 fwd: bad CUDA device index ", device);
  // call_once lets a throwing initialiser be retried by the next call, so a failed query is not cached.
  std::call_once(once[device], [device] {
    DeviceInfo info;
    check_cuda(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device), "SM count");
    check_cuda(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device), "capability");
    check_cuda(cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, device), "capability");
    infos[device] = info;
  });
  return infos[device];
}

// The params struct holds 32-bit sizes; anything larger would wrap silently in the kernel's index maths.
int32_t to_int32(int64_t value, char const* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int32_t>::max(), "flash_attn3: ", name,
              " must be in [0, 2^31), got ", value);
  return static_cast<int32_t>(value);
}

void check_same_device(at::Tensor const& t, char const* name, at::Tensor const& q) {
  TORCH_CHECK(t.is_cuda(), "flash_attn3 fwd: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "flash_attn3 fwd: ", name, " must be on the same device as q (", q.device(),
              "), got ", t.device());
}

void check_shape(at::Tensor const& t, char const* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "flash_attn3 fwd: ", name, " must have shape ", expected, ", got ", t.sizes());
}

// An attention operand: (batch, row, head, dim) dense or (total, head, dim) packed, last dim contiguous.
void check_operand(at::Tensor const& t, char const* name, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, "flash_attn3 fwd: ", name, " must be ", rank, "-D (",
              rank == 4 ? "batch, seqlen, heads, head_dim" : "total_tokens, heads, head_dim", "), got ", t.dim(),
              "-D");
  TORCH_CHECK(t.stride(-1) == 1, "flash_attn3 fwd: ", name,
              " must have a contiguous last dimension (stride(-1) == 1), got strides ", t.strides());
}

// The stride the kernel is given for dimension i. A size-1 dimension is never stepped over, so torch may
// leave any value there (as_strided, some views); it is replaced by the stride a packed layout would have,
// which keeps TMA descriptors valid without changing a single address.
int64_t effective_stride(at::Tensor const& t, int64_t i) {
  if (i + 1 == t.dim() || t.size(i) != 1) return t.stride(i);
  return t.size(i + 1) * effective_stride(t, i + 1);
}

// Checked after the head-dim rules, whose message is the more useful one when both fail.
void check_tma_aligned(at::Tensor const& t, char const* name) {
  auto const elt = static_cast<int64_t>(t.element_size());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kTmaAlignBytes == 0, "flash_attn3 fwd: ", name,
              " must start at a 16-byte aligned address (TMA requirement)");
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    TORCH_CHECK((effective_stride(t, i) * elt) % kTmaAlignBytes == 0, "flash_attn3 fwd: ", name,
                " strides must be multiples of 16 bytes except the last (TMA requirement), got strides ", t.strides(),
                " for element size ", elt);
  }
}

// Sequence metadata: int32 device arrays read directly by the kernel, so they must be dense.
void check_metadata(OptTensor const& t, char const* name, int64_t expected_len, char const* len_rule,
                    at::Tensor const& q) {
  if (!t.has_value()) return;
  check_same_device(*t, name, q);
  TORCH_CHECK(t->scalar_type() == at::kInt, "flash_attn3 fwd: ", name, " must be int32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->is_contiguous(), "flash_attn3 fwd: ", name,
              " must be a contiguous 1-D tensor, got shape ",
              t->sizes(), " strides ", t->strides());
  TORCH_CHECK(t->size(0) == expected_len, "flash_attn3 fwd: ", name, " must have ", expected_len, " entries (",
              len_rule, "), got ", t->size(0));
}

flash3::Operand operand(at::Tensor const& t) {
  flash3::Operand op;
  op.ptr = t.data_ptr();
  if (t.dim() == 4) {
    op.batch_stride = effective_stride(t, 0);
    op.row_stride = effective_stride(t, 1);
    op.head_stride = effective_stride(t, 2);
    op.rows = to_int32(t.size(1), "seqlen");
  } else {  // packed varlen: sequences are located through cu_seqlens, not a batch stride
    op.batch_stride = 0;
    op.row_stride = effective_stride(t, 0);
    op.head_stride = effective_stride(t, 1);
    op.rows = to_int32(t.size(0), "total tokens");
  }
  return op;
}

// An FP8 dequantisation scale: float32 (batch, num_heads_k) on q's device, any strides; absent = 1.
flash3_descale descale(OptTensor const& t, char const* name, int64_t batch, int64_t num_heads_k, bool is_fp8,
                       at::Tensor const& q) {
  flash3_descale d;
  if (!t.has_value()) { return d; }
  TORCH_CHECK(is_fp8, "flash_attn3 fwd: ", name, " is only valid with float8_e4m3fn inputs, got ", q.scalar_type());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "flash_attn3 fwd: ", name, " must be float32, got ", t->scalar_type());
  check_same_device(*t, name, q);
  check_shape(*t, name, {batch, num_heads_k});
  d.ptr = t->data_ptr<float>();
  d.batch_stride = t->stride(0);
  d.head_stride = t->stride(1);
  TORCH_CHECK(d.batch_stride >= 0 && d.head_stride >= 0, "flash_attn3 fwd: ", name, " must have strides >= 0, got ",
              t->strides());
  return d;
}

flash3::DType to_dtype(at::ScalarType t) {
  if (t == at::kHalf) return FLASH3_FLOAT16;
  if (t == at::kBFloat16) return FLASH3_BFLOAT16;
  TORCH_CHECK(t == at::kFloat8_e4m3fn, "flash_attn3 fwd: q must be float16, bfloat16 or float8_e4m3fn, got ", t);
  return FLASH3_FLOAT8_E4M3;
}

void not_implemented_if(bool used, char const* feature) {
  TORCH_CHECK_NOT_IMPLEMENTED(!used, "flash_attn3: ", feature, " is not implemented yet");
}

void fwd(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v, at::Tensor& out, at::Tensor& softmax_lse,
         OptTensor const& cu_seqlens_q, OptTensor const& cu_seqlens_k, OptTensor const& seqused_q,
         OptTensor const& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, OptTensor const& page_table,
         OptTensor const& kv_batch_idx, OptTensor const& leftpad_k, OptTensor const& q_descale,
         OptTensor const& k_descale, OptTensor const& v_descale, double softmax_scale, int64_t window_size_left,
         int64_t window_size_right, int64_t attention_chunk, double softcap, OptTensor const& sinks,
         int64_t num_splits, int64_t pack_gqa, int64_t sm_margin) {
  // ---- devices and dtypes ----
  TORCH_CHECK(q.is_cuda(), "flash_attn3 fwd: q must be a CUDA tensor, got device ", q.device());
  check_same_device(k, "k", q);
  check_same_device(v, "v", q);
  check_same_device(out, "out", q);
  check_same_device(softmax_lse, "softmax_lse", q);
  flash3::DType const dtype = to_dtype(q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flash_attn3 fwd: q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  bool const is_fp8 = dtype == FLASH3_FLOAT8_E4M3;
  at::ScalarType const out_type = is_fp8 ? at::kBFloat16 : q.scalar_type();
  TORCH_CHECK(out.scalar_type() == out_type, "flash_attn3 fwd: out must have dtype ", out_type,
              is_fp8 ? " (bfloat16 for float8 inputs)" : " (the dtype of q)", ", got ", out.scalar_type());
  TORCH_CHECK(softmax_lse.scalar_type() == at::kFloat, "flash_attn3 fwd: softmax_lse must be float32, got ",
              softmax_lse.scalar_type());

  // ---- scalar ranges: the op is reachable directly (torch.ops, compiled graphs), so Python's checks are
  // repeated here rather than trusted ----
  TORCH_CHECK(num_splits <= 256, "flash_attn3 fwd: num_splits must be <= 256 (<= 0 = heuristic, 1 = no split), got ",
              num_splits);
  num_splits = num_splits < 0 ? 0 : num_splits;  // FA3: any value <= 0 selects the heuristic
  TORCH_CHECK(pack_gqa >= -1 && pack_gqa <= 1, "flash_attn3 fwd: pack_gqa must be -1 (heuristic), 0 or 1, got ",
              pack_gqa);
  TORCH_CHECK(std::isfinite(softmax_scale), "flash_attn3 fwd: softmax_scale must be finite, got ", softmax_scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "flash_attn3 fwd: softcap must be finite and >= 0 (0 = off), got ",
              softcap);
  TORCH_CHECK(window_size_left >= -1 && window_size_right >= -1,
              "flash_attn3 fwd: window_size_left/right must be >= -1 (-1 = unbounded), got (", window_size_left, ", ",
              window_size_right, ")");
  TORCH_CHECK(window_size_left <= std::numeric_limits<int32_t>::max() &&
                  window_size_right <= std::numeric_limits<int32_t>::max(),
              "flash_attn3 fwd: window_size_left/right must be < 2^31, got (", window_size_left, ", ",
              window_size_right, ")");
  TORCH_CHECK(attention_chunk >= 0 && attention_chunk <= std::numeric_limits<int32_t>::max(),
              "flash_attn3 fwd: attention_chunk must be in [0, 2^31) (0 = off), got ", attention_chunk);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "flash_attn3 fwd: max_seqlen_q/k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);

  // ---- features the kernels do not have yet: fail loudly rather than compute something else ----
  // What FwdParams can express (dtype, head dims, softcap, windows) is judged by flash3::check_supported,
  // through run_fwd below: the kernel table is the one record of what was built.

  // ---- ranks and shapes ----
  bool const varlen_q = cu_seqlens_q.has_value();
  bool const varlen_k = cu_seqlens_k.has_value();
  check_operand(q, "q", varlen_q ? 3 : 4);
  check_operand(k, "k", varlen_k ? 3 : 4);
  check_operand(v, "v", varlen_k ? 3 : 4);
  check_operand(out, "out", varlen_q ? 3 : 4);

  TORCH_CHECK(!varlen_q || (cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) >= 2),
              "flash_attn3 fwd: cu_seqlens_q must be 1-D with batch + 1 >= 2 entries, got shape ",
              varlen_q ? cu_seqlens_q->sizes() : at::IntArrayRef{});
  TORCH_CHECK(!varlen_k || (cu_seqlens_k->dim() == 1 && cu_seqlens_k->size(0) >= 2),
              "flash_attn3 fwd: cu_seqlens_k must be 1-D with batch + 1 >= 2 entries, got shape ",
              varlen_k ? cu_seqlens_k->sizes() : at::IntArrayRef{});
  int64_t const batch = varlen_q ? cu_seqlens_q->size(0) - 1 : q.size(0);
  bool const paged = page_table.has_value();
  TORCH_CHECK(!(paged && varlen_k), "flash_attn3 fwd: page_table cannot be combined with cu_seqlens_k");
  TORCH_CHECK(!(kv_batch_idx.has_value() && varlen_k), "flash_attn3 fwd: kv_batch_idx cannot be combined with cu_seqlens_k");
  if (paged) {
    check_same_device(*page_table, "page_table", q);
    TORCH_CHECK(page_table->scalar_type() == at::kInt, "flash_attn3 fwd: page_table must be int32, got ",
                page_table->scalar_type());
    TORCH_CHECK(page_table->dim() == 2 && page_table->stride(-1) == 1 && page_table->size(1) >= 1,
                "flash_attn3 fwd: page_table must be 2-D (batch, max_pages >= 1) with a contiguous last dimension, "
                "got shape ", page_table->sizes(), " strides ", page_table->strides());
  }
  // Cache rows: k's batch entries, or the page table's rows; kv_batch_idx maps each batch entry to one.
  int64_t const batch_k = varlen_k ? cu_seqlens_k->size(0) - 1 : paged ? page_table->size(0) : k.size(0);
  TORCH_CHECK(kv_batch_idx.has_value() || batch == batch_k, "flash_attn3 fwd: q and k must have the same batch size, got ",
              batch, " and ", batch_k,
              paged ? " (rows of page_table)" : varlen_q || varlen_k ? " (batch of a varlen operand is cu_seqlens.size(0) - 1)"
                                                                     : "");
  check_metadata(kv_batch_idx, "kv_batch_idx", batch, "batch", q);
  check_metadata(leftpad_k, "leftpad_k", batch, "batch", q);
  check_metadata(cu_seqlens_q, "cu_seqlens_q", batch + 1, "batch + 1", q);
  check_metadata(cu_seqlens_k, "cu_seqlens_k", batch + 1, "batch + 1", q);
  check_metadata(seqused_q, "seqused_q", batch, "batch", q);
  check_metadata(seqused_k, "seqused_k", batch, "batch", q);

  int64_t const total_q = varlen_q ? q.size(0) : q.size(0) * q.size(1);
  int64_t const total_k = varlen_k ? k.size(0) : k.size(0) * k.size(1);
  int64_t const seqlen_q = varlen_q ? max_seqlen_q : q.size(1);
  // Paged: the keys one cache row can hold (its pages times the page size).
  int64_t const seqlen_k = varlen_k ? max_seqlen_k : paged ? page_table->size(1) * k.size(1) : k.size(1);
  // A longer "longest sequence" than the packed rows is a caller bug that would size the grid wrongly.
  TORCH_CHECK(!varlen_q || max_seqlen_q <= total_q, "flash_attn3 fwd: max_seqlen_q (", max_seqlen_q,
              ") exceeds the packed q rows (", total_q, ")");
  TORCH_CHECK(!varlen_k || max_seqlen_k <= total_k, "flash_attn3 fwd: max_seqlen_k (", max_seqlen_k,
              ") exceeds the packed k rows (", total_k, ")");
  int64_t const num_heads = q.size(-2);
  int64_t const num_heads_k = k.size(-2);
  int64_t const head_dim = q.size(-1);
  int64_t const head_dim_v = v.size(-1);

  if (varlen_k) {
    check_shape(k, "k", {total_k, num_heads_k, head_dim});
    check_shape(v, "v", {total_k, num_heads_k, head_dim_v});
  } else if (paged) {  // (num_pages, page_size, heads, dim)
    TORCH_CHECK(k.size(0) >= 1 && k.size(1) >= 1, "flash_attn3 fwd: a paged k must have >= 1 pages of >= 1 rows, got ",
                k.sizes());
    check_shape(k, "k", {k.size(0), k.size(1), num_heads_k, head_dim});
    check_shape(v, "v", {k.size(0), k.size(1), num_heads_k, head_dim_v});
  } else {
    check_shape(k, "k", {batch_k, seqlen_k, num_heads_k, head_dim});
    check_shape(v, "v", {batch_k, seqlen_k, num_heads_k, head_dim_v});
  }
  if (varlen_q) {
    check_shape(out, "out", {total_q, num_heads, head_dim_v});
    check_shape(softmax_lse, "softmax_lse", {num_heads, total_q});
  } else {
    check_shape(out, "out", {batch, seqlen_q, num_heads, head_dim_v});
    check_shape(softmax_lse, "softmax_lse", {batch, num_heads, seqlen_q});
  }
  // The kernel steps through LSE rows with a unit stride and uses the tensor's own batch/head strides.
  TORCH_CHECK(softmax_lse.stride(-1) == 1,
              "flash_attn3 fwd: softmax_lse must have a contiguous last dimension, got strides ",
              softmax_lse.strides());

  // ---- heads and head dims ----
  TORCH_CHECK(num_heads_k == 0 ? num_heads == 0 : num_heads % num_heads_k == 0,
              "flash_attn3 fwd: the number of q heads (", num_heads,
              ") must be a multiple of the number of k/v heads (", num_heads_k, ")");
  TORCH_CHECK(head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % 8 == 0,
              "flash_attn3 fwd: head_dim must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK(head_dim_v > 0 && head_dim_v <= kMaxHeadDim && head_dim_v % 8 == 0,
              "flash_attn3 fwd: head_dim of v must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ", head_dim_v);
  check_tma_aligned(q, "q");
  check_tma_aligned(k, "k");
  check_tma_aligned(v, "v");
  check_tma_aligned(out, "out");

  c10::cuda::CUDAGuard const guard(q.device());
  DeviceInfo const& dev = device_info(q.get_device());
  TORCH_CHECK(dev.cc_major == 9 && dev.cc_minor == 0,
              "flash_attn3 fwd: the kernels are built for SM90 (Hopper); device ", q.device(), " is sm_", dev.cc_major,
              dev.cc_minor);
  TORCH_CHECK(sm_margin >= 0 && sm_margin < dev.num_sms, "flash_attn3 fwd: sm_margin must be in [0, ", dev.num_sms,
              ") on this device, got ", sm_margin);

  flash3::FwdParams params;
  params.dtype = dtype;
  params.out_dtype = to_dtype(out_type);
  params.q = operand(q);
  params.k = operand(k);
  params.v = operand(v);
  params.out = operand(out);
  params.lse.ptr = softmax_lse.data_ptr<float>();
  params.lse.batch_stride = varlen_q ? 0 : softmax_lse.stride(0);
  params.lse.head_stride = varlen_q ? softmax_lse.stride(0) : softmax_lse.stride(1);
  params.batch = to_int32(batch, "batch size");
  params.num_heads = to_int32(num_heads, "num_heads");
  params.num_heads_k = to_int32(num_heads_k, "num_heads_k");
  params.head_dim = static_cast<int32_t>(head_dim);
  params.head_dim_v = static_cast<int32_t>(head_dim_v);
  params.varlen.cu_seqlens_q = varlen_q ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  params.varlen.cu_seqlens_k = varlen_k ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  params.varlen.seqused_q = seqused_q.has_value() ? seqused_q->data_ptr<int32_t>() : nullptr;
  params.varlen.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int32_t>() : nullptr;
  params.varlen.max_seqlen_q = varlen_q ? to_int32(max_seqlen_q, "max_seqlen_q") : 0;
  params.varlen.max_seqlen_k = varlen_k ? to_int32(max_seqlen_k, "max_seqlen_k") : 0;
  if (kv_batch_idx.has_value()) {
    params.kv_cache.batch_idx = kv_batch_idx->data_ptr<int32_t>();
    params.kv_cache.batch_rows = to_int32(batch_k, "cache rows");
  }
  params.kv_cache.leftpad = leftpad_k.has_value() ? leftpad_k->data_ptr<int32_t>() : nullptr;
  if (paged) {
    params.kv_cache.page_table = page_table->data_ptr<int32_t>();
    params.kv_cache.page_table_stride = effective_stride(*page_table, 0);
    params.kv_cache.max_pages = to_int32(page_table->size(1), "max_pages");
    params.kv_cache.page_size = to_int32(k.size(1), "page_size");
    params.kv_cache.num_pages = to_int32(k.size(0), "num_pages");
    params.k.rows = params.v.rows = to_int32(seqlen_k, "max_pages * page_size");
  }
  params.mask.window_left = static_cast<int32_t>(window_size_left < 0 ? -1 : window_size_left);
  params.mask.window_right = static_cast<int32_t>(window_size_right < 0 ? -1 : window_size_right);
  params.mask.chunk = static_cast<int32_t>(attention_chunk);
  params.softmax_scale = static_cast<float>(softmax_scale);
  params.softcap = static_cast<float>(softcap);
  if (sinks.has_value()) {
    check_same_device(*sinks, "sinks", q);
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->dim() == 1 && sinks->is_contiguous() &&
                    sinks->size(0) == num_heads,
                "flash_attn3 fwd: sinks must be a contiguous float32 tensor of num_heads (", num_heads,
                ") sink logits, got ", sinks->scalar_type(), " of shape ", sinks->sizes());
    params.sinks = sinks->data_ptr<float>();
  }
  params.num_sms = dev.num_sms - static_cast<int>(sm_margin);
  params.fp8.q = descale(q_descale, "q_descale", batch, num_heads_k, is_fp8, q);
  params.fp8.k = descale(k_descale, "k_descale", batch, num_heads_k, is_fp8, q);
  params.fp8.v = descale(v_descale, "v_descale", batch, num_heads_k, is_fp8, q);
  params.schedule.num_splits = static_cast<int32_t>(num_splits);
  params.schedule.pack_gqa = static_cast<int32_t>(pack_gqa);

  // ---- nothing to compute: no launch (run_fwd itself handles K without rows), but a feature that is not
  // built fails as it would with data ----
  if (total_q == 0 || num_heads == 0) {
    flash3::Status const st = flash3::check_supported(params);
    TORCH_CHECK_NOT_IMPLEMENTED(st != FLASH3_NOT_COMPILED, "flash_attn3 fwd: ", flash3::status_string(st), ": ",
                                flash3::last_error_detail());
    TORCH_CHECK(st == FLASH3_SUCCESS, "flash_attn3 fwd: invalid argument: ", flash3::last_error_detail());
    return;
  }

  // Causal and varlen tiles differ in cost: give the kernel a zeroed tile counter so it schedules them
  // dynamically, unless every CTA has one tile anyway (decode). Stream-ordered allocation + memset, so this
  // stays CUDA-graph capturable. A call the plan rejects gets its message from run_fwd below.
  at::Tensor tile_counter;
  flash3::FwdPlan plan;
  bool const planned = flash3::plan_fwd(params, &plan) == FLASH3_SUCCESS;
  bool const unequal = flash3::is_causal(params.mask) || varlen_q || varlen_k || seqused_q.has_value() ||
                       seqused_k.has_value();
  if (planned && unequal && plan.num_tiles > plan.grid) {
    tile_counter = at::zeros({1}, q.options().dtype(at::kInt));
    params.tile_counter = tile_counter.data_ptr<int32_t>();
  }

  // FP8: the transposed copy of V (hopper/fp8_vt.h) in memory from torch's caching allocator, so the call
  // stays stream-ordered and capturable.
  at::Tensor workspace;
  if (int64_t const bytes = planned ? plan.workspace_bytes : 0; bytes > 0) {
    workspace = at::empty({bytes + 256}, q.options().dtype(at::kByte));
    uintptr_t const base = reinterpret_cast<uintptr_t>(workspace.data_ptr());
    params.workspace = reinterpret_cast<void*>((base + 255) / 256 * 256);
    params.workspace_bytes = bytes;
  }

  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_fwd(params, c10::cuda::getCurrentCUDAStream().stream(), &cuda_err);
  TORCH_CHECK_NOT_IMPLEMENTED(status != FLASH3_NOT_COMPILED, "flash_attn3 fwd: ",
                              flash3::status_string(status), ": ", flash3::last_error_detail(), " (dtype ",
                              q.scalar_type(), ", head_dim ", head_dim, ", causal ",
                              flash3::is_causal(params.mask) ? "true" : "false", ")");
  TORCH_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 fwd: CUDA error: ", cudaGetErrorString(cuda_err));
  TORCH_CHECK(status != FLASH3_INVALID_ARGUMENT, "flash_attn3 fwd: invalid argument: ",
              flash3::last_error_detail());
  TORCH_CHECK(status == FLASH3_SUCCESS, "flash_attn3 fwd: unexpected status ", static_cast<int>(status),
              " from run_fwd: ", flash3::status_string(status));
}

// flash_attn_combine: out_partial (splits, batch, seqlen, heads, dim) or (splits, total, heads, dim) float32
// with the last dim contiguous; lse_partial its shape without dim, any strides; out (the shape without
// splits, float32/float16/bfloat16, last dim contiguous) and lse (float32, out's shape without dim, any
// strides) are written. Python (flash_attn3.interface) checks the same and allocates the outputs.
void combine(at::Tensor const& out_partial, at::Tensor const& lse_partial, at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(out_partial.is_cuda(), "flash_attn3 combine: out_partial must be a CUDA tensor");
  check_same_device(lse_partial, "lse_partial", out_partial);
  check_same_device(out, "out", out_partial);
  check_same_device(lse, "lse", out_partial);
  TORCH_CHECK(out_partial.scalar_type() == at::kFloat && lse_partial.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat,
              "flash_attn3 combine: out_partial, lse_partial and lse must be float32");
  int64_t const rank = out_partial.dim();
  TORCH_CHECK(rank == 4 || rank == 5, "flash_attn3 combine: out_partial must be 4-D or 5-D, got ", rank, "-D");
  TORCH_CHECK(out_partial.stride(-1) == 1 && out.stride(-1) == 1,
              "flash_attn3 combine: out_partial and out must have a contiguous last dimension");
  check_shape(lse_partial, "lse_partial", out_partial.sizes().slice(0, rank - 1));
  check_shape(out, "out", out_partial.sizes().slice(1));
  check_shape(lse, "lse", out_partial.sizes().slice(1, rank - 2));
  flash3::CombineParams c;
  c.num_splits = to_int32(out_partial.size(0), "num_splits");
  bool const dense = rank == 5;
  c.batch = dense ? to_int32(out_partial.size(1), "batch") : 1;
  c.rows = to_int32(out_partial.size(dense ? 2 : 1), "seqlen");
  c.heads = to_int32(out_partial.size(-2), "num_heads");
  c.head_dim = to_int32(out_partial.size(-1), "head_dim");
  auto stride = [](at::Tensor const& t, int64_t dim) { return t.stride(dim); };
  c.o_partial = out_partial.data_ptr<float>();
  c.o_split_stride = stride(out_partial, 0);
  c.o_batch_stride = dense ? stride(out_partial, 1) : 0;
  c.o_row_stride = stride(out_partial, rank - 3);
  c.o_head_stride = stride(out_partial, rank - 2);
  c.lse_partial = lse_partial.data_ptr<float>();
  c.lse_split_stride = stride(lse_partial, 0);
  c.lse_batch_stride = dense ? stride(lse_partial, 1) : 0;
  c.lse_row_stride = stride(lse_partial, rank - 3);
  c.lse_head_stride = stride(lse_partial, rank - 2);
  c.out = out.data_ptr();
  at::ScalarType const ot = out.scalar_type();
  TORCH_CHECK(ot == at::kFloat || ot == at::kHalf || ot == at::kBFloat16,
              "flash_attn3 combine: out must be float32, float16 or bfloat16, got ", ot);
  c.out_type = ot == at::kFloat ? flash3::CombineOut::kFloat32
               : ot == at::kHalf ? flash3::CombineOut::kFloat16 : flash3::CombineOut::kBFloat16;
  c.out_batch_stride = dense ? stride(out, 0) : 0;
  c.out_row_stride = stride(out, rank - 4);
  c.out_head_stride = stride(out, rank - 3);
  c.lse = lse.data_ptr<float>();
  c.lse_out_batch_stride = dense ? stride(lse, 0) : 0;
  c.lse_out_row_stride = stride(lse, rank - 4);
  c.lse_out_head_stride = stride(lse, rank - 3);
  c10::cuda::CUDAGuard const guard(out_partial.device());
  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_combine(c, c10::cuda::getCurrentCUDAStream().stream(), &cuda_err);
  TORCH_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 combine: CUDA error: ", cudaGetErrorString(cuda_err));
  TORCH_CHECK(status == FLASH3_SUCCESS, "flash_attn3 combine: invalid argument: ", flash3::last_error_detail());
}

// KV append before a flash_attn_with_kvcache attention (hopper/append_kv.h): writes k_new / v_new into the
// cache (dense (rows, capacity, h_k, d) or paged (num_pages, page_size, h_k, d) with page_table), rotated by
// rotary_cos / rotary_sin if given (then q is rotated into q_out: q's shape, any strides), and
// seqused_out = seqused_k + the new lengths. Python (flash_attn3.interface) checks shapes and allocates.
void append_kv(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor const& k_new, at::Tensor const& v_new,
               at::Tensor const& seqused_k, at::Tensor& seqused_out, OptTensor const& cu_seqlens_k_new,
               int64_t max_seqlen_k_new, OptTensor const& page_table, OptTensor const& kv_batch_idx,
               at::Tensor const& q, OptTensor const& q_out, OptTensor const& rotary_cos, OptTensor const& rotary_sin,
               OptTensor const& rotary_seqlens, bool rotary_interleaved, bool positions_per_query,
               OptTensor const& cu_seqlens_q, int64_t max_seqlen_q) {
  TORCH_CHECK(q.is_cuda(), "flash_attn3 append_kv: q must be a CUDA tensor");
  for (auto [t, name] : {std::pair<at::Tensor const*, char const*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&k_new, "k"}, {&v_new, "v"}}) {
    check_same_device(*t, name, q);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "flash_attn3 append_kv: ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->stride(-1) == 1, "flash_attn3 append_kv: ", name, " must have a contiguous last dimension");
  }
  bool const varlen_new = cu_seqlens_k_new.has_value();
  bool const varlen_q = cu_seqlens_q.has_value();
  int64_t const batch = varlen_q ? cu_seqlens_q->size(0) - 1 : q.size(0);
  check_metadata(seqused_k, "cache_seqlens", batch, "batch", q);
  check_metadata(seqused_out, "seqused_out", batch, "batch", q);
  check_metadata(cu_seqlens_k_new, "cu_seqlens_k_new", batch + 1, "batch + 1", q);
  check_metadata(kv_batch_idx, "cache_batch_idx", batch, "batch", q);
  check_metadata(rotary_seqlens, "rotary_seqlens", batch, "batch", q);
  check_metadata(cu_seqlens_q, "cu_seqlens_q", batch + 1, "batch + 1", q);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "flash_attn3 append_kv: k_cache and v_cache must be 4-D");
  TORCH_CHECK(k_new.dim() == (varlen_new ? 3 : 4) && v_new.dim() == k_new.dim(),
              "flash_attn3 append_kv: k and v must be ", varlen_new ? "3-D (total, heads_k, dim) with cu_seqlens_k_new"
                                                                   : "4-D (batch, seqlen_new, heads_k, dim)");
  flash3::AppendKvParams a;
  a.dtype = to_dtype(q.scalar_type());
  a.batch = to_int32(batch, "batch");
  a.num_heads = to_int32(q.size(-2), "num_heads");
  a.num_heads_k = to_int32(k_cache.size(-2), "num_heads_k");
  a.head_dim = to_int32(k_cache.size(-1), "head_dim");
  a.head_dim_v = to_int32(v_cache.size(-1), "head_dim_v");
  TORCH_CHECK(k_new.size(-2) == a.num_heads_k && k_new.size(-1) == a.head_dim && v_new.size(-1) == a.head_dim_v &&
                  v_new.sizes().slice(0, v_new.dim() - 1) == k_new.sizes().slice(0, k_new.dim() - 1),
              "flash_attn3 append_kv: k ", k_new.sizes(), " and v ", v_new.sizes(), " must match the cache's heads ",
              "and head dims");
  TORCH_CHECK(varlen_new || k_new.size(0) == batch, "flash_attn3 append_kv: k must have batch ", batch, " entries");
  // The op is reachable directly (torch.ops), so the Python layer's shape rules are repeated here.
  TORCH_CHECK(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3), "flash_attn3 append_kv: v_cache ",
              v_cache.sizes(), " must match k_cache ", k_cache.sizes(), " in every dimension but the last");
  int64_t const cache_rows = page_table.has_value() ? page_table->size(0) : k_cache.size(0);
  TORCH_CHECK(kv_batch_idx.has_value() || cache_rows >= batch, "flash_attn3 append_kv: the cache has ", cache_rows,
              " rows (", page_table.has_value() ? "page_table.size(0)" : "k_cache.size(0)", ") for a batch of ", batch,
              "; give cache_batch_idx to map entries to rows");
  TORCH_CHECK(!seqused_out.is_same(seqused_k) && seqused_out.data_ptr() != seqused_k.data_ptr(),
              "flash_attn3 append_kv: seqused_out must not alias cache_seqlens");
  a.k_cache = operand(k_cache);
  a.v_cache = operand(v_cache);
  if (page_table.has_value()) {
    check_same_device(*page_table, "page_table", q);
    TORCH_CHECK(page_table->scalar_type() == at::kInt && page_table->dim() == 2 && page_table->stride(-1) == 1,
                "flash_attn3 append_kv: page_table must be a 2-D int32 tensor with a contiguous last dimension");
    a.kv_cache.page_table = page_table->data_ptr<int32_t>();
    a.kv_cache.page_table_stride = effective_stride(*page_table, 0);
    a.kv_cache.max_pages = to_int32(page_table->size(1), "max_pages");
    a.kv_cache.page_size = to_int32(k_cache.size(1), "page_size");
    a.kv_cache.num_pages = to_int32(k_cache.size(0), "num_pages");
    a.k_cache.rows = a.v_cache.rows = to_int32(page_table->size(1) * k_cache.size(1), "max_pages * page_size");
  }
  if (kv_batch_idx.has_value()) {
    a.kv_cache.batch_idx = kv_batch_idx->data_ptr<int32_t>();
    a.kv_cache.batch_rows = to_int32(page_table.has_value() ? page_table->size(0) : k_cache.size(0), "cache rows");
  }
  a.seqused_k = seqused_k.data_ptr<int32_t>();
  a.seqused_out = seqused_out.data_ptr<int32_t>();
  a.k_new = operand(k_new);
  a.v_new = operand(v_new);
  a.cu_seqlens_k_new = varlen_new ? cu_seqlens_k_new->data_ptr<int32_t>() : nullptr;
  a.max_seqlen_k_new = varlen_new ? to_int32(max_seqlen_k_new, "max_seqlen_k_new") : 0;
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), "flash_attn3 append_kv: rotary_cos and rotary_sin "
              "must be given together");
  if (rotary_cos.has_value()) {
    for (auto [t, name] : {std::pair<at::Tensor const*, char const*>{&*rotary_cos, "rotary_cos"},
                           {&*rotary_sin, "rotary_sin"}}) {
      check_same_device(*t, name, q);
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->dim() == 2 && t->is_contiguous(), "flash_attn3 append_kv: ",
                  name, " must be a contiguous 2-D tensor of q's dtype");
    }
    TORCH_CHECK(rotary_sin->sizes() == rotary_cos->sizes(), "flash_attn3 append_kv: rotary_sin must have rotary_cos's shape");
    TORCH_CHECK(q.size(-1) == a.head_dim, "flash_attn3 append_kv: q's head dim ", q.size(-1), " must equal k_cache's ",
                a.head_dim);
    TORCH_CHECK(q.dim() == (varlen_q ? 3 : 4) && q.stride(-1) == 1, "flash_attn3 append_kv: q must be ",
                varlen_q ? "3-D with cu_seqlens_q" : "4-D", " with a contiguous last dimension");
    TORCH_CHECK(q_out.has_value() && q_out->sizes() == q.sizes() && q_out->scalar_type() == q.scalar_type() &&
                    q_out->stride(-1) == 1,
                "flash_attn3 append_kv: with rotary, q_out must have q's shape and dtype and a contiguous last "
                "dimension");
    check_same_device(*q_out, "q_out", q);
    a.rotary_cos = rotary_cos->data_ptr();
    a.rotary_sin = rotary_sin->data_ptr();
    a.rotary_dim = to_int32(2 * rotary_cos->size(1), "rotary_dim");
    a.rotary_rows = to_int32(rotary_cos->size(0), "rotary rows");
    a.rotary_seqlens = rotary_seqlens.has_value() ? rotary_seqlens->data_ptr<int32_t>() : nullptr;
    a.rotary_interleaved = rotary_interleaved;
    a.positions_per_query = positions_per_query;
    a.q = operand(q);
    a.q_out = operand(*q_out);
    a.cu_seqlens_q = varlen_q ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
    a.max_seqlen_q = varlen_q ? to_int32(max_seqlen_q, "max_seqlen_q") : 0;
  }
  c10::cuda::CUDAGuard const guard(q.device());
  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_append_kv(a, c10::cuda::getCurrentCUDAStream().stream(), &cuda_err);
  TORCH_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 append_kv: CUDA error: ", cudaGetErrorString(cuda_err));
  TORCH_CHECK_NOT_IMPLEMENTED(status != FLASH3_NOT_COMPILED, "flash_attn3 append_kv: ", flash3::last_error_detail());
  TORCH_CHECK(status == FLASH3_SUCCESS, "flash_attn3 append_kv: invalid argument: ", flash3::last_error_detail());
}

// The plan a forward call with these sizes would follow on `device` (get_scheduler_metadata): [num_splits,
// pack_gqa, block_m, block_n, num_m_blocks, num_tiles, grid]. The sizes are described to the planner with
// contiguous layouts at a placeholder address: it reads no memory.
std::vector<int64_t> plan(int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t num_heads,
                          int64_t num_heads_k, int64_t head_dim, int64_t head_dim_v, at::ScalarType qkv_dtype,
                          bool varlen_q, int64_t window_size_left, int64_t window_size_right,
                          int64_t attention_chunk, double softcap,
                          int64_t num_splits, int64_t pack_gqa, int64_t sm_margin, at::Device device) {
  TORCH_CHECK(device.is_cuda() && device.has_index(), "flash_attn3 plan: device must be an indexed CUDA device");
  DeviceInfo const& dev = device_info(device.index());
  TORCH_CHECK(sm_margin >= 0 && sm_margin < dev.num_sms, "flash_attn3 plan: sm_margin must be in [0, ", dev.num_sms,
              "), got ", sm_margin);
  flash3::FwdParams p;
  p.dtype = to_dtype(qkv_dtype);
  p.out_dtype = p.dtype == FLASH3_FLOAT8_E4M3 ? FLASH3_BFLOAT16 : p.dtype;
  p.batch = to_int32(batch, "batch_size");
  p.num_heads = to_int32(num_heads, "num_heads_q");
  p.num_heads_k = to_int32(num_heads_k, "num_heads_kv");
  p.head_dim = to_int32(head_dim, "headdim");
  p.head_dim_v = to_int32(head_dim_v, "headdim_v");
  static int64_t placeholder[64];  // 256-byte aligned enough for every alignment rule; never read
  void* const fake = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(placeholder) + 255) / 256 * 256);
  int32_t const sq = to_int32(max_seqlen_q, "max_seqlen_q");
  int32_t const sk = to_int32(max_seqlen_k, "max_seqlen_k");
  auto describe = [&](flash3::Operand& op, int32_t rows, int64_t heads, int64_t dim) {
    op.ptr = fake;
    op.head_stride = dim;
    op.row_stride = heads * dim;
    op.batch_stride = int64_t(rows) * heads * dim;
    // Packed: every sequence at the longest length, clamped to int32 (the plan only needs an upper bound).
    int64_t const packed = std::min<int64_t>(int64_t(rows) * p.batch, std::numeric_limits<int32_t>::max());
    op.rows = varlen_q ? static_cast<int32_t>(packed) : rows;
  };
  describe(p.q, sq, num_heads, head_dim);
  describe(p.out, sq, num_heads, head_dim_v);
  describe(p.k, sk, num_heads_k, head_dim);
  describe(p.v, sk, num_heads_k, head_dim_v);
  p.k.rows = sk;  // the cache: dense rows (seqused_k picks each sequence's length)
  p.v.rows = sk;
  if (varlen_q) {
    static int32_t const fake_cu[2] = {0, 0};
    p.varlen.cu_seqlens_q = fake_cu;  // only its presence matters to the plan
    p.varlen.max_seqlen_q = sq;
  }
  p.lse.ptr = reinterpret_cast<float*>(fake);
  p.mask.window_left = static_cast<int32_t>(window_size_left < 0 ? -1 : window_size_left);
  p.mask.window_right = static_cast<int32_t>(window_size_right < 0 ? -1 : window_size_right);
  TORCH_CHECK(attention_chunk >= 0 && attention_chunk <= std::numeric_limits<int32_t>::max(),
              "flash_attn3 plan: attention_chunk must be in [0, 2^31) (0 = off), got ", attention_chunk);
  p.mask.chunk = static_cast<int32_t>(attention_chunk);
  p.softcap = static_cast<float>(softcap);
  p.num_sms = dev.num_sms - static_cast<int>(sm_margin);
  TORCH_CHECK(num_splits <= 256, "flash_attn3 plan: num_splits must be <= 256, got ", num_splits);
  p.schedule.num_splits = static_cast<int32_t>(num_splits < 0 ? 0 : num_splits);
  p.schedule.pack_gqa = static_cast<int32_t>(pack_gqa);
  flash3::FwdPlan pl;
  flash3::Status const st = flash3::plan_fwd(p, &pl);
  TORCH_CHECK_NOT_IMPLEMENTED(st != FLASH3_NOT_COMPILED, "flash_attn3 plan: ", flash3::last_error_detail());
  TORCH_CHECK(st == FLASH3_SUCCESS, "flash_attn3 plan: invalid argument: ", flash3::last_error_detail());
  return {pl.num_splits, pl.pack_gqa ? 1 : 0, pl.block_m, pl.block_n, pl.num_m_blocks, pl.num_tiles, pl.grid};
}

}  // namespace

TORCH_LIBRARY(flash_attn3, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) softmax_lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_q, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, "
      "Tensor? page_table, Tensor? kv_batch_idx, Tensor? leftpad_k, "
      "Tensor? q_descale, Tensor? k_descale, Tensor? v_descale, "
      "float softmax_scale, int window_size_left, int window_size_right, int attention_chunk, float softcap, "
      "Tensor? sinks, "
      "int num_splits, int pack_gqa, int sm_margin) -> ()");
  m.def("combine(Tensor out_partial, Tensor lse_partial, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor seqused_k, "
      "Tensor(c!) seqused_out, Tensor? cu_seqlens_k_new, int max_seqlen_k_new, Tensor? page_table, "
      "Tensor? kv_batch_idx, Tensor q, Tensor(d!)? q_out, Tensor? rotary_cos, Tensor? rotary_sin, "
      "Tensor? rotary_seqlens, bool rotary_interleaved, bool positions_per_query, Tensor? cu_seqlens_q, "
      "int max_seqlen_q) -> ()");
  m.def(
      "plan(int batch, int max_seqlen_q, int max_seqlen_k, int num_heads, int num_heads_k, int head_dim, "
      "int head_dim_v, ScalarType qkv_dtype, bool varlen_q, int window_size_left, int window_size_right, "
      "int attention_chunk, "
      "float softcap, int num_splits, int pack_gqa, int sm_margin, Device device) -> int[]");
}

TORCH_LIBRARY_IMPL(flash_attn3, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("combine", &combine);
  m.impl("append_kv", &append_kv);
}

// plan takes no tensor, so the dispatcher cannot route it by device: it is registered for every backend.
TORCH_LIBRARY_IMPL(flash_attn3, CompositeExplicitAutograd, m) { m.impl("plan", &plan); }

// `flash_attn3._C` is a Python module only so that importing it loads this shared library; the operators
// are reached through torch.ops.flash_attn3, so the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               nullptr /* methods */, nullptr /* slots */, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
