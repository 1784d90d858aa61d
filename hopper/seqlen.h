// Where sequence `batch` lives in the (possibly packed) Q and K/V operands and how long it is.
// Precedence, as in FA3: seqused_* (rows actually used) > cu_seqlens_* difference > the static length.
//
// Memory safety: the metadata lives on the GPU and is never validated on the host (no sync), so it may lie.
// Whatever it says, a sequence is clamped into the rows its operand really has: [offset, offset + seqlen)
// lies inside [0, rows). Every load (the TMA boxes start inside it), every key loop (its trip count follows
// seqlen_k) and every store of O and LSE (predicated on seqlen_q) is therefore bounded by the tensors, and
// valid metadata is left unchanged. The checked mode of the Python layer reports lying metadata as errors.
#pragma once

#include <cstdint>

namespace flash3 {

struct SeqlenArgs {
  int32_t const* cu_seqlens_q = nullptr;
  int32_t const* cu_seqlens_k = nullptr;
  int32_t const* seqused_q = nullptr;
  int32_t const* seqused_k = nullptr;
  int rows_q = 0;  // rows of the Q / O operands: per batch entry (dense: the static length) or packed total
  int rows_k = 0;  // rows of the K / V operands, likewise (paged: the keys a cache row can hold)
  // KV cache (params.h flash3_kv_cache): cache row of each batch entry and its first valid key.
  int32_t const* kv_batch_idx = nullptr;
  int kv_batch_rows = 0;
  int32_t const* leftpad_k = nullptr;
};

struct SeqlenInfo {
  // Where the sequence is in each operand's (rows, d, head, batch) view: a packed operand is one batch entry
  // whose rows from offset on hold the sequence; a dense one has the sequence as batch entry `batch`, from
  // row 0. So every consumer addresses both layouts the same way, with no varlen flag.
  int batch_q;
  int batch_k;
  int offset_q;
  int offset_k;
  int seqlen_q;
  int seqlen_k;

  // With a KV cache, batch_k is the entry's cache row (also its page-table row) and offset_k its first valid
  // key (leftpad) in that row; a cache row outside the cache gives an empty key range, so nothing is read.
  __device__ SeqlenInfo(SeqlenArgs const& a, int batch) : batch_q(a.cu_seqlens_q ? 0 : batch) {
    int row_k = batch;
    bool row_ok = true;
    if (a.kv_batch_idx) {
      row_k = a.kv_batch_idx[batch];
      row_ok = row_k >= 0 && row_k < a.kv_batch_rows;
      row_k = row_ok ? row_k : 0;
    }
    batch_k = a.cu_seqlens_k ? 0 : row_k;
    clamp_to_rows(a.cu_seqlens_q, a.seqused_q, nullptr, a.rows_q, batch, offset_q, seqlen_q);
    clamp_to_rows(a.cu_seqlens_k, a.seqused_k, a.leftpad_k, a.rows_k, batch, offset_k, seqlen_k);
    if (!row_ok) { seqlen_k = 0; }
  }

 private:
  // The length is taken from the metadata as it stands (cu_seqlens[b + 1] - cu_seqlens[b] in 64 bits, so
  // entries near 2^31 cannot wrap around into range); a left padding moves the begin and shortens the
  // length (FA3: seqused counts from index 0, padding included); then the begin is clamped into [0, rows]
  // and the length into the room left after it. Valid metadata passes unchanged.
  __device__ static void clamp_to_rows(int32_t const* cu_seqlens, int32_t const* seqused, int32_t const* leftpad,
                                       int rows, int batch, int& offset, int& seqlen) {
    int64_t const start = cu_seqlens ? cu_seqlens[batch] : 0;
    int64_t const pad = leftpad ? leftpad[batch] : 0;
    int64_t length = seqused ? seqused[batch] : cu_seqlens ? int64_t(cu_seqlens[batch + 1]) - start : rows;
    int64_t begin = start + pad;
    length -= pad;
    begin = begin < 0 ? 0 : (begin > rows ? rows : begin);
    int64_t const room = rows - begin;
    length = length < 0 ? 0 : (length > room ? room : length);
    offset = int(begin);
    seqlen = int(length);
  }
};

}  // namespace flash3
