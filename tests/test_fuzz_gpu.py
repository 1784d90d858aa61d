"""GPU fuzz of every public function and of the raw op `torch.ops.flash_attn3.fwd` (issues #13 and #16).

Four parts, a few hundred small cases in all (seconds on an H100):
  (a) bad calls: wrong dtypes, devices, ranks, shapes, strides, head dims, head ratios, scalars and window forms,
      through the public functions and straight into the raw op. Each must raise a clear exception (TypeError,
      ValueError, RuntimeError or NotImplementedError) whose message names the argument, and leave the device
      healthy (torch.cuda.synchronize() succeeds).
  (b) valid edge cases: zero-size batch, heads and rows, empty sequences, no keys, head dims that round up to a
      compiled one, strided heads, softmax_scale 0 and negative, windows given as tensors that cut nothing. Each
      is written into a NaN-poisoned `out=` (an unwritten row fails) and must match flash_attn3.reference under
      FA3's rule: max error <= 2 x the error of PyTorch computing in the input dtype, plus a small floor. The
      public function must give the same bits.
  (c) checked mode: each lie in the device-side metadata raises ValueError naming the argument before anything
      is launched; honest calls give the same bits as unchecked ones; CUDA-graph capture is refused clearly.
  (d) memory safety in the default unchecked mode (select with `-k memory_safety`): the raw op fed lying
      metadata writes nothing outside `out` / `softmax_lse` (views into canary-filled buffers), leaves the device
      healthy, and returns within a bound far above the microseconds a valid call takes (no runaway key loop).
      These run last because a device fault poisons the CUDA context of every later test.

Calls that need a feature this build did not compile (read from the build record) are NotImplementedError cases
of (a); (b) uses only what is built. Inputs are freshly random on every run (the seed is printed on failure).
The module skips (with the reason) unless an SM90 GPU and the compiled extension are both present.
"""
from __future__ import annotations

import itertools
import math
import re
import time

import numpy as np
import pytest
import torch

from _gpu import capture_graph, skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

from _op_args import op_args  # noqa: E402  (raw-op arguments by schema name)

import flash_attn3  # noqa: E402
from flash_attn3 import (_checked, _ops, flash_attn_combine, flash_attn_func, flash_attn_varlen_func,  # noqa: E402
                         flash_attn_with_kvcache, varlen_fwd)
from flash_attn3.reference import attention_ref  # noqa: E402

DEVICE = "cuda"
F16, BF16 = torch.float16, torch.bfloat16
BUILT_DTYPES = [dt for dt in (F16, BF16) if _ops.BUILD.head_dims_for(dt)]
if not BUILT_DTYPES:
    pytest.skip("this build compiled no float16 / bfloat16 kernels", allow_module_level=True)
DTYPE = BUILT_DTYPES[-1]  # bfloat16 where built
OTHER_DTYPE = F16 if DTYPE == BF16 else BF16
D = _ops.BUILD.head_dims_for(DTYPE)[0]  # the smallest compiled head dim
UNCOMPILED_D = next((d for d in range(8, 257, 8) if _ops.BUILD.compiled_head_dim(DTYPE, d) is None), None)
CLEAR_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)
INT_MAX = 2**31 - 1

# Output floor of FA3's tolerance rule, as in tests/test_fwd_gpu.py: float32 summation-order differences and the
# 16-bit rounding of outputs near zero; a real bug (wrong mask, missed row) moves outputs by ~0.1.
OUT_FLOOR = 3e-5
LSE_ATOL = 1e-3


@pytest.fixture(autouse=True)
def unchecked_by_default(monkeypatch):
    """Every test starts in the default unchecked mode, whatever FLASH_ATTN3_CHECKED says."""
    monkeypatch.setattr(_checked, "_switch", False)


def built(feature: str) -> bool:
    return _ops.BUILD.has(feature)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def rnd(*shape, dtype=None):
    return torch.randn(*shape, device=DEVICE, dtype=dtype or DTYPE)


def i32(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


def cu(lens):
    return i32(0, *itertools.accumulate(lens))


def dense(b=2, sq=33, sk=47, h=4, hk=2, d=None, dv=None, dtype=None):
    d = D if d is None else d
    dv = d if dv is None else dv
    return rnd(b, sq, h, d, dtype=dtype), rnd(b, sk, hk, d, dtype=dtype), rnd(b, sk, hk, dv, dtype=dtype)


LQ, LK = (17, 0, 40), (33, 5, 1)  # packed: 57 q rows, 39 k rows


def packed(lq=LQ, lk=LK, h=4, hk=2, d=None, dtype=None):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of one packed batch."""
    d = D if d is None else d
    return (rnd(sum(lq), h, d, dtype=dtype), rnd(sum(lk), hk, d, dtype=dtype), rnd(sum(lk), hk, d, dtype=dtype),
            cu(lq), cu(lk), max(lq), max(lk))


def paged_cache(b=2, num_pages=8, page_size=16, pages=4, h=4, hk=2):
    q = rnd(b, 1, h, D)
    kc, vc = rnd(num_pages, page_size, hk, D), rnd(num_pages, page_size, hk, D)
    table = torch.randperm(num_pages, device=DEVICE)[:b * pages].reshape(b, pages).to(torch.int32)
    return q, kc, vc, table


def raw_fwd(args):
    torch.ops.flash_attn3.fwd(*args)


def _made(kwargs):
    """Keyword arguments with every callable value called: cases are declared at import, tensors are made when
    the case runs (fresh random data, nothing held on the GPU between tests)."""
    return {name: (x() if callable(x) else x) for name, x in kwargs.items()}


def assert_device_healthy(what):
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        pytest.fail(f"{what}: the device faulted ({exc}); the CUDA context is lost for every later GPU test")


# ---------------------------------------------------------------------------------------------------------
# (a) bad calls: a clear exception that names the argument, and a healthy device


def _fa(make=None, **over):
    """flash_attn_func on a valid dense problem, with `make` replacing the tensors and `over` any keyword."""
    return lambda: flash_attn_func(*(make() if make else dense()), **_made(over))


def _fv(make=None, **over):
    """flash_attn_varlen_func on a valid packed batch (LQ, LK)."""
    def call():
        q, k, v, cq, ck, mq, mk = packed()
        kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
        kw.update(_made(over))
        return flash_attn_varlen_func(*(make() if make else (q, k, v)), **kw)
    return call


def _fk(make=None, **over):
    """flash_attn_with_kvcache: one new token per batch entry against a dense cache of 64 positions."""
    def call():
        q, kc, vc = make() if make else dense(sq=1, sk=64)
        kw = dict(cache_seqlens=i32(17, 64))
        kw.update(_made(over))
        return flash_attn_with_kvcache(q, kc, vc, **kw)
    return call


def _fw(make=None, **over):
    """varlen_fwd on a valid dense problem."""
    return lambda: varlen_fwd(*(make() if make else dense()), **_made(over))


def _op(make=None, **over):
    """The raw op on a valid dense problem."""
    return lambda: raw_fwd(op_args(*(make() if make else dense()), **_made(over)))


def _opv(**over):
    """The raw op on a valid packed batch (LQ, LK)."""
    def call():
        q, k, v, cq, ck, mq, mk = packed()
        kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
        kw.update(_made(over))
        raw_fwd(op_args(q, k, v, **kw))
    return call


def _with(tensors, index, replacement):
    """`tensors` (a thunk of a tuple) with entry `index` replaced by replacement(tensors()[index])."""
    def make():
        ts = list(tensors())
        ts[index] = replacement(ts[index])
        return tuple(ts)
    return make


def _strided_last(shape):
    return lambda _: rnd(*shape[:-1], 2 * shape[-1])[..., ::2]


BAD_PUBLIC = [
    # (id, name the message must contain, call)
    ("func_q_fp32", "q", _fa(lambda: dense(dtype=torch.float32))),
    ("func_q_fp64", "q", _fa(lambda: dense(dtype=torch.float64))),
    ("func_q_int32", "q", _fa(_with(dense, 0, lambda t: torch.ones(t.shape, dtype=torch.int32, device=DEVICE)))),
    ("func_k_dtype", "k", _fa(_with(dense, 1, lambda t: t.to(OTHER_DTYPE)))),
    ("func_v_dtype", "v", _fa(_with(dense, 2, lambda t: t.to(OTHER_DTYPE)))),
    ("func_q_list", "q", _fa(_with(dense, 0, lambda t: [1.0]))),
    ("func_k_none", "k", _fa(_with(dense, 1, lambda t: None))),
    ("func_q_cpu", "q", _fa(_with(dense, 0, lambda t: t.cpu()))),
    ("func_k_cpu", "k", _fa(_with(dense, 1, lambda t: t.cpu()))),
    ("func_v_cpu", "v", _fa(_with(dense, 2, lambda t: t.cpu()))),
    ("func_q_rank3", "q", _fa(_with(dense, 0, lambda t: t[0]))),
    ("func_q_rank5", "q", _fa(_with(dense, 0, lambda t: t[None]))),
    ("func_k_rank3", "k", _fa(_with(dense, 1, lambda t: t[0]))),
    ("func_v_seqlen", "v", _fa(_with(dense, 2, lambda t: t[:, :-1]))),
    ("func_k_batch", "k", _fa(_with(dense, 0, lambda t: torch.cat([t, t])))),
    ("func_k_head_dim", "k", _fa(_with(dense, 1, lambda t: rnd(*t.shape[:-1], 2 * D)))),
    ("func_q_last_stride", "q", _fa(_with(dense, 0, _strided_last((2, 33, 4, D))))),
    ("func_k_last_stride", "k", _fa(_with(dense, 1, _strided_last((2, 47, 2, D))))),
    ("func_v_last_stride", "v", _fa(_with(dense, 2, _strided_last((2, 47, 2, D))))),
    ("func_head_dim_0", "q", _fa(lambda: dense(d=0))),
    ("func_head_dim_4", "q", _fa(lambda: dense(d=4))),
    ("func_head_dim_60", "q", _fa(lambda: dense(d=60))),
    ("func_head_dim_264", "q", _fa(lambda: dense(d=264))),
    ("func_head_dim_v_pair", "v", _fa(lambda: dense(d=128, dv=64))),
    ("func_heads_6_4", "num_heads", _fa(lambda: dense(h=6, hk=4))),
    ("func_heads_12_5", "num_heads", _fa(lambda: dense(h=12, hk=5))),
    ("func_heads_3_6", "num_heads", _fa(lambda: dense(h=3, hk=6))),
    ("func_heads_k_0", "num_heads", _fa(lambda: dense(h=4, hk=0))),
    ("func_scale_nan", "softmax_scale", _fa(softmax_scale=math.nan)),
    ("func_scale_inf", "softmax_scale", _fa(softmax_scale=math.inf)),
    ("func_scale_minus_inf", "softmax_scale", _fa(softmax_scale=-math.inf)),
    ("func_scale_str", "softmax_scale", _fa(softmax_scale="0.1")),
    ("func_scale_tensor", "softmax_scale", _fa(softmax_scale=lambda: torch.tensor(0.1, device=DEVICE))),
    ("func_softcap_negative", "softcap", _fa(softcap=-1.0)),
    ("func_softcap_nan", "softcap", _fa(softcap=math.nan)),
    ("func_softcap_str", "softcap", _fa(softcap="1")),
    ("func_num_splits_257", "num_splits", _fa(num_splits=257)),
    ("func_num_splits_float", "num_splits", _fa(num_splits=2.0)),
    ("func_num_splits_none", "num_splits", _fa(num_splits=None)),
    ("func_num_splits_bool", "num_splits", _fa(num_splits=True)),
    ("func_pack_gqa_str", "pack_gqa", _fa(pack_gqa="yes")),
    ("func_pack_gqa_5", "pack_gqa", _fa(pack_gqa=5)),
    ("func_sm_margin_minus1", "sm_margin", _fa(sm_margin=-1)),
    ("func_sm_margin_float", "sm_margin", _fa(sm_margin=1.5)),
    ("func_sm_margin_all_sms", "sm_margin", _fa(sm_margin=100_000)),
    ("func_causal_int", "causal", _fa(causal=1)),
    ("func_causal_none", "causal", _fa(causal=None)),
    ("func_deterministic_none", "deterministic", _fa(deterministic=None)),
    ("func_return_attn_probs_str", "return_attn_probs", _fa(return_attn_probs="yes")),
    ("func_attention_chunk_minus1", "attention_chunk", _fa(attention_chunk=-1)),
    ("func_attention_chunk_float", "attention_chunk", _fa(attention_chunk=16.0)),
    ("func_qv_int", "qv", _fa(qv=3)),
    ("func_qv_tensor", "qv", _fa(qv=lambda: rnd(2, 33, 4, D))),
    ("func_window_left_minus2", "window_size", _fa(window_size=(-2, 0))),
    ("func_window_right_minus5", "window_size", _fa(window_size=(0, -5))),
    ("func_window_float", "window_size", _fa(window_size=(1.5, 0))),
    ("func_window_int", "window_size", _fa(window_size=3)),
    ("func_window_triple", "window_size", _fa(window_size=(1, 2, 3))),
    ("func_window_none", "window_size", _fa(window_size=None)),
    ("func_window_str", "window_size", _fa(window_size="ab")),
    ("func_window_bool", "window_size", _fa(window_size=(True, 0))),
    ("func_window_tensor_3", "window_size", _fa(window_size=lambda: torch.tensor([1, 2, 3], device=DEVICE))),
    ("func_window_tensor_float", "window_size", _fa(window_size=lambda: torch.tensor([4.0, 0.0]))),
    ("func_window_tensor_2d", "window_size", _fa(window_size=lambda: torch.zeros(1, 2, dtype=torch.int64))),
    ("func_window_tensor_minus3", "window_size", _fa(window_size=lambda: torch.tensor([-3, 0], device=DEVICE))),
    ("func_window_numpy_float", "window_size", _fa(window_size=np.array([1.0, 2.0]))),
    ("func_window_numpy_float_side", "window_size", _fa(window_size=(np.float32(1.0), 0))),
    ("varlen_cu_int64", "cu_seqlens_q", _fv(cu_seqlens_q=lambda: cu(LQ).long())),
    ("varlen_cu_k_2d", "cu_seqlens_k", _fv(cu_seqlens_k=lambda: cu(LK).reshape(2, 2))),
    ("varlen_cu_noncontig", "cu_seqlens_q", _fv(cu_seqlens_q=lambda: torch.stack([cu(LQ), cu(LQ)], 1)[:, 0])),
    ("varlen_cu_batch_mismatch", "cu_seqlens_k", _fv(cu_seqlens_k=lambda: i32(0, 33, 39))),
    ("varlen_cu_q_cpu", "cu_seqlens_q", _fv(cu_seqlens_q=lambda: cu(LQ).cpu())),
    ("varlen_seqused_k_cpu", "seqused_k", _fv(seqused_k=lambda: i32(1, 1, 1).cpu())),
    ("varlen_max_q_missing", "max_seqlen_q", _fv(max_seqlen_q=None)),
    ("varlen_max_k_missing", "max_seqlen_k", _fv(max_seqlen_k=None)),
    ("varlen_max_q_negative", "max_seqlen_q", _fv(max_seqlen_q=-1)),
    ("varlen_max_q_float", "max_seqlen_q", _fv(max_seqlen_q=4.0)),
    ("varlen_max_q_past_rows", "max_seqlen_q", _fv(max_seqlen_q=sum(LQ) + 1)),
    ("varlen_max_k_past_rows", "max_seqlen_k", _fv(max_seqlen_k=sum(LK) + 1)),
    ("varlen_q_4d", "q", _fv(lambda: dense(b=3))),
    ("varlen_k_4d", "k", _fv(lambda: (packed()[0], *dense(b=3)[1:]))),
    ("varlen_seqused_q_length", "seqused_q", _fv(seqused_q=lambda: i32(1, 2))),
    ("varlen_seqused_k_int64", "seqused_k", _fv(seqused_k=lambda: cu(LQ)[:3].long())),
    ("varlen_seqused_q_2d", "seqused_q", _fv(seqused_q=lambda: i32(1, 0, 1).reshape(3, 1))),
    ("varlen_heads", "num_heads", _fv(lambda: packed(h=6, hk=4)[:3])),
    ("varlen_scale_nan", "softmax_scale", _fv(softmax_scale=math.nan)),
    ("varlen_window_tensor_3", "window_size", _fv(window_size=lambda: torch.tensor([1, 2, 3], device=DEVICE))),
    ("kvcache_seqlens_int64", "cache_seqlens", _fk(cache_seqlens=lambda: torch.tensor([1, 2], device=DEVICE))),
    ("kvcache_seqlens_length", "cache_seqlens", _fk(cache_seqlens=lambda: i32(1, 2, 3))),
    ("kvcache_seqlens_cpu", "cache_seqlens", _fk(cache_seqlens=lambda: i32(1, 2).cpu())),
    ("kvcache_seqlens_int_negative", "cache_seqlens", _fk(cache_seqlens=-1)),
    ("kvcache_seqlens_int_past_cache", "cache_seqlens", _fk(cache_seqlens=65)),
    ("kvcache_seqlens_float", "cache_seqlens", _fk(cache_seqlens=1.5)),
    ("kvcache_k_cache_last_stride", "k_cache", _fk(_with(lambda: dense(sq=1, sk=64), 1,
                                                         _strided_last((2, 64, 2, D))))),
    ("kvcache_batch_mismatch", "k_cache", _fk(lambda: (dense(sq=1)[0], *dense(b=4, sk=64)[1:]))),
    ("kvcache_k_without_v", "k", _fk(k=lambda: rnd(2, 1, 2, D))),
    ("kvcache_rotary_without_sin", "rotary_cos", _fk(rotary_cos=lambda: rnd(64, D // 2))),
    ("kvcache_rotary_interleaved_none", "rotary_interleaved", _fk(rotary_interleaved=None)),
    ("kvcache_scheduler_metadata", "scheduler_metadata", _fk(scheduler_metadata=lambda: i32(0))),
    ("kvcache_append_head_dim", "k", _fk(k=lambda: rnd(2, 1, 2, D // 2), v=lambda: rnd(2, 1, 2, D // 2))),
    ("kvcache_append_dtype", "k", _fk(k=lambda: rnd(2, 1, 2, D, dtype=torch.float32),
                                      v=lambda: rnd(2, 1, 2, D, dtype=torch.float32))),
    ("kvcache_rotary_dim_too_big", "rotary_cos",
     _fk(k=lambda: rnd(2, 1, 2, D), v=lambda: rnd(2, 1, 2, D), rotary_cos=lambda: rnd(64, D),
         rotary_sin=lambda: rnd(64, D))),
    ("kvcache_rotary_too_few_rows_paged", "rotary_cos",
     _fk(lambda: paged_cache()[:3], page_table=lambda: paged_cache()[3], cache_seqlens=lambda: i32(3, 9),
         k=lambda: rnd(2, 1, 2, D), v=lambda: rnd(2, 1, 2, D), rotary_cos=lambda: rnd(8, D // 2),
         rotary_sin=lambda: rnd(8, D // 2))),
    ("kvcache_page_table_int64", "page_table",
     _fk(lambda: paged_cache()[:3], page_table=lambda: paged_cache()[3].long(), cache_seqlens=None)),
    ("kvcache_batch_idx_dtype", "cache_batch_idx", _fk(cache_batch_idx=lambda: torch.tensor([0, 1], device=DEVICE))),
    ("kvcache_return_lse_int", "return_softmax_lse", _fk(return_softmax_lse=1)),
    ("varlen_fwd_out_dtype", "out", _fw(out=lambda: torch.empty(2, 33, 4, D, dtype=OTHER_DTYPE, device=DEVICE))),
    ("varlen_fwd_out_shape", "out", _fw(out=lambda: torch.empty(2, 33, 4, D + 8, dtype=DTYPE, device=DEVICE))),
    ("varlen_fwd_out_last_stride", "out", _fw(out=lambda: rnd(2, 33, 4, 2 * D)[..., ::2])),
    ("varlen_fwd_out_cpu", "out", _fw(out=lambda: torch.empty(2, 33, 4, D, dtype=DTYPE))),
    ("varlen_fwd_out_list", "out", _fw(out=[1])),
    ("varlen_fwd_leftpad_length", "leftpad_k", _fw(leftpad_k=lambda: i32(0))),
    ("varlen_fwd_cu_k_with_page_table", "cu_seqlens_k",
     _fw(lambda: packed()[:3], cu_seqlens_q=lambda: cu(LQ), cu_seqlens_k=lambda: cu(LK), max_seqlen_q=40,
         max_seqlen_k=33, page_table=lambda: i32(0, 1, 2).reshape(3, 1))),
    ("varlen_fwd_sm_margin_minus1", "sm_margin", _fw(sm_margin=-1)),
    ("combine_dtype", "out_partial",
     lambda: flash_attn_combine(rnd(3, 2, 4, 2, 16, dtype=F16), rnd(3, 2, 2, 4, dtype=torch.float32))),
]

# Calls that are valid but need what this build did not compile: NotImplementedError naming the argument.
BAD_PUBLIC += [case for case, needed in [
    (("func_softcap_unbuilt", "softcap", _fa(softcap=2.0)), "softcap"),
    (("func_num_splits_unbuilt", "num_splits", _fa(num_splits=3)), "split_kv"),
    (("func_pack_gqa_unbuilt", "pack_gqa", _fa(pack_gqa=True)), "pack_gqa"),
    (("func_local_unbuilt", "window_size", _fa(window_size=(8, 0))), "local"),
    (("func_local_tensor_unbuilt", "window_size", _fa(window_size=lambda: torch.tensor([8, 0], device=DEVICE))),
     "local"),
    # An understated max_seqlen_k must not turn the window into full attention (and skip this error).
    (("varlen_local_understated_max_k", "window_size", _fv(max_seqlen_k=1, window_size=(4, -1))), "local"),
    (("func_fp8_unbuilt", "q", _fa(lambda: tuple(t.to(torch.float8_e4m3fn) for t in dense(d=128)))), "fp8"),
    (("kvcache_page_table_unbuilt", "page_table",
      _fk(lambda: paged_cache()[:3], page_table=lambda: paged_cache()[3], cache_seqlens=lambda: i32(5, 64))),
     "paged_kv"),
    (("kvcache_batch_idx_unbuilt", "cache_batch_idx", _fk(cache_batch_idx=lambda: i32(1, 0))), "kv_batch_idx"),
    (("kvcache_leftpad_unbuilt", "cache_leftpad", _fk(cache_leftpad=lambda: i32(0, 1))), "leftpad_k"),
] if not built(needed)]
if UNCOMPILED_D is not None:
    BAD_PUBLIC.append(("func_head_dim_uncompiled", "q", _fa(lambda: dense(d=UNCOMPILED_D))))
# d 64 with dv 256: a pair FA3 accepts and this build has no kernel for (d 64 / dv 128 runs on the (192, 128) one).
if _ops.BUILD.compiled_head_dims(DTYPE, 64, 256) is None:
    BAD_PUBLIC.append(("func_head_dim_v_differs_unbuilt", "v", _fa(lambda: dense(d=64, dv=256))))

BAD_OP = [
    ("op_num_splits_300", "num_splits", _op(num_splits=300)),
    ("op_pack_gqa_5", "pack_gqa", _op(pack_gqa=5)),
    ("op_pack_gqa_minus2", "pack_gqa", _op(pack_gqa=-2)),
    ("op_pack_gqa_float", "pack_gqa", _op(pack_gqa=1.5)),
    ("op_sm_margin_minus1", "sm_margin", _op(sm_margin=-1)),
    ("op_sm_margin_all_sms", "sm_margin", _op(sm_margin=1_000_000)),
    ("op_scale_nan", "softmax_scale", _op(softmax_scale=math.nan)),
    ("op_scale_inf", "softmax_scale", _op(softmax_scale=math.inf)),
    ("op_scale_minus_inf", "softmax_scale", _op(softmax_scale=-math.inf)),
    ("op_scale_str", "softmax_scale", _op(softmax_scale="x")),
    ("op_softcap_negative", "softcap", _op(softcap=-1.0)),
    ("op_softcap_nan", "softcap", _op(softcap=math.nan)),
    ("op_window_left_minus2", "window_size", _op(window_size_left=-2)),
    ("op_window_right_minus7", "window_size", _op(window_size_right=-7)),
    ("op_window_2_pow_40", "window_size", _op(window_size_left=2**40)),
    ("op_max_seqlen_q_minus1", "max_seqlen", _op(max_seqlen_q=-1)),
    ("op_max_seqlen_k_minus1", "max_seqlen", _op(max_seqlen_k=-1)),
    ("op_varlen_max_q_past_rows", "max_seqlen_q", _opv(max_seqlen_q=sum(LQ) + 1)),
    ("op_varlen_max_k_past_rows", "max_seqlen_k", _opv(max_seqlen_k=sum(LK) + 1)),
    ("op_cu_int64", "cu_seqlens_q", _opv(cu_seqlens_q=lambda: cu(LQ).long())),
    ("op_cu_2d", "cu_seqlens_q", _opv(cu_seqlens_q=lambda: cu(LQ).reshape(2, 2))),
    ("op_cu_k_batch", "k", _opv(cu_seqlens_k=lambda: i32(0, 33, 39))),
    ("op_cu_cpu", "cu_seqlens_q", _opv(cu_seqlens_q=lambda: cu(LQ).cpu())),
    ("op_seqused_q_length", "seqused_q", _opv(seqused_q=lambda: i32(1, 1))),
    ("op_seqused_k_int64", "seqused_k", _opv(seqused_k=lambda: torch.zeros(3, dtype=torch.int64, device=DEVICE))),
    ("op_q_cpu", "q", _op(_with(dense, 0, lambda t: t.cpu()))),
    ("op_k_cpu", "k", _op(_with(dense, 1, lambda t: t.cpu()))),
    ("op_out_cpu", "out", _op(out=lambda: torch.zeros(2, 33, 4, D, dtype=DTYPE))),
    ("op_lse_cpu", "softmax_lse", _op(softmax_lse=lambda: torch.zeros(2, 4, 33))),
    ("op_q_fp32", "q", _op(lambda: dense(dtype=torch.float32))),
    ("op_k_dtype", "k", _op(_with(dense, 1, lambda t: t.to(OTHER_DTYPE)))),
    ("op_out_dtype", "out", _op(out=lambda: torch.zeros(2, 33, 4, D, device=DEVICE))),
    ("op_lse_dtype", "softmax_lse", _op(softmax_lse=lambda: torch.zeros(2, 4, 33, dtype=F16, device=DEVICE))),
    ("op_q_rank3", "q", _op(_with(dense, 0, lambda t: t[0]))),
    ("op_v_shape", "v", _op(_with(dense, 2, lambda t: t[:, :-1]))),
    ("op_k_batch", "k", _op(_with(dense, 0, lambda t: torch.cat([t, t])))),
    ("op_out_shape", "out", _op(out=lambda: torch.zeros(2, 33, 4, D + 8, dtype=DTYPE, device=DEVICE))),
    ("op_lse_shape", "softmax_lse", _op(softmax_lse=lambda: torch.zeros(2, 4, 32, device=DEVICE))),
    ("op_lse_last_stride", "softmax_lse",
     _op(softmax_lse=lambda: torch.zeros(2, 33, 4, device=DEVICE).transpose(1, 2))),
    ("op_q_last_stride", "q", _op(_with(dense, 0, _strided_last((2, 33, 4, D))))),
    ("op_heads", "heads", _op(lambda: dense(h=6, hk=4))),
    ("op_head_dim_60", "head_dim", _op(lambda: dense(d=60))),
    ("op_head_dim_264", "head_dim", _op(lambda: dense(d=264))),
    ("op_head_dim_v_60", "head_dim", _op(lambda: dense(d=64, dv=60))),
    ("op_q_misaligned", "q", _op(_with(dense, 0, lambda t: rnd(t.numel() + 1)[1:].view(t.shape)))),
]
BAD_OP += [case for case, needed in [
    (("op_num_splits_unbuilt", "num_splits", _op(num_splits=2)), "split_kv"),
    (("op_softcap_unbuilt", "softcap", _op(softcap=30.0)), "softcap"),
    (("op_page_table_unbuilt", "page_table",
      _op(page_table=lambda: torch.zeros(2, 1, dtype=torch.int32, device=DEVICE))), "paged_kv"),
    (("op_kv_batch_idx_unbuilt", "kv_batch_idx", _op(kv_batch_idx=lambda: i32(0, 1))), "kv_batch_idx"),
    (("op_leftpad_k_unbuilt", "leftpad_k", _op(leftpad_k=lambda: i32(0, 0))), "leftpad_k"),
    (("op_fp8_unbuilt", "q", _op(lambda: tuple(t.to(torch.float8_e4m3fn) for t in dense(d=128)))), "fp8"),
] if not built(needed)]

BAD_CALLS = BAD_PUBLIC + BAD_OP


def _names(message: str, name: str) -> bool:
    """Whether `message` mentions `name` on its own: `k` is found in "k must be" and "q, k and v", not inside
    "keys" or "seqused_k"."""
    return re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z])", message) is not None


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_clear_error(case):
    case_id, name, call = case
    with pytest.raises(CLEAR_ERRORS) as info:
        call()
    message = str(info.value)
    assert _names(message, name), f"{case_id}: the {type(info.value).__name__} must name '{name}': {message!r}"
    assert_device_healthy(case_id)


# ---------------------------------------------------------------------------------------------------------
# (b) valid edge cases against the reference


def _layout(layout, lead, heads, d, dtype):
    """A (*lead, heads, d) tensor with a contiguous last dim, laid out as named:
    contig; heads_strided (every other head of a tensor with twice the heads); transposed (heads-major storage);
    row_padded (each head's row padded by 16 elements)."""
    if layout == "heads_strided":
        return rnd(*lead, 2 * heads, d, dtype=dtype)[..., ::2, :]
    if layout == "transposed":
        return rnd(heads, *lead, d, dtype=dtype).movedim(0, -2)
    if layout == "row_padded":
        return rnd(*lead, heads, d + 16, dtype=dtype)[..., :d]
    return rnd(*lead, heads, d, dtype=dtype)


def _host_pair(window):
    """The two ints of a window in any form, for the reference (which is not the code under test)."""
    sides = window.tolist() if isinstance(window, (torch.Tensor, np.ndarray)) else window
    return [int(x) for x in sides]


# Each spec overrides the defaults of _make_valid. `window` is a function of the host extents (q rows, k rows:
# dense seqlens or packed totals) that returns a window which cuts nothing, in some form FA3 accepts, so no local
# kernel is needed.
EDGE_HEAD_DIMS = [d for d in (8, 16, 40, 72, 80, 104, 120, 64, 96, 128) if _ops.BUILD.compiled_head_dim(DTYPE, d)]
VALID_SPECS = [
    ("batch0", dict(b=0)),
    ("heads0", dict(h=0, hk=1)),
    ("rows_q0", dict(sq=0)),
    ("keys0", dict(sk=0)),
    ("keys0_causal", dict(sk=0, causal=True)),
    ("decode_sq1_mqa", dict(sq=1, sk=300, causal=True, h=8, hk=1)),
    ("causal_sq_gt_sk", dict(sq=130, sk=17, causal=True)),  # the first 113 rows see no key: out 0, lse -inf
    *[(f"head_dim_{d}", dict(d=d, causal=i % 2 == 1, sq=65, sk=129)) for i, d in enumerate(EDGE_HEAD_DIMS)],
    ("heads_strided_gqa", dict(layout="heads_strided", h=6, hk=3)),
    ("transposed_causal", dict(layout="transposed", causal=True, h=8, hk=2)),
    ("row_padded", dict(layout="row_padded", sq=129, sk=257)),
    *[(f"scale_{s}_{'causal' if c else 'full'}", dict(scale=s, causal=c, sq=70, sk=200))
      for s in (0.0, -0.125, -1.0, 1e-3, 2.0) for c in (False, True)],
    ("window_tensor_at_extents", dict(window=lambda rq, rk: torch.tensor([rk - 1, rq - 1]))),
    ("window_cuda_tensor_beyond", dict(window=lambda rq, rk: torch.tensor([rk + 5, rq + 100], device=DEVICE))),
    ("window_randint_causal", dict(causal=True, window=lambda rq, rk: torch.randint(rk - 1, rk + 50, (2,)))),
    ("window_list", dict(window=lambda rq, rk: [rk, rq])),
    ("window_numpy_ints", dict(window=lambda rq, rk: (np.int64(rk - 1), np.int32(-1)))),
    ("window_numpy_array_causal", dict(causal=True, window=lambda rq, rk: np.array([rk + 3, 0]))),
    ("window_0d_tensors_scale0", dict(scale=0.0, window=lambda rq, rk: (torch.tensor(rk), torch.tensor(rq)))),
    ("varlen_empty_sequences", dict(kind="varlen", lq=[0, 17, 0, 40, 1, 0], lk=[5, 0, 0, 33, 1, 9])),
    ("varlen_empty_sequences_causal", dict(kind="varlen", lq=[0, 17, 0, 40, 1, 0], lk=[5, 0, 0, 33, 1, 9],
                                           causal=True)),
    ("varlen_all_q_empty", dict(kind="varlen", lq=[0, 0], lk=[5, 3])),
    ("varlen_no_keys", dict(kind="varlen", lq=[7, 2], lk=[0, 0])),
    ("varlen_one_row", dict(kind="varlen", lq=[1], lk=[1])),
    ("varlen_seqused", dict(kind="varlen", lq=[40, 17, 0, 60], lk=[33, 50, 5, 70], used_q=[40, 3, 0, 0],
                            used_k=[0, 50, 2, 1], causal=True)),
    ("varlen_heads_strided", dict(kind="varlen", layout="heads_strided", lq=[30, 1, 90], lk=[64, 3, 100])),
    ("varlen_transposed_causal", dict(kind="varlen", layout="transposed", lq=[30, 1, 90], lk=[64, 3, 100],
                                      causal=True)),
    ("varlen_scale0", dict(kind="varlen", lq=[30, 0, 90], lk=[64, 3, 100], scale=0.0)),
    ("varlen_scale_negative_causal", dict(kind="varlen", lq=[30, 0, 90], lk=[64, 3, 100], scale=-0.5,
                                          causal=True)),
    ("varlen_window_cuda_tensor", dict(kind="varlen", lq=[30, 5, 90], lk=[64, 3, 100],
                                       window=lambda rq, rk: torch.tensor([rk - 1, rq - 1], device=DEVICE))),
    ("varlen_head_dim_rounds_up", dict(kind="varlen", lq=[30, 5, 90], lk=[64, 3, 100],
                                       d=next((d for d in EDGE_HEAD_DIMS if d not in (64, 96, 128)), D))),
    ("dense_q_varlen_k", dict(kind="dense_q_varlen_k", b=3, sq=20, lk=[0, 30, 7], causal=True)),
    ("dense_seqused_k", dict(used_k=[0, 47], causal=True)),
    ("dense_seqused_q", dict(used_q=[33, 5], used_k=[47, 1])),
    ("kvcache_tensor_seqlens", dict(kind="kvcache", b=3, sq=1, sk=200, cache_seqlens=[0, 200, 57], causal=True)),
    ("kvcache_int_seqlens", dict(kind="kvcache", sq=4, sk=96, cache_seqlens=60, causal=True)),
    ("kvcache_int_zero", dict(kind="kvcache", sq=2, sk=96, cache_seqlens=0)),
    ("kvcache_varlen_q", dict(kind="kvcache", lq=[1, 3], sk=64, cache_seqlens=[10, 64], scale=-0.3)),
    # A negative scale over several key blocks of every tile width: the running minimum, its rescale of O
    # and the negative path's own weight formula (softmax.h), unmasked blocks included.
    ("dense_scale_negative_blocks", dict(sq=130, sk=1000, scale=-0.2)),
    ("dense_scale_negative_blocks_causal", dict(sq=300, sk=1000, scale=-0.2, causal=True)),
]
VALID_CASES = [(dt, *spec) for dt in BUILT_DTYPES for spec in VALID_SPECS]


def _make_valid(dtype, spec):
    """Inputs of one valid case: q, k, v, the op-level keywords (as varlen_fwd takes them), the reference's
    keywords, the public call that must agree bitwise, and the rows whose outputs are defined (None = all)."""
    s = dict(kind="dense", b=2, sq=33, sk=47, h=4, hk=2, d=D, layout="contig", causal=False, scale=None,
             window=None, used_q=None, used_k=None, cache_seqlens=None)
    s.update(spec)
    h, hk, d, layout = s["h"], s["hk"], s["d"], s["layout"]
    kw = dict(causal=s["causal"], softmax_scale=s["scale"])
    if "lq" in s:
        lq = s["lq"]
        q = _layout(layout, (sum(lq),), h, d, dtype)
        kw.update(cu_seqlens_q=cu(lq), max_seqlen_q=max(lq))
        batch, rows_q = len(lq), sum(lq)
    else:
        batch, rows_q = (len(s["lk"]) if "lk" in s else s["b"]), s["sq"]
        q = _layout(layout, (batch, rows_q), h, d, dtype)
    if "lk" in s:
        lk = s["lk"]
        k, v = (_layout(layout, (sum(lk),), hk, d, dtype) for _ in range(2))
        kw.update(cu_seqlens_k=cu(lk), max_seqlen_k=max(lk))
        rows_k = sum(lk)
    else:
        k, v = (_layout(layout, (batch, s["sk"]), hk, d, dtype) for _ in range(2))
        rows_k = s["sk"]
    if s["used_q"] is not None:
        kw["seqused_q"] = i32(*s["used_q"])
    if s["used_k"] is not None:
        kw["seqused_k"] = i32(*s["used_k"])
    cache_seqlens = s["cache_seqlens"]
    if isinstance(cache_seqlens, list):
        cache_seqlens = i32(*cache_seqlens)
    if cache_seqlens is not None:
        kw["seqused_k"] = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else torch.full(
            (batch,), cache_seqlens, dtype=torch.int32, device=DEVICE)
    ref_kw = {a: kw[a] for a in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "causal", "softmax_scale")
              if a in kw}
    if s["window"] is not None:
        kw["window_size"] = s["window"](rows_q, rows_k)
        ref_kw["window_size"] = _host_pair(kw["window_size"])

    opts = dict(softmax_scale=kw["softmax_scale"], causal=kw["causal"], window_size=kw.get("window_size", (-1, -1)))
    if s["kind"] == "kvcache":
        def public():
            extra = {a: kw[a] for a in ("cu_seqlens_q", "max_seqlen_q") if a in kw}
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, return_softmax_lse=True, **extra,
                                           **opts)[:2]
    elif s["kind"] == "dense" and "seqused_q" not in kw and "seqused_k" not in kw:
        def public():
            return flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    else:
        def public():
            return flash_attn_varlen_func(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"),
                                          kw.get("max_seqlen_q"), kw.get("max_seqlen_k"), seqused_q=kw.get("seqused_q"),
                                          seqused_k=kw.get("seqused_k"), return_attn_probs=True, **opts)

    rows = None
    if s["used_q"] is not None:  # rows past seqused_q are not written: only the used ones are defined
        if "lq" in s:
            rows = torch.zeros(rows_q, dtype=torch.bool, device=DEVICE)
            for start, used in zip(itertools.accumulate([0, *s["lq"][:-1]]), s["used_q"]):
                rows[start:start + used] = True
        else:
            rows = torch.arange(rows_q, device=DEVICE)[None, :] < i32(*s["used_q"])[:, None]
    return q, k, v, kw, ref_kw, public, rows


def _select(out, lse, rows):
    """The defined rows of out ((b, s, ...) or (total, ...)) and of the LSE ((b, h, s) or (h, total))."""
    if rows is None:
        return out, lse
    return out[rows], (lse[:, rows] if lse.dim() == 2 else lse.transpose(1, 2)[rows])


def assert_matches_reference(out, lse, out_ref, lse_ref, out_pt, what):
    assert out.shape == out_ref.shape and lse.shape == lse_ref.shape, (
        f"{what}: shapes out {tuple(out.shape)} / lse {tuple(lse.shape)}, reference {tuple(out_ref.shape)} / "
        f"{tuple(lse_ref.shape)}")
    if out.numel():
        unwritten = torch.isnan(out)
        assert not unwritten.any(), f"{what}: {int(unwritten.sum())} output elements were not written (still NaN)"
        err = (out.float() - out_ref.float()).abs().max().item()
        pt_err = (out_pt.float() - out_ref.float()).abs().max().item()
        assert err <= 2 * pt_err + OUT_FLOOR, (
            f"{what}: max |out - ref| = {err:.3e} exceeds 2 * {pt_err:.3e} (PyTorch in the input dtype) + {OUT_FLOOR}")
    if lse.numel():
        lse_ref = lse_ref.to(lse.dtype)
        assert not torch.isnan(lse).any(), f"{what}: LSE has NaN entries"
        finite = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == -math.inf).all(), (
            f"{what}: LSE must be -inf exactly on the {int((~finite).sum())} rows that see no key")
        if finite.any():
            err = (lse[finite] - lse_ref[finite]).abs().max().item()
            assert err <= LSE_ATOL, f"{what}: max |lse - lse_ref| = {err:.3e} > {LSE_ATOL}"


@pytest.mark.parametrize("dtype,case_id,spec", VALID_CASES,
                         ids=[f"{str(dt).replace('torch.', '')}-{cid}" for dt, cid, _ in VALID_CASES])
def test_valid_edge_case_matches_reference(dtype, case_id, spec):
    q, k, v, kw, ref_kw, public, rows = _make_valid(dtype, spec)
    what = f"{case_id} ({dtype}, q {tuple(q.shape)}, k {tuple(k.shape)})"
    out_ref, lse_ref = attention_ref(q, k, v, upcast=True, **ref_kw)
    out_pt, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True, **ref_kw)

    poisoned = torch.full((*q.shape[:-1], v.shape[-1]), math.nan, dtype=dtype, device=DEVICE)
    out, lse = varlen_fwd(q, k, v, out=poisoned, **kw)
    assert out.data_ptr() == poisoned.data_ptr() or out.numel() == 0, f"{what}: varlen_fwd must write into out="
    assert_device_healthy(what)
    expected, (low_precision, _) = _select(out_ref, lse_ref, rows), _select(out_pt, lse_ref, rows)
    assert_matches_reference(*_select(out, lse, rows), *expected, low_precision, what)
    out2, lse2 = public()
    got, again = _select(out, lse, rows), _select(out2, lse2, rows)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1]), (
        f"{what}: the public function and varlen_fwd must give the same bits")


def test_window_as_host_tensor_inside_cuda_graph():
    """A window given as a CPU tensor is read without a device sync, so the call can be captured."""
    q, k, v = dense(sq=65, sk=129)
    window = torch.tensor([500, 500])  # cuts nothing: normalised to (-1, -1)

    def attn():
        return flash_attn_func(q, k, v, window_size=window)

    graph, out_g = capture_graph(attn)
    q.copy_(torch.randn_like(q))
    graph.replay()
    assert torch.equal(out_g, attn()), "replay with new q must equal an eager call"


def test_window_as_cuda_tensor_refused_during_capture():
    q, k, v = dense()
    window = torch.tensor([100, 100], device=DEVICE)
    flash_attn_func(q, k, v, window_size=window)  # fine outside a capture (one sync, as in FA3)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"window_size: a CUDA tensor cannot be read on the host during "
                                           r"CUDA-graph capture"):
        with torch.cuda.graph(graph):
            flash_attn_func(q, k, v, window_size=window)
    assert_device_healthy("window tensor during capture")


# ---------------------------------------------------------------------------------------------------------
# (c) checked mode on the device

CHECKED_LIES = [
    # (id, argument the ValueError names, overrides of the packed batch LQ = (17, 0, 40), LK = (33, 5, 1))
    ("cu_q_first_nonzero", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(2, 17, 17, 57))),
    ("cu_q_decreasing", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(0, 17, 10, 57))),
    ("cu_q_negative", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(0, -4, 17, 57))),
    ("cu_q_last_short", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(0, 17, 17, 56))),
    ("cu_q_last_past_rows", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(0, 17, 17, 58))),
    ("cu_q_last_huge", "cu_seqlens_q", dict(cu_seqlens_q=lambda: i32(0, 17, 17, 2**30))),
    ("cu_k_decreasing", "cu_seqlens_k", dict(cu_seqlens_k=lambda: i32(0, 33, 30, 39))),
    ("cu_k_last_int_max", "cu_seqlens_k", dict(cu_seqlens_k=lambda: i32(0, 33, 38, INT_MAX))),
    ("max_q_below_a_sequence", "max_seqlen_q", dict(max_seqlen_q=39)),
    ("max_q_zero", "max_seqlen_q", dict(max_seqlen_q=0)),
    ("max_k_below_a_sequence", "max_seqlen_k", dict(max_seqlen_k=32)),
    ("seqused_q_past_sequence", "seqused_q", dict(seqused_q=lambda: i32(17, 1, 40))),
    ("seqused_q_negative", "seqused_q", dict(seqused_q=lambda: i32(-1, 0, 40))),
    ("seqused_k_negative", "seqused_k", dict(seqused_k=lambda: i32(33, -1, 1))),
    ("seqused_k_past_sequence", "seqused_k", dict(seqused_k=lambda: i32(33, 5, 2))),
    ("seqused_k_int_max", "seqused_k", dict(seqused_k=lambda: i32(INT_MAX, 5, 1))),
]
CHECKED_CASES = [(fn, *lie) for fn in ("flash_attn_varlen_func", "varlen_fwd") for lie in CHECKED_LIES]


@pytest.mark.parametrize("fn,case_id,name,over", CHECKED_CASES, ids=[f"{c[0]}-{c[1]}" for c in CHECKED_CASES])
def test_checked_mode_rejects_lying_metadata(fn, case_id, name, over):
    q, k, v, cq, ck, mq, mk = packed()
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
    kw.update(_made(over))
    out = torch.full((*q.shape[:-1], v.shape[-1]), math.nan, dtype=q.dtype, device=DEVICE)
    with flash_attn3.checked_mode(), pytest.raises(ValueError) as info:
        if fn == "varlen_fwd":
            varlen_fwd(q, k, v, out=out, **kw)
        else:
            flash_attn_varlen_func(q, k, v, **kw)
    assert _names(str(info.value), name), f"{case_id}: the ValueError must name '{name}': {info.value}"
    assert torch.isnan(out).all(), f"{case_id}: checked mode must raise before anything is launched"
    assert_device_healthy(case_id)


@pytest.mark.parametrize("case", ["dense_seqused_k", "kvcache_cache_seqlens", "dense_seqused_q"])
def test_checked_mode_rejects_lying_dense_metadata(case):
    q, k, v = dense(sq=1, sk=64)
    with flash_attn3.checked_mode():
        if case == "dense_seqused_k":
            with pytest.raises(ValueError, match=r"seqused_k: entry 1 \(= 65\) must be within \[0, 64\]"):
                varlen_fwd(q, k, v, seqused_k=i32(3, 65))
        elif case == "dense_seqused_q":
            with pytest.raises(ValueError, match=r"seqused_q: entry 0 \(= 2\) must be within \[0, 1\]"):
                varlen_fwd(q, k, v, seqused_q=i32(2, 1))
        else:
            with pytest.raises(ValueError, match=r"cache_seqlens: entry 0 \(= -3\) must be within \[0, 64\]"):
                flash_attn_with_kvcache(q, k, v, cache_seqlens=i32(-3, 64))
    assert_device_healthy(case)


def test_checked_mode_honest_calls_same_bits(monkeypatch):
    """Checked mode only reads the metadata: an honest call gives the bits of an unchecked one."""
    q, k, v, cq, ck, mq, mk = packed(lq=(17, 0, 40, 1), lk=(33, 5, 0, 90))
    used_k = i32(30, 5, 0, 1)
    qc, kc, vc = dense(b=3, sq=1, sk=64)

    def calls():
        return (*flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, seqused_k=used_k, causal=True,
                                        return_attn_probs=True),
                flash_attn_with_kvcache(qc, kc, vc, cache_seqlens=i32(0, 64, 17)))

    plain = calls()
    with flash_attn3.checked_mode():
        checked = calls()
    monkeypatch.setattr(_checked, "_switch", None)
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", "1")
    by_env = calls()
    for how, results in (("checked_mode()", checked), ("FLASH_ATTN3_CHECKED=1", by_env)):
        for what, a, b in zip(("varlen out", "varlen lse", "kvcache out"), plain, results):
            assert torch.equal(a, b), f"{how}: {what} differs from the unchecked call"


def test_checked_mode_environment_variable_on_device(monkeypatch):
    monkeypatch.setattr(_checked, "_switch", None)
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", "1")
    q, k, v, cq, ck, mq, mk = packed()
    with pytest.raises(ValueError, match=r"max_seqlen_q: sequence 0 uses 17 rows .* more than max_seqlen_q = 0"):
        flash_attn_varlen_func(q, k, v, cq, ck, 0, mk)
    assert_device_healthy("FLASH_ATTN3_CHECKED=1")


def test_checked_mode_refuses_cuda_graph_capture():
    q, k, v, cq, ck, mq, mk = packed()
    flash_attn_varlen_func(q, k, v, cq, ck, mq, mk)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with flash_attn3.checked_mode(), pytest.raises(RuntimeError, match=r"checked mode: cannot check metadata "
                                                                       r"during CUDA-graph capture.*set_checked_mode"):
        with torch.cuda.graph(graph):
            flash_attn_varlen_func(q, k, v, cq, ck, mq, mk)
    assert_device_healthy("checked mode during capture")


# ---------------------------------------------------------------------------------------------------------
# (d) memory safety of the unchecked op: lying metadata writes nothing outside out / softmax_lse, and no key
# loop runs away. Last in the file: a device fault here loses the CUDA context for every later test.

CANARY = 12345.0
PAD = 512  # canary rows on each side of every row block: past the 44 KB overrun issue #16 measured
TIME_BOUND_S = 2.0  # a valid call of these sizes takes microseconds; a runaway key loop takes tens of seconds
MS_LQ, MS_LK = (100, 37, 200), (150, 80, 300)  # packed: 337 q rows, 530 k rows
MS_H, MS_HK = 4, 2

MEMORY_LIES = [
    # (id, layout, overrides of honest metadata: tuples become int32 device tensors)
    ("cu_q_negative_middle", "varlen", dict(cu_seqlens_q=(0, -64, 137, 337))),
    ("cu_q_negative_first", "varlen", dict(cu_seqlens_q=(-100, 100, 137, 337))),
    ("cu_q_last_past_rows", "varlen", dict(cu_seqlens_q=(0, 100, 137, 487))),
    ("cu_q_last_huge", "varlen", dict(cu_seqlens_q=(0, 100, 137, 2**30))),
    ("cu_q_int_max", "varlen", dict(cu_seqlens_q=(0, 100, INT_MAX, INT_MAX))),
    ("cu_q_decreasing", "varlen", dict(cu_seqlens_q=(0, 300, 100, 337))),
    ("cu_q_all_past_rows", "varlen", dict(cu_seqlens_q=(400, 500, 600, 700))),
    ("seqused_q_past_sequence", "varlen", dict(seqused_q=(100, 237, 500))),
    ("seqused_q_int_max", "varlen", dict(seqused_q=(INT_MAX, INT_MAX, INT_MAX))),
    ("seqused_q_negative", "varlen", dict(seqused_q=(-5, 37, -200))),
    ("cu_k_last_int_max", "varlen", dict(cu_seqlens_k=(0, 150, 230, INT_MAX))),
    ("cu_k_negative", "varlen", dict(cu_seqlens_k=(0, -1000, 230, 530))),
    ("cu_k_first_huge", "varlen", dict(cu_seqlens_k=(2**30, 150, 230, 530))),
    ("seqused_k_int_max", "varlen", dict(seqused_k=(INT_MAX, 80, 300))),
    ("seqused_k_all_int_max", "varlen", dict(seqused_k=(INT_MAX, INT_MAX, INT_MAX))),
    ("seqused_k_negative", "varlen", dict(seqused_k=(-1, 80, -300))),
    ("max_seqlen_q_understated", "varlen", dict(max_seqlen_q=1)),
    ("max_seqlen_k_understated", "varlen", dict(max_seqlen_k=1)),
    ("dense_seqused_q_past_rows", "dense", dict(seqused_q=(100, 300, INT_MAX))),
    ("dense_seqused_q_negative", "dense", dict(seqused_q=(-7, 0, -INT_MAX))),
    ("dense_seqused_k_int_max", "dense", dict(seqused_k=(INT_MAX, 1, 200))),
]
MEMORY_CASES = [(*lie, causal) for lie in MEMORY_LIES for causal in (False, True)]


def _canaried(name, shape, index, dtype):
    """A canary-filled buffer of `shape` and its part `buffer[index]`, the only part the op may write. Returns
    the view for the op and (name, buffer, a copy to compare with, bool mask of the view) for the check."""
    buffer = torch.full(shape, CANARY, dtype=dtype, device=DEVICE)
    inside = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    inside[index] = True
    return buffer[index], (name, buffer, buffer.clone(), inside)


def _memory_safety_args(layout, causal, over):
    """Honest op arguments with out / softmax_lse inside canary buffers, then `over` applied (tuples become
    int32 device tensors); returns the args and the buffers to inspect."""
    batch = len(MS_LQ)
    if layout == "varlen":
        rows_q, rows_k = sum(MS_LQ), sum(MS_LK)
        q, k, v = rnd(rows_q, MS_H, D), rnd(rows_k, MS_HK, D), rnd(rows_k, MS_HK, D)
        honest = dict(cu_seqlens_q=cu(MS_LQ), cu_seqlens_k=cu(MS_LK), max_seqlen_q=max(MS_LQ),
                      max_seqlen_k=max(MS_LK))
        rows = slice(PAD, PAD + rows_q)  # canary rows before and after the packed rows
        out, out_check = _canaried("out", (PAD + rows_q + PAD, MS_H, D), (rows,), q.dtype)
        lse, lse_check = _canaried("softmax_lse", (MS_H, PAD + rows_q + PAD), (slice(None), rows), torch.float32)
    else:
        sq, sk = max(MS_LQ), max(MS_LK)
        q, k, v = rnd(batch, sq, MS_H, D), rnd(batch, sk, MS_HK, D), rnd(batch, sk, MS_HK, D)
        honest = {}
        rows = slice(PAD, PAD + sq)  # canary rows around the rows of every batch entry (and head, for the LSE)
        out, out_check = _canaried("out", (batch, PAD + sq + PAD, MS_H, D), (slice(None), rows), q.dtype)
        lse, lse_check = _canaried("softmax_lse", (batch, MS_H, PAD + sq + PAD), (Ellipsis, rows), torch.float32)
    honest.update({a: (i32(*x) if isinstance(x, tuple) else x) for a, x in over.items()})
    args = op_args(q, k, v, out=out, softmax_lse=lse, window_size_right=0 if causal else -1, **honest)
    return args, [out_check, lse_check]


@pytest.mark.parametrize("case_id,layout,over,causal", MEMORY_CASES,
                         ids=[f"{c[0]}-{'causal' if c[3] else 'full'}" for c in MEMORY_CASES])
def test_memory_safety_lying_metadata(case_id, layout, over, causal):
    what = f"{case_id} ({'causal' if causal else 'full'}, unchecked)"
    honest_args, _ = _memory_safety_args(layout, causal, {})
    raw_fwd(honest_args)  # warm-up of the same sizes: first-call setup stays out of the timing
    assert_device_healthy(f"{what}: honest warm-up call")

    args, buffers = _memory_safety_args(layout, causal, over)
    torch.cuda.synchronize()
    start = time.perf_counter()
    raw_fwd(args)
    assert_device_healthy(what)
    elapsed = time.perf_counter() - start
    for name, buf, copy, inside in buffers:
        changed = (buf != copy) & ~inside  # a NaN written over a canary counts too (NaN != anything)
        if changed.any():
            first = int(changed.flatten().nonzero()[0])
            pytest.fail(f"{what}: {int(changed.sum())} {name} elements outside the tensor were overwritten (first "
                        f"at flat index {first} of the canary buffer of shape {tuple(buf.shape)}: "
                        f"{copy.flatten()[first].item()} -> {buf.flatten()[first].item()})")
    assert elapsed < TIME_BOUND_S, (f"{what}: the call took {elapsed:.2f} s (bound {TIME_BOUND_S} s): a key loop "
                                    "is not bounded by the real K rows")
