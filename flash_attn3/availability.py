"""Whether the flash_attn3 kernels can run in this process, and why not.

`is_available()` is True only when torch sees a CUDA device, the current device is SM90 (compute capability
9.0, Hopper) and the compiled extension `flash_attn3._C` loaded. It never raises; `unavailable_reason()`
gives the first failed condition as a sentence (None when available). `device_unavailable_reason(device)`
is the same check for one given CUDA device (used by flash_attn3.sdpa for the device of its inputs).
"""
from __future__ import annotations

import torch

_SM90 = (9, 0)


def _extension_reason() -> str | None:
    from flash_attn3 import _ops

    if not _ops.HAS_EXTENSION:
        return f"the flash_attn3 CUDA extension is not loaded ({_ops.LOAD_ERROR})"
    return None


def device_unavailable_reason(device=None) -> str | None:
    """Why the kernels cannot run on `device` (a CUDA device, index or None for the current one), or None."""
    try:
        if not torch.cuda.is_available():
            return "no CUDA device available (torch.cuda.is_available() is False)"
        if device is not None:
            device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            if device.type != "cuda":
                return f"device {device} is not a CUDA device"
        cap = tuple(torch.cuda.get_device_capability(device))
        if cap != _SM90:
            name = torch.cuda.get_device_name(device)
            return (f"flash_attn3 kernels need an SM90 (Hopper) GPU; {name} is sm_{cap[0]}{cap[1]}")
        return _extension_reason()
    except Exception as exc:  # noqa: BLE001 -- never raise: report the failure as the reason
        return f"could not query the CUDA device ({type(exc).__name__}: {exc})"


def unavailable_reason() -> str | None:
    """Why flash_attn3's kernels cannot run on the current CUDA device, or None when they can."""
    return device_unavailable_reason(None)


def is_available() -> bool:
    """True when the kernels can run on the current CUDA device (SM90 and extension loaded). Never raises."""
    return unavailable_reason() is None


def get_flash_attention_version() -> str:
    """flash_attn3.__version__ (imported lazily: flash_attn3/__init__.py may import this module)."""
    import flash_attn3

    return flash_attn3.__version__
