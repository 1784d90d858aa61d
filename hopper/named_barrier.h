// Named hardware barriers (bar.sync ids) used by the forward kernel, and the register budget of each role.
// CUTLASS reserves the low ids (syncthreads and its own collectives); ours start at its FirstUserBarrier,
// which cutlass::arch::NamedBarrier adds for us.
#pragma once

#include <cutlass/arch/barrier.h>

namespace flash3 {

enum class FwdBarrier : int {
  // All consumer threads: the zeroed tail of the boundary V tile is visible before any warpgroup's PV GEMM.
  VTailZeroed = 0,
  // Ping-pong between consumer warpgroups: warpgroup i may issue its GEMMs (one id per warpgroup).
  WarpGroupTurn1 = 1,
  WarpGroupTurn2 = 2,
  // Consumers (arrive) -> producer warp (sync): every Q K^T of the tile is done, smem Q may be overwritten.
  QueryEmpty = 3,
};

template <int kNumThreads>
__device__ __forceinline__ void named_barrier_sync(FwdBarrier id) {
  cutlass::arch::NamedBarrier::sync(kNumThreads, static_cast<int>(id));
}
template <int kNumThreads>
__device__ __forceinline__ void named_barrier_arrive(FwdBarrier id) {
  cutlass::arch::NamedBarrier::arrive(kNumThreads, static_cast<int>(id));
}

// setmaxnreg budgets: 65536 registers per SM, one CTA per SM. With 1 producer + 2 consumer warpgroups
// (384 threads): 128 * 24 + 256 * 240 = 64512 <= 65536. The producer only issues TMA from one thread, so
// 24 registers suffice; the consumers hold S (64 x kBlockN fp32 / 128 threads), O and P in registers.
template <int kNumConsumerWarpGroups>
struct RegisterBudget;
template <>
struct RegisterBudget<2> {
  static constexpr int kProducer = 24;
  static constexpr int kConsumer = 240;
};

}  // namespace flash3
