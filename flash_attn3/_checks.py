"""Argument rules of the public functions, checked in Python before any kernel runs.

`check_fwd` validates every argument of one forward call and returns it as one `FwdCall` (flash_attn3._ops):
the op's arguments, normalised, with the sizes the wrappers need. Rules fire in a fixed order: Python types,
dtypes, ranks and shapes, strides, values, and the device rule last, so that every other rule can be
exercised with CPU tensors. Each error names the argument (under the name the caller used, e.g. `k_cache`)
and the rule it breaks. Nothing here reads device memory: values that live on the GPU (cu_seqlens contents,
cache_seqlens tensors) are never inspected, so a call stays free of host syncs and can be captured in a CUDA
graph. The one exception is a window_size given as a CUDA tensor, which has to become two ints, as in FA3.
Checking those device values is the opt-in checked mode (flash_attn3._checked). `check_supported` then turns
features this build did not compile into NotImplementedError.
"""
from __future__ import annotations

import math
import numbers
import sys

import torch

from flash_attn3._ops import DTYPE_TAGS, FwdCall

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_V_SMALL_D = 512  # dv may reach 512 when d <= 64 (MLA-style decode), 16-bit only
MAX_SPLITS = 256

# Wording of each build feature in NotImplementedError messages.
FEATURE_TEXT = {
    "varlen": "variable-length batches (cu_seqlens / seqused)",
    "gqa": "grouped-query attention (num_heads != num_heads_k)",
    "causal": "causal masking (causal)",
    "local": "local (sliding-window) attention (window_size)",
    "softcap": "softcap",
    "sinks": "attention sinks (sinks / s_aux)",
    "split_kv": "split-KV (num_splits > 1)",
    "paged_kv": "paged KV cache (page_table)",
    "append_kv": "appending new k/v to the cache",
    "fp8": "float8_e4m3fn inputs (the dtype of q, k, v)",
    "pack_gqa": "pack_gqa=True",
    "kv_batch_idx": "cache_batch_idx / kv_batch_idx",
    "leftpad_k": "cache_leftpad / leftpad_k",
}


def _is_int(x) -> bool:
    t = type(x)
    if t is int:  # the common case first: the ABC check costs ~0.5 us per argument on every eager call
        return True
    return t is not bool and isinstance(x, numbers.Integral)


def _is_real(x) -> bool:
    t = type(x)
    if t is float or t is int:
        return True
    return t is not bool and isinstance(x, numbers.Real)


def check_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_int(name: str, x, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(x):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {x}")


def check_bool(name: str, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")


def check_index_vector(name: str, t, length: int, what: str) -> None:
    """An int32, 1-D, contiguous tensor of `length` entries (`what` says where the length comes from)."""
    check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: must have dtype torch.int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name}: must have shape ({length},) ({what}), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def check_last_dim_contiguous(name: str, t) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride(-1) == 1), got stride {t.stride(-1)}")


def check_rank(name: str, t, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name}: must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def check_head_dims(qname: str, vname: str, dtype: torch.dtype, d: int, dv: int) -> None:
    """FA3's head-dim rules: 16-bit multiples of 8, fp8 multiples of 16; d <= 256; dv == d or one of the
    asymmetric pairs ((d <= 64, dv <= 512) 16-bit only, (128 < d <= 192, 96 < dv <= 128))."""
    mult = 16 if dtype == torch.float8_e4m3fn else 8
    if d <= 0 or d % mult:
        raise ValueError(f"{qname}: head dim {d} must be a positive multiple of {mult} for {_dtype_name(dtype)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{qname}: head dim {d} exceeds {MAX_HEAD_DIM}, the largest supported for "
                         f"{_dtype_name(dtype)}")
    if dv <= 0 or dv % mult:
        raise ValueError(f"{vname}: head dim {dv} must be a positive multiple of {mult} for {_dtype_name(dtype)}")
    if dv == d:
        return
    small_d = d <= 64 and dv <= (MAX_HEAD_DIM_V_SMALL_D if dtype != torch.float8_e4m3fn else MAX_HEAD_DIM)
    mid_d = 128 < d <= 192 and 96 < dv <= 128
    if not (small_d or mid_d):
        raise ValueError(
            f"{vname}: head dim {dv} differs from {qname}'s head dim {d}; the supported pairs are dv == d, "
            f"(d <= 64, dv <= {MAX_HEAD_DIM_V_SMALL_D} for 16-bit / {MAX_HEAD_DIM} for fp8) and "
            "(128 < d <= 192, 96 < dv <= 128)")


def _integer_array(name: str, a) -> list:
    """The host values of a torch.Tensor or numpy array that must hold integers. A CUDA tensor is read back
    (one sync, as FA3's own int() conversion does), which a CUDA-graph capture cannot contain."""
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
            raise TypeError(f"{name}: a tensor must have an integer dtype, got {a.dtype}")
        if a.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name}: a CUDA tensor cannot be read on the host during CUDA-graph capture; "
                               "pass Python ints")
    elif a.dtype.kind not in "iu":
        raise TypeError(f"{name}: an array must have an integer dtype, got {a.dtype}")
    return a.tolist()


def _is_array(x) -> bool:
    """A torch.Tensor or a numpy.ndarray (numpy is only consulted if the caller already imported it)."""
    np = sys.modules.get("numpy")
    return isinstance(x, torch.Tensor) or (np is not None and isinstance(x, np.ndarray))


_SINK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def normalize_window(window_size, causal: bool, rows_q: int, rows_k: int) -> tuple[int, int]:
    """Validates window_size and returns FA3's normalised (left, right).

    window_size is anything FA3 indexes as a pair: a tuple or list of two ints (Python or numpy ints, or
    0-d integer tensors), or a 1-D integer tensor / numpy array of two entries. Causal forces right = 0 and
    leaves left as given. A side that cannot cut off any key becomes -1. With bottom-right alignment the left
    side cuts nothing iff left >= s_k - 1 and the right side iff right >= s_q - 1, for every sequence; the
    per-sequence lengths live on the device, so the sides are compared with host extents that bound them and
    cannot lie: `rows_q` (dense q.shape[1], packed q rows) and `rows_k` (dense k.shape[1], packed k rows, paged
    cache capacity). max_seqlen_q/k are deliberately not used: an understated one would silently turn a
    window into full attention.
    """
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int \
            and type(window_size[1]) is int:
        sides = window_size  # the common case (Python ints), without the array probes below
    elif _is_array(window_size):
        if tuple(window_size.shape) != (2,):
            raise ValueError(f"window_size: a tensor or array must have shape (2,) (left, right), got "
                             f"{tuple(window_size.shape)}")
        sides = _integer_array("window_size", window_size)
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        sides = [_integer_array("window_size", v) if _is_array(v) and v.ndim == 0 else v for v in window_size]
    else:
        raise TypeError(f"window_size: expected a (left, right) pair of ints, got {window_size!r}")
    for side, val in zip(("left", "right"), sides):
        if not _is_int(val):
            raise TypeError(f"window_size: {side} must be an int, got {type(val).__name__}")
        if val < -1:
            raise ValueError(f"window_size: {side} must be >= -1 (-1 = unbounded), got {val}")
    left, right = (int(v) for v in sides)
    if left >= rows_k - 1:
        left = -1
    if causal:
        right = 0
    elif right >= rows_q - 1:
        right = -1
    return left, right


def check_devices(tensors: dict) -> None:
    """The device rule, checked last: every tensor on the CUDA device of the first one."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{name}: must be on a CUDA device, got {t.device}")
        if t.device != first.device:
            raise ValueError(f"{name}: must be on the same device as {first_name} ({first.device}), got {t.device}")


def check_fwd(q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
              max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None, leftpad_k=None,
              q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
              window_size=(-1, -1), attention_chunk=0, softcap=0.0, sinks=None, num_splits=1, pack_gqa=None,
              sm_margin=0, cache_seqlens_int=None, names=None, extra_tensors=None, cp_world_size=1, cp_rank=0,
              cp_tot_seqused_k=None) -> FwdCall:
    """Validates one forward call (schema-level arguments) and returns it as the op call to make.

    `names` renames arguments in messages (e.g. {"k": "k_cache", "seqused_k": "cache_seqlens"});
    `extra_tensors` ({name: tensor}) are further inputs whose only remaining rule is the device rule;
    `cache_seqlens_int` is flash_attn_with_kvcache's cache_seqlens given as a Python int (0..seqlen_k).
    """
    n = {a: a for a in ("q", "k", "v", "out", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k",
                        "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k",
                        "q_descale", "k_descale", "v_descale")}
    n.update(names or {})
    opt = {"out": out, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "seqused_q": seqused_q,
           "seqused_k": seqused_k, "page_table": page_table, "kv_batch_idx": kv_batch_idx,
           "leftpad_k": leftpad_k, "q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}

    # Python types.
    for a, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(n[a], t)
    for a, t in opt.items():
        check_tensor(n[a], t, optional=True)
    for a, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if x is not None and not _is_int(x):
            raise TypeError(f"{n[a]}: expected an int, got {type(x).__name__}")
    check_bool("causal", causal)
    if softmax_scale is not None and not _is_real(softmax_scale):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not _is_real(softcap):
        raise TypeError(f"softcap: expected a float, got {type(softcap).__name__}")
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise TypeError(f"pack_gqa: expected a bool or None, got {type(pack_gqa).__name__}")

    # Dtypes.
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"{n['q']}: dtype {q.dtype} is not supported; use torch.float16, torch.bfloat16 or "
                        "torch.float8_e4m3fn")
    for a, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{n[a]}: dtype {t.dtype} must match {n['q']}'s dtype {q.dtype}")
    is_fp8 = q.dtype == torch.float8_e4m3fn
    out_dtype = torch.bfloat16 if is_fp8 else q.dtype

    # Ranks and shapes of q, k, v.
    varlen_q = cu_seqlens_q is not None
    paged = page_table is not None
    if cu_seqlens_k is not None and paged:
        raise ValueError(f"{n['cu_seqlens_k']}: cannot be combined with {n['page_table']} (a paged cache has "
                         "fixed-size pages, not packed sequences)")
    if cu_seqlens_k is not None and kv_batch_idx is not None:
        raise ValueError(f"{n['kv_batch_idx']}: cannot be combined with {n['cu_seqlens_k']}")
    if varlen_q:
        check_rank(n["q"], q, 3, "(total_q, num_heads, head_dim) when cu_seqlens_q is given")
    else:
        check_rank(n["q"], q, 4, "(batch, seqlen_q, num_heads, head_dim)")
    if cu_seqlens_k is not None:
        k_layout = "(total_k, num_heads_k, head_dim) when cu_seqlens_k is given"
        check_rank(n["k"], k, 3, k_layout)
        check_rank(n["v"], v, 3, k_layout.replace("head_dim", "head_dim_v"))
    elif paged:
        check_rank(n["k"], k, 4, "(num_pages, page_size, num_heads_k, head_dim) when a page table is given")
        check_rank(n["v"], v, 4, "(num_pages, page_size, num_heads_k, head_dim_v) when a page table is given")
    else:
        check_rank(n["k"], k, 4, "(batch, seqlen_k, num_heads_k, head_dim)")
        check_rank(n["v"], v, 4, "(batch, seqlen_k, num_heads_k, head_dim_v)")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{n['v']}: shape {tuple(v.shape)} must match {n['k']}'s {tuple(k.shape)} in every "
                         "dimension but the last")
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_heads_k, head_dim_v = k.shape[-2], v.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{n['k']}: head dim {k.shape[-1]} must equal {n['q']}'s head dim {head_dim}")
    check_head_dims(n["q"], n["v"], q.dtype, head_dim, head_dim_v)
    if num_heads_k == 0 or num_heads % num_heads_k:
        raise ValueError(f"num_heads ({n['q']}.shape[-2]={num_heads}) must be divisible by num_heads_k "
                         f"({n['k']}.shape[-2]={num_heads_k})")
    for a, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(n[a], t)

    # Batch size, cu_seqlens and max_seqlen.
    batch = cu_seqlens_q.shape[0] - 1 if varlen_q and cu_seqlens_q.dim() == 1 else q.shape[0]
    for a, cu, mx, total_name, total in (
            ("q", cu_seqlens_q, max_seqlen_q, n["q"], q.shape[0]),
            ("k", cu_seqlens_k, max_seqlen_k, n["k"], k.shape[0])):
        if cu is None:
            continue
        cu_name, mx_name = n["cu_seqlens_" + a], n["max_seqlen_" + a]
        if cu.dtype != torch.int32:
            raise TypeError(f"{cu_name}: must have dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{cu_name}: must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
        if not cu.is_contiguous():
            raise ValueError(f"{cu_name}: must be contiguous")
        if cu.shape[0] != batch + 1:
            if varlen_q:
                raise ValueError(f"{n['cu_seqlens_q']} and {n['cu_seqlens_k']} must describe the same batch: "
                                 f"lengths {batch + 1} and {cu.shape[0]}")
            raise ValueError(f"{cu_name}: length {cu.shape[0]} must be batch + 1 = {batch + 1} (batch from "
                             f"{n['q']}.shape[0])")
        if mx is None:
            raise ValueError(f"{mx_name}: required when {cu_name} is given")
        if mx < 0:
            raise ValueError(f"{mx_name}: must be a non-negative int, got {mx}")
        if mx > total:
            raise ValueError(f"{mx_name}: {mx} exceeds the number of packed rows of {total_name} "
                             f"({total_name}.shape[0]={total})")
    if paged:
        if page_table.dtype != torch.int32:
            raise TypeError(f"{n['page_table']}: must have dtype torch.int32, got {page_table.dtype}")
        if page_table.dim() != 2:
            raise ValueError(f"{n['page_table']}: must be 2-D (batch, max_pages), got shape "
                             f"{tuple(page_table.shape)}")
        check_last_dim_contiguous(n["page_table"], page_table)
        batch_k = page_table.shape[0]
        seqlen_k = page_table.shape[1] * k.shape[1]
    elif cu_seqlens_k is not None:
        batch_k, seqlen_k = batch, max_seqlen_k
    else:
        batch_k, seqlen_k = k.shape[0], k.shape[1]
    seqlen_q = max_seqlen_q if varlen_q else q.shape[1]
    # Host extents no sequence can exceed (max_seqlen_* are the caller's word, these are the tensors').
    rows_q = q.shape[0] if varlen_q else q.shape[1]
    rows_k = k.shape[0] if cu_seqlens_k is not None else seqlen_k
    if kv_batch_idx is None:
        if batch_k != batch:
            src = f"{n['page_table']}.shape[0]" if paged else f"{n['k']}.shape[0]"
            raise ValueError(f"batch size of the keys ({src}={batch_k}) must equal the batch size of the "
                             f"queries ({batch}) unless {n['kv_batch_idx']} maps queries to cache rows")
    else:
        check_index_vector(n["kv_batch_idx"], kv_batch_idx, batch, "one cache row per batch entry")
    for a, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k), ("leftpad_k", leftpad_k)):
        if t is not None:
            check_index_vector(n[a], t, batch, "one entry per batch entry")
    if cache_seqlens_int is not None:
        check_int(n["seqused_k"], cache_seqlens_int, 0, seqlen_k)

    # FP8 descales.
    for a, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if t is None:
            continue
        if not is_fp8:
            raise ValueError(f"{n[a]}: only valid with torch.float8_e4m3fn inputs, got {q.dtype}")
        if t.dtype != torch.float32:
            raise TypeError(f"{n[a]}: must have dtype torch.float32, got {t.dtype}")
        if tuple(t.shape) != (batch, num_heads_k):
            raise ValueError(f"{n[a]}: must have shape (batch, num_heads_k) = ({batch}, {num_heads_k}), got "
                             f"{tuple(t.shape)}")

    # Scalar options.
    window_left, window_right = normalize_window(window_size, causal, rows_q, rows_k)
    # Not normalised away even when it exceeds every sequence: rows before the first key (s_q > s_k) sit in
    # a chunk of negative positions and see no key, which a chunk-free call would not give them.
    check_int("attention_chunk", attention_chunk, 0, 2**31 - 1)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: must be a finite value >= 0 (0 = off), got {softcap}")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: must be finite, got {softmax_scale}")
    check_int("num_splits", num_splits, None, MAX_SPLITS)
    num_splits = max(num_splits, 0)  # FA3: any value <= 0 selects the heuristic
    check_int("sm_margin", sm_margin, 0)

    # Output buffers.
    out_shape = (*q.shape[:-1], head_dim_v)
    lse_shape = (num_heads, q.shape[0]) if varlen_q else (batch, num_heads, seqlen_q)
    if out is not None:
        if out.dtype != out_dtype:
            raise TypeError(f"{n['out']}: dtype {out.dtype} must be {out_dtype}"
                            + (" (the output of fp8 inputs is bfloat16)" if is_fp8 else ""))
        if tuple(out.shape) != out_shape:
            raise ValueError(f"{n['out']}: shape {tuple(out.shape)} must be {out_shape}")
        check_last_dim_contiguous(n["out"], out)

    # The device rule, last.
    tensors = {n["q"]: q, n["k"]: k, n["v"]: v}
    tensors.update({n[a]: t for a, t in opt.items() if t is not None})
    tensors.update({name: t for name, t in (extra_tensors or {}).items() if t is not None})
    check_devices(tensors)

    features = set()
    if is_fp8:
        features.add("fp8")
    if varlen_q or cu_seqlens_k is not None or seqused_q is not None or seqused_k is not None:
        features.add("varlen")
    if num_heads != num_heads_k:
        features.add("gqa")
    if window_left < 0 and window_right == 0 and not attention_chunk:
        features.add("causal")
    elif window_left >= 0 or window_right >= 0 or attention_chunk:
        features.add("local")  # a chunk runs on the local (sliding-window) kernels, as in FA3
    if softcap > 0:
        features.add("softcap")
    if sinks is not None:
        features.add("sinks")
        n_sinks = n.get("sinks", "sinks")
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"{n_sinks}: expected a float32 tensor of num_heads sink logits, got "
                            f"{type(sinks).__name__}")
        # vLLM keeps gpt-oss's sinks in bfloat16 (its fork's s_aux takes only that); the kernel reads float32.
        if sinks.dtype not in _SINK_DTYPES or sinks.dim() != 1 or sinks.shape[0] != num_heads:
            raise ValueError(f"{n_sinks}: must be a float32, bfloat16 or float16 tensor of shape (num_heads,) = "
                             f"({num_heads},), got {sinks.dtype} of shape {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"{n_sinks}: must be on q's device {q.device}, got {sinks.device}")
        sinks = sinks.to(torch.float32).contiguous()
    # Context parallelism (vLLM fork's decode context parallelism, hopper/params.h flash3_context_parallel):
    # this call holds rank cp_rank's round-robin share of each sequence's cp_tot_seqused_k[b] keys; only the
    # causal mask depends on it, on every causal kernel (no build feature). World size 1: the rest is ignored.
    check_int("cp_world_size", cp_world_size, 1, 1 << 30)
    check_int("cp_rank", cp_rank, 0)
    check_tensor("cp_tot_seqused_k", cp_tot_seqused_k, optional=True)
    if cp_world_size > 1:
        if cp_rank >= cp_world_size:
            raise ValueError(f"cp_rank: must be in [0, cp_world_size = {cp_world_size}), got {cp_rank}")
        if cp_tot_seqused_k is None:
            raise ValueError("cp_tot_seqused_k: required when cp_world_size > 1 (int32 (batch,) key counts of "
                             "the whole sequences, over all ranks)")
        check_index_vector("cp_tot_seqused_k", cp_tot_seqused_k, batch, "batch")
        if cp_tot_seqused_k.device != q.device:
            raise ValueError(f"cp_tot_seqused_k: must be on q's device {q.device}, got {cp_tot_seqused_k.device}")
        # The raw window: normalize_window drops a left side >= the local keys, which still cuts the global ones.
        raw_left = int(window_size[0]) if isinstance(window_size, (tuple, list)) and len(window_size) == 2 and _is_int(window_size[0]) else -1
        if "local" in features or raw_left >= 0:
            raise not_implemented("cp_world_size > 1 with window_size or attention_chunk (context parallelism "
                                  "runs with causal or no mask)")
    else:
        cp_rank, cp_tot_seqused_k = 0, None
    if num_splits > 1:
        features.add("split_kv")
    if paged:
        features.add("paged_kv")
    if pack_gqa is True:
        features.add("pack_gqa")
    if kv_batch_idx is not None:
        features.add("kv_batch_idx")
    if leftpad_k is not None:
        features.add("leftpad_k")

    return FwdCall(
        q=q, k=k, v=v, out=out, softmax_lse=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k,
        page_table=page_table, kv_batch_idx=kv_batch_idx, leftpad_k=leftpad_k, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, softmax_scale=float(softmax_scale),
        window_size_left=window_left, window_size_right=window_right, attention_chunk=int(attention_chunk),
        softcap=float(softcap), sinks=sinks, cp_world_size=int(cp_world_size), cp_rank=int(cp_rank),
        cp_tot_seqused_k=cp_tot_seqused_k, num_splits=num_splits, pack_gqa=-1 if pack_gqa is None else int(pack_gqa), sm_margin=sm_margin,
        batch=batch, out_dtype=out_dtype, out_shape=out_shape, lse_shape=lse_shape, features=frozenset(features),
        names=dict(names or {}))


def not_implemented(what: str) -> NotImplementedError:
    return NotImplementedError(f"{what} is not implemented in flash_attn3 yet")


def check_supported(call: FwdCall, build) -> None:
    """Raises NotImplementedError for anything the call needs that this build did not compile."""
    for feat in sorted(call.features):
        if not build.has(feat):
            raise NotImplementedError(
                f"{FEATURE_TEXT[feat]} is not built into this flash_attn3 installation (feature '{feat}' is "
                "off in flash_attn3/_build_config.py)")
    dtype, head_dim, head_dim_v = call.q.dtype, call.q.shape[-1], call.v.shape[-1]
    name = _dtype_name(dtype)
    compiled = build.compiled_head_dim(dtype, head_dim)
    if compiled is None:
        built = build.head_dims_for(dtype)
        raise NotImplementedError(
            f"q: head dim {head_dim} has no compiled kernel for {name}; this build compiled head dims "
            f"{list(built) or 'none'} for {name} (a head dim runs on the smallest compiled one >= it)")
    if head_dim_v != head_dim and build.compiled_head_dims(dtype, head_dim, head_dim_v) is None:
        pairs = list(build.head_dim_pairs.get(DTYPE_TAGS.get(dtype), ()))
        raise NotImplementedError(
            f"v: head dim {head_dim_v} != q's head dim {head_dim} and no {name} kernel for that pair is built; "
            f"this build compiled the (d, dv) pairs {pairs or 'none'} besides dv == d (a pair runs on the "
            "smallest compiled one that holds both)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
        raise NotImplementedError("backward: flash_attn3 implements the forward pass only; run it under "
                                  "torch.no_grad() or pass tensors that do not require grad")
