// The split-KV combine kernel (combine.h). One warp per (batch entry, row, head): each lane reads its splits'
// partial LSEs into registers (lane l: splits l, l + 32, ...; at most 256 splits), the warp reduces them
// (max, then the sum of exponentials) and each lane turns its own into weights; then the lanes walk the
// splits kBatch at a time, each lane accumulating its columns of sum_i w_i out_i with the weights read from
// shared memory, the batch's loads issued before its FMAs. Splits whose weight is 0 are skipped without reading
// their partial output. The partial outputs are read once, coalesced (a warp reads a row's columns of one
// split together); the kernel's data is a few MB, so its time is memory latency more than bandwidth.
#include "combine.h"
#include "launch_utils.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace flash3 {

namespace {

constexpr int kCombineThreads = 128;
constexpr int kWarps = kCombineThreads / 32;
constexpr int kMaxSplits = 256;                // CombineParams::num_splits is 1..256
constexpr int kLseRegs = kMaxSplits / 32;      // partial LSEs per lane
constexpr int kBatch = 8;                      // partial outputs in flight per lane
static_assert(kMaxSplits % 32 == 0 && kMaxSplits % kBatch == 0, "whole LSE registers and batches");

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) { x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o)); }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) { x += __shfl_xor_sync(0xffffffffu, x, o); }
  return x;
}

template <class Out>
__device__ __forceinline__ Out from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// kVec: columns per lane and access (4 when every address and stride allows 16-byte float loads).
template <class Out, int kVec>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(CombineParams const p) {
  // Launched as a programmatic dependent of the kernel before it (launch_typed). The split attention kernel
  // triggers its dependents once each of its CTAs holds its last tile (kernel_fwd_sm90.h), so this grid's
  // launch overlaps those last tiles; this wait orders every read after all of that kernel's writes (a
  // no-op without a primary grid).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  __shared__ float weights_smem[kWarps][kMaxSplits];
  int const lane = int(threadIdx.x) % 32;
  int64_t const total = int64_t(p.batch) * p.rows * p.heads;
  int64_t const stride = int64_t(gridDim.x) * kWarps;
  for (int64_t item = int64_t(blockIdx.x) * kWarps + int(threadIdx.x) / 32; item < total; item += stride) {
    int const head = int(item % p.heads);
    int64_t const batch_row = item / p.heads;
    int const row = int(batch_row % p.rows);
    int const b = int(batch_row / p.rows);
    int batch_entry = b;
    int64_t row_index = row;
    if (p.use_seqlen) {
      SeqlenInfo const s(p.seqlen, b);
      if (row >= s.seqlen_q) { continue; }  // warp-uniform: the whole warp has the same item
      batch_entry = s.batch_q;
      row_index = int64_t(s.offset_q) + row;
    }
    float const* lse_in = p.lse_partial + int64_t(batch_entry) * p.lse_batch_stride + row_index * p.lse_row_stride +
                          int64_t(head) * p.lse_head_stride;
    // The row's partial LSEs, read once: lane l holds splits l, l + 32, ... in registers (all loads in
    // flight together), and the max, the sum and the weights are computed from them.
    float l[kLseRegs];
#pragma unroll
    for (int r = 0; r < kLseRegs; ++r) {
      int const s = r * 32 + lane;
      l[r] = s < p.num_splits ? lse_in[s * p.lse_split_stride] : -INFINITY;
    }
    float m = -INFINITY;
#pragma unroll
    for (int r = 0; r < kLseRegs; ++r) { m = fmaxf(m, l[r]); }
    m = warp_max(m);
    float const sink = p.sinks != nullptr ? p.sinks[head] : -INFINITY;
    m = fmaxf(m, sink);
    float sum = 0.f;
    if (m > -INFINITY) {
#pragma unroll
      for (int r = 0; r < kLseRegs; ++r) {
        if (l[r] > -INFINITY) { sum += expf(l[r] - m); }
      }
    }
    sum = warp_sum(sum);
    if (sink > -INFINITY) { sum += expf(sink - m); }
    float const lse = (m > -INFINITY && sum > 0.f) ? m + logf(sum) : -INFINITY;
    if (p.lse != nullptr && lane == 0) {
      p.lse[int64_t(batch_entry) * p.lse_out_batch_stride + row_index * p.lse_out_row_stride +
            int64_t(head) * p.lse_out_head_stride] = lse;
    }
    // The weights go to this warp's slice of shared memory, where every lane reads them (broadcasts).
    float* const weights = weights_smem[threadIdx.x / 32];
    __syncwarp();  // the previous item's reads of `weights` are done
#pragma unroll
    for (int r = 0; r < kLseRegs; ++r) {
      float const w = expf(l[r] - lse);
      weights[r * 32 + lane] = (w > 0.f && w <= 1.f + 1e-3f) ? w : 0.f;  // NaN (lse = -inf rows), -inf splits: 0
    }
    __syncwarp();

    float const* o_in = p.o_partial + int64_t(batch_entry) * p.o_batch_stride + row_index * p.o_row_stride +
                        int64_t(head) * p.o_head_stride;
    Out* out = static_cast<Out*>(p.out) + int64_t(batch_entry) * p.out_batch_stride + row_index * p.out_row_stride +
               int64_t(head) * p.out_head_stride;
    // Column chunks of 32 lanes x kVec; lanes past the head dim skip their loads and stores.
    for (int c_base = 0; c_base < p.head_dim; c_base += 32 * kVec) {
      int const c0 = c_base + lane * kVec;
      bool const active = c0 < p.head_dim;
      float acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) { acc[e] = 0.f; }
      // kBatch splits at a time: their loads are issued before any of their FMAs, so a warp waits for memory
      // once per batch rather than once per split (the combine of a 1 x 8192 decode with 16 splits took 17k
      // cycles in Nsight Compute, session 16, waiting on one split's load after another).
      for (int s0 = 0; s0 < p.num_splits; s0 += kBatch) {
        float w[kBatch];
        float v[kBatch][kVec];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          // Slots past num_splits hold 0 (their LSE registers were -inf), and kMaxSplits % kBatch == 0.
          w[u] = weights[s0 + u];
        }
        // A split of weight 0 is not read: its partial output may never have been written. Predicated loads
        // into registers of their own, so that all kBatch are in flight before the first FMA waits.
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          bool const load = w[u] > 0.f && active;
          float const* src = o_in + int64_t(s0 + u) * p.o_split_stride + c0;
          if constexpr (kVec == 4) {
            float4 const x = load ? *reinterpret_cast<float4 const*>(src) : make_float4(0.f, 0.f, 0.f, 0.f);
            v[u][0] = x.x;
            v[u][1] = x.y;
            v[u][2] = x.z;
            v[u][3] = x.w;
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) { v[u][e] = load ? src[e] : 0.f; }
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) { acc[e] += w[u] * v[u][e]; }
        }
      }
      if (active) {
        Pack<Out, kVec> pack;
#pragma unroll
        for (int e = 0; e < kVec; ++e) { pack.v[e] = from_float<Out>(acc[e]); }
        *reinterpret_cast<Pack<Out, kVec>*>(out + c0) = pack;
      }
    }
  }
}

template <class Out>
cudaError_t launch_typed(CombineParams const& p, cudaStream_t stream) {
  int64_t const items = int64_t(p.batch) * p.rows * p.heads;
  if (items <= 0) { return cudaSuccess; }
  int64_t blocks = (items + kWarps - 1) / kWarps;
  blocks = blocks < 65536 ? blocks : 65536;  // the warps stride over the rest
  auto aligned = [](void const* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  bool const vec = p.head_dim % 4 == 0 && aligned(p.o_partial, 16) && p.o_split_stride % 4 == 0 &&
                   p.o_batch_stride % 4 == 0 && p.o_row_stride % 4 == 0 && p.o_head_stride % 4 == 0 &&
                   aligned(p.out, 4 * sizeof(Out)) && p.out_batch_stride % 4 == 0 && p.out_row_stride % 4 == 0 &&
                   p.out_head_stride % 4 == 0;
  // Programmatic dependent launch: the combine's launch is not serialised behind the stream's completion
  // of the kernel before it (the split-KV attention); capturable in graphs. An early trigger in the attention
  // kernel (griddepcontrol.launch_dependents after each CTA's last tile) would overlap more: not measured yet.
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(kCombineThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  auto const kernel = vec ? combine_kernel<Out, 4> : combine_kernel<Out, 1>;
  cudaError_t const err = prefer_max_shared_carveout(kernel);
  if (err != cudaSuccess) { return err; }
  return cudaLaunchKernelEx(&config, kernel, p);
}

}  // namespace

cudaError_t launch_combine(CombineParams const& p, cudaStream_t stream) {
  switch (p.out_type) {
    case CombineOut::kFloat32: return launch_typed<float>(p, stream);
    case CombineOut::kFloat16: return launch_typed<__half>(p, stream);
    case CombineOut::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flash3
