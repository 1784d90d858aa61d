#!/usr/bin/env bash
# shellcheck disable=SC2317  # stage functions are called through stage(), which shellcheck cannot follow
# tools/gpu_check.sh: the one script run on the H100 device machine (see README "Development loop").
# It does what a new user does, verbatim: the README's install command (pip install of the CUTLASS wheel, then
# of this package: no hand-set compiler or CUDA_HOME) and the README's `pytest`; it also builds and runs the
# standalone deliverables (build_standalone.sh, the guide's four runner commands, the C example), checks the
# kernels' SASS, and benchmarks next to FA3 (the fa3-fwd wheel), cuDNN and FA2 in the same process. The device
# has no network, so pip is pointed at the carried wheels in .whl/ (PIP_NO_INDEX, PIP_FIND_LINKS): the
# commands themselves stay as the README prints them.
#
# Logs go to $OUT, whose files come back (at most 8, so the set is fixed): build.log (with the SASS check and
# the wheel stage) standalone.log tests.log bench.log fwd_*.csv bench_fwd.png sanitize.log summary.txt. A failing
# stage does not stop later ones (except that nothing runs without a build); the exit code is non-zero if any
# stage failed.
#
# Usage: bash tools/gpu_check.sh [STAGES...]   stages: build sass standalone tests bench sanitize wheel, or
#        all (= build sass standalone tests bench). build always runs first, except when only standalone and
#        wheel are asked for (each builds what it tests); sass (the SASS / spill check of the built extension)
#        runs only when named.
# Environment:
#   FLASH_ATTN3_DTYPES / FLASH_ATTN3_HDIMS  build only some kernels (passed through to setup.py)
#   GPU_TESTS="expr"    pytest -k expression;  PYTEST_ARGS="..." more pytest arguments
#   BENCH_ARGS="..."    bench_fwd.py arguments (default: --grid all)
#   MAX_JOBS            parallel compiles (default 16)
#   REUSE_BUILD=1       skip the build stage when an earlier call on this (warm) machine installed the
#                       extension: `build standalone` in one call and `REUSE_BUILD=1 ... tests bench` in the next
#                       fit the 600 s limit, where the four stages in one call no longer do
set -uo pipefail

STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 || "${STAGES[*]}" == "all" ]] && STAGES=(build sass standalone tests bench)
for s in "${STAGES[@]}"; do
  case "$s" in build | sass | standalone | tests | bench | sanitize | wheel) ;; *)
    echo "usage: bash tools/gpu_check.sh [build|sass|standalone|tests|bench|sanitize|wheel ...|all]" >&2
    exit 2
    ;;
  esac
done
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
  echo "CXX=${CXX:-<unset>} ($(${CXX:-c++} -print-file-name=libstdc++.so 2>/dev/null)) CC=${CC:-<unset>}"
  echo "FLASH_ATTN3_DTYPES=${FLASH_ATTN3_DTYPES:-<all>} FLASH_ATTN3_HDIMS=${FLASH_ATTN3_HDIMS:-<all>} MAX_JOBS=$MAX_JOBS"
}

# The README's install command, typed as written. Only pip's index is redirected to the carried wheels.
build() {
  [[ -d .whl ]] || { echo "no .whl/ folder: name \".whl\" in the run tool's carry" >&2; return 1; }
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$ROOT/.whl"
  echo "CXX=${CXX:-<unset>} CC=${CC:-<unset>} (left as the image sets them)"
  local t0=$SECONDS rc
  # shellcheck disable=SC2016
  echo '$ python -m pip install --no-deps nvidia-cutlass==4.2.0.0 && MAX_JOBS=16 python -m pip install --no-build-isolation .'
  { python -m pip install --no-deps nvidia-cutlass==4.2.0.0 &&
    MAX_JOBS=16 python -m pip install -v --no-build-isolation .; } \
    >"$OUT/build.log" 2>&1
  rc=$?
  grep -E "^(error|Error|ERROR)|error:|Successfully installed|ptxas (error|fatal)|flash_attn3: " "$OUT/build.log"
  echo "install: exit $rc after $((SECONDS - t0)) s (full log: build.log)"
  [[ $rc -eq 0 ]] || { tail -n 40 "$OUT/build.log"; return "$rc"; }
  local so
  so="$(find "$(installed_pkg_dir)" -name '_C*.so' | head -n1)"
  echo "import: $(cd /tmp && "$PY" -c 'import flash_attn3, flash_attn3._ops as o; print(flash_attn3.__file__, "extension", o.HAS_EXTENSION)')"
  if ! ldd "$so" | grep -q 'libstdc++'; then
    echo "$so does not link the shared libstdc++ (static copy inside): error messages would crash" >&2
    return 1
  fi
  echo "$(basename "$so") links $(ldd "$so" | grep -o 'libstdc++[^ ]*' | head -n1)"
}

# The folder of the installed package, found from outside the tree so the source copy does not shadow it.
installed_pkg_dir() {
  (cd /tmp && "$PY" -c 'import flash_attn3, os; print(os.path.dirname(flash_attn3.__file__))')
}

sass() {
  local so
  so="$(find "$(installed_pkg_dir)" -name '*.so' | head -n1)"
  [[ -n "$so" ]] || { echo "no built extension .so found in the installed package" >&2; return 1; }
  echo "checking $so"
  # The spill report exists only when this call compiled the kernels; an incremental rebuild that compiled
  # nothing leaves the SASS checks (HGMMA, no local memory) to check on their own.
  local log=()
  grep -q "bytes spill stores" "$OUT/build.log" && log=(--ptxas-log "$OUT/build.log")
  "$PY" tools/check_sass.py "$so" "${log[@]}" 2>&1 | tee -a "$OUT/build.log" | tail -n 3
  return "${PIPESTATUS[0]}"
}

# build_standalone.sh as the user types it, the standalone guide's four commands, the issue's two, each
# printing its verdict, and the C example linked against libflash_attn3.so.
standalone() {
  local rc=0 args
  # Run alone (no build stage) on a fresh machine, the CUTLASS headers come from the carried wheel too.
  python -m pip install -q --no-deps --no-index --find-links "$ROOT/.whl" nvidia-cutlass==4.2.0.0 >/dev/null 2>&1 || true
  {
    echo '$ bash build_standalone.sh -j 16'
    bash build_standalone.sh -j 16 || return 1
    for args in \
      "--fp8 --batch_size 3 --max_seqlen_q 1680 --max_seqlen_k 1680 --num_heads 16 --num_heads_k 16 --head_size 80 --verify" \
      "--fp8 --batch_size 84 --max_seqlen_q 64 --max_seqlen_k 64 --num_heads 16 --num_heads_k 16 --head_size 80 --verify" \
      "--fp16 --batch_size 1 --max_seqlen_q 1285 --max_seqlen_k 1285 --num_heads 16 --num_heads_k 2 --head_size 80 --causal --verify" \
      "--fp16 --batch_size 1 --max_seqlen_q 1 --max_seqlen_k 2048 --num_heads 16 --num_heads_k 2 --head_size 80 --causal --verify" \
      "--fp16 --batch_size 1 --max_seqlen_q 1 --max_seqlen_k 2048 --num_heads 16 --num_heads_k 2 --head_size 80 --causal --num_splits 1 --verify" \
      "--fp16 --batch_size 2 --max_seqlen_q 512 --max_seqlen_k 512 --verify" \
      "--bf16 --batch_size 2 --max_seqlen_q 8192 --max_seqlen_k 8192 --head_size 128 --verify"; do
      echo
      echo "\$ ./build_standalone/test_varlen_inference $args"
      ./build_standalone/test_varlen_inference $args 2>&1
      echo "(exit $?)"
    done
    echo
    echo '$ ./build_standalone/flash3_example'
    ./build_standalone/flash3_example || rc=1
  } 2>&1 | tee "$OUT/standalone.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
  grep -q "RESULT: FAIL" "$OUT/standalone.log" && rc=1
  return "$rc"
}

# The README's test command, typed as written (plus optional selection).
tests() {
  local args=()
  [[ -n "${GPU_TESTS:-}" ]] && args+=(-k "$GPU_TESTS")
  # shellcheck disable=SC2206  # PYTEST_ARGS is a word list on purpose
  args+=(${PYTEST_ARGS:-})
  echo "\$ pytest ${args[*]}"
  pytest "${args[@]}" 2>&1 | tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

# FA3 itself as a benchmark backend: the fa3-fwd wheel (FA3's forward for bf16/fp8, torch stable ABI) into
# its own folder, with the one-line flash_attn_config.py its interface imports.
install_fa3() {
  local whl=(.whl/fa3_fwd-*.whl)
  [[ -f "${whl[0]}" ]] || { echo "no .whl/fa3_fwd-*.whl: the fa3 backend will say n/a"; return 0; }
  python -m pip install -q --no-deps --no-index --target /tmp/fa3 "${whl[0]}" || return 1
  echo "from fa3_fwd_config import CONFIG" >/tmp/fa3/flash_attn_config.py
  export PYTHONPATH="/tmp/fa3${PYTHONPATH:+:$PYTHONPATH}"
  (cd /tmp && "$PY" -c 'import fa3_fwd_interface; print("FA3 backend:", fa3_fwd_interface.__file__)')
}

bench() {
  local stamp
  install_fa3 || return 1
  stamp="$(mktemp)"
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  "$PY" benchmarks/bench_fwd.py ${BENCH_ARGS:---grid all} --plot "$OUT/bench_fwd.png" 2>&1 | tee "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  find benchmarks/results -name 'fwd_*.csv' -newer "$stamp" -exec cp {} "$OUT/" \; 2>/dev/null
  rm -f "$stamp"
  return "$rc"
}

# The stable-ABI wheel as a user gets it: `pip wheel` once (after the build stage, ninja finds its objects
# up to date), installed with --no-deps into a fresh venv that sees the system torch (--system-site-packages:
# the device has no network; --without-pip: that venv runs the system pip), and tested from a copy of tests/
# outside the tree, so that nothing comes from the source copy. Prints the wheel's name, tag and size.
wheel() {
  [[ -d .whl ]] || { echo "no .whl/ folder: name \".whl\" in the run tool's carry" >&2; return 1; }
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$ROOT/.whl"
  local work whl rc
  work="$(mktemp -d)"
  # shellcheck disable=SC2016
  echo '$ python -m pip wheel --no-build-isolation --no-deps . -w dist'
  { python -m pip install --no-deps nvidia-cutlass==4.2.0.0 &&
    python -m pip wheel -v --no-build-isolation --no-deps . -w "$work/dist"; } >>"$OUT/build.log" 2>&1 ||
    { tail -n 40 "$OUT/build.log"; rm -rf "$work"; return 1; }
  whl="$(find "$work/dist" -name 'flash_attn3-*.whl' | head -n1)"
  python - "$whl" <<'EOF'
import os, sys, zipfile
whl = zipfile.ZipFile(sys.argv[1])
meta = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
tags = [line for line in meta.splitlines() if line.startswith("Tag:")]
print(f"wheel: {os.path.basename(sys.argv[1])} ({os.path.getsize(sys.argv[1]) / 2**20:.1f} MiB), {', '.join(tags)}, "
      f"extension {[n for n in whl.namelist() if n.endswith('.so')]}")
EOF
  # The interpreter that built the wheel (it has torch); its pip installs into the venv it runs in.
  # The image's torch lives in a virtual environment of its own, which --system-site-packages would not see:
  # a .pth file in the clean venv names torch's site-packages (torch and pytest come from there; the venv's own
  # site-packages, with the wheel and nothing else, is searched first).
  local torch_site
  torch_site="$(python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
  python -m venv --without-pip "$work/venv" &&
    echo "$torch_site" >"$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch_env.pth" &&
    "$work/venv/bin/python" -m pip install -q --no-deps --ignore-installed "$whl" || { rm -rf "$work"; return 1; }
  "$work/venv/bin/python" -m pip list 2>/dev/null | grep -i flash_attn3
  # The tracked files except the package itself: some tests read sources as text (the schema in csrc/, the
  # stable-ABI include rules, the bench tools); the package is importable only from the wheel.
  tar --exclude=./flash_attn3 --exclude=./.git --exclude=./build --exclude=./build_standalone --exclude=./.whl \
    --exclude=./gpu_out --exclude='*.egg-info' --exclude=./dist -cf - . | tar -xf - -C "$work" ||
    { rm -rf "$work"; return 1; }
  (cd "$work" && venv/bin/python -c 'import sys, torch, flash_attn3, flash_attn3._C as c, flash_attn3._ops as o
print("import:", flash_attn3.__file__, c.__file__, "| torch", torch.__version__, "| extension", o.HAS_EXTENSION)
sys.exit(0 if "/venv/" in flash_attn3.__file__ and o.HAS_EXTENSION else "flash_attn3 not imported from the wheel")') ||
    { rm -rf "$work"; return 1; }
  # The whole suite, as the README types it, from the copy (no source tree on sys.path).
  echo "\$ (copy of tests/, wheel venv) python -m pytest -q tests"
  (cd "$work" && venv/bin/python -m pytest -q -p no:cacheprovider tests) 2>&1 | tee -a "$OUT/build.log" | tail -n 15
  rc=${PIPESTATUS[0]}
  install_fa3 >/dev/null || true
  # Eager per-call latency of a tiny call (the stable ABI boxes every argument), beside FA3's wheel (also on
  # the stable ABI) in the same process; and the headline rows, which must match the source build's.
  (cd "$work" && venv/bin/python - <<'PYEOF'
import sys, time, torch, flash_attn3
sys.path.insert(0, "/tmp/fa3")
q = torch.randn(1, 128, 8, 128, device="cuda", dtype=torch.bfloat16)
fns = {"flash_attn3": lambda: flash_attn3.flash_attn_func(q, q, q)}
try:
    import fa3_fwd_interface as fa3
    fns["fa3"] = lambda: fa3.flash_attn_func(q, q, q)
except Exception as e:  # noqa: BLE001
    print("latency: no FA3 wheel:", e)
for name, fn in fns.items():
    for _ in range(50): fn()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(2000): fn()
    torch.cuda.synchronize()
    print(f"latency: {name} eager flash_attn_func b1 s128 h8 d128: {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us/call")
PYEOF
  ) 2>&1 | tee -a "$OUT/build.log"
  (cd "$work" && venv/bin/python benchmarks/bench_fwd.py --grid headline --iters 10 --csv "$work/h.csv") 2>&1 |
    grep -E "^(head|#|case)" | sed 's/^/wheel bench: /' | tee -a "$OUT/build.log"
  rm -rf "$work"
  return "$rc"
}

# compute-sanitizer on a few small calls (odd lengths, varlen, GQA, causal, split-KV + PackGQA decode); PyTorch's caching allocator is
# off so that memcheck sees every allocation's true bounds.
sanitize() {
  local script rc=0 tool args
  script="$(mktemp --suffix=.py)"
  cat >"$script" <<'EOF'
import torch, flash_attn3
torch.manual_seed(0)
ran = 0
for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
    for d in (64, 96, 128, 256) + ((192,) if dtype != torch.float8_e4m3fn else ()):
        for causal in (False, True):
            q = torch.randn(2, 77, 8, d, device="cuda").to(dtype)
            k = torch.randn(2, 133, 2, d, device="cuda").to(dtype)
            v = torch.randn(2, 133, 2, d, device="cuda").to(dtype)
            try:
                flash_attn3.flash_attn_func(q, k, v, causal=causal)
                cu_q = torch.tensor([0, 77, 154], device="cuda", dtype=torch.int32)
                cu_k = torch.tensor([0, 133, 266], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   cu_q, cu_k, 77, 133, causal=causal)
                # split-KV + PackGQA: decode (s_q 1 and 3) against a cache with per-sequence lengths
                lens = torch.tensor([0, 133], device="cuda", dtype=torch.int32)
                for sq, splits in ((1, 0), (3, 5)):
                    flash_attn3.flash_attn_with_kvcache(q[:, :sq], k, v, cache_seqlens=lens, causal=causal,
                                                        num_splits=splits)
                # paged K/V (page sizes 16 and 7, garbage entries past the lengths) with a batch index and
                # left padding
                for ps in (16, 7):
                    pages = (133 + ps - 1) // ps
                    kp = torch.randn(2 * pages + 1, ps, 2, d, device="cuda").to(dtype)
                    vp = torch.randn(2 * pages + 1, ps, 2, d, device="cuda").to(dtype)
                    table = torch.randperm(2 * pages, device="cuda").to(torch.int32).view(2, pages)
                    table[0, 1:] = 2**31 - 1  # sequence 0 reads at most one page
                    flash_attn3.flash_attn_with_kvcache(q[:, :3], kp, vp, cache_seqlens=torch.tensor(
                        [min(ps, 5), 133], device="cuda", dtype=torch.int32), page_table=table, causal=causal,
                        cache_batch_idx=torch.tensor([0, 1], device="cuda", dtype=torch.int32),
                        cache_leftpad=torch.tensor([1, 9], device="cuda", dtype=torch.int32), num_splits=0)
                # KV append (rotary for 16-bit) into a dense cache with room: 2 new tokens at 100 and 131
                kc, vc = k.clone(), v.clone()
                kn = torch.randn(2, 2, 2, d, device="cuda").to(dtype)
                rot = {}
                if dtype != torch.float8_e4m3fn:
                    ang = torch.rand(133, d // 2, device="cuda")
                    rot = dict(rotary_cos=ang.cos().to(dtype), rotary_sin=ang.sin().to(dtype))
                flash3_lens = torch.tensor([100, 131], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_with_kvcache(q[:, :2], kc, vc, k=kn, v=kn.clone(), cache_seqlens=flash3_lens,
                                                    causal=causal, **rot)
                # sliding window, softcap and sinks (dense, varlen split-KV decode)
                sinks = torch.randn(8, device="cuda")
                flash_attn3.flash_attn_func(q, k, v, causal=causal, window_size=(31, 0 if causal else 17),
                                            softcap=15.0, sinks=sinks)
                flash_attn3.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=lens, window_size=(40, 0),
                                                    softcap=30.0, sinks=sinks, num_splits=3)
                # attention_chunk (on the local kernels), dense and split-KV decode
                flash_attn3.flash_attn_func(q, k, v, causal=causal, attention_chunk=19)
                flash_attn3.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=lens, attention_chunk=50,
                                                    causal=causal, num_splits=3)
                ran += 11
            except NotImplementedError:
                pass
# v head dim unlike q's (d 192 / dv 128 and a smaller pair on it): dense, varlen, split-KV decode, whole-block pages
for dtype in (torch.float16, torch.bfloat16):
    for d, dv in ((192, 128), (136, 104)):
        for causal in (False, True):
            q = torch.randn(2, 77, 8, d, device="cuda").to(dtype)
            k = torch.randn(2, 133, 2, d, device="cuda").to(dtype)
            v = torch.randn(2, 133, 2, dv, device="cuda").to(dtype)
            try:
                flash_attn3.flash_attn_func(q, k, v, causal=causal, window_size=(-1, -1) if causal else (40, 3))
                cu_q = torch.tensor([0, 77, 154], device="cuda", dtype=torch.int32)
                cu_k = torch.tensor([0, 133, 266], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   cu_q, cu_k, 77, 133, causal=causal)
                lens = torch.tensor([0, 133], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_with_kvcache(q[:, :3], k, v, cache_seqlens=lens, causal=causal, num_splits=0)
                kp = torch.randn(5, 128, 2, d, device="cuda").to(dtype)
                vp = torch.randn(5, 128, 2, dv, device="cuda").to(dtype)
                table = torch.tensor([[3, 0], [1, 4]], device="cuda", dtype=torch.int32)
                flash_attn3.flash_attn_with_kvcache(q[:, :3], kp, vp, cache_seqlens=lens, page_table=table,
                                                    causal=causal, num_splits=0)
                ran += 4
            except NotImplementedError:
                pass
torch.cuda.synchronize()
print(f"sanitize script: {ran} calls")
assert ran > 0, "no kernel built"
EOF
  : >"$OUT/sanitize.log"
  for tool in memcheck racecheck synccheck; do
    echo "--- compute-sanitizer --tool $tool" | tee -a "$OUT/sanitize.log"
    # The first reports (where the cause is) and the summary; Python's stack frames are dropped.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 1 "$PY" \
      "$script" >"$OUT/sanitize_tool.tmp" 2>&1 || rc=1
    grep -v '^frame #' "$OUT/sanitize_tool.tmp" | cut -c1-600 | head -n 40 | tee -a "$OUT/sanitize.log"
    grep -v '^frame #' "$OUT/sanitize_tool.tmp" | tail -n 4 | tee -a "$OUT/sanitize.log"
    rm -f "$OUT/sanitize_tool.tmp"
  done
  rm -f "$script"
  # Lying device-side metadata (cu_seqlens/seqused out of range): no access outside the tensors.
  echo "--- compute-sanitizer --tool memcheck pytest -k memory_safety" | tee -a "$OUT/sanitize.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 pytest -q -p no:cacheprovider \
    -k memory_safety tests 2>&1 | tail -n 15 | tee -a "$OUT/sanitize.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
  if [[ -x build_standalone/test_varlen_inference ]]; then
    for args in "--fp16 --batch_size 5 --max_seqlen_q 200 --max_seqlen_k 200 --head_size 80 --edge_lengths --causal" \
      "--fp8 --batch_size 5 --max_seqlen_q 200 --max_seqlen_k 200 --num_heads 8 --num_heads_k 2 --head_size 80 --edge_lengths --causal" \
      "--bf16 --batch_size 2 --max_seqlen_q 300 --max_seqlen_k 300 --num_heads 8 --num_heads_k 1 --head_size 128"; do
      echo "--- compute-sanitizer --tool memcheck test_varlen_inference $args --verify --iters 1" | tee -a "$OUT/sanitize.log"
      compute-sanitizer --tool memcheck --error-exitcode 1 ./build_standalone/test_varlen_inference $args --verify \
        --iters 1 2>&1 | tail -n 8 | tee -a "$OUT/sanitize.log"
      [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
    done
  fi
  return "$rc"
}

stage env env_info
# standalone and wheel build what they test (build_standalone.sh its own library, wheel its wheel); the other
# stages test the installed build.
NEEDS_BUILD=0
for s in "${STAGES[@]}"; do [[ "$s" == standalone || "$s" == wheel ]] || NEEDS_BUILD=1; done
reuse_build() {
  local so
  so="$(find "$(installed_pkg_dir 2>/dev/null)" -name '_C*.so' 2>/dev/null | head -n1)"
  [[ -n "$so" ]] || { echo "REUSE_BUILD=1 but no installed extension: building" >&2; return 1; }
  echo "REUSE_BUILD=1: testing the build installed by an earlier call ($so, $(stat -c %y "$so"))"
}
if [[ $NEEDS_BUILD -eq 0 ]]; then
  for s in "${STAGES[@]}"; do stage "$s" "$s"; done
elif { [[ "${REUSE_BUILD:-0}" == 1 ]] && reuse_build; } || stage build build; then
  # sass only when asked for (or `all`): CI checks the same kernels' SASS on every push, and here it costs
  # ~50 s of device time per call.
  for s in "${STAGES[@]}"; do
    [[ "$s" == build ]] || stage "$s" "$s"
  done
fi

{
  echo
  echo "=============== summary (${STAGES[*]}, $((SECONDS - START_ALL)) s) ==============="
  printf '%s\n' "${SUMMARY[@]}"
  [[ -f "$OUT/standalone.log" ]] && grep -E "^(RESULT|time|verify|not built)" "$OUT/standalone.log" | sed 's/^/standalone: /'
  [[ -f "$OUT/tests.log" ]] && echo "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" | tail -n 1)"
  [[ -f "$OUT/bench.log" ]] && grep -E '^head' "$OUT/bench.log" | sed 's/^/bench: /'
  echo "logs in \$OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
} | tee "$OUT/summary.txt"
exit $FAILED
