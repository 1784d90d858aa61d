#!/usr/bin/env bash
# tools/exp_trace.sh: the tile-timeline diagnostic on the device (hopper/trace.h, tools/trace_tiles.py).
# Builds bf16 + fp8 d 96 and 128 with -DFLASH3_TRACE (a diagnostic build, never one for users), prints the
# per-tile phases of the traced cases (prefill, decode, the guide's FP8 cases 1 and 2), and benchmarks the
# d 128 paper and headline rows next to FA3 in that build.
# Usage (device): OUT=... bash tools/exp_trace.sh
set -uo pipefail
t0=$SECONDS
# shellcheck source=tools/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
NVCC_APPEND_FLAGS=-DFLASH3_TRACE FLASH_ATTN3_DTYPES="${FLASH_ATTN3_DTYPES:-bf16,fp8}" FLASH_ATTN3_HDIMS="${FLASH_ATTN3_HDIMS:-96,128}" MAX_JOBS=16 \
  python -m pip install -v --no-build-isolation . >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
(cd /tmp && python "$ROOT/tools/trace_tiles.py") 2>&1 | grep -v Warning | tee "$OUT/trace.log"
python benchmarks/bench_fwd.py --grid paper,headline --hdim 128 --backends flash_attn3,fa3 --iters 10 \
  --csv "$OUT/trace_build_bench.csv" 2>&1 | grep -E "^(case|#)|TF" | tee "$OUT/bench.log"
echo "total: $((SECONDS - t0)) s"
