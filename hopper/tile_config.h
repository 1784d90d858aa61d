// Tile shapes of the SM90 forward kernel: the only place where tile numbers live, each with its reason.
// kBlockM is the query rows of one CTA (64 per consumer warpgroup), kBlockN the keys of one pipeline stage.
// Shared memory per CTA = Q (kBlockM x d) + kStages x (K + V) (kBlockN x d each) plus barriers; the kernel
// static_asserts that it fits the 227 KB a CTA may use (kMaxSharedBytes).
#pragma once

namespace flash3 {

// Opt-in shared memory per CTA on SM90 (cudaDevAttrMaxSharedMemoryPerBlockOptin: 232448 bytes).
constexpr int kMaxSharedBytes = 227 * 1024;

struct TileShape {
  int block_m;
  int block_n;
  int stages;
  int ctas_per_sm = 1;  // resident CTAs per SM: their shared memory and registers share it
};

constexpr TileShape tile_shape_wide(int head_dim, int head_dim_v, bool causal, int elem_bytes, bool split);

// 16-bit d 128 causal calls that run on the 128-key sibling of the 128 x 176 causal tile (the softcap one).
// The wide tile hides more of the softmax under the other warpgroup's GEMMs (a 128-key step spends ~1700
// cycles of CUDA-core work against 1024 of its own GEMMs: NOTES session 12), but its diagonal masks more
// keys. Measured twice against FA3 in the same call (H200, bf16, h 16, NOTES session 12): the 176-key tile
// gains 2-8% at s 8k and 16k and on 4k queries x 16k keys, loses 3-5% at s 4k and is mixed below. So it
// runs where the mean query row sees >= 4096 keys (s_k - s_q / 2 is the mean for bottom-right causal) and
// there is at least one full query tile (chunked prefill: 512 queries against 8k cached keys, whose tiles
// all see 60+ key blocks, as the long rows' do), and never paged (page sizes that are multiples of 128 but
// not of 176 keep TMA's page-sized boxes instead of the gather variant). Decode stays on 128 keys.
constexpr bool causal_narrow(int elem_bytes, int head_dim, long long seqlen_q, long long seqlen_k, bool paged) {
  return elem_bytes == 2 && head_dim == 128 && (paged || seqlen_q < 128 || seqlen_k - seqlen_q / 2 < 4096);
}
// Calls whose every sequence fits one 128-key block (max_seqlen_k <= 128: short prefill, FP8 guide case 2's
// 64-token sequences, decode against short caches) also run on the 128-key sibling of a wider tile: a 176-,
// 192- or 224-key block would multiply and exponentiate columns past the sequence, and its TMA box would read
// that many rows of K and V (the next sequences' rows, for packed varlen K), all masked away.
constexpr bool keys_fit_narrow(long long max_seqlen_k) { return max_seqlen_k <= 128; }
// Short FP8 calls: every sequence's query rows (times the PackGQA group) fit one 64-row tile and its keys one
// 128-key block, no softcap, window or pages: FP8 guide case 2 (84 sequences of 64 tokens, h 16, d 80: 1344
// tiles of one block each). On the 192 x 128 tile two of its three consumer warpgroups have no rows, and a
// tile is one serial chain (Q and K land, S, softmax, P V, store: ~12.8k cycles in session 18's trace, against
// 1.2k for the block's loop) that the persistent CTA's next tile overlaps only through its K/V stages. The
// short tile is 64 x 128 with two CTAs per SM (54-72 KB of shared memory and 128 x (232 + 24) registers each),
// so two tiles' chains overlap on every SM and no warpgroup idles.
constexpr bool short_tiles(int elem_bytes, int head_dim, int head_dim_v, long long rows_q, long long seqlen_k,
                           bool softcap, bool local, bool paged) {
  return elem_bytes == 1 && head_dim <= 128 && head_dim_v <= 128 && rows_q <= 64 && seqlen_k <= 128 && !softcap &&
         !local && !paged;
}
// The measured rows, on the side each was measured to win on.
static_assert(!causal_narrow(2, 128, 8192, 8192, false) && !causal_narrow(2, 128, 16384, 16384, false) &&
              !causal_narrow(2, 128, 4096, 16384, false) && !causal_narrow(2, 128, 512, 8192, false),
              "long causal rows and chunked prefill: the 176-key tile");
static_assert(causal_narrow(2, 128, 4096, 4096, false) && causal_narrow(2, 128, 2048, 2048, false) &&
              causal_narrow(2, 128, 1, 8192, false) && causal_narrow(2, 128, 8192, 8192, true),
              "s 4k and shorter, decode and paged calls: the 128-key sibling");

// The tile of a kernel key (head dims, element bytes) and mask. `narrow`: calls with a softcap keep 128-key
// blocks: the wider blocks' S (88-96 registers) leaves no room for the softcap's loop (32-44 bytes of spills,
// 2026-12-01), so those kernels have a 128-key sibling that softcap calls run on.
// `local` (a sliding window): the row starts of the window take registers too (kHasKeyStart), so local tiles
// are narrower where that spilled (FA3 makes the same cuts): 16-bit d 128 / 192: 96 keys (128 spilled 32 bytes
// with a softcap at d 128); 16-bit d 256 and FP8 d 256: 64 keys (FP8's 96 spilled 52 bytes even without one).
// `gather`: the gather variant (paged K/V that TMA cannot load a key block at a time; launch_fwd_sm90.h). It
// takes the split tile (its producer has 40 registers, the consumers 232), except at 16-bit head dims over
// 192: there it runs one consumer warpgroup of 64 rows, whose 240 registers hold O (128 per thread) beside
// 80-key S / P; two of them at 232 spilled 40-96 bytes even with 64 keys, and at 24 producer registers the
// gather loops spilled instead (2026-12-01). Its calls are decode and paged chunked prefill.
// `short_`: the short FP8 tile (short_tiles above).
constexpr TileShape tile_shape_sm90(int head_dim, int head_dim_v, bool causal, int elem_bytes, bool split = false,
                                    bool narrow = false, bool local = false, bool gather = false, bool short_ = false) {
  if (short_ && elem_bytes == 1 && head_dim <= 128 && head_dim_v <= 128) { return {64, 128, 2, 2}; }
  if (gather && elem_bytes == 2 && head_dim > 192) { return {64, local ? 64 : 80, 2}; }
  TileShape t = tile_shape_wide(head_dim, head_dim_v, causal, elem_bytes, split || gather);
  // Decode (split-KV and the gather variant), 16-bit d <= 128 with 128-key blocks: 3 stages (d 128: 32 + 3 x 64
  // KB = 224 KB). A decode CTA's speed is the bytes it has in flight over the memory latency, and with pages of
  // 16 a block is 16 boxes of 4 KB whose completion takes longer than the 4 boxes of 16 KB of a contiguous cache
  // (0.67 of its GB/s at 2 stages; 0.89 at 3, H200 2026-12-02, NOTES session 11): 50% more bytes in flight.
  if ((split || gather) && elem_bytes == 2 && head_dim <= 128 && head_dim_v <= 128 && t.block_n == 128 &&
      t.block_m == 128 && t.stages == 2) {
    t.stages = 3;
  }
  if (narrow && t.block_n > 128) { t.block_n = 128; }
  if (local && t.block_m > 128) { t.block_m = 128; }  // the window's row bounds take registers
  if (local && elem_bytes == 2 && head_dim > 96) { t.block_n = head_dim > 192 ? 64 : 96; }
  if (local && elem_bytes == 1 && head_dim > 128) { t.block_n = 64; }
  if (local && elem_bytes == 2 && head_dim <= 64 && head_dim_v > 128) { t.block_n = 64; }  // see tile_shape_wide
  if (local && elem_bytes == 1 && head_dim == 128 && t.block_n > 128) { t.block_n = 128; }  // see tile_shape_wide
  return t;
}

constexpr TileShape tile_shape_wide(int head_dim, int head_dim_v, bool causal, int elem_bytes, bool split) {
  // FP8 (1-byte elements). FP8 WGMMA needs key blocks that are multiples of 32 (its K), so 176 is out;
  // shared memory is half of 16-bit's, so wider blocks fit. Non-causal d 96 / 128: 128x192 (Q 12-16 KB +
  // 2 x (K + V^T) 72-96 KB); S 96 + P 24 + O 48-64 registers, 0 spills; 128x224 (FA3's d 128 tile) spilled 4
  // bytes. 128x128 for d 128 ran at 665 TFLOPS against FA3's 794 (H200, s 8k), so the per-block fixed costs
  // matter as they did for 16-bit. Causal: 128, as for 16-bit (the diagonal block stays square). d 256: the O
  // accumulator alone is 128 registers per thread; with 128 keys (FA3's) one kernel spilled 28 bytes (12-16
  // with the thread index re-read, 2026-12-01), 96 keys fit.
  // d 128: 3 stages (16 + 3 x 48 KB non-causal, 16 + 3 x 32 KB causal): FP8's GEMMs take half the time of
  // 16-bit ones, so fewer blocks of work cover a load's latency. Measured (H200, s 8k, same runs as FA3):
  // non-causal 723 -> 739 TFLOPS, causal 625 -> 636; FA3 899 / 810 and 897 / 826 in those runs.
  if (elem_bytes == 1) {
    if (head_dim > 128) { return {128, 96, 2}; }
    // d 64 and d 96: 192 x 128, three consumer warpgroups (FA3: 192 x 160 at d 64, 192 x 128 at d 96); 8-bit P
    // leaves room in 160 registers (d 96: S 64 + P 16 + O 48; 0 spills in all 16 d 96 kernels, 2026-12-03).
    if (head_dim <= 96 && !split) { return {192, 128, 2}; }
    // d 128 non-causal: FA3's tile, 128x224; 3 stages = 16 + 3 x 56 KB. Kept live after the mainloop, the
    // thread index had made it spill 4 bytes; re-read, it fits (2026-12-01, compile-checked). FA3 runs causal
    // at 224 too; ours spilled 16 bytes there (4 at 192), so causal keeps 128. Split-KV keeps 192.
    if (head_dim == 128 && !split && !causal) { return {128, 224, 3}; }
    // d 128 causal: 128 x 160, 3 stages = 16 + 3 x 40 KB. Measured against FA3 (H200, s 8k, 2026-12-01): 128
    // keys 0.76-0.78 of FA3, 192 0.82 (4 bytes of spills), 224 0.83 (16 bytes); 160 is the widest with 0
    // spills. A window keeps 128 (tile_shape_sm90).
    if (head_dim == 128 && !split && causal) { return {128, 160, 3}; }
    return {128, !causal && head_dim >= 96 ? 192 : 128, head_dim == 128 ? 3 : 2};
  }
  // hdim 128, non-causal: 128x176, 2 stages = 32 + 176 KB = 208 KB. Wider key blocks cut the per-block fixed
  // costs (barrier waits, row max/sum shuffles, O rescale) relative to GEMM work; 176 is the widest that
  // fits: 128x192 would need 224 KB plus barriers, over the cap. S (88 regs), P (44) and O (64) are live
  // together while the overlapped GEMMs run; that fits the 240-register consumer budget only because the
  // kernel re-derives the tile's coordinates after the mainloop instead of keeping them live (48 bytes of
  // spills otherwise). Needs CuTe's extended WGMMA shapes (N = 176 is not a multiple of 32).
  // Causal too, but only on long tiles (causal_narrow below); the rest of causal runs on the 128-key sibling.
  // Split-KV kernels (decode, long keys per tile) keep 128: their float32 epilogue does not fit next to the
  // 176-key tile's registers (356 bytes of spills, 2026-12-01), and their tiles are short anyway.
  if (head_dim == 128 && head_dim_v == 128 && !split) { return {128, 176, 2}; }
  // hdim 256 (Gemma): 128x80, 2 stages = 64 + 2 x (40 + 40) KB = 224 KB, the widest key block that fits (96
  // would need 256 KB). O alone is 128 registers per thread, S 40 and P 20 more; causal too (FA3's tile) once
  // the thread index is re-read after the mainloop (it spilled 8 bytes kept live, 2026-12-01). Split-KV: 64
  // (decode tiles are short; 0 spills with its float32 epilogue, 80 not tried; the gather variant: see
  // tile_shape_sm90).
  if (head_dim > 192) { return {128, split ? 64 : 80, 2}; }
  // hdim 192 with dv 128 (DeepSeek-V3's prefill, q = nope 128 + rope 64): 128x128 = 48 + 2 x (48 + 32) KB =
  // 208 KB. dv 192: 128x112 = 48 + 2 x (42 + 42) KB = 216 KB (128 would need 240 KB); split-KV and the
  // gather variant 96 (its causal kernel spilled 20 bytes at 112).
  if (head_dim > 128) { return {128, head_dim_v <= 128 ? 128 : (split ? 96 : 112), 2}; }
  // d 64 with dv 256 (FA3's pair for d <= 64): O alone is 128 registers per thread, so 128 rows in two
  // warpgroups and 96 keys: 16 + 2 x (12 + 48) KB = 136 KB; S 48 and P 24 registers beside O. 128 keys spilled
  // 248-264 bytes (2026-12-01). Split-KV (its float32 epilogue) and windows (kHasKeyStart): 64 keys.
  if (head_dim <= 64 && head_dim_v > 128) { return {128, split ? 64 : 96, 2}; }
  // hdim 64 (not split): 192 query rows, three consumer warpgroups taking turns (FA3's M, its fp8-fwd
  // wheel: 192 x 128 causal, 192 x 192 non-causal with P V from shared memory). Small d makes the Q K^T GEMM
  // short, so the softmax dominates; with three warpgroups two of them exponentiate while one issues. 160
  // registers each (RegisterBudget<3>): S 64 + P 32 + O 32; 0 spills (2026-12-01, compile-checked, not run).
  // d 96 at 192 x 128 spilled 292 bytes (O 48 more; FA3 keeps P in shared memory there), local d 64 8 bytes.
  if (head_dim <= 64 && !split) { return {192, 128, 2}; }
  // hdim 128, causal: 128x128. Causal tiles have few key blocks near the diagonal, where a wide block wastes
  // masked work; 128 keeps the diagonal block square with the query tile.
  // hdim 96: 128x128, 2 stages = 24 + 96 KB.
  // hdim 64: 128x128, 2 stages = 16 + 64 KB. Small d makes the QK^T GEMM short, so the softmax dominates;
  // two consumer warpgroups keep the tensor cores busy while the other one exponentiates.
  return {128, 128, 2};
}

template <int kHeadDim, int kHeadDimV, bool kCausal, int kElemBytes = 2, bool kSplit = false, bool kNarrow = false,
          bool kLocal = false, bool kGather = false, bool kShort = false>
struct TileConfigSm90 {
  static constexpr TileShape kShape =
      tile_shape_sm90(kHeadDim, kHeadDimV, kCausal, kElemBytes, kSplit, kNarrow, kLocal, kGather, kShort);
  static constexpr int kBlockM = kShape.block_m;
  static constexpr int kBlockN = kShape.block_n;
  static constexpr int kStages = kShape.stages;
  static constexpr int kCtasPerSm = kShape.ctas_per_sm;
};

}  // namespace flash3
