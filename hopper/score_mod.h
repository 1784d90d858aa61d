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

// Scaled dot-product scores: logit = softmax_scale * s. The scale is not applied to S here: it is folded into
// the softmax's exp2 (one FFMA per score), so apply() leaves S as it is.
// kDescale (FP8): the scores are of quantised q and k, so the tile's q_descale * k_descale (one value per
// (batch, kv head)) joins the scale, and v_descale scales the normalised output (o_scale).
template <bool kDescale = false>
struct ScaledScores {
  struct Params {
    float softmax_scale;
    float scale_log2;
    flash3_fp8 descale;  // unused unless kDescale
  };

  static Params to_params(float softmax_scale, flash3_fp8 const& descale) {
    return {softmax_scale, exponent_scale(softmax_scale), descale};
  }

  __device__ static float read(flash3_descale const& d, int batch, int head_k) {
    return d.ptr ? d.ptr[int64_t(batch) * d.batch_stride + int64_t(head_k) * d.head_stride] : 1.f;
  }

  __device__ static ScaledScores for_tile(Params const& p, TileCoord const& tile, int head_k) {
    if constexpr (kDescale) {
      float const qk = read(p.descale.q, tile.batch, head_k) * read(p.descale.k, tile.batch, head_k);
      float const scale = p.softmax_scale * qk;
      return {scale, exponent_scale(scale), read(p.descale.v, tile.batch, head_k)};
    } else {
      return {p.softmax_scale, p.scale_log2, 1.f};
    }
  }

  float softmax_scale;  // of the LSE, in natural-log units
  float scale_log2;     // of the exponent
  float o_scale;        // of the normalised output (v_descale)

  template <class TensorS>
  __device__ void apply(TensorS& /*tSrS_rc*/) const {}
};

}  // namespace flash3
