"""Per-tile timelines of the forward kernel, on a diagnostic build.

Needs the extension built with -DFLASH3_TRACE (hopper/trace.h), e.g. on the device:
    NVCC_APPEND_FLAGS=-DFLASH3_TRACE FLASH_ATTN3_DTYPES=bf16 FLASH_ATTN3_HDIMS=128 pip install --no-build-isolation .
    cd /tmp && python /path/to/tools/trace_tiles.py
For each case it prints the median time of the call (CUDA events, L2 flushed; no trace
recorded then) and, from one traced call, the median cycles per tile of each phase of the consumer
warpgroups and the producer (one SM's clock; phases as trace.h names them):
    entry      kernel entry -> first tile start  (barrier init, descriptor prefetch, the tile claim)
    q_wait     tile start -> Q landed            first     Q landed -> first block's softmax done
    loop       -> every Q K^T done               last_pv   -> last P V and rescale done
    store      -> epilogue stores issued         gap       -> next tile's start
    tile       tile start -> next tile start     p_q       producer: tile posted -> Q issued
    q_lat      producer's Q issue -> consumer's Q landed
With PackGQA (the decode cases) the Q warp gathers Q and stamps "Q issued" instead: p_q is then the Q warp's
delay after the producer posted the tile (its mailbox wait and tile derivation), q_lat its copies' latency.
A diagnostic, never a benchmark: the product's numbers come from benchmarks/bench_fwd.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile

import numpy as np
import torch

CASES = {  # name: (batch, seqlen, heads, head dim, causal)
    "short": (32, 512, 16, 128, False),
    "short_causal": (32, 512, 16, 128, True),
    "causal4k": (4, 4096, 16, 128, True),
    "prefill": (2, 8192, 16, 128, False),
}
# Decode through flash_attn_with_kvcache with the default heuristic (split-KV + PackGQA; the combine kernel is
# not traced): name: (batch, cache length, heads, kv heads, head dim).
DECODE_CASES = {
    "decode1": (1, 8192, 32, 8, 128),
    "decode8": (8, 8192, 32, 8, 128),
}
# The standalone guide's FP8 cases through flash_attn_varlen_func (equal lengths, d 80 on the d 96 kernel;
# the build needs fp8 and head dim 96): name: (batch, seqlen, heads, head dim).
FP8_VARLEN_CASES = {
    "case1_fp8": (3, 1680, 16, 80),
    "case2_fp8": (84, 64, 16, 80),
}
WG_EVENTS = 6
START, QREADY, FIRST, LOOP, MMA, STORED = range(6)
P_TILE, P_Q, ENTRY = 12, 13, 15  # trace.h kProducerTile, kProducerQ, kKernelEntry (kProducerDone is not read)


def read_records(path):
    recs = []
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off < len(data):
        magic, grid, tiles, events, bm, bn = struct.unpack_from("<6i", data, off)
        assert magic == 0x46335452, "not a trace record"
        off += 24
        n = grid * tiles * events
        stamps = np.frombuffer(data, dtype=np.uint64, count=n, offset=off).reshape(grid, tiles, events)
        off += n * 8
        recs.append((bm, bn, stamps.astype(np.int64)))
    return recs


def phases(stamps):
    """Median cycles per phase over every traced tile that has all its stamps."""
    out = {k: [] for k in ("entry", "q_wait", "first", "loop", "last_pv", "store", "gap", "tile", "p_q", "q_lat")}
    grid, tiles, _ = stamps.shape
    for cta in range(grid):
        entry, start0 = stamps[cta, 0, ENTRY], stamps[cta, 0, START]
        if entry and start0:  # kernel entry -> warpgroup 0's first tile (barrier init, descriptors, the claim)
            out["entry"].append(start0 - entry)
        for wg in (0, 1):
            ev = stamps[cta, :, wg * WG_EVENTS:(wg + 1) * WG_EVENTS]
            for t in range(tiles):
                e = ev[t]
                if (e == 0).any():
                    continue
                out["q_wait"].append(e[QREADY] - e[START])
                out["first"].append(e[FIRST] - e[QREADY])
                out["loop"].append(e[LOOP] - e[FIRST])
                out["last_pv"].append(e[MMA] - e[LOOP])
                out["store"].append(e[STORED] - e[MMA])
                if t + 1 < tiles and ev[t + 1][START] != 0:
                    out["gap"].append(ev[t + 1][START] - e[STORED])
                    out["tile"].append(ev[t + 1][START] - e[START])
                p = stamps[cta, t]
                if wg == 0 and p[P_TILE] and p[P_Q]:  # the producer's phases, once per tile
                    out["p_q"].append(p[P_Q] - p[P_TILE])
                    out["q_lat"].append(e[QREADY] - p[P_Q])
    return {k: (statistics.median(v) if v else float("nan")) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join([*CASES, *DECODE_CASES, *FP8_VARLEN_CASES]))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import flash_attn3

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"# {torch.cuda.get_device_name()} | trace of the forward kernel (cycles of one SM's clock)")
    cols = ("entry", "q_wait", "first", "loop", "last_pv", "store", "gap", "tile", "p_q", "q_lat")
    print(f"{'case':14} {'us':>8} {'TFLOPS':>7} | tile {'bm x bn':8} " + " ".join(f"{c:>7}" for c in cols))
    print("(decode rows: GB/s of K+V instead of TFLOPS; the call's time includes the combine kernel)")
    for name in args.cases.split(","):
        if name in DECODE_CASES:
            b, s, h, hk, d = DECODE_CASES[name]
            q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            lens = torch.full((b,), s, dtype=torch.int32, device="cuda")

            def call(q=q, k=k, v=v, lens=lens):
                flash_attn3.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)
            work = 2 * b * s * hk * d * 2 / 1e3  # K+V bytes / 1e3: per us gives GB/s
        elif name in FP8_VARLEN_CASES:
            b, s, h, d = FP8_VARLEN_CASES[name]
            q, k, v = (torch.randn(b * s, h, d, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
                       for _ in range(3))
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")

            def call(q=q, k=k, v=v, cu=cu, s=s):
                flash_attn3.flash_attn_varlen_func(q, k, v, cu, cu, s, s)
            work = 4 * b * h * s * s * d / 1e6
        else:
            b, s, h, d, causal = CASES[name]
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

            def call(q=q, k=k, v=v, causal=causal):
                flash_attn3.flash_attn_func(q, k, v, causal=causal)
            work = 4 * b * h * s * s * d / (2 if causal else 1) / 1e6
        os.environ.pop("FLASH3_TRACE_FILE", None)
        for _ in range(3):
            call()
        times = []
        for _ in range(args.iters):
            flush.zero_()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            call()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        us = statistics.median(times)
        with tempfile.NamedTemporaryFile(suffix=".trace", delete=False) as f:
            path = f.name
        os.environ["FLASH3_TRACE_FILE"] = path
        call()
        torch.cuda.synchronize()
        os.environ.pop("FLASH3_TRACE_FILE")
        recs = read_records(path)
        os.unlink(path)
        bm, bn, stamps = recs[-1]
        ph = phases(stamps)
        print(f"{name:14} {us:8.1f} {work / us:7.1f} | {bm:4d} x {bn:<4d}   "
              + " ".join(f"{ph[c]:7.0f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
