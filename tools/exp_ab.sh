#!/usr/bin/env bash
# tools/exp_ab.sh: one device call that measures kernel patches against the tree they apply to.
# Side A is the tree as copied; side B is the same tree after `git apply` of AB_PATCHES (in order). Each side
# builds the same kernel subset (FLASH_ATTN3_DTYPES / FLASH_ATTN3_HDIMS, default bf16 / 128: ~2 min on 16
# cores), runs the GPU tests that subset can run, and benchmarks next to FA3 in the same process. The two
# CSVs and a per-row B/A table come back in $OUT (ab.log, A.csv, B.csv).
# Usage (device): AB_PATCHES="benchmarks/experiments/x.patch ..." AB_BENCH="--grid paper --hdim 128" \
#                 AB_TESTS="tests" OUT=... bash tools/exp_ab.sh
# AB_AFTER_A: a command run on side A's build before B is built; AB_AFTER_B: one run on side B's build.
# AB_TESTS_A / AB_TESTS_B: the tests of one side (default AB_TESTS, else the other side's, else all of tests/:
# session 14 lost a call to side A running the whole suite when only AB_TESTS_B was given). AB_SIDES="A B" (default) or "B" alone (the
# patched tree only). Never for a product build: the patches are applied to the device's copy only.
set -uo pipefail
t0=$SECONDS
# shellcheck source=tools/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
export FLASH_ATTN3_DTYPES="${FLASH_ATTN3_DTYPES:-bf16}" FLASH_ATTN3_HDIMS="${FLASH_ATTN3_HDIMS:-128}" MAX_JOBS=16
LOG="$OUT/ab.log"

side() {
  local name="$1" s0=$SECONDS
  echo "=============== side $name (${FLASH_ATTN3_DTYPES} d ${FLASH_ATTN3_HDIMS}) ==============="
  python -m pip install -v --no-build-isolation . >"$OUT/build_$name.log" 2>&1 ||
    { tail -n 30 "$OUT/build_$name.log"; return 1; }
  echo "build: $((SECONDS - s0)) s; spills: $(grep -c 'bytes spill stores' "$OUT/build_$name.log") reports," \
    "$(grep 'bytes spill stores' "$OUT/build_$name.log" | grep -vc ' 0 bytes spill stores') nonzero"
  # shellcheck disable=SC2086  # word lists on purpose
  local tests_var="AB_TESTS_$name" other_var="AB_TESTS_$([[ $name == A ]] && echo B || echo A)"
  pytest -q -rf -p no:cacheprovider ${!tests_var:-${AB_TESTS:-${!other_var:-tests}}} >"$OUT/tests_$name.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_$name.log" | head -n 30
  # shellcheck disable=SC2086
  python benchmarks/bench_fwd.py ${AB_BENCH:---grid paper --hdim 128} --backends "${AB_BACKENDS:-flash_attn3,fa3}" \
    --iters "${AB_ITERS:-10}" --csv "$OUT/$name.csv" 2>&1 | grep -E "^(case|#)|TF|GB/s"
}

{
  for s in ${AB_SIDES:-A B}; do
    if [[ "$s" == B ]]; then
      for p in ${AB_PATCHES:-}; do git apply "$p" && echo "applied $p" || { echo "could not apply $p"; exit 1; }; done
    fi
    side "$s"
    after_var="AB_AFTER_$s"
    [[ -n "${!after_var:-}" ]] && bash -c "${!after_var}"
  done
  if [[ -f "$OUT/A.csv" && -f "$OUT/B.csv" ]]; then
    python - "$OUT/A.csv" "$OUT/B.csv" <<'EOF'
import csv, sys
def rows(path):
    out = {}
    for r in csv.DictReader(open(path)):
        if r["status"] == "ok" and r["ms"]:
            out[(r["case"], r["backend"])] = float(r["ms"])
    return out
a, b = rows(sys.argv[1]), rows(sys.argv[2])
print(f"{'case':60s} {'A ms':>9s} {'B ms':>9s} {'A/B':>6s} {'fa3 A':>9s} {'fa3 B':>9s}")
for (case, be), ta in a.items():
    if be != "flash_attn3" or (case, be) not in b:
        continue
    tb = b[(case, be)]
    fa, fb = a.get((case, "fa3")), b.get((case, "fa3"))
    print(f"{case:60s} {ta:9.4f} {tb:9.4f} {ta / tb:6.3f} {fa or float('nan'):9.4f} {fb or float('nan'):9.4f}")
EOF
  fi
  echo "total: $((SECONDS - t0)) s"
} 2>&1 | tee "$LOG"
