// Online softmax over the key blocks of one query tile, in registers.
//
// Lifecycle: construct with the scale, call `update<kFirst>` on each block's scores (it turns them into
// unnormalised probabilities in place and returns how much to rescale O by), `rescale_o` on the output
// accumulator, and `finalize` once at the end for 1/rowsum and the LSE.
//
// Numerics: exp(scale * (s - max)) is computed as exp2(s * scale_log2 - max * scale_log2), one FFMA and one
// MUFU.EX2 per score. Any finite scale is valid. For a negative scale the largest scaled score belongs to
// the smallest raw score, so the running "max" becomes a running minimum and invisible scores are +inf
// instead of -inf (masked_score()): in both cases invisible scores scale to -inf and weigh 0. The choice is
// a warp-uniform branch between two compiled bodies (update), so positive scales pay nothing for it. A scale of 0
// (uniform attention) reaches here as scale_log2 = FLT_MIN (see the mainloop's Params): every visible weight
// rounds to exactly 1 while -inf stays -inf, where a true 0 would turn -inf * 0 into NaN.
// A row whose scaled extremum is -inf (no visible key yet) uses 0 instead so that -inf - -inf never produces
// NaN; such a row keeps sum 0 and finishes with O = 0 and LSE = -inf. Each thread keeps partial row sums
// over its own columns; they are combined across the 4 threads sharing a row only in finalize, which is
// exact because the rescale factors are identical across those threads.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

namespace flash3 {

using namespace cute;

// kMaxOffset: log2 headroom subtracted from every row's maximum, so the largest weight is 2^kMaxOffset instead
// of 1 (FP8 P uses it to spend its exponent range on the weights that matter); the LSE takes it back out.
template <int kRows, int kMaxOffset = 0>
struct OnlineSoftmax {
  float row_max[kRows];  // the raw score with the largest scaled value so far (a minimum if scale < 0)
  float row_sum[kRows];
  float scale_log2;
  bool negative;  // scale_log2 < 0: the extremum is a minimum

  __device__ explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_), negative(scale_log2_ < 0.f) {
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRows; ++m) {
      row_max[m] = masked_score();  // the identity of the running extremum
      row_sum[m] = 0.f;
    }
  }

  // The raw score a mask writes for an invisible key: it scales to -inf for either sign of the scale.
  __device__ float masked_score() const { return negative ? INFINITY : -INFINITY; }

  // The 4 threads of a quad own the same rows of a WGMMA accumulator.
  __device__ static float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
  }

  // s: scores as (rows, cols). Replaces them by exp2 terms, updates max and sum, and writes the factor by
  // which O accumulated so far must be scaled into `o_scale`. The sign of the scale picks one of two
  // compiled bodies by a warp-uniform branch: with the choice inside the reduction, ptxas emitted every
  // FMNMX twice (a predicated max and a predicated min), 88 of the 684 instructions of the d 128 steady
  // loop and twice its dependent chain (2026-12-01).
  template <bool kFirst, class TensorS>
  __device__ void update(TensorS& s, float (&o_scale)[kRows]) {
    if (negative) {
      update_signed<kFirst, true>(s, o_scale);
    } else {
      update_signed<kFirst, false>(s, o_scale);
    }
  }

  template <bool kFirst, bool kNegative, class TensorS>
  __device__ void update_signed(TensorS& s, float (&o_scale)[kRows]) {
    static_assert(decltype(size<0>(s))::value == kRows);
    auto ext = [](float a, float b) { return kNegative ? fminf(a, b) : fmaxf(a, b); };
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRows; ++m) {
      float mx = row_max[m];
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(s); ++n) { mx = ext(mx, s(m, n)); }
      mx = ext(mx, __shfl_xor_sync(0xffffffff, mx, 1));  // the 4 threads of a quad own the same rows
      mx = ext(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      float const mx_scaled = mx * scale_log2 == -INFINITY ? 0.f : mx * scale_log2;
      o_scale[m] = kFirst ? 1.f : exp2f(row_max[m] * scale_log2 - mx_scaled);
      row_max[m] = mx;
      float const shift = mx_scaled - float(kMaxOffset);  // weights are exp2(s * scale_log2 - shift)
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(s); ++n) {
        s(m, n) = exp2f(s(m, n) * scale_log2 - shift);
        sum += s(m, n);
      }
      row_sum[m] = kFirst ? sum : row_sum[m] * o_scale[m] + sum;
    }
  }

  // o: output accumulator as (rows, cols).
  template <class TensorO>
  __device__ static void rescale_o(TensorO& o, float const (&o_scale)[kRows]) {
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRows; ++m) {
      CUTLASS_PRAGMA_UNROLL
      for (int n = 0; n < size<1>(o); ++n) { o(m, n) *= o_scale[m]; }
    }
  }

  // Returns 1/rowsum in `o_scale` (0 for rows without any visible key) and the natural-log LSE of the
  // scaled scores (-inf for those rows).
  __device__ void finalize(float softmax_scale, float (&o_scale)[kRows], float (&lse)[kRows]) {
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRows; ++m) {
      float const sum = quad_sum(row_sum[m]);
      bool const empty = sum == 0.f || sum != sum;
      o_scale[m] = empty ? 0.f : 1.f / sum;
      lse[m] = empty ? -INFINITY : row_max[m] * softmax_scale + logf(sum) - float(kMaxOffset) * float(M_LN2);
    }
  }
};

}  // namespace flash3
