// Score policies: how a tile's raw scores S = Q K^T become the logits its softmax exponentiates. A policy is
// built per tile from the kernel params and the tile coordinate (so per-head or per-batch factors, such as
// FP8 descales or sink logits, have a place), owns the softmax scale, and may transform the scores in place
// before the mask (softcap will). The mainloop takes the policy as one type; nothing else changes with it.
#pragma once

#include <cfloat>
#include <cmath>

#include "params.h"
#include "tile_scheduler.h"

namespace flash3 {

// softmax_scale * log2(e) as the exponent's factor. A zero scale (or one that would be a denormal, which the
// kernel flushes to zero) becomes FLT_MIN: the weights are then exactly 1 (uniform attention) and masked
// -inf scores stay -inf instead of -inf * 0 = NaN.
__host__ __device__ inline float exponent_scale(float softmax_scale) {
  float const scale_log2 = softmax_scale * float(M_LOG2E);
  return fabsf(scale_log2) < FLT_MIN ? FLT_MIN : scale_log2;
}

// Scaled dot-product scores: logit = softmax_scale * s, or with a softcap c > 0 (Gemma-2, Grok; FA3's
// semantics) logit = c * tanh(softmax_scale * s / c), applied before the mask. Without a softcap the scale is
// not applied to S here: it is folded into the softmax's exp2 (one FFMA per score), so apply() leaves S as
// it is. With one, apply() computes the logits themselves (one FMUL, one MUFU.TANH, one FMUL per score), and
// the softmax's scale becomes 1 (log2(e) in the exponent); the switch is a run-time value of the params,
// uniform over the tile, so kernels without a softcap pay one predicated branch per block.
// kDescale (FP8): the scores are of quantised q and k, so the tile's q_descale * k_descale (one value per
// (batch, kv head)) joins the scale, and v_descale scales the normalised output (o_scale).
// kSoftcap: whether this kernel can apply a softcap (the launch sends softcap calls only to kernels that can).
template <bool kDescale = false, bool kSoftcap = true>
struct ScaledScores {
  struct Params {
    float softmax_scale;
    float scale_log2;
    float softcap;  // 0 = off
    float cap_in;   // softmax_scale / softcap (without descales)
    flash3_fp8 descale;  // unused unless kDescale
    float const* sinks;  // (num_heads) sink logits, or null (split-KV: the combine adds them)
  };

  static Params to_params(float softmax_scale, float softcap, flash3_fp8 const& descale, float const* sinks) {
    return {softmax_scale, exponent_scale(softmax_scale), softcap, softcap > 0.f ? softmax_scale / softcap : 0.f,
            descale, sinks};
  }

  // Attention sinks: the row's sink logit joins its denominator: lse' = log(e^lse + e^sink), and the
  // normalised output shrinks by e^(lse - lse'). A row that saw no key gets lse' = sink and keeps O = 0.
  __device__ static void add_sink(float sink, float& lse, float& o_scale) {
    float const hi = fmaxf(lse, sink);
    float const lo = fminf(lse, sink);
    float const merged = hi + log1pf(expf(lo - hi));
    o_scale *= lse > -INFINITY ? expf(lse - merged) : 0.f;
    lse = merged;
  }

  __device__ static float read(flash3_descale const& d, int batch, int head_k) {
    return d.ptr ? d.ptr[int64_t(batch) * d.batch_stride + int64_t(head_k) * d.head_stride] : 1.f;
  }

  __device__ static ScaledScores for_tile(Params const& p, TileCoord const& tile, int head_k) {
    float scale = p.softmax_scale;
    float o_scale = 1.f;
    if constexpr (kDescale) {
      scale *= read(p.descale.q, tile.batch, head_k) * read(p.descale.k, tile.batch, head_k);
      o_scale = read(p.descale.v, tile.batch, head_k);
    }
    if (kSoftcap && p.softcap > 0.f) {  // the logits are computed in apply(); the softmax then scales by 1
      return {1.f, float(M_LOG2E), o_scale, kDescale ? scale / p.softcap : 0.f};
    }
    return {scale, kDescale ? exponent_scale(scale) : p.scale_log2, o_scale, 0.f};
  }

  float softmax_scale;  // of the LSE, in natural-log units
  float scale_log2;     // of the exponent
  float o_scale;        // of the normalised output (v_descale)
  float cap_in;         // FP8 with a softcap: scale / softcap of this tile

  __device__ static float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  // 16-bit reads the softcap's factors from the kernel params (constant memory) at each use, so that they
  // take no registers across the loop; FP8's factor depends on the tile's descales.
  template <class TensorS>
  __device__ void apply(TensorS& tSrS_rc, Params const& p) const {
    if constexpr (kSoftcap) {
      if (p.softcap > 0.f) {
        float const in = kDescale ? cap_in : p.cap_in;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS_rc); ++i) { tSrS_rc(i) = p.softcap * tanh_approx(tSrS_rc(i) * in); }
      }
    }
  }
};

}  // namespace flash3
