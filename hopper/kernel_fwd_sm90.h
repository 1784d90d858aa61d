// The SM90 forward kernel: orchestration only. One CTA computes one (query tile, head, sequence) work tile
// with one producer warpgroup (one thread issues all TMA loads) and kBlockM / 64 consumer warpgroups
// (WGMMA + softmax). It sets up shared storage, barriers and pipelines, splits the roles, redistributes
// registers with setmaxnreg, and hands each role to the mainloop / epilogue. No attention math here.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "mask.h"
#include "named_barrier.h"
#include "seqlen.h"

namespace flash3 {

using namespace cute;

template <class Mainloop_, class Epilogue_>
struct FwdKernelSm90 {
  using Mainloop = Mainloop_;
  using Epilogue = Epilogue_;
  using Pipeline = typename Mainloop::Pipeline;
  static constexpr int kBlockM = Mainloop::kBlockM;
  static constexpr int kNumConsumerWarpGroups = Mainloop::kNumConsumerWarpGroups;
  static constexpr int kNumThreads = 128 * (1 + kNumConsumerWarpGroups);
  static constexpr int kMinBlocksPerSm = 1;  // one CTA fills an SM's shared memory and registers
  using Registers = RegisterBudget<kNumConsumerWarpGroups>;

  enum class Role : int { Producer = 0 };  // warpgroup 0; warpgroups 1.. are consumers

  struct SharedStorage {
    typename Mainloop::SharedStorage mainloop;
    alignas(16) uint64_t barrier_q;
    typename Pipeline::Storage pipeline_k;
    typename Pipeline::Storage pipeline_v;
  };
  static constexpr int kSharedStorageSize = sizeof(SharedStorage);

  struct Params {
    typename Mainloop::Params mainloop;
    typename Epilogue::Params epilogue;
    SeqlenArgs seqlen;
  };

  // Grid: (m blocks, heads, batch). Causal tiles lower in the sequence have less work, so the heaviest
  // (last) m blocks are launched first.
  static dim3 grid(int num_m_blocks, int num_heads, int batch) { return dim3(num_m_blocks, num_heads, batch); }
  __device__ static int m_block_of(int block_x) {
    return Mainloop::kCausal ? int(gridDim.x) - 1 - block_x : block_x;
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
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();

    typename Mainloop::TileCoord const tile{m_block_of(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
    SeqlenInfo const seqlen(params.seqlen, tile.batch);
    // Varlen grids are sized by the longest sequence; tiles past this sequence's end have nothing to do.
    if (tile.m_block * kBlockM >= seqlen.seqlen_q) { return; }
    bool const varlen_q = params.seqlen.cu_seqlens_q != nullptr;
    bool const varlen_k = params.seqlen.cu_seqlens_k != nullptr;
    MaskPolicy<kBlockM, Mainloop::kBlockN, Mainloop::kCausal> const mask{seqlen.seqlen_q, seqlen.seqlen_k,
                                                                         tile.m_block};
    int const n_end = mask.n_block_end();

    Mainloop mainloop;
    Pipeline const pipe_k{&smem.pipeline_k};
    Pipeline const pipe_v{&smem.pipeline_v};
    typename Pipeline::State state;

    if (warp_group == static_cast<int>(Role::Producer)) {
      cutlass::arch::warpgroup_reg_dealloc<Registers::kProducer>();
      if (warp_idx == 0 && n_end > 0 && cute::elect_one_sync()) {
        mainloop.load(params.mainloop, smem.mainloop, smem.barrier_q, pipe_k, pipe_v, state, tile, seqlen,
                      varlen_q, varlen_k, n_end);
      }
    } else {
      cutlass::arch::warpgroup_reg_alloc<Registers::kConsumer>();
      int const thread_idx = int(threadIdx.x) - 128;
      if (n_end <= 0) {
        Epilogue::store_zero(params.epilogue, thread_idx, tile.m_block, tile.head, tile.batch, varlen_q, seqlen);
        return;
      }
      typename Mainloop::TiledMmaPV mma_pv;
      Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Mainloop::TileShapePV{}));
      float lse[Mainloop::kRowsPerThread];
      mainloop.mma(params.mainloop, smem.mainloop, smem.barrier_q, pipe_k, pipe_v, state, tOrO, lse, mask, n_end,
                   thread_idx);
      Epilogue::store(params.epilogue, tOrO, lse, thread_idx, tile.m_block, tile.head, tile.batch, varlen_q, seqlen);
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
