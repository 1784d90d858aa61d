// The FP8 V copy's byte-permute transpose (hopper/fp8_vt.h transpose_group_quad) against the definition it
// replaces: column pos of dim j holds byte j of key key_of_position(pos). On the host (tests/test_host_checks.py).
#include <cstdio>
#include <cstdlib>
#include "fp8_vt.h"
using namespace flash3;
int main() {
  srand(7);
  int bad = 0;
  for (int trial = 0; trial < 1000; ++trial) {
    uint32_t key_words[16];
    for (auto& w : key_words) { w = (uint32_t(rand()) << 16) ^ uint32_t(rand()); }
    uint32_t out[4][4];
    transpose_group_quad(key_words, out);
    for (int j = 0; j < 4; ++j) {
      for (int pos = 0; pos < 16; ++pos) {
        uint32_t const want = (key_words[key_of_position(pos)] >> (8 * j)) & 0xff;
        uint32_t const got = (out[j][pos / 4] >> (8 * (pos % 4))) & 0xff;
        if (want != got && bad++ < 5) { printf("MISMATCH trial %d dim %d column %d: %u vs %u\n", trial, j, pos, got, want); }
      }
    }
  }
  if (bad) { printf("%d mismatches\n", bad); return 1; }
  printf("ok: 1000 random groups, every column of 4 dims\n");
}
