"""Forward-attention benchmark: flash_attn3 against cuDNN and FlashAttention-2 (both through torch SDPA), and
FlashAttention-3 itself when `flash_attn_interface` is importable, in one run on one GPU.

Conventions follow FlashAttention-3's hopper/benchmark_attn.py (shared/research/fa3.md section 6.1):
FLOPs = 2·b·h·s_q·avg_s_k·(d + d_v) with avg_s_k = s_k, or (max(0, s_k - s_q) + s_k) / 2 when causal;
TFLOPS = FLOPs / median time. Each case cycles through enough input sets to exceed twice the L2 cache, so
no call finds its inputs in L2. A case whose call takes under ~50 us is timed by replaying a CUDA graph of
those calls (launch overhead would otherwise dominate); longer ones by CUDA events around rounds of calls
enqueued back to back (so that the host's time per call is not counted as the GPU's).

Grids: `paper` (b·s = 16k tokens, hidden 2048 so h = 2048/d, d in {64, 128, 256}, causal and not, s from 512
to 16k, in the --dtype: bf16, fp16 or fp8), `headline` (d 128, b 2, s 8192, h 16: bf16 non-causal, fp8
non-causal and causal; and fp8 d 256, b 1, s 16384, h 8 non-causal, the FP8 headline of the FA3 paper),
`production` (the four cases of the standalone guide, run through the varlen API), `decode` (serving calls
through flash_attn_with_kvcache with an int32 cache_seqlens tensor holding the full cache length, causal as
vLLM calls it: bf16 d 128 h 32/8 one query token against a cache of batch x cache_len in {1x8k, 8x8k, 64x8k,
128x2k, 16x32k}; the fp16 d 80 h 16/2 1 x 2048 decode of the standalone guide; and a bf16 d 128 h 32/8 chunked
prefill of 4 x 512 new queries against 8192 cached keys), `all` (paper in the --dtype, headline, production,
decode). A kernel that is not built prints "not built". Production and decode rows are always timed by CUDA-
graph replay, as serving engines run them.

Decode rows (one query token) are bound by reading the cache, so they report bandwidth instead of TFLOPS:
GB/s = bytes of K and V read (b·s_k·h_k·(d + d_v)·element size) / median time, 1 GB = 1e9 bytes; the table
shows GB/s and us, the CSV carries it in the `gbps` column (empty on other rows) beside the usual tflops. The
chunked-prefill row reports TFLOPS with the bottom-right causal count above. For SDPA the cache is the (b,
s_k, h_k, d) tensor transposed (it is full, so no masking by length); one query row needs no causal mask, and
the chunked prefill passes cuDNN a prebuilt bottom-right boolean mask and FA2 torch's causal_lower_right bias
(which FA2 runs natively as its own bottom-right causal). max|diff| compares flash_attn3 with SDPA (cuDNN,
else FA2), or with FA3 where neither ran ("fa3:" prefix).

FP8 rows: q, k, v are bfloat16 randn quantised to float8_e4m3fn, descales None (= 1), output bfloat16; the
FLOPs are counted as for 16-bit (FA3's benchmark_flash_attention_fp8.py: 4·b·s²·h·d, halved when causal, the
same number). Backends: flash_attn3 and FA3 on the same fp8 tensors; cuDNN only if torch SDPA's cuDNN
backend accepts fp8 inputs (probed once; torch has not exposed cuDNN's fp8 attention so far, so it shows n/a);
FA2 has no fp8 (n/a). The max|diff| column then compares flash_attn3 with FA3 ("fa3:" prefix; CSV note).

Writes an aligned table to stdout, a CSV (default benchmarks/results/fwd_<date>_<device>.csv) and, with
--plot, a PNG of the paper grid.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_CASE_MS = 0.05  # below this, time by CUDA-graph replay
GRAPH_GROUPS = ("production", "decode")  # serving calls, which engines replay from CUDA graphs: always so timed
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
PAPER_TOKENS, PAPER_HIDDEN = 16384, 2048
BACKENDS = ("flash_attn3", "cudnn", "fa2", "fa3")


@dataclass(frozen=True)
class Case:
    group: str
    dtype: str  # "bf16", "fp16", "fp8"
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    heads_k: int
    head_dim: int
    causal: bool
    varlen: bool = False
    kvcache: bool = False  # through flash_attn_with_kvcache: k, v are the cache, cache_seqlens = seqlen_k
    page_size: int = 0  # kvcache rows: > 0 = the cache in pages of this size through a shuffled page table
    # With page_size: "random" pages (a shuffled table, as serving caches end up) or "sequential" ones (page j
    # of sequence i at i * pages + j): the same kernel and work, so a gap between the two is the memory
    # system's (address translation, DRAM locality), not the kernel's.
    page_order: str = "random"
    append: bool = False  # kvcache rows: the last token is appended in the call (k=, v=) with rotary on q and k
    window: tuple = (-1, -1)  # sliding window (left, right); with causal the right side is 0
    softcap: float = 0.0
    head_dim_v: int = 0  # v's head dim; 0 = head_dim (DeepSeek's MLA prefill: 192 / 128)
    chunk: int = 0  # attention_chunk (Llama 4's chunked attention); 0 = off

    @property
    def dv(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def reports_gbps(self) -> bool:
        """Decode (one query token against a cache): memory bound, so the table shows GB/s."""
        return self.kvcache and self.seqlen_q == 1

    @property
    def label(self) -> str:
        heads = f"{self.heads}" if self.heads == self.heads_k else f"{self.heads}/{self.heads_k}"
        seq = f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"{self.seqlen_q}x{self.seqlen_k}"
        dims = f"{self.head_dim}" if self.dv == self.head_dim else f"{self.head_dim}/{self.dv}"
        return (f"{self.group[:4]} {self.dtype} b{self.batch} s{seq} h{heads} d{dims}"
                f"{' causal' if self.causal else ''}{' varlen' if self.varlen else ''}"
                f"{' kvcache' if self.kvcache else ''}{f' page{self.page_size}' if self.page_size else ''}"
                f"{' seqpages' if self.page_size and self.page_order == 'sequential' else ''}"
                f"{' append+rotary' if self.append else ''}"
                f"{f' window{self.window[0]}' if self.window != (-1, -1) else ''}"
                f"{f' softcap{self.softcap:g}' if self.softcap else ''}{f' chunk{self.chunk}' if self.chunk else ''}")

    def flops(self) -> float:
        avg_sk = (max(0, self.seqlen_k - self.seqlen_q) + self.seqlen_k) / 2 if self.causal else self.seqlen_k
        left = self.window[0]
        if left >= 0 and self.causal and self.seqlen_q == self.seqlen_k:  # query i sees min(i, left) + 1 keys
            s, w = self.seqlen_q, min(left + 1, self.seqlen_q)
            avg_sk = (w * (w + 1) / 2 + (s - w) * w) / s
        if self.chunk and self.causal and self.seqlen_q == self.seqlen_k:  # causal inside each chunk
            s, c = self.seqlen_q, self.chunk
            full, rest = divmod(s, c)
            avg_sk = (full * c * (c + 1) / 2 + rest * (rest + 1) / 2) / s
        # FA3's convention: 2 flops per multiply-add in Q K^T (d) and P V (dv)
        return 2.0 * self.batch * self.heads * self.seqlen_q * avg_sk * (self.head_dim + self.dv)

    def kv_bytes(self) -> int:
        """Bytes of K and V a forward reads once: every cached key and value of every KV head."""
        elem = 1 if self.dtype == "fp8" else 2
        return self.batch * self.seqlen_k * self.heads_k * (self.head_dim + self.dv) * elem

    def gbps(self, ms: float) -> float:
        return self.kv_bytes() / (ms * 1e-3) / 1e9


def build_cases(grid: str, dtype: str, quick: bool) -> list[Case]:
    cases = []
    if grid in ("paper", "all"):
        seqlens = (1024, 8192) if quick else PAPER_SEQLENS
        hdims = (128,) if quick else (64, 128, 256)
        for d in hdims:
            for causal in (False, True):
                for s in seqlens:
                    h = PAPER_HIDDEN // d
                    cases.append(Case("paper", dtype, PAPER_TOKENS // s, s, s, h, h, d, causal))
    if grid in ("headline", "all"):
        cases += [
            Case("headline", "bf16", 2, 8192, 8192, 16, 16, 128, False),
            Case("headline", "fp8", 2, 8192, 8192, 16, 16, 128, False),
            Case("headline", "fp8", 2, 8192, 8192, 16, 16, 128, True),
            Case("headline", "fp8", 1, 16384, 16384, 8, 8, 256, False),
        ]
    if grid in ("production", "all"):
        cases += [
            Case("production", "fp8", 3, 1680, 1680, 16, 16, 80, False, varlen=True),
            Case("production", "fp8", 84, 64, 64, 16, 16, 80, False, varlen=True),
            Case("production", "fp16", 1, 1285, 1285, 16, 2, 80, True, varlen=True),
            Case("production", "fp16", 1, 1, 2048, 16, 2, 80, True, varlen=True),
        ]
    if grid in ("features", "all"):
        # Issue #10's rows: a window's cost follows the window (256 over 16k keys against full causal), the
        # sliding-window case of the issue (4096 over 32k, h 32/8), softcap on / off.
        cases += [Case("features", "bf16", 1, 16384, 16384, 16, 16, 128, True),
                  Case("features", "bf16", 1, 16384, 16384, 16, 16, 128, True, window=(256, 0)),
                  Case("features", "bf16", 1, 32768, 32768, 32, 8, 128, True),
                  Case("features", "bf16", 1, 32768, 32768, 32, 8, 128, True, window=(4096, 0)),
                  Case("features", "bf16", 2, 8192, 8192, 16, 16, 128, False),
                  Case("features", "bf16", 2, 8192, 8192, 16, 16, 128, False, softcap=30.0),
                  Case("features", "bf16", 2, 8192, 8192, 16, 16, 128, True, softcap=30.0),
                  # Head dims of today's models: d 256 (Gemma; FA3 738 / 717 TFLOPS non-causal / causal on
                  # H100), DeepSeek-V3's MLA prefill (d 192, dv 128), Llama 4's chunks of 8192 against causal.
                  Case("features", "bf16", 1, 16384, 16384, 8, 8, 256, False),
                  Case("features", "bf16", 1, 16384, 16384, 8, 8, 256, True),
                  Case("features", "bf16", 2, 8192, 8192, 16, 16, 192, False, head_dim_v=128),
                  Case("features", "bf16", 2, 8192, 8192, 16, 16, 192, True, head_dim_v=128),
                  Case("features", "bf16", 1, 32768, 32768, 32, 8, 128, True, chunk=8192)]
    if grid == "diag":  # diagnostics, not in "all"
        # Causal with s_q << s_k (bottom-right aligned): every tile sees 97-128 key blocks with one masked, so
        # the tiles cost nearly the same and the schedule hardly matters; ours / FA3 here is the causal
        # block loop's own ratio, to set beside the square rows' (where tile lengths vary 1..s/128).
        cases += [Case("diag", "bf16", 2, 4096, 16384, 16, 16, 128, causal) for causal in (True, False)]
        # Chunked prefill (a chunk of new queries against a long cached context, h 32/8): the causal length
        # rule's (tile_config.h causal_narrow) other side.
        cases += [Case("diag", "bf16", b, sq, 8192, 32, 8, 128, True) for b, sq in ((8, 256), (4, 512), (2, 1024))]
    if grid in ("decode", "all"):
        cases += [Case("decode", "bf16", b, 1, s, 32, 8, 128, True, kvcache=True)
                  for b, s in ((1, 8192), (8, 8192), (64, 8192), (128, 2048), (16, 32768))]
        cases += [
            Case("decode", "fp16", 1, 1, 2048, 16, 2, 80, True, kvcache=True),  # case 4 of the guide
            Case("decode", "bf16", 4, 512, 8192, 32, 8, 128, True, kvcache=True),  # chunked prefill
        ]
        # Paged KV (vLLM's page size 16, a TMA-sized 256, SGLang's 1): compare with the contiguous 64 x 8192 row.
        cases += [Case("decode", "bf16", 64, 1, 8192, 32, 8, 128, True, kvcache=True, page_size=ps) for ps in (16, 256)]
        cases += [Case("decode", "bf16", 64, 1, 8192, 32, 8, 128, True, kvcache=True, page_size=16,
                       page_order="sequential")]
        cases += [Case("decode", "bf16", 1, 1, 8192, 32, 8, 128, True, kvcache=True, page_size=16)]
        # KV append of the step's token with rotary (GPT-NeoX, full head dim): compare with the rows above.
        cases += [Case("decode", "bf16", b, 1, 8192, 32, 8, 128, True, kvcache=True, append=True) for b in (1, 64)]
    return cases


class NotBuilt(Exception):
    pass


class Unsupported(Exception):
    pass


def make_backends(torch):
    """name -> factory(case, q, k, v, cu_q, cu_k) returning a no-argument callable that runs one forward.
    For kvcache cases k and v are the caches (b, s_k, h_k, d), all s_k positions valid."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def append_args(case, q, k):
        """k=, v= of one new token per sequence at position seqlen_k - 1, with rotary tables for every position;
        the call's cache_seqlens is then seqlen_k - 1, so it attends over seqlen_k keys like the plain row."""
        d = case.head_dim
        # One seed for every backend: each builds its own tables and new token, and the max|diff| column
        # compares their outputs, so the inputs must be the same.
        gen = torch.Generator(device=q.device).manual_seed(1234)
        angle = torch.rand(case.seqlen_k, d // 2, device=q.device, generator=gen) * 6.28
        new = torch.randn(case.batch, 1, case.heads_k, d, device=q.device, generator=gen).to(q.dtype)
        seqlens = torch.full((case.batch,), case.seqlen_k - 1, dtype=torch.int32, device=q.device)
        return seqlens, dict(k=new, v=new.clone(), rotary_cos=angle.cos().to(q.dtype),
                             rotary_sin=angle.sin().to(q.dtype), rotary_interleaved=False)

    def full_cache_seqlens(case, q):
        # Built with the callable, outside the timed region: the int32 (batch,) tensor a serving engine keeps.
        return torch.full((case.batch,), case.seqlen_k, dtype=torch.int32, device=q.device)

    def ours(case, q, k, v, cu_q, cu_k):
        import flash_attn3

        if case.kvcache and case.append:
            seqlens, extra = append_args(case, q, k)
            return lambda: flash_attn3.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, causal=case.causal,
                                                               **extra)
        if case.kvcache:
            seqlens = full_cache_seqlens(case, q)
            if case.page_size:
                # The same keys in pages placed in random order: page table[i, j] holds keys
                # [j * page_size, (j + 1) * page_size) of sequence i, so the result equals the contiguous call.
                ps = case.page_size
                num_pages = case.batch * case.seqlen_k // ps
                order = (torch.arange(num_pages, device=q.device) if case.page_order == "sequential"
                         else torch.randperm(num_pages, device=q.device))
                table = order.to(torch.int32).view(case.batch, -1)
                kp, vp = (torch.empty(num_pages, ps, *t.shape[2:], dtype=t.dtype, device=t.device) for t in (k, v))
                for dst, src in ((kp, k), (vp, v)):
                    dst[table.flatten().long()] = src.reshape(num_pages, ps, *src.shape[2:])
                return lambda: flash_attn3.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, page_table=table,
                                                                   causal=case.causal)
            return lambda: flash_attn3.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, causal=case.causal)
        if case.varlen:
            qp, kp, vp = (t.flatten(0, 1) for t in (q, k, v))
            return lambda: flash_attn3.flash_attn_varlen_func(
                qp, kp, vp, cu_q, cu_k, case.seqlen_q, case.seqlen_k, causal=case.causal)
        if case.window != (-1, -1) or case.softcap or case.chunk:
            return lambda: flash_attn3.flash_attn_func(q, k, v, causal=case.causal, window_size=case.window,
                                                       softcap=case.softcap, attention_chunk=case.chunk)
        return lambda: flash_attn3.flash_attn_func(q, k, v, causal=case.causal)

    def fa3(case, q, k, v, cu_q, cu_k):
        if case.page_size:
            raise Unsupported("the fa3-fwd wheel is built without paged KV")
        # FA3 proper (flash_attn_interface), or its PyPI forward-only build fa3-fwd, whose module is the same
        # interface under another name (it needs a flash_attn_config.py beside it: tools/gpu_check.sh adds one).
        try:
            import flash_attn_interface
        except ImportError:
            try:
                import fa3_fwd_interface as flash_attn_interface
            except ImportError as e:
                raise Unsupported("neither flash_attn_interface nor fa3_fwd_interface is installed") from e
        if case.kvcache and case.append:
            seqlens, extra = append_args(case, q, k)
            return lambda: flash_attn_interface.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                                        causal=case.causal, **extra)
        if case.kvcache:
            seqlens = full_cache_seqlens(case, q)
            return lambda: flash_attn_interface.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                                        causal=case.causal)
        if case.varlen:
            qp, kp, vp = (t.flatten(0, 1) for t in (q, k, v))
            return lambda: flash_attn_interface.flash_attn_varlen_func(
                qp, kp, vp, cu_q, cu_k, case.seqlen_q, case.seqlen_k, causal=case.causal)
        if case.window != (-1, -1) or case.chunk:
            raise Unsupported("the fa3-fwd wheel is built without local attention (windows, chunks)")
        if case.softcap:
            return lambda: flash_attn_interface.flash_attn_func(q, k, v, causal=case.causal, softcap=case.softcap)
        return lambda: flash_attn_interface.flash_attn_func(q, k, v, causal=case.causal)

    fp8_probe = {}  # backend -> None (SDPA ran fp8 inputs) or the reason it did not
    causal_masks = {}  # (s_q, s_k, device) -> bottom-right causal boolean mask, shared by the input sets

    def bottom_right_mask(case, device):
        key = (case.seqlen_q, case.seqlen_k, str(device))
        if key not in causal_masks:
            ones = torch.ones(case.seqlen_q, case.seqlen_k, dtype=torch.bool, device=device)
            causal_masks[key] = ones.tril(case.seqlen_k - case.seqlen_q)  # query i sees keys <= i + s_k - s_q
        return causal_masks[key]

    def sdpa_fp8_unsupported(backend):
        """Whether torch SDPA's `backend` takes float8_e4m3fn inputs, from one tiny call (cached)."""
        if backend not in fp8_probe:
            x = torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(x, x, x)
                torch.cuda.synchronize()
                fp8_probe[backend] = None
            except Exception as e:
                torch.cuda.synchronize()
                msg = re.sub(r"\s+", " ", str(e)).strip()
                fp8_probe[backend] = f"torch SDPA takes no fp8 ({type(e).__name__}: {msg[:60]})"
        return fp8_probe[backend]

    def sdpa(backend):
        def factory(case, q, k, v, cu_q, cu_k):
            if case.page_size or case.append:
                raise Unsupported("torch SDPA has no paged KV or KV append")
            if case.window != (-1, -1) or case.softcap or case.chunk:
                raise Unsupported("torch SDPA has no sliding window, chunks or softcap (a dense mask would be timed)")
            if case.dtype == "fp8":
                if backend != SDPBackend.CUDNN_ATTENTION:
                    raise Unsupported("no fp8 in FlashAttention-2")
                reason = sdpa_fp8_unsupported(backend)
                if reason is not None:
                    raise Unsupported(reason)
            # SDPA wants (b, h, s, d): transposed views, no copies (a kvcache case's cache is full, so it is
            # plain k, v). Its is_causal is top-left aligned; FA's is bottom-right, which for one query row
            # (decode) means no mask, and otherwise needs a bias. FA2 takes torch's causal_lower_right, which it
            # runs as its own (bottom-right) causal; for cuDNN that bias would rebuild a dense mask inside every
            # timed call, so cuDNN gets the same boolean mask built once here.
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            mask, is_causal = None, case.causal
            if case.causal and case.seqlen_q != case.seqlen_k:
                is_causal = False
                if case.seqlen_q > 1 and backend == SDPBackend.CUDNN_ATTENTION:
                    mask = bottom_right_mask(case, q.device)
                elif case.seqlen_q > 1:
                    from torch.nn.attention.bias import causal_lower_right
                    mask = causal_lower_right(case.seqlen_q, case.seqlen_k)
            gqa = case.heads != case.heads_k

            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal,
                                                          enable_gqa=gqa)
            return run
        return factory

    return {"flash_attn3": ours, "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "fa2": sdpa(SDPBackend.FLASH_ATTENTION), "fa3": fa3}


def make_inputs(torch, case: Case, device):
    """One input set: q (b, s_q, h, d), k and v (b, s_k, h_k, d), and the cu_seqlens of equal lengths."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}[case.dtype]
    q = torch.randn(case.batch, case.seqlen_q, case.heads, case.head_dim, device=device, dtype=dt)
    k = torch.randn(case.batch, case.seqlen_k, case.heads_k, case.head_dim, device=device, dtype=dt)
    v = torch.randn(case.batch, case.seqlen_k, case.heads_k, case.dv, device=device, dtype=dt)
    if case.dtype == "fp8":
        q, k, v = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    ar = torch.arange(case.batch + 1, device=device, dtype=torch.int32)
    return q, k, v, ar * case.seqlen_q, ar * case.seqlen_k


EAGER_CALLS_PER_ROUND = 4  # at least this many calls back to back per timed round


def time_eager(torch, fns, iters: int) -> float:
    """Median over `iters` rounds of the per-call time; a round enqueues the input sets' calls back to back
    (at least EAGER_CALLS_PER_ROUND, cycling), so that the host's time between calls overlaps the GPU's
    work instead of being counted as the GPU's (events around a single call measure the Python call too: the
    window-256 row read 355 us that way and 243 us this way, 2026-12-01). The sets together exceed
    twice the L2, so calls still find their inputs in HBM."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = max(len(fns), EAGER_CALLS_PER_ROUND)
    times = []
    for _ in range(iters):
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    return statistics.median(times)


def time_graph(torch, fns, iters: int) -> float:
    """Median over `iters` replays of one CUDA graph that calls each input set once; per-call time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as graph capture requires
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / len(fns))
    return statistics.median(times)


def bench_case(torch, case: Case, backends: dict, iters: int, l2_bytes: int):
    """Returns {backend: (status, ms, tflops, note)}, the max |flash_attn3 - reference| if both ran, and the
    reference's name: SDPA (cuDNN, else FA2), or for fp8 and kvcache rows without an SDPA result, FA3."""
    device = torch.device("cuda")
    elem = 1 if case.dtype == "fp8" else 2
    set_bytes = elem * (case.head_dim + case.dv) * (case.batch * case.seqlen_q * case.heads
                                                    + case.batch * case.seqlen_k * case.heads_k)
    # Sets add up to at most 2·L2 + one set, so memory stays bounded: the largest decode set (64 x 8192 or
    # 16 x 32768 cached tokens, h_k 8, d 128) is 2 GiB of K and V and runs alone.
    n_sets = max(1, min(64, math.ceil(2 * l2_bytes / set_bytes)))
    sets = [make_inputs(torch, case, device) for _ in range(n_sets)]
    results, outputs = {}, {}
    for name, factory in backends.items():
        try:
            try:
                fns = [factory(case, *s) for s in sets]
                out = fns[0]()  # first call: compile/plan, and catch "not built" before timing
            except NotImplementedError as e:
                raise NotBuilt(str(e)) from e
            torch.cuda.synchronize()
            outputs[name] = out[0] if isinstance(out, tuple) else out
            for f in fns[:3]:
                f()
            first = time_eager(torch, fns[:1], 3)
            note = ""
            if first < SMALL_CASE_MS or case.group in GRAPH_GROUPS:
                try:
                    ms = time_graph(torch, fns, iters)
                    note = f"graph x{n_sets}"
                except Exception as e:  # a backend that cannot be captured is timed eagerly
                    torch.cuda.synchronize()
                    ms = time_eager(torch, fns, iters)
                    note = f"eager (graph capture failed: {type(e).__name__})"
            else:
                ms = time_eager(torch, fns, iters)
            results[name] = ("ok", ms, case.flops() / (ms * 1e-3) / 1e12, note)
        except NotBuilt:
            results[name] = ("not built", None, None, "")
        except Unsupported as e:
            results[name] = ("n/a", None, None, str(e))
        except Exception as e:
            msg = re.sub(r"\s+", " ", str(e)).strip()
            results[name] = ("error", None, None, f"{type(e).__name__}: {msg[:100]}")
            torch.cuda.synchronize()
    diff, diff_ref = None, None
    ours = outputs.get("flash_attn3")
    ref = outputs.get("cudnn", outputs.get("fa2"))
    if ref is not None:
        ref, diff_ref = ref.transpose(1, 2), "sdpa"  # back to (b, s, h, d)
    elif (case.dtype == "fp8" or case.kvcache or case.group == "diag") and outputs.get("fa3") is not None:
        ref, diff_ref = outputs["fa3"], "fa3"  # FA3's layout is ours: (b, s, h, d) or packed (b·s, h, d)
    if ours is not None and ref is not None:
        diff = (ours.float().reshape(ref.shape) - ref.float()).abs().max().item()
    del sets, outputs
    return results, diff, diff_ref


def device_tag(torch) -> str:
    name = torch.cuda.get_device_name().replace("NVIDIA", "").strip()
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "gpu"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"csv: {path}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_plot(path: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib not installed, no plot written")
        return
    paper = [r for r in rows if r["group"] == "paper" and r["status"] == "ok"]
    panels = sorted({(int(r["head_dim"]), r["causal"] == "True") for r in paper})
    if not panels:
        print("--plot: no paper-grid results to plot")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    # One colour per backend in every panel: panels where a backend has no rows must not shift the others.
    colors = {b: plt.get_cmap("tab10")(i) for i, b in enumerate(BACKENDS)}
    for ax, (d, causal) in zip(axes[0], panels):
        for backend in BACKENDS:
            pts = sorted((int(r["seqlen_q"]), float(r["tflops"])) for r in paper
                         if r["backend"] == backend and int(r["head_dim"]) == d and (r["causal"] == "True") == causal)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend, color=colors[backend])
        ax.set_xscale("log", base=2)
        ax.set_title(f"d={d}{' causal' if causal else ''}")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOPS")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"forward, {paper[0]['dtype']}, {paper[0]['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="all",
                    help="paper, headline, production, decode, features or all; several joined by commas; "
                         "diag (not in all: causal with s_q < s_k, for flash_attn3 and fa3 only, as SDPA's causal "
                         "is top-left there)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp8"), default="bf16",
                    help="dtype of the paper grid (fp8: float8_e4m3fn inputs, bfloat16 output)")
    ap.add_argument("--hdim", help="comma-separated head dims to keep, e.g. 64,128 (default: all)")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    ap.add_argument("--iters", type=int, default=30, help="timed rounds per case and backend")
    ap.add_argument("--quick", action="store_true", help="d 128 and s in {1k, 8k} only, 10 rounds")
    ap.add_argument("--csv", type=Path, help="CSV path (default: benchmarks/results/fwd_<date>_<device>.csv)")
    ap.add_argument("--plot", type=Path, help="write a PNG of the paper grid here (needs matplotlib)")
    ap.add_argument("--replot", type=Path, metavar="CSV",
                    help="no GPU needed: redraw --plot from an earlier run's CSV and exit")
    args = ap.parse_args()

    if args.replot:
        write_plot(args.plot or args.replot.with_suffix(".png"), read_csv(args.replot))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench_fwd: a CUDA GPU is required", file=sys.stderr)
        return 1
    grids = [g.strip() for g in args.grid.split(",") if g.strip()]
    unknown = set(grids) - {"paper", "headline", "production", "decode", "features", "diag", "all"}
    if unknown:
        ap.error(f"--grid: unknown grid(s) {sorted(unknown)}")
    cases = [c for g in grids for c in build_cases(g, args.dtype, args.quick)]
    if args.hdim:
        keep = {int(x) for x in args.hdim.split(",")}
        cases = [c for c in cases if c.head_dim in keep]
    if args.causal != "both":
        cases = [c for c in cases if c.causal == (args.causal == "yes")]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(wanted) - set(BACKENDS)
    if unknown or not cases:
        print(f"bench_fwd: unknown backend(s) {sorted(unknown)}" if unknown else "bench_fwd: no case selected",
              file=sys.stderr)
        return 2
    backends = {k: v for k, v in make_backends(torch).items() if k in wanted}
    iters = 10 if args.quick else args.iters

    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    date = datetime.date.today().isoformat()
    dev = device_tag(torch)
    csv_path = args.csv or RESULTS / f"fwd_{date}_{dev}.csv"
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"L2 {l2_bytes >> 20} MB | {len(cases)} cases | median of {iters} rounds")

    width = max(len(c.label) for c in cases)
    head = f"{'case':<{width}}" + "".join(f" | {b:>20}" for b in backends) + " | max|diff|"
    print(head)
    print("-" * len(head))
    rows = []
    progress = sys.stderr.isatty()  # a progress line on a terminal only, so logs and CSVs stay clean
    started = time.perf_counter()
    for i, case in enumerate(cases):
        if progress:
            elapsed = time.perf_counter() - started
            eta = f", ~{elapsed / i * (len(cases) - i):.0f} s left" if i else ""
            print(f"\r[{i + 1}/{len(cases)}{eta}] {case.label:<{width}}", end="", file=sys.stderr, flush=True)
        results, diff, diff_ref = bench_case(torch, case, backends, iters, l2_bytes)
        if progress:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        fa3_diff = f"max|diff| vs fa3 {diff:.3e}" if diff is not None and diff_ref == "fa3" else ""
        cells = []
        for name in backends:
            status, ms, tflops, note = results[name]
            gbps = case.gbps(ms) if status == "ok" and case.reports_gbps else None
            if status != "ok":
                cells.append(status)
            elif gbps is not None:
                cells.append(f"{gbps:5.0f} GB/s {ms * 1e3:6.1f} us")
            else:
                cells.append(f"{tflops:7.1f} TF {ms:8.4f} ms")
            rows.append({"date": date, "device": dev, "group": case.group, "dtype": case.dtype, "batch": case.batch,
                         "seqlen_q": case.seqlen_q, "seqlen_k": case.seqlen_k, "heads": case.heads,
                         "heads_k": case.heads_k, "head_dim": case.head_dim, "causal": str(case.causal),
                         "varlen": str(case.varlen), "backend": name, "status": status,
                         "ms": f"{ms:.5f}" if ms is not None else "", "tflops": f"{tflops:.2f}" if tflops else "",
                         "max_diff_vs_sdpa": (f"{diff:.3e}" if diff is not None and diff_ref == "sdpa"
                                              and name == "flash_attn3" else ""),
                         "note": "; ".join(x for x in (note, fa3_diff if name == "flash_attn3" else "") if x),
                         "torch": torch.__version__,
                         "gbps": f"{gbps:.1f}" if gbps is not None else "",  # older CSVs lack it
                         "case": case.label})  # the row's label (paged / append rows differ only there)
        shown = "" if diff is None else (f"{diff:.1e}" if diff_ref == "sdpa" else f"{diff_ref}:{diff:.1e}")
        print(f"{case.label:<{width}}" + "".join(f" | {c:>20}" for c in cells) + f" | {shown}", flush=True)
        for name in backends:
            status, _, _, note = results[name]
            if status in ("error",):
                print(f"    {name}: {note}", flush=True)

    write_csv(csv_path, rows)
    if args.plot:
        write_plot(args.plot, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
