/* example.c: a C99 program that uses libflash_attn3.so through its C API (flash_attn3.h), as a program in
 * another language would. It runs one packed varlen, GQA, causal fp16 problem (two sequences of odd
 * lengths, one with more keys than queries), compares every output element and LSE with a float64 CPU
 * reference computed from the same fp16 inputs, then makes the same call through the standalone guide's
 * mha_fwd_standalone (flash_api_standalone.h) and checks it gives identical bits. Last, it shows that a broken
 * params struct (a misaligned pointer, a missing row count) comes back as FLASH3_INVALID_ARGUMENT with a
 * message and launches nothing. Built by build_standalone.sh as build_standalone/flash3_example; prints
 * "RESULT: PASS" and exits 0 when every check holds. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "flash_api_standalone.h"
#include "flash_attn3.h"

enum { kBatch = 2, kHeads = 4, kHeadsK = 2, kDim = 64 };
static int const kLenQ[kBatch] = {37, 113};
static int const kLenK[kBatch] = {37, 250};

static int failures = 0;

static void check(int ok, char const* what) {
  printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

static void check_cuda(cudaError_t err, char const* what) {
  if (err != cudaSuccess) {
    fprintf(stderr, "CUDA error in %s: %s\nRESULT: FAIL\n", what, cudaGetErrorString(err));
    exit(1);
  }
}

/* IEEE binary16 <-> float for normal values in (-2, 2), round to nearest even: enough for U(-1, 1) inputs
 * and attention outputs, which are convex combinations of them. */
static uint16_t half_from_float(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  uint32_t const sign = (x >> 16) & 0x8000u;
  int const exp = (int)((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp <= 0) return (uint16_t)sign; /* |f| < 2^-14: flush to zero (inputs here never are) */
  uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
  uint32_t const rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)h;
}

static double half_to_double(uint16_t h) {
  int const exp = (h >> 10) & 0x1f;
  double const mant = (double)(h & 0x3ff);
  double const v = exp == 0 ? ldexp(mant, -24) : ldexp(1024.0 + mant, exp - 25);
  if (exp == 31) return (h & 0x3ff) ? NAN : ((h & 0x8000) ? -INFINITY : INFINITY);
  return (h & 0x8000) ? -v : v;
}

static void fill(uint16_t* p, size_t n, unsigned* state) {
  for (size_t i = 0; i < n; ++i) {
    *state = *state * 1664525u + 1013904223u;
    p[i] = half_from_float((float)((*state >> 8) * (2.0 / 16777216.0) - 1.0));
  }
}

int main(void) {
  int total_q = 0, total_k = 0, cu_q[kBatch + 1] = {0}, cu_k[kBatch + 1] = {0};
  for (int b = 0; b < kBatch; ++b) {
    cu_q[b + 1] = cu_q[b] + kLenQ[b];
    cu_k[b + 1] = cu_k[b] + kLenK[b];
  }
  total_q = cu_q[kBatch];
  total_k = cu_k[kBatch];
  size_t const nq = (size_t)total_q * kHeads * kDim, nk = (size_t)total_k * kHeadsK * kDim;
  size_t const nlse = (size_t)kHeads * total_q;
  uint16_t *hq = malloc(nq * 2), *hk = malloc(nk * 2), *hv = malloc(nk * 2), *ho = malloc(nq * 2),
           *ho2 = malloc(nq * 2);
  float *hlse = malloc(nlse * 4), *hlse2 = malloc(nlse * 4);
  unsigned state = 12345u;
  fill(hq, nq, &state);
  fill(hk, nk, &state);
  fill(hv, nk, &state);

  void *dq, *dk, *dv, *dout, *dlse, *dcu_q, *dcu_k, *dsched;
  check_cuda(cudaMalloc(&dq, nq * 2), "cudaMalloc");
  check_cuda(cudaMalloc(&dk, nk * 2), "cudaMalloc");
  check_cuda(cudaMalloc(&dv, nk * 2), "cudaMalloc");
  check_cuda(cudaMalloc(&dout, nq * 2), "cudaMalloc");
  check_cuda(cudaMalloc(&dlse, nlse * 4), "cudaMalloc");
  check_cuda(cudaMalloc(&dcu_q, sizeof cu_q), "cudaMalloc");
  check_cuda(cudaMalloc(&dcu_k, sizeof cu_k), "cudaMalloc");
  check_cuda(cudaMalloc(&dsched, 1024 * sizeof(int)), "cudaMalloc");
  check_cuda(cudaMemcpy(dq, hq, nq * 2, cudaMemcpyHostToDevice), "copy q");
  check_cuda(cudaMemcpy(dk, hk, nk * 2, cudaMemcpyHostToDevice), "copy k");
  check_cuda(cudaMemcpy(dv, hv, nk * 2, cudaMemcpyHostToDevice), "copy v");
  check_cuda(cudaMemcpy(dcu_q, cu_q, sizeof cu_q, cudaMemcpyHostToDevice), "copy cu_seqlens_q");
  check_cuda(cudaMemcpy(dcu_k, cu_k, sizeof cu_k, cudaMemcpyHostToDevice), "copy cu_seqlens_k");
  check_cuda(cudaMemset(dout, 0xff, nq * 2), "poison out"); /* NaN: an unwritten element fails */
  check_cuda(cudaMemset(dlse, 0xff, nlse * 4), "poison lse");

  /* 1. The struct-based call. Packed (total, heads, dim) operands, contiguous. */
  flash3_fwd_params p = flash3_fwd_params_default();
  p.dtype = p.out_dtype = FLASH3_FLOAT16;
  p.q = (flash3_operand){dq, 0, kHeads * kDim, kDim, total_q};
  p.k = (flash3_operand){dk, 0, kHeadsK * kDim, kDim, total_k};
  p.v = (flash3_operand){dv, 0, kHeadsK * kDim, kDim, total_k};
  p.out = (flash3_operand){dout, 0, kHeads * kDim, kDim, total_q};
  p.lse.ptr = (float*)dlse;
  p.lse.head_stride = total_q;
  p.batch = kBatch;
  p.num_heads = kHeads;
  p.num_heads_k = kHeadsK;
  p.head_dim = p.head_dim_v = kDim;
  p.varlen.cu_seqlens_q = (int32_t const*)dcu_q;
  p.varlen.cu_seqlens_k = (int32_t const*)dcu_k;
  p.varlen.max_seqlen_q = 113;
  p.varlen.max_seqlen_k = 250;
  p.mask.window_right = 0; /* causal, bottom-right aligned */
  p.softmax_scale = 1.0f / sqrtf((float)kDim);
  flash3_status st = flash3_fwd(&p, 0);
  if (st != FLASH3_SUCCESS) printf("flash3_fwd: %s: %s\n", flash3_status_string(st), flash3_last_error());
  check(st == FLASH3_SUCCESS, "flash3_fwd returns FLASH3_SUCCESS");
  check_cuda(cudaDeviceSynchronize(), "flash3_fwd");
  check_cuda(cudaMemcpy(ho, dout, nq * 2, cudaMemcpyDeviceToHost), "copy out");
  check_cuda(cudaMemcpy(hlse, dlse, nlse * 4, cudaMemcpyDeviceToHost), "copy lse");

  /* float64 reference from the same fp16 inputs. */
  double max_err = 0.0, max_lse_err = 0.0;
  int bad = 0;
  double* s = malloc(sizeof(double) * 256);
  for (int b = 0; b < kBatch; ++b) {
    for (int h = 0; h < kHeads; ++h) {
      int const hk_ = h / (kHeads / kHeadsK);
      for (int i = 0; i < kLenQ[b]; ++i) {
        int const last = i + kLenK[b] - kLenQ[b]; /* causal: keys [0, last] */
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j <= last; ++j) {
          double dot = 0.0;
          for (int d = 0; d < kDim; ++d)
            dot += half_to_double(hq[((size_t)(cu_q[b] + i) * kHeads + h) * kDim + d]) *
                   half_to_double(hk[((size_t)(cu_k[b] + j) * kHeadsK + hk_) * kDim + d]);
          s[j] = dot / sqrt((double)kDim);
          if (s[j] > mx) mx = s[j];
        }
        for (int j = 0; j <= last; ++j) sum += exp(s[j] - mx);
        size_t const row = (size_t)(cu_q[b] + i);
        for (int d = 0; d < kDim; ++d) {
          double o = 0.0;
          for (int j = 0; j <= last; ++j)
            o += exp(s[j] - mx) / sum * half_to_double(hv[((size_t)(cu_k[b] + j) * kHeadsK + hk_) * kDim + d]);
          double const got = half_to_double(ho[(row * kHeads + h) * kDim + d]);
          if (!isfinite(got)) ++bad;
          else if (fabs(got - o) > max_err) max_err = fabs(got - o);
        }
        double const lse = mx + log(sum), got_lse = hlse[(size_t)h * total_q + row];
        if (!isfinite(got_lse)) ++bad;
        else if (fabs(got_lse - lse) > max_lse_err) max_lse_err = fabs(got_lse - lse);
      }
    }
  }
  printf("max |out - ref| = %.3e, max |lse - ref| = %.3e, unwritten/non-finite = %d\n", max_err, max_lse_err, bad);
  /* fp16 output: half an ulp at 1 is 4.9e-4, plus P rounded to fp16 before P·V. */
  check(bad == 0 && max_err <= 2e-3 && max_lse_err <= 1e-3, "output and LSE match the float64 reference");

  /* 2. The same problem through the guide's mha_fwd_standalone: identical bits expected. */
  check_cuda(cudaMemset(dout, 0xff, nq * 2), "poison out");
  check_cuda(cudaMemset(dlse, 0xff, nlse * 4), "poison lse");
  st = mha_fwd_standalone(dq, dk, dv, NULL, NULL, NULL, dout, dcu_q, dcu_k, NULL, NULL, NULL, 113, 250, NULL, NULL,
                          NULL, NULL, NULL, NULL, NULL, NULL, NULL, dsched, false, false, kBatch, total_q, kHeads,
                          kDim, kBatch, total_k, kHeadsK, kDim, 0, 0, 0, 0, 0, kHeads * kDim, kDim, 0,
                          kHeadsK * kDim, kDim, 0, kHeadsK * kDim, kDim, 0, kHeads * kDim, kDim, 0, 0, 0, 0, 0, 0, 0,
                          0, 0, 0, 0, 0, 0, 0, 0, 0, -1.0f, true, -1, -1, 0, 0.0f, false, -1, -1, 0, dlse, NULL,
                          NULL, 0);
  if (st != FLASH3_SUCCESS) printf("mha_fwd_standalone: %s: %s\n", flash3_status_string(st), flash3_last_error());
  check(st == FLASH3_SUCCESS, "mha_fwd_standalone returns FLASH3_SUCCESS");
  check_cuda(cudaDeviceSynchronize(), "mha_fwd_standalone");
  check_cuda(cudaMemcpy(ho2, dout, nq * 2, cudaMemcpyDeviceToHost), "copy out");
  check_cuda(cudaMemcpy(hlse2, dlse, nlse * 4, cudaMemcpyDeviceToHost), "copy lse");
  check(memcmp(ho, ho2, nq * 2) == 0 && memcmp(hlse, hlse2, nlse * 4) == 0,
        "mha_fwd_standalone gives the same bits as flash3_fwd");

  /* 3. Broken params come back as a status with a message, and nothing is launched. */
  flash3_fwd_params broken = p;
  broken.q.ptr = (char*)dq + 2; /* not 16-byte aligned: TMA cannot describe it */
  st = flash3_fwd(&broken, 0);
  printf("misaligned q: %s: %s\n", flash3_status_string(st), flash3_last_error());
  check(st == FLASH3_INVALID_ARGUMENT && strstr(flash3_last_error(), "q.ptr") != NULL,
        "a misaligned q pointer gives FLASH3_INVALID_ARGUMENT naming q.ptr");
  broken = p;
  broken.k.rows = 0; /* v still has rows: the two must agree */
  st = flash3_fwd(&broken, 0);
  printf("k.rows != v.rows: %s: %s\n", flash3_status_string(st), flash3_last_error());
  check(st == FLASH3_INVALID_ARGUMENT && strstr(flash3_last_error(), "rows") != NULL,
        "mismatched row counts give FLASH3_INVALID_ARGUMENT");
  st = flash3_fwd(NULL, 0);
  check(st == FLASH3_INVALID_ARGUMENT, "a NULL params pointer gives FLASH3_INVALID_ARGUMENT");
  check(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess,
        "no CUDA error after the rejected calls");

  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  cudaFree(dlse);
  cudaFree(dcu_q);
  cudaFree(dcu_k);
  cudaFree(dsched);
  free(hq);
  free(hk);
  free(hv);
  free(ho);
  free(ho2);
  free(hlse);
  free(hlse2);
  free(s);
  printf("RESULT: %s\n", failures == 0 ? "PASS" : "FAIL");
  return failures == 0 ? 0 : 1;
}
