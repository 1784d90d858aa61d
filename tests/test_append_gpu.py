"""GPU tests of flash_attn_with_kvcache's KV append (k=, v=, cu_seqlens_k_new) with rotary embedding
(rotary_cos / rotary_sin, both layouts, partial rotary dims, rotary_seqlens), on dense and paged caches, with
cache_batch_idx, GQA, causal and not, and every dtype (FP8 without rotary).

Each call is checked three ways against torch: the cache afterwards holds the old keys untouched and the new
ones (rotated in float32 by torch) at cache_seqlens .. cache_seqlens + s_new - 1 (within one rounding of the
element type; exactly without rotary), nothing outside those positions changed (the poisoned tails stay
poisoned), and the attention output / LSE match the float32 reference of the updated cache with q rotated at
FA3's positions (tests/test_decode_gpu.py's rule).
"""
from __future__ import annotations

import math

import pytest
import torch

from _gpu import skip_reason  # noqa: E402

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

import test_decode_gpu as D  # noqa: E402
from test_paged_gpu import _to_pages  # noqa: E402

from flash_attn3 import _ops, flash_attn_with_kvcache  # noqa: E402

BF16, F16, FP8 = D.BF16, D.F16, D.FP8


def _rotate(x, cos, sin, pos, interleaved):
    """torch reference of the rotary embedding of rows x (..., d) at integer positions pos (x's leading shape)."""
    r = 2 * cos.shape[1]
    c, s = cos[pos].float(), sin[pos].float()
    xf = x.float()
    out = xf.clone()
    if interleaved:
        x0, x1 = xf[..., 0:r:2], xf[..., 1:r:2]
        out[..., 0:r:2], out[..., 1:r:2] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x1, x2 = xf[..., :r // 2], xf[..., r // 2:r]
        out[..., :r // 2], out[..., r // 2:r] = x1 * c - x2 * s, x2 * c + x1 * s
    return out.to(x.dtype)


def _close_to_one_rounding(got, want, what):
    if got.dtype == FP8:
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{what}: bytes differ"
        return
    err = (got.float() - want.float()).abs()
    tol = want.float().abs() * 2 * torch.finfo(want.dtype).eps + 1e-6
    assert (err <= tol).all(), f"{what}: max |cache - expected| = {err.max().item():.3e} beyond one rounding"


CASES = [
    # dtype, page_size, rotary ("none" / "interleaved" / "neox"), rotary fraction, s_new, s_q, causal, varlen_new,
    # batch_idx
    (BF16, None, "neox", 1.0, 1, 1, True, False, False),
    (BF16, None, "interleaved", 0.5, 5, 5, True, False, False),
    (F16, 16, "neox", 0.5, 3, 1, False, False, False),
    (F16, 3, "interleaved", 1.0, 1, 4, True, False, True),
    (BF16, 16, "none", 0.0, 7, 7, True, True, False),
    (BF16, None, "neox", 1.0, 4, 2, False, True, True),
    (FP8, None, "none", 0.0, 2, 2, True, False, False),
    (FP8, 16, "none", 0.0, 1, 1, True, False, True),
    (BF16, 128, "neox", 1.0, 64, 64, True, False, False),
]


@pytest.mark.parametrize("dtype,page_size,rotary,fraction,s_new,s_q,causal,varlen_new,batch_idx", CASES,
                         ids=[f"{D._name(c[0])}-page{c[1]}-{c[2]}{c[3]}-new{c[4]}-sq{c[5]}-{D._name(c[6])}"
                              f"{'-varlen' if c[7] else ''}{'-batchidx' if c[8] else ''}" for c in CASES])
def test_append(dtype, page_size, rotary, fraction, s_new, s_q, causal, varlen_new, batch_idx):
    d, h, h_k, cap, b = 128, 8, 2, 700, 4
    D._require(dtype, d)
    if not _ops.BUILD.has("append_kv"):
        pytest.skip("append_kv is not built")
    rows = b + 2 if batch_idx else b
    idx = torch.randperm(rows)[:b] if batch_idx else torch.arange(b)
    new_lens = [s_new] * b if not varlen_new else [s_new, 0, max(1, s_new // 2), s_new]
    old = [int(torch.randint(0, cap - n + 1, ()).item()) for n in new_lens]
    old[0] = cap - new_lens[0]  # one entry filled to the brim
    q = D._rand(dtype, b, s_q, h, d)
    k_cache, v_cache = D._rand(dtype, rows, cap, h_k, d), D._rand(dtype, rows, cap, h_k, d)
    for i, r in enumerate(idx.tolist()):  # positions past the new end hold poison that must stay
        D._poison(k_cache[r, old[i] + new_lens[i]:], "nan")
        D._poison(v_cache[r, old[i] + new_lens[i]:], "nan")
    if varlen_new:
        k_new = D._rand(dtype, sum(new_lens), h_k, d)
        v_new = D._rand(dtype, sum(new_lens), h_k, d)
        starts = [sum(new_lens[:i]) for i in range(b)]
        new_of = [(k_new[s0:s0 + n], v_new[s0:s0 + n]) for s0, n in zip(starts, new_lens)]
        extra = dict(cu_seqlens_k_new=D._cu_seqlens(new_lens))
    else:
        k_new, v_new = D._rand(dtype, b, s_new, h_k, d), D._rand(dtype, b, s_new, h_k, d)
        new_of = [(k_new[i], v_new[i]) for i in range(b)]
        extra = {}
    rot = {}
    rotary_dim = int(d * fraction) // 16 * 16
    if rotary != "none":
        # Positions for the whole (paged: page-rounded) capacity, as flash_attn_with_kvcache requires.
        angle = torch.rand(cap + 128, rotary_dim // 2, device=D.DEVICE) * 2 * math.pi
        rot = dict(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype),
                   rotary_interleaved=rotary == "interleaved")
    # Expected cache and q, from torch.
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_want = q.clone()
    for i, r in enumerate(idx.tolist()):
        kn, vn = new_of[i]
        n = kn.shape[0]
        if rot:
            pos = torch.arange(old[i], old[i] + n, device=D.DEVICE)
            kn = _rotate(kn, rot["rotary_cos"], rot["rotary_sin"], pos[:, None].expand(n, h_k), rot["rotary_interleaved"])
            qpos = (torch.arange(s_q, device=D.DEVICE) + old[i]) if causal and s_q > 1 else torch.full(
                (s_q,), old[i], device=D.DEVICE)
            q_want[i] = _rotate(q[i], rot["rotary_cos"], rot["rotary_sin"], qpos[:, None].expand(s_q, h),
                                rot["rotary_interleaved"])
        k_want[r, old[i]:old[i] + n] = kn
        v_want[r, old[i]:old[i] + n] = vn
    lengths = [o + n for o, n in zip(old, new_lens)]
    descale = D._descales(dtype, b, h_k)
    gathered = (k_want[idx.to(D.DEVICE)].clone(), v_want[idx.to(D.DEVICE)].clone())
    for t in gathered:  # the reference gets clean rows past the lengths (they are masked anyway)
        for i, n in enumerate(lengths):
            t[i, n:] = 0
    refs = D._references(q_want, *gathered, cache_seqlens=D._i32(lengths), causal=causal, **descale)

    kw = dict(cache_seqlens=D._i32(old), causal=causal, return_softmax_lse=True, **descale, **extra, **rot)
    if batch_idx:
        kw["cache_batch_idx"] = D._i32(idx.tolist())
    if page_size:
        (k_pages, v_pages), table = _to_pages((k_cache, v_cache), [cap] * rows, page_size, "nan")
        out, lse, *_ = flash_attn_with_kvcache(q, k_pages, v_pages, k=k_new, v=v_new, page_table=table, **kw)
        max_pages = table.shape[1]
        k_after = k_pages[table.long().clamp(0)].reshape(rows, max_pages * page_size, h_k, d)[:, :cap]
        v_after = v_pages[table.long().clamp(0)].reshape(rows, max_pages * page_size, h_k, d)[:, :cap]
    else:
        out, lse, *_ = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, **kw)
        k_after, v_after = k_cache, v_cache
    what = f"append old={old} new={new_lens} page_size={page_size} rotary={rotary}:{rotary_dim}"
    for i, r in enumerate(idx.tolist()):
        end = lengths[i]
        _close_to_one_rounding(k_after[r, :end], k_want[r, :end], f"{what}: k_cache row {r}")
        _close_to_one_rounding(v_after[r, :end], v_want[r, :end], f"{what}: v_cache row {r}")
        if end < cap:  # untouched past the new end: still poison
            tail = k_after[r, end:]
            untouched = (tail.view(torch.uint8) == D.FP8_NAN_BYTE).all() if dtype == FP8 else torch.isnan(tail).all()
            assert untouched, f"{what}: cache past the new end was written"
    D._check(out, lse, refs, what, kvcache=True)
