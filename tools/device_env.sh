# tools/device_env.sh: the set-up the device-side experiment scripts share (sourced by tools/exp_ab.sh and
# tools/exp_trace.sh): the repository root as the working directory, $OUT, pip pointed at the carried wheels
# in .whl/ (the device has no network), the CUTLASS wheel installed, and FA3 (the fa3-fwd wheel, with the
# one-line flash_attn_config.py its interface imports) importable from /tmp/fa3 for the benchmark.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$ROOT/.whl" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0 >/dev/null 2>&1
python -m pip install -q --no-deps --no-index --target /tmp/fa3 .whl/fa3_fwd-*.whl >/dev/null 2>&1 &&
  echo "from fa3_fwd_config import CONFIG" >/tmp/fa3/flash_attn_config.py
export PYTHONPATH="/tmp/fa3${PYTHONPATH:+:$PYTHONPATH}"
