// The SM90 forward kernel: orchestration only. A persistent CTA walks (query tile, head, sequence) work
// tiles with one producer warp (one elected lane issues all TMA loads), one tile-claimer warp and
// kBlockM / 64 consumer warpgroups (WGMMA + softmax). It sets up shared storage, barriers and pipelines,
// splits the roles, redistributes registers with setmaxnreg, and hands each role to the mainloop /
// epilogue. No attention math here.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "mask.h"
#include "named_barrier.h"
#include "seqlen.h"
#include "tile_config.h"
#include "tile_scheduler.h"

namespace flash3 {

using namespace cute;

template <class Mainloop_, class Epilogue_>
struct FwdKernelSm90 {
  using Mainloop = Mainloop_;
  using Epilogue = Epilogue_;
  using Pipeline = typename Mainloop::Pipeline;
  static constexpr int kBlockM = Mainloop::kBlockM;
  static constexpr int kNumConsumerWarpGroups = Mainloop::kNumConsumerWarpGroups;
  static constexpr int kNumThreads = kWarpGroupThreads * (1 + kNumConsumerWarpGroups);
  static constexpr int kMinBlocksPerSm = 1;  // one CTA fills an SM's shared memory and registers
  using Registers = RegisterBudget<kNumConsumerWarpGroups>;

  enum class Role : int { Producer = 0 };  // warpgroup 0; warpgroups 1.. are consumers

  struct SharedStorage {
    typename Mainloop::SharedStorage mainloop;
    alignas(16) uint64_t barrier_q;
    alignas(8) uint64_t mailbox_full;
    alignas(8) uint64_t mailbox_empty;
    int tile_index;  // mailbox slot: the tile the consumers take next
    // The producer's next tile, handed over by the claimer warp (see claim_tiles): slot and its mbarriers.
    int next_tile;
    alignas(8) uint64_t next_full;
    alignas(8) uint64_t next_empty;
    typename Pipeline::Storage pipeline_k;
    typename Pipeline::Storage pipeline_v;
  };
  static constexpr int kSharedStorageSize = sizeof(SharedStorage);
  static_assert(kSharedStorageSize <= kMaxSharedBytes, "the tile's shared storage exceeds what a CTA may use");

  using Scheduler = PersistentScheduler</*kHeaviestFirst=*/Mainloop::kUnequalTiles>;
  using Mask = typename Mainloop::Mask;
  // The producer warp decides each CTA's next tile and posts it in a one-slot shared-memory mailbox guarded
  // by two mbarriers (arrive = release, wait = acquire): "full" after the producer wrote the slot, "empty"
  // after every consumer thread read it. Mailbox round r completes phase r of each.

  struct Params {
    typename Mainloop::Params mainloop;
    typename Epilogue::Params epilogue;
    SeqlenArgs seqlen;
    Scheduler scheduler;
  };

  // Persistent grid: one CTA per SM (shared memory allows no more), never more CTAs than tiles.
  static dim3 grid(Scheduler const& scheduler, int num_sms) {
    return dim3(scheduler.num_tiles() < num_sms ? scheduler.num_tiles() : num_sms);
  }

  // What both roles derive identically for a tile, so they agree on which tiles carry work.
  struct TileWork {
    TileCoord tile;
    SeqlenInfo seqlen;
    Mask mask;
    BlockRange range;
    // Varlen grids are sized by the longest sequence: tiles past this sequence's end have no rows at all.
    __device__ bool has_rows() const { return tile.m_block * kBlockM < seqlen.seqlen_q; }
  };
  __device__ static TileWork work_of(Params const& params, int idx) {
    TileCoord const tile = params.scheduler.tile(idx);
    SeqlenInfo const seqlen(params.seqlen, tile.batch);
    Mask const mask{seqlen.seqlen_q, seqlen.seqlen_k, tile.m_block};
    return {tile, seqlen, mask, mask.range()};
  }

  // Warp 1 of the producer warpgroup claims the producer's tiles ahead of it: the claim is an atomic on the
  // global tile counter (dynamic scheduling), whose round trip would otherwise stall the producer warp before
  // it could issue the current tile's loads (the loads need registers the 24-register producer does not
  // have to spare, so the claim cannot simply stay in flight across them: seen as -5 to -8% on causal
  // attention, 2026-12-01). The hand-over is a one-slot mailbox between the two warps, like the consumers'
  // one: next_full (the claimer wrote the slot) and next_empty (the producer read it), one arrival each;
  // hand-over r completes phase r of both.
  __device__ static void claim_tiles(Params const& params, SharedStorage& smem) {
    int const num_tiles = params.scheduler.num_tiles();
    uint32_t round = 0;
    for (int current = blockIdx.x; current < num_tiles; ++round) {
      int const next = params.scheduler.claim_next_tile(current);
      if (round > 0) { cutlass::arch::ClusterBarrier::wait(&smem.next_empty, (round - 1) & 1); }
      if (cute::elect_one_sync()) {
        smem.next_tile = next;
        cutlass::arch::ClusterBarrier::arrive(&smem.next_full);
      }
      __syncwarp();
      current = next;
    }
  }

  __device__ void operator()(Params const& params, char* smem_raw) const {
    SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
    int const warp_idx = cutlass::canonical_warp_idx_sync();
    int const warp_group = warp_idx / 4;

    if (warp_idx == 0 && cute::elect_one_sync()) {
      Mainloop::prefetch_descriptors(params.mainloop);
      cutlass::arch::ClusterTransactionBarrier::init(&smem.barrier_q, 1);
      Pipeline::init(smem.pipeline_k, kNumConsumerWarpGroups);
      Pipeline::init(smem.pipeline_v, kNumConsumerWarpGroups);
      cutlass::arch::ClusterBarrier::init(&smem.mailbox_full, 1);
      cutlass::arch::ClusterBarrier::init(&smem.mailbox_empty, Mainloop::kNumMmaThreads);
      cutlass::arch::ClusterBarrier::init(&smem.next_full, 1);
      cutlass::arch::ClusterBarrier::init(&smem.next_empty, 1);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    int const num_tiles = params.scheduler.num_tiles();
    Mainloop mainloop;
    Pipeline const pipe_k{&smem.pipeline_k};
    Pipeline const pipe_v{&smem.pipeline_v};
    typename Pipeline::State state;

    if (warp_group == static_cast<int>(Role::Producer)) {
      cutlass::arch::warpgroup_reg_dealloc<Registers::kProducer>();
      if (warp_idx == 1) {
        claim_tiles(params, smem);
        return;
      }
      if (warp_idx != 0) { return; }  // one warp issues all loads
      bool q_loaded = false;
      int idx = blockIdx.x;
      for (uint32_t round = 0;; ++round) {
        if (round > 0) { cutlass::arch::ClusterBarrier::wait(&smem.mailbox_empty, (round - 1) & 1); }
        if (cute::elect_one_sync()) {
          smem.tile_index = idx;
          cutlass::arch::ClusterBarrier::arrive(&smem.mailbox_full);
        }
        __syncwarp();
        if (idx >= num_tiles) { break; }
        TileWork const w = work_of(params, idx);
        if (w.has_rows() && !w.range.empty()) {
          mainloop.load(params.mainloop, smem.mainloop, smem.barrier_q, pipe_k, pipe_v, state, w.tile, w.seqlen,
                        w.range, /*wait_q_free=*/q_loaded);
          q_loaded = true;
        }
        cutlass::arch::ClusterBarrier::wait(&smem.next_full, round & 1);
        idx = smem.next_tile;
        __syncwarp();
        if (cute::elect_one_sync()) { cutlass::arch::ClusterBarrier::arrive(&smem.next_empty); }
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<Registers::kConsumer>();
      int const thread_idx = int(threadIdx.x) - kWarpGroupThreads;
      Mainloop::init_turns(thread_idx / kWarpGroupThreads);
      uint32_t q_phase = 0;
      for (uint32_t round = 0;; ++round) {
        cutlass::arch::ClusterBarrier::wait(&smem.mailbox_full, round & 1);
        int const idx = smem.tile_index;
        cutlass::arch::ClusterBarrier::arrive(&smem.mailbox_empty);
        if (idx >= num_tiles) { break; }
        TileWork const w = work_of(params, idx);
        if (!w.has_rows()) { continue; }
        if (w.range.empty()) {
          Epilogue::store_zero(params.epilogue, thread_idx, w.tile.m_block, w.tile.head, w.seqlen);
          continue;
        }
        typename Mainloop::TiledMmaPV mma_pv;
        Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Mainloop::TileShapePV{}));
        float lse[Mainloop::kRowsPerThread];
        mainloop.mma(params.mainloop, smem.mainloop, smem.barrier_q, q_phase, pipe_k, pipe_v, state, tOrO, lse,
                     w.mask, w.range, w.tile, thread_idx);
        q_phase ^= 1;
        // Re-derived rather than kept live across the mainloop, whose registers are all taken by S, P and O.
        TileWork const we = work_of(params, idx);
        Epilogue::store(params.epilogue, tOrO, lse, thread_idx, we.tile.m_block, we.tile.head, we.seqlen);
      }
    }
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kNumThreads, Kernel::kMinBlocksPerSm)
    fwd_kernel_sm90_entry(CUTE_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ __align__(1024) char smem[];
  Kernel{}(params, smem);
}

}  // namespace flash3
