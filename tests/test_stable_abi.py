"""The extension is built on torch's stable ABI, so that one abi3 wheel runs with every torch >= 2.10.

On any machine: csrc/flash_api.cpp includes nothing of torch but the stable headers (checked on the source,
and by compiling it against a copy of torch's include tree that holds only them, at the API level setup.py
targets), and the NotImplementedError bridge works: C++ cannot raise NotImplementedError through the stable
ABI, so the op's message carries a tag that flash_attn3._ops re-raises as NotImplementedError.
With a built extension (a CPU-only torch can load it too): the registered schemas are the source's, and a
call that cannot run fails with a clear RuntimeError. On an SM90 GPU: an unbuilt configuration is a
NotImplementedError through the wrappers and a tagged RuntimeError through torch.ops.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from flash_attn3 import _ops

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "csrc" / "flash_api.cpp"
STABLE_HEADER_DIRS = ("torch/csrc/stable/", "torch/headeronly/", "torch/csrc/inductor/aoti_torch/c/")
# tools/gpu_check.sh's wheel stage runs these tests from a copy of tests/ beside no source tree.
needs_source = pytest.mark.skipif(not CPP.exists(), reason="no source tree beside tests/ (testing an installed wheel)")


def _code() -> str:
    """flash_api.cpp without its comments and string literals (what the compiler sees as code)."""
    text = re.sub(r"//[^\n]*", "", CPP.read_text())
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)


def _target_version() -> tuple[int, int]:
    """setup.py's TORCH_TARGET (read from the file: running setup.py would build)."""
    found = re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", (ROOT / "setup.py").read_text(), re.M)
    assert found, "setup.py: no TORCH_TARGET = (major, minor) line"
    return int(found.group(1)), int(found.group(2))


def _schemas_from_source() -> dict[str, str]:
    """Every m.def(...) schema of flash_api.cpp, by op name."""
    schemas = {}
    for body in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', CPP.read_text()):
        text = "".join(re.findall(r'"([^"]*)"', body))
        schemas[text.split("(", 1)[0]] = text
    return schemas


@needs_source
def test_source_includes_only_stable_torch_headers():
    includes = re.findall(r"^#include\s*[<\"]([^>\"]+)[>\"]", CPP.read_text(), re.M)
    torch_includes = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "caffe2", "pybind11")]
    assert torch_includes, "no torch header found: the pattern no longer matches the file"
    unstable = [h for h in torch_includes if not h.startswith(STABLE_HEADER_DIRS)]
    assert not unstable, f"csrc/flash_api.cpp includes torch headers outside the stable ABI: {unstable}"
    code = _code()
    for token in ("at::", "c10::", "TORCH_CHECK", "TORCH_LIBRARY", "pybind11"):
        assert not re.search(rf"(?<![\w:]){re.escape(token)}", code), f"csrc/flash_api.cpp uses {token}"


def _cuda_include() -> Path | None:
    found = subprocess.run(["bash", str(ROOT / "build_standalone.sh"), "--print-cuda-home"], capture_output=True,
                           text=True)
    home = Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None
    return home / "include" if home and (home / "include" / "cuda_runtime_api.h").exists() else None


@needs_source
def test_source_compiles_against_the_stable_headers_alone(tmp_path):
    """The strongest form of the include rule: torch's include tree reduced to the stable-ABI folders, and the
    API level of setup.py's target (newer stable APIs are compile errors there)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    cuda_include = _cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers (cuda_runtime_api.h)")
    major, minor = _target_version()
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (major, minor):
        pytest.skip(f"torch {torch.__version__} is older than the target {major}.{minor}")
    torch_include = Path(torch.__file__).parent / "include"
    for folder in STABLE_HEADER_DIRS:
        shutil.copytree(torch_include / folder, tmp_path / folder)
    target = (major << 56) | (minor << 48)
    command = [cxx, "-std=c++17", "-fsyntax-only", f"-DTORCH_TARGET_VERSION={target:#x}",
               "-DPy_LIMITED_API=0x030A0000", f"-I{tmp_path}", f"-I{cuda_include}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'hopper'}", str(CPP)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"


@needs_source
def test_not_implemented_tag_is_the_same_on_both_sides():
    found = re.search(r'kNotImplementedTag\[\] = "([^"]*)"', CPP.read_text())
    assert found, "csrc/flash_api.cpp: no kNotImplementedTag"
    assert found.group(1) == _ops.NOT_IMPLEMENTED_TAG


def _raising_ops(exc: Exception):
    """A stand-in for torch whose flash_attn3 ops all raise `exc` (as the C++ ops raise through the stable ABI)."""

    def op(*args):
        raise exc

    namespace = types.SimpleNamespace(fwd=op, combine=op, append_kv=op, plan=op)
    return types.SimpleNamespace(ops=types.SimpleNamespace(flash_attn3=namespace))


WRAPPERS = {"fwd": lambda: _ops.fwd(1, 2), "combine": lambda: _ops.combine(1, 2, 3, 4),
            "append_kv": lambda: _ops.append_kv(1, 2), "plan": lambda: _ops.plan(1, 2)}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrappers_reraise_tagged_errors_as_not_implemented(monkeypatch, wrapper):
    message = "flash_attn3 fwd: no kernel was compiled for this configuration: q/k/v dtype float8_e4m3fn"
    monkeypatch.setattr(_ops, "torch", _raising_ops(RuntimeError(_ops.NOT_IMPLEMENTED_TAG + message)))
    with pytest.raises(NotImplementedError) as info:
        WRAPPERS[wrapper]()
    assert str(info.value) == message
    assert isinstance(info.value, RuntimeError)  # callers that catch RuntimeError still catch it


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrappers_pass_other_errors_through(monkeypatch, wrapper):
    error = RuntimeError("flash_attn3 fwd: softcap must be finite and >= 0 (0 = off), got -1")
    monkeypatch.setattr(_ops, "torch", _raising_ops(error))
    with pytest.raises(RuntimeError) as info:
        WRAPPERS[wrapper]()
    assert info.value is error and not isinstance(info.value, NotImplementedError)


needs_extension = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason=f"flash_attn3._C is not built or did not load "
                                                                     f"({_ops.LOAD_ERROR})")


@needs_extension
def test_extension_is_the_abi3_build():
    import flash_attn3._C as ext

    assert Path(ext.__file__).name == "_C.abi3.so", ext.__file__


@needs_source
@needs_extension
@pytest.mark.parametrize("name", ["fwd", "combine", "append_kv", "plan"])
def test_registered_schema_is_the_source_schema(name):
    registered = str(getattr(torch.ops.flash_attn3, name).default._schema)
    assert registered == f"flash_attn3::{_schemas_from_source()[name]}"


@needs_extension
def test_ops_are_registered_for_their_dispatch_keys():
    for name in ("fwd", "combine", "append_kv"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flash_attn3::{name}", "CUDA"), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flash_attn3::plan", "CompositeExplicitAutograd")


@needs_extension
def test_cpu_tensors_are_refused_by_the_dispatcher():
    q = torch.zeros(1, 8, 1, 64)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.flash_attn3.combine(q.unsqueeze(0), q[..., 0].unsqueeze(0), q, q[..., 0])


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a machine without a CUDA device fails")
def test_plan_without_a_cuda_device_fails_clearly():
    args = (1, 128, 128, 8, 8, 128, 128, torch.bfloat16, False, -1, -1, 0, 0.0, 0, -1, 0, torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"flash_attn3 fwd: CUDA error in SM count"):
        torch.ops.flash_attn3.plan(*args)


def _unbuilt_head_dims():
    """A (dtype, d, dv) with no kernel in this build: fp8 d 64 with dv 256 (a pair the checks accept, built for
    16-bit only; the 16-bit dv 512 the checks also accept is refused by the C++ layer as out of range), or,
    for a build without some dtype's d 256, that one."""
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        if _ops.BUILD.compiled_head_dim(dtype, 256) is None:
            return dtype, 256, 256
    assert _ops.BUILD.compiled_head_dims(torch.float8_e4m3fn, 64, 256) is None
    return torch.float8_e4m3fn, 64, 256


@pytest.mark.gpu
def test_unbuilt_configuration_is_not_implemented_error():
    dtype, d, dv = _unbuilt_head_dims()
    # plan(batch, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k, head_dim, head_dim_v, qkv_dtype, varlen_q,
    #      window_size_left, window_size_right, attention_chunk, softcap, num_splits, pack_gqa, sm_margin, device)
    args = (1, 128, 128, 8, 8, d, dv, dtype, False, -1, -1, 0, 0.0, 0, -1, 0, torch.device("cuda", 0))
    with pytest.raises(NotImplementedError, match="no forward kernel built|not implemented yet") as info:
        _ops.plan(*args)
    assert not str(info.value).startswith(_ops.NOT_IMPLEMENTED_TAG)
    with pytest.raises(RuntimeError, match=f"^{_ops.NOT_IMPLEMENTED_TAG}flash_attn3 plan: "):
        torch.ops.flash_attn3.plan(*args)

