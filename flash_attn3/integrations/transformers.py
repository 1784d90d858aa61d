"""Hugging Face transformers: `attn_implementation="fa3"`.

    import flash_attn3.integrations.transformers as fa3_hf
    fa3_hf.register()                      # once per process; returns "fa3"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fa3")

The name has no "flash" in it on purpose: transformers (5.x) sends every implementation whose name contains
"flash" to its own flash-attention loaders (the flash_attn / flash_attn_interface packages or hub kernels),
which would bypass a function registered under such a name (measured with transformers 5.24: "flash_attn3"
raises "Could not find the currently requested flash attention implementation").

register() adds one attention function to transformers' AttentionInterface and the "sdpa" mask builder to its
AttentionMaskInterface under the same name, so models build the masks they build for "sdpa" (None when a causal
batch has no padding) and call `attention_forward` below with query (b, h, s_q, d) and key/value
(b, h_kv, s_k, d). Calls the kernels can take run on them without copies (GQA natively, no repeat of K/V);
everything else runs through transformers' own sdpa function, so results are the "sdpa" ones by
construction: a mask tensor (padding), dropout while training, an unusable device or dtype, a head dim not
built, and causal prefill with more keys than queries (transformers' sdpa then drops the extra keys, a rule this
adapter keeps rather than reinterprets). `last_fallback_reason()` says which applied to the latest call.
"""
from __future__ import annotations

import threading

import torch

NAME = "fa3"
_state = threading.local()


def last_fallback_reason() -> str | None:
    """Why the latest attention_forward call on this thread went to transformers' sdpa; None if it ran here."""
    return getattr(_state, "reason", None)


def _kernel_refusal(module, query, key, value, attention_mask, dropout, is_causal) -> str | None:
    from flash_attn3 import _ops
    from flash_attn3.availability import device_unavailable_reason

    if attention_mask is not None:
        return "a mask tensor (padding or a custom mask)"
    if dropout > 0.0 and module.training:
        return "dropout while training"
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (the kernels take float16 / bfloat16)"
    reason = device_unavailable_reason(query.device)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "inputs that need gradients (forward-only kernels)"
    d, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != d or _ops.BUILD.compiled_head_dims(query.dtype, d, dv) is None:
        return f"head dims (q/k {d}, v {dv}) without a compiled kernel"
    if query.shape[1] % key.shape[1] != 0:
        return "q heads not a multiple of kv heads"
    if is_causal and key.shape[2] > query.shape[2]:
        return "causal prefill with more keys than queries"
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (out (b, s_q, h, dv), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None  # sdpa's rule for its is_causal
    reason = _kernel_refusal(module, query, key, value, attention_mask, dropout, causal)
    if reason is None and (kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None):
        reason = "softcap or position_bias"
    _state.reason = reason
    if reason is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    from flash_attn3.interface import flash_attn_func

    # (b, h, s, d) views as (b, s, h, d): the kernel takes any row/head strides with a contiguous last dim.
    q, k, v = (t.transpose(1, 2) if t.stride(-1) == 1 else t.transpose(1, 2).contiguous()
               for t in (query, key, value))
    out = flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal)
    return out, None


def register(name: str = NAME) -> str:
    """Makes `attn_implementation=name` available to every transformers model in this process; returns name."""
    if "flash" in name:
        raise ValueError(f"name: transformers routes names containing 'flash' to its own loaders, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
