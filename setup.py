"""Build of flash_attn3: the Python package plus the CUDA extension flash_attn3._C.

The extension is csrc/flash_api.cpp (the only C++ that includes torch) linked with the torch-free kernels of
hopper/: hopper/api.cu, hopper/combine.cu, hopper/append_kv.cu and the instantiations that tools/kernels.py selects under the environment switches.
A record of what was compiled is written to flash_attn3/_build_config.py and imported at run time.

Environment:
  FLASH_ATTN3_SKIP_CUDA_BUILD=1  install the pure-Python parts only (CPU-only machines, CI)
  FLASH_ATTN3_DTYPES, FLASH_ATTN3_HDIMS  compile a subset of kernels (see tools/kernels.py)
  CUTLASS_DIR                    a CUTLASS checkout or install whose include/ has cute/ and cutlass/
  MAX_JOBS                       parallel compile jobs (ninja)
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import kernels  # noqa: E402  (tools/kernels.py: the one list of compiled kernels)

SKIP_CUDA = os.environ.get("FLASH_ATTN3_SKIP_CUDA_BUILD", "0") == "1"

def find_cutlass_include() -> Path:
    """CUTLASS_DIR, then third_party/cutlass, then the nvidia-cutlass wheel (found without importing it)."""
    candidates = []
    if os.environ.get("CUTLASS_DIR"):
        candidates.append(Path(os.environ["CUTLASS_DIR"]) / "include")
    candidates.append(ROOT / "third_party" / "cutlass" / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    for inc in candidates:
        if (inc / "cute" / "tensor.hpp").exists() and (inc / "cutlass" / "cutlass.h").exists():
            return inc
    raise SystemExit(
        "flash_attn3: CUTLASS/CuTe headers not found. Install them with\n"
        "    pip install --no-deps nvidia-cutlass==4.2.0.0\n"
        "or point CUTLASS_DIR at a CUTLASS 4.2 tree (the folder whose include/ holds cute/ and cutlass/).\n"
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


def links_shared_libstdcxx(cxx: str) -> bool:
    """Whether `cxx` links C++ shared objects against the shared libstdc++ (as torch itself is linked).

    A compiler that links a private static copy instead (seen on an image whose CXX wrapper's search path holds
    only libstdc++.a) builds an extension that crashes the first time torch formats an error message: two
    copies of the C++ runtime's locale state. Checked by building a tiny shared object that uses std::string
    and exceptions and looking for libstdc++.so among the libraries it needs (the DT_NEEDED name is in the
    file's dynamic string table).
    """
    argv = shlex.split(cxx)
    if not argv or shutil.which(argv[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text('#include <stdexcept>\n#include <string>\n'
                       'std::string probe(int i) { if (i < 0) throw std::runtime_error("x"); return std::to_string(i); }\n')
        try:
            subprocess.run([*argv, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, capture_output=True,
                           timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return b"libstdc++.so" in lib.read_bytes()


def choose_host_compiler() -> None:
    """Makes sure the extension is compiled and linked by a C++ compiler that uses the shared libstdc++.

    Keeps $CXX (or c++) when it does; otherwise switches CXX and CC to the first compiler pair on the machine
    that does, and says so; otherwise stops the build with what to do. No hand-set environment is needed.
    """
    current = os.environ.get("CXX", "c++")
    if links_shared_libstdcxx(current):
        return
    for cxx, cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc"), ("g++", "gcc"),
                    ("clang++", "clang")):
        if cxx != current and links_shared_libstdcxx(cxx):
            print(f"flash_attn3: CXX={current} links a static libstdc++ (the extension would crash on its first "
                  f"error message); building with CXX={cxx} CC={cc} instead", file=sys.stderr)
            os.environ["CXX"], os.environ["CC"] = cxx, cc
            return
    raise SystemExit(
        f"flash_attn3: the C++ compiler CXX={current} does not link the shared libstdc++, and no other compiler "
        "found here does; an extension built with it crashes on its first error message. Install the "
        "distribution's g++ (e.g. apt-get install g++) or set CXX/CC to a compiler that links "
        "libstdc++.so, then build again."
    )


def write_build_config(built: bool, fwd_kernels) -> None:
    (ROOT / "flash_attn3" / "_build_config.py").write_text(kernels.build_record(built, fwd_kernels))


def extension_modules():
    from torch.utils.cpp_extension import CUDAExtension

    choose_host_compiler()
    selected = kernels.selected_kernels()
    cutlass_inc = find_cutlass_include()
    defines = [f"-D{k.define}" for k in selected]
    nvcc_flags = [
        "-gencode=arch=compute_90a,code=sm_90a",  # wgmma/setmaxnreg need sm_90a; -arch=sm_90a adds a useless pass
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-O3",
        "-DNDEBUG",
        "--use_fast_math",
        "-lineinfo",
        "-Xptxas=-v",  # registers / spills per kernel in the build log; tools/check_sass.py reads them
        # WGMMA N sizes that are not multiples of 32 (the 176-wide key blocks) exist only behind this switch.
        "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
        # torch's defaults disable half operators for its own reasons; CUTLASS's numeric types want them.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        *defines,
    ]
    sources = ["csrc/flash_api.cpp", "hopper/api.cu", "hopper/combine.cu", "hopper/append_kv.cu"] + [str(k.source.relative_to(ROOT)) for k in selected]
    write_build_config(True, selected)
    return [
        CUDAExtension(
            name="flash_attn3._C",
            sources=sources,
            include_dirs=[str(ROOT / "hopper"), str(cutlass_inc)],
            extra_compile_args={"cxx": ["-O3", "-std=c++17", *defines], "nvcc": nvcc_flags},
        )
    ]


if SKIP_CUDA:
    write_build_config(False, [])
    ext_modules, cmdclass = [], {}
else:
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        raise SystemExit(
            f"flash_attn3: the extension is built against the torch of the Python running this build "
            f"({sys.executable}), which has no torch. Run pip through the Python that has torch: "
            "`python -m pip install --no-build-isolation .` (a bare `pip` may belong to another Python), "
            "or set FLASH_ATTN3_SKIP_CUDA_BUILD=1 for the pure-Python parts."
        ) from None

    ext_modules = extension_modules()
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="flash_attn3",
    version="0.1.0",
    description="FlashAttention-3-compatible SM90 (Hopper) attention forward kernels on CUTLASS/CuTe",
    packages=find_packages(include=["flash_attn3", "flash_attn3.*"]),
    python_requires=">=3.9",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
