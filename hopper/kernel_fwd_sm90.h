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
#include "trace.h"

namespace flash3 {

using namespace cute;

// kCtasPerSm: CTAs resident per SM (tile_config.h's ctas_per_sm): the persistent grid, __launch_bounds__ and
// the register budget follow it.
template <class Mainloop_, class Epilogue_, int kCtasPerSm_ = 1>
struct FwdKernelSm90 {
  using Mainloop = Mainloop_;
  using Epilogue = Epilogue_;
  using Pipeline = typename Mainloop::Pipeline;
  static constexpr int kBlockM = Mainloop::kBlockM;
  static constexpr int kNumConsumerWarpGroups = Mainloop::kNumConsumerWarpGroups;
  static constexpr int kNumThreads = kWarpGroupThreads * (1 + kNumConsumerWarpGroups);
  static constexpr int kCtasPerSm = kCtasPerSm_;
  static constexpr int kMinBlocksPerSm = kCtasPerSm;  // ptxas then keeps the entry's registers to their share
  using Registers = RegisterBudget<kNumConsumerWarpGroups, Mainloop::kProducerRegisters, kCtasPerSm>;

  enum class Role : int { Producer = 0 };  // warpgroup 0; warpgroups 1.. are consumers

  using Mask = typename Mainloop::Mask;
  // What both roles derive identically for a tile, so they agree on which tiles carry work.
  struct TileWork {
    TileCoord tile;
    SeqlenInfo seqlen;
    Mask mask;
    BlockRange range;
    // Varlen grids are sized by the longest sequence: tiles past this sequence's end have no rows at all.
    __device__ bool has_rows() const { return tile.m_block * kBlockM < seqlen.seqlen_q * mask.pack; }
  };
  struct SharedStorage {
    typename Mainloop::SharedStorage mainloop;
    alignas(16) uint64_t barrier_q;
    alignas(8) uint64_t mailbox_full;
    alignas(8) uint64_t mailbox_empty;
    int tile_index;  // mailbox slot: the tile the consumers take next; -1 = no more tiles
    // The producer's next tile, handed over by the claimer warp (see claim_tiles): slot and its mbarriers.
    int next_index;  // -1 = no more tiles
    // The KV warp's hand-over count, one copy per lane (each lane reads and writes only its own), kept here
    // rather than in the warp's 40 registers.
    uint32_t kv_round[32];
    TileWork next_work;
    alignas(8) uint64_t next_full;
    alignas(8) uint64_t next_empty;
    typename Pipeline::Storage pipeline_k;
    typename Pipeline::Storage pipeline_v;
  };
  static constexpr int kSharedStorageSize = sizeof(SharedStorage);
  static_assert(kSharedStorageSize <= kMaxSharedBytes, "the tile's shared storage exceeds what a CTA may use");
  // An SM has 228 KB of shared memory, of which each resident CTA takes 1 KB for the system.
  static_assert(kCtasPerSm == 1 || kCtasPerSm * (kSharedStorageSize + 1024) <= 228 * 1024,
                "kCtasPerSm CTAs' shared storage does not fit one SM");

  using Scheduler = PersistentScheduler</*kHeaviestFirst=*/Mainloop::kUnequalTiles>;
  // The producer warp decides each CTA's next tile and posts it in a one-slot shared-memory mailbox guarded
  // by two mbarriers (arrive = release, wait = acquire): "full" after the producer wrote the slot, "empty"
  // after every consumer thread read it. Mailbox round r completes phase r of each.

  struct Params {
    typename Mainloop::Params mainloop;
    typename Epilogue::Params epilogue;
    SeqlenArgs seqlen;
    Scheduler scheduler;
    int pack;  // PackGQA: q heads packed into a tile's rows (1 = none)
    flash3_mask window;  // the local mask's window and chunk (kLocal)
    flash3_context_parallel cp;  // the causal mask's key positions (params.h), world_size 1 without
  };

  // Persistent grid: `ctas` resident CTAs (one per SM, where a CTA's shared memory allows no more; the launch
  // multiplies by what the driver reports for kCtasPerSm > 1), never more CTAs than tiles.
  static dim3 grid(Scheduler const& scheduler, int ctas) {
    return dim3(unsigned(scheduler.num_tiles() < ctas ? scheduler.num_tiles() : ctas));
  }

  // Split-KV: the tile's key blocks are cut into num_splits near-equal shares, by the device-side length, so
  // that sequences of any length (seqused_k changing between CUDA-graph replays) split evenly; a share may be
  // empty (a short sequence), and its tile then writes O = 0, LSE = -inf, which the combine ignores.
  __device__ static TileWork work_of(Params const& params, int idx) {
    TileCoord const tile = params.scheduler.tile(idx);
    SeqlenInfo const seqlen(params.seqlen, tile.batch);
    // Context parallelism: the causal diagonal is on the global key count; only the causal mask reads it.
    int const cp_seqlen_k = params.cp.world_size > 1 ? params.cp.total_seqlen_k[tile.batch] : seqlen.seqlen_k;
    Mask const mask{seqlen.seqlen_q, seqlen.seqlen_k, tile.m_block, params.pack, params.window.window_left,
                    params.window.window_right, params.window.chunk, params.cp.world_size, params.cp.rank,
                    cp_seqlen_k};
    BlockRange range = mask.range();
    if (params.scheduler.num_splits > 1) { range = range.split(tile.split, params.scheduler.num_splits); }
    return {tile, seqlen, mask, range};
  }

  // Warp 1 of the producer warpgroup (the claimer) works out the producer's tiles ahead of it: it claims the
  // next tile (an atomic on the global tile counter when scheduling dynamically) and derives its TileWork
  // (coordinates, sequence, key-block range: integer divisions and metadata loads), while the producer warp
  // still issues the current tile's loads. Both would otherwise stall the producer warp, and its 24
  // registers do not hold the derivation next to the load loop's state (causal kernels spilled 4-16 bytes,
  // 2026-12-01); the claim's round trip cost -5 to -8% on causal attention when the producer made it itself.
  // The hand-over is a one-slot mailbox in shared memory: next_full (the claimer wrote the slot; one
  // arrival) and next_empty (the producer has issued that tile's loads; one arrival per lane, each after the
  // lane's own reads); hand-over r completes phase r
  // of both. The producer reads the slot's fields where it uses them, rather than keeping copies.
  __device__ static void claim_tiles(Params const& params, SharedStorage& smem) {
    int const num_tiles = int(params.scheduler.num_tiles());
    int current = blockIdx.x;
    for (uint32_t round = 0;; ++round) {
      TileWork const w = work_of(params, current < num_tiles ? current : 0);
      if (round > 0) { mailbox_wait(&smem.next_empty, (round - 1) & 1); }
      if (cute::elect_one_sync()) {
        smem.next_index = current < num_tiles ? current : -1;
        smem.next_work = w;
        mailbox_arrive(&smem.next_full);
      }
      __syncwarp();
      if (current >= num_tiles) { break; }
      current = params.scheduler.claim_next_tile(current);
      // This CTA's last tile is under way: the grid launched after this one in the stream (the split-KV
      // combine, the next call's attention) may start launching; its griddepcontrol.wait still waits for
      // this grid's completion. Once per CTA is enough (later ones have no effect). Every CTA of this
      // grid is resident already (a persistent grid of at most one wave), so the dependent's CTAs never
      // hold an SM this grid still needs.
      if (current >= num_tiles) { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
    }
  }

  // Warp 2 of the producer warpgroup, with PackGQA only: gathers each tile's packed Q (Mainloop::
  // load_q_packed), following the tiles through the consumers' mailbox. A warp of its own because the
  // producer warp's 24 registers hold its TMA loop's state already (the gather there spilled 28-40 bytes),
  // and so that the gather overlaps the producer's first K/V loads.
  __device__ static void gather_q(Params const& params, SharedStorage& smem, Mainloop const& mainloop) {
    bool q_loaded = false;
    for (uint32_t round = 0;; ++round) {
      mailbox_wait(&smem.mailbox_full, round & 1);
      int const idx = smem.tile_index;
      mailbox_arrive(&smem.mailbox_empty);  // each lane, after its read
      if (idx < 0) { break; }
      FLASH3_TRACE_ROUND_QWARP(int(round));
      TileWork const w = work_of(params, idx);
      if (w.has_rows() && !w.range.empty()) {
        mainloop.load_q_packed(params.mainloop, smem.mainloop, smem.barrier_q, w.tile, w.seqlen, q_loaded);
        FLASH3_MARK_QWARP(kProducerQ);
        q_loaded = true;
      }
    }
  }

  // Warp 3 of the producer warpgroup, with paged K/V only: gathers each tile's K/V blocks through the page
  // table (Mainloop::load_paged), following the producer's tiles through the claimer's mailbox (it is one of
  // the readers next_empty waits for), while the producer warp loads Q.
  __device__ static void gather_kv(Params const& params, SharedStorage& smem, Mainloop const& mainloop,
                                   Pipeline const& pipe_k, Pipeline const& pipe_v) {
    typename Pipeline::State state;
    uint32_t volatile* const my_round = &smem.kv_round[threadIdx.x % 32];
    *my_round = 0;
    for (;;) {
      // Re-read each hand-over: the FP8 gather variant spilled the counter when it stayed in a register. A
      // count per lane: one shared by the warp (lane 0 advancing it between __syncwarp()s) drew 16 racecheck
      // reports in the FP8 gather kernels (2026-12-01).
      uint32_t const round = *my_round;
      mailbox_wait(&smem.next_full, round & 1);
      *my_round = round + 1;
      if (smem.next_index < 0) { break; }
      TileWork const& w = smem.next_work;
      if (w.has_rows() && !w.range.empty()) {
        mainloop.load_paged(params.mainloop, smem.mainloop, pipe_k, pipe_v, state, w.tile, w.seqlen, w.range);
      }
      mailbox_arrive(&smem.next_empty);  // each lane, after its last read of the slot
    }
  }

  __device__ void operator()(Params const& params, char* smem_raw) const {
    FLASH3_MARK_ENTRY();
    SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
    int const warp_idx = cutlass::canonical_warp_idx_sync();
    int const warp_group = warp_idx / 4;

    if (warp_idx == 0 && cute::elect_one_sync()) {
      Mainloop::prefetch_descriptors(params.mainloop);
      // Q by TMA: one arrival with the transaction bytes; gathered (PackGQA): one per Q-warp lane, made by
      // the lane's copies completing (cp.async.mbarrier.arrive.noinc).
      cutlass::arch::ClusterTransactionBarrier::init(&smem.barrier_q, params.pack > 1 ? 32 : 1);
      // Gathered (paged) K/V: 32 arrivals, one per lane of the KV warp (FP8's V still by TMA).
      bool const gathers = params.mainloop.gathers();
      Pipeline::init(smem.pipeline_k, kNumConsumerWarpGroups, gathers ? 32 : 1);
      Pipeline::init(smem.pipeline_v, kNumConsumerWarpGroups, gathers && !Mainloop::kFp8 ? 32 : 1);
      cutlass::arch::ClusterBarrier::init(&smem.mailbox_full, 1);
      // Readers of the mailbox: every consumer thread, plus the Q warp's lanes when it runs.
      cutlass::arch::ClusterBarrier::init(&smem.mailbox_empty, Mainloop::kNumMmaThreads + (params.pack > 1 ? 32 : 0));
      cutlass::arch::ClusterBarrier::init(&smem.next_full, 1);
      // Every producer lane after its own reads, and with paged K/V every KV-warp lane too.
      cutlass::arch::ClusterBarrier::init(&smem.next_empty, params.mainloop.kv_warp() ? 64 : 32);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
    // Launched as a programmatic dependent of the kernel before it (launch_fwd_sm90.h): the set-up above
    // overlapped that kernel's tail; every global read and write comes after this wait, which returns once
    // that kernel has completed and its writes are visible (at once without a prerequisite grid).
    // FP8: the kernel before this one is always the V transpose (fp8_vt.h), itself launched without
    // programmatic serialisation, so all earlier work in the stream had completed before this grid could
    // launch; of this kernel's memory only the transposed V is the copy's, and the producer waits for the
    // copy just before its first V load (Mainloop::load). Q, K, the metadata and the first tile's Q K^T
    // go ahead of the copy's tail.
    if constexpr (!Mainloop::kFp8) { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

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
      if (warp_idx == 2) {
        if (params.pack > 1) { gather_q(params, smem, mainloop); }
        return;
      }
      if (warp_idx == 3) {
        if (params.mainloop.kv_warp()) { gather_kv(params, smem, mainloop, pipe_k, pipe_v); }
        return;
      }
      if (warp_idx != 0) { return; }  // one warp issues all loads
      bool q_loaded = false;
      for (uint32_t round = 0;; ++round) {
        mailbox_wait(&smem.next_full, round & 1);
        int const idx = smem.next_index;
        if (round > 0) { mailbox_wait(&smem.mailbox_empty, (round - 1) & 1); }
        if (cute::elect_one_sync()) {
          // -1 (from the claimer) ends the readers' loops: they then need no tile count live across
          // their loops (the consumers of the FP8 192-key gather variant spilled it, 2026-12-01).
          smem.tile_index = idx;
          mailbox_arrive(&smem.mailbox_full);
        }
        __syncwarp();
        if (idx < 0) { break; }
        FLASH3_TRACE_ROUND(int(round));
        FLASH3_MARK_PRODUCER(kProducerTile);
        TileWork const& w = smem.next_work;
        if (w.has_rows() && !w.range.empty()) {
          mainloop.load(params.mainloop, smem.mainloop, smem.barrier_q, pipe_k, pipe_v, state, w.tile, w.seqlen,
                        w.range, /*wait_q_free=*/q_loaded);
          q_loaded = true;
        }
        FLASH3_MARK_PRODUCER(kProducerDone);
        mailbox_arrive(&smem.next_empty);  // each lane, after its last read of the slot
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<Registers::kConsumer>();
      Mainloop::init_turns((int(threadIdx.x) - kWarpGroupThreads) / kWarpGroupThreads);
      uint32_t q_phase = 0;
      for (uint32_t round = 0;; ++round) {
        // The thread index read per tile and again for the epilogue (consumer_thread_index), so that neither
        // it nor the coordinates derived from it stay live across the tile loop or the mainloop: the gather
        // variants' consumers (232 registers) spilled them (16-bit d 96 local), the d 256 causal kernel too
        // (2026-12-01).
        int const thread_idx = consumer_thread_index();
        mailbox_wait(&smem.mailbox_full, round & 1);
        int const idx = smem.tile_index;
        mailbox_arrive(&smem.mailbox_empty);
        if (idx < 0) { break; }
        FLASH3_TRACE_ROUND(int(round));
        FLASH3_MARK_WG(kTileStart);
        TileWork const w = work_of(params, idx);
        if (!w.has_rows()) { continue; }
        if (w.range.empty()) {
          Epilogue::store_zero(params.epilogue, thread_idx, w.tile, w.seqlen);
          continue;
        }
        typename Mainloop::TiledMmaPV mma_pv;
        Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Mainloop::TileShapePV{}));
        float lse[Mainloop::kRowsPerThread];
        // A warpgroup whose rows all lie past the tile's real rows walks the blocks' barriers without
        // computing (Mainloop::idle_walk). Both of what made the test free for the loop were needed (compile
        // checks, 16-bit d 96 loop, session 14): the warpgroup index broadcast by a shuffle, so that the
        // compiler knows the branch warp-uniform, and each branch working on a copy of the pipeline state,
        // which moves on by the tile's block count after them. Without either, the stage index left the
        // uniform registers and every WGMMA descriptor of the loop was rebuilt by R2UR moves (28-40 a step).
        int const warp_group = __shfl_sync(0xffffffff, thread_idx / kWarpGroupThreads, 0);
        if (Mainloop::warpgroup_idle(w.mask, warp_group)) {
          auto walk_state = state;
          mainloop.idle_walk(params.mainloop, smem.mainloop, pipe_k, pipe_v, walk_state, w.mask, w.range,
                             thread_idx);
          clear(tOrO);
          CUTLASS_PRAGMA_UNROLL
          for (int m = 0; m < Mainloop::kRowsPerThread; ++m) { lse[m] = -INFINITY; }
        } else {
          auto mma_state = state;
          mainloop.mma(params.mainloop, smem.mainloop, smem.barrier_q, q_phase, pipe_k, pipe_v, mma_state, tOrO,
                       lse, w.mask, w.range, w.tile, thread_idx);
        }
        state.advance_by(Mainloop::blocks_of(w.range));
        q_phase ^= 1;
        FLASH3_MARK_WG(kMmaDone);
        // Re-derived rather than kept live across the mainloop, whose registers are all taken by S, P and O.
        TileWork const we = work_of(params, idx);
        Epilogue::store(params.epilogue, tOrO, lse, consumer_thread_index(), we.tile, we.seqlen);
        FLASH3_MARK_WG(kStored);
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
