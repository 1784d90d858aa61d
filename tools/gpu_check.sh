#!/usr/bin/env bash
# shellcheck disable=SC2317  # stage functions are called through stage(), which shellcheck cannot follow
# tools/gpu_check.sh: the one script run on the H100 device machine (see README "Development loop").
# It installs the carried CUTLASS wheel, builds and installs the extension with pip, checks the kernels'
# SASS, runs the GPU tests and the benchmark, and prints a summary table last. Logs go to $OUT, whose files
# come back (at most 8, so the set is fixed): build.log sass.txt tests.log bench.log fwd_*.csv bench_fwd.png
# sanitize.log summary.txt. In `all` mode a failing stage does not stop later ones; the exit code is non-zero
# if any stage failed.
#
# Usage: bash tools/gpu_check.sh [all|build|test|bench|sanitize]
# Environment:
#   FLASH_ATTN3_DTYPES / FLASH_ATTN3_HDIMS  build only some kernels (passed through to setup.py)
#   GPU_TESTS="expr"    pytest -k expression;  PYTEST_ARGS="..." more pytest arguments
#   BENCH_ARGS="..."    bench_fwd.py arguments (default: --grid all)
#   MAX_JOBS            parallel compiles (default 16)
set -uo pipefail

MODE="${1:-all}"
case "$MODE" in all | build | test | bench | sanitize) ;; *)
  echo "usage: bash tools/gpu_check.sh [all|build|test|bench|sanitize]" >&2
  exit 2
  ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
START_ALL=$SECONDS
SUMMARY=()
FAILED=0

# stage NAME CMD...: runs CMD, records status and seconds for the summary table.
stage() {
  local name="$1" t0=$SECONDS rc
  shift
  echo
  echo "=============== $name ==============="
  "$@"
  rc=$?
  SUMMARY+=("$(printf '%-10s %-6s %5ds' "$name" "$([[ $rc -eq 0 ]] && echo ok || echo "FAIL($rc)")" $((SECONDS - t0)))")
  [[ $rc -eq 0 ]] || FAILED=1
  return "$rc"
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
  nvcc --version | tail -n 1 || true
  echo "FLASH_ATTN3_DTYPES=${FLASH_ATTN3_DTYPES:-<all>} FLASH_ATTN3_HDIMS=${FLASH_ATTN3_HDIMS:-<all>} MAX_JOBS=$MAX_JOBS"
}

install_cutlass() {
  local whl=(.whl/nvidia_cutlass-*.whl)
  if [[ ! -f "${whl[0]}" ]]; then
    echo "no .whl/nvidia_cutlass-*.whl: name \".whl\" in the run tool's carry (or set CUTLASS_DIR)" >&2
    [[ -n "${CUTLASS_DIR:-}" ]]
    return
  fi
  "$PY" -m pip install -q --no-deps --no-index "${whl[0]}"
}

# The folder of the installed package, found from outside the tree so the source copy does not shadow it.
installed_pkg_dir() {
  (cd /tmp && "$PY" -c 'import flash_attn3, os; print(os.path.dirname(flash_attn3.__file__))')
}

build() {
  install_cutlass || return 1
  # The device image exports CXX=/opt/gcc/bin/g++, a wrapper whose -B search path holds only a static
  # libstdc++: an extension linked by it carries a private copy of libstdc++ and segfaults as soon as torch
  # formats an error message containing a number (two copies of the locale facets). The distribution's g++
  # links the shared libstdc++, as torch itself does.
  if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
  echo "CXX=${CXX:-<default>}"
  # torch's cpp_extension guesses CUDA_HOME from `which nvcc`; give it the real toolkit root.
  CUDA_HOME="$(bash build_standalone.sh --print-cuda-home)" || return 1
  export CUDA_HOME
  echo "CUDA_HOME=$CUDA_HOME"
  local t0=$SECONDS
  "$PY" -m pip install --no-build-isolation -v . 2>&1 | tee "$OUT/build.log" | grep -E "^(error|Error|ERROR)|error:|Successfully installed|ptxas (error|fatal)"
  local rc=${PIPESTATUS[0]}
  echo "pip install: exit $rc after $((SECONDS - t0)) s (full log: build.log)"
  [[ $rc -eq 0 ]] || { tail -n 40 "$OUT/build.log"; return "$rc"; }
  # The tests import the in-tree package when run from the repo root: give it the built files (extension,
  # generated config) that only the installed copy has. The device's tree is a throwaway copy.
  local pkg f
  pkg="$(installed_pkg_dir)" || return 1
  if [[ "$(realpath "$pkg")" != "$(realpath flash_attn3)" ]]; then
    for f in "$pkg"/*; do
      [[ -e "flash_attn3/$(basename "$f")" ]] || { cp -r "$f" flash_attn3/ && echo "copied built $(basename "$f") into flash_attn3/"; }
    done
  fi
  (cd /tmp && "$PY" -c 'import flash_attn3; print("import flash_attn3 ok:", flash_attn3.__file__)')
  local so
  so="$(find "$pkg" -name '_C*.so' | head -n1)"
  if ! ldd "$so" | grep -q 'libstdc++'; then
    echo "$so does not link the shared libstdc++ (static copy inside): error messages would crash" >&2
    return 1
  fi
}

sass() {
  local so
  so="$(find "$(installed_pkg_dir)" -name '*.so' | head -n1)"
  [[ -n "$so" ]] || { echo "no built extension .so found in the installed package" >&2; return 1; }
  echo "checking $so"
  "$PY" tools/check_sass.py "$so" --ptxas-log "$OUT/build.log" 2>&1 | tee "$OUT/sass.txt"
}

tests() {
  local args=(-q -rs -x tests)
  [[ -n "${GPU_TESTS:-}" ]] && args+=(-k "$GPU_TESTS")
  # shellcheck disable=SC2206  # PYTEST_ARGS is a word list on purpose
  args+=(${PYTEST_ARGS:-})
  "$PY" -m pytest "${args[@]}" 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

bench() {
  local stamp
  stamp="$(mktemp)"
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  "$PY" benchmarks/bench_fwd.py ${BENCH_ARGS:---grid all} --plot "$OUT/bench_fwd.png" 2>&1 | tee "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  find benchmarks/results -name 'fwd_*.csv' -newer "$stamp" -exec cp {} "$OUT/" \; 2>/dev/null
  rm -f "$stamp"
  return "$rc"
}

# compute-sanitizer on a few small calls (odd lengths, varlen, GQA, causal); PyTorch's caching allocator is
# off so that memcheck sees every allocation's true bounds.
sanitize() {
  local script rc=0 tool
  script="$(mktemp --suffix=.py)"
  cat >"$script" <<'EOF'
import torch, flash_attn3
torch.manual_seed(0)
ran = 0
for dtype in (torch.float16, torch.bfloat16):
    for d in (64, 96, 128):
        for causal in (False, True):
            q = torch.randn(2, 77, 8, d, device="cuda", dtype=dtype)
            k = torch.randn(2, 133, 2, d, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            try:
                flash_attn3.flash_attn_func(q, k, v, causal=causal)
                cu_q = torch.tensor([0, 77, 154], device="cuda", dtype=torch.int32)
                cu_k = torch.tensor([0, 133, 266], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   cu_q, cu_k, 77, 133, causal=causal)
                ran += 2
            except NotImplementedError:
                pass
torch.cuda.synchronize()
print(f"sanitize script: {ran} calls")
assert ran > 0, "no kernel built"
EOF
  : >"$OUT/sanitize.log"
  for tool in memcheck racecheck synccheck; do
    echo "--- compute-sanitizer --tool $tool" | tee -a "$OUT/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" "$script" \
      2>&1 | tail -n 30 | tee -a "$OUT/sanitize.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
  done
  rm -f "$script"
  return "$rc"
}

stage env env_info
case "$MODE" in
  build) stage build build && stage sass sass ;;
  test) stage build build && stage tests tests ;;
  bench) stage build build && stage bench bench ;;
  sanitize) stage build build && stage sanitize sanitize ;;
  all)
    if stage build build; then
      stage sass sass
      stage tests tests
      stage bench bench
    fi
    ;;
esac

{
  echo
  echo "=============== summary ($MODE, $((SECONDS - START_ALL)) s) ==============="
  printf '%s\n' "${SUMMARY[@]}"
  [[ -f "$OUT/sass.txt" ]] && tail -n 1 "$OUT/sass.txt"
  [[ -f "$OUT/tests.log" ]] && echo "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" | tail -n 1)"
  [[ -f "$OUT/bench.log" ]] && grep -E '^head' "$OUT/bench.log" | sed 's/^/bench: /'
  echo "logs in \$OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
} | tee "$OUT/summary.txt"
exit $FAILED
