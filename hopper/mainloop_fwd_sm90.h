// The attention mainloop of the SM90 forward kernel for one (query tile, head, sequence):
//  - the producer side (`load`): TMA of the Q tile and of K/V blocks into the shared-memory pipelines,
//    key blocks visited from the last to the first so that the boundary block (the one needing masks and
//    the V tail fix-up) comes first;
//  - the consumer side (`mma`): per key block, S = Q K^T on the tensor cores (SS WGMMA), mask, online
//    softmax, O += P V with P taken straight from registers (RS WGMMA), software-pipelined so the softmax
//    of one block runs while the tensor cores work on the next (see `mma`).
// Each consumer warpgroup owns 64 query rows of the tile; the warpgroups share the K/V stages and take
// turns issuing GEMMs (ping-pong). FP8 inputs (kFp8) differ in three places only: V is read from its
// transposed copy (fp8_vt.h) as a K-major operand, P is written into the 8-bit A operand's register order
// (scores_to_fp8_operand), and the score policy carries the descales. Shapes in comments are per thread
// unless they say otherwise.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/fast_math.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>  // ss_smem_selector

#include "cute_utils.h"
#include "fp8_vt.h"
#include "mask.h"
#include "named_barrier.h"
#include "pipeline.h"
#include "score_mod.h"
#include "seqlen.h"
#include "softmax.h"
#include "tile_scheduler.h"
#include "trace.h"

namespace flash3 {

using namespace cute;

template <class Element_, int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kStages_, MaskKind kMaskKind_,
          class Score_ = ScaledScores<sizeof(Element_) == 1, (kBlockN_ <= 128)>, bool kGather_ = false>
struct MainloopFwdSm90 {
  // The variant for paged K/V that is gathered with cp.async (page sizes that are not a multiple of the key
  // block, or left padding): its producer warpgroup gets 40 registers (the consumers 232), which the gather
  // loop needs unrolled; the other kernels do not carry the gather code at all.
  static constexpr bool kGather = kGather_;
  // The producer warpgroup's least registers: 40 for the gather variant's unrolled copy loop (FA3's budget for
  // its cp.async loads), 24 otherwise (RegisterBudget shares out the rest).
  static constexpr int kProducerRegisters = kGather_ ? 40 : 24;
  using Element = Element_;
  // FP8 (e4m3): both WGMMA operands must be K-major, so P V reads V transposed (fp8_vt.h), P is reordered
  // into the 8-bit A operand, and the softmax keeps 8 bits of headroom so P uses e4m3's range.
  static constexpr bool kFp8 = sizeof(Element) == 1;
  static constexpr int kHeadDim = kHeadDim_;    // of Q and K: the K dimension of Q K^T
  static constexpr int kHeadDimV = kHeadDimV_;  // of V and O: the N dimension of P V (DeepSeek's 192 / 128)
  // The gather variant stages K and V rows at one shared-memory offset, which needs one layout for both.
  static_assert(!kGather_ || kHeadDimV == kHeadDim, "the paged gather variant needs head_dim_v == head_dim");
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  using Mask = MaskPolicy<kBlockM, kBlockN, kMaskKind_>;
  using Score = Score_;
  // Tiles whose cost grows with their m block (the scheduler orders them heaviest first).
  static constexpr bool kUnequalTiles = kMaskKind_ != MaskKind::kNone;
  static constexpr int kNumConsumerWarpGroups = kBlockM / 64;
  static constexpr int kNumMmaThreads = kNumConsumerWarpGroups * kWarpGroupThreads;
#if defined(CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)
  static constexpr bool kExtendedMmaShapes = true;
#else
  static constexpr bool kExtendedMmaShapes = false;
#endif
  // Without the switch CuTe's selector silently falls back to N = 16 atoms for such widths (5x slower).
  static_assert(kBlockN % 32 == 0 || kExtendedMmaShapes,
                "kBlockN not a multiple of 32 needs -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED");

  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // (M, N, K) of S = Q K^T
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kBlockN>>;  // (M, N, K) of O = P V
  // One 64-row WGMMA atom per consumer warpgroup, stacked along M.
  using WarpGroupLayout = Layout<Shape<Int<kNumConsumerWarpGroups>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(),
                                             WarpGroupLayout{}));
  // P (A) from registers, K-major. V (B): 16-bit, row-major (keys, d) in smem, i.e. MN-major for this GEMM;
  // FP8, the transposed copy (d, keys), K-major.
  static constexpr GMMA::Major kMajorV = kFp8 ? GMMA::Major::K : GMMA::Major::MN;
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, kMajorV>(), WarpGroupLayout{}));
  static_assert(!kFp8 || (kHeadDim % 32 == 0 && kHeadDimV % 32 == 0 && kBlockN % 32 == 0), "FP8 WGMMA has K = 32");

  using SmemLayoutQ = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim>>(),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // K-major swizzle atoms (8 rows by one atom's width) of K and of 16-bit V (whose rows are laid out as K's).
  using SmemAtomKV =
      decltype(cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim>>());
  using SmemAtomV =
      decltype(cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDimV>>());
  // A stage of (keys, cols): atoms down the keys, then across the column chunks (CUTLASS's order), except in
  // the gather variant, whose atoms go across the chunks first: the rows of a 16-row page (any multiple of 8)
  // are then one contiguous region of the stage, which a single TMA box fills (PageBox), where the other
  // order needs one box per chunk (two at d 128: pages of 16 ran at 0.55 of a contiguous cache, limited by
  // the boxes' count, 2026-12-02). Both orders are canonical WGMMA layouts (8-row groups a constant
  // chunks x atom bytes apart; for V, MN-major, the chunks one atom apart).
  template <class Atom, int kCols>
  using StageLayout =
      std::conditional_t<kGather_,
                         decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kCols>, Int<kStages>>{}, Step<_2, _1, _3>{})),
                         decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kCols>, Int<kStages>>{}))>;
  using SmemLayoutKV = StageLayout<SmemAtomKV, kHeadDim>;
  // 16-bit V as loaded: (keys, dv, stage), laid out as K is (the same layout when dv == d).
  using SmemLayoutV = StageLayout<SmemAtomV, kHeadDimV>;
  // V as the B operand of P V: (dv, keys, stage). 16-bit: the same bytes as SmemLayoutV (V as loaded);
  // FP8: its own K-major layout, filled by TMA from the transposed copy.
  using SmemLayoutVtFp8 = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kHeadDimV>, Int<kBlockN>>(),
      Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{}));
  using SmemLayoutVt16 = decltype(composition(
      SmemLayoutV{},
      make_ordered_layout(Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutVt = std::conditional_t<kFp8, SmemLayoutVtFp8, SmemLayoutVt16>;
  // What the V TMA writes: (keys, dv, stage) for 16-bit, (dv, keys, stage) for FP8.
  using SmemLayoutVLoad = std::conditional_t<kFp8, SmemLayoutVtFp8, SmemLayoutV>;
  // The stage layouts the dense TMA descriptors (tma_k, tma_v) are built for: CUTLASS's order. The gather
  // variant never loads K or 16-bit V through them (its K / V come in page boxes or by cp.async), so only
  // their types need to exist there.
  using SmemLayoutKVDense = decltype(tile_to_shape(SmemAtomKV{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVLoadDense = std::conditional_t<
      kFp8, SmemLayoutVtFp8, decltype(tile_to_shape(SmemAtomV{}, Shape<Int<kBlockN>, Int<kHeadDimV>, Int<kStages>>{}))>;
  // Gather variant, pages of a multiple of 16 rows (vLLM's 16, SGLang's 64) or of the key block: K (and
  // 16-bit V) in TMA boxes of Params::box_rows rows by the whole head dim, each landing in the contiguous
  // region of a stage that its rows occupy (see StageLayout and encode_page_box).
  static constexpr int kBoxCols = decltype(size<1>(SmemAtomKV{}))::value;  // one atom's width
  static constexpr int kChunks = kHeadDim / kBoxCols;
  static_assert(kBlockN % 16 == 0 && kHeadDim % kBoxCols == 0 && kBlockN / 16 <= 32);
  static_assert(!kGather_ || kChunks <= 256, "a TMA box dimension holds at most 256");
  // A TMA descriptor in the kernel's parameters (CUtensorMap carries the alignment the hardware requires).
  struct PageBox {
    cute::TmaDescriptor desc;
  };
  struct NoBox {};
  using PageBoxField = std::conditional_t<kGather_, PageBox, NoBox>;

  // Paged K/V: where the rows of the key block being gathered live, as the addresses of their first element
  // in the K and V caches (this head); nullptr = no row (past the sequence, or a page outside the cache).
  struct PageRow {
    Element const* k;
    Element const* v;
  };
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutVLoad>> v;
    alignas(16) PageRow page_rows[kBlockN];
  };

  using Pipeline = TmaPipeline<kStages>;
  static constexpr uint32_t kTxBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTxBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTxBytesV = kBlockN * kHeadDimV * sizeof(Element);

  // Global operands as TMA sees them: (rows, d, head, batch), d contiguous. For a packed (varlen) operand
  // rows = total rows and batch = 1; the sequence offset is applied per tile.
  using ShapeQKV = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{},
                                          StrideQKV{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{},
                                      select<0, 2>(TileShapeQK{}), _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutKVDense{}),
                                       select<1, 2>(TileShapeQK{}), _1{}));
  // The tile of V one stage holds, in the order of SmemLayoutVLoad: (N, dv) or, FP8, (dv, N).
  using TileShapeVLoad =
      std::conditional_t<kFp8, Shape<Int<kHeadDimV>, Int<kBlockN>>, Shape<Int<kBlockN>, Int<kHeadDimV>>>;
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutVLoadDense{}),
                                      TileShapeVLoad{}, _1{}));

  struct Arguments {
    Element const* q;
    Element const* k;
    Element const* v;
    ShapeQKV shape_q;  // (rows, head_dim, num_heads, batch)
    StrideQKV stride_q;
    ShapeQKV shape_kv;  // (rows, head_dim, num_heads_k, batch)
    StrideQKV stride_k;
    // V as the kernel reads it: 16-bit, the caller's (rows, dv, head, batch); FP8, the transposed copy
    // (dv, cols, head, batch entry) with cols contiguous (fp8_vt.h).
    Element const* v_read;
    ShapeQKV shape_v;
    StrideQKV stride_v;
    bool v_packed;  // FP8: the copy of a packed K (its sequences start at VtLayout::first_column)
    float softmax_scale;
    float softcap;  // 0 = off
    float const* sinks;  // (num_heads) or null; split-KV kernels leave them to the combine
    flash3_fp8 descale;
    int pack;  // PackGQA: q heads per packed tile row group (1 = none); Q is then gathered, not TMA-loaded
    // Paged K/V (params.h flash3_kv_cache), gathered with cp.async instead of TMA: k, stride_k and v,
    // stride_v_paged then describe the (page, row, head, dim) caches (batch stride = page stride).
    flash3_kv_cache paged;
    Element const* v_paged;
    StrideQKV stride_v_paged;
  };

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k;
    TmaV tma_v;
    ShapeQKV shape_q;
    ShapeQKV shape_kv;
    ShapeQKV shape_v;
    bool v_packed;
    int tile_heads_per_kv;  // num_heads / num_heads_k, or 1 with PackGQA (the tile head is the kv head)
    int pack;
    // PackGQA gathers Q rows with cp.async: the operand as the caller laid it out (element strides).
    Element const* q;
    StrideQKV stride_q;
    typename Score::Params score;
    // Paged K/V: the caches, the table, and the page size as a fast divisor. page_table == nullptr: TMA.
    Element const* k;
    StrideQKV stride_k;
    Element const* v_paged;
    StrideQKV stride_v_paged;
    int32_t const* page_table;
    int64_t page_table_stride;
    cutlass::FastDivmod page_size;
    int num_pages;
    // Other kernels than the gather variant are launched for pages that hold whole key blocks (page_size %
    // kBlockN == 0, no left padding): their producer warp loads them by TMA, one box per block at (row block
    // in the page, page).
    bool paged_tma;
    // Gather variant, pages of a multiple of 16 rows (no left padding, the compiled head dim): PageBox boxes of
    // box_rows rows (16 x the greatest common divisor of the page's and the key block's 16-row counts) from
    // the KV warp (load_boxes), one page lookup per box and lane; other pages are gathered with cp.async.
    bool paged_box;
    int box_rows;
    // Index of (page, head) in the box descriptors' last dimension: page * box_heads + head (the page stride
    // in head strides), for K and for V.
    int box_heads_k;
    int box_heads_v;
    PageBoxField box_k;
    PageBoxField box_v;
    __device__ bool paged() const { return page_table != nullptr; }
    __device__ bool gathers() const { return kGather && page_table != nullptr && !paged_box; }
    // Whether the kernel's KV warp loads K/V (cp.async rows or TMA boxes): every paged call of the gather variant.
    __device__ bool kv_warp() const { return kGather && page_table != nullptr; }

    __device__ int head_k(int tile_head) const { return tile_head / tile_heads_per_kv; }
  };

  static Params to_params(Arguments const& a) {
    Tensor mQ = make_tensor(make_gmem_ptr(a.q), a.shape_q, a.stride_q);
    Tensor mK = make_tensor(make_gmem_ptr(a.k), a.shape_kv, a.stride_k);
    Tensor mV = make_tensor(make_gmem_ptr(a.v_read), a.shape_v, a.stride_v);
    Params p{make_tma_copy(SM90_TMA_LOAD{}, mQ, SmemLayoutQ{}, select<0, 2>(TileShapeQK{}), _1{}),
             make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(SmemLayoutKVDense{}), select<1, 2>(TileShapeQK{}), _1{}),
             make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(SmemLayoutVLoadDense{}), TileShapeVLoad{}, _1{}),
             a.shape_q,
             a.shape_kv,
             a.shape_v,
             a.v_packed,
             a.pack > 1 ? 1 : get<2>(a.shape_q) / get<2>(a.shape_kv),
             a.pack,
             a.q,
             a.stride_q,
             Score::to_params(a.softmax_scale, a.softcap, a.descale, a.sinks),
             a.k,
             a.stride_k,
             a.v_paged,
             a.stride_v_paged,
             a.paged.page_table,
             a.paged.page_table_stride,
             cutlass::FastDivmod(a.paged.page_table ? a.paged.page_size : 1),
             a.paged.num_pages,
             !kGather && a.paged.page_table != nullptr && a.paged.page_size % kBlockN == 0 &&
                 a.paged.leftpad == nullptr,
             false,
             0,
             0,
             0,
             {},
             {}};
    if constexpr (kGather) {
      int const ps = a.paged.page_size;
      // Encoded only for the calls that use them (the cp.async path does not): each encoding is a host-side
      // driver call. A real head dim below the compiled one (80 on 96) takes the cp.async path, which
      // zero-fills the columns past it; a box would read the next head's. FP8's V is the dense transposed
      // copy (the producer warp's TMA), so only K gets a box there.
      if (a.paged.page_table != nullptr && a.paged.leftpad == nullptr && ps % 16 == 0 &&
          get<1>(a.shape_kv) == kHeadDim) {
        int g = ps / 16, h = kBlockN / 16;  // box rows: 16 x gcd, so that boxes tile both a page and a block
        while (h != 0) { int const t = g % h; g = h; h = t; }
        p.box_rows = 16 * g;
        p.paged_box = encode_page_box(p.box_k.desc, p.box_heads_k, a.k, a.stride_k, a.paged.num_pages, ps, p.box_rows) &&
                      (kFp8 || encode_page_box(p.box_v.desc, p.box_heads_v, a.v_paged, a.stride_v_paged,
                                               a.paged.num_pages, ps, p.box_rows));
      }
    }
    return p;
  }

  // A page box descriptor (gather variant): the cache as (atom columns, 8 rows, column chunks, 8-row groups of the
  // page, page * box_heads + head), boxes of (all, all, all, box_rows / 8, 1), in the stage's swizzle. Its
  // dimensions, in that order, are the order of the stage's bytes (StageLayout), so one box is box_rows whole
  // rows. (page, head) is one dimension (the page stride a multiple of the head stride) because a descriptor
  // has five. A page index outside the cache gets a negative coordinate there, which TMA fills with zeros.
  // False (the caller then gathers with cp.async) when the strides do not allow it.
  static bool encode_page_box(cute::TmaDescriptor& desc, int& box_heads, Element const* base, StrideQKV const& stride,
                              int num_pages, int page_size, int box_rows) {
    constexpr uint64_t kElem = sizeof(Element);
    int64_t const row = get<0>(stride), head = get<2>(stride), page = get<3>(stride);
    if (head <= 0 || page <= 0 || page % head != 0 || reinterpret_cast<uintptr_t>(base) % 16 != 0) { return false; }
    int64_t const heads_per_page = page / head;
    uint64_t const units = uint64_t(num_pages) * uint64_t(heads_per_page);
    if (heads_per_page > INT32_MAX || units > uint64_t(INT32_MAX)) { return false; }
    cuuint64_t dims[5] = {cuuint64_t(kBoxCols), 8, cuuint64_t(kChunks), cuuint64_t(page_size / 8), units};
    cuuint64_t strides[4] = {cuuint64_t(row) * kElem, kBoxCols * kElem, 8 * cuuint64_t(row) * kElem,
                             cuuint64_t(head) * kElem};
    for (cuuint64_t const st : strides) {
      if (st % 16 != 0 || st >= (cuuint64_t(1) << 40)) { return false; }
    }
    cuuint32_t box[5] = {cuuint32_t(kBoxCols), 8, cuuint32_t(kChunks), cuuint32_t(box_rows / 8), 1};
    cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
    constexpr int kAtomBytes = kBoxCols * int(kElem);
    constexpr CUtensorMapSwizzle kSwizzle = kAtomBytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                            : kAtomBytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                            : kAtomBytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                               : CU_TENSOR_MAP_SWIZZLE_NONE;
    CUresult const r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
        &desc, TMA::to_CUtensorMapDataType<Element>(), 5, const_cast<Element*>(base), dims, strides, box,
        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, kSwizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    box_heads = int(heads_per_page);
    return r == CUDA_SUCCESS;
  }

  __device__ static void prefetch_descriptors(Params const& p) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    if constexpr (kGather) {
      if (p.paged_box) {
        cute::prefetch_tma_descriptor(&p.box_k.desc);
        if constexpr (!kFp8) { cute::prefetch_tma_descriptor(&p.box_v.desc); }
      }
    }
  }

  __device__ static auto cta_v_of(Params const& p) { return p.tma_v.get_slice(_0{}); }

  // V's TMA source blocks (TMA, TMA_N, TMA_D, n) and stage destinations (TMA, TMA_N, TMA_D, PIPE): 16-bit,
  // the caller's V of the sequence; FP8, its transposed copy, which has one region per batch entry of the
  // query (fp8_vt.h), not per cache row.
  __device__ auto v_tma_views(Params const& p, SharedStorage& smem, TileCoord const& tile, SeqlenInfo const& seqlen,
                              int head_k) const {
    // The dense descriptor's stage layout (the gather variant loads no 16-bit V through these views).
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), SmemLayoutVLoadDense{});  // (N, d, PIPE) | FP8 (d, N, PIPE)
    auto v_start = [&] {
      if constexpr (kFp8) {
        return make_coord(_0{}, int(VtLayout::first_column(p.v_packed, tile.batch, seqlen.offset_k)));
      } else {
        return make_coord(seqlen.offset_k, _0{});
      }
    };
    int const v_batch = kFp8 ? (p.v_packed ? 0 : tile.batch) : seqlen.batch_k;
    Tensor mV = domain_offset(v_start(), p.tma_v.get_tma_tensor(p.shape_v)(_, _, head_k, v_batch));
    auto v_block = [&] {
      if constexpr (kFp8) { return make_coord(_0{}, _); } else { return make_coord(_, _0{}); }
    };
    Tensor gV = local_tile(mV, TileShapeVLoad{}, v_block());  // (N, d, n) | FP8 (d, N, n)
    auto cta_v = p.tma_v.get_slice(_0{});
    return cute::make_tuple(cta_v.partition_S(gV), cta_v.partition_D(sV));
  }

  // Producer: called by the whole producer warp; one elected lane issues. Loads Q (once the consumers are
  // done with the previous tile's Q), then K and V of the range's blocks from end - 1 down to begin.
  __device__ void load(Params const& p, SharedStorage& smem, uint64_t& barrier_q, Pipeline const& pipe_k,
                       Pipeline const& pipe_v, typename Pipeline::State& state, TileCoord const& tile,
                       SeqlenInfo const& seqlen, BlockRange const& range, bool wait_q_free) const {
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), SmemLayoutQ{});    // (M, d)
    // The dense descriptor's stage layout: the gather variant loads no K through this warp.
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), SmemLayoutKVDense{});  // (N, d, PIPE)

    int const head_k = p.head_k(tile.head);
    Tensor mQ = domain_offset(make_coord(seqlen.offset_q, _0{}),
                              p.tma_q.get_tma_tensor(p.shape_q)(_, _, tile.head, seqlen.batch_q));
    Tensor mK = domain_offset(make_coord(seqlen.offset_k, _0{}),
                              p.tma_k.get_tma_tensor(p.shape_kv)(_, _, head_k, seqlen.batch_k));
    Tensor gQ = local_tile(mQ, select<0, 2>(TileShapeQK{}), make_coord(tile.m_block, _0{}));  // (M, d)
    Tensor gK = local_tile(mK, select<1, 2>(TileShapeQK{}), make_coord(_, _0{}));             // (N, d, n)

    auto cta_q = p.tma_q.get_slice(_0{});
    auto cta_k = p.tma_k.get_slice(_0{});
    Tensor tQgQ = cta_q.partition_S(gQ);  // (TMA, TMA_M, TMA_D)
    Tensor tQsQ = cta_q.partition_D(sQ);  // (TMA, TMA_M, TMA_D)
    Tensor tKgK = cta_k.partition_S(gK);  // (TMA, TMA_N, TMA_D, n)
    Tensor tKsK = cta_k.partition_D(sK);  // (TMA, TMA_N, TMA_D, PIPE)
    auto [tVgV, tVsV] = v_tma_views(p, smem, tile, seqlen, head_k);

    bool const leader = cute::elect_one_sync();
    if (p.pack == 1) {  // a packed Q is gathered by the Q warp instead (load_q_packed)
      if (wait_q_free) { named_barrier_sync<kNumMmaThreads + 32>(FwdBarrier::QueryEmpty); }
      if (leader) {
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&barrier_q, kTxBytesQ);
        copy(p.tma_q.with(barrier_q, 0), tQgQ, tQsQ);
      }
      FLASH3_MARK_PRODUCER(kProducerQ);
    }
    typename Pipeline::State state_v = state;
    // The blocks in the order the consumer needs them: K of block n goes out before V of block n + 1. Not
    // unrolled: issuing is cheap, and the unrolled loop's extra counters do not fit the producer's 24
    // registers (the FP8 kernels spilled one).
    auto issue_blocks = [&](auto&& load_k_block, auto&& load_v_block) {
      load_k_block(range.end - 1);
#pragma unroll 1
      for (int n = range.end - 2; n >= range.begin; --n) {
        load_k_block(n);
        load_v_block(n + 1);
      }
      load_v_block(range.begin);
    };
    auto load_k = [&](int n) {
      if (leader) {
        pipe_k.producer_acquire(state, kTxBytesK);
        copy(p.tma_k.with(*pipe_k.full_barrier(state), 0), tKgK(_, _, _, n), tKsK(_, _, _, state.index));
      }
      state.advance();
    };
    auto load_v = [&](int n) {
      if (leader) {
        // FP8 reads V from the copy the kernel before this one writes (kernel_fwd_sm90.h): wait for that
        // grid before the first tile's V loads (at once after the first of them).
        if constexpr (kFp8) {
          if (!wait_q_free) { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
        }
        pipe_v.producer_acquire(state_v, kTxBytesV);
        copy(p.tma_v.with(*pipe_v.full_barrier(state_v), 0), tVgV(_, _, _, n), tVsV(_, _, _, state_v.index));
      }
      state_v.advance();
    };
    if (p.paged_tma) {  // pages of whole key blocks: one TMA box per block, in the same order as below
      int32_t const* const table = p.page_table + int64_t(seqlen.batch_k) * p.page_table_stride;
      int const blocks_per_page = p.page_size.divisor / kBlockN;
      auto load_k_page = [&](int n) {
        if (leader) {
          Tensor gKp = local_tile(p.tma_k.get_tma_tensor(p.shape_kv)(_, _, head_k, __ldg(table + n / blocks_per_page)),
                                  select<1, 2>(TileShapeQK{}), make_coord(n % blocks_per_page, _0{}));  // (N, d)
          pipe_k.producer_acquire(state, kTxBytesK);
          copy(p.tma_k.with(*pipe_k.full_barrier(state), 0), cta_k.partition_S(gKp), tKsK(_, _, _, state.index));
        }
        state.advance();
      };
      auto load_v_page = [&](int n) {
        if constexpr (kFp8) {
          load_v(n);  // the transposed copy is dense
        } else {
          if (leader) {
            Tensor gVp = local_tile(p.tma_v.get_tma_tensor(p.shape_v)(_, _, head_k, __ldg(table + n / blocks_per_page)),
                                    TileShapeVLoad{}, make_coord(n % blocks_per_page, _0{}));  // (N, dv)
            pipe_v.producer_acquire(state_v, kTxBytesV);
            copy(p.tma_v.with(*pipe_v.full_barrier(state_v), 0), cta_v_of(p).partition_S(gVp),
                 tVsV(_, _, _, state_v.index));
          }
          state_v.advance();
        }
      };
      issue_blocks(load_k_page, load_v_page);
      return;
    }
    if (p.paged()) {  // the KV warp gathers K (and 16-bit V) through the page table (load_paged)
      if constexpr (kFp8) {  // FP8's V comes from its dense transposed copy, by TMA as usual
#pragma unroll 1
        for (int n = range.end - 1; n >= range.begin; --n) { load_v(n); }
        state = state_v;  // this warp's ring position, carried to the next tile
      }
      return;
    }
    issue_blocks(load_k, load_v);
  }

  // Paged K/V, any page size (FA3's arbitrary page_block_size), run by the KV warp of the producer
  // warpgroup (the kernel's warp 3) for every tile with work, while the producer warp loads Q: a warp of its
  // own because the gather's state does not fit next to the producer warp's in 24 registers (it spilled
  // 50-300 bytes there, 2026-12-01). Each key block's rows are gathered with 16-byte cp.async copies, so a
  // block may span any number of pages: per block the warp first works out its rows' addresses in shared
  // memory (map_pages: one page-table read per key, issued together), then copies K and V from there. K
  // and V of a block go out together; the consumers need K(n) before V(n + 1), which this order also
  // serves. Keys past the sequence and pages outside the cache are zero-filled without reading memory
  // (cp.async src-size 0), so unused page-table entries are never dereferenced and NaN in unused slots
  // cannot reach the result. A stage's full barrier then expects one arrival per lane, which
  // cp.async.mbarrier.arrive.noinc makes when the lane's copies have landed (the kernel initialises it
  // so). FP8: only K is gathered; V comes from its transposed copy (which the copy kernel read through the
  // page table) by the producer warp's TMA, as usual.
  __device__ void load_paged(Params const& p, SharedStorage& smem, Pipeline const& pipe_k, Pipeline const& pipe_v,
                             typename Pipeline::State& state, TileCoord const& tile, SeqlenInfo const& seqlen,
                             BlockRange const& range) const {
    if constexpr (!kGather) {
      return;
    } else {
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), SmemLayoutKV{});  // (N, d, PIPE)
    // The tile's page-table entries towards L2 first (128-byte lines, one per lane and pass), so that each
    // block's mapping waits for L2 rather than DRAM; map_pages then reads them block by block.
    {
      int32_t const* const table = p.page_table + int64_t(seqlen.batch_k) * p.page_table_stride;
      int const first = (seqlen.offset_k + range.begin * kBlockN) / p.page_size.divisor;
      int const last = (seqlen.offset_k + min(range.end * kBlockN, seqlen.seqlen_k) - 1) / p.page_size.divisor;
#pragma unroll 1
      for (int slot = first + int(threadIdx.x) % 32 * 32; slot <= last; slot += 32 * 32) {
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(table + slot));
      }
    }
    if (p.paged_box) {
      load_boxes(p, smem, pipe_k, pipe_v, state, tile, seqlen, range);
      return;
    }
    // Few live values across the loop, so that the copy loop can be unrolled within the producer budget: K and V of
    // a block share one pipeline state (both rings advance once per block here, and start level), and the
    // tile's fields are re-read from its shared-memory slot (tile, seqlen and range live there) per block.
#pragma unroll 1
    for (int n = reread(range.end) - 1; n >= reread(range.begin); --n) {
      map_pages(p, smem, tile, seqlen, n);
      pipe_k.producer_wait_empty(state);
      if constexpr (kFp8) {  // V: the producer warp, by TMA from the transposed copy
        gather_rows<false>(p, smem, sK(_, _, state.index), pipe_k.full_barrier(state), nullptr);
      } else {
        pipe_v.producer_wait_empty(state);
        gather_rows<true>(p, smem, sK(_, _, state.index), pipe_k.full_barrier(state), pipe_v.full_barrier(state));
      }
      state.advance();
    }
    }
  }

  // Params::paged_box: each key block as kBlockN / box_rows PageBox boxes (box_rows rows by the whole head
  // dim, one page's rows, one contiguous region of the stage); box j holds the block's rows [j box_rows,
  // (j + 1) box_rows). Lane j owns box j: it reads the box's page one block ahead (the page-table read's
  // latency then hides behind the wait for a free stage) and, once the elected lane has armed the stage's
  // barriers, issues the box's copies itself, so the boxes of a block go out in parallel rather than one
  // lane's serial loop. A copy may land before the barrier's expect-tx (the tx-count may go negative); the
  // phase cannot complete before the elected lane's arrival. Boxes past the sequence are not loaded (the
  // transaction count says how many are); keys past it in the last box are masked and their V rows zeroed
  // (zero_v_tail), and a page index outside the cache gets a negative coordinate, which TMA fills with zeros.
  __device__ void load_boxes(Params const& p, SharedStorage& smem, Pipeline const& pipe_k, Pipeline const& pipe_v,
                             typename Pipeline::State& state, TileCoord const& tile, SeqlenInfo const& seqlen,
                             BlockRange const& range) const {
    if constexpr (kGather) {
      Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), SmemLayoutKV{});  // (N, d, PIPE)
      Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), SmemLayoutKV{});  // 16-bit V: K's layout
      // The lane index by a volatile read the compiler cannot hoist into a long-lived register (that and the
      // addresses derived from it spilled in 13 kernels of the serial version, 2026-12-01).
      auto lane_id = [] {
        int lane;
        asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(lane));
        return lane;
      };
      // This lane's box of block `blk`: its page (-1 if the box is past the sequence or the page outside the
      // cache) and its first row's 8-row group in the page.
      auto lookup = [&](int blk, int& page, int& row_group) {
        int const lane = lane_id();
        int const local = blk * kBlockN + lane * p.box_rows;  // offset_k = 0: no left padding on this path
        page = -1;
        row_group = 0;
        if (lane * p.box_rows < kBlockN && local < reread(seqlen.seqlen_k)) {
          int32_t const* const table = p.page_table + int64_t(reread(seqlen.batch_k)) * p.page_table_stride;
          int slot, row;
          p.page_size(slot, row, local);
          int const entry = __ldg(table + slot);
          page = entry >= 0 && entry < p.num_pages ? entry : -1;
          row_group = row / 8;
        }
      };
      int n = reread(range.end) - 1;
      int next_page, next_row_group;
      lookup(n, next_page, next_row_group);
#pragma unroll 1
      for (; n >= reread(range.begin); --n) {
        int const page = next_page, row_group = next_row_group;
        if (n > reread(range.begin)) { lookup(n - 1, next_page, next_row_group); }
        int const boxes = min((reread(seqlen.seqlen_k) - n * kBlockN + p.box_rows - 1) / p.box_rows, kBlockN / p.box_rows);
        if (cute::elect_one_sync()) {
          uint32_t const tx = uint32_t(boxes) * uint32_t(p.box_rows) * (kHeadDim * sizeof(Element));
          pipe_k.producer_acquire(state, tx);
          if constexpr (!kFp8) { pipe_v.producer_acquire(state, tx); }  // FP8's V: the producer warp's TMA
        }
        __syncwarp();  // the stage is free (the elected lane waited for it) before any lane copies into it
        int const j = lane_id();
        if (j < boxes) {
          int const head_k = p.head_k(reread(tile.head));
          // (page, head) as one coordinate; a page outside the cache (-1) stays negative: zero-filled.
          int const unit_k = page < 0 ? -1 : page * p.box_heads_k + head_k;
          constexpr uint64_t kHint = uint64_t(TMA::CacheHintSm90::EVICT_NORMAL);
          SM90_TMA_LOAD_5D::copy(&p.box_k.desc, pipe_k.full_barrier(state), kHint, &sK(j * p.box_rows, 0, state.index),
                                 0, 0, 0, row_group, unit_k);
          if constexpr (!kFp8) {
            int const unit_v = page < 0 ? -1 : page * p.box_heads_v + head_k;
            SM90_TMA_LOAD_5D::copy(&p.box_v.desc, pipe_v.full_barrier(state), kHint,
                                   &sV(j * p.box_rows, 0, state.index), 0, 0, 0, row_group, unit_v);
          }
        }
        state.advance();
      }
    }
  }

  // Pages of whole key blocks (Params::paged_tma) are loaded by the producer warp instead (load): block n
  // is one TMA box of page table[n kBlockN / page_size] at row block (n kBlockN % page_size) / kBlockN,
  // through descriptors built on the (page_size, d, head, num_pages) view (launch_fwd_sm90.h). A page index
  // outside the cache is outside the descriptor's bounds, which TMA fills with zeros; keys past the
  // sequence in the last block are masked and their V rows zeroed (zero_v_tail), as for a dense cache.

  // A load the compiler must repeat: for values in shared memory that would otherwise be kept in registers.
  __device__ static int reread(int const& x) { return *const_cast<int const volatile*>(&x); }

  // The rows of block n's keys in the caches, into smem.page_rows (see PageRow). Unrolled so that the warp's
  // page-table reads are in flight together. The addresses are worked out once here, so the copy loop
  // (gather_rows) holds only a row's two pointers.
  __device__ void map_pages(Params const& p, SharedStorage& smem, TileCoord const& tile, SeqlenInfo const& seqlen,
                            int n) const {
    int const lane = int(threadIdx.x) % 32;
    int const head_k = p.head_k(reread(tile.head));
    int const first_key = reread(seqlen.offset_k);
    int const seqlen_k = reread(seqlen.seqlen_k);
    int32_t const* const table = p.page_table + int64_t(reread(seqlen.batch_k)) * p.page_table_stride;
    __syncwarp();  // every lane is done reading the previous block's rows
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < cute::ceil_div(kBlockN, 32); ++i) {
      int const r = lane + 32 * i;
      if (r < kBlockN) {
        int const key = n * kBlockN + r;
        PageRow pr{nullptr, nullptr};
        if (key < seqlen_k) {
          int slot, row;
          p.page_size(slot, row, first_key + key);
          int const page = __ldg(table + slot);
          if (page >= 0 && page < p.num_pages) {
            pr.k = p.k + int64_t(page) * get<3>(p.stride_k) + int64_t(row) * get<0>(p.stride_k) +
                   int64_t(head_k) * get<2>(p.stride_k);
            if constexpr (!kFp8) {
              pr.v = p.v_paged + int64_t(page) * get<3>(p.stride_v_paged) + int64_t(row) * get<0>(p.stride_v_paged) +
                     int64_t(head_k) * get<2>(p.stride_v_paged);
            }
          }
        }
        smem.page_rows[r] = pr;
      }
    }
    __syncwarp();
  }

  // One stage's rows of K (and, kWithV, of V into the same stage of the V ring) from smem.page_rows: the
  // block's 16-byte chunks numbered row by row, one per lane and pass, so neighbouring lanes copy
  // neighbouring bytes (as load_q_packed); K and V share the shared-memory offset (16-bit K and V stages
  // have one layout). Columns past the real head dim are zero-filled (the compiled one may be larger:
  // 80 -> 96), as TMA would. Each barrier gets one arrival per lane, made when all the lane's copies so far
  // have landed.
  template <bool kWithV, class StageTensor>
  __device__ void gather_rows(Params const& p, SharedStorage& smem, StageTensor sK, uint64_t* full_k,
                              uint64_t* full_v) const {
    constexpr int kChunk = 16 / int(sizeof(Element));
    constexpr int kChunksPerRow = kHeadDim / kChunk;  // 12 for 16-bit d 96: chunks are numbered over the block
    int const head_dim = get<1>(p.shape_kv);
    // The V stage at the K stage's offset (same layout, same stage index).
    uint32_t const v_minus_k = cute::cast_smem_ptr_to_uint(smem.v.data()) - cute::cast_smem_ptr_to_uint(smem.k.data());
    auto copy_chunk = [&](int r, int col) {
      PageRow const pr = smem.page_rows[r];
      bool const ok = col < head_dim && pr.k != nullptr;
      uint32_t const dst = cute::cast_smem_ptr_to_uint(&sK(r, col));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(ok ? pr.k + col : p.k),
                   "r"(ok ? 16 : 0));
      if constexpr (kWithV) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + v_minus_k),
                     "l"(ok ? pr.v + col : p.k), "r"(ok ? 16 : 0));
      }
    };
    int const lane = int(threadIdx.x) % 32;
    // Unrolled by 4 (the gather variant's 40 registers allow it; with 24 it spilled 8-32 bytes, 2026-12-01), so
    // that the row loads from shared memory and the address arithmetic of neighbouring passes overlap.
    if constexpr (32 % kChunksPerRow == 0) {  // every lane keeps one column
      constexpr int kRowsPerPass = 32 / kChunksPerRow;
      int const col = (lane % kChunksPerRow) * kChunk;
#pragma unroll 4
      for (int r = lane / kChunksPerRow; r < kBlockN; r += kRowsPerPass) { copy_chunk(r, col); }
    } else {
#pragma unroll 4
      for (int i = lane; i < kBlockN * kChunksPerRow; i += 32) {
        copy_chunk(i / kChunksPerRow, (i % kChunksPerRow) * kChunk);
      }
    }
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(cute::cast_smem_ptr_to_uint(full_k))
                 : "memory");
    if constexpr (kWithV) {
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(cute::cast_smem_ptr_to_uint(full_v))
                   : "memory");
    }
  }

  // PackGQA: the tile's rows are (query, head) pairs of one kv group, which no TMA box describes, so a warp
  // of the producer warpgroup of its own (the Q warp, see the kernel) gathers them with cp.async, 16 bytes
  // per lane and copy, once the consumers are done with the previous tile's Q (wait_q_free), rows past the sequence skipped
  // (garbage rows only ever reach their own rows of S and O, which are never stored) and columns past the
  // real head dim zero-filled (K's are zero too, but garbage times zero may be NaN). barrier_q then
  // expects one arrival per lane, which cp.async.mbarrier.arrive.noinc makes when the lane's copies land
  // (synccheck called the counted variant plus one regular arrival a barrier overflow).
  __device__ void load_q_packed(Params const& p, SharedStorage& smem, uint64_t& barrier_q, TileCoord const& tile,
                                SeqlenInfo const& seqlen, bool wait_q_free) const {
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), SmemLayoutQ{});  // (M, d)
    if (wait_q_free) { named_barrier_sync<kNumMmaThreads + 32>(FwdBarrier::QueryEmpty); }
    constexpr int kChunk = 16 / int(sizeof(Element));  // elements per copy
    constexpr int kChunksPerRow = kHeadDim / kChunk;
    static_assert(kChunksPerRow <= 32);
    constexpr int kRowsPerPass = 32 / kChunksPerRow;  // lanes past kRowsPerPass whole rows stay idle
    // Each lane keeps one column chunk for all its rows: few live values, as the producer has 24 registers.
    int const lane = int(threadIdx.x) % 32;
    int const col = (lane % kChunksPerRow) * kChunk;
    int const src_bytes = col < get<1>(p.shape_q) ? 16 : 0;
    int const first = tile.m_block * kBlockM;
    int const rows = min(kBlockM, seqlen.seqlen_q * p.pack - first);
    Element const* q = p.q + int64_t(seqlen.batch_q) * get<3>(p.stride_q) +
                       int64_t(seqlen.offset_q) * get<0>(p.stride_q) + int64_t(tile.head) * p.pack * get<2>(p.stride_q) +
                       (src_bytes ? col : 0);
#pragma unroll 1
    for (int r = lane < kRowsPerPass * kChunksPerRow ? lane / kChunksPerRow : kBlockM; r < rows; r += kRowsPerPass) {
      int const query = (first + r) / p.pack;
      int const head = first + r - query * p.pack;
      Element const* src = src_bytes ? q + int64_t(query) * get<0>(p.stride_q) + int64_t(head) * get<2>(p.stride_q) : q;
      uint32_t const dst = cute::cast_smem_ptr_to_uint(&sQ(r, col));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
    }
    // Each lane's arrival (of the 32 barrier_q expects with PackGQA) happens when its copies have landed.
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(cute::cast_smem_ptr_to_uint(&barrier_q))
                 : "memory");
  }

  // Keys beyond the sequence in the boundary V block hold whatever follows it in memory (the next
  // sequence, unused seqused_k rows, or NaN poison); P is 0 there but 0 * NaN is NaN, so those rows are
  // zeroed in shared memory before any warpgroup's P V GEMM reads them.
  // FP8: the same for the key columns of the transposed tile, from the sequence's last group of 16 on (the
  // copy zeroed the keys past the end inside that group).
  __device__ void zero_v_tail(SharedStorage& smem, int stage, int first_row, int thread_idx) const {
    if constexpr (kFp8) {
      Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), SmemLayoutVtFp8{});  // (dv, N, PIPE)
      constexpr int kChunksPerRow = kBlockN / 16;
      int const first_chunk = (first_row + 15) / 16;
      int const chunks = kChunksPerRow - first_chunk;
      for (int i = thread_idx; i < chunks * kHeadDimV; i += kNumMmaThreads) {
        int const d = i / chunks;
        int const col = (first_chunk + i % chunks) * 16;
        *reinterpret_cast<uint4*>(&sVt(d, col, stage)) = make_uint4(0, 0, 0, 0);
      }
    } else {
      Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), SmemLayoutV{});  // (N, dv, PIPE)
      constexpr int kChunksPerRow = kHeadDimV / 8;  // 16-byte chunks; the swizzle keeps each chunk contiguous
      int const num_chunks = (kBlockN - first_row) * kChunksPerRow;
      for (int i = thread_idx; i < num_chunks; i += kNumMmaThreads) {
        int const row = first_row + i / kChunksPerRow;
        int const col = (i % kChunksPerRow) * 8;
        *reinterpret_cast<uint4*>(&sV(row, col, stage)) = make_uint4(0, 0, 0, 0);
      }
    }
    cutlass::arch::fence_view_async_shared();  // make the generic-proxy stores visible to WGMMA
    named_barrier_sync<kNumMmaThreads>(FwdBarrier::VTailZeroed);
  }

  static constexpr int kRowsPerThread = 2;  // a 64-row WGMMA accumulator gives each thread 2 rows

  // Turn-taking between consumer warpgroups (FA3's "warp scheduler barrier"), round robin: a warpgroup waits
  // for its turn before issuing its GEMMs and passes the turn to the next one right after issuing them, so
  // one warpgroup's GEMMs run while the others do their softmax (ping-pong with two, a ring with three).
  // Each barrier completes when its owner (128 threads) syncs and the previous warpgroup (128) arrives.
  static constexpr bool kPingPong = kNumConsumerWarpGroups >= 2;
  static_assert(kNumConsumerWarpGroups <= 3, "one turn barrier per consumer warpgroup, three at most");
  __device__ static FwdBarrier turn_barrier(int warp_group) {
    return static_cast<FwdBarrier>(static_cast<int>(FwdBarrier::WarpGroupTurn1) + warp_group);
  }
  __device__ static void wait_turn(int warp_group) {
    if constexpr (kPingPong) { named_barrier_sync<2 * kWarpGroupThreads>(turn_barrier(warp_group)); }
  }
  __device__ static void pass_turn(int warp_group) {
    if constexpr (kPingPong) {
      int const next = warp_group + 1 == kNumConsumerWarpGroups ? 0 : warp_group + 1;
      named_barrier_arrive<2 * kWarpGroupThreads>(turn_barrier(next));
    }
  }
  // The first warpgroup starts with the turn: the last one hands it over once, up front.
  __device__ static void init_turns(int warp_group) {
    if constexpr (kPingPong) {
      if (warp_group == kNumConsumerWarpGroups - 1) { named_barrier_arrive<2 * kWarpGroupThreads>(turn_barrier(0)); }
    }
  }

  // Whether all rows of `warp_group`'s slice of the tile lie past the tile's real rows (short sequences;
  // decode with PackGQA, 4-8 real rows in 128). Such a warpgroup runs idle_walk instead of mma.
  __device__ static bool warpgroup_idle(Mask const& mask, int warp_group) {
    return mask.m_block * kBlockM + warp_group * (kBlockM / kNumConsumerWarpGroups) >= mask.seqlen_q * mask.pack;
  }

  // The key blocks of a tile, each one K and one V stage: the producer loads end - 1 down to begin (load),
  // and mma and idle_walk consume the same blocks (masks without a lower edge have unmasked_begin == begin,
  // split ranges included, so mma's loops end at begin too).
  __device__ static int blocks_of(BlockRange const& range) { return range.end - range.begin; }

  // The idle warpgroup's part of a tile: no GEMM and no softmax, only the barriers of mma's blocks in mma's
  // order (K and V full / empty, the ping-pong turns, the V tail's meeting, Q's release), so that the other
  // warpgroup and the producer see the usual protocol while the tensor cores and issue slots go to the
  // warpgroup with real rows. Its O and LSE rows are never stored (the epilogue predicates every row).
  // Called by the kernel instead of mma, not tested inside it: tests around the GEMMs inside `step` grew the
  // 16-bit d 96 loop from 806 to 1064 instructions (the fp16 guide cases ~30% slower than in session 13's
  // run), and a walk at the top of mma moved the pipeline's stage index out of the uniform registers.
  __device__ void idle_walk(Params const& p, SharedStorage& smem, Pipeline const& pipe_k, Pipeline const& pipe_v,
                            typename Pipeline::State& state_k, Mask const& mask, BlockRange const& range,
                            int thread_idx) const {
    int const thread_in_wg = thread_idx % kWarpGroupThreads;
    int const warp_group = thread_idx / kWarpGroupThreads;
    int const seqlen_k = mask.seqlen_k;
    typename Pipeline::State state_v = state_k;
    int n = range.end - 1;
    pipe_k.consumer_wait(state_k);  // the first block: Q K^T only
    wait_turn(warp_group);
    pass_turn(warp_group);
    pipe_k.consumer_release(state_k, thread_in_wg);
    state_k.advance();
    bool const tail_outside = !kFp8 && !p.paged() && seqlen_k >= get<0>(p.shape_v);  // as in mma
    if ((n + 1) * kBlockN > seqlen_k && !tail_outside) {
      pipe_v.consumer_wait(state_v);
      zero_v_tail(smem, state_v.index, seqlen_k - n * kBlockN, thread_idx);
    }
    for (--n; n >= range.begin; --n) {  // both GEMMs
      pipe_k.consumer_wait(state_k);
      wait_turn(warp_group);
      pipe_v.consumer_wait(state_v);
      pass_turn(warp_group);
      pipe_k.consumer_release(state_k, thread_in_wg);
      state_k.advance();
      pipe_v.consumer_release(state_v, thread_in_wg);
      state_v.advance();
    }
    named_barrier_arrive<kNumMmaThreads + 32>(FwdBarrier::QueryEmpty);
    pipe_v.consumer_wait(state_v);  // the last block: P V only
    wait_turn(warp_group);
    pass_turn(warp_group);
    pipe_v.consumer_release(state_v, thread_in_wg);
  }

  // Consumer: thread_idx in [0, kNumMmaThreads). Accumulates the normalised O of this thread's rows into
  // tOrO and returns their LSE.
  //
  // Software pipeline inside a warpgroup (FA3's intra-warpgroup overlap): while the tensor cores compute
  // S_next = Q K_next^T and O += P V for the current block, the warpgroup runs the softmax of S_next on the
  // CUDA cores; only then does it wait for O and rescale it. Every block goes through the one body `step`,
  // whose compile-time switches say which of the two GEMMs it has: the first block has only Q K^T (no P
  // yet), the blocks after it both, and a last step only P V. Blocks are visited from range.end - 1 down to
  // range.begin in three phases: masked (high), unmasked, masked (low).
  // q_phase: parity of this tile's Q load on barrier_q (the n-th Q load of the CTA completes phase n % 2).
  template <class FragO>
  __device__ void mma(Params const& p, SharedStorage& smem, uint64_t& barrier_q, uint32_t q_phase,
                      Pipeline const& pipe_k, Pipeline const& pipe_v, typename Pipeline::State& state_k,
                      FragO& tOrO, float (&lse)[kRowsPerThread], Mask const& mask, BlockRange const& range,
                      TileCoord const& tile, int thread_idx) const {
    // Built here from the kernel params rather than passed in, so that values the policy takes straight from
    // the params can be re-read from there instead of occupying registers across the loop.
    Score const score = Score::for_tile(p.score, tile, p.head_k(tile.head));
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), SmemLayoutQ{});    // (M, d)
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), SmemLayoutKV{});   // (N, d, PIPE)
    Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), SmemLayoutVt{});  // (d, N, PIPE)

    TiledMmaQK mma_qk;
    TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_slice(thread_idx);
    // The shared-memory descriptors depend only on the warpgroup (its 64-row slice of Q), so they are built
    // from the warpgroup index broadcast by a shuffle, which the compiler knows to be warp-uniform: the
    // descriptors then live in uniform registers, as WGMMA takes them. Sliced by the thread index, the Q
    // descriptors sat in 16 ordinary registers and every Q K^T WGMMA waited on two R2UR moves (FA3 slices by
    // a shuffled warpgroup index; its d 128 causal loop issues the 8 WGMMAs back to back, 2026-12-02).
    int const wg_uniform = __shfl_sync(0xffffffff, thread_idx / kWarpGroupThreads, 0);
    auto thr_qk_desc = mma_qk.get_slice(wg_uniform * kWarpGroupThreads);
    auto thr_pv_desc = mma_pv.get_slice(wg_uniform * kWarpGroupThreads);
    Tensor tSrQ = thr_qk_desc.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) smem descriptors
    Tensor tSrK = thr_qk_desc.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tOrV = thr_pv_desc.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, PIPE)
    Tensor cS = make_identity_tensor(select<0, 1>(TileShapeQK{}));  // (M, N) -> (row, col) in the tile
    Tensor tScS = thr_qk.partition_C(cS);                          // (MMA, MMA_M, MMA_N)
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (rows, cols)
    auto const bounds = mask.row_bounds(tScS_rc);  // this thread's rows' visible keys, for every block
    int const seqlen_k = mask.seqlen_k;
    Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));  // (rows, cols)
    // P of the block whose P V is next, in the input type, as the A operand of P V. 16-bit: S's register
    // layout reused as it is; FP8: the 8-bit A operand's own layout, filled by scores_to_fp8_operand.
    auto make_p = [&] {
      if constexpr (kFp8) {
        return make_tensor<Element>(fp8_operand_a_layout<kBlockN>());
      } else {
        // Stored in S's order (convert_fragment_into copies in storage order), viewed as the A operand.
        return make_tensor<Element>(
            acc_as_operand_a(partition_fragment_C(mma_qk, select<0, 1>(TileShapeQK{})).layout()));
      }
    };
    Tensor tOrP = make_p();  // (MMA, MMA_M, MMA_K)

    int const thread_in_wg = thread_idx % kWarpGroupThreads;
    int const warp_group = thread_idx / kWarpGroupThreads;
    OnlineSoftmax<kRowsPerThread, kFp8 ? 8 : 0> softmax(score.scale_log2);
    typename Pipeline::State state_v = state_k;  // V is consumed one block behind K
    clear(tOrO);

    // One block: S = Q K(n)^T if kScores (then score policy, mask, online softmax and the new P), and
    // O += P V of the previous block if kPV (then O is rescaled by the softmax's factor).
    // Always inlined: as a call, the tensors it captures by reference would have to live in local memory.
    auto step = [&](int n, auto scores, auto pv, auto masked) __attribute__((always_inline)) {
      constexpr bool kScores = decltype(scores)::value, kPV = decltype(pv)::value;
      Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(TileShapeQK{}));  // (MMA, MMA_M, MMA_N)
      // V(n + 1) is the producer's later load of the pair (K(n) goes out first), so a block with both GEMMs
      // waits for it only after issuing Q K^T (as FA3 does): a late V then delays the P V issue, not the
      // Q K^T one. Gathered (paged) K/V were written through the generic proxy; WGMMA reads through the async
      // one, hence the fence after each wait.
      if constexpr (kScores) {
        pipe_k.consumer_wait(state_k);
      } else if constexpr (kPV) {
        pipe_v.consumer_wait(state_v);
      }
      if (p.gathers()) { cutlass::arch::fence_view_async_shared(); }
      wait_turn(warp_group);
      if constexpr (kScores) { gemm_async</*kOverwrite=*/true>(mma_qk, tSrQ, tSrK(_, _, _, state_k.index), tSrS); }
      if constexpr (kScores && kPV) {
        pipe_v.consumer_wait(state_v);
        if (p.gathers()) { cutlass::arch::fence_view_async_shared(); }
      }
      if constexpr (kPV) { gemm_async</*kOverwrite=*/false>(mma_pv, tOrP, tOrV(_, _, _, state_v.index), tOrO); }
      pass_turn(warp_group);
      float o_scale[kRowsPerThread];
      if constexpr (kScores) {
        warpgroup_wait<kPV ? 1 : 0>();  // S is ready; P V may still be running
        pipe_k.consumer_release(state_k, thread_in_wg);
        state_k.advance();
        Tensor tSrS_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (rows, cols)
        score.apply(tSrS_rc, p.score);
        // `masked` is a compile-time constant in the loops; the first block decides at run time, so that
        // its body exists once.
        if constexpr (std::is_same_v<decltype(masked), bool>) {
          if (masked) { Mask::apply(tSrS_rc, tScS_rc, bounds, n, softmax.masked_score()); }
        } else if constexpr (decltype(masked)::value) {
          Mask::apply(tSrS_rc, tScS_rc, bounds, n, softmax.masked_score());
        }
        softmax.template update</*kFirst=*/!kPV>(tSrS_rc, o_scale);
      }
      if constexpr (kPV) {
        warpgroup_wait<0>();  // O += P V done: V can be released and P overwritten
        pipe_v.consumer_release(state_v, thread_in_wg);
        state_v.advance();
        if constexpr (kScores) { OnlineSoftmax<kRowsPerThread>::rescale_o(tOrO_rc, o_scale); }
      }
      if constexpr (kScores) {
        if constexpr (kFp8) {
          scores_to_fp8_operand(tSrS, tOrP);
        } else {
          convert_fragment_into(tSrS, tOrP);
        }
      }
    };
    using cute::false_type;
    using cute::true_type;

    cutlass::arch::ClusterTransactionBarrier::wait(&barrier_q, q_phase);
    FLASH3_MARK_WG(kQReady);
    // A gathered Q (PackGQA) was written through the generic proxy; WGMMA reads through the async one.
    if (p.pack > 1) { cutlass::arch::fence_view_async_shared(); }

    // The first block is the boundary one: masked unless every row sees all of it.
    int n = range.end - 1;
    step(n, true_type{}, false_type{}, /*masked=*/n >= range.unmasked_end || n < range.unmasked_begin);
    FLASH3_MARK_WG(kFirstDone);
    // Fix up the boundary block's V tail before any warpgroup multiplies by it. Outside the ping-pong turns,
    // so the two warpgroups can meet at the barrier inside zero_v_tail.
    // 16-bit V by TMA from a sequence that ends where its tensor's rows end (dense, full length): the rows
    // past it are outside the tensor, which TMA fills with zeros, so there is nothing to zero, and the first
    // steps need not wait for this V block. Paged caches and FP8's transposed copy always zero.
    bool const tail_outside = !kFp8 && !p.paged() && seqlen_k >= get<0>(p.shape_v);
    if ((n + 1) * kBlockN > seqlen_k && !tail_outside) {
      pipe_v.consumer_wait(state_v);
      zero_v_tail(smem, state_v.index, seqlen_k - n * kBlockN, thread_idx);
    }
    for (--n; n >= range.unmasked_end; --n) { step(n, true_type{}, true_type{}, true_type{}); }
    for (; n >= range.unmasked_begin; --n) { step(n, true_type{}, true_type{}, false_type{}); }
    // The masked-low phase exists only for masks with a lower edge; for the others the compiler cannot prove
    // it empty, and the dead loop would cost registers.
    if constexpr (Mask::kHasKeyStart) {
      for (; n >= range.begin; --n) { step(n, true_type{}, true_type{}, true_type{}); }
    }

    // Every Q K^T of this tile has completed: the producer may load the next tile's Q.
    named_barrier_arrive<kNumMmaThreads + 32>(FwdBarrier::QueryEmpty);
    FLASH3_MARK_WG(kLoopDone);
    step(n, false_type{}, true_type{}, false_type{});  // the last block's P V

    float o_scale[kRowsPerThread];
    softmax.finalize(score.softmax_scale, o_scale, lse);
    if (p.score.sinks != nullptr) {  // each row's q head: the tile's, or with PackGQA the packed row's
      // The rows' coordinates from a fresh thread index, not kept live across the loop (consumer_thread_index).
      Tensor tScS_end = mma_qk.get_slice(consumer_thread_index()).partition_C(cS);
      Tensor tScS_end_rc = make_tensor(tScS_end.data(), acc_rowcol(tScS_end.layout()));
      CUTLASS_PRAGMA_UNROLL
      for (int m = 0; m < kRowsPerThread; ++m) {
        int const row = tile.m_block * kBlockM + get<0>(tScS_end_rc(m, 0));
        int const head = p.pack > 1 ? tile.head * p.pack + row % p.pack : tile.head;
        Score::add_sink(p.score.sinks[head], lse[m], o_scale[m]);
      }
    }
    if constexpr (kFp8) {
      CUTLASS_PRAGMA_UNROLL
      for (int m = 0; m < kRowsPerThread; ++m) { o_scale[m] *= score.o_scale; }
    }
    OnlineSoftmax<kRowsPerThread>::rescale_o(tOrO_rc, o_scale);
  }
};

}  // namespace flash3
