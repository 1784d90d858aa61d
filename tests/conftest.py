"""Shared pytest setup: the `gpu` marker and the reason GPU tests are skipped on this machine.

Tests marked `@pytest.mark.gpu` (or using the `gpu` fixture) run only with a CUDA device of compute
capability 9.0 and a loaded flash_attn3._C; otherwise they are skipped with the reason, which `-rs` (set in
pytest.ini) prints in the summary. Nothing is seeded globally: every test draws fresh random inputs, and
the autouse `seed` fixture draws a fresh seed per test and reports it with a failure so it can be replayed.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` from the repository root puts the root on sys.path, where the source copy of
# flash_attn3 (no compiled _C) would shadow an installed build; the tests are of that build, so the root is
# dropped when the source copy has no extension and an installed copy elsewhere on the path has one.
_ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    return Path(entry or ".").resolve() == _ROOT


def _has_extension(entry: str) -> bool:
    return any((Path(entry or ".") / "flash_attn3").glob("_C*.so"))


if not _has_extension(str(_ROOT)) and any(_has_extension(p) for p in sys.path if not _is_root(p)):
    sys.path[:] = [p for p in sys.path if not _is_root(p)]


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here, or None if they can."""
    if not torch.cuda.is_available():
        return "no CUDA device available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"flash_attn3 kernels need SM90 (Hopper); device 0 is sm_{major}{minor}"
    from flash_attn3 import _ops

    if not _ops.HAS_EXTENSION:
        return f"flash_attn3._C did not load: {_ops.LOAD_ERROR}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if not checked:
            reason, checked = gpu_skip_reason(), True
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def gpu():
    """The CUDA device for tests that need the kernels; skips (with the reason) when they cannot run."""
    reason = gpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test (never a fixed one), applied to torch's and Python's RNGs and printed with a
    failure so the failing inputs can be replayed."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    return value


# The messages of flash_attn3/_checks.py check_supported for a kernel or feature the build left out.
_NOT_BUILT = ("has no compiled kernel for", "is not built into this flash_attn3 installation",
              "kernel for that pair is built", "no kernel was compiled for this configuration")


@functools.lru_cache(maxsize=1)
def _subset_build() -> bool:
    """Whether this install compiled fewer kernels than tools/kernels.py lists (a FLASH_ATTN3_DTYPES /
    FLASH_ATTN3_HDIMS build): only there may a test meet a kernel that is not built."""
    try:
        from flash_attn3 import _build_config as rec

        # Under a name of its own: plain `kernels` is also the Hugging Face package transformers imports.
        spec = importlib.util.spec_from_file_location("flash_attn3_kernel_table", _ROOT / "tools" / "kernels.py")
        kernels = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = kernels  # its dataclasses look their module up by name
        spec.loader.exec_module(kernels)
        return len(set(rec.FWD_KERNELS)) < len(kernels.all_kernels())
    except Exception:  # noqa: BLE001 - no record or no tools/: assume a full build (failures stay failures)
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # In a subset build, a test whose call needs an unbuilt kernel skips with the library's reason instead of
    # failing; in a full build the same error is a failure.
    # The raw op (torch.ops.flash_attn3.fwd, stable ABI) raises the C++ NotImplementedError as a RuntimeError
    # whose text starts "NotImplementedError:", and torch's opcheck wraps it again: the text decides there.
    if (report.failed and call.excinfo is not None and _subset_build()
            and (call.excinfo.errisinstance(NotImplementedError) or "NotImplementedError" in str(call.excinfo.value))
            and any(m in str(call.excinfo.value) for m in _NOT_BUILT)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: subset build: {call.excinfo.value}")
        return
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"torch.manual_seed({seeds[0]}); random.seed({seeds[0]}) reproduces "
                                            "this test's inputs"))
