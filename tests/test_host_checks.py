"""Host-side checks of device arithmetic that needs no GPU, compiled and run here (skipped without the compiler):
the scheduler's multiply-shift tile mapping against plain division over random grids (tools/check_tile_mapping.cu,
hopper/tile_scheduler.h), and the epilogue's quad transpose for 16-byte O stores simulated on four lanes
(tools/check_quad_transpose.cpp, the two shfl.xor stages of hopper/epilogue_fwd_sm90.h), and that the consumers'
shared-memory operand views depend on the warpgroup only (tools/check_wg_slice.cu: the premise of building the
WGMMA descriptors from the warpgroup index), and the FP8 V copy's byte-permute transpose against the key order
it must produce (tools/check_vt_transpose.cu, hopper/fp8_vt.h)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                        "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.exists(cand):
            return cand
    return None


def _cutlass() -> str | None:
    try:
        out = subprocess.run(["bash", str(ROOT / "build_standalone.sh"), "--print-cutlass"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    return path if path and os.path.isdir(path) else None


def _run_host_check(tmp_path, name: str, timeout: int, flags=(),
                    build_timeout: int = 300) -> subprocess.CompletedProcess:
    """Builds tools/NAME.cu for the host (hopper/ and CUTLASS on the include path) and runs it; skips without
    nvcc or the CUTLASS headers."""
    nvcc, cutlass = _nvcc(), _cutlass()
    if nvcc is None or cutlass is None:
        pytest.skip("needs nvcc and the CUTLASS headers")
    exe = tmp_path / name
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", *flags, "-I", str(ROOT / "hopper"), "-I",
                    cutlass, str(ROOT / "tools" / f"{name}.cu"), "-o", str(exe)], check=True, timeout=build_timeout)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)


def test_tile_mapping_matches_plain_division(tmp_path):
    out = _run_host_check(tmp_path, "check_tile_mapping", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: ") and "MISMATCH" not in out.stdout


def test_fp8_v_copy_transpose_matches_the_key_order(tmp_path):
    out = _run_host_check(tmp_path, "check_vt_transpose", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: ") and "MISMATCH" not in out.stdout


def test_quad_transpose_gives_each_lane_its_columns(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    exe = tmp_path / "check_quad_transpose"
    subprocess.run([cxx, "-O2", str(ROOT / "tools" / "check_quad_transpose.cpp"), "-o", str(exe)], check=True,
                   timeout=120)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "transpose ok" in out.stdout, out.stdout + out.stderr


def test_operand_views_depend_on_the_warpgroup_only(tmp_path):
    out = _run_host_check(tmp_path, "check_wg_slice", timeout=120, build_timeout=600,
                          flags=("-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED", "-diag-suppress", "3357"))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "OK" and len(lines) == 9
    assert all(" 0 differ " in ln and ln.endswith("distinct: yes") for ln in lines[:-1])

