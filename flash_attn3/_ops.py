"""Loading of the compiled extension, the build record, and the fake (meta) implementation of its op.

The C++ side (csrc/flash_api.cpp) owns the op schema `flash_attn3::fwd` and its CUDA implementation; this
module only imports it, says why it could not be imported, tells the rest of the package which kernels and
features were compiled (from `_build_config.py`, written by setup.py), holds the Python copy of the schema's
argument list (`FwdArgs`, whose field names are `FWD_ARG_NAMES`) and the validated call object built on it
(`FwdCall`), and registers the shape-only fake that torch.compile and torch.export need. Nothing here selects
kernels.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields

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
    "kv_batch_idx", "leftpad_k", "sinks",
)

# Build-record dtype tags of each torch dtype.
DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}


@dataclass(frozen=True)
class BuildConfig:
    """What setup.py compiled. The default value means: nothing was built."""

    cuda_extension_built: bool = False
    # dtype tag -> compiled head dims (of q/k and v alike), ascending. Each has every mask's kernels.
    head_dims: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    # dtype tag -> compiled (head_dim, head_dim_v) pairs with dv != d, ascending (DeepSeek's (192, 128)).
    head_dim_pairs: dict = field(default_factory=dict)

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

    def compiled_head_dims(self, dtype: torch.dtype, head_dim: int, head_dim_v: int) -> tuple | None:
        """The compiled (d, dv) kernel that serves a call, or None; hopper/api.cu find_kernel's rule: the
        smallest d >= head_dim, then the smallest dv >= head_dim_v, where a kernel with dv == d serves only
        calls with equal head dims."""
        tag = DTYPE_TAGS.get(dtype)
        equal = [(hd, hd) for hd in self.head_dims.get(tag, ()) if head_dim_v == head_dim]
        fits = [(d, dv) for d, dv in (*equal, *self.head_dim_pairs.get(tag, ())) if d >= head_dim and dv >= head_dim_v]
        return min(fits) if fits else None


def _load_build_config() -> tuple[BuildConfig, str | None]:
    try:
        rec = importlib.import_module("flash_attn3._build_config")
    except ImportError as exc:
        return BuildConfig(), f"flash_attn3/_build_config.py could not be imported ({exc})"
    head_dims: dict[str, list[int]] = {}
    pairs: dict[str, list[tuple]] = {}
    axes = getattr(rec, "AXES", ("dtype", "head_dim"))
    for entry in getattr(rec, "FWD_KERNELS", ()):
        key = dict(zip(axes, entry))
        tag, d = str(key["dtype"]), int(key["head_dim"])
        dv = int(key.get("head_dim_v", d))
        if dv == d:
            head_dims.setdefault(tag, []).append(d)
        else:
            pairs.setdefault(tag, []).append((d, dv))
    return (
        BuildConfig(
            cuda_extension_built=bool(getattr(rec, "CUDA_EXTENSION_BUILT", False)),
            head_dims={tag: tuple(sorted(set(hds))) for tag, hds in head_dims.items()},
            features=dict(getattr(rec, "FEATURES", {})),
            head_dim_pairs={tag: tuple(sorted(set(ps))) for tag, ps in pairs.items()},
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


@dataclass(frozen=True, eq=False)
class FwdArgs:
    """The arguments of the op `flash_attn3::fwd`, one field each, declared in schema order.

    This is the one Python copy of the schema csrc/flash_api.cpp defines: FWD_ARG_NAMES is read off these
    fields, and the tests compare it with the `m.def("fwd(...)")` string of that file and with the registered
    op, so a schema change on either side fails a test instead of silently shifting positional arguments.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor | None  # written by the op; None only in a FwdCall that has no buffer yet
    softmax_lse: torch.Tensor | None  # written by the op; None only in a FwdCall that has no buffer yet
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    seqused_q: torch.Tensor | None
    seqused_k: torch.Tensor | None
    max_seqlen_q: int  # dense: q.shape[1]; varlen q: the caller's max_seqlen_q
    max_seqlen_k: int  # dense: k.shape[1]; paged: max_pages * page_size; varlen k: the caller's max_seqlen_k
    page_table: torch.Tensor | None
    kv_batch_idx: torch.Tensor | None
    leftpad_k: torch.Tensor | None
    q_descale: torch.Tensor | None
    k_descale: torch.Tensor | None
    v_descale: torch.Tensor | None
    softmax_scale: float
    window_size_left: int  # -1 = unbounded
    window_size_right: int
    attention_chunk: int  # 0 = off; > 0: each query sees only keys of its own chunk (Llama 4)
    softcap: float  # 0 = off
    sinks: torch.Tensor | None  # float32 (num_heads,) sink logits
    cp_world_size: int  # context parallelism (vLLM fork): 1 = off
    cp_rank: int
    cp_tot_seqused_k: torch.Tensor | None  # int32 (batch,) global key counts; required with cp_world_size > 1
    num_splits: int
    pack_gqa: int  # -1 auto, 0 off, 1 on
    sm_margin: int

    def op_args(self) -> list:
        """The op's positional arguments: the one place where named arguments become schema order."""
        return [getattr(self, name) for name in FWD_ARG_NAMES]


FWD_ARG_NAMES = tuple(f.name for f in fields(FwdArgs))
_OUT_INDEX = FWD_ARG_NAMES.index("out")
_LSE_INDEX = FWD_ARG_NAMES.index("softmax_lse")


@dataclass(frozen=True, eq=False)
class FwdCall(FwdArgs):
    """One forward call validated by flash_attn3._checks.check_fwd: the op's arguments, normalised, and what
    the wrappers derive from them. Immutable: a wrapper that completes an argument makes a new call."""

    batch: int
    out_dtype: torch.dtype
    out_shape: tuple
    lse_shape: tuple
    features: frozenset  # build features the call needs (names as in FEATURE_NAMES)
    names: dict  # the caller's names of renamed arguments, for messages (check_fwd's `names`)

    def op_args_with_outputs(self) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The op's positional arguments with softmax_lse, and out unless the caller gave one, allocated on q's
        device; and those two tensors. (Not a new FwdCall: dataclasses.replace cost ~7 us per eager call.)"""
        device = self.q.device
        out = self.out if self.out is not None else torch.empty(self.out_shape, dtype=self.out_dtype, device=device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=device)
        args = self.op_args()
        args[_OUT_INDEX] = out
        args[_LSE_INDEX] = lse
        return args, out, lse


# The extension is built on torch's stable ABI, through which C++ cannot raise NotImplementedError (torch turns
# every C++ exception into RuntimeError). csrc/flash_api.cpp starts the message of a feature this build did not
# compile with this tag (its kNotImplementedTag), and the op wrappers below re-raise such an error as
# NotImplementedError (a RuntimeError subclass, so callers catching RuntimeError still do) without the tag.
NOT_IMPLEMENTED_TAG = "NotImplementedError: "


def _reraise(exc: RuntimeError):
    """Re-raises an op's RuntimeError, as NotImplementedError when its message carries NOT_IMPLEMENTED_TAG."""
    message = str(exc)
    if message.startswith(NOT_IMPLEMENTED_TAG):
        raise NotImplementedError(message[len(NOT_IMPLEMENTED_TAG):]) from None
    raise exc


# Each wrapper calls its op inside try: free on Python >= 3.11 when nothing is raised, and traced through by
# torch.compile (fullgraph) like the bare call.
def fwd(*schema_args) -> None:
    """Calls torch.ops.flash_attn3.fwd with arguments in schema order (FwdArgs.op_args)."""
    try:
        torch.ops.flash_attn3.fwd(*schema_args)
    except RuntimeError as exc:
        _reraise(exc)


def combine(out_partial, lse_partial, out, lse) -> None:
    """torch.ops.flash_attn3.combine: writes out and lse (shapes checked by flash_attn_combine)."""
    try:
        torch.ops.flash_attn3.combine(out_partial, lse_partial, out, lse)
    except RuntimeError as exc:
        _reraise(exc)


def append_kv(*args) -> None:
    """torch.ops.flash_attn3.append_kv: writes new k/v into the cache, q rotated into q_out (if rotary), and the
    lengths after the append into seqused_out (schema order; flash_attn3.interface._append_kv checks them)."""
    try:
        torch.ops.flash_attn3.append_kv(*args)
    except RuntimeError as exc:
        _reraise(exc)


# get_scheduler_metadata's tensor: METADATA_TAG, then the plan's 7 values (csrc/flash_api.cpp `plan`).
METADATA_TAG = 0x46413301
METADATA_LEN = 8


def plan(*args) -> list:
    """torch.ops.flash_attn3.plan: [num_splits, pack_gqa, block_m, block_n, num_m_blocks, num_tiles, grid]."""
    try:
        return list(torch.ops.flash_attn3.plan(*args))
    except RuntimeError as exc:
        _reraise(exc)


def _fwd_fake(*schema_args):
    # The dispatcher hands a fake every argument positionally (even those the caller named), so FwdArgs names
    # them in schema order. The op writes into `out` and `softmax_lse` and returns nothing, so the fake only
    # checks the buffers the Python wrappers allocated; the real argument rules ran in flash_attn3._checks
    # before tracing.
    a = FwdArgs(*schema_args)
    if a.out.shape[:-1] != a.q.shape[:-1] or a.out.shape[-1] != a.v.shape[-1]:
        raise ValueError(f"out: shape {tuple(a.out.shape)} does not match q {tuple(a.q.shape)} and v "
                         f"{tuple(a.v.shape)}")
    lse_rank = 2 if a.cu_seqlens_q is not None else 3
    if a.softmax_lse.dim() != lse_rank or a.softmax_lse.dtype != torch.float32:
        raise ValueError(f"softmax_lse: expected a float32 tensor of rank {lse_rank}, got {a.softmax_lse.dtype} "
                         f"of shape {tuple(a.softmax_lse.shape)}")
    return None


def _combine_fake(out_partial, lse_partial, out, lse):
    return None


if HAS_EXTENSION:
    torch.library.register_fake("flash_attn3::fwd")(_fwd_fake)
    torch.library.register_fake("flash_attn3::combine")(_combine_fake)
    torch.library.register_fake("flash_attn3::append_kv")(lambda *args: None)
