"""flash_attn3: FlashAttention forward kernels for NVIDIA Hopper (SM90), drop-in compatible with
FlashAttention-3's `flash_attn_interface` functions.

`flash_attn3.reference` holds a plain-PyTorch reference of every feature; it works without the compiled
extension (e.g. on CPU). `flash_attn3._ops.HAS_EXTENSION` says whether the CUDA extension loaded.
`set_checked_mode(True)`, `with checked_mode(): ...` or FLASH_ATTN3_CHECKED=1 turn on the checked mode, which
validates the values of the device-resident metadata (cu_seqlens, seqused, cache_seqlens, page tables) before
each call, at the cost of one host sync (see flash_attn3._checked). `quantize_fp8` / `dequantize_fp8` give
FP8 e4m3 tensors with descales in the kernels' (batch, num_heads_k) layout; `hadamard_rotation` + `rotate`
are the FA3 paper's incoherent processing (see flash_attn3.quantize). `is_available()` /
`unavailable_reason()` say whether the kernels can run here; `sdpa(q, k, v, ...)` takes torch SDPA's
(b, h, s, d) layout and falls back to torch for what the kernels cannot do (`last_fallback_reason()`);
`flash_attn3.nn.FlashAttention` is an nn.MultiheadAttention drop-in and `replace_attention(model)` swaps them.
"""
from flash_attn3 import reference
from flash_attn3.availability import get_flash_attention_version, is_available, unavailable_reason
from flash_attn3.quantize import dequantize_fp8, hadamard_rotation, quantize_fp8, rotate
from flash_attn3._checked import checked_mode, set_checked_mode
from flash_attn3.interface import (
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
    varlen_fwd,
)
from flash_attn3.sdpa import last_fallback_reason, sdpa  # after the interface it calls
from flash_attn3.nn import FlashAttention, replace_attention  # after sdpa

__version__ = "0.1.0"

__all__ = [
    "FlashAttention",
    "get_flash_attention_version",
    "is_available",
    "last_fallback_reason",
    "replace_attention",
    "sdpa",
    "unavailable_reason",
    "checked_mode",
    "dequantize_fp8",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "hadamard_rotation",
    "quantize_fp8",
    "reference",
    "rotate",
    "set_checked_mode",
    "varlen_fwd",
    "__version__",
]
