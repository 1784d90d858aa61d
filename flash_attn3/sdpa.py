"""`sdpa`: torch.nn.functional.scaled_dot_product_attention's signature and (b, h, s, d) layout, run on the
flash_attn3 kernel when it can, and on torch's own SDPA otherwise.

The kernel is called on `x.transpose(1, 2)` views, i.e. FA3's (b, s, h, d) layout without copies (the
kernel takes strided views whose last dimension is contiguous; an input whose last dimension is not
contiguous is copied first), and its output is handed back as the transposed (b, h, s, d) view.

torch's SDPA (same arguments) is used instead when any of these holds: an attn_mask is given, dropout_p > 0,
the inputs are not 4-D, not float16/bfloat16 (or of different dtypes), not on one CUDA device, the device
cannot run the kernels (flash_attn3.availability), an input requires grad while grad mode is on (the kernel
is forward-only), q/k/v head dims differ or have no compiled kernel, k and v head counts differ, q's head
count differs from k's without enable_gqa (torch then raises its own error) or is not a multiple of it, the
batch sizes differ, is_causal with seqlen_q != seqlen_k (torch's causal mask is top-left aligned, FA3's
bottom-right, so they agree only for square masks), a needed feature (gqa, causal) was not built, an input is
empty, or the kernel wrapper raises NotImplementedError. `last_fallback_reason()` says why the last call in
this thread fell back (None after a kernel call); each distinct reason is logged once, at INFO level, on
the "flash_attn3" logger.
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

logger = logging.getLogger("flash_attn3")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_state = threading.local()
_logged: set = set()
_logged_lock = threading.Lock()


def last_fallback_reason() -> str | None:
    """Why the last sdpa() call of this thread used torch's SDPA, or None if it ran the kernel (or none ran)."""
    return getattr(_state, "reason", None)


def _record(reason: str | None) -> None:
    _state.reason = reason
    if reason is None:
        return
    with _logged_lock:
        if reason in _logged:
            return
        _logged.add(reason)
    logger.info("flash_attn3.sdpa falls back to torch SDPA: %s", reason)


def _fast_path_blocker(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """The first reason the kernel cannot serve this call, or None."""
    if attn_mask is not None:
        return "attn_mask is given (the kernel takes no arbitrary mask)"
    if dropout_p > 0.0:
        return "dropout_p > 0 (the kernel has no dropout)"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v are not all tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "inputs are not 4-D (batch, heads, seqlen, head_dim)"
    if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (the kernel needs float16 or bfloat16 for all of q, k, v)"
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        return f"inputs are not on one CUDA device ({q.device}, {k.device}, {v.device})"
    from flash_attn3.availability import device_unavailable_reason

    why = device_unavailable_reason(q.device)
    if why is not None:
        return why
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "an input requires grad with grad mode on (the kernel is forward-only)"
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return "an input is empty"
    b, hq, sq, d = q.shape
    bk, hk, sk, dk = k.shape
    bv, hv, sv, dv = v.shape
    if bk != b or bv != b:
        return "batch sizes of q, k, v differ"
    if sv != sk:
        return "k and v sequence lengths differ"
    if dk != d:
        return "q and k head dims differ"
    from flash_attn3 import _ops

    if _ops.BUILD.compiled_head_dims(q.dtype, d, dv) is None:
        return (f"head dim {d} has no compiled {_ops.DTYPE_TAGS[q.dtype]} kernel" if dv == d else
                f"head dims (q/k {d}, v {dv}) have no compiled {_ops.DTYPE_TAGS[q.dtype]} kernel")
    if hv != hk:
        return "k and v head counts differ"
    if hq != hk:
        if not enable_gqa:
            return "num_heads != num_heads_k without enable_gqa (torch's SDPA decides)"
        if hq % hk != 0:
            return "num_heads is not a multiple of num_heads_k"
        if not _ops.BUILD.has("gqa"):
            return "GQA is not built into this flash_attn3 installation"
    if is_causal:
        if sq != sk:
            return ("is_causal with seqlen_q != seqlen_k (torch's causal mask is top-left aligned, the kernel's "
                    "bottom-right)")
        if not _ops.BUILD.has("causal"):
            return "causal masking is not built into this flash_attn3 installation"
    return None


def _torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:  # only passed when set, so torch versions without the argument work for the rest
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _fa_layout(x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, on the flash_attn3 kernel when possible.

    q (b, h, s_q, d), k (b, h_k, s_k, d), v (b, h_k, s_k, dv); returns (b, h, s_q, dv) in q's dtype. Semantics are torch's
    (scale defaults to d ** -0.5; is_causal is top-left aligned). See the module docstring for when it
    falls back to torch's SDPA, and last_fallback_reason() for why the last call did.
    """
    reason = _fast_path_blocker(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is None:
        from flash_attn3.interface import flash_attn_func

        try:
            out = flash_attn_func(_fa_layout(q), _fa_layout(k), _fa_layout(v), softmax_scale=scale,
                                  causal=bool(is_causal))
        except NotImplementedError as exc:
            reason = f"the kernel does not support this call ({exc})"
        else:
            _record(None)
            return out.transpose(1, 2)
    _record(reason)
    return _torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
