#!/usr/bin/env bash
# tools/profile.sh: Nsight Compute profiles of benchmarks/profile_case.py calls on the device, as text, into
# $OUT/profile.log: the summary sections for each CASE:BACKEND, and for ours the top stall locations in SASS
# (tools/ncu_hotspots.py). Needs the extension installed (tools/gpu_check.sh build) and, for fa3, the carried
# fa3-fwd wheel.   Usage: bash tools/profile.sh prefill:ours prefill:fa3 page16:ours ...
# NCU_KERNELS (regex, default fwd_kernel|device_kernel) and NCU_COUNT (default 1) pick the profiled launches,
# e.g. NCU_KERNELS="fwd_kernel|combine_kernel" NCU_COUNT=2 for decode1 (the split kernel and its combine).
# NCU_HOTSPOTS_ALL=1: the SASS stall hot spots for every backend (FA3's too), not only ours.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/profile.log"
if compgen -G ".whl/fa3_fwd-*.whl" >/dev/null; then
  python -m pip install -q --no-deps --no-index --target /tmp/fa3 .whl/fa3_fwd-*.whl 2>/dev/null &&
    echo "from fa3_fwd_config import CONFIG" >/tmp/fa3/flash_attn_config.py
  export PYTHONPATH="/tmp/fa3${PYTHONPATH:+:$PYTHONPATH}"
fi
rc=0
for spec in "$@"; do
  c="${spec%%:*}" b="${spec##*:}"
  rep="/tmp/prof_${c}_${b}"
  {
    echo "################ $c ($b)"
    ncu --kernel-name regex:"${NCU_KERNELS:-fwd_kernel|device_kernel}" --launch-skip 3 --launch-count "${NCU_COUNT:-1}" \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \
      --section WarpStateStats --section SourceCounters --section LaunchStats --section Occupancy \
      --section InstructionStats --section MemoryWorkloadAnalysis \
      -f -o "$rep" python benchmarks/profile_case.py "$c" "$b" 2>&1 | tail -n 3
    ncu -i "$rep.ncu-rep" --page details 2>&1 | grep -v "^    ---" | cut -c1-160 | head -n 260
    if [[ "$b" == ours || -n "${NCU_HOTSPOTS_ALL:-}" ]]; then
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv" 2>&1
      python tools/ncu_hotspots.py "$rep.csv" 40 2>&1 | head -n 60
    fi
  } >>"$LOG" 2>&1 || rc=1
done
exit $rc
