"""Build of flash_attn3: the Python package plus the CUDA extension flash_attn3._C.

The extension is csrc/flash_api.cpp (the only C++ that includes torch) linked with the torch-free kernels of
hopper/: hopper/api.cu, hopper/combine.cu, hopper/append_kv.cu and the instantiations that tools/kernels.py selects under the environment switches.
A record of what was compiled is written to flash_attn3/_build_config.py and imported at run time.

flash_api.cpp uses only torch's stable ABI at the level of torch 2.10 (TORCH_TARGET) and Python's limited API,
so the wheel (`pip wheel --no-build-isolation --no-deps . -w dist`, tagged cp310-abi3) installs into any
Python >= 3.10 with any torch >= 2.10, whichever torch >= 2.10 built it.

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


def _load_kernel_table():
    """tools/kernels.py, the one list of compiled kernels, under a module name of its own. Imported as plain
    `kernels` (tools/ on sys.path) it shadowed the Hugging Face package of that name, which transformers
    installs: setuptools then loaded that package's egg_info entry point from this file and the install failed
    ("No module named 'kernels._internals'; 'kernels' is not a package")."""
    spec = importlib.util.spec_from_file_location("flash_attn3_kernel_table", ROOT / "tools" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


kernels = _load_kernel_table()

SKIP_CUDA = os.environ.get("FLASH_ATTN3_SKIP_CUDA_BUILD", "0") == "1"

# The oldest torch the extension runs with: torch's stable headers hide every API newer than this
# TORCH_TARGET_VERSION (using one is a compile error), and it is the first release whose stable ABI is versioned.
TORCH_TARGET = (2, 10)
# Python's limited API: the version torch's BuildExtension sets as Py_LIMITED_API for a py_limited_api
# extension (0x030A0000), which the wheel's abi3 tag must match.
ABI3_TAG = "cp310"

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


def check_torch_version() -> None:
    """The stable headers of TORCH_TARGET must be there: a build against an older torch cannot target it."""
    import torch

    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < TORCH_TARGET:
        raise SystemExit(
            f"flash_attn3: the extension is built on torch's stable ABI of torch "
            f"{TORCH_TARGET[0]}.{TORCH_TARGET[1]}, and this Python's torch is {torch.__version__}; install torch >= "
            f"{TORCH_TARGET[0]}.{TORCH_TARGET[1]} to build (the wheel then runs with any torch from "
            f"{TORCH_TARGET[0]}.{TORCH_TARGET[1]} on)."
        )


# Of the libraries CUDAExtension links, the ones the stable-ABI extension uses: libtorch_cpu defines the C shim
# (aoti_torch_*, torch_*) and cudart the CUDA runtime the kernels call. c10, libtorch_cuda and friends export
# only unstable C++ symbols, which nothing here references; libtorch_cuda's one shim function (the current
# stream) is looked up at run time, so the extension also loads into a CPU-only torch. dl: dlsym, for that
# look-up (in libc from glibc 2.34, a separate library before).
STABLE_LIBRARIES = ("torch_cpu", "cudart")


def use_toolkit_for_cpu_torch() -> None:
    """Points torch's build helpers at the CUDA toolkit when torch itself has no CUDA.

    A CPU-only torch leaves cpp_extension.CUDA_HOME unset, yet the stable-ABI extension needs nothing of torch's
    CUDA build: only the toolkit (nvcc, the runtime) and torch's stable headers, the same in every build of a
    torch version. So the wheel can be built on a CPU-only machine, with the toolkit build_standalone.sh finds
    (CUDA_HOME, else the nvcc on PATH, else /usr/local/cuda*).
    """
    import torch
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is not None:
        return
    found = subprocess.run(["bash", str(ROOT / "build_standalone.sh"), "--print-cuda-home"], capture_output=True,
                           text=True)
    if found.returncode != 0 or not found.stdout.strip():
        raise SystemExit(f"flash_attn3: torch has no CUDA and no CUDA toolkit was found: {found.stderr.strip()}")
    cpp_extension.CUDA_HOME = found.stdout.strip()
    print(f"flash_attn3: torch {torch.__version__} has no CUDA; building with the toolkit at "
          f"{cpp_extension.CUDA_HOME}", file=sys.stderr)


def extension_modules():
    check_torch_version()
    use_toolkit_for_cpu_torch()
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
    target = f"-DTORCH_TARGET_VERSION=0x{(TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48):016x}"
    cxx_flags = [
        "-O3",
        "-std=c++17",
        target,
        # Only PyInit__C is exported: the inline code of torch's stable headers stays private to this library
        # instead of binding to a same-named symbol of whichever torch is loaded.
        "-fvisibility=hidden",
        *defines,
    ]
    write_build_config(True, selected)
    ext = CUDAExtension(
        name="flash_attn3._C",
        sources=sources,
        include_dirs=[str(ROOT / "hopper"), str(cutlass_inc)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        py_limited_api=True,  # BuildExtension then defines Py_LIMITED_API; the module is named _C.abi3.so
    )
    ext.libraries = [lib for lib in ext.libraries if lib in STABLE_LIBRARIES] + ["dl"]
    return [ext]


if SKIP_CUDA:
    write_build_config(False, [])
    ext_modules, cmdclass, options = [], {}, {}
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
    options = {"bdist_wheel": {"py_limited_api": ABI3_TAG}}  # the wheel's tag: cp310-abi3

setup(
    name="flash_attn3",
    version="0.1.0",
    description="FlashAttention-3-compatible SM90 (Hopper) attention forward kernels on CUTLASS/CuTe",
    packages=find_packages(include=["flash_attn3", "flash_attn3.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
