"""One forward call for Nsight Compute, by name: a few warm-up calls, then two profiled ones.

Usage: ncu --kernel-name regex:'fwd_kernel|flash_fwd' ... python benchmarks/profile_case.py CASE [ours|fa3]
Cases (bf16 d128): prefill (b2 s8192 h16 non-causal), prefill_causal (b1 s16384 h16 causal), window256
(b1 s16384 h16, window (256, 0)), short / short_causal (b32 s512 h16: the rows with the largest gap to FA3,
0.71 / 0.68 in session 7, per-tile fixed costs), causal4k (b4 s4096 h16 causal: 0.75), decode1 (1 x 8192: split kernel + combine, 24 us against cuDNN's 16.6), decode (64 x 8192 h32/8 contiguous cache), page16 / page256 (the same cache
paged, pages in random order), page16seq (pages of 16 in order: the memory system's share of page16's gap),
diag_causal / diag (b2 h16, 4096 queries against 16384 keys, bottom-right causal or none: tiles of near-equal
length, so the block loop itself against FA3's, bench_fwd.py's diag grid), case1 / case2 / case4 (the standalone
guide's production cases through flash_attn_varlen_func: FP8 b3 s1680 h16 d80, FP8 b84 s64 h16 d80, whose
calls are two kernels, the V transpose and the attention (NCU_KERNELS="transpose_v_fp8|fwd_kernel|device_kernel"
NCU_COUNT=2), and fp16 1 query x 2048 keys h16/2 d80 causal, split by the heuristic). fa3 = FlashAttention-3 from the fa3-fwd wheel (PYTHONPATH as tools/gpu_check.sh sets it)."""
import sys

import torch

case = sys.argv[1] if len(sys.argv) > 1 else "prefill"
backend = sys.argv[2] if len(sys.argv) > 2 else "ours"
if backend == "fa3":
    import fa3_fwd_interface as lib
else:
    import flash_attn3 as lib

bf16 = torch.bfloat16


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=bf16)


SHAPES = {"prefill": (2, 8192, 16), "short": (32, 512, 16), "short_causal": (32, 512, 16), "causal4k": (4, 4096, 16)}
if case in ("prefill", "prefill_causal", "window256", "short", "short_causal", "causal4k"):
    b, s, h = SHAPES.get(case, (1, 16384, 16))
    q, k, v = rand(b, s, h, 128), rand(b, s, h, 128), rand(b, s, h, 128)
    kw = dict(causal=case not in ("prefill", "short"))
    if case == "window256":
        kw["window_size"] = (256, 0)

    def call():
        return lib.flash_attn_func(q, k, v, **kw)
elif case in ("diag", "diag_causal"):
    q, k, v = rand(2, 4096, 16, 128), rand(2, 16384, 16, 128), rand(2, 16384, 16, 128)

    def call():
        return lib.flash_attn_func(q, k, v, causal=case == "diag_causal")
elif case in ("decode", "decode1", "page16", "page256", "page16seq"):
    b, s, h, hk = (1 if case == "decode1" else 64), 8192, 32, 8
    q = rand(b, 1, h, 128)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    if case in ("decode", "decode1"):
        k, v, table = rand(b, s, hk, 128), rand(b, s, hk, 128), None
    else:
        page = int(case[4:].removesuffix("seq"))
        k, v = rand(b * s // page, page, hk, 128), rand(b * s // page, page, hk, 128)
        order = torch.arange if case.endswith("seq") else torch.randperm
        table = order(b * s // page, device="cuda").to(torch.int32).view(b, -1)

    def call():
        return lib.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, causal=True)
elif case in ("case1", "case2", "case4"):
    b, sq, sk, h, hk = {"case1": (3, 1680, 1680, 16, 16), "case2": (84, 64, 64, 16, 16),
                        "case4": (1, 1, 2048, 16, 2)}[case]
    dtype = torch.float16 if case == "case4" else torch.float8_e4m3fn
    q = torch.randn(b * sq, h, 80, device="cuda").to(dtype)
    k, v = (torch.randn(b * sk, hk, 80, device="cuda").to(dtype) for _ in range(2))
    cu_q = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * sq
    cu_k = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * sk

    # case 4 by the split-KV heuristic (num_splits=0), as the standalone runner runs it; FA3's own default
    # (num_splits=1) is the unsplit 2-CTA call (session 14: 34 us against 20 split).
    def call():
        return lib.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, sk, causal=case == "case4",
                                          num_splits=0 if case == "case4" else 1)
else:
    raise SystemExit(f"unknown case {case!r}")

for _ in range(3):
    call()
torch.cuda.synchronize()
for _ in range(2):
    call()
torch.cuda.synchronize()
