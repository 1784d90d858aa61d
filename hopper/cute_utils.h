// Small CuTe helpers shared by the mainloop and epilogue: the asynchronous warpgroup GEMM, register-layout
// views of WGMMA accumulators, and fragment type conversion.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flash3 {

using namespace cute;

// One asynchronous WGMMA batch: C = A * B (kOverwrite) or C += A * B, over every K slice of the fragments,
// committed as one group and not waited for: the caller runs CUDA-core work meanwhile and waits with
// warpgroup_wait<N>() (N = groups it lets stay in flight). The PTX rules it follows: registers that an
// async MMA reads or writes are fenced before the batch is opened (wgmma.fence via warpgroup_arrive) and
// are pinned for the compiler on both sides of it (warpgroup_fence_operand), so that no ordinary
// instruction is scheduled across the asynchronous accesses. A is either shared-memory descriptors (SS)
// or a register fragment (RS); only the latter is registers to pin.
template <bool kOverwrite, class TiledMma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void gemm_async(TiledMma& mma, FragA const& a, FragB const& b, FragC& c) {
  constexpr bool kARegisters = !std::is_same_v<typename FragA::iterator, GMMA::DescriptorIterator>;
  auto pin_registers = [&] {
    if constexpr (kARegisters) { warpgroup_fence_operand(const_cast<FragA&>(a)); }
    warpgroup_fence_operand(c);
  };
  pin_registers();
  warpgroup_arrive();
  constexpr int kSlices = decltype(size<2>(a))::value;  // K slices: (MMA, MMA_M|N, K)
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    // Only the first slice may overwrite; the others accumulate onto it.
    mma.accumulate_ = (kOverwrite && k == 0) ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
  }
  warpgroup_commit_batch();
  pin_registers();
}

// A thread's WGMMA accumulator as a (rows, cols) matrix. Its fragment layout is
// ((2 adjacent cols, 2 rows 8 apart, col groups), MMA_M, MMA_N); flattened, modes 1 and 3 index rows and
// modes 0, 2 and 4 columns, which softmax and masks want as the two modes of a matrix.
template <class Layout>
__host__ __device__ constexpr auto acc_rowcol(Layout const& l) {
  auto flat = flatten(l);  // (col pair, row pair, col groups, MMA_M, MMA_N)
  static_assert(decltype(rank(flat))::value == 5, "expected a flat ((2, 2, V), MMA_M, MMA_N) accumulator");
  static_assert(decltype(size<0>(flat))::value == 2 && decltype(size<1>(flat))::value == 2);
  return make_layout(select<1, 3>(flat), select<0, 2, 4>(flat));
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

// The register A operand of an FP8 P V WGMMA for a key block of kBlockN: per 32-key K slice a thread holds
// 16 values, (4 consecutive K, 2 rows 8 apart, 2 halves of 16 K), compact; slices follow each other.
template <int kBlockN>
__host__ __device__ constexpr auto fp8_operand_a_layout() {
  return make_layout(Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>{});
}

// FP8 P from the fp32 S accumulator, without moving data between threads. Per 32 keys the accumulator gives
// a thread, per row i, the column pairs (2q, 2q+1) of the 8-column groups j = 0..3 (storage c + 2i + 4j);
// the 8-bit A operand wants per row and 16-key half h four consecutive K positions in one register. So the
// register of (row i, half h) takes the pairs of groups 2h and 2h + 1: K position 16h + 4q + e then holds
// key 16h + 8 (e / 2) + 2q + e % 2, the order in which fp8_vt.h stores V's keys (key_of_position).
template <class TensorS, class TensorP>
__device__ __forceinline__ void scores_to_fp8_operand(TensorS const& s, TensorP& p) {
  using Fp8 = typename TensorP::value_type;
  constexpr int kSlices = decltype(size(s))::value / 16;
  static_assert(decltype(size(p))::value == 16 * kSlices);
  cutlass::NumericArrayConverter<Fp8, float, 4> convert;
  float const* in = raw_pointer_cast(s.data());
  auto* out = reinterpret_cast<cutlass::Array<Fp8, 4>*>(raw_pointer_cast(p.data()));
  CUTLASS_PRAGMA_UNROLL
  for (int slice = 0; slice < kSlices; ++slice) {
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < 2; ++i) {
        int const j = 4 * slice + 2 * h;  // the first of the two 8-column groups
        cutlass::Array<float, 4> four;
        four[0] = in[2 * i + 4 * j];
        four[1] = in[1 + 2 * i + 4 * j];
        four[2] = in[2 * i + 4 * (j + 1)];
        four[3] = in[1 + 2 * i + 4 * (j + 1)];
        out[i + 2 * h + 4 * slice] = convert(four);
      }
    }
  }
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
  Tensor dst = make_tensor<To>(src.layout());
  convert_fragment_into(src, dst);
  return dst;
}

}  // namespace flash3
