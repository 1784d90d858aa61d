"""GPU tests of the large head dims (16-bit 192 and 256, and the real dims they serve) and of v head dims
unlike q's (DeepSeek-V3's d 192 / dv 128 and the pairs that run on it), with every mask (none, causal,
sliding window), softcap, sinks, GQA/MQA, varlen, split-KV, PackGQA and the KV cache, dense and paged.

Outputs and LSEs are compared with flash_attn3.reference.attention_ref (float32) under FA3's rule, with the
helpers of tests/test_decode_gpu.py; every `out=` starts as NaN and caches are poisoned past their lengths.
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
import test_paged_gpu as P  # noqa: E402

from flash_attn3 import _ops, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402

BF16, F16 = D.BF16, D.F16
# (d, dv): the compiled 192 and 256 at and below their size (160 -> 192, 224 -> 256), and pairs of the (192,
# 128) and (64, 256) kernels: exact, and smaller real dims of both (136 / 104, 40 / 200).
PAIRS = [(192, 192), (256, 256), (192, 128), (160, 160), (224, 224), (136, 104), (176, 128), (64, 256), (40, 200)]
# Key blocks of the dv != d kernels' causal tiles, unsplit and split (hopper/tile_config.h): their paged calls
# need pages that are multiples of both (no gather variant for dv != d).
DV_PAGE_BLOCKS = {(192, 128): (128, 128), (64, 256): (96, 64)}
SHAPES = [(1, 513), (113, 113), (77, 1023), (1023, 17), (300, 700), (1, 1)]
MASKS = ["full", "causal", "window"]


def _require_pair(dtype, d, dv, num_splits=1, paged=False):
    """Skips a case that needs what this build did not compile (the build record)."""
    if _ops.BUILD.compiled_head_dims(dtype, d, dv) is None:
        pytest.skip(f"no {D._name(dtype)} kernel serves (d, dv) = ({d}, {dv})")
    if num_splits != 1 and not _ops.BUILD.has("split_kv"):
        pytest.skip("split-KV is not built")
    if paged and not _ops.BUILD.has("paged_kv"):
        pytest.skip("paged KV is not built")


CASES = D._grid((PAIRS, MASKS),
                ((SHAPES, 1), ([BF16, F16], 2), ([(4, 4), (8, 2), (6, 1)], 3), ([1, 0, 3], 4), ([0.0, 0.0, 20.0], 5)))


@pytest.mark.parametrize("dims,mask,shape,dtype,heads,num_splits,softcap", CASES,
                         ids=[f"d{c[0][0]}_{c[0][1]}-{c[1]}-sq{c[2][0]}-sk{c[2][1]}-{D._name(c[3])}-h{D._name(c[4])}-"
                              f"splits{c[5]}-cap{c[6]}" for c in CASES])
def test_head_dims(dims, mask, shape, dtype, heads, num_splits, softcap):
    d, dv = dims
    _require_pair(dtype, d, dv, num_splits)
    if mask == "window" and not _ops.BUILD.has("local"):
        pytest.skip("local attention is not built")
    if softcap and not _ops.BUILD.has("softcap"):
        pytest.skip("softcap is not built")
    sq, sk = shape
    h, h_k = heads
    b = 2
    q = D._rand(dtype, b, sq, h, d)
    k, v = D._rand(dtype, b, sk, h_k, d), D._rand(dtype, b, sk, h_k, dv)
    kw = dict(causal=mask == "causal", window_size=(37, 5) if mask == "window" else (-1, -1), softcap=softcap)
    refs = D._references(q, k, v, **kw)
    what = f"d={d} dv={dv} {mask} sq={sq} sk={sk} heads={heads} splits={num_splits} softcap={softcap}"
    out = D._nan_out((b, sq, h, dv), dtype)
    res, lse = flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True, **kw)
    D._check(res, lse, refs, what)
    assert res.shape == (b, sq, h, dv), f"{what}: out shape {tuple(res.shape)}"
    # Packed (varlen) layout of the same batch, into a NaN out=: the same answer per sequence.
    cu_q, cu_k = D._cu_seqlens([sq] * b), D._cu_seqlens([sk] * b)
    out = out.flatten(0, 1)
    outv, lsev = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                        num_splits=num_splits, out=out, return_softmax_lse=True, **kw)
    assert outv.data_ptr() == out.data_ptr(), f"{what}: varlen did not write into out="
    torch.testing.assert_close(outv.view_as(res).float(), res.float(), atol=0, rtol=0,
                               msg=lambda m: f"{what}: varlen differs from dense: {m}")


@pytest.mark.parametrize("dims", [(192, 128), (256, 256), (192, 192), (64, 256)], ids=lambda x: f"d{x[0]}_{x[1]}")
@pytest.mark.parametrize("pack_gqa", [True, False])
def test_pack_gqa_and_sinks(dims, pack_gqa):
    """GQA decode-like rows packed per kv head, with sinks (added by the kernel or, split, by the combine)."""
    d, dv = dims
    _require_pair(BF16, d, dv)
    if not (_ops.BUILD.has("pack_gqa") and _ops.BUILD.has("sinks")):
        pytest.skip("PackGQA or sinks not built")
    b, sq, sk, h, h_k = 3, 3, 777, 16, 2
    q = D._rand(BF16, b, sq, h, d)
    k, v = D._rand(BF16, b, sk, h_k, d), D._rand(BF16, b, sk, h_k, dv)
    sinks = torch.randn(h, device=D.DEVICE) * 3
    refs = D._references(q, k, v, causal=True, sinks=sinks)
    for splits in (1, 0):
        out, lse = flash_attn_func(q, k, v, causal=True, pack_gqa=pack_gqa, num_splits=splits, sinks=sinks,
                                   return_attn_probs=True)
        D._check(out, lse, refs, f"d={d} dv={dv} pack_gqa={pack_gqa} splits={splits}")


@pytest.mark.parametrize("dims", [(192, 128), (256, 256), (192, 192), (160, 160), (64, 256)],
                         ids=lambda x: f"d{x[0]}_{x[1]}")
@pytest.mark.parametrize("page_size", [None, 256, 192, 16])
@pytest.mark.parametrize("num_splits", [1, 0])
def test_kvcache(dims, page_size, num_splits):
    """Decode and chunked prefill against a cache of per-sequence lengths, dense or paged. Pages TMA cannot
    load a key block at a time (16 here) run on the gather variant, which exists for dv == d only: a (192,
    128) call with them is refused with NotImplementedError naming the rule."""
    d, dv = dims
    _require_pair(BF16, d, dv, num_splits, paged=page_size is not None)
    b, h, h_k, cap = 3, 8, 2, 1500
    for sq in (1, 37):
        q = D._rand(BF16, b, sq, h, d)
        k, v = D._rand(BF16, b, cap, h_k, d), D._rand(BF16, b, cap, h_k, dv)
        lengths = D._cache_lengths(b, cap)
        seqlens = D._i32(lengths)
        refs = D._references(q, k, v, cache_seqlens=seqlens, causal=True)
        what = f"d={d} dv={dv} page_size={page_size} sq={sq} splits={num_splits} lengths={lengths}"
        kc, vc, table = k, v, None
        if page_size is not None:
            (kc, vc), table = P._to_pages((k, v), lengths, page_size, "nan")
        D._poison_cache_tails((k, v), lengths, "nan")
        call = dict(cache_seqlens=seqlens, page_table=table, causal=True, num_splits=num_splits,
                    return_softmax_lse=True)
        if page_size is not None and d != dv and any(page_size % n for n in DV_PAGE_BLOCKS[dims]):
            with pytest.raises(NotImplementedError, match=r"paged KV with head_dim_v != head_dim: page_size must "
                                                          r"be a multiple of"):
                flash_attn_with_kvcache(q, kc, vc, **call)
            return
        out, lse, *_ = flash_attn_with_kvcache(q, kc, vc, **call)
        D._check(out, lse, refs, what, kvcache=True)
