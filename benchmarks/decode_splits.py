"""Split-KV sweep for the num_splits heuristic: decode and short-query calls through flash_attn_with_kvcache,
timed by CUDA-graph replay (median of rounds, each replaying one graph over enough cache copies to exceed
2x L2), for forced num_splits in a list and for the heuristic (0), with and without PackGQA. Prints one row
per case: time per forced split count, the best one, and what the heuristic chose and took. The table in
benchmarks/NOTES.md ("split-KV heuristic") comes from this script.

    python benchmarks/decode_splits.py [--csv PATH] [--splits 1,2,4,8,16,32,64] [--rounds 20]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

CASES = (  # (dtype, batch, seqlen_q, cache, heads, heads_k, head_dim, causal)
    ("bf16", 1, 1, 8192, 32, 8, 128, True),
    ("bf16", 8, 1, 8192, 32, 8, 128, True),
    ("bf16", 64, 1, 8192, 32, 8, 128, True),
    ("bf16", 128, 1, 2048, 32, 8, 128, True),
    ("bf16", 16, 1, 32768, 32, 8, 128, True),
    ("bf16", 1, 1, 65536, 32, 8, 128, True),
    ("bf16", 4, 1, 4096, 32, 8, 128, True),
    ("bf16", 32, 1, 1024, 32, 8, 128, True),
    ("fp16", 1, 1, 2048, 16, 2, 80, True),   # the standalone guide's case 4
    ("bf16", 1, 1, 512, 32, 8, 128, True),   # short caches: where one-block splits start to apply
    ("bf16", 1, 1, 1024, 32, 8, 128, True),
    ("bf16", 2, 1, 2048, 32, 8, 128, True),
    ("fp16", 1, 1, 1024, 16, 2, 80, True),
    ("bf16", 4, 512, 8192, 32, 8, 128, True),  # chunked prefill
    ("bf16", 2, 16, 16384, 32, 8, 128, True),  # speculative decode
)


def timed(torch, fn, n_sets: int, rounds: int) -> float:
    """Median microseconds per call of `fn(i)` for i over the input sets, replayed from one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_sets)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args()
    import torch

    import flash_attn3
    from flash_attn3 import _ops
    splits = [int(x) for x in args.splits.split(",")]
    dev = torch.device("cuda", torch.cuda.current_device())
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    rows = []
    print(f"# {torch.cuda.get_device_name()} | us per call, CUDA-graph replay | splits {splits}")
    print(f"{'case':44} | " + " | ".join(f"s={s:<3}" for s in splits) + " | best  | heuristic (splits, pack, us)")
    for dt, b, sq, sk, h, hk, d, causal in CASES:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        kv_bytes = 2 * b * sk * hk * d * 2
        n_sets = max(1, min(32, (2 * l2) // kv_bytes + 1))
        qs = [torch.randn(b, sq, h, d, device=dev, dtype=dtype) for _ in range(n_sets)]
        ks = [torch.randn(b, sk, hk, d, device=dev, dtype=dtype) for _ in range(n_sets)]
        vs = [torch.randn(b, sk, hk, d, device=dev, dtype=dtype) for _ in range(n_sets)]
        seqlens = torch.full((b,), sk, dtype=torch.int32, device=dev)

        def run(num_splits, pack=None):
            return lambda i: flash_attn3.flash_attn_with_kvcache(qs[i], ks[i], vs[i], cache_seqlens=seqlens,
                                                                 causal=causal, num_splits=num_splits,
                                                                 pack_gqa=pack)
        label = f"{dt} b{b} sq{sq} sk{sk} h{h}/{hk} d{d}{' causal' if causal else ''}"
        t = {s: timed(torch, run(s), n_sets, args.rounds) for s in splits}
        t_nopack = timed(torch, run(0, False), n_sets, args.rounds)
        t_heur = timed(torch, run(0), n_sets, args.rounds)
        plan = _ops.plan(b, sq, sk, h, hk, d, d, dtype, False, -1, 0 if causal else -1, 0, 0.0, 0, -1, 0, dev)
        best = min(t, key=t.get)
        print(f"{label:44} | " + " | ".join(f"{t[s]:5.1f}" for s in splits) +
              f" | s={best:<3} | ({plan[0]}, {plan[1]}, {t_heur:.1f}); no pack {t_nopack:.1f}")
        rows.append({"case": label, **{f"s{s}_us": f"{t[s]:.2f}" for s in splits}, "best": best,
                     "heuristic_splits": plan[0], "heuristic_pack": plan[1], "heuristic_us": f"{t_heur:.2f}",
                     "nopack_us": f"{t_nopack:.2f}", "gbps_heuristic": f"{kv_bytes / t_heur / 1e3:.0f}"})
        del qs, ks, vs
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
