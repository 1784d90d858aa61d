// Named hardware barriers (bar.sync ids) used by the forward kernel, and the register budget of each role.
// CUTLASS reserves the low ids (syncthreads and its own collectives); ours start at its FirstUserBarrier,
// which cutlass::arch::NamedBarrier adds for us.
#pragma once

#include <cutlass/arch/barrier.h>

namespace flash3 {

enum class FwdBarrier : int {
  // All consumer threads: the zeroed tail of the boundary V tile is visible before any warpgroup's PV GEMM.
  VTailZeroed = 0,
  // Turn-taking between consumer warpgroups: warpgroup i may issue its GEMMs (one id per warpgroup, up to 3).
  WarpGroupTurn1 = 1,
  WarpGroupTurn2 = 2,
  WarpGroupTurn3 = 3,
  // Consumers (arrive) -> producer warp (sync): every Q K^T of the tile is done, smem Q may be overwritten.
  QueryEmpty = 4,
};

template <int kNumThreads>
__device__ __forceinline__ void named_barrier_sync(FwdBarrier id) {
  cutlass::arch::NamedBarrier::sync(kNumThreads, static_cast<int>(id));
}
template <int kNumThreads>
__device__ __forceinline__ void named_barrier_arrive(FwdBarrier id) {
  cutlass::arch::NamedBarrier::arrive(kNumThreads, static_cast<int>(id));
}

// mbarrier wait / arrive for hand-overs of plain shared-memory data (the tile mailboxes). CUTLASS's
// ClusterBarrier asm carries no "memory" clobber, so the compiler may move ordinary loads above a wait or
// stores below an arrive; racecheck caught exactly that on the TileWork slot (2026-12-01). These add the
// compiler fences: nothing moves across the acquire (wait) or the release (arrive).
__device__ __forceinline__ void mailbox_wait(uint64_t* barrier, uint32_t phase) {
  cutlass::arch::ClusterBarrier::wait(barrier, phase);
  asm volatile("" ::: "memory");
}
__device__ __forceinline__ void mailbox_arrive(uint64_t* barrier) {
  asm volatile("" ::: "memory");
  cutlass::arch::ClusterBarrier::arrive(barrier);
}

// Threads of one warpgroup: the unit that issues a WGMMA and that setmaxnreg resizes.
constexpr int kWarpGroupThreads = 128;

// The thread's index among the consumer warpgroups (those after the producer warpgroup), by a volatile read
// the compiler cannot hoist: so that neither the index nor the coordinates derived from it stay live across
// a loop that needs every register (its spilled copies cost local memory traffic per tile).
__device__ inline int consumer_thread_index() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid - kWarpGroupThreads;
}

// setmaxnreg budgets for one producer warpgroup and kConsumers consumer warpgroups. setmaxnreg only moves
// registers inside the CTA's launch-time allocation, so the budgets must add up to at most that: with one
// CTA per SM, 65536 registers over the CTA's threads, rounded down to a multiple of 8 per thread (what
// __launch_bounds__(threads, 1) lets ptxas use at entry). Summing over more than that makes the consumers'
// setmaxnreg.inc wait forever for registers nobody releases (seen as a hang on the H200, 2026-12-01). The
// consumers, which hold S, P and O in registers, get an even share of what the producer needs at least (24,
// the smallest setmaxnreg value), rounded down to setmaxnreg's multiple of 8 and capped at 240 (a thread
// addresses at most 255); the producer, which issues TMA from one thread, gets what they leave.
// 2 consumers: 168 x 3 = 504 = 24 + 2 x 240; 3 consumers (192-row tiles): 128 x 4 = 512 = 32 + 3 x 160.
// kCtasPerSm CTAs resident on one SM share its 65536 registers: 1 consumer, 2 CTAs (the short tile): 128 x 2 =
// 256 = 24 + 232.
template <int kConsumers, int kProducerMin_ = 24, int kCtasPerSm = 1>
struct RegisterBudget {
  static_assert(kConsumers >= 1 && kConsumers <= 3, "one producer plus 1-3 consumer warpgroups");
  static constexpr int kEntry = 65536 / kCtasPerSm / (kWarpGroupThreads * (1 + kConsumers)) / 8 * 8;
  static constexpr int kPerSlot = (kEntry < 248 ? kEntry : 248) * (1 + kConsumers);  // per thread of a warpgroup
  static constexpr int kProducerMin = kProducerMin_;  // 40: the paged gather (FA3's budget for its cp.async KV)
  static constexpr int kShare = (kPerSlot - kProducerMin) / kConsumers / 8 * 8;
  static constexpr int kConsumer = kShare < 240 ? kShare : 240;
  static constexpr int kLeft = (kPerSlot - kConsumers * kConsumer) / 8 * 8;
  static constexpr int kProducer = kLeft < 240 ? kLeft : 240;
  static_assert(kProducer >= kProducerMin && kProducer + kConsumers * kConsumer <= kPerSlot);
};
static_assert(RegisterBudget<2>::kProducer == 24 && RegisterBudget<2>::kConsumer == 240);
static_assert(RegisterBudget<3>::kProducer == 32 && RegisterBudget<3>::kConsumer == 160);
static_assert(RegisterBudget<2, 40>::kProducer == 40 && RegisterBudget<2, 40>::kConsumer == 232);
static_assert(RegisterBudget<1, 24, 2>::kProducer == 24 && RegisterBudget<1, 24, 2>::kConsumer == 232);

}  // namespace flash3
