// flash_api.cpp: the one C++ file that includes torch, and it includes only torch's stable ABI (the C shim
// torch/csrc/inductor/aoti_torch/c/shim.h and torch/csrc/stable/c/shim.h, the header-only torch/headeronly,
// the torch/csrc/stable wrappers) at the API level of torch 2.10 (TORCH_TARGET_VERSION, which setup.py sets),
// so that one build loads into every torch from 2.10 on. It registers the `flash_attn3::fwd` operator schema
// and its CUDA implementation (and combine, append_kv, plan), re-checks the arguments that Python has already
// validated (cheaply, with messages that name the argument and the rule, so that a direct
// `torch.ops.flash_attn3.fwd` call with bad input raises a Python exception instead of faulting on the
// device), rejects features the kernels do not implement yet (with a message that Python re-raises as
// NotImplementedError, see kNotImplementedTag), translates tensors into the torch-free `flash3::FwdParams`,
// and calls `flash3::run_fwd` on the current stream, turning its Status into an exception. It never
// synchronises the host, so the op can be captured in a CUDA graph. It also defines the empty Python module
// `flash_attn3._C` (Python's limited API, for the abi3 wheel), whose only purpose is that
// `import flash_attn3._C` loads this library and runs the static registrations.
#if !defined(TORCH_TARGET_VERSION) || !defined(Py_LIMITED_API)
#error "build through setup.py: it sets TORCH_TARGET_VERSION (the oldest torch to run with) and Py_LIMITED_API"
#endif

// Python.h first: it sets feature macros that must precede the standard headers.
#include <Python.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>

// The shim declares its CUDA part (aoti_torch_get_current_cuda_stream) only under USE_CUDA; this file takes
// that declaration's type and looks the function up at run time (current_cuda_stream below).
#ifndef USE_CUDA
#define USE_CUDA
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include "../hopper/api.h"
#include "../hopper/append_kv.h"
#include "../hopper/combine.h"
#include "../hopper/params.h"

namespace {

using torch::headeronly::IntHeaderOnlyArrayRef;
using torch::headeronly::ScalarType;

constexpr int64_t kMaxHeadDim = 256;
// TMA (which loads Q/K/V and stores O) needs 16-byte aligned base addresses and non-unit strides.
constexpr int64_t kTmaAlignBytes = 16;
// Devices whose attributes are cached (torch's own limit, C10_COMPILE_TIME_MAX_GPUS, is 16 by default).
constexpr int kMaxDevices = 64;

// ---- errors ----

// A broken rule is a std::runtime_error with the message alone: torch hands any C++ exception out of a
// stable kernel to Python as a RuntimeError whose text is what(). (STD_TORCH_CHECK would do the same but
// prefix the C++ function, file and line, which messages that name the argument and the rule do not need.)
template <typename... Args>
[[noreturn]] void fail(Args const&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}

// The stable ABI has no way to raise NotImplementedError: every C++ exception reaches Python as RuntimeError.
// A feature this build did not compile therefore fails with a message that starts with this tag, and
// flash_attn3/_ops.py, which calls the ops, re-raises such a RuntimeError as NotImplementedError without it.
constexpr char kNotImplementedTag[] = "NotImplementedError: ";

}  // namespace

// Macros, as TORCH_CHECK is, so that a message's parts are only evaluated when the check fails.
#define FLASH3_CHECK(cond, ...)                         \
  do {                                                  \
    if (__builtin_expect(!(cond), 0)) fail(__VA_ARGS__); \
  } while (false)
#define FLASH3_CHECK_NOT_IMPLEMENTED(cond, ...) FLASH3_CHECK(cond, kNotImplementedTag, __VA_ARGS__)

namespace {

void check_shim(AOTITorchError err, char const* call) {
  FLASH3_CHECK(err == AOTI_TORCH_SUCCESS, "flash_attn3: torch's C shim call ", call,
               " failed (torch logs the reason)");
}

void check_cuda(cudaError_t err, char const* what) {
  FLASH3_CHECK(err == cudaSuccess, "flash_attn3 fwd: CUDA error in ", what, ": ", cudaGetErrorString(err));
}

// ---- what the messages print ----

// Extents (sizes, strides, an expected shape), printed as torch prints sizes: [2, 113, 4, 128].
class Dims {
 public:
  /* implicit */ Dims(IntHeaderOnlyArrayRef values) : values_(values) {}
  /* implicit */ Dims(std::initializer_list<int64_t> values) : values_(values) {}
  Dims slice(size_t start, size_t length) const { return values_.slice(start, length); }
  Dims slice(size_t start) const { return values_.slice(start); }
  bool operator==(Dims other) const { return values_.equals(other.values_); }
  bool operator!=(Dims other) const { return !(*this == other); }
  friend std::ostream& operator<<(std::ostream& os, Dims dims) {
    os << '[';
    for (size_t i = 0; i < dims.values_.size(); ++i) os << (i ? ", " : "") << dims.values_[i];
    return os << ']';
  }

 private:
  IntHeaderOnlyArrayRef values_;
};

// A dtype as the shim numbers it, which is its own numbering (not torch::headeronly::ScalarType's).
struct Dtype {
  int32_t code = -1;
  bool operator==(Dtype other) const { return code == other.code; }
  bool operator!=(Dtype other) const { return code != other.code; }
  // ScalarType's name (Half, BFloat16, Float8_e4m3fn, ...), as torch prints a dtype in C++ messages.
  friend std::ostream& operator<<(std::ostream& os, Dtype dtype) {
    try {
      return os << torch::headeronly::toString(
                 torch::stable::detail::to<ScalarType>(torch::stable::detail::from(dtype.code)));
    } catch (std::exception const&) {  // a dtype the stable ABI has no name for
      return os << "dtype #" << dtype.code;
    }
  }
};

// The shim's codes of the dtypes and device types compared here, read once through its accessors. A
// namespace-scope constant: initialised when this library loads, after the torch libraries it links.
struct ShimCodes {
  Dtype f16{aoti_torch_dtype_float16()};
  Dtype bf16{aoti_torch_dtype_bfloat16()};
  Dtype f8e4m3{aoti_torch_dtype_float8_e4m3fn()};
  Dtype f32{aoti_torch_dtype_float32()};
  Dtype i32{aoti_torch_dtype_int32()};
  Dtype u8{aoti_torch_dtype_uint8()};
  int32_t cpu = aoti_torch_device_type_cpu();
  int32_t cuda = aoti_torch_device_type_cuda();
  int32_t meta = aoti_torch_device_type_meta();
};
ShimCodes const kShim;

// A tensor's device, printed as torch prints one: cuda:0, cpu, meta.
struct DeviceId {
  int32_t type = 0;
  int32_t index = -1;
  bool operator==(DeviceId other) const { return type == other.type && index == other.index; }
  bool operator!=(DeviceId other) const { return !(*this == other); }
  friend std::ostream& operator<<(std::ostream& os, DeviceId d) {
    if (d.type == kShim.cuda) return os << "cuda:" << d.index;
    if (d.type == kShim.cpu) return os << "cpu";
    if (d.type == kShim.meta) return os << "meta";
    return os << "device type " << d.type << ':' << d.index;
  }
};

// ---- tensors ----

// One tensor of a call (an argument, or an allocation of the call): owns its AtenTensorHandle, as the stable
// boxed convention hands each argument over, and reads what the checks use once, so that they are plain
// loads instead of one out-of-line shim call each. Move-only and allocation-free (torch::stable::Tensor
// would add a shared_ptr per argument per call). The sizes and strides are borrowed from the tensor, which
// lives as long as the handle.
class TensorRef {
 public:
  explicit TensorRef(AtenTensorHandle handle) : handle_(handle) {
    int64_t* sizes = nullptr;
    int64_t* strides = nullptr;
    check_shim(aoti_torch_get_dim(handle, &dim_), "aoti_torch_get_dim");
    check_shim(aoti_torch_get_sizes(handle, &sizes), "aoti_torch_get_sizes");
    check_shim(aoti_torch_get_strides(handle, &strides), "aoti_torch_get_strides");
    check_shim(aoti_torch_get_dtype(handle, &dtype_.code), "aoti_torch_get_dtype");
    check_shim(aoti_torch_get_device_type(handle, &device_.type), "aoti_torch_get_device_type");
    check_shim(aoti_torch_get_device_index(handle, &device_.index), "aoti_torch_get_device_index");
    sizes_ = sizes;
    strides_ = strides;
  }

  int64_t dim() const { return dim_; }
  // Dimension i, counted from the end when negative; out of range is an error, as in torch.
  int64_t size(int64_t i) const { return sizes_[checked_dim(i)]; }
  int64_t stride(int64_t i) const { return strides_[checked_dim(i)]; }
  Dims sizes() const { return IntHeaderOnlyArrayRef(sizes_, static_cast<size_t>(dim_)); }
  Dims strides() const { return IntHeaderOnlyArrayRef(strides_, static_cast<size_t>(dim_)); }
  Dtype scalar_type() const { return dtype_; }
  int64_t element_size() const { return static_cast<int64_t>(aoti_torch_dtype_element_size(dtype_.code)); }
  DeviceId device() const { return device_; }
  bool is_cuda() const { return device_.type == kShim.cuda; }
  int32_t device_index() const { return device_.index; }
  bool is_contiguous() const {
    bool contiguous = false;
    check_shim(aoti_torch_is_contiguous(handle_.get(), &contiguous), "aoti_torch_is_contiguous");
    return contiguous;
  }
  // Read when the kernel parameters are filled, after the checks (a tensor without storage fails here).
  void* data_ptr() const {
    void* ptr = nullptr;
    check_shim(aoti_torch_get_data_ptr(handle_.get(), &ptr), "aoti_torch_get_data_ptr");
    return ptr;
  }
  template <typename T>
  T* data_ptr() const {
    return static_cast<T*>(data_ptr());
  }

 private:
  // Deletes the handle (the tensor reference, not the storage) when the call is done with it.
  class Owned {
   public:
    explicit Owned(AtenTensorHandle handle) : handle_(handle) {}
    Owned(Owned&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Owned& operator=(Owned&&) = delete;
    ~Owned() {
      if (handle_ != nullptr) aoti_torch_delete_tensor_object(handle_);  // cannot fail for a valid handle
    }
    AtenTensorHandle get() const { return handle_; }

   private:
    AtenTensorHandle handle_;
  };

  int64_t checked_dim(int64_t i) const {
    int64_t const wrapped = i < 0 ? i + dim_ : i;
    FLASH3_CHECK(wrapped >= 0 && wrapped < dim_, "flash_attn3: dimension ", i, " is out of range for a ", dim_,
                 "-D tensor");
    return wrapped;
  }

  Owned handle_;
  int64_t dim_ = 0;
  int64_t const* sizes_ = nullptr;
  int64_t const* strides_ = nullptr;
  Dtype dtype_;
  DeviceId device_;
};

using OptTensor = std::optional<TensorRef>;

// A 1-D tensor of `numel` elements on `like`'s device, from torch's caching allocator (stream-ordered on the
// current stream, so a call that uses it stays capturable). Allocated through the shim's empty_strided
// directly: the stable ops (new_empty, new_zeros) go through the dispatcher by name and box their arguments.
TensorRef empty_1d(TensorRef const& like, int64_t numel, Dtype dtype) {
  int64_t const stride = 1;
  AtenTensorHandle handle = nullptr;
  check_shim(aoti_torch_empty_strided(1, &numel, &stride, dtype.code, like.device().type, like.device_index(),
                                      &handle),
             "aoti_torch_empty_strided");
  return TensorRef(handle);
}

// ---- CUDA: device attributes, current device and stream ----

// Per-device facts the op needs on every call. Read once per device with cudaDeviceGetAttribute (torch's
// device-properties cache is not part of the stable ABI).
struct DeviceInfo {
  int num_sms = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

DeviceInfo const& device_info(int device) {
  static std::array<DeviceInfo, kMaxDevices> infos;
  static std::array<std::once_flag, kMaxDevices> once;
  FLASH3_CHECK(device >= 0 && device < kMaxDevices, "flash_attn3 fwd: bad CUDA device index ", device);
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

// Makes `device` the current CUDA device for a scope, as c10's CUDAGuard did. When it already is (every
// single-GPU call) nothing is done; otherwise torch's own guard, through the stable ABI, switches and restores
// with torch's rules (it avoids creating a context on the device it restores). That guard is heap-allocated,
// which is why the common case does without it.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int32_t device) {
    int current = -1;
    check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) guard_.emplace(device);
  }

 private:
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
};

// The current CUDA stream of `device` is the one thing the CUDA part of the shim gives. That function lives
// in libtorch_cuda, which this library does not link, so that it also loads into a CPU-only torch (there the
// registrations load and every CUDA op fails here instead, with this message): it is looked up once, at the
// first call, in the libtorch_cuda that torch has already loaded.
using GetCurrentCudaStream = decltype(&aoti_torch_get_current_cuda_stream);

GetCurrentCudaStream find_get_current_cuda_stream() {
  constexpr char kSymbol[] = "aoti_torch_get_current_cuda_stream";
  void* fn = dlsym(RTLD_DEFAULT, kSymbol);  // torch loaded with RTLD_GLOBAL
  if (fn == nullptr) {
    // torch loads its libraries privately (RTLD_LOCAL); RTLD_NOLOAD finds the loaded one by its soname and
    // loads nothing. Closing drops only the reference this added: torch keeps the library loaded.
    if (void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) {
      fn = dlsym(lib, kSymbol);
      dlclose(lib);
    }
  }
  FLASH3_CHECK(fn != nullptr, "flash_attn3: this torch has no CUDA support (", kSymbol,
               " is not in a loaded libtorch_cuda.so)");
  return reinterpret_cast<GetCurrentCudaStream>(fn);
}

cudaStream_t current_cuda_stream(int32_t device) {
  // A static initialiser that throws runs again at the next call, so a failed lookup is not cached.
  static GetCurrentCudaStream const get_stream = find_get_current_cuda_stream();
  void* stream = nullptr;
  check_shim(get_stream(device, &stream), "aoti_torch_get_current_cuda_stream");
  return static_cast<cudaStream_t>(stream);
}

// ---- argument checks ----

// The params struct holds 32-bit sizes; anything larger would wrap silently in the kernel's index maths.
int32_t to_int32(int64_t value, char const* name) {
  FLASH3_CHECK(value >= 0 && value <= std::numeric_limits<int32_t>::max(), "flash_attn3: ", name,
               " must be in [0, 2^31), got ", value);
  return static_cast<int32_t>(value);
}

void check_same_device(TensorRef const& t, char const* name, TensorRef const& q) {
  FLASH3_CHECK(t.is_cuda(), "flash_attn3 fwd: ", name, " must be a CUDA tensor, got device ", t.device());
  FLASH3_CHECK(t.device() == q.device(), "flash_attn3 fwd: ", name, " must be on the same device as q (",
               q.device(), "), got ", t.device());
}

void check_shape(TensorRef const& t, char const* name, Dims expected) {
  FLASH3_CHECK(t.sizes() == expected, "flash_attn3 fwd: ", name, " must have shape ", expected, ", got ",
               t.sizes());
}

// An attention operand: (batch, row, head, dim) dense or (total, head, dim) packed, last dim contiguous.
void check_operand(TensorRef const& t, char const* name, int64_t rank) {
  FLASH3_CHECK(t.dim() == rank, "flash_attn3 fwd: ", name, " must be ", rank, "-D (",
               rank == 4 ? "batch, seqlen, heads, head_dim" : "total_tokens, heads, head_dim", "), got ", t.dim(),
               "-D");
  FLASH3_CHECK(t.stride(-1) == 1, "flash_attn3 fwd: ", name,
               " must have a contiguous last dimension (stride(-1) == 1), got strides ", t.strides());
}

// The stride the kernel is given for dimension i. A size-1 dimension is never stepped over, so torch may
// leave any value there (as_strided, some views); it is replaced by the stride a packed layout would have,
// which keeps TMA descriptors valid without changing a single address.
int64_t effective_stride(TensorRef const& t, int64_t i) {
  if (i + 1 == t.dim() || t.size(i) != 1) return t.stride(i);
  return t.size(i + 1) * effective_stride(t, i + 1);
}

// Checked after the head-dim rules, whose message is the more useful one when both fail.
void check_tma_aligned(TensorRef const& t, char const* name) {
  int64_t const elt = t.element_size();
  FLASH3_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kTmaAlignBytes == 0, "flash_attn3 fwd: ", name,
               " must start at a 16-byte aligned address (TMA requirement)");
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    FLASH3_CHECK((effective_stride(t, i) * elt) % kTmaAlignBytes == 0, "flash_attn3 fwd: ", name,
                 " strides must be multiples of 16 bytes except the last (TMA requirement), got strides ",
                 t.strides(), " for element size ", elt);
  }
}

// Sequence metadata: int32 device arrays read directly by the kernel, so they must be dense.
void check_metadata(TensorRef const& t, char const* name, int64_t expected_len, char const* len_rule,
                    TensorRef const& q) {
  check_same_device(t, name, q);
  FLASH3_CHECK(t.scalar_type() == kShim.i32, "flash_attn3 fwd: ", name, " must be int32, got ", t.scalar_type());
  FLASH3_CHECK(t.dim() == 1 && t.is_contiguous(), "flash_attn3 fwd: ", name,
               " must be a contiguous 1-D tensor, got shape ", t.sizes(), " strides ", t.strides());
  FLASH3_CHECK(t.size(0) == expected_len, "flash_attn3 fwd: ", name, " must have ", expected_len, " entries (",
               len_rule, "), got ", t.size(0));
}

// The same for optional metadata: nothing to check when absent.
void check_metadata(OptTensor const& t, char const* name, int64_t expected_len, char const* len_rule,
                    TensorRef const& q) {
  if (t.has_value()) check_metadata(*t, name, expected_len, len_rule, q);
}

flash3::Operand operand(TensorRef const& t) {
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
                       TensorRef const& q) {
  flash3_descale d;
  if (!t.has_value()) { return d; }
  FLASH3_CHECK(is_fp8, "flash_attn3 fwd: ", name, " is only valid with float8_e4m3fn inputs, got ",
               q.scalar_type());
  FLASH3_CHECK(t->scalar_type() == kShim.f32, "flash_attn3 fwd: ", name, " must be float32, got ",
               t->scalar_type());
  check_same_device(*t, name, q);
  check_shape(*t, name, {batch, num_heads_k});
  d.ptr = t->data_ptr<float>();
  d.batch_stride = t->stride(0);
  d.head_stride = t->stride(1);
  FLASH3_CHECK(d.batch_stride >= 0 && d.head_stride >= 0, "flash_attn3 fwd: ", name,
               " must have strides >= 0, got ", t->strides());
  return d;
}

flash3::DType to_dtype(Dtype t) {
  if (t == kShim.f16) return FLASH3_FLOAT16;
  if (t == kShim.bf16) return FLASH3_BFLOAT16;
  FLASH3_CHECK(t == kShim.f8e4m3, "flash_attn3 fwd: q must be float16, bfloat16 or float8_e4m3fn, got ", t);
  return FLASH3_FLOAT8_E4M3;
}

// ---- the ops ----

void fwd(TensorRef const& q, TensorRef const& k, TensorRef const& v, TensorRef const& out,
         TensorRef const& softmax_lse, OptTensor const& cu_seqlens_q, OptTensor const& cu_seqlens_k,
         OptTensor const& seqused_q, OptTensor const& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
         OptTensor const& page_table, OptTensor const& kv_batch_idx, OptTensor const& leftpad_k,
         OptTensor const& q_descale, OptTensor const& k_descale, OptTensor const& v_descale, double softmax_scale,
         int64_t window_size_left, int64_t window_size_right, int64_t attention_chunk, double softcap,
         OptTensor const& sinks, int64_t cp_world_size, int64_t cp_rank, OptTensor const& cp_tot_seqused_k,
         int64_t num_splits, int64_t pack_gqa, int64_t sm_margin) {
  // ---- devices and dtypes ----
  FLASH3_CHECK(q.is_cuda(), "flash_attn3 fwd: q must be a CUDA tensor, got device ", q.device());
  check_same_device(k, "k", q);
  check_same_device(v, "v", q);
  check_same_device(out, "out", q);
  check_same_device(softmax_lse, "softmax_lse", q);
  flash3::DType const dtype = to_dtype(q.scalar_type());
  FLASH3_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
               "flash_attn3 fwd: q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
               k.scalar_type(), ", ", v.scalar_type());
  bool const is_fp8 = dtype == FLASH3_FLOAT8_E4M3;
  Dtype const out_type = is_fp8 ? kShim.bf16 : q.scalar_type();
  FLASH3_CHECK(out.scalar_type() == out_type, "flash_attn3 fwd: out must have dtype ", out_type,
               is_fp8 ? " (bfloat16 for float8 inputs)" : " (the dtype of q)", ", got ", out.scalar_type());
  FLASH3_CHECK(softmax_lse.scalar_type() == kShim.f32, "flash_attn3 fwd: softmax_lse must be float32, got ",
               softmax_lse.scalar_type());

  // ---- scalar ranges: the op is reachable directly (torch.ops, compiled graphs), so Python's checks are
  // repeated here rather than trusted ----
  FLASH3_CHECK(num_splits <= 256,
               "flash_attn3 fwd: num_splits must be <= 256 (<= 0 = heuristic, 1 = no split), got ", num_splits);
  num_splits = num_splits < 0 ? 0 : num_splits;  // FA3: any value <= 0 selects the heuristic
  FLASH3_CHECK(pack_gqa >= -1 && pack_gqa <= 1, "flash_attn3 fwd: pack_gqa must be -1 (heuristic), 0 or 1, got ",
               pack_gqa);
  FLASH3_CHECK(std::isfinite(softmax_scale), "flash_attn3 fwd: softmax_scale must be finite, got ", softmax_scale);
  FLASH3_CHECK(std::isfinite(softcap) && softcap >= 0.0,
               "flash_attn3 fwd: softcap must be finite and >= 0 (0 = off), got ", softcap);
  FLASH3_CHECK(window_size_left >= -1 && window_size_right >= -1,
               "flash_attn3 fwd: window_size_left/right must be >= -1 (-1 = unbounded), got (", window_size_left,
               ", ", window_size_right, ")");
  FLASH3_CHECK(window_size_left <= std::numeric_limits<int32_t>::max() &&
                   window_size_right <= std::numeric_limits<int32_t>::max(),
               "flash_attn3 fwd: window_size_left/right must be < 2^31, got (", window_size_left, ", ",
               window_size_right, ")");
  FLASH3_CHECK(attention_chunk >= 0 && attention_chunk <= std::numeric_limits<int32_t>::max(),
               "flash_attn3 fwd: attention_chunk must be in [0, 2^31) (0 = off), got ", attention_chunk);
  FLASH3_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "flash_attn3 fwd: max_seqlen_q/k must be >= 0, got ",
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

  FLASH3_CHECK(!varlen_q || (cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) >= 2),
               "flash_attn3 fwd: cu_seqlens_q must be 1-D with batch + 1 >= 2 entries, got shape ",
               varlen_q ? cu_seqlens_q->sizes() : Dims{});
  FLASH3_CHECK(!varlen_k || (cu_seqlens_k->dim() == 1 && cu_seqlens_k->size(0) >= 2),
               "flash_attn3 fwd: cu_seqlens_k must be 1-D with batch + 1 >= 2 entries, got shape ",
               varlen_k ? cu_seqlens_k->sizes() : Dims{});
  int64_t const batch = varlen_q ? cu_seqlens_q->size(0) - 1 : q.size(0);
  bool const paged = page_table.has_value();
  FLASH3_CHECK(!(paged && varlen_k), "flash_attn3 fwd: page_table cannot be combined with cu_seqlens_k");
  FLASH3_CHECK(!(kv_batch_idx.has_value() && varlen_k),
               "flash_attn3 fwd: kv_batch_idx cannot be combined with cu_seqlens_k");
  if (paged) {
    check_same_device(*page_table, "page_table", q);
    FLASH3_CHECK(page_table->scalar_type() == kShim.i32, "flash_attn3 fwd: page_table must be int32, got ",
                 page_table->scalar_type());
    FLASH3_CHECK(page_table->dim() == 2 && page_table->stride(-1) == 1 && page_table->size(1) >= 1,
                 "flash_attn3 fwd: page_table must be 2-D (batch, max_pages >= 1) with a contiguous last "
                 "dimension, got shape ", page_table->sizes(), " strides ", page_table->strides());
  }
  // Cache rows: k's batch entries, or the page table's rows; kv_batch_idx maps each batch entry to one.
  int64_t const batch_k = varlen_k ? cu_seqlens_k->size(0) - 1 : paged ? page_table->size(0) : k.size(0);
  FLASH3_CHECK(kv_batch_idx.has_value() || batch == batch_k,
               "flash_attn3 fwd: q and k must have the same batch size, got ", batch, " and ", batch_k,
               paged                  ? " (rows of page_table)"
               : varlen_q || varlen_k ? " (batch of a varlen operand is cu_seqlens.size(0) - 1)"
                                      : "");
  check_metadata(kv_batch_idx, "kv_batch_idx", batch, "batch", q);
  check_metadata(leftpad_k, "leftpad_k", batch, "batch", q);
  check_metadata(cu_seqlens_q, "cu_seqlens_q", batch + 1, "batch + 1", q);
  check_metadata(cu_seqlens_k, "cu_seqlens_k", batch + 1, "batch + 1", q);
  check_metadata(seqused_q, "seqused_q", batch, "batch", q);
  check_metadata(seqused_k, "seqused_k", batch, "batch", q);
  // Context parallelism (params.h flash3_context_parallel); api.cu checks the rank and the mask.
  FLASH3_CHECK(cp_world_size >= 1 && cp_world_size <= (int64_t(1) << 30) && cp_rank >= 0 && cp_rank < cp_world_size,
               "flash_attn3 fwd: cp_world_size must be >= 1 and cp_rank in [0, cp_world_size), got cp_world_size ",
               cp_world_size, ", cp_rank ", cp_rank);
  FLASH3_CHECK(cp_world_size == 1 || cp_tot_seqused_k.has_value(),
               "flash_attn3 fwd: cp_tot_seqused_k is required when cp_world_size > 1");
  if (cp_world_size > 1) { check_metadata(cp_tot_seqused_k, "cp_tot_seqused_k", batch, "batch", q); }

  int64_t const total_q = varlen_q ? q.size(0) : q.size(0) * q.size(1);
  int64_t const total_k = varlen_k ? k.size(0) : k.size(0) * k.size(1);
  int64_t const seqlen_q = varlen_q ? max_seqlen_q : q.size(1);
  // Paged: the keys one cache row can hold (its pages times the page size).
  int64_t const seqlen_k = varlen_k ? max_seqlen_k : paged ? page_table->size(1) * k.size(1) : k.size(1);
  // A longer "longest sequence" than the packed rows is a caller bug that would size the grid wrongly.
  FLASH3_CHECK(!varlen_q || max_seqlen_q <= total_q, "flash_attn3 fwd: max_seqlen_q (", max_seqlen_q,
               ") exceeds the packed q rows (", total_q, ")");
  FLASH3_CHECK(!varlen_k || max_seqlen_k <= total_k, "flash_attn3 fwd: max_seqlen_k (", max_seqlen_k,
               ") exceeds the packed k rows (", total_k, ")");
  int64_t const num_heads = q.size(-2);
  int64_t const num_heads_k = k.size(-2);
  int64_t const head_dim = q.size(-1);
  int64_t const head_dim_v = v.size(-1);

  if (varlen_k) {
    check_shape(k, "k", {total_k, num_heads_k, head_dim});
    check_shape(v, "v", {total_k, num_heads_k, head_dim_v});
  } else if (paged) {  // (num_pages, page_size, heads, dim)
    FLASH3_CHECK(k.size(0) >= 1 && k.size(1) >= 1,
                 "flash_attn3 fwd: a paged k must have >= 1 pages of >= 1 rows, got ", k.sizes());
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
  FLASH3_CHECK(softmax_lse.stride(-1) == 1,
               "flash_attn3 fwd: softmax_lse must have a contiguous last dimension, got strides ",
               softmax_lse.strides());

  // ---- heads and head dims ----
  FLASH3_CHECK(num_heads_k == 0 ? num_heads == 0 : num_heads % num_heads_k == 0,
               "flash_attn3 fwd: the number of q heads (", num_heads,
               ") must be a multiple of the number of k/v heads (", num_heads_k, ")");
  FLASH3_CHECK(head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % 8 == 0,
               "flash_attn3 fwd: head_dim must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ", head_dim);
  FLASH3_CHECK(head_dim_v > 0 && head_dim_v <= kMaxHeadDim && head_dim_v % 8 == 0,
               "flash_attn3 fwd: head_dim of v must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ",
               head_dim_v);
  check_tma_aligned(q, "q");
  check_tma_aligned(k, "k");
  check_tma_aligned(v, "v");
  check_tma_aligned(out, "out");

  CudaDeviceScope const device_scope(q.device_index());
  DeviceInfo const& dev = device_info(q.device_index());
  FLASH3_CHECK(dev.cc_major == 9 && dev.cc_minor == 0,
               "flash_attn3 fwd: the kernels are built for SM90 (Hopper); device ", q.device(), " is sm_",
               dev.cc_major, dev.cc_minor);
  FLASH3_CHECK(sm_margin >= 0 && sm_margin < dev.num_sms, "flash_attn3 fwd: sm_margin must be in [0, ",
               dev.num_sms, ") on this device, got ", sm_margin);

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
    FLASH3_CHECK(sinks->scalar_type() == kShim.f32 && sinks->dim() == 1 && sinks->is_contiguous() &&
                     sinks->size(0) == num_heads,
                 "flash_attn3 fwd: sinks must be a contiguous float32 tensor of num_heads (", num_heads,
                 ") sink logits, got ", sinks->scalar_type(), " of shape ", sinks->sizes());
    params.sinks = sinks->data_ptr<float>();
  }
  params.cp.world_size = static_cast<int32_t>(cp_world_size);
  params.cp.rank = static_cast<int32_t>(cp_rank);
  params.cp.total_seqlen_k = cp_world_size > 1 ? cp_tot_seqused_k->data_ptr<int32_t>() : nullptr;
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
    FLASH3_CHECK_NOT_IMPLEMENTED(st != FLASH3_NOT_COMPILED, "flash_attn3 fwd: ", flash3::status_string(st), ": ",
                                 flash3::last_error_detail());
    FLASH3_CHECK(st == FLASH3_SUCCESS, "flash_attn3 fwd: invalid argument: ", flash3::last_error_detail());
    return;
  }

  cudaStream_t const stream = current_cuda_stream(q.device_index());

  // Causal and varlen tiles differ in cost: give the kernel a zeroed tile counter so it schedules them
  // dynamically, unless every CTA has one tile anyway (decode). Stream-ordered allocation + memset, so this
  // stays CUDA-graph capturable. A call the plan rejects gets its message from run_fwd below.
  std::optional<TensorRef> tile_counter;
  flash3::FwdPlan plan;
  bool const planned = flash3::plan_fwd(params, &plan) == FLASH3_SUCCESS;
  bool const unequal = flash3::is_causal(params.mask) || varlen_q || varlen_k || seqused_q.has_value() ||
                       seqused_k.has_value();
  if (planned && unequal && plan.num_tiles > plan.grid) {
    tile_counter.emplace(empty_1d(q, 1, kShim.i32));
    params.tile_counter = tile_counter->data_ptr<int32_t>();
    check_cuda(cudaMemsetAsync(params.tile_counter, 0, sizeof(int32_t), stream), "zeroing the tile counter");
  }

  // FP8: the transposed copy of V (hopper/fp8_vt.h) in memory from torch's caching allocator, so the call
  // stays stream-ordered and capturable.
  std::optional<TensorRef> workspace;
  if (int64_t const bytes = planned ? plan.workspace_bytes : 0; bytes > 0) {
    workspace.emplace(empty_1d(q, bytes + 256, kShim.u8));
    uintptr_t const base = reinterpret_cast<uintptr_t>(workspace->data_ptr());
    params.workspace = reinterpret_cast<void*>((base + 255) / 256 * 256);
    params.workspace_bytes = bytes;
  }

  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_fwd(params, stream, &cuda_err);
  FLASH3_CHECK_NOT_IMPLEMENTED(status != FLASH3_NOT_COMPILED, "flash_attn3 fwd: ", flash3::status_string(status),
                               ": ", flash3::last_error_detail(), " (dtype ", q.scalar_type(), ", head_dim ",
                               head_dim, ", causal ", flash3::is_causal(params.mask) ? "true" : "false", ")");
  FLASH3_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 fwd: CUDA error: ", cudaGetErrorString(cuda_err));
  FLASH3_CHECK(status != FLASH3_INVALID_ARGUMENT, "flash_attn3 fwd: invalid argument: ",
               flash3::last_error_detail());
  FLASH3_CHECK(status == FLASH3_SUCCESS, "flash_attn3 fwd: unexpected status ", static_cast<int>(status),
               " from run_fwd: ", flash3::status_string(status));
}

// flash_attn_combine: out_partial (splits, batch, seqlen, heads, dim) or (splits, total, heads, dim) float32
// with the last dim contiguous; lse_partial its shape without dim, any strides; out (the shape without
// splits, float32/float16/bfloat16, last dim contiguous) and lse (float32, out's shape without dim, any
// strides) are written. Python (flash_attn3.interface) checks the same and allocates the outputs.
void combine(TensorRef const& out_partial, TensorRef const& lse_partial, TensorRef const& out,
             TensorRef const& lse) {
  FLASH3_CHECK(out_partial.is_cuda(), "flash_attn3 combine: out_partial must be a CUDA tensor");
  check_same_device(lse_partial, "lse_partial", out_partial);
  check_same_device(out, "out", out_partial);
  check_same_device(lse, "lse", out_partial);
  FLASH3_CHECK(out_partial.scalar_type() == kShim.f32 && lse_partial.scalar_type() == kShim.f32 &&
                   lse.scalar_type() == kShim.f32,
               "flash_attn3 combine: out_partial, lse_partial and lse must be float32");
  int64_t const rank = out_partial.dim();
  FLASH3_CHECK(rank == 4 || rank == 5, "flash_attn3 combine: out_partial must be 4-D or 5-D, got ", rank, "-D");
  FLASH3_CHECK(out_partial.stride(-1) == 1 && out.stride(-1) == 1,
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
  auto stride = [](TensorRef const& t, int64_t dim) { return t.stride(dim); };
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
  Dtype const ot = out.scalar_type();
  FLASH3_CHECK(ot == kShim.f32 || ot == kShim.f16 || ot == kShim.bf16,
               "flash_attn3 combine: out must be float32, float16 or bfloat16, got ", ot);
  c.out_type = ot == kShim.f32   ? flash3::CombineOut::kFloat32
               : ot == kShim.f16 ? flash3::CombineOut::kFloat16
                                 : flash3::CombineOut::kBFloat16;
  c.out_batch_stride = dense ? stride(out, 0) : 0;
  c.out_row_stride = stride(out, rank - 4);
  c.out_head_stride = stride(out, rank - 3);
  c.lse = lse.data_ptr<float>();
  c.lse_out_batch_stride = dense ? stride(lse, 0) : 0;
  c.lse_out_row_stride = stride(lse, rank - 4);
  c.lse_out_head_stride = stride(lse, rank - 3);
  CudaDeviceScope const device_scope(out_partial.device_index());
  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_combine(c, current_cuda_stream(out_partial.device_index()), &cuda_err);
  FLASH3_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 combine: CUDA error: ", cudaGetErrorString(cuda_err));
  FLASH3_CHECK(status == FLASH3_SUCCESS, "flash_attn3 combine: invalid argument: ", flash3::last_error_detail());
}

// KV append before a flash_attn_with_kvcache attention (hopper/append_kv.h): writes k_new / v_new into the
// cache (dense (rows, capacity, h_k, d) or paged (num_pages, page_size, h_k, d) with page_table), rotated by
// rotary_cos / rotary_sin if given (then q is rotated into q_out: q's shape, any strides), and
// seqused_out = seqused_k + the new lengths. Python (flash_attn3.interface) checks shapes and allocates.
void append_kv(TensorRef const& k_cache, TensorRef const& v_cache, TensorRef const& k_new, TensorRef const& v_new,
               TensorRef const& seqused_k, TensorRef const& seqused_out, OptTensor const& cu_seqlens_k_new,
               int64_t max_seqlen_k_new, OptTensor const& page_table, OptTensor const& kv_batch_idx,
               TensorRef const& q, OptTensor const& q_out, OptTensor const& rotary_cos,
               OptTensor const& rotary_sin, OptTensor const& rotary_seqlens, bool rotary_interleaved,
               bool positions_per_query, OptTensor const& cu_seqlens_q, int64_t max_seqlen_q) {
  FLASH3_CHECK(q.is_cuda(), "flash_attn3 append_kv: q must be a CUDA tensor");
  for (auto [t, name] : {std::pair<TensorRef const*, char const*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&k_new, "k"}, {&v_new, "v"}}) {
    check_same_device(*t, name, q);
    FLASH3_CHECK(t->scalar_type() == q.scalar_type(), "flash_attn3 append_kv: ", name, " must have q's dtype ",
                 q.scalar_type(), ", got ", t->scalar_type());
    FLASH3_CHECK(t->stride(-1) == 1, "flash_attn3 append_kv: ", name, " must have a contiguous last dimension");
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
  FLASH3_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "flash_attn3 append_kv: k_cache and v_cache must be 4-D");
  FLASH3_CHECK(k_new.dim() == (varlen_new ? 3 : 4) && v_new.dim() == k_new.dim(),
               "flash_attn3 append_kv: k and v must be ",
               varlen_new ? "3-D (total, heads_k, dim) with cu_seqlens_k_new" : "4-D (batch, seqlen_new, heads_k, dim)");
  flash3::AppendKvParams a;
  a.dtype = to_dtype(q.scalar_type());
  a.batch = to_int32(batch, "batch");
  a.num_heads = to_int32(q.size(-2), "num_heads");
  a.num_heads_k = to_int32(k_cache.size(-2), "num_heads_k");
  a.head_dim = to_int32(k_cache.size(-1), "head_dim");
  a.head_dim_v = to_int32(v_cache.size(-1), "head_dim_v");
  FLASH3_CHECK(k_new.size(-2) == a.num_heads_k && k_new.size(-1) == a.head_dim && v_new.size(-1) == a.head_dim_v &&
                   v_new.sizes().slice(0, v_new.dim() - 1) == k_new.sizes().slice(0, k_new.dim() - 1),
               "flash_attn3 append_kv: k ", k_new.sizes(), " and v ", v_new.sizes(),
               " must match the cache's heads and head dims");
  FLASH3_CHECK(varlen_new || k_new.size(0) == batch, "flash_attn3 append_kv: k must have batch ", batch, " entries");
  // The op is reachable directly (torch.ops), so the Python layer's shape rules are repeated here.
  FLASH3_CHECK(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3), "flash_attn3 append_kv: v_cache ",
               v_cache.sizes(), " must match k_cache ", k_cache.sizes(), " in every dimension but the last");
  int64_t const cache_rows = page_table.has_value() ? page_table->size(0) : k_cache.size(0);
  FLASH3_CHECK(kv_batch_idx.has_value() || cache_rows >= batch, "flash_attn3 append_kv: the cache has ", cache_rows,
               " rows (", page_table.has_value() ? "page_table.size(0)" : "k_cache.size(0)", ") for a batch of ",
               batch, "; give cache_batch_idx to map entries to rows");
  FLASH3_CHECK(seqused_out.data_ptr() != seqused_k.data_ptr(),
               "flash_attn3 append_kv: seqused_out must not alias cache_seqlens");
  a.k_cache = operand(k_cache);
  a.v_cache = operand(v_cache);
  if (page_table.has_value()) {
    check_same_device(*page_table, "page_table", q);
    FLASH3_CHECK(page_table->scalar_type() == kShim.i32 && page_table->dim() == 2 && page_table->stride(-1) == 1,
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
    a.kv_cache.batch_rows = to_int32(cache_rows, "cache rows");
  }
  a.seqused_k = seqused_k.data_ptr<int32_t>();
  a.seqused_out = seqused_out.data_ptr<int32_t>();
  a.k_new = operand(k_new);
  a.v_new = operand(v_new);
  a.cu_seqlens_k_new = varlen_new ? cu_seqlens_k_new->data_ptr<int32_t>() : nullptr;
  a.max_seqlen_k_new = varlen_new ? to_int32(max_seqlen_k_new, "max_seqlen_k_new") : 0;
  FLASH3_CHECK(rotary_cos.has_value() == rotary_sin.has_value(),
               "flash_attn3 append_kv: rotary_cos and rotary_sin must be given together");
  if (rotary_cos.has_value()) {
    for (auto [t, name] : {std::pair<TensorRef const*, char const*>{&*rotary_cos, "rotary_cos"},
                           {&*rotary_sin, "rotary_sin"}}) {
      check_same_device(*t, name, q);
      FLASH3_CHECK(t->scalar_type() == q.scalar_type() && t->dim() == 2 && t->is_contiguous(),
                   "flash_attn3 append_kv: ", name, " must be a contiguous 2-D tensor of q's dtype");
    }
    FLASH3_CHECK(rotary_sin->sizes() == rotary_cos->sizes(),
                 "flash_attn3 append_kv: rotary_sin must have rotary_cos's shape");
    FLASH3_CHECK(q.size(-1) == a.head_dim, "flash_attn3 append_kv: q's head dim ", q.size(-1),
                 " must equal k_cache's ", a.head_dim);
    FLASH3_CHECK(q.dim() == (varlen_q ? 3 : 4) && q.stride(-1) == 1, "flash_attn3 append_kv: q must be ",
                 varlen_q ? "3-D with cu_seqlens_q" : "4-D", " with a contiguous last dimension");
    FLASH3_CHECK(q_out.has_value() && q_out->sizes() == q.sizes() && q_out->scalar_type() == q.scalar_type() &&
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
  CudaDeviceScope const device_scope(q.device_index());
  cudaError_t cuda_err = cudaSuccess;
  flash3::Status const status = flash3::run_append_kv(a, current_cuda_stream(q.device_index()), &cuda_err);
  FLASH3_CHECK(status != FLASH3_CUDA_ERROR, "flash_attn3 append_kv: CUDA error: ", cudaGetErrorString(cuda_err));
  FLASH3_CHECK_NOT_IMPLEMENTED(status != FLASH3_NOT_COMPILED, "flash_attn3 append_kv: ",
                               flash3::last_error_detail());
  FLASH3_CHECK(status == FLASH3_SUCCESS, "flash_attn3 append_kv: invalid argument: ", flash3::last_error_detail());
}

// The plan a forward call with these sizes would follow on `device` (get_scheduler_metadata): [num_splits,
// pack_gqa, block_m, block_n, num_m_blocks, num_tiles, grid]. The sizes are described to the planner with
// contiguous layouts at a placeholder address: it reads no memory.
std::vector<int64_t> plan(int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t num_heads,
                          int64_t num_heads_k, int64_t head_dim, int64_t head_dim_v, ScalarType qkv_dtype,
                          bool varlen_q, int64_t window_size_left, int64_t window_size_right,
                          int64_t attention_chunk, double softcap, int64_t num_splits, int64_t pack_gqa,
                          int64_t sm_margin, torch::stable::Device device) {
  FLASH3_CHECK(device.is_cuda() && device.has_index(), "flash_attn3 plan: device must be an indexed CUDA device");
  DeviceInfo const& dev = device_info(device.index());
  FLASH3_CHECK(sm_margin >= 0 && sm_margin < dev.num_sms, "flash_attn3 plan: sm_margin must be in [0, ",
               dev.num_sms, "), got ", sm_margin);
  flash3::FwdParams p;
  // The schema's ScalarType arrives as a headeronly enum; its StableIValue is the shim's code of the dtype.
  p.dtype = to_dtype(Dtype{torch::stable::detail::to<int32_t>(torch::stable::detail::from(qkv_dtype))});
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
  FLASH3_CHECK(attention_chunk >= 0 && attention_chunk <= std::numeric_limits<int32_t>::max(),
               "flash_attn3 plan: attention_chunk must be in [0, 2^31) (0 = off), got ", attention_chunk);
  p.mask.chunk = static_cast<int32_t>(attention_chunk);
  p.softcap = static_cast<float>(softcap);
  p.num_sms = dev.num_sms - static_cast<int>(sm_margin);
  FLASH3_CHECK(num_splits <= 256, "flash_attn3 plan: num_splits must be <= 256, got ", num_splits);
  p.schedule.num_splits = static_cast<int32_t>(num_splits < 0 ? 0 : num_splits);
  p.schedule.pack_gqa = static_cast<int32_t>(pack_gqa);
  flash3::FwdPlan pl;
  flash3::Status const st = flash3::plan_fwd(p, &pl);
  FLASH3_CHECK_NOT_IMPLEMENTED(st != FLASH3_NOT_COMPILED, "flash_attn3 plan: ", flash3::last_error_detail());
  FLASH3_CHECK(st == FLASH3_SUCCESS, "flash_attn3 plan: invalid argument: ", flash3::last_error_detail());
  return {pl.num_splits, pl.pack_gqa ? 1 : 0, pl.block_m, pl.block_n, pl.num_m_blocks, pl.num_tiles, pl.grid};
}

// ---- the boxed calling convention of STABLE_TORCH_LIBRARY ----

// One argument off the StableIValue stack, converted as torch::stable documents it; a tensor's handle is
// taken over (the stack hands over ownership).
template <typename T>
T take(StableIValue value) {
  return torch::stable::detail::to<T>(value);
}
template <>
TensorRef take<TensorRef>(StableIValue value) {
  return TensorRef(torch::stable::detail::to<AtenTensorHandle>(value));
}
template <>
OptTensor take<OptTensor>(StableIValue value) {
  std::optional<AtenTensorHandle> const handle = torch::stable::detail::to<std::optional<AtenTensorHandle>>(value);
  return handle.has_value() ? OptTensor(std::in_place, *handle) : std::nullopt;
}

// The boxed kernel of `Fn` (what TORCH_BOX makes, for this file's argument types): unboxes the arguments in
// schema order, calls Fn and boxes its result, if any, into stack[0].
template <auto Fn>
struct Boxed;

template <typename R, typename... Args, R (*Fn)(Args...)>
struct Boxed<Fn> {
  static void call(StableIValue* stack, uint64_t num_args, uint64_t num_returns) {
    constexpr uint64_t kReturns = std::is_void_v<R> ? 0 : 1;
    FLASH3_CHECK(num_args == sizeof...(Args) && num_returns == kReturns, "flash_attn3: the registered schema has ",
                 num_args, " arguments and ", num_returns, " returns, its kernel ", sizeof...(Args), " and ",
                 kReturns);
    run(stack, std::index_sequence_for<Args...>{});
  }

 private:
  template <size_t... I>
  static void run(StableIValue* stack, std::index_sequence<I...>) {
    // Braced initialisation takes the arguments in order, so each stack entry is converted exactly once.
    std::tuple<std::decay_t<Args>...> args{take<std::decay_t<Args>>(stack[I])...};
    if constexpr (std::is_void_v<R>) {
      std::apply(Fn, args);
    } else {
      stack[0] = torch::stable::detail::from(std::apply(Fn, args));
    }
  }
};

}  // namespace

STABLE_TORCH_LIBRARY(flash_attn3, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) softmax_lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_q, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, "
      "Tensor? page_table, Tensor? kv_batch_idx, Tensor? leftpad_k, "
      "Tensor? q_descale, Tensor? k_descale, Tensor? v_descale, "
      "float softmax_scale, int window_size_left, int window_size_right, int attention_chunk, float softcap, "
      "Tensor? sinks, int cp_world_size, int cp_rank, Tensor? cp_tot_seqused_k, "
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

STABLE_TORCH_LIBRARY_IMPL(flash_attn3, CUDA, m) {
  m.impl("fwd", &Boxed<&fwd>::call);
  m.impl("combine", &Boxed<&combine>::call);
  m.impl("append_kv", &Boxed<&append_kv>::call);
}

// plan takes no tensor, so the dispatcher cannot route it by device: it is registered for every backend.
STABLE_TORCH_LIBRARY_IMPL(flash_attn3, CompositeExplicitAutograd, m) { m.impl("plan", &Boxed<&plan>::call); }

// `flash_attn3._C` is a Python module only so that importing it loads this shared library; the operators
// are reached through torch.ops.flash_attn3, so the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               nullptr /* methods */, nullptr /* slots */, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
