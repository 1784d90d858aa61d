// Launch layer of the SM90 forward kernel: turns the torch-free FwdParams into the mainloop / epilogue
// Arguments, builds the TMA descriptors, sizes the grid and shared memory, and launches on the caller's
// stream. Instantiated once per kernel key (element type, head dims) by hopper/instantiations/*.cu; both mask
// policies are compiled into each instantiation and chosen here at run time.
#pragma once

#include <cuda_runtime_api.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "combine.h"
#include "epilogue_fwd_sm90.h"
#include "fp8_vt.h"
#include "instantiations/kernel_key.h"
#include "kernel_fwd_sm90.h"
#include "mainloop_fwd_sm90.h"
#include "params.h"
#include "tile_config.h"
#include "workspace.h"

#ifdef FLASH3_TRACE
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "trace.h"
#endif

namespace flash3 {

#ifdef FLASH3_TRACE
// Diagnostic builds only (trace.h): when FLASH3_TRACE_FILE names a file, a cleared buffer for the kernel's
// tile timeline (null otherwise): the stamps, then each CTA's kTraceRoles tile counters (trace.h).
static inline unsigned long long* trace_begin(unsigned grid) {
  unsigned long long* buf = nullptr;
  if (std::getenv("FLASH3_TRACE_FILE") != nullptr) {
    size_t const bytes = size_t(grid) * (kTraceTiles * kTraceEvents * sizeof(unsigned long long) + kTraceRoles * sizeof(int));
    if (cudaMalloc(&buf, bytes) == cudaSuccess) { cudaMemset(buf, 0, bytes); } else { buf = nullptr; }
  }
  // The symbol starts null on every device and trace_end puts it back to null, so only a traced call copies
  // to it: the copy synchronises the host with the device, and untraced calls of a trace build then stay
  // asynchronous, their times (trace_tiles.py's `us`) the kernel's (session 18's decode rows read 156 us
  // where the product takes 21).
  if (buf != nullptr) { cudaMemcpyToSymbol(g_trace_buf, &buf, sizeof(buf)); }
  return buf;
}
// Appends one record: int32 {magic, grid, tiles, events, block_m, block_n}, then the uint64 stamps.
static inline cudaError_t trace_end(unsigned long long* buf, unsigned grid, int block_m, int block_n,
                                    cudaStream_t stream) {
  if (buf == nullptr) { return cudaSuccess; }
  cudaError_t err = cudaStreamSynchronize(stream);
  size_t const count = size_t(grid) * kTraceTiles * kTraceEvents;
  std::vector<unsigned long long> host(count);
  if (err == cudaSuccess) { err = cudaMemcpy(host.data(), buf, count * sizeof(host[0]), cudaMemcpyDeviceToHost); }
  unsigned long long* const none = nullptr;  // later (untraced) launches must not write to the freed buffer
  cudaMemcpyToSymbol(g_trace_buf, &none, sizeof(none));
  cudaFree(buf);
  if (err != cudaSuccess) { return err; }
  if (FILE* f = std::fopen(std::getenv("FLASH3_TRACE_FILE"), "ab")) {
    int32_t const head[6] = {0x46335452, int32_t(grid), kTraceTiles, kTraceEvents, block_m, block_n};
    std::fwrite(head, sizeof(head), 1, f);
    std::fwrite(host.data(), sizeof(host[0]), count, f);
    std::fclose(f);
  }
  return cudaSuccess;
}
#endif

template <class Element, int kHeadDim, int kHeadDimV, MaskKind kMask, bool kSplit, bool kNarrow = false,
          bool kGather = false, bool kShort = false>
cudaError_t launch_fwd_sm90(FwdParams const& p, cudaStream_t stream) {
  constexpr bool kFp8 = sizeof(Element) == 1;
  using ElementOut = std::conditional_t<kFp8, cutlass::bfloat16_t, Element>;  // FP8 in, BF16 out (FA3)
  // Short FP8 calls run on the 64-row tile, two CTAs per SM (tile_config.h short_tiles); the checks below
  // never apply to them (one 128-key block, no pages), so their recursions leave kShort at its default.
  if constexpr (kFp8 && !kShort && !kSplit && !kNarrow && !kGather && kMask != MaskKind::kLocal && kHeadDim <= 128 &&
                kHeadDimV <= 128) {
    int64_t const rows_q = int64_t(max_seqlen_q(p)) * (p.schedule.pack_gqa == 1 ? p.num_heads / p.num_heads_k : 1);
    if (short_tiles(1, kHeadDim, kHeadDimV, rows_q, max_seqlen_k(p), p.softcap > 0.f, false, is_paged(p))) {
      return launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, kSplit, kNarrow, kGather, true>(p, stream);
    }
  }
  // A window takes the causal tiles (its diagonal blocks are as in causal, and it skips blocks the same way);
  // the gather variant keeps 128-key blocks (as split-KV): its consumers have 232 registers, not 240.
  using Config = TileConfigSm90<kHeadDim, kHeadDimV, kMask != MaskKind::kNone, int(sizeof(Element)), kSplit, kNarrow,
                                kMask == MaskKind::kLocal, kGather, kShort>;
  // The shorter causal calls and all paged ones run on the 128-key sibling (tile_config.h causal_narrow); this
  // comes before the gather test, so that paged calls test their pages against the 128-key blocks, as before
  // the causal tile was widened.
  if constexpr (kMask == MaskKind::kCausal && !kNarrow && Config::kBlockN > 128) {
    if (causal_narrow(int(sizeof(Element)), kHeadDim, max_seqlen_q(p), max_seqlen_k(p), is_paged(p))) {
      return launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, kSplit, true, kGather>(p, stream);
    }
  }
  if constexpr (!kGather) {
    // Paged K/V that TMA cannot load block by block runs on the gather variant, which needs dv == d
    // (api.cu refuses such calls for dv != d kernels: paged_needs_gather).
    if (paged_needs_gather(p, Config::kBlockN)) {
      if constexpr (kHeadDimV == kHeadDim) {
        return launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, kSplit, kNarrow, true>(p, stream);
      } else {
        return cudaErrorNotSupported;
      }
    }
  }
  // A softcap and keys that fit one 128-key block run on the 128-key sibling (tile_config.h).
  if constexpr (!kNarrow && Config::kBlockN > 128) {
    if (p.softcap > 0.f || keys_fit_narrow(max_seqlen_k(p))) {
      return launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, kSplit, true, kGather>(p, stream);
    }
  }
  using Mainloop = MainloopFwdSm90<Element, kHeadDim, kHeadDimV, Config::kBlockM, Config::kBlockN, Config::kStages, kMask,
                                   ScaledScores<kFp8, (Config::kBlockN <= 128)>, kGather>;
  using Epilogue = EpilogueFwdSm90<ElementOut, Config::kBlockM, kHeadDimV, Mainloop::kRowsPerThread,
                                   typename Mainloop::TiledMmaPV, kSplit>;
  using Kernel = FwdKernelSm90<Mainloop, Epilogue, Config::kCtasPerSm>;

  bool const varlen_q = is_varlen_q(p);
  bool const varlen_k = is_varlen_k(p);
  // The schedule as api.cu's plan_fwd resolved it (num_splits >= 1, pack_gqa 0 or 1).
  int const num_splits = kSplit ? p.schedule.num_splits : 1;
  int const pack = p.schedule.pack_gqa == 1 ? p.num_heads / p.num_heads_k : 1;
  WorkspaceLayout const ws = workspace_layout(p);
  char* const workspace = static_cast<char*>(p.workspace);

  // TMA sees each operand as (rows, d, head, batch); a packed operand is one batch entry of all its rows.
  typename Mainloop::Arguments mainloop_args;
  mainloop_args.q = static_cast<Element const*>(p.q.ptr);
  mainloop_args.k = static_cast<Element const*>(p.k.ptr);
  mainloop_args.shape_q = make_shape(p.q.rows, p.head_dim, p.num_heads, varlen_q ? 1 : p.batch);
  mainloop_args.stride_q = make_stride(p.q.row_stride, _1{}, p.q.head_stride, varlen_q ? int64_t(0) : p.q.batch_stride);
  // Paged: K/V are (num_pages, page_size, head, dim) arrays, gathered by the producer (the TMA descriptors
  // built from this view stay unused, but describe real memory).
  bool const paged = is_paged(p);
  mainloop_args.shape_kv = paged ? make_shape(p.kv_cache.page_size, p.head_dim, p.num_heads_k, p.kv_cache.num_pages)
                                 : make_shape(p.k.rows, p.head_dim, p.num_heads_k,
                                              varlen_k ? 1 : p.kv_cache.batch_idx ? p.kv_cache.batch_rows : p.batch);
  mainloop_args.stride_k = make_stride(p.k.row_stride, _1{}, p.k.head_stride, varlen_k ? int64_t(0) : p.k.batch_stride);
  mainloop_args.softmax_scale = p.softmax_scale;
  mainloop_args.softcap = p.softcap;
  mainloop_args.sinks = kSplit ? nullptr : p.sinks;  // split-KV: the combine adds them once
  mainloop_args.descale = p.fp8;
  mainloop_args.pack = pack;
  mainloop_args.paged = p.kv_cache;
  mainloop_args.v_paged = static_cast<Element const*>(p.v.ptr);
  mainloop_args.stride_v_paged = make_stride(p.v.row_stride, _1{}, p.v.head_stride, p.v.batch_stride);

  SeqlenArgs seqlen_args;
  seqlen_args.cu_seqlens_q = p.varlen.cu_seqlens_q;
  seqlen_args.cu_seqlens_k = p.varlen.cu_seqlens_k;
  seqlen_args.seqused_q = p.varlen.seqused_q;
  seqlen_args.seqused_k = p.varlen.seqused_k;
  seqlen_args.rows_q = p.q.rows;
  seqlen_args.rows_k = p.k.rows;
  seqlen_args.kv_batch_idx = p.kv_cache.batch_idx;
  seqlen_args.kv_batch_rows = p.kv_cache.batch_rows;
  seqlen_args.leftpad_k = p.kv_cache.leftpad;

  if constexpr (kFp8) {
    // V transposed into the workspace first (fp8_vt.h); the kernel reads that copy, same stream.
    VtLayout const vt = vt_layout(p);
    cudaError_t const err = launch_transpose_v_fp8(p, seqlen_args, workspace + ws.vt_offset, stream);
    if (err != cudaSuccess) { return err; }
    mainloop_args.v_read = reinterpret_cast<Element const*>(workspace + ws.vt_offset);
    mainloop_args.shape_v = make_shape(p.head_dim_v, int32_t(vt.cols), p.num_heads_k, vt.batches);
    mainloop_args.stride_v = make_stride(vt.cols, _1{}, vt.head_stride(), vt.batches > 1 ? vt.batch_stride() : int64_t(0));
    mainloop_args.v_packed = varlen_k;
  } else {
    mainloop_args.v_read = static_cast<Element const*>(p.v.ptr);
    mainloop_args.shape_v = mainloop_args.shape_kv;
    get<1>(mainloop_args.shape_v) = p.head_dim_v;
    mainloop_args.stride_v = make_stride(p.v.row_stride, _1{}, p.v.head_stride, varlen_k ? int64_t(0) : p.v.batch_stride);
    mainloop_args.v_packed = false;
  }

  typename Epilogue::Arguments epilogue_args;
  epilogue_args.out = static_cast<ElementOut*>(p.out.ptr);
  epilogue_args.out_batch_stride = p.out.batch_stride;
  epilogue_args.out_row_stride = p.out.row_stride;
  epilogue_args.out_head_stride = p.out.head_stride;
  epilogue_args.lse = p.lse.ptr;
  epilogue_args.lse_batch_stride = p.lse.batch_stride;
  epilogue_args.lse_head_stride = p.lse.head_stride;
  epilogue_args.head_dim_v = p.head_dim_v;
  // api.cu's operand rules already ask this of out (check_tma_operand); kept as the epilogue's own guard. A
  // packed (varlen) out has no batch stride.
  epilogue_args.out_aligned16 = reinterpret_cast<uintptr_t>(p.out.ptr) % 16 == 0 && p.out.row_stride % 8 == 0 &&
                                p.out.head_stride % 8 == 0 && (varlen_q || p.out.batch_stride % 8 == 0);
  epilogue_args.pack = pack;
  epilogue_args.o_accum = reinterpret_cast<float*>(workspace + ws.o_accum_offset);
  epilogue_args.lse_accum = reinterpret_cast<float*>(workspace + ws.lse_accum_offset);
  epilogue_args.accum = ws.accum;

  int const num_m_blocks = int((int64_t(max_seqlen_q(p)) * pack + Config::kBlockM - 1) / Config::kBlockM);
  int const tile_heads = pack > 1 ? p.num_heads_k : p.num_heads;
  // K + V of one unit (a split of one tile head's keys): what a causal L2 section keeps cached. A quarter of
  // H100's 50 MB L2 leaves room for Q, O and the other SMs' traffic. GQA heads sharing a kv head are
  // adjacent, so this overcounts.
  int64_t const kv_bytes_per_unit =
      int64_t(max_seqlen_k(p)) * (p.head_dim + p.head_dim_v) * int64_t(sizeof(Element)) / num_splits;
  using Scheduler = typename Kernel::Scheduler;
  // The divisors ({}) are set by set_divisors once every count is final.
  Scheduler scheduler{num_m_blocks, tile_heads, p.batch, num_splits, 1, p.tile_counter, {}, {}, {}, {}, {}};
  scheduler.heads_per_section = Scheduler::units_per_l2_section(scheduler.num_units(), kv_bytes_per_unit,
                                                                int64_t(12) << 20);
  if (scheduler.num_tiles() <= 0) { return cudaSuccess; }
  scheduler.set_divisors();  // every count is >= 1 here
  typename Kernel::Params kernel_params{Mainloop::to_params(mainloop_args), Epilogue::to_params(epilogue_args),
                                        seqlen_args, scheduler, pack, p.mask, p.cp};

  int num_sms = p.num_sms;
  if (num_sms <= 0) {  // callers without a device query of their own (the standalone runner)
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) { err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device); }
    if (err != cudaSuccess) { return err; }
  }
  int const smem_size = Kernel::kSharedStorageSize;
  auto kernel = &fwd_kernel_sm90_entry<Kernel>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_size);
  if (err != cudaSuccess) { return err; }
  int ctas_per_sm = 1;
  if constexpr (Kernel::kCtasPerSm > 1) {
    // Several CTAs per SM: shared memory at its largest carveout, and the grid sized by the residency the
    // driver reports (asked once per kernel), since the persistent grid must fit one wave: claim_tiles lets
    // the next grid launch early, and that grid's waiting CTAs must not take an SM this grid still needs.
    static int const resident = [&] {
      int n = 1;
      if (prefer_max_shared_carveout(kernel) != cudaSuccess ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Kernel::kNumThreads, size_t(smem_size)) !=
              cudaSuccess) {
        (void)cudaGetLastError();  // a refused query leaves one CTA per SM, not a sticky error
        n = 1;
      }
      return n < 1 ? 1 : (n > Kernel::kCtasPerSm ? Kernel::kCtasPerSm : n);
    }();
    ctas_per_sm = resident;
  }
  dim3 const grid = Kernel::grid(scheduler, num_sms * ctas_per_sm);
#ifdef FLASH3_TRACE
  unsigned long long* const trace_buf = trace_begin(grid.x);
#endif
  // Programmatic dependent launch (as the combine): this grid's launch and set-up overlap the tail of the
  // kernel before it in the stream, which the kernel's griddepcontrol.wait orders its memory accesses after;
  // the kernel lets its own dependents launch once each CTA holds its last tile. Capturable in CUDA graphs.
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(Kernel::kNumThreads);
  config.dynamicSmemBytes = size_t(smem_size);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, kernel_params);
#ifdef FLASH3_TRACE
  {  // also after a failed launch: the buffer is freed and the symbol reset either way
    cudaError_t const trace_err = trace_end(trace_buf, grid.x, Config::kBlockM, Config::kBlockN, stream);
    if (err == cudaSuccess) { err = trace_err; }
  }
#endif
  if (err != cudaSuccess || !kSplit) { return err; }

  // Split-KV: merge the partials into out and lse, over the rows the attention kernel wrote.
  CombineParams c;
  c.num_splits = num_splits;
  c.batch = p.batch;
  c.rows = max_seqlen_q(p);
  c.heads = p.num_heads;
  c.head_dim = p.head_dim_v;
  c.o_partial = epilogue_args.o_accum;
  c.o_split_stride = ws.accum.o_split_stride();
  c.o_batch_stride = ws.accum.o_batch_stride();
  c.o_row_stride = ws.accum.o_row_stride();
  c.o_head_stride = ws.accum.o_head_stride();
  c.lse_partial = epilogue_args.lse_accum;
  c.lse_split_stride = ws.accum.lse_split_stride();
  c.lse_batch_stride = ws.accum.lse_batch_stride();
  c.lse_row_stride = 1;
  c.lse_head_stride = ws.accum.lse_head_stride();
  c.out = p.out.ptr;
  c.out_type = std::is_same_v<ElementOut, cutlass::half_t> ? CombineOut::kFloat16 : CombineOut::kBFloat16;
  c.out_batch_stride = varlen_q ? 0 : p.out.batch_stride;
  c.out_row_stride = p.out.row_stride;
  c.out_head_stride = p.out.head_stride;
  c.lse = p.lse.ptr;
  c.lse_out_batch_stride = varlen_q ? 0 : p.lse.batch_stride;
  c.lse_out_row_stride = 1;
  c.lse_out_head_stride = p.lse.head_stride;
  c.use_seqlen = true;
  c.seqlen = seqlen_args;
  c.sinks = p.sinks;
  return launch_combine(c, stream);
}

// The runtime -> compile-time switches compiled into each instantiation: the mask and split-KV.
template <class Element, int kHeadDim, int kHeadDimV, MaskKind kMask>
cudaError_t run_fwd_sm90_mask(FwdParams const& p, cudaStream_t stream) {
  return p.schedule.num_splits > 1 ? launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, true>(p, stream)
                                   : launch_fwd_sm90<Element, kHeadDim, kHeadDimV, kMask, false>(p, stream);
}

template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_fwd_sm90(FwdParams const& p, cudaStream_t stream) {
  if (is_causal(p.mask)) { return run_fwd_sm90_mask<Element, kHeadDim, kHeadDimV, MaskKind::kCausal>(p, stream); }
  if (is_local(p.mask)) { return run_fwd_sm90_mask<Element, kHeadDim, kHeadDimV, MaskKind::kLocal>(p, stream); }
  return run_fwd_sm90_mask<Element, kHeadDim, kHeadDimV, MaskKind::kNone>(p, stream);
}

}  // namespace flash3
