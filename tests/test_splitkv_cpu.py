"""CPU tests of the split-KV API's argument rules (no GPU, no compiled extension needed).

flash_attn_combine, get_scheduler_metadata and the num_splits / pack_gqa / scheduler_metadata arguments of the
forward functions must reject bad arguments with a TypeError or ValueError whose message names the argument,
before anything needs the CUDA extension. As in tests/test_validation.py, a call that breaks no rule reaches the
device rule, which is checked last, and fails on CPU tensors with "must be on a CUDA device": that is how these
tests see that validation passed. The last part checks the properties of flash_attn3.reference.combine_ref that
tests/test_decode_gpu.py relies on (strides, large LSE offsets, rows no split saw).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from flash_attn3 import (flash_attn_combine, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                         get_scheduler_metadata, varlen_fwd)
from flash_attn3.reference import combine_ref

BF16, F16 = torch.bfloat16, torch.float16
ON_CPU = r"must be on a CUDA device"


def _names(message: str, name: str) -> bool:
    """Whether `message` mentions `name` as a whole word: `out` is not found inside `out_partial` or `out_dtype`."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


def _assert_raises_naming(exc, names, call):
    """`call` raises `exc` (exactly that class or a subclass) with a message naming one of `names`."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert any(_names(message, n) for n in names), f"the message does not name {' or '.join(names)}: {message!r}"


def i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


def partials(splits=3, b=2, s=4, h=2, d=16):
    """(out_partial, lse_partial), both contiguous float32 (FA3 would reject this lse; flash_attn3 accepts it)."""
    return torch.randn(splits, b, s, h, d), torch.randn(splits, b, s, h)


def packed_partials(splits=3, total=7, h=2, d=16):
    return torch.randn(splits, total, h, d), torch.randn(splits, total, h)


# ------------------------------------------------------------------------------------ flash_attn_combine


def _combine(out_partial=None, lse_partial=None, **kw):
    """A call of flash_attn_combine on the default partials with some of them replaced."""
    op, lp = partials()
    return lambda: flash_attn_combine(op if out_partial is None else out_partial,
                                      lp if lse_partial is None else lse_partial, **kw)


COMBINE_BAD = [
    # (id, call, exception, the names of which the message must contain one)
    ("out_partial_fp16", _combine(partials()[0].half()), TypeError, ["out_partial"]),
    ("out_partial_bf16", _combine(partials()[0].to(BF16)), TypeError, ["out_partial"]),
    ("out_partial_fp64", _combine(partials()[0].double()), TypeError, ["out_partial"]),
    ("lse_partial_fp16", _combine(lse_partial=partials()[1].half()), TypeError, ["lse_partial"]),
    ("lse_partial_fp64", _combine(lse_partial=partials()[1].double()), TypeError, ["lse_partial"]),
    ("out_partial_list", lambda: flash_attn_combine([1.0], partials()[1]), TypeError, ["out_partial"]),
    ("lse_partial_none", lambda: flash_attn_combine(partials()[0], None), TypeError, ["lse_partial"]),
    ("out_partial_rank3", lambda: flash_attn_combine(torch.randn(3, 4, 16), torch.randn(3, 4)), ValueError,
     ["out_partial"]),
    ("out_partial_rank6", lambda: flash_attn_combine(torch.randn(3, 2, 4, 2, 1, 16), torch.randn(3, 2, 4, 2, 1)),
     ValueError, ["out_partial"]),
    ("lse_rank", _combine(lse_partial=torch.randn(3, 2, 4)), ValueError, ["lse_partial"]),
    ("lse_seqlen", _combine(lse_partial=partials(s=5)[1]), ValueError, ["lse_partial"]),
    ("lse_heads", _combine(lse_partial=partials(h=3)[1]), ValueError, ["lse_partial"]),
    ("lse_splits", _combine(lse_partial=partials(splits=2)[1]), ValueError, ["lse_partial"]),
    ("lse_batch", _combine(lse_partial=partials(b=1)[1]), ValueError, ["lse_partial"]),
    ("lse_with_head_dim", _combine(lse_partial=partials()[0]), ValueError, ["lse_partial"]),
    ("varlen_lse_shape", lambda: flash_attn_combine(packed_partials()[0], packed_partials(total=6)[1]), ValueError,
     ["lse_partial"]),
    ("num_splits_0", lambda: flash_attn_combine(*partials(splits=0)), ValueError, ["out_partial", "num_splits"]),
    ("num_splits_257", lambda: flash_attn_combine(*partials(splits=257, b=1, s=1, h=1, d=4)), ValueError,
     ["out_partial", "num_splits"]),
    ("out_partial_last_dim_strided", _combine(partials(d=32)[0][..., ::2]), ValueError, ["out_partial"]),
    ("out_dtype_int32", _combine(out_dtype=torch.int32), TypeError, ["out_dtype"]),
    ("out_dtype_fp64", _combine(out_dtype=torch.float64), TypeError, ["out_dtype"]),
    ("out_dtype_fp8", _combine(out_dtype=torch.float8_e4m3fn), TypeError, ["out_dtype"]),
    ("out_dtype_str", _combine(out_dtype="float16"), TypeError, ["out_dtype"]),
    ("out_fp16_default_dtype", _combine(out=torch.empty(2, 4, 2, 16, dtype=F16)), TypeError, ["out"]),
    ("out_fp32_for_bf16", _combine(out=torch.empty(2, 4, 2, 16), out_dtype=BF16), TypeError, ["out"]),
    ("out_head_dim", _combine(out=torch.empty(2, 4, 2, 8)), ValueError, ["out"]),
    ("out_with_split_dim", _combine(out=torch.empty(3, 2, 4, 2, 16)), ValueError, ["out"]),
    ("out_seqlen", _combine(out=torch.empty(2, 5, 2, 16)), ValueError, ["out"]),
    ("out_varlen_shape", lambda: flash_attn_combine(*packed_partials(), out=torch.empty(6, 2, 16)), ValueError,
     ["out"]),
    ("out_last_dim_strided", _combine(out=torch.empty(2, 4, 2, 32)[..., ::2]), ValueError, ["out"]),
    ("out_list", _combine(out=[0.0]), TypeError, ["out"]),
]


@pytest.mark.parametrize("case", COMBINE_BAD, ids=[c[0] for c in COMBINE_BAD])
def test_combine_rejects_bad_arguments(case):
    _, call, exc, names = case
    _assert_raises_naming(exc, names, call)


def _strided_lse(kind, splits=3, b=2, s=4, h=2):
    """lse_partial views (splits, b, s, h) of every stride pattern the combine accepts."""
    if kind == "contiguous":
        return torch.randn(splits, b, s, h)
    if kind == "seq_contiguous":  # FA3's required layout
        return torch.randn(splits, b, h, s).transpose(-1, -2)
    if kind == "split_innermost":
        return torch.randn(b, s, h, splits).permute(3, 0, 1, 2)
    if kind == "head_slice":
        return torch.randn(splits, b, s, 2 * h)[..., 1::2]
    if kind == "every_other_split":
        return torch.randn(2 * splits, b, s, h)[::2]
    raise ValueError(kind)


COMBINE_VALID = [
    # (id, call): calls that pass every rule, so they reach the device rule
    *[(f"lse_{kind}", _combine(lse_partial=_strided_lse(kind))) for kind in
      ("contiguous", "seq_contiguous", "split_innermost", "head_slice", "every_other_split")],
    ("out_partial_split_innermost", _combine(torch.randn(2, 4, 2, 3, 16).permute(3, 0, 1, 2, 4))),
    ("out_partial_every_other_split", _combine(torch.randn(6, 2, 4, 2, 16)[::2])),
    ("out_partial_seq_head_swapped", _combine(torch.randn(3, 2, 2, 4, 16).transpose(2, 3))),
    ("varlen", lambda: flash_attn_combine(*packed_partials())),
    ("varlen_transposed_lse", lambda: flash_attn_combine(packed_partials()[0], torch.randn(2, 7, 3).permute(2, 1, 0))),
    ("one_split", lambda: flash_attn_combine(*partials(splits=1))),
    ("256_splits", lambda: flash_attn_combine(*partials(splits=256, b=1, s=1, h=1, d=4))),
    ("head_dim_80", lambda: flash_attn_combine(*partials(d=80))),
    ("out_dtype_fp32", _combine(out_dtype=torch.float32)),
    ("out_dtype_fp16", _combine(out_dtype=F16)),
    ("out_dtype_bf16", _combine(out_dtype=BF16)),
    ("out_fp32", _combine(out=torch.empty(2, 4, 2, 16))),
    ("out_bf16", _combine(out=torch.empty(2, 4, 2, 16, dtype=BF16), out_dtype=BF16)),
    ("out_transposed_storage", _combine(out=torch.empty(2, 2, 4, 16).transpose(1, 2))),
    ("out_varlen", lambda: flash_attn_combine(*packed_partials(), out=torch.empty(7, 2, 16, dtype=F16),
                                              out_dtype=F16)),
]


@pytest.mark.parametrize("case", COMBINE_VALID, ids=[c[0] for c in COMBINE_VALID])
def test_combine_accepts_valid_arguments(case):
    """Any strides with a contiguous last dim, 1 to 256 splits, the three out dtypes, an out= of any strides."""
    _, call = case
    with pytest.raises(ValueError, match=ON_CPU):
        call()


# ------------------------------------------------------------------------------------ get_scheduler_metadata

SCHED_ARGS = dict(batch_size=2, max_seqlen_q=1, max_seqlen_k=128, num_heads_q=8, num_heads_kv=2, headdim=64)


def _sched(**over):
    args = {**SCHED_ARGS, "cache_seqlens": i32(5, 6), **over}
    return lambda: get_scheduler_metadata(**args)


SCHED_SCALARS = ["batch_size", "max_seqlen_q", "max_seqlen_k", "num_heads_q", "num_heads_kv", "headdim",
                 "max_seqlen_k_new", "attention_chunk", "sm_margin", "headdim_v"]  # num_splits < 0: FA3's heuristic


@pytest.mark.parametrize("name", SCHED_SCALARS)
def test_scheduler_metadata_rejects_negative_scalars(name):
    _assert_raises_naming(ValueError, [name], _sched(**{name: -1}))


@pytest.mark.parametrize("num_splits", [257, 1000])
def test_scheduler_metadata_rejects_too_many_splits(num_splits):
    _assert_raises_naming(ValueError, ["num_splits"], _sched(num_splits=num_splits))


SCHED_TYPES = [
    ("batch_size_float", dict(batch_size=2.0), "batch_size"),
    ("headdim_str", dict(headdim="64"), "headdim"),
    ("num_splits_float", dict(num_splits=1.5), "num_splits"),
    ("num_splits_bool", dict(num_splits=True), "num_splits"),
    ("cache_seqlens_int", dict(cache_seqlens=5), "cache_seqlens"),
    ("cache_seqlens_list", dict(cache_seqlens=[5, 6]), "cache_seqlens"),
    ("pack_gqa_str", dict(pack_gqa="yes"), "pack_gqa"),
]


@pytest.mark.parametrize("case", SCHED_TYPES, ids=[c[0] for c in SCHED_TYPES])
def test_scheduler_metadata_rejects_wrong_types(case):
    _, over, name = case
    _assert_raises_naming(TypeError, [name], _sched(**over))


@pytest.mark.parametrize("over", [{}, dict(causal=True, num_splits=3, pack_gqa=True), dict(num_splits=256),
                                  dict(num_splits=0, pack_gqa=False, qkv_dtype=F16, headdim_v=64),
                                  dict(num_splits=-1),
                                  dict(page_size=16, cache_leftpad=i32(0, 1), cu_seqlens_k_new=i32(0, 1, 2),
                                       max_seqlen_k_new=1)],
                         ids=["defaults", "causal_split3_pack", "split256", "fp16_nopack", "split_negative_is_heuristic",
                              "paged_leftpad_append"])
def test_scheduler_metadata_valid_call_needs_cuda_cache_seqlens(over):
    """A valid call passes the scalar checks and fails only because cache_seqlens is on the CPU (the
    metadata lives on cache_seqlens' device), with a ValueError naming it, not a NotImplementedError."""
    _assert_raises_naming(ValueError, ["cache_seqlens"], _sched(**over))


# ------------------------------------------------------------------------ num_splits / pack_gqa of the forwards


def _dense(b=2, sq=3, sk=9, h=4, hk=2, d=64, dtype=BF16):
    return (torch.randn(b, sq, h, d).to(dtype), torch.randn(b, sk, hk, d).to(dtype),
            torch.randn(b, sk, hk, d).to(dtype))


def _packed(lq=(3, 0, 5), lk=(9, 4, 0), h=4, hk=2, d=64):
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return (torch.randn(sum(lq), h, d).to(BF16), torch.randn(sum(lk), hk, d).to(BF16),
            torch.randn(sum(lk), hk, d).to(BF16), cu(lq), cu(lk), max(lq), max(lk))


FORWARDS = {
    "flash_attn_func": lambda **kw: flash_attn_func(*_dense(), **kw),
    "flash_attn_varlen_func": lambda **kw: flash_attn_varlen_func(*_packed(), **kw),
    "flash_attn_with_kvcache": lambda **kw: flash_attn_with_kvcache(*_dense(sq=1), cache_seqlens=i32(4, 9), **kw),
    "varlen_fwd": lambda **kw: varlen_fwd(*_dense(), seqused_k=i32(0, 9), **kw),
}


@pytest.mark.parametrize("pack_gqa", [None, True, False], ids=["pack_auto", "pack_on", "pack_off"])
@pytest.mark.parametrize("num_splits", [-7, -1, 0, 1, 2, 3, 255, 256])  # <= 0: heuristic, as in FA3
@pytest.mark.parametrize("fn", list(FORWARDS))
def test_forward_accepts_num_splits_and_pack_gqa(fn, num_splits, pack_gqa):
    with pytest.raises(ValueError, match=ON_CPU):
        FORWARDS[fn](num_splits=num_splits, pack_gqa=pack_gqa)


FORWARD_BAD = [
    ("num_splits_257", dict(num_splits=257), ValueError, "num_splits"),
    ("num_splits_float", dict(num_splits=2.0), TypeError, "num_splits"),
    ("num_splits_none", dict(num_splits=None), TypeError, "num_splits"),
    ("pack_gqa_int", dict(pack_gqa=1), TypeError, "pack_gqa"),
    ("pack_gqa_str", dict(pack_gqa="true"), TypeError, "pack_gqa"),
]


@pytest.mark.parametrize("case", FORWARD_BAD, ids=[c[0] for c in FORWARD_BAD])
@pytest.mark.parametrize("fn", list(FORWARDS))
def test_forward_rejects_bad_num_splits_and_pack_gqa(fn, case):
    _, over, exc, name = case
    _assert_raises_naming(exc, [name], lambda: FORWARDS[fn](**over))


def test_kvcache_scheduler_metadata_must_be_a_tensor():
    _assert_raises_naming(TypeError, ["scheduler_metadata"], lambda: FORWARDS["flash_attn_with_kvcache"](
        scheduler_metadata=[0, 1, 2]))


def test_kvcache_scheduler_metadata_tensor_passes_to_the_device_rule():
    """An int32 metadata tensor is an accepted argument (on CPU the device rule then stops the call)."""
    with pytest.raises(ValueError, match=ON_CPU):
        FORWARDS["flash_attn_with_kvcache"](scheduler_metadata=torch.zeros(8, dtype=torch.int32), num_splits=0)


# ------------------------------------------------------------------------ combine_ref, as the GPU tests use it


def test_combine_ref_ignores_strides():
    out_partial = torch.randn(2 * 5, 2, 3, 7, 16)[::2].transpose(2, 3)  # (5, 2, 7, 3, 16) view
    lse_partial = torch.randn(2, 7, 3, 5).permute(3, 0, 1, 2) * 4  # split dim innermost
    lse_partial[torch.rand(lse_partial.shape) < 0.3] = -math.inf
    out, lse = combine_ref(out_partial, lse_partial)
    out_c, lse_c = combine_ref(out_partial.contiguous(), lse_partial.contiguous())
    torch.testing.assert_close(out, out_c, atol=1e-6, rtol=1e-6)  # reduction order may follow the strides
    torch.testing.assert_close(lse, lse_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("offset", [100.0, -100.0])
def test_combine_ref_is_stable_under_large_lse(offset):
    """A common LSE offset that overflows / underflows float32 exp moves the LSE by the offset and leaves the
    output alone (the max-subtracted form): the GPU test's +-100 offsets compare against a sound reference."""
    out_partial = torch.randn(17, 2, 5, 3, 8)
    lse_partial = torch.randn(17, 2, 5, 3) * 4
    out0, lse0 = combine_ref(out_partial.double(), lse_partial.double())
    out1, lse1 = combine_ref(out_partial.double(), lse_partial.double() + offset)
    assert torch.isfinite(out1).all() and torch.isfinite(lse1).all()
    torch.testing.assert_close(out1, out0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse1, lse0 + offset, atol=1e-12, rtol=1e-12)


def test_combine_ref_rows_no_split_saw():
    out_partial = torch.randn(3, 1, 4, 2, 8)
    lse_partial = torch.randn(3, 1, 4, 2)
    lse_partial[:, 0, 1] = -math.inf  # every split of row (0, 1, :)
    lse_partial[1:, 0, 2] = -math.inf  # all but split 0 of row (0, 2, :)
    out_partial[1:, 0, 2] = math.nan  # their partials hold garbage
    out, lse = combine_ref(out_partial, lse_partial)
    assert (out[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()
    torch.testing.assert_close(out[0, 2], out_partial[0, 0, 2])
    torch.testing.assert_close(lse[0, 2], lse_partial[0, 0, 2])
