"""CPU checks of tests/_fp8_ref.py, the low-precision FP8 baseline of tests/test_fp8_gpu.py: it must mean the
same attention as flash_attn3.reference.attention_ref (masks, GQA, descales, varlen, seqused) and differ from
it only by low-precision rounding, of which the e4m3 rounding of P is the largest part."""
from __future__ import annotations

import itertools

import pytest
import torch

from _fp8_ref import attention_fp8_lowp

from flash_attn3.reference import attention_ref

FP8 = torch.float8_e4m3fn


def _fp8(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16).to(FP8)


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _descales(b, h_k):
    return {n: torch.rand(b, h_k) * 1.75 + 0.25 for n in ("q_descale", "k_descale", "v_descale")}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_same_attention_as_the_reference(causal, varlen):
    """Without the P rounding it is bfloat16 attention of the same problem (error of bf16 size); with it the
    error grows (e4m3 has 3 mantissa bits) but stays that of a rounding, not of a different problem."""
    h, h_k, d = 4, 2, 32
    if varlen:
        lq, lk = [0, 1, 17, 40, 9], [0, 30, 17, 5, 0]
        q, k, v = _fp8(sum(lq), h, d), _fp8(sum(lk), h_k, d), _fp8(sum(lk), h_k, d)
        kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), **_descales(len(lq), h_k))
    else:
        q, k, v = _fp8(2, 23, h, d), _fp8(2, 37, h_k, d), _fp8(2, 37, h_k, d)
        kw = _descales(2, h_k)
    ref, _ = attention_ref(q, k, v, causal=causal, **kw)
    plain = attention_fp8_lowp(q, k, v, causal=causal, intermediate_dtype=None, **kw)
    rounded = attention_fp8_lowp(q, k, v, causal=causal, **kw)
    assert plain.dtype == rounded.dtype == torch.bfloat16 and plain.shape == ref.shape
    err_plain = (plain.float() - ref).abs()
    err_rounded = (rounded.float() - ref).abs()
    # bfloat16 scores of up to ~16 (descales up to 2) are off by up to ~0.06, which exp() scales: over 1200
    # seeds the largest error was 0.10 (median 0.024) and a device run met 0.137; a different problem is O(1)
    assert err_plain.max() < 0.25
    assert err_plain.mean() < err_rounded.mean() < 0.05
    assert err_rounded.max() < 0.3
    # Rows that see no key (empty k sequences; causal rows before the diagonal) are exactly 0 in both.
    zero = ref.abs().amax(dim=(-1, -2)) == 0
    assert (rounded.float().abs().amax(dim=(-1, -2))[zero] == 0).all()


def test_p_rounding_is_the_kernels():
    """With the two keys' scores known, out is the e4m3-rounded 256 * exp(s - max) weighting of v, normalised by
    the unrounded sum."""
    d = 16
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 2, 1, d)
    k[0, 1, 0, 0] = 1.0  # scores (0, scale) with scale = 1 below
    v = torch.zeros(1, 2, 1, d)
    v[0, 0, 0, 0], v[0, 1, 0, 1] = 1.0, 1.0
    q8, k8, v8 = q.to(FP8), k.to(FP8), v.to(FP8)
    out = attention_fp8_lowp(q8, k8, v8, softmax_scale=1.0)
    p_small = torch.exp(torch.tensor(-1.0, dtype=torch.bfloat16)).float()  # exp(0 - 1) in bfloat16
    total = 1.0 + p_small
    expect0 = (p_small * 256).to(FP8).float() / 256 / total
    expect1 = 1.0 / total
    assert out[0, 0, 0, 0].float() == expect0.to(torch.bfloat16).float()
    assert out[0, 0, 0, 1].float() == torch.tensor(float(expect1)).to(torch.bfloat16).float()


def test_single_visible_key_is_exact():
    """One key per row (causal, s_q == s_k == 1 or the first row): out = v * v_descale rounded to bfloat16."""
    b, h, h_k, d = 2, 4, 2, 32
    q, k, v = _fp8(b, 1, h, d), _fp8(b, 1, h_k, d), _fp8(b, 1, h_k, d)
    ds = _descales(b, h_k)
    out = attention_fp8_lowp(q, k, v, **ds)
    expect = (v.float() * ds["v_descale"][:, None, :, None]).to(torch.bfloat16).repeat_interleave(h // h_k, dim=2)
    assert torch.equal(out, expect)


def test_dense_packed_and_seqused_agree():
    """The same sequences as a dense batch, packed with cu_seqlens, and as a longer cache cut by seqused_k."""
    b, s_q, s_k, h, h_k, d = 3, 11, 19, 4, 1, 32
    q, k, v = _fp8(b, s_q, h, d), _fp8(b, s_k, h_k, d), _fp8(b, s_k, h_k, d)
    ds = _descales(b, h_k)
    dense = attention_fp8_lowp(q, k, v, causal=True, **ds)
    packed = attention_fp8_lowp(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                cu_seqlens_q=_cu([s_q] * b), cu_seqlens_k=_cu([s_k] * b), **ds)
    assert torch.equal(dense.flatten(0, 1), packed)
    pad = _fp8(b, 7, h_k, d)
    cut = attention_fp8_lowp(q, torch.cat([k, pad], 1), torch.cat([v, pad], 1), causal=True,
                             cache_seqlens=torch.full((b,), s_k, dtype=torch.int32), **ds)
    assert torch.equal(dense, cut)


@pytest.mark.parametrize("softcap", [0.0, 2.0, 20.0])
@pytest.mark.parametrize("sink_scale", [None, 1.0, 30.0])
def test_softcap_and_sinks_as_the_reference(softcap, sink_scale):
    """softcap and sinks mean what attention_ref means by them (tests/test_local_softcap_gpu.py's FP8 cases
    rest on this): the unrounded baseline is bfloat16 attention of the same problem, the rounded one a
    rounding away; a dominating sink (scale 30) drives rows towards 0 in both."""
    h, h_k, d = 4, 2, 32
    q, k, v = _fp8(2, 23, h, d), _fp8(2, 37, h_k, d), _fp8(2, 37, h_k, d)
    kw = dict(causal=True, softcap=softcap, **_descales(2, h_k))
    if sink_scale is not None:
        kw["sinks"] = torch.tensor([30.0, -30.0, 5.0, 0.0]) * (sink_scale / 30.0)  # dominating to negligible
    ref, _ = attention_ref(q, k, v, **kw)
    plain = attention_fp8_lowp(q, k, v, intermediate_dtype=None, **kw)
    rounded = attention_fp8_lowp(q, k, v, **kw)
    err_plain, err_rounded = (plain.float() - ref).abs(), (rounded.float() - ref).abs()
    # Bounds of a rounding (bfloat16 scores of up to ~16 with descales up to 2; e4m3 P), not of another problem.
    assert err_plain.max() < 0.2 and err_plain.mean() < 0.01
    assert err_rounded.max() < 0.4 and err_rounded.mean() < 0.05
    # Against the same call without the feature: the feature changes the answer (the test could fail).
    base = dict(kw)
    base.pop("sinks", None)
    base["softcap"] = 0.0
    if softcap == 2.0 or sink_scale == 30.0:  # strong enough to move rows by more than the bf16 rounding
        other, _ = attention_ref(q, k, v, **base)
        assert (other - ref).abs().mean() > 3 * err_plain.mean()
