"""GPU tests of sliding-window (local) attention and softcap, alone and combined with causal, GQA, varlen,
split-KV / PackGQA, the KV cache and every dtype (FP8 too: tests/_fp8_ref.py's baseline has softcap and sinks).

Outputs and LSEs are compared with flash_attn3.reference.attention_ref (float32) under FA3's rule, with the
helpers of tests/test_decode_gpu.py; every `out=` starts as NaN. Windows: 0 and 1 wide, odd sizes, one side
unbounded, larger than the sequence; softcaps small (saturating) and large.
"""
from __future__ import annotations

import pytest
import torch

from _gpu import skip_reason  # noqa: E402

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

import test_decode_gpu as D  # noqa: E402

from flash_attn3 import _ops, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402

BF16, F16, FP8 = D.BF16, D.F16, D.FP8
WINDOWS = [(0, 0), (1, 0), (17, 5), (-1, 3), (5, -1), (100000, 100000), (64, 0)]
SOFTCAPS = [0.0, 2.0, 30.0]
SHAPES = [(1, 513), (113, 113), (77, 1023), (1023, 17), (300, 700)]


def _require_features(dtype, d, window, softcap, num_splits=1):
    D._require(dtype, d, num_splits)
    if window != (-1, -1) and not _ops.BUILD.has("local"):
        pytest.skip("local attention is not built")
    if softcap and not _ops.BUILD.has("softcap"):
        pytest.skip("softcap is not built")


CASES = D._grid((WINDOWS, SOFTCAPS),
                ((SHAPES, 1), ([BF16, F16, BF16, FP8], 2), ([128, 64, 96, 256], 3), ([(4, 4), (8, 2), (6, 1)], 5),
                 ([1, 0, 3], 4), ([False, True], 7)))


@pytest.mark.parametrize("window,softcap,shape,dtype,d,heads,num_splits,causal", CASES,
                         ids=[f"w{c[0][0]}_{c[0][1]}-cap{c[1]}-sq{c[2][0]}-sk{c[2][1]}-{D._name(c[3])}-d{c[4]}-"
                              f"h{D._name(c[5])}-splits{c[6]}-{D._name(c[7])}" for c in CASES])
def test_window_softcap(window, softcap, shape, dtype, d, heads, num_splits, causal):
    if causal:  # causal intersects the window: its right side becomes 0
        window = (window[0], 0 if window[1] < 0 else min(window[1], 0))
    _require_features(dtype, d, window, softcap, num_splits)
    sq, sk = shape
    h, h_k = heads
    b = 2
    q = D._rand(dtype, b, sq, h, d)
    k, v = D._rand(dtype, b, sk, h_k, d), D._rand(dtype, b, sk, h_k, d)
    descale = D._descales(dtype, b, h_k)
    kw = dict(window_size=window, **descale)
    if softcap:
        kw["softcap"] = softcap
    refs = D._references(q, k, v, causal=causal, **kw)
    what = f"window={window} softcap={softcap} sq={sq} sk={sk} causal={causal} splits={num_splits}"
    out, lse = flash_attn_func(q, k, v, causal=causal, num_splits=num_splits, return_attn_probs=True, **kw)
    D._check(out, lse, refs, what)
    # Packed (varlen) layout of the same batch: the same answer per sequence.
    cu_q, cu_k = D._cu_seqlens([sq] * b), D._cu_seqlens([sk] * b)
    outv, lsev = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                        causal=causal, num_splits=num_splits, return_attn_probs=True, **kw)
    torch.testing.assert_close(outv.view_as(out).float(), out.float(), atol=0, rtol=0,
                               msg=lambda m: f"{what}: varlen differs from dense: {m}")


@pytest.mark.parametrize("window", [(0, 0), (31, 0), (300, 0), (2, 2)])
@pytest.mark.parametrize("num_splits", [1, 0])
def test_window_decode_kvcache(window, num_splits):
    """Decode against a cache with per-sequence lengths: the window follows each sequence's end."""
    dtype, b, h, h_k, d, cap = BF16, 4, 16, 4, 128, 4000
    _require_features(dtype, d, window, 0.0, num_splits)
    q = D._rand(dtype, b, 1, h, d)
    k, v = D._rand(dtype, b, cap, h_k, d), D._rand(dtype, b, cap, h_k, d)
    lengths = D._cache_lengths(b, cap)
    seqlens = D._i32(lengths)
    refs = D._references(q, k, v, cache_seqlens=seqlens, window_size=window, softcap=5.0)
    D._poison_cache_tails((k, v), lengths, "nan")
    out, lse, *_ = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, window_size=window, softcap=5.0,
                                           num_splits=num_splits, return_softmax_lse=True)
    D._check(out, lse, refs, f"decode window={window} lengths={lengths}", kvcache=True)


SINK_CASES = [(BF16, 1, 513, (8, 2), 0, False), (F16, 113, 113, (4, 4), 1, True), (BF16, 1, 4000, (16, 2), 0, True),
              (BF16, 77, 1023, (6, 1), 3, True), (BF16, 1, 1, (4, 1), 0, False), (FP8, 113, 700, (8, 2), 0, True),
              (FP8, 1, 2000, (16, 2), 3, False)]


@pytest.mark.parametrize("dtype,sq,sk,heads,num_splits,causal", SINK_CASES,
                         ids=[f"{D._name(c[0])}-sq{c[1]}-sk{c[2]}-h{D._name(c[3])}-splits{c[4]}-{D._name(c[5])}"
                              for c in SINK_CASES])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sinks(dtype, sq, sk, heads, num_splits, causal, scale):
    """Attention sinks (gpt-oss / vLLM s_aux / SGLang sinks): one logit per q head in every row's denominator,
    of moderate and of dominating size, through the plain kernel (PackGQA rows included) and split-KV (the
    combine adds them)."""
    d = 128
    _require_features(dtype, d, (-1, -1), 0.0, num_splits)
    if not _ops.BUILD.has("sinks"):
        pytest.skip("sinks are not built")
    h, h_k = heads
    b = 2
    q = D._rand(dtype, b, sq, h, d)
    k, v = D._rand(dtype, b, sk, h_k, d), D._rand(dtype, b, sk, h_k, d)
    sinks = torch.randn(h, device=D.DEVICE) * scale
    descale = D._descales(dtype, b, h_k)
    refs = D._references(q, k, v, causal=causal, sinks=sinks, **descale)
    out, lse = flash_attn_func(q, k, v, causal=causal, num_splits=num_splits, sinks=sinks, return_attn_probs=True,
                               **descale)
    D._check(out, lse, refs, f"sinks scale={scale} sq={sq} sk={sk} heads={heads} splits={num_splits}")


CHUNK_CASES = D._grid(([1, 7, 64, 113, 1000, 2047], [False, True]),
                      ((SHAPES, 1), ([BF16, F16, FP8, BF16], 2), ([(-1, -1), (-1, -1), (50, 3)], 3),
                       ([1, 0, 3], 4), ([128, 64, 192], 5)))


@pytest.mark.parametrize("chunk,causal,shape,dtype,window,num_splits,d", CHUNK_CASES,
                         ids=[f"chunk{c[0]}-{D._name(c[1])}-sq{c[2][0]}-sk{c[2][1]}-{D._name(c[3])}-w{c[4][0]}_{c[4][1]}-"
                              f"splits{c[5]}-d{c[6]}" for c in CHUNK_CASES])
def test_attention_chunk(chunk, causal, shape, dtype, window, num_splits, d):
    """FA3's attention_chunk (Llama 4): each query sees only the keys of its own chunk of the aligned
    positions, intersected with causal / the window; chunks from 1 to past 2 s_k, GQA, split-KV, varlen."""
    if causal:
        window = (window[0], 0)
    _require_features(dtype, d, (0, 0), 0.0, num_splits)  # a chunk runs on the local kernels
    sq, sk = shape
    h, h_k = 8, 2
    b = 2
    q = D._rand(dtype, b, sq, h, d)
    k, v = D._rand(dtype, b, sk, h_k, d), D._rand(dtype, b, sk, h_k, d)
    descale = D._descales(dtype, b, h_k)
    kw = dict(causal=causal, window_size=window, attention_chunk=chunk, **descale)
    refs = D._references(q, k, v, **kw)
    what = f"chunk={chunk} causal={causal} window={window} sq={sq} sk={sk} splits={num_splits}"
    out, lse = flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True, **kw)
    D._check(out, lse, refs, what)
    cu_q, cu_k = D._cu_seqlens([sq] * b), D._cu_seqlens([sk] * b)
    outv, _ = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                     num_splits=num_splits, return_attn_probs=True, **kw)
    torch.testing.assert_close(outv.view_as(out).float(), out.float(), atol=0, rtol=0,
                               msg=lambda m: f"{what}: varlen differs from dense: {m}")


@pytest.mark.parametrize("chunk", [16, 300, 8192])
@pytest.mark.parametrize("num_splits", [1, 0])
def test_attention_chunk_decode_kvcache(chunk, num_splits):
    """Decode with a chunk: the query (at each sequence's last position) sees its own chunk's keys only."""
    dtype, b, h, h_k, d, cap = BF16, 4, 16, 4, 128, 4000
    _require_features(dtype, d, (0, 0), 0.0, num_splits)
    q = D._rand(dtype, b, 1, h, d)
    k, v = D._rand(dtype, b, cap, h_k, d), D._rand(dtype, b, cap, h_k, d)
    lengths = D._cache_lengths(b, cap)
    seqlens = D._i32(lengths)
    refs = D._references(q, k, v, cache_seqlens=seqlens, causal=True, attention_chunk=chunk)
    D._poison_cache_tails((k, v), lengths, "nan")
    out, lse, *_ = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, causal=True, attention_chunk=chunk,
                                           num_splits=num_splits, return_softmax_lse=True)
    D._check(out, lse, refs, f"decode chunk={chunk} lengths={lengths}", kvcache=True)
