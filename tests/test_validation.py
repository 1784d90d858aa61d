"""Argument validation of the public functions, with CPU tensors (no GPU, no extension needed).

Every rule must raise the right exception type with a message naming the argument. Because the device
rule is checked last, a call that breaks no other rule raises "must be on a CUDA device" on CPU; that is
how the tests tell that validation passed. The NotImplementedError / RuntimeError paths and the arguments
handed to the C++ op are tested by standing in for the device check, the build record and the op itself
(`kernel_stub` below); nothing else of the package is replaced.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from _op_args import op_args  # raw-op arguments by schema name (tests/ is on sys.path under pytest)

import flash_attn3
from flash_attn3 import _checked, _checks, _ops
from flash_attn3 import (flash_attn_combine, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                         get_scheduler_metadata, varlen_fwd)

F16, BF16, FP8 = torch.float16, torch.bfloat16, torch.float8_e4m3fn
ON_CPU = "must be on a CUDA device"


def qkv(b=2, sq=5, sk=7, h=4, hk=2, d=64, dv=None, dtype=F16):
    dv = d if dv is None else dv
    return (torch.randn(b, sq, h, d).to(dtype), torch.randn(b, sk, hk, d).to(dtype),
            torch.randn(b, sk, hk, dv).to(dtype))


def packed(lens_q=(3, 1, 4), lens_k=(5, 2, 6), h=4, hk=2, d=64, dtype=F16):
    q = torch.randn(sum(lens_q), h, d).to(dtype)
    k, v = torch.randn(sum(lens_k), hk, d).to(dtype), torch.randn(sum(lens_k), hk, d).to(dtype)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k)


def i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


def paged(b=2, pages=3, page_size=5, num_pages=8, sq=1, h=4, hk=2, d=64, dtype=F16):
    q = torch.randn(b, sq, h, d).to(dtype)
    kc, vc = torch.randn(num_pages, page_size, hk, d).to(dtype), torch.randn(num_pages, page_size, hk, d).to(dtype)
    table = torch.randint(0, num_pages, (b, pages), dtype=torch.int32)
    return q, kc, vc, table


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ------------------------------------------------------------------------------------ flash_attn_func


def _f(**over):
    q, k, v = over.pop("qkv", None) or qkv()
    return lambda: flash_attn_func(q, k, v, **over)


FUNC_CASES = [
    # (id, make-call, exception, message regex)
    ("fp32", lambda: flash_attn_func(*qkv(dtype=torch.float32)), TypeError, r"q: dtype torch.float32 is not supp"),
    ("int_q", lambda: flash_attn_func(torch.ones(2, 5, 4, 64, dtype=torch.int32), *qkv()[1:]), TypeError,
     r"q: dtype torch.int32"),
    ("k_dtype", lambda: flash_attn_func(qkv()[0], *qkv(dtype=BF16)[1:]), TypeError,
     r"k: dtype torch.bfloat16 must match q's dtype torch.float16"),
    ("v_dtype", lambda: flash_attn_func(*qkv()[:2], qkv(dtype=BF16)[2]), TypeError, r"v: dtype"),
    ("q_not_tensor", lambda: flash_attn_func([1.0], *qkv()[1:]), TypeError, r"q: expected a torch.Tensor"),
    ("q_rank", lambda: flash_attn_func(qkv()[0][0], *qkv()[1:]), ValueError, r"q: must be 4-D"),
    ("k_rank", lambda: flash_attn_func(qkv()[0], qkv()[1][0], qkv()[2]), ValueError, r"k: must be 4-D"),
    ("v_seqlen", lambda: flash_attn_func(*qkv()[:2], qkv(sk=6)[2]), ValueError,
     r"v: shape \(2, 6, 2, 64\) must match k's"),
    ("k_batch", lambda: flash_attn_func(qkv()[0], *qkv(b=3)[1:]), ValueError,
     r"batch size of the keys \(k.shape\[0\]=3\) must equal the batch size of the queries \(2\)"),
    ("k_headdim", lambda: flash_attn_func(qkv()[0], qkv(d=32)[1], qkv()[2]), ValueError,
     r"k: head dim 32 must equal q's head dim 64"),
    ("hdim_too_big", lambda: flash_attn_func(*qkv(d=264, dtype=BF16)), ValueError,
     r"q: head dim 264 exceeds 256, the largest supported for bfloat16"),
    ("hdim_mult8", lambda: flash_attn_func(*qkv(d=60)), ValueError, r"q: head dim 60 must be a positive multiple of 8"),
    ("hdim_fp8_mult16", lambda: flash_attn_func(*qkv(d=40, dtype=FP8)), ValueError,
     r"q: head dim 40 must be a positive multiple of 16 for float8_e4m3fn"),
    ("dv_mult8", lambda: flash_attn_func(*qkv(d=64, dv=12)), ValueError, r"v: head dim 12 must be a positive multiple"),
    ("dv_pair", lambda: flash_attn_func(*qkv(d=128, dv=64)), ValueError,
     r"v: head dim 64 differs from q's head dim 128"),
    ("dv_512_fp8", lambda: flash_attn_func(*qkv(d=64, dv=512, dtype=FP8)), ValueError, r"v: head dim 512 differs"),
    ("gqa_divisible", lambda: flash_attn_func(*qkv(h=12, hk=5)), ValueError,
     r"num_heads \(q.shape\[-2\]=12\) must be divisible by num_heads_k \(k.shape\[-2\]=5\)"),
    ("q_stride", lambda: flash_attn_func(torch.randn(2, 5, 4, 128).half()[..., ::2], *qkv()[1:]), ValueError,
     r"q: last dimension must be contiguous \(stride\(-1\) == 1\), got stride 2"),
    ("v_stride", lambda: flash_attn_func(*qkv()[:2], torch.randn(2, 7, 2, 128).half()[..., ::2]), ValueError,
     r"v: last dimension must be contiguous"),
    ("window_lt_minus1", _f(window_size=(-2, 0)), ValueError, r"window_size: left must be >= -1"),
    ("window_right_lt_minus1", _f(window_size=(0, -5)), ValueError, r"window_size: right must be >= -1"),
    ("window_float", _f(window_size=(1.5, 0)), TypeError, r"window_size: left must be an int"),
    ("window_not_pair", _f(window_size=3), TypeError, r"window_size: expected a \(left, right\) pair"),
    ("window_triple", _f(window_size=(1, 2, 3)), TypeError, r"window_size: expected a \(left, right\) pair"),
    ("window_none", _f(window_size=None), TypeError, r"window_size: expected a \(left, right\) pair"),
    ("window_str", _f(window_size="ab"), TypeError, r"window_size: expected a \(left, right\) pair"),
    ("window_bool", _f(window_size=(True, 0)), TypeError, r"window_size: left must be an int, got bool"),
    ("window_tensor_3", _f(window_size=torch.tensor([1, 2, 3])), ValueError,
     r"window_size: a tensor or array must have shape \(2,\) \(left, right\), got \(3,\)"),
    ("window_tensor_2d", _f(window_size=torch.zeros(1, 2, dtype=torch.int64)), ValueError,
     r"window_size: a tensor or array must have shape \(2,\)"),
    ("window_tensor_float", _f(window_size=torch.tensor([4.0, 0.0])), TypeError,
     r"window_size: a tensor must have an integer dtype, got torch.float32"),
    ("window_tensor_bool", _f(window_size=torch.tensor([True, False])), TypeError,
     r"window_size: a tensor must have an integer dtype, got torch.bool"),
    ("window_tensor_lt_minus1", _f(window_size=torch.tensor([-3, 0])), ValueError,
     r"window_size: left must be >= -1 \(-1 = unbounded\), got -3"),
    ("window_0d_float_tensor", _f(window_size=(2, torch.tensor(1.5))), TypeError,
     r"window_size: a tensor must have an integer dtype"),
    ("window_1elem_tensor_side", _f(window_size=(torch.tensor([2]), 0)), TypeError,
     r"window_size: left must be an int, got Tensor"),
    ("window_numpy_float", _f(window_size=np.array([1.0, 2.0])), TypeError,
     r"window_size: an array must have an integer dtype, got float64"),
    ("window_numpy_float_side", _f(window_size=(np.float32(1.0), 0)), TypeError,
     r"window_size: left must be an int, got float32"),
    ("softcap_negative", _f(softcap=-1.0), ValueError, r"softcap: must be a finite value >= 0"),
    ("softcap_nan", _f(softcap=float("nan")), ValueError, r"softcap: must be a finite value"),
    ("softcap_str", _f(softcap="1"), TypeError, r"softcap: expected a float"),
    ("scale_str", _f(softmax_scale="0.1"), TypeError, r"softmax_scale: expected a float or None"),
    ("scale_inf", _f(softmax_scale=float("inf")), ValueError, r"softmax_scale: must be finite"),
    ("scale_minus_inf", _f(softmax_scale=-float("inf")), ValueError, r"softmax_scale: must be finite"),
    ("scale_nan", _f(softmax_scale=float("nan")), ValueError, r"softmax_scale: must be finite"),
    ("num_splits_big", _f(num_splits=257), ValueError, r"num_splits: must be <= 256, got 257"),
    ("num_splits_float", _f(num_splits=2.0), TypeError, r"num_splits: expected an int"),
    ("pack_gqa_str", _f(pack_gqa="yes"), TypeError, r"pack_gqa: expected a bool or None"),
    ("sm_margin_negative", _f(sm_margin=-1), ValueError, r"sm_margin: must be >= 0"),
    ("causal_not_bool", _f(causal=1), TypeError, r"causal: expected a bool"),
    ("descale_16bit", _f(q_descale=torch.ones(2, 2)), ValueError,
     r"q_descale: only valid with torch.float8_e4m3fn inputs"),
    ("descale_shape", _f(qkv=qkv(dtype=FP8), k_descale=torch.ones(2, 4)), ValueError,
     r"k_descale: must have shape \(batch, num_heads_k\) = \(2, 2\), got \(2, 4\)"),
    ("descale_dtype", _f(qkv=qkv(dtype=FP8), v_descale=torch.ones(2, 2, dtype=torch.float64)), TypeError,
     r"v_descale: must have dtype torch.float32"),
    ("qv_not_tensor", _f(qv=3), TypeError, r"qv: expected a torch.Tensor"),
    ("chunk_negative", _f(attention_chunk=-1), ValueError, r"attention_chunk: must be >= 0"),
    ("return_probs_not_bool", _f(return_attn_probs="yes"), TypeError, r"return_attn_probs: expected a bool"),
    ("deterministic_not_bool", _f(deterministic=None), TypeError, r"deterministic: expected a bool"),
    # Calls that break no rule: only the device rule fires.
    ("valid_dense", _f(), ValueError, r"q: " + ON_CPU + ", got cpu"),
    ("valid_causal_window", _f(causal=True, window_size=(3, 0), softcap=2.0, num_splits=0), ValueError, ON_CPU),
    ("valid_fp8_descale", _f(qkv=qkv(dtype=FP8, d=128), q_descale=torch.ones(2, 2),
                             k_descale=torch.ones(1, 1).expand(2, 2)), ValueError, ON_CPU),
    ("valid_mqa_hdim136", _f(qkv=qkv(h=6, hk=1, d=136, dtype=BF16)), ValueError, ON_CPU),
    ("valid_asym_dv", _f(qkv=qkv(d=64, dv=512)), ValueError, ON_CPU),
    ("valid_scale_zero", _f(softmax_scale=0.0), ValueError, ON_CPU),
    ("valid_scale_int_zero", _f(softmax_scale=0), ValueError, ON_CPU),
    ("valid_scale_negative", _f(softmax_scale=-0.7), ValueError, ON_CPU),
    ("valid_scale_tiny", _f(softmax_scale=-1e-30), ValueError, ON_CPU),
    ("valid_window_list", _f(window_size=[3, 1]), ValueError, ON_CPU),
    ("valid_window_tensor", _f(window_size=torch.tensor([3, 0])), ValueError, ON_CPU),
    ("valid_window_tensor_int32", _f(window_size=torch.tensor([-1, 2], dtype=torch.int32)), ValueError, ON_CPU),
    ("valid_window_randint", _f(window_size=torch.randint(0, 7, (2,))), ValueError, ON_CPU),  # FA3's own tests
    ("valid_window_0d_tensors", _f(window_size=(torch.tensor(2), torch.tensor(-1))), ValueError, ON_CPU),
    ("valid_window_numpy_ints", _f(window_size=(np.int64(2), np.int32(0))), ValueError, ON_CPU),
    ("valid_window_numpy_array", _f(window_size=np.array([2, 0], dtype=np.int32)), ValueError, ON_CPU),
    ("valid_strided_views", lambda: flash_attn_func(*torch.randn(2, 5, 3, 4, 64).half().unbind(2)), ValueError,
     ON_CPU),
    ("meta_device", lambda: flash_attn_func(*(t.to("meta") for t in qkv())), ValueError, r"q: .*got meta"),
]


@pytest.mark.parametrize("case", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_flash_attn_func_rules(case):
    _, call, exc, match = case
    raises(exc, match, call)


# ------------------------------------------------------------------------------- flash_attn_varlen_func


def _v(**over):
    q, k, v, cq, ck, mq, mk = packed()
    args = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
    args.update(over)
    tensors = args.pop("tensors", (q, k, v))
    return lambda: flash_attn_varlen_func(*tensors, **args)


VARLEN_CASES = [
    ("cu_int64", _v(cu_seqlens_q=torch.tensor([0, 3, 4, 8])), TypeError, r"cu_seqlens_q: must have dtype torch.int32"),
    ("cu_2d", _v(cu_seqlens_k=i32(0, 5, 7, 13).reshape(2, 2)), ValueError, r"cu_seqlens_k: must be 1-D"),
    ("cu_noncontig", _v(cu_seqlens_q=i32(0, 9, 3, 9, 4, 9, 8, 9)[::2]), ValueError,
     r"cu_seqlens_q: must be contiguous"),
    ("cu_batch_mismatch", _v(cu_seqlens_k=i32(0, 5, 13)), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must describe the same batch"),
    ("max_q_missing", _v(max_seqlen_q=None), ValueError, r"max_seqlen_q: required when cu_seqlens_q is given"),
    ("max_k_missing", _v(max_seqlen_k=None), ValueError, r"max_seqlen_k: required"),
    ("max_q_negative", _v(max_seqlen_q=-1), ValueError, r"max_seqlen_q: must be a non-negative int"),
    ("max_q_float", _v(max_seqlen_q=4.0), TypeError, r"max_seqlen_q: expected an int"),
    ("max_k_exceeds_total", _v(max_seqlen_k=14), ValueError,
     r"max_seqlen_k: 14 exceeds the number of packed rows of k \(k.shape\[0\]=13\)"),
    ("max_q_exceeds_total", _v(max_seqlen_q=9), ValueError, r"max_seqlen_q: 9 exceeds"),
    ("q_4d_with_cu", _v(tensors=qkv()), ValueError, r"q: must be 3-D \(total_q, num_heads, head_dim\)"),
    ("seqused_q_length", _v(seqused_q=i32(1, 2)), ValueError, r"seqused_q: must have shape \(3,\)"),
    ("seqused_k_dtype", _v(seqused_k=torch.tensor([1, 2, 3])), TypeError, r"seqused_k: must have dtype torch.int32"),
    ("seqused_k_2d", _v(seqused_k=i32(1, 2, 3).reshape(3, 1)), ValueError, r"seqused_k: must be 1-D"),
    ("dense_q_cu_k_batch", _v(tensors=(qkv()[0], *packed()[1:3]), cu_seqlens_q=None), ValueError,
     r"cu_seqlens_k: length 4 must be batch \+ 1 = 3 \(batch from q.shape\[0\]\)"),
    ("varlen_gqa", _v(tensors=packed(h=6, hk=4)[:3]), ValueError, r"num_heads \(q.shape\[-2\]=6\)"),
    ("scale_nan", _v(softmax_scale=float("nan")), ValueError, r"softmax_scale: must be finite"),
    ("window_tensor_3", _v(window_size=torch.tensor([1, 2, 3])), ValueError, r"window_size: a tensor or array"),
    ("valid_varlen", _v(), ValueError, ON_CPU),
    ("valid_varlen_scale_zero_window_tensor", _v(softmax_scale=0.0, window_size=torch.tensor([4, 0])), ValueError,
     ON_CPU),
    ("valid_varlen_seqused_window", _v(seqused_q=i32(1, 1, 2), seqused_k=i32(0, 2, 6), window_size=(2, 1)),
     ValueError, ON_CPU),
    ("valid_dense_q_varlen_k", _v(tensors=(qkv(b=3)[0], *packed()[1:3]), cu_seqlens_q=None, max_seqlen_q=None),
     ValueError, ON_CPU),
    ("valid_cpu_cu_seqlens", _v(max_seqlen_q=0), ValueError, ON_CPU),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_flash_attn_varlen_func_rules(case):
    _, call, exc, match = case
    raises(exc, match, call)


# ------------------------------------------------------------------------------ flash_attn_with_kvcache


def _kv(**over):
    q, kc, vc, table = paged()
    args = dict(page_table=table, cache_seqlens=i32(3, 15))
    args.update(over)
    tensors = args.pop("tensors", (q, kc, vc))
    return lambda: flash_attn_with_kvcache(*tensors, **args)


def _dense_cache(**over):
    q, kc, vc = qkv(b=2, sq=1, sk=9)
    args = dict(cache_seqlens=i32(3, 9))
    args.update(over)
    tensors = args.pop("tensors", (q, kc, vc))
    return lambda: flash_attn_with_kvcache(*tensors, **args)


KVCACHE_CASES = [
    ("page_table_int64", _kv(page_table=torch.zeros(2, 3, dtype=torch.int64)), TypeError,
     r"page_table: must have dtype torch.int32"),
    ("page_table_1d", _kv(page_table=i32(0, 1, 2)), ValueError, r"page_table: must be 2-D \(batch, max_pages\)"),
    ("page_table_stride", _kv(page_table=torch.zeros(2, 6, dtype=torch.int32)[:, ::2]), ValueError,
     r"page_table: last dimension must be contiguous"),
    ("page_table_batch", _kv(page_table=torch.zeros(3, 3, dtype=torch.int32)), ValueError,
     r"batch size of the keys \(page_table.shape\[0\]=3\) must equal the batch size of the queries \(2\)"),
    ("paged_k_rank", _kv(tensors=(paged()[0], paged()[1][0], paged()[2][0])), ValueError,
     r"k_cache: must be 4-D \(num_pages, page_size, num_heads_k, head_dim\)"),
    ("paged_v_page_size", _kv(tensors=(paged()[0], paged()[1], paged(page_size=4)[2])), ValueError,
     r"v_cache: shape \(8, 4, 2, 64\) must match k_cache's"),
    ("k_cache_stride", _dense_cache(tensors=(qkv(sq=1)[0], torch.randn(2, 7, 2, 128).half()[..., ::2],
                                             qkv(sq=1)[2])), ValueError, r"k_cache: last dimension must be contig"),
    ("cache_seqlens_int64", _kv(cache_seqlens=torch.tensor([1, 2])), TypeError,
     r"cache_seqlens: must have dtype torch.int32"),
    ("cache_seqlens_length", _kv(cache_seqlens=i32(1, 2, 3)), ValueError, r"cache_seqlens: must have shape \(2,\)"),
    ("cache_seqlens_int_negative", _kv(cache_seqlens=-1), ValueError, r"cache_seqlens: must be >= 0"),
    ("cache_seqlens_int_too_big", _kv(cache_seqlens=16), ValueError, r"cache_seqlens: must be <= 15, got 16"),
    ("cache_seqlens_float", _kv(cache_seqlens=1.5), TypeError, r"cache_seqlens: expected an int"),
    ("cache_batch_idx_length", _dense_cache(cache_batch_idx=i32(0)), ValueError,
     r"cache_batch_idx: must have shape \(2,\)"),
    ("cache_batch_idx_dtype", _dense_cache(cache_batch_idx=torch.tensor([0, 1])), TypeError,
     r"cache_batch_idx: must have dtype torch.int32"),
    ("cache_leftpad_dtype", _dense_cache(cache_leftpad=torch.tensor([0, 1])), TypeError,
     r"cache_leftpad: must have dtype torch.int32"),
    ("cache_batch_mismatch", _dense_cache(tensors=(qkv(b=2, sq=1)[0], *qkv(b=4)[1:])), ValueError,
     r"batch size of the keys \(k_cache.shape\[0\]=4\)"),
    ("k_without_v", _dense_cache(k=torch.randn(2, 1, 2, 64).half()), ValueError, r"k, v: .* given together"),
    ("k_without_cache_seqlens", _dense_cache(k=torch.randn(2, 1, 2, 64).half(), v=torch.randn(2, 1, 2, 64).half(),
                                             cache_seqlens=None), ValueError, r"cache_seqlens: required"),
    # SGLang passes cu_seqlens_k_new=cu_seqlens_k without new k, v; FA3 ignores it, so do we.
    ("valid_cu_k_new_without_k", _dense_cache(cu_seqlens_k_new=i32(0, 1, 2)), ValueError, ON_CPU),
    ("cu_k_new_without_k_type", _dense_cache(cu_seqlens_k_new=[0, 1, 2]), TypeError, r"cu_seqlens_k_new: expected"),
    ("rotary_without_sin", _dense_cache(rotary_cos=torch.ones(9, 32).half()), ValueError,
     r"rotary_cos, rotary_sin: must be given together"),
    ("rotary_without_k", _dense_cache(rotary_cos=torch.ones(9, 32).half(), rotary_sin=torch.ones(9, 32).half()),
     ValueError, r"rotary_cos: .* requires new k, v"),
    ("rotary_interleaved_type", _dense_cache(rotary_interleaved=None), TypeError, r"rotary_interleaved: expected a"),
    ("num_splits_big", _dense_cache(num_splits=300), ValueError, r"num_splits: must be <= 256"),
    ("window_float_tensor", _kv(window_size=torch.tensor([1.0, 0.0])), TypeError, r"window_size: a tensor must"),
    ("valid_paged_scale_negative_window_list", _kv(softmax_scale=-0.5, window_size=[2, 0]), ValueError, ON_CPU),
    ("return_lse_type", _dense_cache(return_softmax_lse=1), TypeError, r"return_softmax_lse: expected a bool"),
    ("varlen_q_needs_max", _dense_cache(tensors=(packed()[0][:2], *qkv(b=2, sk=9)[1:]), cu_seqlens_q=i32(0, 1, 2)),
     ValueError, r"max_seqlen_q: required"),
    ("valid_paged", _kv(), ValueError, ON_CPU),
    ("valid_paged_int_seqlens", _kv(cache_seqlens=15, causal=True, num_splits=0), ValueError, ON_CPU),
    ("valid_dense_batch_idx_leftpad", _dense_cache(tensors=(qkv(b=2, sq=1)[0], *qkv(b=5, sk=9)[1:]),
                                                   cache_batch_idx=i32(4, 0), cache_leftpad=i32(0, 2)),
     ValueError, ON_CPU),
    ("valid_varlen_q", _dense_cache(tensors=(packed()[0][:3], *qkv(b=2, sk=9)[1:]), cu_seqlens_q=i32(0, 1, 3),
                                    max_seqlen_q=2), ValueError, ON_CPU),
    ("valid_append_reaches_device_rule", _dense_cache(k=torch.randn(2, 1, 2, 64).half(),
                                                      v=torch.randn(2, 1, 2, 64).half()), ValueError, ON_CPU),
]


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=[c[0] for c in KVCACHE_CASES])
def test_flash_attn_with_kvcache_rules(case):
    _, call, exc, match = case
    raises(exc, match, call)


# -------------------------------------------------------------------------------------------- varlen_fwd


def _vf(**over):
    q, k, v = qkv()
    tensors = over.pop("tensors", (q, k, v))
    return lambda: varlen_fwd(*tensors, **over)


VARLEN_FWD_CASES = [
    ("out_dtype", _vf(out=torch.empty(2, 5, 4, 64, dtype=BF16)), TypeError, r"out: dtype torch.bfloat16 must be "),
    ("out_fp8_not_bf16", _vf(tensors=qkv(dtype=FP8), out=torch.empty(2, 5, 4, 64, dtype=F16)), TypeError,
     r"out: .*the output of fp8 inputs is bfloat16"),
    ("out_shape", _vf(out=torch.empty(2, 5, 4, 32, dtype=F16)), ValueError, r"out: shape \(2, 5, 4, 32\) must be"),
    ("out_stride", _vf(out=torch.empty(2, 5, 4, 128, dtype=F16)[..., ::2]), ValueError,
     r"out: last dimension must be contiguous"),
    ("out_not_tensor", _vf(out=[1]), TypeError, r"out: expected a torch.Tensor"),
    ("cu_k_with_page_table", _vf(tensors=packed()[:3], cu_seqlens_q=packed()[3], cu_seqlens_k=packed()[4],
                                 max_seqlen_q=4, max_seqlen_k=6, page_table=i32(0).reshape(1, 1)), ValueError,
     r"cu_seqlens_k: cannot be combined with page_table"),
    ("cu_k_with_kv_batch_idx", _vf(tensors=packed()[:3], cu_seqlens_q=packed()[3], cu_seqlens_k=packed()[4],
                                   max_seqlen_q=4, max_seqlen_k=6, kv_batch_idx=i32(0, 1, 2)), ValueError,
     r"kv_batch_idx: cannot be combined with cu_seqlens_k"),
    ("leftpad_length", _vf(leftpad_k=i32(0)), ValueError, r"leftpad_k: must have shape \(2,\)"),
    ("sm_margin_negative", _vf(sm_margin=-1), ValueError, r"sm_margin: must be >= 0, got -1"),
    ("valid_out", _vf(out=torch.empty(2, 5, 4, 64, dtype=F16)), ValueError, ON_CPU),
    ("valid_fp8_out_bf16", _vf(tensors=qkv(dtype=FP8), out=torch.empty(2, 5, 4, 64, dtype=BF16)), ValueError, ON_CPU),
]


@pytest.mark.parametrize("case", VARLEN_FWD_CASES, ids=[c[0] for c in VARLEN_FWD_CASES])
def test_varlen_fwd_rules(case):
    _, call, exc, match = case
    raises(exc, match, call)


# ----------------------------------------------------------------------- combine / scheduler metadata


def partials(splits=3, b=2, s=4, h=2, d=16):
    out = torch.randn(splits, b, s, h, d)
    lse = torch.randn(splits, b, h, s).transpose(-1, -2)  # seq-contiguous, as FA3 expects
    return out, lse


COMBINE_CASES = [
    ("out_partial_dtype", lambda: flash_attn_combine(partials()[0].half(), partials()[1]), TypeError,
     r"out_partial: must have dtype torch.float32"),
    ("lse_shape", lambda: flash_attn_combine(partials()[0], partials(s=5)[1]), ValueError,
     r"lse_partial: shape \(3, 2, 5, 2\) must be out_partial's shape without the head dim"),
    ("rank", lambda: flash_attn_combine(torch.randn(3, 4, 16), torch.randn(3, 4)), ValueError,
     r"out_partial: must be 5-D"),
    ("too_many_splits", lambda: flash_attn_combine(*partials(splits=257, b=1, s=2, h=1, d=4)), ValueError,
     r"num_splits \(out_partial.shape\[0\]\): must be <= 256"),
    # Unlike FA3 (stride(-2) == 1), lse_partial may have any strides: a contiguous one passes every rule.
    ("lse_any_strides", lambda: flash_attn_combine(partials()[0], partials()[1].contiguous()), ValueError,
     r"out_partial: " + ON_CPU),
    ("out_dtype", lambda: flash_attn_combine(*partials(), out_dtype=torch.int32), TypeError, r"out_dtype: must be"),
    ("out_shape", lambda: flash_attn_combine(*partials(), out=torch.empty(2, 4, 2, 8)), ValueError, r"out: shape"),
    ("valid_combine", lambda: flash_attn_combine(*partials()), ValueError, r"out_partial: " + ON_CPU),
    ("scheduler_negative", lambda: get_scheduler_metadata(-1, 1, 1, 1, 1, 64, i32(1)), ValueError,
     r"batch_size: must be >= 0"),
    ("scheduler_cache_seqlens", lambda: get_scheduler_metadata(1, 1, 1, 1, 1, 64, 5), TypeError,
     r"cache_seqlens: expected a torch.Tensor"),
    ("scheduler_valid_on_cpu", lambda: get_scheduler_metadata(2, 1, 128, 8, 2, 64, i32(5, 6)), ValueError,
     r"^cache_seqlens: .*CUDA"),
]


@pytest.mark.parametrize("case", COMBINE_CASES, ids=[c[0] for c in COMBINE_CASES])
def test_combine_and_scheduler_rules(case):
    _, call, exc, match = case
    raises(exc, match, call)


# ------------------------------------------------ past validation: build record, extension, op arguments

FULL_BUILD = _ops.BuildConfig(
    cuda_extension_built=True,
    head_dims={"fp16": (64, 96, 128), "bf16": (64, 96, 128, 256), "fp8": (128,)},
    features={name: True for name in _ops.FEATURE_NAMES},
)


@pytest.fixture
def kernel_stub(monkeypatch):
    """Pretends CPU tensors passed the device rule, the extension loaded with FULL_BUILD, and records the
    arguments the wrappers hand to torch.ops.flash_attn3.fwd instead of running it (and, in `.appends`, those
    of torch.ops.flash_attn3.append_kv)."""

    class Calls(list):
        appends: list

    calls = Calls()
    calls.appends = []

    def fake_fwd(*args):
        assert len(args) == len(_ops.FWD_ARG_NAMES)
        calls.append(dict(zip(_ops.FWD_ARG_NAMES, args)))

    monkeypatch.setattr(_checks, "check_devices", lambda tensors: None)
    monkeypatch.setattr(_ops, "HAS_EXTENSION", True)
    monkeypatch.setattr(_ops, "BUILD", FULL_BUILD)
    monkeypatch.setattr(_ops, "fwd", fake_fwd)
    monkeypatch.setattr(_ops, "append_kv", lambda *args: calls.appends.append(args))
    return calls


def without(feature):
    return _ops.BuildConfig(True, FULL_BUILD.head_dims, {**FULL_BUILD.features, feature: False})


@pytest.mark.parametrize("causal", [False, True])
def test_attention_chunk_reaches_the_op(kernel_stub, causal):
    """A chunk is passed as given (never normalised away) and makes the call a local one, as in FA3."""
    flash_attn_func(*qkv(), causal=causal, attention_chunk=3)
    q, k, v, cu_q, cu_k, mq, mk = packed()
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal, attention_chunk=10**6)
    for c in kernel_stub:
        assert (c["window_size_left"], c["window_size_right"]) == (-1, 0 if causal else -1)
    assert [c["attention_chunk"] for c in kernel_stub] == [3, 10**6]
    raises(ValueError, r"attention_chunk: must be >= 0, got -1", flash_attn_func, *qkv(), attention_chunk=-1)
    raises(TypeError, r"attention_chunk: expected an int", flash_attn_func, *qkv(), attention_chunk=2.0)


def test_dense_call_arguments(kernel_stub):
    q, k, v = qkv(b=2, sq=5, sk=7, h=4, hk=2, d=64)
    out = flash_attn_func(q, k, v)
    (c,) = kernel_stub
    assert c["out"] is out and out.shape == (2, 5, 4, 64) and out.dtype == F16
    assert c["softmax_lse"].shape == (2, 4, 5) and c["softmax_lse"].dtype == torch.float32
    assert c["q"] is q and c["k"] is k and c["v"] is v
    assert all(c[n] is None for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "page_table",
                                      "kv_batch_idx", "leftpad_k", "q_descale", "k_descale", "v_descale"))
    assert (c["max_seqlen_q"], c["max_seqlen_k"]) == (5, 7)
    assert c["softmax_scale"] == pytest.approx(64 ** -0.5)
    assert (c["window_size_left"], c["window_size_right"], c["softcap"]) == (-1, -1, 0.0)
    assert c["attention_chunk"] == 0
    assert (c["num_splits"], c["pack_gqa"], c["sm_margin"]) == (1, -1, 0)
    assert isinstance(c["softcap"], float) and isinstance(c["softmax_scale"], float)


@pytest.mark.parametrize("causal,window,expected", [
    (True, (-1, -1), (-1, 0)),
    (True, (3, 4), (3, 0)),
    (False, (-1, 0), (-1, 0)),
    (False, (100, 100), (-1, -1)),  # neither side cuts anything off (s_q=5, s_k=7)
    (False, (6, 4), (-1, -1)),      # left >= s_k - 1, right >= s_q - 1
    (False, (5, 3), (5, 3)),
    (True, (6, -1), (-1, 0)),
])
def test_window_normalisation(kernel_stub, causal, window, expected):
    flash_attn_func(*qkv(sq=5, sk=7), causal=causal, window_size=window)
    c = kernel_stub[0]
    assert (c["window_size_left"], c["window_size_right"]) == expected


@pytest.mark.parametrize("window,expected", [
    (torch.tensor([6, 4]), (-1, -1)),
    (torch.tensor([5, 3], dtype=torch.int32), (5, 3)),
    ([5, 3], (5, 3)),
    ((np.int64(6), np.int32(4)), (-1, -1)),
    (np.array([2, 0]), (2, 0)),
    ((torch.tensor(5), torch.tensor(-1)), (5, -1)),
])
def test_window_forms_normalise_alike(kernel_stub, window, expected):
    """Every pair form FA3 accepts reaches the op as the same two Python ints (s_q=5, s_k=7)."""
    flash_attn_func(*qkv(sq=5, sk=7), window_size=window)
    c = kernel_stub[0]
    assert (c["window_size_left"], c["window_size_right"]) == expected
    assert type(c["window_size_left"]) is int and type(c["window_size_right"]) is int


@pytest.mark.parametrize("max_k,max_q", [(6, 4), (1, 1), (0, 0)])
@pytest.mark.parametrize("window,expected", [
    ((6, 3), (6, 3)),      # FA3's max_seqlen rule would drop both sides (6 >= max_k - 1, 3 >= max_q - 1)
    ((11, 6), (11, 6)),    # one below the extents: a sequence as long as all rows would still be cut
    ((12, 7), (-1, -1)),   # left >= total_k - 1 = 12, right >= total_q - 1 = 7: nothing can be cut
])
def test_varlen_window_normalised_by_packed_rows_not_max_seqlen(kernel_stub, monkeypatch, max_k, max_q, window,
                                                                expected):
    """Packed q has 8 rows, packed k 13: no sequence is longer, whatever max_seqlen_q/k claim. (Unchecked mode,
    whatever FLASH_ATTN3_CHECKED says: checked mode would reject the understated max_seqlen values.)"""
    monkeypatch.setattr(_checked, "_switch", False)
    q, k, v, cq, ck, _, _ = packed(lens_q=(3, 1, 4), lens_k=(5, 2, 6))
    flash_attn_varlen_func(q, k, v, cq, ck, max_q, max_k, window_size=window)
    c = kernel_stub[0]
    assert (c["window_size_left"], c["window_size_right"]) == expected
    assert (c["max_seqlen_q"], c["max_seqlen_k"]) == (max_q, max_k), "max_seqlen must reach the op unchanged"


def test_understated_max_seqlen_k_keeps_the_local_error(kernel_stub, monkeypatch):
    """max_seqlen_k = 1 must not turn a sliding window into full attention and skip the local-not-built error."""
    monkeypatch.setattr(_ops, "BUILD", without("local"))
    q, k, v, cq, ck, mq, _ = packed()
    raises(NotImplementedError, r"local \(sliding-window\)", flash_attn_varlen_func, q, k, v, cq, ck, mq, 1,
           window_size=(4, -1))
    raises(NotImplementedError, r"local \(sliding-window\)", flash_attn_varlen_func, q, k, v, cq, ck, mq, 1,
           causal=True, window_size=torch.tensor([4, 0]))
    assert not kernel_stub


def test_paged_window_normalised_by_cache_capacity(kernel_stub):
    q, kc, vc, table = paged(pages=3, page_size=5, sq=3)  # capacity 15 keys per sequence
    for window, expected in (((13, 0), (13, 0)), ((14, 0), (-1, 0)), ((14, 2), (-1, -1)), ((2, 1), (2, 1))):
        flash_attn_with_kvcache(q, kc, vc, page_table=table, cache_seqlens=i32(3, 4), window_size=window)
        c = kernel_stub[-1]
        assert (c["window_size_left"], c["window_size_right"]) == expected, window


@pytest.mark.parametrize("scale", [0.0, 0, -0.25, -3.0, 1e-30])
def test_softmax_scale_passes_through(kernel_stub, scale):
    """Every finite scale is valid maths (0 = uniform weights, negative = reversed preference) and reaches the
    op as given, never replaced by the default."""
    flash_attn_func(*qkv(), softmax_scale=scale)
    flash_attn_varlen_func(*packed(), softmax_scale=scale)
    for c in kernel_stub:
        assert c["softmax_scale"] == scale and type(c["softmax_scale"]) is float


def test_return_attn_probs_and_options(kernel_stub):
    out, lse = flash_attn_func(*qkv(h=4, hk=1), return_attn_probs=True, softmax_scale=0.5, softcap=3,
                               num_splits=4, pack_gqa=True, sm_margin=8)
    c = kernel_stub[0]
    assert lse is c["softmax_lse"] and lse.shape == (2, 4, 5)
    assert (c["softmax_scale"], c["softcap"], c["num_splits"], c["pack_gqa"], c["sm_margin"]) == (0.5, 3.0, 4, 1, 8)
    flash_attn_func(*qkv(), pack_gqa=False)
    assert kernel_stub[1]["pack_gqa"] == 0


def test_varlen_call_arguments(kernel_stub):
    q, k, v, cq, ck, mq, mk = packed()
    sq = i32(1, 1, 2)
    out, lse = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, seqused_q=sq, causal=True, return_attn_probs=True)
    c = kernel_stub[0]
    assert out.shape == (8, 4, 64) and lse.shape == (4, 8)
    assert c["cu_seqlens_q"] is cq and c["cu_seqlens_k"] is ck and c["seqused_q"] is sq
    assert (c["max_seqlen_q"], c["max_seqlen_k"], c["window_size_right"]) == (4, 6, 0)


def test_kvcache_call_arguments(kernel_stub):
    q, kc, vc, table = paged(b=2, pages=3, page_size=5)
    out, lse, out_accum, lse_accum = flash_attn_with_kvcache(q, kc, vc, page_table=table, cache_seqlens=11,
                                                             causal=True, return_softmax_lse=True)
    c = kernel_stub[0]
    assert c["page_table"] is table and c["max_seqlen_k"] == 15 and c["max_seqlen_q"] == 1
    assert c["seqused_k"].dtype == torch.int32 and c["seqused_k"].tolist() == [11, 11]
    assert c["num_splits"] == 0 and out.shape == (2, 1, 4, 64) and lse.shape == (2, 4, 1)
    assert out_accum.numel() == 0 and lse_accum.numel() == 0
    q2, kc2, vc2 = qkv(b=2, sq=1, sk=9)
    out = flash_attn_with_kvcache(q2, kc2, vc2, cache_seqlens=i32(3, 9), cache_batch_idx=i32(1, 0),
                                  cache_leftpad=i32(0, 1))
    c = kernel_stub[1]
    assert isinstance(out, torch.Tensor)
    assert c["kv_batch_idx"].tolist() == [1, 0] and c["leftpad_k"].tolist() == [0, 1]


def test_varlen_fwd_writes_into_given_out(kernel_stub):
    q, k, v = qkv(dtype=FP8, d=128)
    out = torch.empty(2, 5, 4, 128, dtype=BF16)
    res, lse = varlen_fwd(q, k, v, out=out, q_descale=torch.ones(2, 2))
    assert res is out and kernel_stub[0]["out"] is out and kernel_stub[0]["q_descale"] is not None


def test_head_dim_runs_on_next_compiled(kernel_stub):
    flash_attn_func(*qkv(d=80))  # served by the compiled 96
    assert len(kernel_stub) == 1
    assert FULL_BUILD.compiled_head_dim(F16, 80) == 96
    assert FULL_BUILD.compiled_head_dim(F16, 128) == 128
    assert FULL_BUILD.compiled_head_dim(F16, 136) is None
    assert FULL_BUILD.compiled_head_dim(torch.float32, 64) is None


UNBUILT_CASES = [
    ("append_kv", lambda: flash_attn_with_kvcache(*qkv(h=2, hk=2), k=qkv(h=2, hk=2, sk=1)[1],
                                                  v=qkv(h=2, hk=2, sk=1)[2], cache_seqlens=3),
     r"appending new k/v to the cache .*feature 'append_kv'"),
    ("fp8", lambda: flash_attn_func(*qkv(dtype=FP8, d=128)), r"float8_e4m3fn inputs .*feature 'fp8'"),
    ("softcap", lambda: flash_attn_func(*qkv(), softcap=1.0), r"softcap .*feature 'softcap'"),
    ("local", lambda: flash_attn_func(*qkv(), window_size=(2, 2)), r"local \(sliding-window\).*'local'"),
    ("causal", lambda: flash_attn_func(*qkv(), causal=True), r"causal masking"),
    ("gqa", lambda: flash_attn_func(*qkv(h=4, hk=2)), r"grouped-query attention"),
    ("split_kv", lambda: flash_attn_func(*qkv(h=2, hk=2), num_splits=2), r"split-KV"),
    ("varlen", lambda: flash_attn_varlen_func(*packed(h=2, hk=2)), r"variable-length"),
    ("paged_kv", lambda: flash_attn_with_kvcache(*paged(h=2, hk=2)[:3], page_table=paged()[3]), r"paged KV cache"),
    ("pack_gqa", lambda: flash_attn_func(*qkv(h=2, hk=2), pack_gqa=True), r"pack_gqa=True"),
    ("kv_batch_idx", lambda: flash_attn_with_kvcache(*qkv(h=2, hk=2), cache_batch_idx=i32(0, 1)),
     r"cache_batch_idx"),
    ("leftpad_k", lambda: flash_attn_with_kvcache(*qkv(h=2, hk=2), cache_leftpad=i32(0, 1)), r"cache_leftpad"),
]


@pytest.mark.parametrize("case", UNBUILT_CASES, ids=[c[0] for c in UNBUILT_CASES])
def test_unbuilt_feature_raises_not_implemented(kernel_stub, monkeypatch, case):
    feature, call, match = case
    call()  # with every feature built, the call reaches the op
    assert len(kernel_stub) == 1
    monkeypatch.setattr(_ops, "BUILD", without(feature))
    raises(NotImplementedError, match, call)
    assert len(kernel_stub) == 1, "the op must not run when a feature is missing"


def test_attention_chunk_needs_the_local_kernels(kernel_stub, monkeypatch):
    monkeypatch.setattr(_ops, "BUILD", without("local"))
    raises(NotImplementedError, r"local \(sliding-window\).*'local'", flash_attn_func, *qkv(), causal=True,
           attention_chunk=4)
    flash_attn_func(*qkv(), causal=True)  # causal alone runs on the causal kernels
    assert len(kernel_stub) == 1


NOT_IMPLEMENTED_CASES = [
    ("head_dim_uncompiled", lambda: flash_attn_func(*qkv(d=136)),
     r"q: head dim 136 has no compiled kernel for float16; this build compiled head dims \[64, 96, 128\]"),
    ("fp8_head_dim_uncompiled", lambda: flash_attn_func(*qkv(d=144, dtype=FP8)),
     r"head dim 144 has no compiled kernel for float8_e4m3fn; this build compiled head dims \[128\]"),
    ("dv_differs", lambda: flash_attn_func(*qkv(d=64, dv=128)), r"v: head dim 128 != q's head dim 64"),
    ("qv", lambda: flash_attn_func(*qkv(), qv=torch.randn(2, 5, 4, 64).half()), r"qv .* not implemented"),
    ("rotary_fp8", lambda: flash_attn_with_kvcache(*qkv(dtype=FP8, d=128), k=qkv(sk=1, dtype=FP8, d=128)[1],
                                                   v=qkv(sk=1, dtype=FP8, d=128)[2], cache_seqlens=3,
                                                   rotary_cos=torch.ones(8, 16).to(FP8),
                                                   rotary_sin=torch.ones(8, 16).to(FP8)),
     r"rotary_cos / rotary_sin with float8_e4m3fn inputs .*not implemented"),
    ("backward", lambda: flash_attn_func(*(t.requires_grad_() for t in qkv())), r"forward pass only"),
]


@pytest.mark.parametrize("case", NOT_IMPLEMENTED_CASES, ids=[c[0] for c in NOT_IMPLEMENTED_CASES])
def test_not_implemented(kernel_stub, case):
    _, call, match = case
    raises(NotImplementedError, match, call)
    assert not kernel_stub


def test_dtype_without_kernels(kernel_stub, monkeypatch):
    monkeypatch.setattr(_ops, "BUILD", _ops.BuildConfig(True, {"fp16": (64,)}, FULL_BUILD.features))
    raises(NotImplementedError, r"q: head dim 64 has no compiled kernel for bfloat16; this build compiled head "
           r"dims none", flash_attn_func, *qkv(dtype=BF16))
    flash_attn_func(*qkv(dtype=F16))
    assert len(kernel_stub) == 1


def test_missing_extension_raises_runtime_error(kernel_stub, monkeypatch):
    monkeypatch.setattr(_ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", "ImportError: libcudart.so.12: cannot open shared object file")
    raises(RuntimeError, r"FLASH_ATTN3_SKIP_CUDA_BUILD=1.*libcudart.so.12", flash_attn_func, *qkv())
    assert not kernel_stub


PAIR_BUILD = _ops.BuildConfig(True, {"bf16": (64, 128, 192, 256)}, {name: True for name in _ops.FEATURE_NAMES},
                              {"bf16": ((192, 128),)})


def test_head_dim_pairs_follow_find_kernel():
    """hopper/api.cu find_kernel's rule: smallest d, then smallest dv, holding both; dv == d kernels serve
    equal head dims only."""
    b = PAIR_BUILD
    assert b.compiled_head_dims(BF16, 192, 128) == (192, 128)
    assert b.compiled_head_dims(BF16, 136, 104) == (192, 128)
    assert b.compiled_head_dims(BF16, 192, 192) == (192, 192)
    assert b.compiled_head_dims(BF16, 160, 160) == (192, 192)
    assert b.compiled_head_dims(BF16, 96, 96) == (128, 128)
    assert b.compiled_head_dims(BF16, 64, 128) == (192, 128)  # q/k zero-padded to 192 by the loads
    assert b.compiled_head_dims(BF16, 64, 256) is None  # no (64, 256) kernel; (256, 256) serves equal dims only
    assert b.compiled_head_dims(BF16, 192, 136) is None
    assert b.compiled_head_dims(F16, 192, 128) is None


def test_head_dim_pair_call_reaches_the_op(kernel_stub, monkeypatch):
    monkeypatch.setattr(_ops, "BUILD", PAIR_BUILD)
    out = flash_attn_func(*qkv(d=192, dv=128, dtype=BF16))
    assert out.shape == (2, 5, 4, 128) and len(kernel_stub) == 1
    assert kernel_stub[0]["v"].shape[-1] == 128 and kernel_stub[0]["out"].shape[-1] == 128
    with pytest.raises(NotImplementedError, match=r"v: head dim 256 != q's head dim 64 and no bfloat16 kernel for "
                                                  r"that pair is built; this build compiled the \(d, dv\) pairs "
                                                  r"\[\(192, 128\)\]"):
        flash_attn_func(*qkv(d=64, dv=256, dtype=BF16))


def test_build_record_parsing(monkeypatch):
    rec = types.ModuleType("flash_attn3._build_config")
    rec.CUDA_EXTENSION_BUILT = True
    rec.FWD_KERNELS = [("bf16", 128), ("fp16", 64), ("bf16", 64)]
    rec.FEATURES = {"varlen": True, "causal": True, "softcap": False}
    monkeypatch.setitem(sys.modules, "flash_attn3._build_config", rec)
    build, err = _ops._load_build_config()
    assert err is None and build.cuda_extension_built
    assert build.head_dims == {"bf16": (64, 128), "fp16": (64,)}
    assert build.has("varlen") and not build.has("softcap") and not build.has("paged_kv")
    assert build.compiled_head_dim(BF16, 80) == 128 and build.compiled_head_dim(F16, 80) is None
    # Three-axis records (dtype, d, dv): pairs with dv != d are kept apart from the equal head dims.
    rec.AXES = ("dtype", "head_dim", "head_dim_v")
    rec.FWD_KERNELS = [("bf16", 128, 128), ("bf16", 192, 128), ("bf16", 192, 192)]
    build, err = _ops._load_build_config()
    assert err is None and build.head_dims == {"bf16": (128, 192)} and build.head_dim_pairs == {"bf16": ((192, 128),)}
    assert build.compiled_head_dims(BF16, 192, 128) == (192, 128)


def test_missing_build_record_means_nothing_built(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn3._build_config", None)  # makes the import fail
    build, err = _ops._load_build_config()
    assert "could not be imported" in err
    assert not build.cuda_extension_built and build.head_dims == {} and not build.has("causal")


def test_fake_impl_shapes():
    q, k, v = (t.to("meta") for t in qkv())
    out = torch.empty(2, 5, 4, 64, dtype=F16, device="meta")
    lse = torch.empty(2, 4, 5, dtype=torch.float32, device="meta")
    assert _ops._fwd_fake(*op_args(q, k, v, out=out, softmax_lse=lse)) is None
    wrong_out = torch.empty(2, 5, 4, 32, dtype=F16, device="meta")
    raises(ValueError, r"out: shape", _ops._fwd_fake, *op_args(q, k, v, out=wrong_out, softmax_lse=lse))


def test_public_api():
    assert flash_attn3.__version__ == "0.1.0"
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_combine",
                 "get_scheduler_metadata", "varlen_fwd", "reference", "checked_mode", "set_checked_mode"):
        assert hasattr(flash_attn3, name) and name in flash_attn3.__all__
    assert isinstance(_ops.HAS_EXTENSION, bool)
    assert _ops.HAS_EXTENSION or _ops.LOAD_ERROR


# The op schema as csrc/flash_api.cpp declares it (read from the source, so a schema change there is tested
# here), registered under a test namespace with a CPU implementation backed by the reference, so opcheck
# can run the fake against the real signature on CPU, and the Python argument list can be compared with it.
def _schema_from_source() -> str:
    import re
    from pathlib import Path

    cpp = (Path(__file__).resolve().parent.parent / "csrc" / "flash_api.cpp").read_text()
    body = re.search(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', cpp)
    assert body, "csrc/flash_api.cpp: no m.def(...) schema found"
    return "".join(re.findall(r'"([^"]*)"', body.group(1)))


SCHEMA_TEXT = _schema_from_source()


@pytest.fixture(scope="module")
def schema_twin():
    lib = torch.library.Library("flash_attn3_schema_twin", "DEF")
    lib.define(SCHEMA_TEXT)

    def cpu_impl(*schema_args):
        a = _ops.FwdArgs(*schema_args)
        o, lse = flash3_reference(a.q, a.k, a.v, cu_seqlens_q=a.cu_seqlens_q, cu_seqlens_k=a.cu_seqlens_k,
                                  softmax_scale=a.softmax_scale,
                                  window_size=(a.window_size_left, a.window_size_right))
        a.out.copy_(o)
        a.softmax_lse.copy_(lse)

    lib.impl("fwd", cpu_impl, "CPU")
    torch.library.register_fake("flash_attn3_schema_twin::fwd", _ops._fwd_fake, lib=lib)
    yield torch.ops.flash_attn3_schema_twin.fwd
    lib._destroy()


def test_argument_names_match_the_cpp_schema(schema_twin):
    """flash_attn3._ops.FWD_ARG_NAMES, the one Python list of the op's arguments (the wrappers' FwdCall.op_args,
    the fake and every test build positional calls from it), must be the argument list of the schema text in
    csrc/flash_api.cpp, name for name and in order. tests/test_ops_gpu.py checks it against the registered op."""
    assert tuple(a.name for a in schema_twin.default._schema.arguments) == _ops.FWD_ARG_NAMES


def flash3_reference(*args, **kwargs):
    return flash_attn3.reference.attention_ref(*args, **kwargs)


@pytest.mark.parametrize("varlen", [False, True])
def test_fake_matches_schema_opcheck(schema_twin, varlen):
    if varlen:
        q, k, v, cq, ck, mq, mk = packed(d=16)
        q, k, v = q.float(), k.float(), v.float()
        out, lse = torch.empty(q.shape), torch.empty(q.shape[1], q.shape[0])
    else:
        q, k, v = (t.float() for t in qkv(d=16))
        cq = ck = None
        mq, mk = q.shape[1], k.shape[1]
        out, lse = torch.empty(q.shape), torch.empty(q.shape[0], q.shape[2], q.shape[1])
    args = op_args(q, k, v, out=out, softmax_lse=lse, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq,
                   max_seqlen_k=mk, softmax_scale=0.25, window_size_right=0)
    torch.library.opcheck(schema_twin, args)


def test_kvcache_rotary_seqlens_alone_is_ignored_as_fa3():
    """FA3 ignores rotary_seqlens when no rotary tables are given: the call must get past the argument rules
    (on CPU it then stops at the device rule, naming the CPU tensors, not rotary_seqlens)."""
    with pytest.raises(ValueError, match=ON_CPU) as info:
        _dense_cache(rotary_seqlens=i32(3, 9))()
    assert "rotary_seqlens: only valid" not in str(info.value)


def test_append_kv_call_arguments(kernel_stub):
    """k=, v= (and rotary) run the append op first, then the attention on its rotated q and new lengths."""
    q, k_cache, v_cache = qkv(b=2, sq=3, sk=16, h=4, hk=2, d=64)
    k_new, v_new = qkv(b=2, sq=1, sk=3, h=4, hk=2, d=64)[1:]
    cos, sin = torch.ones(16, 16).half(), torch.zeros(16, 16).half()
    flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=i32(4, 9), rotary_cos=cos,
                            rotary_sin=sin, causal=True)
    (fwd,) = kernel_stub
    (args,) = kernel_stub.appends
    assert args[0] is k_cache and args[1] is v_cache and args[2] is k_new and args[3] is v_new
    assert args[4].tolist() == [4, 9] and args[5].shape == (2,) and args[5].dtype == torch.int32
    assert args[10] is q and args[11].shape == q.shape and args[12] is cos and args[13] is sin
    assert args[16] is True  # causal: each query at its own position
    assert fwd["q"] is args[11] and fwd["seqused_k"] is args[5], "the attention reads the rotated q, new lengths"


def test_append_kv_rejects_bad_rotary(kernel_stub):
    q, k_cache, v_cache = qkv(b=2, sq=1, sk=16, h=4, hk=2, d=64)
    k_new, v_new = qkv(b=2, sq=1, sk=1, h=4, hk=2, d=64)[1:]
    kw = dict(k=k_new, v=v_new, cache_seqlens=i32(4, 9))
    raises(ValueError, r"rotary_dim = 2 \* shape\[1\] = 72 must be a multiple of 16 in \[16, head_dim = 64\]",
           flash_attn_with_kvcache, q, k_cache, v_cache, rotary_cos=torch.ones(16, 36).half(),
           rotary_sin=torch.ones(16, 36).half(), **kw)
    pages = torch.randn(4, 8, 2, 64).half()  # FA3's rule for a paged cache: the table covers its positions
    raises(ValueError, r"rotary_cos: 8 rows \(positions\) must cover the paged cache's 16 positions",
           flash_attn_with_kvcache, q, pages, pages.clone(), page_table=i32(0, 1, 2, 3).reshape(2, 2),
           rotary_cos=torch.ones(8, 16).half(), rotary_sin=torch.ones(8, 16).half(), **kw)
    raises(ValueError, r"k, v: shapes", flash_attn_with_kvcache, q, k_cache, v_cache, k=k_new[..., :32],
           v=v_new, cache_seqlens=i32(4, 9))
    assert not kernel_stub and not kernel_stub.appends


def _vllm_paged(b=3, h=4, hk=2, d=64, page=16, pages=12):
    """vLLM's decode call: packed q (one token per sequence), a paged cache, seqused_k, no cu_seqlens_k."""
    q = torch.randn(b, h, d).half()
    kc, vc = torch.randn(pages, page, hk, d).half(), torch.randn(pages, page, hk, d).half()
    table = torch.arange(b * 4, dtype=torch.int32).reshape(b, 4) % pages
    return dict(q=q, k=kc, v=vc, cu_seqlens_q=i32(*range(b + 1)), max_seqlen_q=1, seqused_k=i32(5, 17, 64),
                max_seqlen_k=64, block_table=table)


def test_context_parallel_arguments_reach_the_op(kernel_stub):
    """vLLM's decode-context-parallel call: cp_world_size / cp_rank / cp_tot_seqused_k reach the op as given;
    with cp_world_size 1 the rank is 0 and a total is not passed on (it would be ignored)."""
    total = i32(9, 33, 127)
    flash_attn_varlen_func(**_vllm_paged(), causal=True, cp_world_size=4, cp_rank=3, cp_tot_seqused_k=total)
    flash_attn_varlen_func(**_vllm_paged(), causal=True, cp_world_size=1, cp_tot_seqused_k=total)
    q, k = torch.randn(2, 1, 4, 64).half(), torch.randn(2, 8, 2, 64).half()
    flash_attn_with_kvcache(q, k, k.clone(), cache_seqlens=i32(3, 8), causal=True, cp_world_size=2, cp_rank=1,
                            cp_tot_seqused_k=i32(7, 16))
    flash_attn_func(q, k, k.clone(), causal=True, cp_world_size=2, cp_rank=0, cp_tot_seqused_k=i32(16, 16))
    cp, off, kvcache, dense = kernel_stub
    assert (cp["cp_world_size"], cp["cp_rank"]) == (4, 3) and cp["cp_tot_seqused_k"] is total
    assert (off["cp_world_size"], off["cp_rank"], off["cp_tot_seqused_k"]) == (1, 0, None)
    assert (kvcache["cp_world_size"], kvcache["cp_rank"]) == (2, 1) and kvcache["cp_tot_seqused_k"].tolist() == [7, 16]
    assert (dense["cp_world_size"], dense["cp_rank"]) == (2, 0)


def test_vllm_varlen_call_surface(kernel_stub):
    """The keywords vLLM's FA3 fork passes to flash_attn_varlen_func reach the op as the paged call."""
    args = _vllm_paged()
    buf = torch.empty(3, 4, 64).half()
    got = flash_attn_varlen_func(**args, out=buf, softmax_scale=0.125, causal=True, window_size=[-1, -1],
                                 softcap=0.0, fa_version=3, num_splits=0, return_softmax_lse=True)
    (c,) = kernel_stub
    assert isinstance(got, tuple) and got[0] is buf and c["out"] is buf
    assert c["page_table"] is args["block_table"] and c["cu_seqlens_k"] is None
    assert c["seqused_k"] is args["seqused_k"] and c["max_seqlen_k"] == 4 * 16  # the table's capacity
    assert c["softmax_lse"] is got[1]


@pytest.mark.parametrize("case", [
    ("s_aux_and_sinks", dict(s_aux=torch.zeros(4), sinks=torch.zeros(4)), ValueError, r"s_aux, sinks"),
    ("s_aux_shape", dict(s_aux=torch.zeros(3)), ValueError, r"s_aux: must be a float32, bfloat16 or float16 tensor of shape \(num_heads,\)"),
    ("sinks_dtype", dict(sinks=torch.zeros(4, dtype=torch.float64)), ValueError,
     r"sinks: must be a float32, bfloat16 or float16 tensor"),
    ("cp_without_total", dict(cp_world_size=2, cp_rank=1), ValueError, r"cp_tot_seqused_k: required"),
    ("cp_rank_negative", dict(cp_rank=-1), ValueError, r"cp_rank"),
    ("cp_rank_past_world", dict(cp_world_size=2, cp_rank=2, cp_tot_seqused_k=i32(9, 33, 127)), ValueError,
     r"cp_rank: must be in \[0, cp_world_size = 2\)"),
    ("cp_world_zero", dict(cp_world_size=0), ValueError, r"cp_world_size: must be >= 1"),
    ("cp_total_int64", dict(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=torch.zeros(3, dtype=torch.int64)),
     TypeError, r"cp_tot_seqused_k: must have dtype torch.int32"),
    ("cp_total_shape", dict(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=i32(9, 33)), ValueError,
     r"cp_tot_seqused_k: must have shape \(3,\)"),
    ("cp_total_list", dict(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=[9, 33, 127]), TypeError,
     r"cp_tot_seqused_k: expected a torch.Tensor"),
    ("cp_window", dict(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=i32(9, 33, 127), window_size=(8, 0)),
     NotImplementedError, r"cp_world_size > 1 with window_size"),
    ("cp_window_past_local_keys", dict(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=i32(9, 33, 127),
                                       window_size=(100, 0)), NotImplementedError, r"cp_world_size > 1 with window_size"),
    ("q_v_and_qv", dict(q_v=torch.zeros(3, 4, 64).half(), qv=torch.zeros(3, 4, 64).half()), ValueError, r"q_v, qv"),
    ("q_v", dict(q_v=torch.zeros(3, 4, 64).half()), NotImplementedError, r"qv"),
    ("block_table_int64", dict(block_table=torch.zeros(3, 4, dtype=torch.int64)), TypeError, r"block_table"),
    ("fa_version_str", dict(fa_version="3"), TypeError, r"fa_version"),
], ids=lambda c: c[0])
def test_vllm_varlen_call_surface_rejects(kernel_stub, case):
    _, over, exc, match = case
    raises(exc, match, flash_attn_varlen_func, **{**_vllm_paged(), **over})
    assert not kernel_stub


def test_sinks_reach_the_op(kernel_stub):
    """vLLM's s_aux and SGLang's sinks become the op's sinks (float32, one logit per q head)."""
    sinks = torch.randn(4)
    flash_attn_varlen_func(**_vllm_paged(), s_aux=sinks)
    q, k, v = qkv(h=4, hk=2)
    flash_attn_func(q, k, v, sinks=sinks)
    flash_attn_with_kvcache(q, k, v, cache_seqlens=3, sinks=sinks)
    assert [c["sinks"] is not None and torch.equal(c["sinks"], sinks) for c in kernel_stub] == [True] * 3
    # vLLM's bfloat16 s_aux reaches the op as float32 of the same values.
    flash_attn_varlen_func(**_vllm_paged(), s_aux=sinks.bfloat16())
    assert kernel_stub[-1]["sinks"].dtype == torch.float32
    assert torch.equal(kernel_stub[-1]["sinks"], sinks.bfloat16().float())


def test_sglang_kvcache_call_surface(kernel_stub):
    """SGLang's call (anchors.md 7.3): packed q with cu_seqlens_q, a paged cache of page size 1, cache_seqlens,
    cu_seqlens_k_new=cu_seqlens_k without new keys (ignored, as FA3 ignores it), a window tuple, softcap,
    return_softmax_lse and sinks: it reaches the op as the paged varlen-q call, with no append."""
    h, hk, d = 4, 2, 64
    q = torch.randn(5, h, d).half()  # sequences of 2 and 3 new tokens
    kc, vc = torch.randn(20, 1, hk, d).half(), torch.randn(20, 1, hk, d).half()
    table = i32(*range(10), *range(10, 20)).view(2, 10)
    seqlens, cu_q, cu_k = i32(7, 10), i32(0, 2, 5), i32(0, 7, 17)
    sinks = torch.randn(h)
    got = flash_attn_with_kvcache(q=q, k_cache=kc, v_cache=vc, page_table=table, cache_seqlens=seqlens,
                                  cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_k, max_seqlen_q=3, softmax_scale=d ** -0.5,
                                  causal=True, window_size=(5, 0), softcap=30.0, k_descale=None, v_descale=None,
                                  return_softmax_lse=True, sinks=sinks)
    (c,) = kernel_stub
    assert not kernel_stub.appends, "cu_seqlens_k_new without k, v must not append"
    assert len(got) == 4
    assert c["page_table"] is table and c["cu_seqlens_q"] is cu_q and c["seqused_k"] is seqlens
    assert c["max_seqlen_q"] == 3 and c["softcap"] == 30.0 and torch.equal(c["sinks"], sinks)
    assert (c["window_size_left"], c["window_size_right"]) == (5, 0)


def test_qkvpacked_func_reads_views_of_qkv(kernel_stub):
    """FA3's flash_attn_qkvpacked_func: 5-D (b, s, 3, h, d) unbound along dim -3, 4-D (b, s, hq + 2 hk, d)
    split by num_heads_q (GQA); the op gets views of the one tensor, and flash_attn_func's defaults."""
    qkv = torch.randn(2, 5, 3, 4, 64).half()
    out = flash_attn3.flash_attn_qkvpacked_func(qkv, causal=True)
    c = kernel_stub[-1]
    assert out.shape == (2, 5, 4, 64)
    for i, name in enumerate("qkv"):
        assert c[name].data_ptr() == qkv[:, :, i].data_ptr() and c[name].shape == (2, 5, 4, 64)
    assert (c["window_size_left"], c["window_size_right"]) == (-1, 0)
    assert c["softmax_scale"] == pytest.approx(64 ** -0.5)
    gqa = torch.randn(2, 5, 8 + 2 * 2, 64).half()
    out, lse = flash_attn3.flash_attn_qkvpacked_func(gqa, num_heads_q=8, return_attn_probs=True, softcap=5.0)
    c = kernel_stub[-1]
    assert out.shape == (2, 5, 8, 64) and lse.shape == (2, 8, 5)
    assert c["q"].shape == (2, 5, 8, 64) and c["k"].shape == (2, 5, 2, 64) and c["v"].shape == (2, 5, 2, 64)
    assert c["k"].data_ptr() == gqa[:, :, 8].data_ptr() and c["v"].data_ptr() == gqa[:, :, 10].data_ptr()
    assert c["softcap"] == 5.0


@pytest.mark.parametrize("qkv,kw,exc,match", [
    (torch.randn(2, 5, 4, 4, 64).half(), {}, ValueError, r"qkv: a 5-D qkv must be \(batch, seqlen, 3"),
    (torch.randn(2, 5, 3, 4, 64).half(), dict(num_heads_q=4), ValueError, r"num_heads_q: only for a 4-D qkv"),
    (torch.randn(2, 5, 12, 64).half(), {}, ValueError, r"num_heads_q: required with a 4-D qkv"),
    (torch.randn(2, 5, 12, 64).half(), dict(num_heads_q=5), ValueError, r"num_heads_q: 5 leaves 7 of qkv's 12"),
    (torch.randn(2, 5, 12, 64).half(), dict(num_heads_q=12), ValueError, r"num_heads_q: 12 leaves 0"),
    (torch.randn(5, 12, 64).half(), {}, ValueError, r"qkv: must be 5-D .* or 4-D .*, got 3-D"),
    ("qkv", {}, TypeError, r"qkv"),
], ids=["5d_not_3", "5d_with_num_heads_q", "4d_without", "4d_odd_rest", "4d_no_kv", "3d", "not_tensor"])
def test_qkvpacked_func_rejects(kernel_stub, qkv, kw, exc, match):
    raises(exc, match, flash_attn3.flash_attn_qkvpacked_func, qkv, **kw)
    assert not kernel_stub
