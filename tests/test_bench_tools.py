"""CPU checks of the benchmark script's non-GPU paths (CSV round trip, re-plotting), so a broken results
writer is caught here rather than after a benchmark run on the GPU machine."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_fwd", ROOT / "benchmarks" / "bench_fwd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fwd"] = module
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for backend, tflops in (("flash_attn3", 600.0), ("cudnn", 580.5)):
        for seqlen in (512, 1024):
            rows.append({"date": "2026-11-22", "device": "H100", "group": "paper", "dtype": "bf16", "batch": 2,
                         "seqlen_q": seqlen, "seqlen_k": seqlen, "heads": 16, "heads_k": 16, "head_dim": 128,
                         "causal": False, "varlen": False, "backend": backend, "status": "ok", "ms": 1.0,
                         "tflops": tflops + seqlen, "max_diff_vs_sdpa": "", "note": "", "torch": "x"})
    return rows


def test_csv_round_trip(tmp_path):
    bench = _load_bench()
    path = tmp_path / "results" / "fwd.csv"
    bench.write_csv(path, _rows())
    back = bench.read_csv(path)
    assert len(back) == 4
    assert {r["backend"] for r in back} == {"flash_attn3", "cudnn"}
    assert float(back[0]["tflops"]) == pytest.approx(1112.0)


def test_replot_writes_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = _load_bench()
    csv_path = tmp_path / "fwd.csv"
    bench.write_csv(csv_path, _rows())
    png = tmp_path / "fwd.png"
    monkeypatch.setattr(sys, "argv", ["bench_fwd.py", "--replot", str(csv_path), "--plot", str(png)])
    assert bench.main() == 0
    assert png.exists() and png.stat().st_size > 1000


def test_decode_grid_and_bandwidth():
    bench = _load_bench()
    decode = bench.build_cases("decode", "bf16", False)
    assert decode and all(c in bench.build_cases("all", "bf16", True) for c in decode)
    assert all(c.kvcache and c.causal and c.group in bench.GRAPH_GROUPS for c in decode)
    assert len({c.label for c in decode}) == len(decode)
    steps = [c for c in decode if c.reports_gbps]
    assert len(steps) == 12 and all(c.seqlen_q == 1 for c in steps)
    assert sorted(c.batch for c in steps if c.append) == [1, 64]
    paged = [c for c in steps if c.page_size]
    assert sorted((c.batch, c.page_size, c.page_order) for c in paged) == [
        (1, 16, "random"), (64, 16, "random"), (64, 16, "sequential"), (64, 256, "random")]
    assert all(c.label.endswith(f"page{c.page_size}") for c in paged if c.page_order == "random")
    assert all(c.label.endswith(f"page{c.page_size} seqpages") for c in paged if c.page_order == "sequential")
    (chunk,) = [c for c in decode if not c.reports_gbps]
    # Bottom-right causal count: the 512 new queries see 7680..8191 keys, on average (7680 + 8192) / 2.
    assert chunk.flops() == pytest.approx(2 * 4 * 32 * 512 * (7680 + 8192) / 2 * 256)
    big = bench.Case("decode", "bf16", 64, 1, 8192, 32, 8, 128, True, kvcache=True)
    assert big.kv_bytes() == 2 << 30  # K and V: 64 · 8192 · 8 · 128 · 2 tensors · 2 bytes
    assert big.gbps(1.0) == pytest.approx((2 << 30) / 1e6)


def test_diag_grid():
    """The diag rows: not in "all", causal and full at s_q < s_k, FLOPs counted per visible key; and the
    three chunked-prefill rows (h 32/8, causal, 8192 keys) on the other side of the causal length rule."""
    bench = _load_bench()
    all_diag = bench.build_cases("diag", "bf16", False)
    assert not [c for c in bench.build_cases("all", "bf16", False) if c.group == "diag"]
    diag = [c for c in all_diag if c.heads_k == c.heads]
    chunked = [c for c in all_diag if c.heads_k != c.heads]
    assert sorted((c.batch, c.seqlen_q, c.seqlen_k, c.heads, c.heads_k, c.causal) for c in chunked) == [
        (2, 1024, 8192, 32, 8, True), (4, 512, 8192, 32, 8, True), (8, 256, 8192, 32, 8, True)]
    assert sorted(c.causal for c in diag) == [False, True]
    assert all((c.batch, c.seqlen_q, c.seqlen_k, c.heads, c.head_dim) == (2, 4096, 16384, 16, 128) for c in diag)
    (causal,) = [c for c in diag if c.causal]
    # Bottom-right: query i (0-based) sees 16384 - 4096 + i + 1 keys; FA3's count uses the mean of the first
    # and last rows' key ranges, within 0.01% of the exact sum here.
    exact = sum(16384 - 4096 + i + 1 for i in range(4096))
    assert causal.flops() == pytest.approx(2 * 2 * 16 * exact * 256, rel=1e-4)
    (full,) = [c for c in diag if not c.causal]
    assert full.flops() == pytest.approx(2 * 2 * 16 * 4096 * 16384 * 256)


def test_csv_gbps_column(tmp_path):
    bench = _load_bench()
    rows = [dict(r, gbps="") for r in _rows()]
    rows[0].update(group="decode", seqlen_q=1, seqlen_k=8192, gbps="4100.5")
    path = tmp_path / "fwd.csv"
    bench.write_csv(path, rows)
    back = bench.read_csv(path)
    assert list(back[0])[:19] == list(_rows()[0])  # the older columns keep their order; gbps comes last
    assert float(back[0]["gbps"]) == pytest.approx(4100.5) and back[1]["gbps"] == ""


def test_trace_tiles_reads_records_and_phases(tmp_path):
    """tools/trace_tiles.py against a hand-made record in the layout hopper/trace.h writes."""
    import importlib.util
    import struct

    import numpy as np

    spec = importlib.util.spec_from_file_location("trace_tiles", ROOT / "tools" / "trace_tiles.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    grid, tiles, events = 2, 64, 16
    stamps = np.zeros((grid, tiles, events), dtype=np.uint64)
    # CTA 0, tiles 0 and 1, both warpgroups: phases of 10, 20, 30, 40, 50 cycles, the next tile 1000 later.
    for t in (0, 1):
        for wg in (0, 1):
            base = 1000 + 1000 * t + wg
            marks = np.cumsum([0, 10, 20, 30, 40, 50]) + base
            stamps[0, t, wg * tt.WG_EVENTS:wg * tt.WG_EVENTS + 6] = marks
        stamps[0, t, tt.P_TILE] = 1000 * t + 500
        stamps[0, t, tt.P_Q] = 1000 * t + 700
    stamps[0, 0, tt.ENTRY] = 400  # kernel entry, in tile slot 0; CTA 1 has no stamps at all
    path = tmp_path / "t.trace"
    with open(path, "wb") as f:
        f.write(struct.pack("<6i", 0x46335452, grid, tiles, events, 128, 176))
        f.write(stamps.tobytes())
    (bm, bn, read), = tt.read_records(path)
    assert (bm, bn) == (128, 176) and (read == stamps.astype(np.int64)).all()
    ph = tt.phases(read)
    assert [ph[k] for k in ("q_wait", "first", "loop", "last_pv", "store")] == [10, 20, 30, 40, 50]
    assert ph["tile"] == 1000 and ph["gap"] == 1000 - 150 and ph["p_q"] == 200
    assert ph["q_lat"] == 1000 + 10 - 700  # tile 0's Q landed at 1010, issued at 700
    assert ph["entry"] == 1000 - 400  # entry -> warpgroup 0's first tile start
