// Score policies: how a tile's raw scores S = Q K^T become the logits its softmax exponentiates. A policy is
// built per tile from the kernel params and the tile coordinate (so per-head or per-batch factors, such as
// FP8 descales or sink logits, have a place), owns the softmax scale, and may transform the scores in place
// before the mask (softcap will). The mainloop takes the policy as one type; nothing else changes with it.
#pragma once

#include <cfloat>
#include <cmath>

#include "tile_scheduler.h"

namespace flash3 {

// Plain scaled dot-product scores: logit = softmax_scale * s. The scale is not applied to S here: it is
// folded into the softmax's exp2 (one FFMA per score), so apply() leaves S as it is.
struct ScaledScores {
  struct Params {
    float softmax_scale;
    // softmax_scale * log2(e). A zero scale (or one that would be a denormal, which the kernel flushes to
    // zero) becomes FLT_MIN: the weights are then exactly 1 (uniform attention) and masked -inf scores stay
    // -inf instead of -inf * 0 = NaN.
    float scale_log2;
  };

  static Params to_params(float softmax_scale) {
    float const scale_log2 = softmax_scale * float(M_LOG2E);
    return {softmax_scale, std::fabs(scale_log2) < FLT_MIN ? FLT_MIN : scale_log2};
  }

  __device__ static ScaledScores for_tile(Params const& p, TileCoord const& /*tile*/) {
    return {p.softmax_scale, p.scale_log2};
  }

  float softmax_scale;  // of the LSE, in natural-log units
  float scale_log2;     // of the exponent

  template <class TensorS>
  __device__ void apply(TensorS& /*tSrS_rc*/) const {}
};

}  // namespace flash3
