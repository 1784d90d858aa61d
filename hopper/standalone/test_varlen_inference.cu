// test_varlen_inference: the torch-free command-line runner of the forward kernels (built by
// build_standalone.sh). It draws a batch of sequence lengths (reproducible by --seed, printed), packs random
// inputs with cu_seqlens (or uses the dense (batch, seqlen, head, dim) layout with --dense), calls the
// library through flash3::run_fwd, and reports the median time over --iters calls and TFLOP/s by
// FlashAttention-3's convention, counted over the real lengths. --verify compares every element of out and
// softmax_lse with a naive fp32 CUDA-core reference in this file (outputs are NaN-poisoned first, so an
// unwritten element fails). The CLI is the standalone guide's (shared/spec/standalone-guide.md) plus --bf16,
// --dense, --equal_lengths, --edge_lengths, --verify, --iters and --seed. The last line is the verdict.
//
// Sequence lengths: q lengths are uniform in [1, max_seqlen_q]. When max_seqlen_k >= max_seqlen_q, sequence b
// has k_len = q_len + (max_seqlen_k - max_seqlen_q) keys: its queries are the newest tokens of a context
// (prefill when the maxima are equal, decode when max_seqlen_q = 1); otherwise k lengths are uniform in
// [1, max_seqlen_k]. --equal_lengths gives every sequence the maxima; --edge_lengths makes sequence 0 empty
// and sequence 1 one query row long (zero-length and length-1 sequences).
//
// Exit codes: 0 success; 1 CUDA error, bad argument or failed verification; 2 kernel not built.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "api.h"

namespace {

constexpr int kMaxHeadDim = 256;  // the reference keeps one output row in registers/local memory
constexpr int kWarmupIters = 3;

// A CLI program may stop at the first CUDA error; the library under test never does (it returns codes).
void check_cuda(cudaError_t err, char const* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "error: %s failed: %s (%s)\nRESULT: FAIL (CUDA error)\n", what, cudaGetErrorString(err),
                 cudaGetErrorName(err));
    std::exit(1);
  }
}
#define CHECK_CUDA(expr) check_cuda((expr), #expr)

struct Options {
  int batch_size = 2;
  int max_seqlen_q = 512;
  int max_seqlen_k = 512;
  int num_heads = 8;
  int num_heads_k = 8;
  int head_size = 128;
  bool causal = false;
  flash3::DType dtype = FLASH3_FLOAT16;
  bool dense = false;
  bool equal_lengths = false;
  bool edge_lengths = false;
  bool verify = false;
  int iters = 20;
  int num_splits = 0;  // split-KV: 0 = the library's heuristic (flash3_schedule), 1 = never split
  uint32_t seed = 0;
};

void print_help() {
  std::printf(
      "Usage: test_varlen_inference [options]\n\n"
      "Options:\n"
      "  --batch_size N       Batch size (default: 2)\n"
      "  --max_seqlen_q N     Max sequence length for Q (default: 512)\n"
      "  --max_seqlen_k N     Max sequence length for K (default: 512)\n"
      "  --num_heads N        Number of query heads (default: 8)\n"
      "  --num_heads_k N      Number of key/value heads, divides num_heads (default: 8)\n"
      "  --head_size N        Head dimension; runs on the next compiled one, e.g. 80 -> 96 (default: 128)\n"
      "  --causal             Causal mask, bottom-right aligned (default: off)\n"
      "  --fp16               FP16 inputs and output (default)\n"
      "  --bf16               BF16 inputs and output\n"
      "  --fp8                FP8 E4M3 inputs (descales 1), BF16 output\n"
      "  --equal_lengths      Every sequence has max_seqlen_q queries and max_seqlen_k keys\n"
      "  --edge_lengths       Sequence 0 is empty and sequence 1 has one query (needs --batch_size >= 2)\n"
      "  --dense              Dense (batch, seqlen, head, dim) layout (implies --equal_lengths)\n"
      "  --verify             Compare every element of out and LSE with an fp32 reference; exit 1 on mismatch\n"
      "  --num_splits N       Split-KV: 0 = heuristic (splits decode-shaped calls), 1 = no split, N <= 256\n"
      "                       (default: 0)\n"
      "  --iters N            Timed calls; the median is reported (default: 20)\n"
      "  --seed N             Seed of the lengths and the random inputs (default: 0)\n"
      "  --help               Show this help message\n\n"
      "Random lengths: q uniform in [1, max_seqlen_q]; k = q + (max_seqlen_k - max_seqlen_q) when\n"
      "max_seqlen_k >= max_seqlen_q (the queries are the newest tokens of the context), else uniform in\n"
      "[1, max_seqlen_k].\n");
}

int parse_int(char const* flag, char const* value) {
  char* end = nullptr;
  long v = value ? std::strtol(value, &end, 10) : 0;
  if (!value || *end != '\0' || v < 0 || v > (1L << 30)) {
    std::fprintf(stderr, "error: %s needs a non-negative integer, got '%s'\n", flag, value ? value : "");
    std::exit(1);
  }
  return static_cast<int>(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--help" || a == "-h") { print_help(); std::exit(0); }
    else if (a == "--batch_size") o.batch_size = parse_int(argv[i], next());
    else if (a == "--max_seqlen_q") o.max_seqlen_q = parse_int(argv[i], next());
    else if (a == "--max_seqlen_k") o.max_seqlen_k = parse_int(argv[i], next());
    else if (a == "--num_heads") o.num_heads = parse_int(argv[i], next());
    else if (a == "--num_heads_k") o.num_heads_k = parse_int(argv[i], next());
    else if (a == "--head_size") o.head_size = parse_int(argv[i], next());
    else if (a == "--iters") o.iters = parse_int(argv[i], next());
    else if (a == "--num_splits") o.num_splits = parse_int(argv[i], next());
    else if (a == "--seed") o.seed = static_cast<uint32_t>(parse_int(argv[i], next()));
    else if (a == "--causal") o.causal = true;
    else if (a == "--fp16") o.dtype = FLASH3_FLOAT16;
    else if (a == "--bf16") o.dtype = FLASH3_BFLOAT16;
    else if (a == "--fp8") o.dtype = FLASH3_FLOAT8_E4M3;
    else if (a == "--dense") o.dense = true;
    else if (a == "--equal_lengths") o.equal_lengths = true;
    else if (a == "--edge_lengths") o.edge_lengths = true;
    else if (a == "--verify") o.verify = true;
    else {
      std::fprintf(stderr, "error: unknown option '%s' (see --help)\n", a.c_str());
      std::exit(1);
    }
  }
  char const* bad = nullptr;
  if (o.batch_size < 1) bad = "--batch_size must be >= 1";
  else if (o.max_seqlen_q < 1 || o.max_seqlen_k < 1) bad = "--max_seqlen_q and --max_seqlen_k must be >= 1";
  else if (o.num_heads < 1 || o.num_heads_k < 1) bad = "--num_heads and --num_heads_k must be >= 1";
  else if (o.num_heads % o.num_heads_k != 0) bad = "--num_heads must be a multiple of --num_heads_k";
  else if (o.head_size < 8 || o.head_size > kMaxHeadDim || o.head_size % 8 != 0)
    bad = "--head_size must be a multiple of 8 in [8, 256]";
  else if (o.iters < 1) bad = "--iters must be >= 1";
  else if (o.num_splits > 256) bad = "--num_splits must be in [0, 256]";
  else if (o.dense && o.edge_lengths) bad = "--edge_lengths needs the packed layout (drop --dense)";
  else if (o.edge_lengths && o.batch_size < 2) bad = "--edge_lengths needs --batch_size >= 2";
  if (bad) {
    std::fprintf(stderr, "error: %s\n", bad);
    std::exit(1);
  }
  if (o.dense) o.equal_lengths = true;
  return o;
}

char const* dtype_name(flash3::DType t) {
  switch (t) {
    case FLASH3_FLOAT16: return "fp16";
    case FLASH3_BFLOAT16: return "bf16";
    case FLASH3_FLOAT8_E4M3: return "fp8_e4m3";
  }
  return "?";
}

// Per-sequence lengths, drawn as the header comment says.
struct Lengths {
  std::vector<int> q, k;
  int64_t total_q = 0, total_k = 0;
  int max_q = 0, max_k = 0;
};

Lengths draw_lengths(Options const& o) {
  Lengths L;
  std::mt19937 rng(o.seed);
  for (int b = 0; b < o.batch_size; ++b) {
    int lq = o.max_seqlen_q, lk = o.max_seqlen_k;
    if (!o.equal_lengths) {
      lq = std::uniform_int_distribution<int>(1, o.max_seqlen_q)(rng);
      lk = o.max_seqlen_k >= o.max_seqlen_q ? lq + (o.max_seqlen_k - o.max_seqlen_q)
                                            : std::uniform_int_distribution<int>(1, o.max_seqlen_k)(rng);
    }
    if (o.edge_lengths && b == 0) lq = lk = 0;
    if (o.edge_lengths && b == 1) lq = 1;
    L.q.push_back(lq);
    L.k.push_back(lk);
    L.total_q += lq;
    L.total_k += lk;
    L.max_q = std::max(L.max_q, lq);
    L.max_k = std::max(L.max_k, lk);
  }
  return L;
}

void print_lengths(char const* name, std::vector<int> const& v) {
  std::printf("%s lengths:", name);
  size_t const shown = std::min<size_t>(v.size(), 16);
  for (size_t i = 0; i < shown; ++i) std::printf(" %d", v[i]);
  if (shown < v.size()) std::printf(" ... (%zu more)", v.size() - shown);
  std::printf("\n");
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) { return float(x); }
template <class T> __device__ __forceinline__ T from_float(float x) { return T(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Uniform values in [-1, 1) from a hash of (seed, index): reproducible and independent of the launch shape.
template <class T>
__global__ void fill_uniform(T* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ static_cast<uint32_t>(i >> 32) ^ (seed * 0x85EBCA77u);
    h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
    p[i] = from_float<T>(static_cast<float>(h) * (2.0f / 4294967296.0f) - 1.0f);
  }
}

// Naive reference: one thread per (batch, head, query row), two passes over the visible keys in fp32
// (row max, then sum of exp and P·V). It reads the same FwdParams as the kernel, so the layouts cannot
// disagree; the mask rule is params.h's (bottom-right aligned window). Empty rows give O = 0, LSE = -inf.
// Results are packed as (total_q, heads, dv) and LSE as (heads, total_q) for both layouts.
template <class T>
__global__ void reference_fwd(flash3::FwdParams p, int64_t total_q, float* out_ref, float* lse_ref) {
  int const b = blockIdx.z, h = blockIdx.y;
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  int const* cu_q = p.varlen.cu_seqlens_q;
  int const* cu_k = p.varlen.cu_seqlens_k;
  int const sq = cu_q ? cu_q[b + 1] - cu_q[b] : p.q.rows;
  int const sk = cu_k ? cu_k[b + 1] - cu_k[b] : p.k.rows;
  if (i >= sq) return;
  int const hk = h / (p.num_heads / p.num_heads_k);
  // Row offsets of this sequence: packed rows (varlen) or a batch stride (dense).
  int64_t const q_row0 = cu_q ? int64_t(cu_q[b]) : 0, k_row0 = cu_k ? int64_t(cu_k[b]) : 0;
  T const* q = static_cast<T const*>(p.q.ptr) + (cu_q ? 0 : b * p.q.batch_stride) + (q_row0 + i) * p.q.row_stride +
               h * p.q.head_stride;
  T const* k = static_cast<T const*>(p.k.ptr) + (cu_k ? 0 : b * p.k.batch_stride) + k_row0 * p.k.row_stride +
               hk * p.k.head_stride;
  T const* v = static_cast<T const*>(p.v.ptr) + (cu_k ? 0 : b * p.v.batch_stride) + k_row0 * p.v.row_stride +
               hk * p.v.head_stride;
  int64_t const q_index = cu_q ? q_row0 + i : int64_t(b) * sq + i;  // row of the packed result
  int const diag = i + sk - sq;
  int const j_lo = p.mask.window_left < 0 ? 0 : max(0, diag - p.mask.window_left);
  int const j_hi = p.mask.window_right < 0 ? sk - 1 : min(sk - 1, diag + p.mask.window_right);

  auto score = [&](int j) {
    float s = 0.f;
    for (int d = 0; d < p.head_dim; ++d) s += to_float(q[d]) * to_float(k[int64_t(j) * p.k.row_stride + d]);
    return s * p.softmax_scale;
  };
  float m = -INFINITY;
  for (int j = j_lo; j <= j_hi; ++j) m = fmaxf(m, score(j));
  float acc[kMaxHeadDim];
  for (int d = 0; d < p.head_dim_v; ++d) acc[d] = 0.f;
  float l = 0.f;
  for (int j = j_lo; j <= j_hi; ++j) {
    float const e = expf(score(j) - m);
    l += e;
    for (int d = 0; d < p.head_dim_v; ++d) acc[d] += e * to_float(v[int64_t(j) * p.v.row_stride + d]);
  }
  float* o = out_ref + (q_index * p.num_heads + h) * p.head_dim_v;
  for (int d = 0; d < p.head_dim_v; ++d) o[d] = l > 0.f ? acc[d] / l : 0.f;
  lse_ref[int64_t(h) * total_q + q_index] = l > 0.f ? m + logf(l) : -INFINITY;
}

template <class T>
__global__ void to_float_kernel(T const* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = to_float(in[i]);
}

struct ErrorStats {
  double max_abs = 0, mean_abs = 0;
  int64_t nonfinite = 0;
};

// Compares every element. A -inf reference (empty row's LSE) must be matched exactly; any other non-finite
// kernel value (NaN poison left unwritten, overflow) is an error.
ErrorStats compare(std::vector<float> const& got, std::vector<float> const& ref) {
  ErrorStats s;
  int64_t n = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (got[i] != ref[i]) ++s.nonfinite;
      continue;
    }
    if (!std::isfinite(got[i])) { ++s.nonfinite; continue; }
    double const e = std::fabs(double(got[i]) - double(ref[i]));
    s.max_abs = std::max(s.max_abs, e);
    s.mean_abs += e;
    ++n;
  }
  if (n) s.mean_abs /= n;
  return s;
}

template <class T>
T* device_alloc(int64_t elems) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<int64_t>(elems, 1) * sizeof(T)));
  return p;
}

// TIn: the input element type; TOut: the output's (TIn, or bf16 for fp8 inputs).
template <class TIn, class TOut>
int run(Options const& o) {
  int device = 0, num_sms = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  if (prop.major != 9 || prop.minor != 0) {
    std::fprintf(stderr, "error: %s is sm_%d%d; these kernels need sm_90 (H100/H200)\nRESULT: FAIL\n", prop.name,
                 prop.major, prop.minor);
    return 1;
  }

  Lengths const L = draw_lengths(o);
  int const b = o.batch_size, h = o.num_heads, hk = o.num_heads_k, d = o.head_size;
  if (L.total_q > INT32_MAX || L.total_k > INT32_MAX) {
    std::fprintf(stderr, "error: the total number of tokens must fit in int32\nRESULT: FAIL\n");
    return 1;
  }
  int64_t const q_elems = L.total_q * h * d, kv_elems = L.total_k * hk * d;

  TIn* q = device_alloc<TIn>(q_elems);
  TIn* k = device_alloc<TIn>(kv_elems);
  TIn* v = device_alloc<TIn>(kv_elems);
  TOut* out = device_alloc<TOut>(q_elems);
  float* lse = device_alloc<float>(L.total_q * h);
  int32_t* cu_q = device_alloc<int32_t>(b + 1);
  int32_t* cu_k = device_alloc<int32_t>(b + 1);
  fill_uniform<<<1024, 256>>>(q, q_elems, o.seed * 3 + 1);
  fill_uniform<<<1024, 256>>>(k, kv_elems, o.seed * 3 + 2);
  fill_uniform<<<1024, 256>>>(v, kv_elems, o.seed * 3 + 3);
  CHECK_CUDA(cudaGetLastError());
  // NaN poison (all-ones bits are NaN in fp16, bf16 and fp32): an element the kernel does not write fails.
  CHECK_CUDA(cudaMemset(out, 0xFF, std::max<int64_t>(q_elems, 1) * sizeof(TOut)));
  CHECK_CUDA(cudaMemset(lse, 0xFF, std::max<int64_t>(L.total_q * h, 1) * sizeof(float)));

  flash3::FwdParams p;
  p.dtype = o.dtype;
  p.out_dtype = o.dtype == FLASH3_FLOAT8_E4M3 ? FLASH3_BFLOAT16 : o.dtype;
  // Both layouts store rows as (row, head, dim) with dim contiguous; dense adds a batch stride.
  auto operand = [&](void* ptr, int heads, int64_t packed_rows, int dense_rows) {
    flash3::Operand op;
    op.ptr = ptr;
    op.head_stride = d;
    op.row_stride = int64_t(heads) * d;
    op.batch_stride = o.dense ? int64_t(dense_rows) * heads * d : 0;
    op.rows = static_cast<int32_t>(o.dense ? dense_rows : packed_rows);
    return op;
  };
  p.q = operand(q, h, L.total_q, o.max_seqlen_q);
  p.k = operand(k, hk, L.total_k, o.max_seqlen_k);
  p.v = operand(v, hk, L.total_k, o.max_seqlen_k);
  p.out = operand(out, h, L.total_q, o.max_seqlen_q);
  p.lse.ptr = lse;
  if (o.dense) {  // (batch, num_heads, seqlen_q)
    p.lse.batch_stride = int64_t(h) * o.max_seqlen_q;
    p.lse.head_stride = o.max_seqlen_q;
  } else {  // (num_heads, total_q)
    p.lse.head_stride = L.total_q;
    std::vector<int32_t> hq(b + 1, 0), hkv(b + 1, 0);
    for (int i = 0; i < b; ++i) {
      hq[i + 1] = hq[i] + L.q[i];
      hkv[i + 1] = hkv[i] + L.k[i];
    }
    CHECK_CUDA(cudaMemcpy(cu_q, hq.data(), (b + 1) * sizeof(int32_t), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(cu_k, hkv.data(), (b + 1) * sizeof(int32_t), cudaMemcpyHostToDevice));
    p.varlen.cu_seqlens_q = cu_q;
    p.varlen.cu_seqlens_k = cu_k;
    p.varlen.max_seqlen_q = L.max_q;
    p.varlen.max_seqlen_k = L.max_k;
  }
  p.batch = b;
  p.num_heads = h;
  p.num_heads_k = hk;
  p.head_dim = p.head_dim_v = d;
  if (o.causal) p.mask.window_right = 0;
  p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.num_sms = num_sms;
  // Causal and varlen tiles differ in cost: a tile counter lets the kernel balance them (re-zeroed per call).
  int32_t* tile_counter = device_alloc<int32_t>(1);
  bool const use_counter = o.causal || !o.dense;
  if (use_counter) p.tile_counter = tile_counter;
  p.schedule.num_splits = o.num_splits;
  // The call's scratch memory (FP8's transposed V, split-KV's partials), allocated once: without it every
  // call takes and returns it through the stream-ordered allocator, which the timing would include. A plan
  // that fails leaves it unset; run_fwd then reports the same failure.
  flash3::FwdPlan plan;
  void* workspace = nullptr;
  bool const planned = flash3::plan_fwd(p, &plan) == FLASH3_SUCCESS;
  if (planned && plan.workspace_bytes > 0) {
    CHECK_CUDA(cudaMalloc(&workspace, size_t(plan.workspace_bytes)));  // cudaMalloc aligns to >= 256 bytes
    p.workspace = workspace;
    p.workspace_bytes = plan.workspace_bytes;
  }

  std::printf("%s | %s %s | b=%d max_sq=%d max_sk=%d h=%d hk=%d d=%d (kernel hdim %d)%s | seed %u\n", prop.name,
              dtype_name(o.dtype), o.dense ? "dense" : "varlen", b, o.max_seqlen_q, o.max_seqlen_k, h, hk, d,
              flash3::compiled_head_dim(o.dtype, d), o.causal ? " causal" : "", o.seed);
  print_lengths("q", L.q);
  print_lengths("k", L.k);
  if (planned) {
    std::printf("plan: tile %dx%d, %d split%s, PackGQA %s, %lld tiles on %d CTAs, workspace %lld bytes\n",
                plan.block_m, plan.block_n, plan.num_splits, plan.num_splits == 1 ? "" : "s",
                plan.pack_gqa ? "on" : "off", static_cast<long long>(plan.num_tiles), plan.grid,
                static_cast<long long>(plan.workspace_bytes));
  }

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  auto call = [&]() {
    if (use_counter) CHECK_CUDA(cudaMemsetAsync(tile_counter, 0, sizeof(int32_t), stream));
    cudaError_t err = cudaSuccess;
    flash3::Status const st = flash3::run_fwd(p, stream, &err);
    if (st == FLASH3_NOT_COMPILED) {
      std::fprintf(stderr, "not built: %s (%s, head_size %d); rebuild with it selected (FLASH_ATTN3_DTYPES/HDIMS)\n"
                           "RESULT: NOT BUILT\n",
                   flash3::last_error_detail(), dtype_name(o.dtype), d);
      std::exit(2);
    }
    if (st == FLASH3_CUDA_ERROR) check_cuda(err, "flash3::run_fwd");
    if (st != FLASH3_SUCCESS) {
      std::fprintf(stderr, "error: flash3::run_fwd: %s: %s\nRESULT: FAIL\n", flash3::status_string(st),
                   flash3::last_error_detail());
      std::exit(1);
    }
  };

  call();  // the verified call: its outputs are checked before any timing run overwrites them
  CHECK_CUDA(cudaStreamSynchronize(stream));
  int rc = 0;
  std::string verdict = "PASS (not verified: add --verify)";
  if (o.verify) {
    float* out_ref = device_alloc<float>(q_elems);
    float* out_f = device_alloc<float>(q_elems);
    float* lse_ref = device_alloc<float>(L.total_q * h);
    int const max_q = std::max(1, L.max_q);
    reference_fwd<TIn><<<dim3((max_q + 127) / 128, h, b), 128, 0, stream>>>(p, L.total_q, out_ref, lse_ref);
    CHECK_CUDA(cudaGetLastError());
    to_float_kernel<<<1024, 256, 0, stream>>>(out, out_f, q_elems);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaStreamSynchronize(stream));
    std::vector<float> got(q_elems), ref(q_elems), lse_got(L.total_q * h), lse_want(L.total_q * h),
        lse_raw(L.total_q * h);
    CHECK_CUDA(cudaMemcpy(got.data(), out_f, q_elems * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(ref.data(), out_ref, q_elems * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(lse_want.data(), lse_ref, L.total_q * h * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(lse_raw.data(), lse, L.total_q * h * sizeof(float), cudaMemcpyDeviceToHost));
    if (o.dense) {  // (batch, num_heads, seqlen_q) -> (num_heads, total_q)
      int const sq = o.max_seqlen_q;
      for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t hi = 0; hi < h; ++hi)
          for (int64_t i = 0; i < sq; ++i)
            lse_got[hi * L.total_q + bi * sq + i] = lse_raw[bi * p.lse.batch_stride + hi * p.lse.head_stride + i];
    } else {
      lse_got = lse_raw;
    }
    ErrorStats const eo = compare(got, ref), el = compare(lse_got, lse_want);
    // Thresholds: inputs are U(-1, 1), so |out| <= 1 and is about 0.03 for long rows. The kernel rounds P to
    // the input dtype before P·V and rounds out to the output dtype: half an ulp at 1 is 2.4e-4 (fp16) and
    // 2e-3 (bf16); FP8 rounds P to e4m3 (3 mantissa bits). The max bounds allow a few such roundings; the mean
    // bounds are about 10x what correct kernels give.
    bool const bf16_out = p.out_dtype == FLASH3_BFLOAT16;
    bool const fp8 = o.dtype == FLASH3_FLOAT8_E4M3;
    double const max_tol = fp8 ? 5e-2 : bf16_out ? 1e-2 : 2e-3;
    double const mean_tol = fp8 ? 5e-3 : bf16_out ? 1e-3 : 1e-4;
    double const lse_tol = 1e-3;
    bool const ok = eo.nonfinite == 0 && el.nonfinite == 0 && eo.max_abs <= max_tol && eo.mean_abs <= mean_tol &&
                    el.max_abs <= lse_tol;
    std::printf("verify: %lld out + %lld lse elements | out max|err| %.3e (tol %.0e), mean %.3e (tol %.0e); "
                "lse max|err| %.3e (tol %.0e); non-finite or unwritten %lld -> %s\n",
                static_cast<long long>(q_elems), static_cast<long long>(L.total_q * h), eo.max_abs, max_tol,
                eo.mean_abs, mean_tol, el.max_abs, lse_tol, static_cast<long long>(eo.nonfinite + el.nonfinite),
                ok ? "PASS" : "FAIL");
    rc = ok ? 0 : 1;
    verdict = ok ? "PASS (verified)" : "FAIL (verification)";
    CHECK_CUDA(cudaFree(out_ref));
    CHECK_CUDA(cudaFree(out_f));
    CHECK_CUDA(cudaFree(lse_ref));
  }

  for (int i = 0; i < kWarmupIters; ++i) call();
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms(o.iters);
  for (int i = 0; i < o.iters; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    call();
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&ms[i], start, stop));
  }
  std::sort(ms.begin(), ms.end());
  double const median_ms = ms[ms.size() / 2];
  // FlashAttention-3's convention (benchmark_attn.py), per sequence: 2 matmuls of 2·sq·avg_sk·d FLOPs per
  // head, where a causal query sees on average (max(0, sk - sq) + sk) / 2 keys.
  double flops = 0;
  for (int i = 0; i < b; ++i) {
    double const sq = L.q[i], sk = L.k[i];
    double const avg_sk = o.causal ? (std::max(0.0, sk - sq) + sk) / 2.0 : sk;
    flops += 4.0 * h * sq * avg_sk * d;
  }
  std::printf("time: %.4f ms (median of %d; min %.4f, max %.4f) | %.1f TFLOP/s\n", median_ms, o.iters, ms.front(),
              ms.back(), flops / (median_ms * 1e-3) / 1e12);
  std::printf("RESULT: %s\n", verdict.c_str());

  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaStreamDestroy(stream));
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(out),
                    static_cast<void*>(lse), static_cast<void*>(cu_q), static_cast<void*>(cu_k),
                    static_cast<void*>(tile_counter), workspace})
    CHECK_CUDA(cudaFree(ptr));
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  Options const o = parse_args(argc, argv);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "error: no CUDA device (%s)\nRESULT: FAIL\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "count 0");
    return 1;
  }
  switch (o.dtype) {
    case FLASH3_BFLOAT16: return run<__nv_bfloat16, __nv_bfloat16>(o);
    case FLASH3_FLOAT8_E4M3: return run<__nv_fp8_e4m3, __nv_bfloat16>(o);
    default: return run<__half, __half>(o);
  }
}
