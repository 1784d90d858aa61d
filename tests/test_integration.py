"""Integration layer: flash_attn3.availability, flash_attn3.sdpa, flash_attn3.nn and `python -m flash_attn3`.

CPU tests always run (sdpa and FlashAttention fall back to torch there, so results equal torch's); the
tests marked `gpu` need an SM90 GPU with the extension and compare the fast path with fp32 torch math.
"""
from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_attn3
from flash_attn3 import _ops
from flash_attn3.availability import (
    get_flash_attention_version,
    is_available,
    unavailable_reason,
)
from flash_attn3.nn import FlashAttention, replace_attention
from flash_attn3.sdpa import last_fallback_reason, sdpa

ROOT = Path(__file__).resolve().parent.parent
_need_kernels = pytest.mark.skipif(not is_available(), reason=f"flash_attn3 unavailable: {unavailable_reason()}")


def _copy_mha(mha: nn.MultiheadAttention) -> FlashAttention:
    return FlashAttention.from_multihead_attention(mha)


# ---------------------------------------------------------------- availability


def test_availability_reports_reason():
    if torch.cuda.is_available() and is_available():
        assert unavailable_reason() is None
        return
    assert is_available() is False
    reason = unavailable_reason()
    assert isinstance(reason, str) and reason
    assert get_flash_attention_version() == flash_attn3.__version__


def test_unavailable_on_cpu_only_torch():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert not is_available()
    assert "CUDA" in unavailable_reason()


# ---------------------------------------------------------------- sdpa (CPU fallback)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9)])
def test_sdpa_cpu_equals_torch(causal, sq, sk):
    q = torch.randn(2, 4, sq, 16)
    k = torch.randn(2, 4, sk, 16)
    v = torch.randn(2, 4, sk, 16)
    out = sdpa(q, k, v, is_causal=causal)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    reason = last_fallback_reason()
    assert reason is not None and "float32" in reason


def test_sdpa_cpu_scale_and_gqa():
    q = torch.randn(2, 8, 6, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 16, dtype=torch.float64)
    out = sdpa(q, k, v, scale=0.3, enable_gqa=True, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True, is_causal=True)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError):  # torch's own error for mismatched heads without enable_gqa
        sdpa(q, k, v)


def test_sdpa_cpu_attn_mask_reason():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    out = sdpa(q, k, v, attn_mask=mask)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert "attn_mask" in last_fallback_reason()


def test_sdpa_cpu_dropout_reason():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    sdpa(q, k, v, dropout_p=0.5)
    assert "dropout" in last_fallback_reason()


def test_sdpa_cpu_half_reason_mentions_device():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    out = sdpa(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert "CUDA" in last_fallback_reason()


def test_sdpa_logs_each_reason_once(caplog):
    sdpa_mod = importlib.import_module("flash_attn3.sdpa")  # the module (the package may export the function)

    sdpa_mod._logged.discard("dropout_p > 0 (the kernel has no dropout)")
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="flash_attn3"):
        sdpa(q, k, v, dropout_p=0.1)
        sdpa(q, k, v, dropout_p=0.2)
    hits = [r for r in caplog.records if r.name == "flash_attn3" and "dropout" in r.getMessage()]
    assert len(hits) == 1


# ---------------------------------------------------------------- FlashAttention module (CPU)


def _inputs(batch_first, b=3, L=5, S=7, e=32, kdim=None, vdim=None):
    def shape(s, d):
        return (b, s, d) if batch_first else (s, b, d)

    return torch.randn(shape(L, e)), torch.randn(shape(S, kdim or e)), torch.randn(shape(S, vdim or e))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("use_kpm", [False, True])
@pytest.mark.parametrize("self_attn", [False, True])
def test_module_matches_mha(batch_first, need_weights, use_kpm, self_attn):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    fa = _copy_mha(mha)
    q, k, v = _inputs(batch_first, S=5 if self_attn else 7)
    if self_attn:
        k = v = q
    kpm = None
    if use_kpm:
        kpm = torch.zeros(3, k.shape[1] if batch_first else k.shape[0], dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, -1] = True
    ref, ref_w = mha(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    out, w = fa(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    else:
        assert w is None and ref_w is None


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("mask_kind", ["bool2d", "float2d", "float3d", "causal"])
@pytest.mark.parametrize("use_kpm", [False, True])
def test_module_attn_mask(mask_kind, use_kpm):
    b, h, L = 2, 4, 6
    mha = nn.MultiheadAttention(32, h, batch_first=True)
    fa = _copy_mha(mha)
    x = torch.randn(b, L, 32)
    is_causal = False
    if mask_kind == "bool2d":
        mask = torch.rand(L, L) > 0.5
        mask[:, 0] = False
    elif mask_kind == "float2d":
        mask = torch.randn(L, L)
    elif mask_kind == "float3d":
        mask = torch.randn(b * h, L, L)
    else:
        mask = nn.Transformer.generate_square_subsequent_mask(L)
        is_causal = True
    kpm = None
    if use_kpm:
        kpm = torch.zeros(b, L, dtype=torch.bool)
        kpm[1, -2:] = True
    for need_weights in (False, True):
        ref, _ = mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights,
                     is_causal=is_causal)
        out, _ = fa(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights,
                    is_causal=is_causal)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_module_kdim_vdim_no_bias_unbatched_and_train_mode():
    mha = nn.MultiheadAttention(32, 4, bias=False, kdim=24, vdim=40)
    fa = _copy_mha(mha)
    assert fa.in_proj_weight is None and fa.k_proj_weight.shape == (32, 24)
    q, k, v = _inputs(False, kdim=24, vdim=40)
    for need_weights in (False, True):
        torch.testing.assert_close(fa(q, k, v, need_weights=need_weights)[0],
                                   mha(q, k, v, need_weights=need_weights)[0], atol=1e-5, rtol=1e-5)
    # unbatched (L, E) inputs
    torch.testing.assert_close(fa(q[:, 0], k[:, 0], v[:, 0], need_weights=False)[0],
                               mha(q[:, 0], k[:, 0], v[:, 0], need_weights=False)[0], atol=1e-5, rtol=1e-5)
    # training mode with dropout 0, gradients flow through the fallback
    fa.train()
    out, _ = fa(q, k, v, need_weights=False)
    out.sum().backward()
    assert fa.q_proj_weight.grad is not None


def test_module_unsupported_options():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        FlashAttention(16, 2, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        FlashAttention(16, 2, add_zero_attn=True)
    with pytest.raises(ValueError):
        FlashAttention(10, 3)


@pytest.mark.parametrize("kdim", [None, 24])
def test_state_dict_round_trip(kdim):
    mha = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim)
    fa = FlashAttention(32, 4, kdim=kdim, vdim=kdim)
    assert set(fa.state_dict()) == set(mha.state_dict())
    fa.load_state_dict(mha.state_dict())
    for name, t in mha.state_dict().items():
        assert torch.equal(fa.state_dict()[name], t)
    mha2 = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim)
    mha2.load_state_dict(fa.state_dict())
    for name, t in fa.state_dict().items():
        assert torch.equal(mha2.state_dict()[name], t)


class _Block(nn.Module):
    def __init__(self, e=32, h=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.norm = nn.LayerNorm(e)
        self.cross = nn.MultiheadAttention(e, h, batch_first=True)

    def forward(self, x, mem):
        x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return x + self.cross(x, mem, mem, need_weights=False)[0]


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(32, 8)

    def forward(self, x, mem):
        for blk in self.blocks:
            x = blk(x, mem)
        return self.head(x)


def test_replace_attention_custom_model():
    model = _Model().eval()
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = model(x, mem)
        names = replace_attention(model)
        out = model(x, mem)
    assert names == ["blocks.0.attn", "blocks.0.cross", "blocks.1.attn", "blocks.1.cross"]
    assert all(isinstance(model.get_submodule(n), FlashAttention) for n in names)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_replace_attention_transformer_encoder_and_sequential():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=False)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    model.train()  # training mode: the layer calls self_attn.forward (no native inference fast path)
    x = torch.randn(7, 3, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    ref = model[1](model[0](x), mask=mask, is_causal=True)
    names = replace_attention(model)
    assert names == ["1.layers.0.self_attn", "1.layers.1.self_attn"]
    out = model[1](model[0](x), mask=mask, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model[1].layers[0].self_attn.training


def test_replace_attention_keeps_unsupported():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True), nn.Linear(16, 16))
    assert replace_attention(model) == []
    assert isinstance(model[0], nn.MultiheadAttention)


# ---------------------------------------------------------------- python -m flash_attn3


def test_cli_runs():
    res = subprocess.run([sys.executable, "-m", "flash_attn3"], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"flash_attn3 {flash_attn3.__version__}" in res.stdout
    assert "self-test" in res.stdout


# ---------------------------------------------------------------- GPU


def _bf16_head_dim():
    hds = _ops.BUILD.head_dims_for(torch.bfloat16)
    if not hds:
        pytest.skip("no bfloat16 kernel compiled")
    return 64 if 64 in hds else hds[0]


def _check_close(out, ref_fp32, low):
    err = (out.float() - ref_fp32).abs().max().item()
    base = (low.float() - ref_fp32).abs().max().item()
    assert err <= 2 * base + 1e-4, f"max error {err} vs torch bf16 error {base}"


@pytest.mark.gpu
@_need_kernels
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(128, 128), (77, 200)])
def test_sdpa_fast_path_gpu(hq, hk, causal, sq, sk):
    if causal and sq != sk:
        pytest.skip("torch's causal is top-left aligned: falls back (covered on CPU)")
    if hq != hk and not _ops.BUILD.has("gqa"):
        pytest.skip("gqa not built")
    if causal and not _ops.BUILD.has("causal"):
        pytest.skip("causal not built")
    d = _bf16_head_dim()
    q = torch.randn(2, hq, sq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, hk, sk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, hk, sk, d, device="cuda", dtype=torch.bfloat16)
    gqa = hq != hk
    with torch.no_grad():
        out = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        assert last_fallback_reason() is None
        assert out.shape == (2, hq, sq, d) and out.dtype == torch.bfloat16
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
        low = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    _check_close(out, ref, low)


@pytest.mark.gpu
@_need_kernels
def test_sdpa_gpu_falls_back_with_grad_and_mask():
    d = _bf16_head_dim()
    q, k, v = (torch.randn(1, 2, 64, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa(q.requires_grad_(), k, v)
    assert "grad" in last_fallback_reason()
    with torch.no_grad():
        sdpa(q, k, v, is_causal=True, attn_mask=None)
        if _ops.BUILD.has("causal"):
            assert last_fallback_reason() is None
        sdpa(q, k[:, :, :32], v[:, :, :32], is_causal=True)
        assert "seqlen_q != seqlen_k" in last_fallback_reason()


@pytest.mark.gpu
@_need_kernels
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_bf16_gpu(batch_first):
    e = _bf16_head_dim() * 4
    mha = nn.MultiheadAttention(e, 4, batch_first=batch_first, device="cuda").eval()
    fa = _copy_mha(mha).to(torch.bfloat16).eval()
    x = torch.randn((2, 96, e) if batch_first else (96, 2, e), device="cuda")
    with torch.no_grad():
        ref, _ = mha(x, x, x, need_weights=False)
        out, _ = fa(x.bfloat16(), x.bfloat16(), x.bfloat16(), need_weights=False)
        assert last_fallback_reason() is None
        low = _copy_mha(mha).to(torch.bfloat16).eval()
        low_out = F.multi_head_attention_forward(
            *(t.transpose(0, 1) if batch_first else t for t in (x.bfloat16(),) * 3), e, 4,
            low.in_proj_weight, low.in_proj_bias, None, None, False, 0.0, low.out_proj.weight,
            low.out_proj.bias, training=False, need_weights=False)[0]
        if batch_first:
            low_out = low_out.transpose(0, 1)
    _check_close(out, ref, low_out)
