// Host simulation of the quad transpose: lanes q = 0..3 each hold w[q][c] (c = 0..3); after the two
// xor stages lane q must hold A[p][q] at position p.
#include <cstdio>
#include <cstdint>
int main() {
  uint32_t w[4][4], a[4][4];
  for (int q = 0; q < 4; ++q) for (int c = 0; c < 4; ++c) a[q][c] = w[q][c] = q * 10 + c;
  for (int k = 2; k >= 1; k /= 2) {
    uint32_t send[4][2], recv[4][2];
    for (int q = 0; q < 4; ++q) {
      int s = 0;
      for (int c0 = 0; c0 < 4; ++c0) {
        if (c0 & k) continue;
        send[q][s++] = (q & k) ? w[q][c0] : w[q][c0 | k];
      }
    }
    for (int q = 0; q < 4; ++q) for (int s = 0; s < 2; ++s) recv[q][s] = send[q ^ k][s];  // shfl_xor
    for (int q = 0; q < 4; ++q) {
      int s = 0;
      for (int c0 = 0; c0 < 4; ++c0) {
        if (c0 & k) continue;
        if (q & k) w[q][c0] = recv[q][s]; else w[q][c0 | k] = recv[q][s];
        ++s;
      }
    }
  }
  for (int q = 0; q < 4; ++q) for (int p = 0; p < 4; ++p)
    if (w[q][p] != a[p][q]) { printf("FAIL q%d p%d: %u vs %u\n", q, p, w[q][p], a[p][q]); return 1; }
  printf("transpose ok\n");
}
