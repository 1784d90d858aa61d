// Tile shapes of the SM90 forward kernel: the only place where tile numbers live, each with its reason.
// kBlockM is the query rows of one CTA (64 per consumer warpgroup), kBlockN the keys of one pipeline stage.
// Shared memory per CTA = Q (kBlockM x d) + kStages x (K + V) (kBlockN x d each), 16-bit elements; the
// hardware cap is 227 KB.
#pragma once

namespace flash3 {

template <int kHeadDim, bool kCausal>
struct TileConfigSm90;

// hdim 64: 128x128, 2 stages = 16 + 64 KB. Small d makes the QK^T GEMM short, so the softmax dominates;
// two consumer warpgroups keep the tensor cores busy while the other one exponentiates.
template <bool kCausal>
struct TileConfigSm90<64, kCausal> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
};

// hdim 96: 128x128, 2 stages = 24 + 96 KB.
template <bool kCausal>
struct TileConfigSm90<96, kCausal> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
};

// hdim 128: 128x128, 2 stages = 32 + 128 KB = 160 KB. kBlockN = 176 (FA3's non-causal choice) would
// need 208 KB and a non-power-of-two softmax width; kept for the tuning issue.
template <bool kCausal>
struct TileConfigSm90<128, kCausal> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
};

}  // namespace flash3
