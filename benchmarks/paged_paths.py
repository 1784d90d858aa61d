"""Paged-KV load paths side by side (issue #9): one decode call (bf16 d 128 h 32/8, one query token, causal,
batch x cache) on a contiguous cache and on paged caches whose page size picks each of the kernel's three
load paths: whole key blocks per page (the decode kernel's 128-key blocks: the producer warp's one TMA box
per block: 128, 256), pages of a multiple of 16 rows (the gather variant's page boxes, 16 x gcd(page / 16,
block / 16) rows by the whole head dim, issued by the KV warp: 16, 32, 64) and any other page size (the KV
warp's cp.async gather: 1, 8, 24; also page 16 with a zero `cache_leftpad`, which takes the gather path for
the same pages the box path reads). Timed by CUDA-graph replay over enough cache copies to exceed 2x L2 (as decode_splits.py);
pages are a random permutation of the pool. Each paged output is compared with the contiguous call's.

    python benchmarks/paged_paths.py [--batch 64] [--cache 8192] [--pages 16,16lp,1,8,24,32,64,128,256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_splits import timed  # noqa: E402  (the same graph-replay timer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=int, default=8192)
    ap.add_argument("--pages", default="16,16lp,1,8,24,32,64,128,256")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    import torch
    import flash_attn3

    torch.manual_seed(0)
    b, s_k, h, h_k, d = args.batch, args.cache, 32, 8, 128
    dt = torch.bfloat16
    kv_bytes = 2 * b * s_k * h_k * d * 2
    n_sets = max(1, int(2 * 60e6 // kv_bytes) + 1)
    lens = torch.full((b,), s_k, device="cuda", dtype=torch.int32)
    q = [torch.randn(b, 1, h, d, device="cuda", dtype=dt) for _ in range(n_sets)]
    k = [torch.randn(b, s_k, h_k, d, device="cuda", dtype=dt) for _ in range(n_sets)]
    v = [torch.randn(b, s_k, h_k, d, device="cuda", dtype=dt) for _ in range(n_sets)]
    ref = [flash_attn3.flash_attn_with_kvcache(q[i], k[i], v[i], cache_seqlens=lens, causal=True)
           for i in range(n_sets)]
    us = timed(torch, lambda i: flash_attn3.flash_attn_with_kvcache(q[i], k[i], v[i], cache_seqlens=lens,
                                                                       causal=True), n_sets, args.rounds)
    print(f"bf16 d{d} h{h}/{h_k} {b} x {s_k}, one query, causal; {n_sets} cache copies; GB/s of K + V")
    print(f"{'layout':>22s} {'path':>8s} {'us':>9s} {'GB/s':>7s} {'/contig':>8s} {'max|diff|':>10s}")
    print(f"{'contiguous':>22s} {'tma':>8s} {us:9.1f} {kv_bytes / us / 1e3:7.0f} {1.0:8.2f} {0.0:10.2e}")
    base = us
    for spec in args.pages.split(","):
        leftpad = spec.endswith("lp")
        ps = int(spec.rstrip("lp"))
        path = "gather" if leftpad or ps % 16 else ("tma" if ps % 128 == 0 else "pagebox")
        pages_per_seq = (s_k + ps - 1) // ps
        kp, vp, tables = [], [], []
        for i in range(n_sets):
            perm = torch.randperm(b * pages_per_seq, device="cuda").to(torch.int32)
            table = perm.view(b, pages_per_seq)
            kc = torch.zeros(b * pages_per_seq, ps, h_k, d, device="cuda", dtype=dt)
            vc = torch.zeros_like(kc)
            # key t of sequence j lives in page table[j, t // ps], slot t % ps
            pad = pages_per_seq * ps - s_k
            kfull = torch.nn.functional.pad(k[i], (0, 0, 0, 0, 0, pad)).view(b, pages_per_seq, ps, h_k, d)
            vfull = torch.nn.functional.pad(v[i], (0, 0, 0, 0, 0, pad)).view(b, pages_per_seq, ps, h_k, d)
            kc[table.long()] = kfull
            vc[table.long()] = vfull
            kp.append(kc)
            vp.append(vc)
            tables.append(table)
        extra = {"cache_leftpad": torch.zeros(b, device="cuda", dtype=torch.int32)} if leftpad else {}

        def call(i, kp=kp, vp=vp, tables=tables, extra=extra):
            return flash_attn3.flash_attn_with_kvcache(q[i], kp[i], vp[i], cache_seqlens=lens, page_table=tables[i],
                                                       causal=True, **extra)

        diff = max((call(i).float() - ref[i].float()).abs().max().item() for i in range(n_sets))
        t = timed(torch, call, n_sets, args.rounds)
        print(f"{'page ' + spec:>22s} {path:>8s} {t:9.1f} {kv_bytes / t / 1e3:7.0f} {base / t:8.2f} {diff:10.2e}")
        del kp, vp, tables
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
