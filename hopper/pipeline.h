// A multi-stage TMA -> WGMMA pipeline on mbarriers, for one CTA (no clusters).
// Each stage has a "full" barrier (one producer arrival plus the TMA transaction bytes) and an "empty"
// barrier. Only one thread per consumer warpgroup arrives on "empty": a warpgroup's WGMMAs finish as a
// unit, so one arrival after warpgroup_wait says the whole warpgroup is done reading the stage, and 128x
// fewer arrivals keep the barrier traffic off the critical path (FA3 measured the all-threads variant as
// a regression, research/fa3.md section 3.1).
#pragma once

#include <cutlass/arch/barrier.h>
#include <cute/tensor.hpp>

namespace flash3 {

template <int kStages>
struct TmaPipeline {
  struct Storage {
    uint64_t full[kStages];
    uint64_t empty[kStages];
  };

  // Position in the ring: stage index and the parity of the barrier phase we wait for.
  struct State {
    int index = 0;
    uint32_t phase = 0;
    __device__ void advance() {
      if (++index == kStages) {
        index = 0;
        phase ^= 1;
      }
    }
    // n blocks at once (n >= 0): where n calls of advance() would leave the state.
    __device__ void advance_by(int n) {
      int const t = index + n;
      index = t % kStages;
      phase ^= uint32_t(t / kStages) & 1;
    }
  };

  Storage* storage;

  // One thread initialises; the caller fences and syncs the CTA afterwards. producer_arrivals: 1 for TMA
  // (one arrival plus the transaction bytes); a warp gathering with cp.async arrives once per lane.
  __device__ static void init(Storage& s, int num_consumer_warpgroups, int producer_arrivals = 1) {
    for (int i = 0; i < kStages; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&s.full[i], producer_arrivals);
      cutlass::arch::ClusterBarrier::init(&s.empty[i], num_consumer_warpgroups);
    }
  }

  // Producer: wait until the stage is free, then announce the bytes the TMA will deliver.
  // A fresh barrier counts as having completed the phase before phase 0, so the first kStages waits pass.
  __device__ void producer_acquire(State const& st, uint32_t tx_bytes) const {
    cutlass::arch::ClusterBarrier::wait(&storage->empty[st.index], st.phase ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&storage->full[st.index], tx_bytes);
  }
  // Producer gathering with cp.async: only wait for the stage; each lane's copies then arrive on "full".
  __device__ void producer_wait_empty(State const& st) const {
    cutlass::arch::ClusterBarrier::wait(&storage->empty[st.index], st.phase ^ 1);
  }
  __device__ uint64_t* full_barrier(State const& st) const { return &storage->full[st.index]; }

  // Consumer: wait for the stage's data; release it once this warpgroup's GEMMs have finished reading.
  __device__ void consumer_wait(State const& st) const {
    cutlass::arch::ClusterTransactionBarrier::wait(&storage->full[st.index], st.phase);
  }
  __device__ void consumer_release(State const& st, int thread_in_warpgroup) const {
    if (thread_in_warpgroup == 0) { cutlass::arch::ClusterBarrier::arrive(&storage->empty[st.index]); }
  }
};

}  // namespace flash3
