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
  int rows_k = 0;  // rows of the K / V operands, likewise
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

  __device__ SeqlenInfo(SeqlenArgs const& a, int batch)
      : batch_q(a.cu_seqlens_q ? 0 : batch), batch_k(a.cu_seqlens_k ? 0 : batch) {
    clamp_to_rows(a.cu_seqlens_q, a.seqused_q, a.rows_q, batch, offset_q, seqlen_q);
    clamp_to_rows(a.cu_seqlens_k, a.seqused_k, a.rows_k, batch, offset_k, seqlen_k);
  }

 private:
  // Each bound is clamped on its own, so no sum or difference of untrusted values is formed (nothing near
  // 2^31 can wrap around into range): begin into [0, rows], the end into [begin, rows].
  __device__ static void clamp_to_rows(int32_t const* cu_seqlens, int32_t const* seqused, int rows, int batch,
                                       int& offset, int& seqlen) {
    int const begin = cu_seqlens ? min(max(cu_seqlens[batch], 0), rows) : 0;
    int const room = rows - begin;
    if (seqused) {
      seqlen = min(max(seqused[batch], 0), room);
    } else if (cu_seqlens) {
      seqlen = min(max(cu_seqlens[batch + 1], begin), rows) - begin;
    } else {
      seqlen = rows;
    }
    offset = begin;
  }
};

}  // namespace flash3
