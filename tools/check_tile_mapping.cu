// The scheduler's tile mapping (FastDivmod, hopper/tile_scheduler.h) against plain division, on the host (tests/test_host_checks.py).
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include "tile_scheduler.h"
using namespace flash3;
template <bool H> TileCoord ref(PersistentScheduler<H> const& s, int idx) {
  int unit, m;
  if (H) {
    int const section_tiles = s.heads_per_section * s.num_m_blocks;
    int const section = idx / section_tiles;
    int const within = idx - section * section_tiles;
    int const units_here = std::min(s.heads_per_section, s.num_splits * s.num_heads * s.batch - section * s.heads_per_section);
    int const m_rank = within / units_here;
    m = s.num_m_blocks - 1 - m_rank;
    unit = section * s.heads_per_section + (within - m_rank * units_here);
  } else { unit = idx / s.num_m_blocks; m = idx - unit * s.num_m_blocks; }
  int const hb = unit / s.num_splits;
  return {m, hb % s.num_heads, hb / s.num_heads, unit - hb * s.num_splits};
}
template <bool H> long check(int trials) {
  long n = 0; srand(H ? 7 : 3);
  for (int t = 0; t < trials; ++t) {
    PersistentScheduler<H> s{1 + rand() % 300, 1 + rand() % 64, 1 + rand() % 40, 1 + (rand() % 3 == 0 ? rand() % 64 : 0), 1, nullptr};
    if (t % 7 == 0) s.num_m_blocks = 1 + rand() % 70000;
    s.heads_per_section = 1 + rand() % int(std::min<long>(s.num_units(), 200));
    if (s.num_tiles() > (1l << 31) - 1) continue;
    s.set_divisors();
    int const total = int(s.num_tiles());
    for (int k = 0; k < 2000; ++k) {
      int idx = k < 1000 ? k % total : rand() % total; if (k == 1999) idx = total - 1;
      TileCoord a = s.tile(idx), b = ref(s, idx);
      if (a.m_block != b.m_block || a.head != b.head || a.batch != b.batch || a.split != b.split) {
        printf("MISMATCH H=%d idx %d: %d %d %d %d vs %d %d %d %d\n", H, idx, a.m_block, a.head, a.batch, a.split, b.m_block, b.head, b.batch, b.split); exit(1); }
      ++n;
    }
  }
  return n;
}
int main() { long a = check<false>(3000), b = check<true>(3000); printf("ok: %ld + %ld tiles match\n", a, b); }
