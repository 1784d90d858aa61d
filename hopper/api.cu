// Torch-free entry points: checks what the kernels themselves rely on (TMA alignment, supported features),
// then maps the runtime (dtype, head dim) to the compiled kernel through the generated registry.
// Compiles without CuTe's kernel headers: the kernels live in hopper/instantiations/*.cu.
#include "api.h"

#include <cutlass/numeric_types.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace flash3 {

template <class Element, int kHeadDim>
cudaError_t run_fwd_sm90(FwdParams const& p, cudaStream_t stream);  // defined in instantiations/

namespace {

thread_local std::string g_error_detail;

Status fail(Status status, std::string detail) {
  g_error_detail = std::move(detail);
  return status;
}

using RunFn = cudaError_t (*)(FwdParams const&, cudaStream_t);

RunFn find_kernel(DType dtype, int compiled_head_dim) {
#define FLASH3_FWD_KERNEL(DTYPE, ELEMENT, HEAD_DIM) \
  if (dtype == DTYPE && compiled_head_dim == HEAD_DIM) { return &run_fwd_sm90<ELEMENT, HEAD_DIM>; }
#include "instantiations/registry.inc"
#undef FLASH3_FWD_KERNEL
  return nullptr;
}

char const* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

int element_size(DType dtype) { return dtype == DType::kFloat8E4M3 ? 1 : 2; }

// TMA reads Q, K and V: the base address must be 16-byte aligned and every stride but the last a multiple
// of 16 bytes. Returns an empty string when `op` satisfies that.
std::string check_tma_operand(char const* name, Operand const& op, int elem_bytes, bool packed) {
  auto misaligned = [&](int64_t stride) { return (stride * elem_bytes) % 16 != 0; };
  if (reinterpret_cast<uintptr_t>(op.ptr) % 16 != 0) {
    return std::string(name) + ": data pointer must be 16-byte aligned (TMA)";
  }
  if (misaligned(op.row_stride) || misaligned(op.head_stride) || (!packed && misaligned(op.batch_stride))) {
    return std::string(name) + ": row, head and batch strides must be multiples of 16 bytes (" +
           std::to_string(16 / elem_bytes) + " elements) for TMA";
  }
  return {};
}

}  // namespace

int compiled_head_dim(DType dtype, int head_dim) {
  for (int hd : {64, 96, 128, 192, 256}) {
    if (hd >= head_dim && find_kernel(dtype, hd) != nullptr) { return hd; }
  }
  return 0;
}

char const* status_string(Status status) {
  switch (status) {
    case Status::kSuccess: return "success";
    case Status::kNotCompiled: return "no kernel was compiled for this configuration";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

char const* last_error_detail() { return g_error_detail.c_str(); }

Status run_fwd(FwdParams const& p, cudaStream_t stream, cudaError_t* cuda_error) {
  g_error_detail.clear();
  if (cuda_error != nullptr) { *cuda_error = cudaSuccess; }
  if (p.dtype == DType::kFloat8E4M3) { return fail(Status::kNotCompiled, "FP8 forward kernels are not built yet"); }
  if (p.softcap != 0.f) { return fail(Status::kNotCompiled, "softcap is not implemented yet"); }
  if (p.mask.is_local()) { return fail(Status::kNotCompiled, "local (sliding window) attention is not implemented yet"); }
  if (p.head_dim_v != p.head_dim) { return fail(Status::kNotCompiled, "head_dim_v != head_dim is not implemented yet"); }
  if (p.head_dim <= 0 || p.head_dim % 8 != 0) {
    return fail(Status::kInvalidArgument, "head_dim must be a positive multiple of 8, got " + std::to_string(p.head_dim));
  }
  if (p.num_heads <= 0 || p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) {
    return fail(Status::kInvalidArgument, "num_heads must be a positive multiple of num_heads_k");
  }
  if (p.batch <= 0 || p.total_q <= 0) { return Status::kSuccess; }  // nothing to compute
  int const elem_bytes = element_size(p.dtype);
  for (auto [name, op, packed] : {std::tuple{"q", &p.q, p.varlen.cu_seqlens_q != nullptr},
                                  std::tuple{"k", &p.k, p.varlen.cu_seqlens_k != nullptr},
                                  std::tuple{"v", &p.v, p.varlen.cu_seqlens_k != nullptr}}) {
    std::string bad = check_tma_operand(name, *op, elem_bytes, packed);
    if (!bad.empty()) { return fail(Status::kInvalidArgument, bad); }
  }
  int const hd = compiled_head_dim(p.dtype, p.head_dim);
  RunFn run = hd ? find_kernel(p.dtype, hd) : nullptr;
  if (run == nullptr) {
    return fail(Status::kNotCompiled, std::string("no forward kernel built for ") + dtype_name(p.dtype) +
                                          " with head dim " + std::to_string(p.head_dim));
  }
  cudaError_t err = run(p, stream);
  if (err != cudaSuccess) {
    if (cuda_error != nullptr) { *cuda_error = err; }
    return fail(Status::kCudaError, cudaGetErrorString(err));
  }
  return Status::kSuccess;
}

}  // namespace flash3
