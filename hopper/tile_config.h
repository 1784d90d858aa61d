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

// hdim 128, non-causal: 128x176, 2 stages = 32 + 176 KB = 208 KB. Wider key blocks cut the per-block
// fixed costs (barrier waits, row max/sum shuffles, O rescale) relative to GEMM work; 176 is the widest
// that fits: 128x192 would need 224 KB plus barriers, over the 227 KB cap. S (88 regs), P (44) and O (64)
// are live together while the overlapped GEMMs run; that fits the 240-register consumer budget only because
// the kernel re-derives the tile's coordinates after the mainloop instead of keeping them live (48 bytes of
// spills otherwise). Needs CuTe's extended WGMMA shapes (N = 176 is not a multiple of 32).
template <>
struct TileConfigSm90<128, false> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 176;
  static constexpr int kStages = 2;
};

// hdim 128, causal: 128x128. Causal tiles have few key blocks near the diagonal, where a wide block wastes
// masked work; 128 keeps the diagonal block square with the query tile.
template <>
struct TileConfigSm90<128, true> {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
};

}  // namespace flash3
