// The consumers' shared-memory operand views depend on the warpgroup only, not on the thread within it: slicing
// the TiledMMAs by a thread index or by its warpgroup's first thread must give the same view of Q, K and V
// (same first element, same layout), so that the descriptors can be built from the warpgroup index, which the
// compiler keeps in uniform registers (benchmarks/experiments/wg_uniform_desc.patch). On the host, for the
// kernel keys of every dtype and head dim (tests/test_host_checks.py).
#include <cstdio>
#include "mainloop_fwd_sm90.h"
using namespace flash3;

template <class ML>
int check(char const* name) {
  using E = typename ML::Element;
  E* base = reinterpret_cast<E*>(uintptr_t(1) << 20);  // views only: never dereferenced
  auto sQ = make_tensor(make_smem_ptr(base), typename ML::SmemLayoutQ{});
  auto sK = make_tensor(make_smem_ptr(base), typename ML::SmemLayoutKV{});
  auto sVt = make_tensor(make_smem_ptr(base), typename ML::SmemLayoutVt{});
  typename ML::TiledMmaQK qk;
  typename ML::TiledMmaPV pv;
  int bad = 0;
  for (int t = 0; t < ML::kNumMmaThreads; ++t) {
    int const w = t / kWarpGroupThreads * kWarpGroupThreads;
    auto a = qk.get_slice(t).partition_A(sQ), a0 = qk.get_slice(w).partition_A(sQ);
    auto b = qk.get_slice(t).partition_B(sK), b0 = qk.get_slice(w).partition_B(sK);
    auto v = pv.get_slice(t).partition_B(sVt), v0 = pv.get_slice(w).partition_B(sVt);
    bool const same = a.data() == a0.data() && a.layout() == a0.layout() && b.data() == b0.data() &&
                      b.layout() == b0.layout() && v.data() == v0.data() && v.layout() == v0.layout();
    bad += !same;
  }
  // The check can fail: the warpgroups' Q views differ (each takes its own 64 rows).
  bool const distinct = ML::kNumConsumerWarpGroups < 2 ||
                        qk.get_slice(0).partition_A(sQ).data() != qk.get_slice(kWarpGroupThreads).partition_A(sQ).data();
  std::printf("%-28s %d threads, %d differ from their warpgroup's first; warpgroups distinct: %s\n", name,
              ML::kNumMmaThreads, bad, distinct ? "yes" : "NO");
  return bad + !distinct;
}

int main() {
  using bf16 = cutlass::bfloat16_t;
  using fp8 = cutlass::float_e4m3_t;
  int bad = 0;
  bad += check<MainloopFwdSm90<bf16, 128, 128, 128, 176, 2, MaskKind::kNone>>("bf16 d128 128x176");
  bad += check<MainloopFwdSm90<bf16, 128, 128, 128, 128, 2, MaskKind::kCausal>>("bf16 d128 128x128 causal");
  bad += check<MainloopFwdSm90<bf16, 64, 64, 192, 128, 2, MaskKind::kNone>>("bf16 d64 192x128");
  bad += check<MainloopFwdSm90<bf16, 256, 256, 128, 80, 2, MaskKind::kCausal>>("bf16 d256 128x80");
  bad += check<MainloopFwdSm90<cutlass::half_t, 192, 128, 128, 128, 2, MaskKind::kNone>>("fp16 d192/128");
  bad += check<MainloopFwdSm90<bf16, 128, 128, 128, 128, 2, MaskKind::kCausal,
                               ScaledScores<false, true>, true>>("bf16 d128 gather");
  bad += check<MainloopFwdSm90<fp8, 128, 128, 128, 224, 3, MaskKind::kNone>>("fp8 d128 128x224");
  bad += check<MainloopFwdSm90<fp8, 64, 64, 192, 128, 2, MaskKind::kNone>>("fp8 d64 192x128");
  std::printf(bad ? "FAIL\n" : "OK\n");
  return bad ? 1 : 0;
}
