// Torch-free entry points. run_fwd checks every rule the kernels rely on before anything is launched (TMA
// descriptor rules, buffer shapes, supported features), so a bad params struct comes back as a status with a
// message and never as a broken launch or text printed by CuTe; then it maps the runtime (dtype, head dim)
// to the compiled kernel through the generated registry. The C API of flash_attn3.h is a thin layer on top.
// Compiles without CuTe's kernel headers: the kernels live in hopper/instantiations/*.cu.
#include "api.h"

#include <cutlass/numeric_types.h>

#include "combine.h"
#include "fp8_vt.h"
#include "instantiations/kernel_key.h"
#include "tile_config.h"
#include "workspace.h"

#include <cmath>
#include <cstdint>
#include <string>

namespace flash3 {

namespace {

constexpr int kMaxSplits = 256;  // FA3's bound; the combine reads every split's LSE of a row

thread_local std::string g_error_detail;
thread_local cudaError_t g_cuda_error = cudaSuccess;

Status fail(Status status, std::string detail) {
  g_error_detail = std::move(detail);
  return status;
}

using RunFn = cudaError_t (*)(FwdParams const&, cudaStream_t);

// The kernels linked into this library, from the generated registry (tools/kernels.py's table).
struct KernelEntry {
  DType dtype;
  int head_dim;
  int head_dim_v;
  RunFn run;
};
#define FLASH3_FWD_KERNEL(DTYPE, HEAD_DIM, HEAD_DIM_V, KERNEL) KernelEntry{DTYPE, HEAD_DIM, HEAD_DIM_V, &KERNEL},
KernelEntry const kKernels[] = {
#include "instantiations/registry.inc"
    KernelEntry{FLASH3_FLOAT16, 0, 0, nullptr},  // end marker (keeps the array non-empty in a build of none)
};
#undef FLASH3_FWD_KERNEL

// The features of the kernels beyond their keys, from the same table.
struct BuiltFeatures {
#define FLASH3_FEATURE(NAME, BUILT) bool NAME = BUILT;
#include "instantiations/features.inc"
#undef FLASH3_FEATURE
};
constexpr BuiltFeatures kBuilt{};

// The kernel that serves real head dims (d, dv): the smallest compiled d >= the real one, then the smallest
// compiled dv >= the real one. A kernel compiled for equal head dims describes q, k and v with one head dim,
// so it serves equal real ones only. head_dim_v = 0 asks about d alone. Null if none was linked.
KernelEntry const* find_kernel(DType dtype, int head_dim, int head_dim_v) {
  KernelEntry const* best = nullptr;
  for (KernelEntry const& e : kKernels) {
    if (e.run == nullptr || e.dtype != dtype || e.head_dim < head_dim || e.head_dim_v < head_dim_v) { continue; }
    if (e.head_dim == e.head_dim_v && head_dim_v != 0 && head_dim_v != head_dim) { continue; }
    if (best == nullptr || e.head_dim < best->head_dim ||
        (e.head_dim == best->head_dim && e.head_dim_v < best->head_dim_v)) {
      best = &e;
    }
  }
  return best;
}

char const* dtype_name(DType dtype) {
  switch (dtype) {
    case FLASH3_FLOAT16: return "float16";
    case FLASH3_BFLOAT16: return "bfloat16";
    case FLASH3_FLOAT8_E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

int element_size(DType dtype) { return dtype == FLASH3_FLOAT8_E4M3 ? 1 : 2; }

std::string str(int64_t v) { return std::to_string(v); }

// The rules of cuTensorMapEncodeTiled for the operands TMA reads (and the epilogue's 16-byte row chunks for
// out): base address 16-byte aligned; every stride but the contiguous one a non-negative multiple of 16 bytes
// below 2^40. The batch stride is only a stride of the view when the operand is dense. Returns "" if `op`
// complies.
std::string check_tma_operand(char const* name, Operand const& op, int elem_bytes, bool packed) {
  if (op.ptr == nullptr) { return std::string(name) + ".ptr: must not be NULL when " + name + ".rows > 0"; }
  if (reinterpret_cast<uintptr_t>(op.ptr) % 16 != 0) {
    return std::string(name) + ".ptr: must be 16-byte aligned (TMA rule)";
  }
  struct Stride {
    char const* field;
    int64_t value;
  };
  Stride const strides[] = {{"row_stride", op.row_stride}, {"head_stride", op.head_stride},
                            {"batch_stride", packed ? 0 : op.batch_stride}};
  for (Stride const& s : strides) {
    int64_t const bytes = s.value * elem_bytes;
    if (s.value < 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) {
      return std::string(name) + "." + s.field + ": must be a non-negative multiple of " + str(16 / elem_bytes) +
             " elements (16 bytes) below 2^40 bytes (TMA rule), got " + str(s.value);
    }
  }
  return {};
}

// Every rule of params.h that the kernels rely on. Checked in this order: features, sizes, shapes,
// pointers and strides, so that the first message names the root cause.
Status validate(FwdParams const& p) {
  if (p.dtype != FLASH3_FLOAT16 && p.dtype != FLASH3_BFLOAT16 && p.dtype != FLASH3_FLOAT8_E4M3) {
    return fail(FLASH3_INVALID_ARGUMENT, "dtype: unknown value " + str(int(p.dtype)));
  }
  DType const want_out = p.dtype == FLASH3_FLOAT8_E4M3 ? FLASH3_BFLOAT16 : p.dtype;
  if (p.out_dtype != want_out) {
    return fail(FLASH3_INVALID_ARGUMENT, std::string("out_dtype: must be ") + dtype_name(want_out) + " for " +
                                             dtype_name(p.dtype) + " inputs, got " + dtype_name(p.out_dtype));
  }
  if (!std::isfinite(p.softmax_scale)) { return fail(FLASH3_INVALID_ARGUMENT, "softmax_scale: must be finite"); }
  if (!std::isfinite(p.softcap) || p.softcap < 0.f) {
    return fail(FLASH3_INVALID_ARGUMENT, "softcap: must be finite and >= 0 (0 = off)");
  }
  if (p.mask.window_left < -1 || p.mask.window_right < -1) {
    return fail(FLASH3_INVALID_ARGUMENT, "mask: window_left and window_right must be >= -1 (-1 = unbounded), got (" +
                                             str(p.mask.window_left) + ", " + str(p.mask.window_right) + ")");
  }
  if (p.mask.chunk < 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "mask: chunk (attention_chunk) must be >= 0 (0 = off), got " + str(p.mask.chunk));
  }
  if (p.cp.world_size < 1 || p.cp.rank < 0 || p.cp.rank >= p.cp.world_size) {
    return fail(FLASH3_INVALID_ARGUMENT, "cp: world_size must be >= 1 and rank in [0, world_size), got world_size " +
                                             str(p.cp.world_size) + ", rank " + str(p.cp.rank));
  }
  if (p.cp.world_size > 1) {
    if (p.cp.total_seqlen_k == nullptr) {
      return fail(FLASH3_INVALID_ARGUMENT, "cp.total_seqlen_k: required when cp.world_size > 1 (cp_tot_seqused_k)");
    }
    if (reinterpret_cast<uintptr_t>(p.cp.total_seqlen_k) % alignof(int32_t) != 0) {
      return fail(FLASH3_INVALID_ARGUMENT, "cp.total_seqlen_k: must be a 4-byte aligned int32 pointer");
    }
    if (is_local(p.mask)) {
      return fail(FLASH3_INVALID_ARGUMENT, "cp.world_size > 1: context parallelism is not supported with a window or "
                                           "an attention chunk (causal or no mask only)");
    }
  }
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "head_dim: must be a multiple of 8 in [8, 256], got " + str(p.head_dim));
  }
  if (p.head_dim_v <= 0 || p.head_dim_v > 256 || p.head_dim_v % 8 != 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "head_dim_v: must be a multiple of 8 in [8, 256], got " + str(p.head_dim_v));
  }
  if (p.num_heads <= 0 || p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "num_heads: must be a positive multiple of num_heads_k, got " +
                                             str(p.num_heads) + " and " + str(p.num_heads_k));
  }
  if (p.dtype == FLASH3_FLOAT8_E4M3 && (p.head_dim % 16 != 0 || p.head_dim_v % 16 != 0)) {
    // The transposed V copy moves 16-byte rows (fp8_vt.h); FA3 has the same rule for FP8.
    return fail(FLASH3_INVALID_ARGUMENT, "head_dim, head_dim_v: must be multiples of 16 for float8_e4m3fn inputs, got " +
                                             str(p.head_dim) + " and " + str(p.head_dim_v));
  }
  if (p.batch < 0) { return fail(FLASH3_INVALID_ARGUMENT, "batch: must be >= 0, got " + str(p.batch)); }
  if (p.num_sms < 0) { return fail(FLASH3_INVALID_ARGUMENT, "num_sms: must be >= 0 (0 = all), got " + str(p.num_sms)); }
  if (p.schedule.num_splits < 0 || p.schedule.num_splits > kMaxSplits) {
    return fail(FLASH3_INVALID_ARGUMENT, "schedule.num_splits: must be in [0, 256] (0 = heuristic, 1 = no split; "
                                         "the Python and torch APIs map FA3's negative values to 0), got " +
                                             str(p.schedule.num_splits));
  }
  if (p.schedule.pack_gqa < -1 || p.schedule.pack_gqa > 1) {
    return fail(FLASH3_INVALID_ARGUMENT, "schedule.pack_gqa: must be -1 (heuristic), 0 or 1, got " +
                                             str(p.schedule.pack_gqa));
  }
  for (auto [name, op] : {std::pair{"q", &p.q}, std::pair{"k", &p.k}, std::pair{"v", &p.v}, std::pair{"out", &p.out}}) {
    if (op->rows < 0) { return fail(FLASH3_INVALID_ARGUMENT, std::string(name) + ".rows: must be >= 0"); }
  }
  if (p.out.rows != p.q.rows) {
    return fail(FLASH3_INVALID_ARGUMENT, "out.rows: must equal q.rows (" + str(p.q.rows) + "), got " + str(p.out.rows));
  }
  if (p.v.rows != p.k.rows) {
    return fail(FLASH3_INVALID_ARGUMENT, "v.rows: must equal k.rows (" + str(p.k.rows) + "), got " + str(p.v.rows));
  }
  // The grid is sized by the longest sequence, so it must be a real bound: no longer than the packed rows.
  if (is_varlen_q(p) && (p.varlen.max_seqlen_q < 0 || p.varlen.max_seqlen_q > p.q.rows)) {
    return fail(FLASH3_INVALID_ARGUMENT, "varlen.max_seqlen_q: must be in [0, q.rows = " + str(p.q.rows) + "], got " +
                                             str(p.varlen.max_seqlen_q));
  }
  if (is_varlen_k(p) && (p.varlen.max_seqlen_k < 0 || p.varlen.max_seqlen_k > p.k.rows)) {
    return fail(FLASH3_INVALID_ARGUMENT, "varlen.max_seqlen_k: must be in [0, k.rows = " + str(p.k.rows) + "], got " +
                                             str(p.varlen.max_seqlen_k));
  }
  flash3_kv_cache const& kv = p.kv_cache;
  if (reinterpret_cast<uintptr_t>(p.sinks) % alignof(float) != 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "sinks: must be a 4-byte aligned float pointer");
  }
  for (auto [name, ptr] : {std::pair{"kv_cache.batch_idx", kv.batch_idx}, std::pair{"kv_cache.leftpad", kv.leftpad},
                           std::pair{"kv_cache.page_table", kv.page_table}}) {
    if (reinterpret_cast<uintptr_t>(ptr) % alignof(int32_t) != 0) {
      return fail(FLASH3_INVALID_ARGUMENT, std::string(name) + ": must be a 4-byte aligned int32 pointer");
    }
  }
  if (kv.batch_idx != nullptr && kv.batch_rows <= 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "kv_cache.batch_rows: must be >= 1 (the cache's rows) when kv_cache.batch_idx "
                                         "is given, got " + str(kv.batch_rows));
  }
  if (kv.batch_idx != nullptr && is_varlen_k(p)) {
    return fail(FLASH3_INVALID_ARGUMENT, "kv_cache.batch_idx: cannot be combined with varlen.cu_seqlens_k");
  }
  if (is_paged(p)) {
    if (is_varlen_k(p)) {
      return fail(FLASH3_INVALID_ARGUMENT, "kv_cache.page_table: cannot be combined with varlen.cu_seqlens_k (a paged "
                                           "cache has fixed-size pages, not packed sequences)");
    }
    if (kv.page_size < 1 || kv.num_pages < 1 || kv.max_pages < 1 || kv.page_table_stride < kv.max_pages) {
      return fail(FLASH3_INVALID_ARGUMENT, "kv_cache: a page table needs page_size, num_pages, max_pages >= 1 and "
                                           "page_table_stride >= max_pages, got page_size " + str(kv.page_size) +
                                           ", num_pages " + str(kv.num_pages) + ", max_pages " + str(kv.max_pages) +
                                           ", page_table_stride " + str(kv.page_table_stride));
    }
    if (int64_t(kv.max_pages) * kv.page_size != p.k.rows) {
      return fail(FLASH3_INVALID_ARGUMENT, "k.rows: with a page table it must be max_pages * page_size = " +
                                           str(int64_t(kv.max_pages) * kv.page_size) + " (the keys a cache row holds), got " +
                                           str(p.k.rows));
    }
  }
  if (p.batch == 0 || p.q.rows == 0) { return FLASH3_SUCCESS; }  // nothing to compute; nothing is read
  int const elem_bytes = element_size(p.dtype);
  std::string bad = check_tma_operand("q", p.q, elem_bytes, is_varlen_q(p));
  if (bad.empty()) { bad = check_tma_operand("out", p.out, element_size(p.out_dtype), is_varlen_q(p)); }
  if (bad.empty() && p.k.rows > 0) { bad = check_tma_operand("k", p.k, elem_bytes, is_varlen_k(p)); }
  if (bad.empty() && p.k.rows > 0) { bad = check_tma_operand("v", p.v, elem_bytes, is_varlen_k(p)); }
  if (!bad.empty()) { return fail(FLASH3_INVALID_ARGUMENT, bad); }
  if (p.lse.ptr == nullptr || reinterpret_cast<uintptr_t>(p.lse.ptr) % alignof(float) != 0) {
    return fail(FLASH3_INVALID_ARGUMENT, "lse.ptr: must be a non-NULL, 4-byte aligned float pointer");
  }
  if (p.lse.head_stride < 0 || (!is_varlen_q(p) && p.lse.batch_stride < 0)) {
    return fail(FLASH3_INVALID_ARGUMENT, "lse: strides must be >= 0");
  }
  if (p.dtype == FLASH3_FLOAT8_E4M3) {
    for (auto [name, d] : {std::pair{"fp8.q", &p.fp8.q}, std::pair{"fp8.k", &p.fp8.k}, std::pair{"fp8.v", &p.fp8.v}}) {
      if (d->ptr == nullptr) { continue; }  // NULL = 1
      if (reinterpret_cast<uintptr_t>(d->ptr) % alignof(float) != 0 || d->batch_stride < 0 || d->head_stride < 0) {
        return fail(FLASH3_INVALID_ARGUMENT, std::string(name) + ": a (batch, num_heads_k) float32 descale needs a "
                                             "4-byte aligned pointer and strides >= 0");
      }
    }
    // The transposed copy's columns are a TMA dimension and coordinate (int32), with a key block of room.
    if (p.k.rows > 0 && vt_layout(p).cols > INT32_MAX - 256) {
      return fail(FLASH3_INVALID_ARGUMENT, "k.rows: with float8_e4m3fn inputs, k.rows + 16 * batch must stay below "
                                           "2^31 - 256, got k.rows " + str(p.k.rows) + ", batch " + str(p.batch));
    }
  }
  return FLASH3_SUCCESS;
}

// Every query row sees no key when K has no rows at all: O = 0 and LSE = -inf, the convention of the
// kernel's empty rows. Nothing to load, so no TMA descriptor (which cannot describe zero rows) is built.
__global__ void fill_empty_rows(FwdParams p) {
  int const batches = is_varlen_q(p) ? 1 : p.batch;
  int64_t const rows = int64_t(batches) * p.q.rows * p.num_heads;  // (batch, row, head) triples
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t const head = i % p.num_heads;
    int64_t const row = (i / p.num_heads) % p.q.rows;
    int64_t const b = i / (int64_t(p.num_heads) * p.q.rows);
    // out elements are 16-bit for every supported dtype; +0.0 is all-zero bits in fp16 and bf16.
    uint16_t* o = static_cast<uint16_t*>(p.out.ptr) + b * p.out.batch_stride + row * p.out.row_stride +
                  head * p.out.head_stride;
    for (int d = 0; d < p.head_dim_v; ++d) { o[d] = 0; }
    p.lse.ptr[b * p.lse.batch_stride + head * p.lse.head_stride + row] = -INFINITY;
  }
}

}  // namespace

int compiled_head_dim(DType dtype, int head_dim) {
  KernelEntry const* e = find_kernel(dtype, head_dim, 0);
  return e ? e->head_dim : 0;
}

Status check_supported(FwdParams const& p) {
  auto missing = [](char const* what) { return fail(FLASH3_NOT_COMPILED, std::string(what) + " is not implemented yet"); };
  // Each message names the argument that asks for the feature.
  if (p.dtype == FLASH3_FLOAT8_E4M3 && !kBuilt.fp8) { return missing("q/k/v dtype float8_e4m3fn (FP8)"); }
  if (p.softcap != 0.f && !kBuilt.softcap) { return missing("softcap"); }
  if (p.sinks != nullptr && !kBuilt.sinks) { return missing("sinks (attention sinks)"); }
  if (is_local(p.mask) && !kBuilt.local) {
    return missing(p.mask.chunk > 0 ? "attention_chunk (chunked local attention)" : "window_size (local attention)");
  }
  if (is_causal(p.mask) && !kBuilt.causal) { return missing("causal attention"); }
  if ((is_varlen_q(p) || is_varlen_k(p)) && !kBuilt.varlen) { return missing("cu_seqlens (varlen)"); }
  if (p.num_heads != p.num_heads_k && !kBuilt.gqa) { return missing("num_heads != num_heads_k (GQA/MQA)"); }
  if (p.schedule.num_splits != 1 && !kBuilt.split_kv) { return missing("num_splits != 1 (split-KV)"); }
  if (p.schedule.pack_gqa == 1 && !kBuilt.pack_gqa) { return missing("pack_gqa"); }
  if (is_paged(p) && !kBuilt.paged_kv) { return missing("page_table (paged KV)"); }
  if (p.kv_cache.batch_idx != nullptr && !kBuilt.kv_batch_idx) { return missing("kv_batch_idx (cache_batch_idx)"); }
  if (p.kv_cache.leftpad != nullptr && !kBuilt.leftpad_k) { return missing("leftpad_k (cache_leftpad)"); }
  // An empty problem launches nothing, so it needs no kernel; the features above it still must exist, so
  // that an empty batch fails the same way a full one would.
  bool const empty = p.batch == 0 || p.q.rows == 0 || p.num_heads == 0;
  KernelEntry const* const e = empty ? nullptr : find_kernel(p.dtype, p.head_dim, p.head_dim_v);
  if (!empty && e == nullptr) {
    return fail(FLASH3_NOT_COMPILED, std::string("no forward kernel built for ") + dtype_name(p.dtype) + " with head dim " +
                                         str(p.head_dim) + (p.head_dim_v != p.head_dim ? " and v head dim " + str(p.head_dim_v) : ""));
  }
  // The gather variant (pages TMA cannot load a key block at a time) stages K and V rows at one offset, so it
  // exists only for kernels with dv == d; the key block is the one of the split or unsplit tile, whichever
  // the plan picks, so both must divide the page.
  if (e != nullptr && e->head_dim_v != e->head_dim && is_paged(p)) {
    bool const masked = is_causal(p.mask) || is_local(p.mask);
    int const elem = element_size(p.dtype);
    TileShape const whole = tile_shape_sm90(e->head_dim, e->head_dim_v, masked, elem, false, p.softcap > 0.f, is_local(p.mask));
    TileShape const split = tile_shape_sm90(e->head_dim, e->head_dim_v, masked, elem, true, p.softcap > 0.f, is_local(p.mask));
    if (paged_needs_gather(p, whole.block_n) || paged_needs_gather(p, split.block_n)) {
      return fail(FLASH3_NOT_COMPILED,
                  "paged KV with head_dim_v != head_dim: page_size must be a multiple of " + str(whole.block_n) +
                      (split.block_n != whole.block_n ? " and " + str(split.block_n) : std::string()) +
                      " with no leftpad_k (the gather variant for other pages is built for head_dim_v == head_dim only), got page_size " +
                      str(p.kv_cache.page_size));
    }
  }
  return FLASH3_SUCCESS;
}

char const* status_string(Status status) {
  switch (status) {
    case FLASH3_SUCCESS: return "success";
    case FLASH3_NOT_COMPILED: return "no kernel was compiled for this configuration";
    case FLASH3_INVALID_ARGUMENT: return "invalid argument";
    case FLASH3_CUDA_ERROR: return "CUDA error";
  }
  return "unknown status";
}

char const* last_error_detail() { return g_error_detail.c_str(); }

Status report_failure(Status status, char const* detail) { return fail(status, detail); }

namespace {

// Split-KV heuristic, for `tiles` work tiles without splitting and `n_blocks` key blocks in the longest
// sequence. Splitting pays when the tiles leave SMs idle: decode (one query tile per sequence and head) on a
// small batch reads its K/V through a few SMs only. It costs the combine kernel and fp32 partials, so it is
// used only below 0.8 of a wave and for at least kMinBlocksToSplit key blocks (below that, the combine's launch
// costs more than the blocks it parallelises). Splits fill one wave, floor(num_sms / tiles), down to one key
// block per split: since the combine keeps its loads in flight (session 17), 16 one-block splits beat 8
// two-block ones on the guide's case 4 (10.0 against 10.9 us). Measured on the H200 (benchmarks/NOTES.md,
// "split-KV heuristic" and "Session 17").
constexpr int kMinBlocksPerSplit = 1;
constexpr int kMinBlocksToSplit = 4;

int split_heuristic(int64_t tiles, int n_blocks, int num_sms) {
  if (tiles <= 0 || n_blocks < kMinBlocksToSplit || tiles * 5 >= int64_t(num_sms) * 4) { return 1; }
  int64_t splits = num_sms / tiles;
  splits = splits < n_blocks / kMinBlocksPerSplit ? splits : n_blocks / kMinBlocksPerSplit;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return splits > 1 ? int(splits) : 1;
}

// The fraction of a tile's rows that hold queries, for `rows` rows cut into tiles of block_m.
double tile_fill(int64_t rows, int block_m) {
  int64_t const padded = (rows + block_m - 1) / block_m * block_m;
  return padded > 0 ? double(rows) / double(padded) : 1.0;
}

// p has passed validate() and check_supported() and is not empty.
FwdPlan make_plan(FwdParams const& p, int num_sms) {
  KernelEntry const* e = find_kernel(p.dtype, p.head_dim, p.head_dim_v);
  // The tile the launch will pick (launch_fwd_sm90.h): softcap calls, calls whose keys fit one 128-key block
  // and the shorter causal ones run narrow.
  bool const narrow = p.softcap > 0.f || keys_fit_narrow(max_seqlen_k(p)) ||
                      (is_causal(p.mask) && causal_narrow(element_size(p.dtype), e->head_dim, max_seqlen_q(p),
                                                          max_seqlen_k(p), is_paged(p)));
  TileShape const t = tile_shape_sm90(e->head_dim, e->head_dim_v, is_causal(p.mask) || is_local(p.mask),
                                      element_size(p.dtype), false, narrow, is_local(p.mask));
  FwdPlan plan;
  plan.block_m = t.block_m;
  plan.block_n = t.block_n;
  plan.num_sms = num_sms;
  int const group = p.num_heads / p.num_heads_k;
  int64_t const sq = max_seqlen_q(p);
  int const n_blocks = int((int64_t(max_seqlen_k(p)) + t.block_n - 1) / t.block_n);
  auto m_blocks = [&](bool pack) { return (sq * (pack ? group : 1) + plan.block_m - 1) / plan.block_m; };
  auto tiles = [&](bool pack) { return m_blocks(pack) * (pack ? p.num_heads_k : p.num_heads) * int64_t(p.batch); };
  // PackGQA heuristic (FA3's rule): pack when the packed rows fill the query tiles clearly better (decode:
  // 1 row of 128 against `group` rows), and whenever the keys are split (below).
  bool pack = group > 1 && p.schedule.pack_gqa != 0 &&
              (p.schedule.pack_gqa == 1 || tile_fill(sq, t.block_m) < 0.9 * tile_fill(sq * group, t.block_m));
  int splits = 1;
  if (p.k.rows > 0) {
    if (p.schedule.num_splits > 1) {
      splits = p.schedule.num_splits < n_blocks ? p.schedule.num_splits : (n_blocks > 1 ? n_blocks : 1);
    } else if (p.schedule.num_splits == 0) {
      splits = split_heuristic(tiles(pack), n_blocks, num_sms);
      if (splits > 1 && !pack && group > 1 && p.schedule.pack_gqa == -1) {
        pack = true;  // split tiles are short: K/V read once per group, and the split count redone for it
        splits = split_heuristic(tiles(true), n_blocks, num_sms);
      }
    }
  }
  if (splits > 1) {  // split kernels have their own tile (tile_config.h): the block counts follow it
    TileShape const ts = tile_shape_sm90(e->head_dim, e->head_dim_v, is_causal(p.mask), element_size(p.dtype), true);
    plan.block_m = ts.block_m;
    plan.block_n = ts.block_n;
    int const blocks = int((int64_t(max_seqlen_k(p)) + ts.block_n - 1) / ts.block_n);
    splits = splits < blocks ? splits : (blocks > 1 ? blocks : 1);
  }
  int ctas_per_sm = 1;
  if (splits == 1 && short_tiles(element_size(p.dtype), e->head_dim, e->head_dim_v, sq * (pack ? group : 1),
                                 max_seqlen_k(p), p.softcap > 0.f, is_local(p.mask), is_paged(p))) {
    TileShape const ts = tile_shape_sm90(e->head_dim, e->head_dim_v, false, element_size(p.dtype), false, false,
                                         false, false, /*short_=*/true);
    plan.block_m = ts.block_m;  // the short tile (launch_fwd_sm90.h)
    plan.block_n = ts.block_n;
    ctas_per_sm = ts.ctas_per_sm;
  }
  plan.num_splits = splits;
  plan.pack_gqa = pack;
  plan.num_m_blocks = int(m_blocks(pack));
  plan.num_tiles = tiles(pack) * splits;
  int64_t const ctas = int64_t(num_sms) * ctas_per_sm;
  plan.grid = int(plan.num_tiles < ctas ? plan.num_tiles : ctas);
  FwdParams resolved = p;
  resolved.schedule.num_splits = splits;
  resolved.schedule.pack_gqa = pack ? 1 : 0;
  plan.workspace_bytes = p.k.rows > 0 ? workspace_layout(resolved).total : 0;
  return plan;
}

Status device_sms(int* num_sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) { err = cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device); }
  if (err != cudaSuccess) {
    g_cuda_error = err;
    return fail(FLASH3_CUDA_ERROR, std::string("querying the device's SM count: ") + cudaGetErrorString(err));
  }
  return FLASH3_SUCCESS;
}

// validate + check_supported + the plan; `plan` is left default for an empty problem.
Status checked_plan(FwdParams const& p, FwdPlan* plan) {
  Status status = validate(p);
  if (status == FLASH3_SUCCESS) { status = check_supported(p); }
  if (status != FLASH3_SUCCESS || p.batch == 0 || p.q.rows == 0) { return status; }
  int num_sms = p.num_sms;
  if (num_sms <= 0) {
    status = device_sms(&num_sms);
    if (status != FLASH3_SUCCESS) { return status; }
  }
  int const group = p.num_heads / p.num_heads_k;
  // Packed rows are int32 coordinates, and a sequence's length on the device is bounded by q.rows only (the
  // metadata may understate max_seqlen_q), so q.rows * group must fit. The heuristic then does not pack;
  // a forced pack is refused.
  if (int64_t(p.q.rows) * group > INT32_MAX - 256 && p.schedule.pack_gqa != 0) {
    if (p.schedule.pack_gqa == 1) {
      return fail(FLASH3_INVALID_ARGUMENT, "schedule.pack_gqa: q.rows * (num_heads / num_heads_k) must stay "
                                           "below 2^31 - 256 to pack the q heads");
    }
    FwdParams unpacked = p;
    unpacked.schedule.pack_gqa = 0;
    *plan = make_plan(unpacked, num_sms);
  } else {
    *plan = make_plan(p, num_sms);
  }
  // Tile indices are int32 and a CTA's next one is its current one plus up to the grid size: keep that sum
  // from wrapping past INT32_MAX.
  if (plan->num_tiles > int64_t(INT32_MAX) - 2 * int64_t(num_sms)) {
    return fail(FLASH3_INVALID_ARGUMENT, "the call has " + str(plan->num_tiles) + " work tiles (query tiles x heads x "
                                         "batch x splits); the kernel counts them in int32: use fewer splits");
  }
  return FLASH3_SUCCESS;
}

}  // namespace

Status plan_fwd(FwdParams const& p, FwdPlan* plan) {
  g_error_detail.clear();
  *plan = FwdPlan{};
  return checked_plan(p, plan);
}

int64_t fwd_workspace_bytes(FwdParams const& p) {
  FwdPlan plan;
  std::string const saved = g_error_detail;  // a size query does not disturb the last error
  Status const status = checked_plan(p, &plan);
  g_error_detail = saved;
  return status == FLASH3_SUCCESS ? plan.workspace_bytes : 0;
}

Status run_fwd(FwdParams const& p, cudaStream_t stream, cudaError_t* cuda_error) {
  g_error_detail.clear();
  g_cuda_error = cudaSuccess;
  if (cuda_error != nullptr) { *cuda_error = cudaSuccess; }
  FwdPlan plan;
  Status const status = checked_plan(p, &plan);
  if (status != FLASH3_SUCCESS || p.batch == 0 || p.q.rows == 0) {
    if (cuda_error != nullptr) { *cuda_error = g_cuda_error; }
    return status;
  }
  if (p.workspace != nullptr && plan.workspace_bytes > 0 &&
      (reinterpret_cast<uintptr_t>(p.workspace) % 256 != 0 || p.workspace_bytes < plan.workspace_bytes)) {
    return fail(FLASH3_INVALID_ARGUMENT, "workspace: must be 256-byte aligned with at least " +
                                             str(plan.workspace_bytes) + " bytes (flash3_fwd_workspace_size), got " +
                                             str(p.workspace_bytes));
  }
  FwdParams q = p;  // the call as planned: schedule and SM count resolved
  q.schedule.num_splits = plan.num_splits;
  q.schedule.pack_gqa = plan.pack_gqa ? 1 : 0;
  q.num_sms = plan.num_sms;
  cudaError_t err = cudaSuccess;
  if (p.k.rows == 0) {
    fill_empty_rows<<<256, 256, 0, stream>>>(p);
    err = cudaGetLastError();
  } else if (plan.workspace_bytes > 0 && p.workspace == nullptr) {
    // No workspace given: a stream-ordered one for this call (capturable in a CUDA graph as well).
    err = cudaMallocAsync(&q.workspace, size_t(plan.workspace_bytes), stream);
    if (err == cudaSuccess) {
      q.workspace_bytes = plan.workspace_bytes;
      err = find_kernel(p.dtype, p.head_dim, p.head_dim_v)->run(q, stream);
      cudaError_t const freed = cudaFreeAsync(q.workspace, stream);
      if (err == cudaSuccess) { err = freed; }
    }
  } else {
    err = find_kernel(p.dtype, p.head_dim, p.head_dim_v)->run(q, stream);
  }
  if (err != cudaSuccess) {
    g_cuda_error = err;
    if (cuda_error != nullptr) { *cuda_error = err; }
    return fail(FLASH3_CUDA_ERROR, cudaGetErrorString(err));
  }
  return FLASH3_SUCCESS;
}

Status run_combine(CombineParams const& c, cudaStream_t stream, cudaError_t* cuda_error) {
  g_error_detail.clear();
  g_cuda_error = cudaSuccess;
  if (cuda_error != nullptr) { *cuda_error = cudaSuccess; }
  if (c.num_splits < 1 || c.num_splits > kMaxSplits) {
    return fail(FLASH3_INVALID_ARGUMENT, "num_splits: must be in [1, 256], got " + str(c.num_splits));
  }
  if (c.batch < 0 || c.rows < 0 || c.heads < 0 || c.head_dim < 1) {
    return fail(FLASH3_INVALID_ARGUMENT, "combine: batch, rows and heads must be >= 0 and head_dim >= 1");
  }
  if (int64_t(c.batch) * c.rows * c.heads == 0) { return FLASH3_SUCCESS; }
  if (c.o_partial == nullptr || c.lse_partial == nullptr || c.out == nullptr) {
    return fail(FLASH3_INVALID_ARGUMENT, "combine: out_partial, lse_partial and out must not be NULL");
  }
  cudaError_t const err = launch_combine(c, stream);
  if (err != cudaSuccess) {
    g_cuda_error = err;
    if (cuda_error != nullptr) { *cuda_error = err; }
    return fail(FLASH3_CUDA_ERROR, cudaGetErrorString(err));
  }
  return FLASH3_SUCCESS;
}

}  // namespace flash3

// ---- C API (flash_attn3.h) ----

extern "C" {

flash3_fwd_params flash3_fwd_params_default(void) { return flash3_fwd_params{}; }

flash3_status flash3_fwd(flash3_fwd_params const* params, cudaStream_t stream) {
  if (params == nullptr) {
    flash3::g_error_detail = "params: must not be NULL";
    return FLASH3_INVALID_ARGUMENT;
  }
  return flash3::run_fwd(*params, stream, nullptr);
}

int flash3_compiled_head_dim(flash3_dtype dtype, int head_dim) { return flash3::compiled_head_dim(dtype, head_dim); }

int64_t flash3_fwd_workspace_size(flash3_fwd_params const* params) {
  return params == nullptr ? 0 : flash3::fwd_workspace_bytes(*params);
}

char const* flash3_status_string(flash3_status status) { return flash3::status_string(status); }

char const* flash3_last_error(void) { return flash3::last_error_detail(); }

cudaError_t flash3_last_cuda_error(void) { return flash3::g_cuda_error; }

}  // extern "C"
