"""One paged decode call (bf16 d128 h32/8, 64 x 8192, page size from argv) for Nsight Compute: a few warm-up
calls, then the profiled ones. Usage: ncu --kernel-name regex:fwd_kernel ... python benchmarks/paged_profile.py 16"""
import sys

import torch

import flash_attn3

page = int(sys.argv[1]) if len(sys.argv) > 1 else 16
b, s, h, hk, d = 64, 8192, 32, 8, 128
q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
num_pages = b * s // page
k = torch.randn(num_pages, page, hk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
table = torch.randperm(num_pages, device="cuda").to(torch.int32).view(b, -1)
lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
for _ in range(4):
    flash_attn3.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, causal=True)
torch.cuda.synchronize()
