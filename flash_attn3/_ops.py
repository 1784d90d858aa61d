"""Loading of the compiled extension, the build record, and the fake (meta) implementation of its op.

The C++ side (csrc/flash_api.cpp) owns the op schema `flash_attn3::fwd` and its CUDA implementation; this
module only imports it, says why it could not be imported, tells the rest of the package which kernels and
features were compiled (from `_build_config.py`, written by setup.py), and registers the shape-only fake that
torch.compile and torch.export need. Nothing here selects kernels.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

try:
    importlib.import_module("flash_attn3._C")  # its static initialisers register torch.ops.flash_attn3.*

    HAS_EXTENSION = True
    LOAD_ERROR: str | None = None
except ImportError as exc:  # missing (FLASH_ATTN3_SKIP_CUDA_BUILD=1) or broken (e.g. ABI/CUDA mismatch)
    HAS_EXTENSION = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# Every feature name the build record may list. A name missing from the record counts as not built.
FEATURE_NAMES = (
    "varlen", "gqa", "causal", "local", "softcap", "split_kv", "paged_kv", "append_kv", "fp8", "pack_gqa",
    "kv_batch_idx", "leftpad_k",
)

# Build-record dtype tags of each torch dtype.
DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}


@dataclass(frozen=True)
class BuildConfig:
    """What setup.py compiled. The default value means: nothing was built."""

    cuda_extension_built: bool = False
    # dtype tag -> compiled head dims, ascending. Each compiled head dim has both no-mask and causal kernels.
    head_dims: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        return bool(self.features.get(feature, False))

    def head_dims_for(self, dtype: torch.dtype) -> tuple:
        """Compiled head dims of `dtype`, ascending (empty if none)."""
        return tuple(self.head_dims.get(DTYPE_TAGS.get(dtype), ()))

    def compiled_head_dim(self, dtype: torch.dtype, head_dim: int) -> int | None:
        """The compiled head dim that serves `head_dim` (the smallest one >= it), or None."""
        for hd in self.head_dims_for(dtype):
            if hd >= head_dim:
                return hd
        return None


def _load_build_config() -> tuple[BuildConfig, str | None]:
    try:
        rec = importlib.import_module("flash_attn3._build_config")
    except ImportError as exc:
        return BuildConfig(), f"flash_attn3/_build_config.py could not be imported ({exc})"
    head_dims: dict[str, list[int]] = {}
    for tag, hd in getattr(rec, "FWD_KERNELS", ()):
        head_dims.setdefault(str(tag), []).append(int(hd))
    return (
        BuildConfig(
            cuda_extension_built=bool(getattr(rec, "CUDA_EXTENSION_BUILT", False)),
            head_dims={tag: tuple(sorted(set(hds))) for tag, hds in head_dims.items()},
            features=dict(getattr(rec, "FEATURES", {})),
        ),
        None,
    )


BUILD, BUILD_CONFIG_ERROR = _load_build_config()


def require_extension() -> None:
    """Raises RuntimeError when the compiled op is unavailable, with the reason."""
    if HAS_EXTENSION:
        return
    raise RuntimeError(
        "flash_attn3 was installed without its CUDA extension (FLASH_ATTN3_SKIP_CUDA_BUILD=1) or the "
        f"extension failed to load ({LOAD_ERROR}); reinstall with a CUDA toolchain to run the kernels. "
        "flash_attn3.reference works without it."
    )


def fwd(*schema_args) -> None:
    """Calls torch.ops.flash_attn3.fwd with arguments in schema order (see csrc/flash_api.cpp)."""
    torch.ops.flash_attn3.fwd(*schema_args)


def _fwd_fake(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
              max_seqlen_k, page_table, kv_batch_idx, leftpad_k, q_descale, k_descale, v_descale,
              softmax_scale, window_size_left, window_size_right, softcap, num_splits, pack_gqa, sm_margin):
    # The op writes into `out` and `softmax_lse` and returns nothing, so the fake only checks the buffers
    # the Python wrappers allocated; the real argument rules ran in flash_attn3._checks before tracing.
    if out.shape[:-1] != q.shape[:-1] or out.shape[-1] != v.shape[-1]:
        raise ValueError(f"out: shape {tuple(out.shape)} does not match q {tuple(q.shape)} and v {tuple(v.shape)}")
    lse_rank = 2 if cu_seqlens_q is not None else 3
    if softmax_lse.dim() != lse_rank or softmax_lse.dtype != torch.float32:
        raise ValueError(f"softmax_lse: expected a float32 tensor of rank {lse_rank}, got {softmax_lse.dtype} "
                         f"of shape {tuple(softmax_lse.shape)}")
    return None


if HAS_EXTENSION:
    torch.library.register_fake("flash_attn3::fwd")(_fwd_fake)
