// Small CuTe helpers shared by the mainloop and epilogue: the warpgroup GEMM issue sequence, register-layout
// views of WGMMA accumulators, and fragment type conversion.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flash3 {

using namespace cute;

// Issues C (+)= A * B over every K step of the fragments as one committed WGMMA batch.
// kZeroInit: the first K step overwrites C instead of accumulating.
// kWait: number of WGMMA batches allowed to stay in flight afterwards (-1: do not wait at all, the caller
// waits later so it can overlap other work with the tensor cores).
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA const& tA, TB const& tB, TC& tC) {
  // A is either smem descriptors (SS) or a register fragment (RS); only registers need fencing.
  constexpr bool kARegs = !std::is_same_v<typename TA::iterator, GMMA::DescriptorIterator>;
  if constexpr (kARegs) { warpgroup_fence_operand(const_cast<TA&>(tA)); }
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(mma, tA(_, _, k), tB(_, _, k), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) { warpgroup_wait<kWait>(); }
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) { warpgroup_fence_operand(const_cast<TA&>(tA)); }
}

// A WGMMA accumulator fragment has layout ((2 cols, 2 rows, V col groups), MMA_M, MMA_N). Softmax and
// masks want it as a matrix of this thread's (rows, cols) = ((2, MMA_M), (2, V, MMA_N)).
template <class Layout>
__host__ __device__ constexpr auto acc_rowcol(Layout const& l) {
  static_assert(decltype(rank(l))::value == 3);
  static_assert(decltype(size<0, 0>(l))::value == 2 && decltype(size<0, 1>(l))::value == 2);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The S = QK^T accumulator reinterpreted as the register A operand of the P V WGMMA (16-bit P):
// two neighbouring 8-column groups of S form one 16-wide K slice of A, so
// ((2, 2, V), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, (V / 2) * MMA_N).
template <class Layout>
__host__ __device__ constexpr auto acc_as_operand_a(Layout const& l) {
  auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, V / 2))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<2, 1>(v), get<2>(l))));
}

// Converts a register fragment elementwise into an existing fragment of the same size (no second copy
// stays live, which matters for register pressure inside the mainloop).
template <class EngineSrc, class LayoutSrc, class EngineDst, class LayoutDst>
__device__ __forceinline__ void convert_fragment_into(Tensor<EngineSrc, LayoutSrc> const& src,
                                                      Tensor<EngineDst, LayoutDst>& dst) {
  using From = typename EngineSrc::value_type;
  using To = typename EngineDst::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N == decltype(size(dst))::value);
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, N> const*>(src.data()));
}

// Converts a register fragment elementwise to `To`, keeping its layout.
template <class To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(src))::value;
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, N> const*>(src.data()));
  return dst;
}

}  // namespace flash3
