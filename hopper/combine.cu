// The split-KV combine kernel (combine.h). One warp per (batch entry, row, head): the lanes first reduce the
// row's partial LSEs (max, then the sum of exponentials), then walk the splits in order, each lane
// accumulating its columns of sum_i w_i out_i, with the weights w_i computed by the lanes 32 splits at a time
// and broadcast by shuffles. Splits whose weight is 0 are skipped without reading their partial output. The
// partial outputs are read once, coalesced (a warp reads a row's columns of one split together); the
// kernel is memory-bound, and with the heuristic's split counts its data is a few MB.
#include "combine.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace flash3 {

namespace {

constexpr int kCombineThreads = 128;
constexpr int kWarps = kCombineThreads / 32;

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
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(CombineParams const p) {
  // Launched as a programmatic dependent of the kernel before it (launch_typed). That kernel issues no
  // early trigger, so this grid starts once its last CTA has exited, without waiting for the grid's
  // completion to be signalled through the stream; this wait then orders the reads after all of its writes
  // (a no-op without a primary grid).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
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
    float m = -INFINITY;
    for (int s = lane; s < p.num_splits; s += 32) { m = fmaxf(m, lse_in[s * p.lse_split_stride]); }
    m = warp_max(m);
    float const sink = p.sinks != nullptr ? p.sinks[head] : -INFINITY;
    m = fmaxf(m, sink);
    float sum = 0.f;
    if (m > -INFINITY) {
      for (int s = lane; s < p.num_splits; s += 32) {
        float const l = lse_in[s * p.lse_split_stride];
        if (l > -INFINITY) { sum += expf(l - m); }
      }
    }
    sum = warp_sum(sum);
    if (sink > -INFINITY) { sum += expf(sink - m); }
    float const lse = (m > -INFINITY && sum > 0.f) ? m + logf(sum) : -INFINITY;
    if (p.lse != nullptr && lane == 0) {
      p.lse[int64_t(batch_entry) * p.lse_out_batch_stride + row_index * p.lse_out_row_stride +
            int64_t(head) * p.lse_out_head_stride] = lse;
    }

    float const* o_in = p.o_partial + int64_t(batch_entry) * p.o_batch_stride + row_index * p.o_row_stride +
                        int64_t(head) * p.o_head_stride;
    Out* out = static_cast<Out*>(p.out) + int64_t(batch_entry) * p.out_batch_stride + row_index * p.out_row_stride +
               int64_t(head) * p.out_head_stride;
    // Column chunks of 32 lanes x kVec; the shuffles need every lane, so lanes past the head dim stay in the
    // loop and only skip their loads and stores.
    for (int c_base = 0; c_base < p.head_dim; c_base += 32 * kVec) {
      int const c0 = c_base + lane * kVec;
      bool const active = c0 < p.head_dim;
      float acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) { acc[e] = 0.f; }
      for (int s0 = 0; s0 < p.num_splits; s0 += 32) {
        float w_lane = 0.f;
        if (s0 + lane < p.num_splits) {
          float const w = expf(lse_in[(s0 + lane) * p.lse_split_stride] - lse);
          w_lane = (w > 0.f && w <= 1.f + 1e-3f) ? w : 0.f;  // NaN (lse = -inf rows) and -inf splits give 0
        }
        int const n = p.num_splits - s0 < 32 ? p.num_splits - s0 : 32;
        for (int j = 0; j < n; ++j) {
          float const w = __shfl_sync(0xffffffffu, w_lane, j);
          if (w > 0.f && active) {
            float const* src = o_in + int64_t(s0 + j) * p.o_split_stride + c0;
            if constexpr (kVec == 4) {
              float4 const v = *reinterpret_cast<float4 const*>(src);
              acc[0] += w * v.x;
              acc[1] += w * v.y;
              acc[2] += w * v.z;
              acc[3] += w * v.w;
            } else {
#pragma unroll
              for (int e = 0; e < kVec; ++e) { acc[e] += w * src[e]; }
            }
          }
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
  return vec ? cudaLaunchKernelEx(&config, combine_kernel<Out, 4>, p) : cudaLaunchKernelEx(&config, combine_kernel<Out, 1>, p);
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
