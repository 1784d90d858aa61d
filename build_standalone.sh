#!/usr/bin/env bash
# build_standalone.sh: builds the forward kernels with nvcc alone (no torch, no Python build system) into
#   build_standalone/test_varlen_inference  the command-line runner (static cudart; standalone guide's CLI)
#   build_standalone/libflash_attn3.so      the torch-free library: C API in hopper/flash_attn3.h (and the
#                                           guide's mha_fwd_standalone in hopper/flash_api_standalone.h)
#   build_standalone/flash3_example         hopper/standalone/example.c, a C program linked against the .so
# It compiles hopper/*.cu (dispatch, C API), the instantiation files that tools/kernels.py selects
# (FLASH_ATTN3_DTYPES / FLASH_ATTN3_HDIMS) and the runner, one translation unit per process, with ninja when
# it is installed (incremental, header dependencies tracked) or xargs -P. Every TU's `-Xptxas -v` report
# (registers, spills) is collected in build_standalone/ptxas.log.
#
# Usage: bash build_standalone.sh [--objects-only] [--check] [-j N] [--clean]
#        bash build_standalone.sh --print-cuda-home | --print-cutlass
# The two --print options are how .ci/run and tools/gpu_check.sh find CUDA and CUTLASS the same way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="$ROOT/build_standalone"
PYTHON="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-2}"  # each kernel TU peaks at 4-6 GB (shared/research/build.md section 3)

usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --objects-only     compile every TU, do not link (a compile check)
  --check            after building, run tools/check_sass.py on the result (HGMMA present, no spills)
  -j N               parallel compiles (default: $MAX_JOBS, else 2)
  --clean            remove build_standalone/ first
  --print-cuda-home  print the CUDA toolkit root this script would use, then exit
  --print-cutlass    print the CUTLASS include directory this script would use, then exit
Environment: CUDA_HOME, CUTLASS_DIR, MAX_JOBS, FLASH_ATTN3_DTYPES, FLASH_ATTN3_HDIMS, PYTHON, NVCC_EXTRA_FLAGS,
             CC (the C compiler of the example; default cc)
EOF
}

die() {
  echo "build_standalone.sh: error: $*" >&2
  exit 1
}

# The toolkit root is the folder whose include/ holds cuda_runtime.h. The nvcc on PATH may be a small shell
# wrapper that execs the real one (as on the dev box), so dirname(dirname(which nvcc)) is not enough: follow
# symlinks, and read the wrapper's exec line.
find_cuda_home() {
  local cand nvcc_path real
  if [[ -n "${CUDA_HOME:-}" ]]; then
    [[ -f "$CUDA_HOME/include/cuda_runtime.h" && -x "$CUDA_HOME/bin/nvcc" ]] ||
      die "CUDA_HOME=$CUDA_HOME has no include/cuda_runtime.h or bin/nvcc"
    echo "$CUDA_HOME"
    return
  fi
  if [[ -n "${CUDA_PATH:-}" && -f "$CUDA_PATH/include/cuda_runtime.h" ]]; then
    echo "$CUDA_PATH"
    return
  fi
  if nvcc_path="$(command -v nvcc 2>/dev/null)"; then
    real="$(readlink -f "$nvcc_path")"
    if ! file_is_elf "$real"; then
      # A script wrapper: take the first absolute path to an nvcc that it names.
      local target
      target="$(grep -oE '/[^[:space:]"'\'']*/nvcc' "$real" | head -n1 || true)"
      [[ -n "$target" ]] && real="$(readlink -f "$target")"
    fi
    cand="$(dirname "$(dirname "$real")")"
    [[ -f "$cand/include/cuda_runtime.h" ]] && { echo "$cand"; return; }
  fi
  for cand in /usr/local/cuda /usr/local/cuda-1[0-9].[0-9]*; do
    [[ -f "$cand/include/cuda_runtime.h" && -x "$cand/bin/nvcc" ]] && { echo "$cand"; return; }
  done
  die "no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME to the root whose include/ has cuda_runtime.h"
}

file_is_elf() {
  [[ "$(head -c 4 "$1" 2>/dev/null)" == $'\x7fELF' ]]
}

# Same search order as setup.py: $CUTLASS_DIR, third_party/cutlass, then the nvidia-cutlass wheel, located
# with find_spec so that its Python package (which wants optional dependencies) is never imported.
find_cutlass() {
  local dir
  if [[ -n "${CUTLASS_DIR:-}" ]]; then
    [[ -d "$CUTLASS_DIR/include/cute" ]] || die "CUTLASS_DIR=$CUTLASS_DIR has no include/cute"
    echo "$CUTLASS_DIR/include"
    return
  fi
  if [[ -d "$ROOT/third_party/cutlass/include/cute" ]]; then
    echo "$ROOT/third_party/cutlass/include"
    return
  fi
  dir="$("$PYTHON" - <<'EOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("cutlass_library")
if spec and spec.origin:
    inc = os.path.join(os.path.dirname(spec.origin), "source", "include")
    if os.path.isdir(os.path.join(inc, "cute")):
        print(inc)
EOF
)"
  if [[ -n "$dir" ]]; then
    echo "$dir"
    return
  fi
  cat >&2 <<EOF
build_standalone.sh: error: CUTLASS headers not found. Get them one of these ways:
  pip install --no-deps nvidia-cutlass==4.2.0.0     (headers only; into the python that '$PYTHON' runs)
  export CUTLASS_DIR=/path/to/cutlass               (a checkout or copy holding include/cute)
  git clone --depth 1 -b v4.2.0 https://github.com/NVIDIA/cutlass third_party/cutlass
EOF
  exit 1
}

OBJECTS_ONLY=0
CHECK=0
CLEAN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --objects-only) OBJECTS_ONLY=1 ;;
    --check) CHECK=1 ;;
    --clean) CLEAN=1 ;;
    -j) shift; JOBS="${1:?-j needs a number}" ;;
    -j*) JOBS="${1#-j}" ;;
    --print-cuda-home) find_cuda_home; exit 0 ;;
    --print-cutlass) find_cutlass; exit 0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build_standalone.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "-j/MAX_JOBS must be a positive integer, got '$JOBS'"

CUDA_HOME="$(find_cuda_home)"
CUTLASS_INC="$(find_cutlass)"
NVCC="$CUDA_HOME/bin/nvcc"
cd "$ROOT"

# Sources. api.cu is the lead's dispatch; without it there is nothing to link the kernels into.
[[ -f hopper/api.cu ]] || die "hopper/api.cu does not exist yet: the forward dispatch has not been written, so there is nothing to compile"
mapfile -t INSTANTIATIONS < <("$PYTHON" tools/kernels.py --sources)
DEFINES="$("$PYTHON" tools/kernels.py --defines)"
LIB_SOURCES=(hopper/*.cu "${INSTANTIATIONS[@]}")
MAIN=hopper/standalone/test_varlen_inference.cu
EXAMPLE=hopper/standalone/example.c
SOURCES=("${LIB_SOURCES[@]}")
if [[ $OBJECTS_ONLY -eq 0 ]]; then
  [[ -f "$MAIN" ]] || die "$MAIN is missing (use --objects-only for a compile check)"
  SOURCES+=("$MAIN")
fi
CC_BIN="${CC:-cc}"

GENCODE="-gencode=arch=compute_90a,code=sm_90a"
# -lineinfo keeps source lines for ncu and compute-sanitizer at no runtime cost.
NVCC_FLAGS="$GENCODE -std=c++17 --expt-relaxed-constexpr -O3 -DNDEBUG --use_fast_math -lineinfo -Xcompiler -fPIC"
# WGMMA N sizes that are not multiples of 32 (the 176-wide key blocks) exist in CuTe only behind this switch.
NVCC_FLAGS+=" -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED"
NVCC_FLAGS+=" -Xptxas -v -I hopper -I $CUTLASS_INC $DEFINES ${NVCC_EXTRA_FLAGS:-}"

[[ $CLEAN -eq 1 ]] && rm -rf "$BUILD"
mkdir -p "$BUILD/obj"

echo "== build_standalone: nvcc $("$NVCC" --version | grep -o "release [0-9.]*") | CUDA_HOME=$CUDA_HOME"
echo "   CUTLASS: $CUTLASS_INC"
echo "   kernels: ${INSTANTIATIONS[*]##*/}"
echo "   jobs: $JOBS; objects-only: $OBJECTS_ONLY"

obj_of() { # hopper/instantiations/x.cu -> build_standalone/obj/x.o
  local base="${1##*/}"
  echo "$BUILD/obj/${base%.cu}.o"
}

OBJECTS=()
for src in "${SOURCES[@]}"; do OBJECTS+=("$(obj_of "$src")"); done
LIB_OBJECTS=("${OBJECTS[@]:0:${#LIB_SOURCES[@]}}")
EXE="$BUILD/test_varlen_inference"
LIB="$BUILD/libflash_attn3.so"
EXAMPLE_EXE="$BUILD/flash3_example"
# The runner links cudart statically (a self-contained binary). The library links the shared cudart so that a
# program linking both it and libcudart (the example) has one CUDA runtime, and finds it through its rpath.
CUDA_LIB="$CUDA_HOME/lib64"
[[ -d "$CUDA_LIB" ]] || CUDA_LIB="$CUDA_HOME/lib"
LINK_LIB="\$nvcc $GENCODE -shared -cudart shared -Xlinker -rpath,$CUDA_LIB \$in -o \$out"
LINK_EXAMPLE="$CC_BIN -std=c99 -O2 -Wall -Wextra -I $ROOT/hopper -I $CUDA_HOME/include \$in -L $BUILD -lflash_attn3 -L $CUDA_LIB -lcudart -Wl,-rpath,$BUILD -Wl,-rpath,$CUDA_LIB -lm -o \$out"
START=$SECONDS

if command -v ninja >/dev/null 2>&1; then
  # Each object's compiler output (the ptxas report) goes to <obj>.log; ninja shows it only on failure.
  {
    echo "# Generated by build_standalone.sh; rewritten on every run."
    echo "nvcc = $NVCC"
    echo "flags = $NVCC_FLAGS"
    echo "rule cu"
    echo "  command = \$nvcc \$flags -MD -MF \$out.d -c \$in -o \$out > \$out.log 2>&1 || { cat \$out.log; exit 1; }"
    echo "  depfile = \$out.d"
    echo "  deps = gcc"
    echo "  description = nvcc \$in"
    echo "rule link"
    echo "  command = \$nvcc $GENCODE -cudart static \$in -o \$out"
    echo "  description = link \$out"
    echo "rule link_lib"
    echo "  command = $LINK_LIB"
    echo "  description = link \$out"
    echo "rule c_example"
    echo "  command = $LINK_EXAMPLE"
    echo "  description = cc \$in"
    for i in "${!SOURCES[@]}"; do
      echo "build ${OBJECTS[$i]}: cu $ROOT/${SOURCES[$i]}"
    done
    if [[ $OBJECTS_ONLY -eq 0 ]]; then
      echo "build $EXE: link ${OBJECTS[*]}"
      echo "build $LIB: link_lib ${LIB_OBJECTS[*]}"
      echo "build $EXAMPLE_EXE: c_example $ROOT/$EXAMPLE | $LIB"
      echo "default $EXE $LIB $EXAMPLE_EXE"
    else
      echo "default ${OBJECTS[*]}"
    fi
  } >"$BUILD/build.ninja"
  ninja -f "$BUILD/build.ninja" -j "$JOBS"
else
  echo "   (ninja not found: compiling everything with xargs -P $JOBS; 'pip install ninja' makes rebuilds incremental)"
  export NVCC NVCC_FLAGS
  # shellcheck disable=SC2016  # the xargs command is expanded by its own bash
  for i in "${!SOURCES[@]}"; do printf '%s\t%s\n' "${SOURCES[$i]}" "${OBJECTS[$i]}"; done |
    xargs -P "$JOBS" -L 1 bash -c '
      echo "nvcc $0"
      $NVCC $NVCC_FLAGS -c "$0" -o "$1" > "$1.log" 2>&1 || { cat "$1.log"; echo "FAILED: $0" >&2; exit 255; }'
  if [[ $OBJECTS_ONLY -eq 0 ]]; then
    "$NVCC" $GENCODE -cudart static "${OBJECTS[@]}" -o "$EXE"
    # The link commands are written with ninja's $in/$out/$nvcc, which bash expands from the environment.
    in="${LIB_OBJECTS[*]}" out="$LIB" nvcc="$NVCC" bash -c "$LINK_LIB"
    in="$ROOT/$EXAMPLE" out="$EXAMPLE_EXE" bash -c "$LINK_EXAMPLE"
  fi
fi

# One ptxas log for tools/check_sass.py and for reading by eye, one section per translation unit.
: >"$BUILD/ptxas.log"
for i in "${!SOURCES[@]}"; do
  { echo "### ${SOURCES[$i]}"; cat "${OBJECTS[$i]}.log" 2>/dev/null || true; } >>"$BUILD/ptxas.log"
done
echo "== built in $((SECONDS - START)) s; ptxas report: ${BUILD#"$ROOT"/}/ptxas.log"
[[ $OBJECTS_ONLY -eq 0 ]] && echo "   runner: ${EXE#"$ROOT"/} | library: ${LIB#"$ROOT"/} | C example: ${EXAMPLE_EXE#"$ROOT"/}"

if [[ $CHECK -eq 1 ]]; then
  if [[ $OBJECTS_ONLY -eq 1 ]]; then
    "$PYTHON" tools/check_sass.py --ptxas-log "$BUILD/ptxas.log" "${OBJECTS[@]}"
  else
    "$PYTHON" tools/check_sass.py --ptxas-log "$BUILD/ptxas.log" "$EXE"
  fi
fi
