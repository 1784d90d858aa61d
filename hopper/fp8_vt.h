// V transposed for the FP8 kernels. FP8 WGMMA reads both operands K-major; in O = P V the reduction runs over
// keys, so the kernel needs V as (dim, keys) with keys contiguous, while callers hold V as (keys, dim). Before
// the attention kernel, one small kernel copies V into the call's workspace in that layout (about 2% of the
// attention time at s 8k, d 128; see benchmarks/NOTES.md for the choice against an on-chip transpose).
//
// The copy also reorders keys inside every aligned group of 16, so that P can go from the S accumulator
// into the A operand of the P V WGMMA without moving data between threads. In the S accumulator a thread
// holds, per row and 16 keys, the columns {2q, 2q+1, 8+2q, 9+2q} (q = lane % 4); the FP8 A operand wants
// that thread to hold K positions {4q .. 4q+3}. So K position 4q + e of a group is given key
// 8 * (e / 2) + 2q + e % 2 (key_of_position below), and V's rows are stored in that order: the product
// sum_k P[k] V[k] pairs the same keys, only in another order.
//
// Layout in the workspace: (batch entry, head_k, dim, column) bytes, columns contiguous, with `cols`
// columns per row (a multiple of 16, so every TMA stride is a multiple of 16 bytes). A sequence's keys start
// at a column that is a multiple of 16 (so the groups of 16 line up with the kernel's key blocks, which start
// at the sequence's first key) and take round_up(seqlen_k, 16) columns; the keys past seqlen_k inside the
// last group are zero. Dense K: one batch entry per sequence, column 0. Packed K: one batch entry, sequence b
// at column floor16(offset_k) + 16 b; with cols = round_up(k.rows, 16) + 16 batch these regions do not
// overlap for valid metadata and stay inside the buffer for any metadata (offsets and lengths are the
// kernel's clamped ones, SeqlenInfo); lying metadata can make regions overlap: a race on values that are
// wrong anyway, never an access outside the buffer.
#pragma once

#include <cstdint>

#include "launch_utils.h"
#include "params.h"
#include "seqlen.h"

namespace flash3 {

struct VtLayout {
  int64_t cols;     // columns (key slots) per (batch entry, head, dim) row
  int32_t batches;  // batch entries: the batch for dense K, 1 for packed K
  int32_t heads;    // num_heads_k
  int32_t dims;     // head_dim_v (the real one: the kernel's TMA fills the compiled rest with zeros)

  __host__ __device__ int64_t head_stride() const { return cols * dims; }
  __host__ __device__ int64_t batch_stride() const { return cols * dims * heads; }
  __host__ __device__ int64_t bytes() const { return batch_stride() * batches; }
  // The first column of sequence `batch` (see the header comment).
  __host__ __device__ static int64_t first_column(bool packed, int batch, int offset_k) {
    return packed ? int64_t(offset_k / 16 * 16) + 16 * int64_t(batch) : 0;
  }
};

__host__ __device__ inline int64_t round_up_16(int64_t x) { return (x + 15) / 16 * 16; }

__host__ __device__ inline VtLayout vt_layout(FwdParams const& p) {
  bool const packed = p.varlen.cu_seqlens_k != nullptr;
  VtLayout l;
  l.cols = packed ? round_up_16(p.k.rows) + 16 * int64_t(p.batch) : round_up_16(p.k.rows);
  l.batches = packed ? 1 : p.batch;
  l.heads = p.num_heads_k;
  l.dims = p.head_dim_v;
  return l;
}

// Bytes of the transposed copy an FP8 call needs (0 for 16-bit inputs or an empty problem); its region of
// the workspace (workspace.h) starts at offset 0.
__host__ __device__ inline int64_t vt_workspace_bytes(FwdParams const& p) {
  if (p.dtype != FLASH3_FLOAT8_E4M3 || p.batch <= 0 || p.q.rows <= 0 || p.k.rows <= 0 || p.num_heads_k <= 0 ||
      p.head_dim_v <= 0) {
    return 0;
  }
  return vt_layout(p).bytes();
}

// Inside a group of 16 columns: which key (0..15 of the group) column `pos` holds.
__host__ __device__ constexpr int key_of_position(int pos) {
  return 8 * ((pos & 3) >> 1) + 2 * (pos >> 2) + (pos & 1);
}

// Byte i of the result is byte (s >> 4i) & 7 of the pair (y:x), as PRMT (CUDA's __byte_perm) picks it; the
// host version serves the host check (tools/check_vt_transpose.cu).
__host__ __device__ inline uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  uint64_t const pair = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) { r |= uint32_t((pair >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i); }
  return r;
#endif
}

// One group of 16 keys by 4 dims, transposed with byte permutes: key_words[k] holds the 4 dims of key k (byte
// j = dim j); out[j] gets dim j's 16 columns in the permuted order, as 4 words (byte b of word w = column
// 4w + b, which holds key key_of_position(4w + b) = 2w, 2w + 1, 8 + 2w, 9 + 2w for b = 0..3). 8 PRMT per
// output word pair of dims: 32 for the 64 bytes, where reading bytes one by one took 64 loads and 64 shifts.
__host__ __device__ inline void transpose_group_quad(uint32_t const (&key_words)[16], uint32_t (&out)[4][4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t const a = key_words[2 * w], b = key_words[2 * w + 1];
    uint32_t const c = key_words[8 + 2 * w], d = key_words[9 + 2 * w];
    uint32_t const ab_lo = byte_perm(a, b, 0x5140), ab_hi = byte_perm(a, b, 0x7362);  // a0 b0 a1 b1, a2 b2 a3 b3
    uint32_t const cd_lo = byte_perm(c, d, 0x5140), cd_hi = byte_perm(c, d, 0x7362);
    out[0][w] = byte_perm(ab_lo, cd_lo, 0x5410);  // a0 b0 c0 d0
    out[1][w] = byte_perm(ab_lo, cd_lo, 0x7632);  // a1 b1 c1 d1
    out[2][w] = byte_perm(ab_hi, cd_hi, 0x5410);
    out[3][w] = byte_perm(ab_hi, cd_hi, 0x7632);
  }
}

#if defined(__CUDACC__)
// One CTA per (64-key block, sequence) along x (x = block + blocks_per_sequence * sequence, so any batch
// fits the grid) and kv head along y; 128 threads. Reads the block's V rows in 16-byte chunks
// into shared memory (zeros past the sequence), then each thread turns 16 keys by 4 dims into 4 dims' 16-byte
// chunks in the permuted order (transpose_group_quad). Every read is inside [0, k.rows) of V and every write
// inside the sequence's region. A template (kKeys: keys per CTA) so that every TU that includes this header
// may instantiate it.
constexpr int kVtThreads = 128;

// The staging tile: kVtKeys rows of up to 256 bytes. Rows are 272 bytes apart (16-byte aligned for the
// stores of stage 1), and each group of 16 rows 32 bytes further on: the 4 groups a warp's threads read at
// once then start on banks 8 apart, so the 32 words a warp reads (8 dim quads x 4 groups) hit 32 banks.
template <int kVtKeys>
struct VtTile {
  static constexpr int kRowBytes = 256 + 16;
  static constexpr int kGroupSkew = 32;
  alignas(16) uint8_t bytes[kVtKeys * kRowBytes + kVtKeys / 16 * kGroupSkew];
  __device__ uint8_t* row(int key) { return bytes + key * kRowBytes + key / 16 * kGroupSkew; }
};

// One block of kVtKeys keys starting at key0 of a sequence: its V rows into shared memory (zeros from the
// sequence's end on), then each dim's columns as 16-byte chunks in the permuted order, into `out` (the region's
// column key0). Called by every thread of the CTA; ends with the CTA synchronised, so `tile` can be reused.
// Paged V (params.h flash3_kv_cache): `v` is the head's base in page 0 and keys go through the page table
// `table` (the cache row's); a page index outside the cache reads zeros.
template <int kVtKeys>
__device__ __forceinline__ void copy_block(FwdParams const& p, int seqlen_k, int64_t slots, int chunks_per_row,
                                           uint8_t const* v, uint8_t* out, int64_t key0, int64_t cols,
                                           VtTile<kVtKeys>& tile, int32_t const* table, int first_key) {
  for (int i = threadIdx.x; i < kVtKeys * chunks_per_row; i += kVtThreads) {
    int const key = i / chunks_per_row;
    int const chunk = i % chunks_per_row;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (key0 + key < seqlen_k) {
      if (table) {
        int const pos = first_key + int(key0) + key;  // logical key in the cache row
        int const page = table[pos / p.kv_cache.page_size];
        if (page >= 0 && page < p.kv_cache.num_pages) {
          value = *reinterpret_cast<uint4 const*>(v + int64_t(page) * p.v.batch_stride +
                                                  int64_t(pos % p.kv_cache.page_size) * p.v.row_stride + chunk * 16);
        }
      } else {
        value = *reinterpret_cast<uint4 const*>(v + (key0 + key) * p.v.row_stride + chunk * 16);
      }
    }
    *reinterpret_cast<uint4*>(tile.row(key) + chunk * 16) = value;
  }
  __syncthreads();
  int const quads = chunks_per_row * 4;                                   // groups of 4 dims
  int const groups = int(min(int64_t(kVtKeys), slots - key0)) / 16;  // whole groups of 16 in this block
  // Group fastest: the 16-byte stores of one dim's consecutive groups are adjacent in global memory.
  for (int i = threadIdx.x; i < quads * groups; i += kVtThreads) {
    int const quad = i / groups;
    int const group = i % groups;
    uint32_t key_words[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      key_words[k] = *reinterpret_cast<uint32_t const*>(tile.row(group * 16 + k) + quad * 4);
    }
    uint32_t dims[4][4];
    transpose_group_quad(key_words, dims);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<uint4*>(out + int64_t(quad * 4 + j) * cols + group * 16) =
          make_uint4(dims[j][0], dims[j][1], dims[j][2], dims[j][3]);
    }
  }
  __syncthreads();
}

template <int kVtKeys>
__global__ void __launch_bounds__(kVtThreads) transpose_v_fp8(FwdParams p, SeqlenArgs seqlen_args, VtLayout l,
                                                              uint8_t* vt, int blocks_per_sequence) {
  // The attention kernel after this one is a programmatic dependent (launch_fwd_sm90.h): let it launch now,
  // so that its set-up overlaps this copy; its griddepcontrol.wait still waits for this grid's completion.
  // Guarded: tools/check_*.cu include this header in host checks compiled for nvcc's default (pre-SM90) target.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  __shared__ VtTile<kVtKeys> tile;
  int const batch = blockIdx.x / blocks_per_sequence;
  int const head = blockIdx.y;
  SeqlenInfo const seqlen(seqlen_args, batch);
  int64_t const slots = round_up_16(seqlen.seqlen_k);  // columns of this sequence's region
  int const chunks_per_row = l.dims / 16;
  bool const packed = p.varlen.cu_seqlens_k != nullptr;
  // The sequence's V: its cache row (batch_k) from its first key (offset_k); paged, through the table.
  bool const paged = is_paged(p);
  int32_t const* table = paged ? p.kv_cache.page_table + int64_t(seqlen.batch_k) * p.kv_cache.page_table_stride : nullptr;
  uint8_t const* v = static_cast<uint8_t const*>(p.v.ptr) + int64_t(head) * p.v.head_stride +
                     (paged ? 0 : (packed ? 0 : int64_t(seqlen.batch_k) * p.v.batch_stride) +
                                  int64_t(seqlen.offset_k) * p.v.row_stride);
  uint8_t* const region = vt + (packed ? 0 : int64_t(batch) * l.batch_stride()) + int64_t(head) * l.head_stride() +
                          VtLayout::first_column(packed, batch, seqlen.offset_k);
  // The grid is sized by the host's max_seqlen_k, but the attention kernel reads every column up to the
  // device-side seqlen_k: each CTA strides over its sequence's blocks, so a sequence longer than an understated
  // max_seqlen_k is still copied whole and no column the kernel reads is left unwritten. With a true bound each
  // CTA copies one block (or none). The loop condition is uniform across the CTA, so its barriers are too.
  for (int64_t key0 = int64_t(blockIdx.x % blocks_per_sequence) * kVtKeys; key0 < slots;
       key0 += int64_t(blocks_per_sequence) * kVtKeys) {
    copy_block<kVtKeys>(p, seqlen.seqlen_k, slots, chunks_per_row, v, region + key0, key0, l.cols, tile, table,
                        seqlen.offset_k);
  }
}

// Launches the copy on `stream` into `vt` (vt_workspace_bytes(p) bytes).
inline cudaError_t launch_transpose_v_fp8(FwdParams const& p, SeqlenArgs const& seqlen_args, void* vt,
                                          cudaStream_t stream) {
  constexpr int kVtKeys = 64;
  VtLayout const l = vt_layout(p);
  // At least one CTA per sequence, even for max_seqlen_k = 0 (the CTAs stride over longer sequences).
  int64_t const longest = round_up_16(max_seqlen_k(p));
  int64_t const blocks_per_sequence = longest > 0 ? (longest + kVtKeys - 1) / kVtKeys : 1;
  if (blocks_per_sequence * p.batch > INT32_MAX || p.num_heads_k > 65535) { return cudaErrorInvalidConfiguration; }
  dim3 const grid(unsigned(blocks_per_sequence * p.batch), unsigned(p.num_heads_k));
  cudaError_t const err = prefer_max_shared_carveout(transpose_v_fp8<kVtKeys>);
  if (err != cudaSuccess) { return err; }
  transpose_v_fp8<kVtKeys><<<grid, kVtThreads, 0, stream>>>(p, seqlen_args, l, static_cast<uint8_t*>(vt),
                                                            int(blocks_per_sequence));
  return cudaGetLastError();
}
#endif

}  // namespace flash3
