// Per-tile timeline of the forward kernel, for diagnosis only: compiled in with -DFLASH3_TRACE (never in a
// product build; tools/trace_tiles.py reads what it writes). Without the macro every mark is empty, so the
// kernels are the same as if this file did not exist.
//
// With it, the first thread of each traced role stamps clock64() at fixed points of every tile it works on
// into a device buffer, [CTA][tile of that CTA][event]; the launch (launch_fwd_sm90.h) clears the buffer,
// and after the kernel appends it to the file named by FLASH3_TRACE_FILE. clock64 counts one SM's cycles,
// and a CTA never leaves its SM, so stamps of one CTA compare; stamps of different CTAs do not.
#pragma once

#include <cstdint>

namespace flash3 {

// Events of a tile. Consumer warpgroup w (0 or 1) uses slot w * kWgEvents + event; the producer warp the
// kProducer* slots.
enum TraceEvent : int {
  kTileStart = 0,   // consumer: the tile index read from the mailbox
  kQReady = 1,      // consumer: Q has landed (barrier_q)
  kFirstDone = 2,   // consumer: the first block's S, softmax and P are done
  kLoopDone = 3,    // consumer: every Q K^T of the tile done (QueryEmpty arrived)
  kMmaDone = 4,     // consumer: the last P V and the final rescale done
  kStored = 5,      // consumer: the epilogue's stores issued
  kWgEvents = 6,
  kProducerTile = 12,  // producer: the tile posted to the consumers
  kProducerQ = 13,     // producer: Q issued (after QueryEmpty); with PackGQA the Q warp's gather issued
  kProducerDone = 14,  // producer: every load of the tile issued
  kKernelEntry = 15,   // thread 0 at the kernel's entry, in tile slot 0 (the prologue: tile 0's start minus it)
  kTraceEvents = 16,
};
constexpr int kTraceTiles = 64;  // tiles per CTA that are recorded (the rest are not)
constexpr int kTraceRoles = 4;   // consumer warpgroups 0 and 1, the producer warp, the Q warp (PackGQA)

#ifdef FLASH3_TRACE
// One of each per translation unit: the launch that sets them lives in the same one as its kernels.
static __device__ unsigned long long* g_trace_buf;

// The buffer, or null when this launch is not traced. A volatile read, re-made at each mark, so that the
// pointer does not stay live in a register.
__device__ __forceinline__ unsigned long long* trace_buf() {
  return *const_cast<unsigned long long* volatile*>(&g_trace_buf);
}
// Each role's current tile lives in the buffer too, after the stamps (gridDim.x x kTraceRoles ints), not in
// shared memory: a static __shared__ array pushes the dynamic shared memory of the kernels that use nearly all
// 227 KB (the 3-stage decode tiles) past the limit, and their launch fails (session 18).
__device__ __forceinline__ int* trace_round_slot(unsigned long long* buf, int role) {
  return reinterpret_cast<int*>(buf + int64_t(gridDim.x) * kTraceTiles * kTraceEvents) +
         int64_t(blockIdx.x) * kTraceRoles + role;
}
__device__ __forceinline__ void trace_set_round(int role, int round) {
  if (unsigned long long* const buf = trace_buf()) { *trace_round_slot(buf, role) = round; }
}
__device__ __forceinline__ void trace_mark(int role, int event) {
  unsigned long long* const buf = trace_buf();
  if (buf == nullptr) { return; }
  int const tile = *trace_round_slot(buf, role);  // written by this same thread
  if (tile < kTraceTiles) { buf[(int64_t(blockIdx.x) * kTraceTiles + tile) * kTraceEvents + event] = clock64(); }
}
// Consumer marks: the first thread of warpgroups 0 and 1 (a third one is not traced); producer marks: lane 0.
__device__ __forceinline__ bool trace_leader() { return threadIdx.x % 128 == 0 && threadIdx.x < 3 * 128; }
__device__ __forceinline__ int trace_role() { return threadIdx.x < 128 ? 2 : int(threadIdx.x / 128) - 1; }
#define FLASH3_TRACE_ROUND(r) (::flash3::trace_leader() ? ::flash3::trace_set_round(::flash3::trace_role(), (r)) : void())
#define FLASH3_MARK_WG(offset) \
  (::flash3::trace_leader() && threadIdx.x >= 128 \
       ? ::flash3::trace_mark(::flash3::trace_role(), ::flash3::trace_role() * ::flash3::kWgEvents + (offset)) : void())
#define FLASH3_MARK_PRODUCER(event) (threadIdx.x == 0 ? ::flash3::trace_mark(2, (event)) : void())
// The Q warp (warp 2, PackGQA's gather): lane 0, with a tile count of its own (role 3).
#define FLASH3_TRACE_ROUND_QWARP(r) (threadIdx.x == 64 ? ::flash3::trace_set_round(3, (r)) : void())
#define FLASH3_MARK_QWARP(event) (threadIdx.x == 64 ? ::flash3::trace_mark(3, (event)) : void())
// Before any round is set, so written straight to tile slot 0.
__device__ __forceinline__ void trace_entry() {
  unsigned long long* const buf = trace_buf();
  if (buf != nullptr && threadIdx.x == 0) {
    buf[int64_t(blockIdx.x) * kTraceTiles * kTraceEvents + kKernelEntry] = clock64();
  }
}
#define FLASH3_MARK_ENTRY() ::flash3::trace_entry()
#else
#define FLASH3_TRACE_ROUND(r) ((void)0)
#define FLASH3_MARK_WG(offset) ((void)0)
#define FLASH3_MARK_PRODUCER(event) ((void)0)
#define FLASH3_TRACE_ROUND_QWARP(r) ((void)0)
#define FLASH3_MARK_QWARP(event) ((void)0)
#define FLASH3_MARK_ENTRY() ((void)0)
#endif

}  // namespace flash3
