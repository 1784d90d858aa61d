"""flash_attn3.reference.attention_ref / combine_ref against an independent float64 loop (CPU, no kernels).

`naive_attention` below shares no code with the reference: it gathers every key position one by one
(page by page for paged caches), decides visibility per (query, key) pair, and computes max / exp / sum per
row in Python floats. Each test draws fresh random inputs and small sizes so the loop stays fast.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from flash_attn3.reference import attention_ref, combine_ref, visible_keys

FP8 = torch.float8_e4m3fn


def _np(x):
    return None if x is None else x.to(torch.float64).numpy() if x.is_floating_point() else x.numpy()


def _ints(x, n):
    if x is None:
        return None
    return [int(x)] * n if isinstance(x, int) else [int(t) for t in x.tolist()]


def naive_attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                    causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=None, page_table=None,
                    cache_batch_idx=None, leftpad_k=None, k_new=None, v_new=None, cu_seqlens_k_new=None,
                    q_descale=None, k_descale=None, v_descale=None):
    """Float64 loop: per batch, per query row, per head, an explicit pass over the keys."""
    Q, K, V = (x.float().to(torch.float64).numpy() for x in (q, k, v))
    KN = None if k_new is None else k_new.float().to(torch.float64).numpy()
    VN = None if v_new is None else v_new.float().to(torch.float64).numpy()
    qd, kd, vd = _np(q_descale), _np(k_descale), _np(v_descale)
    h, d = Q.shape[-2], Q.shape[-1]
    hk, dv = K.shape[-2], V.shape[-1]
    batch = cu_seqlens_q.numel() - 1 if cu_seqlens_q is not None else Q.shape[0]
    cu_q, cu_k, cu_n = _ints(cu_seqlens_q, 0), _ints(cu_seqlens_k, 0), _ints(cu_seqlens_k_new, 0)
    used_q, used_k = _ints(seqused_q, batch), _ints(seqused_k, batch)
    pad, rows_k = _ints(leftpad_k, batch), _ints(cache_batch_idx, batch)
    pt = None if page_table is None else page_table.tolist()
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0

    out = np.zeros(Q.shape[:-1] + (dv,))
    lse = np.full((h, Q.shape[0]) if cu_q else (batch, h, Q.shape[1]), -np.inf)
    for b in range(batch):
        q_index = [(t,) for t in range(cu_q[b], cu_q[b + 1])] if cu_q else [(b, t) for t in range(Q.shape[1])]
        if used_q:
            q_index = q_index[:used_q[b]]
        r = rows_k[b] if rows_k else b
        if pt is not None:
            page_size = K.shape[1]
            n_pos = len(pt[r]) * page_size
            where = [(pt[r][p // page_size], p % page_size) for p in range(n_pos)]
        elif cu_k:
            where = [(cu_k[b] + p,) for p in range(cu_k[b + 1] - cu_k[b])]
        else:
            where = [(r, p) for p in range(K.shape[1])]
        end = used_k[b] if used_k else len(where)
        start = pad[b] if pad else 0
        keys = [K[w] for w in where[start:end]]
        vals = [V[w] for w in where[start:end]]
        if KN is not None:
            new = range(cu_n[b], cu_n[b + 1]) if cu_n else range(KN.shape[1])
            for t in new:
                keys.append(KN[t] if cu_n else KN[b, t])
                vals.append(VN[t] if cu_n else VN[b, t])
        sq, sk = len(q_index), len(keys)
        for i, qi in enumerate(q_index):
            for head in range(h):
                kvh = head // (h // hk)
                qv = Q[qi][head] * (qd[b, kvh] if qd is not None else 1.0)
                scores, vs = [], []
                for j in range(sk):
                    if left >= 0 and j < i + sk - sq - left:
                        continue
                    if right >= 0 and j > i + sk - sq + right:
                        continue
                    kv = keys[j][kvh] * (kd[b, kvh] if kd is not None else 1.0)
                    s = float(np.dot(qv, kv)) * scale
                    if softcap > 0:
                        s = math.tanh(s / softcap) * softcap
                    scores.append(s)
                    vs.append(vals[j][kvh] * (vd[b, kvh] if vd is not None else 1.0))
                if not scores:
                    continue
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                out[qi][head] = sum(w * x for w, x in zip(weights, vs)) / total
                if cu_q:
                    lse[head, qi[0]] = m + math.log(total)
                else:
                    lse[b, head, qi[1]] = m + math.log(total)
    return torch.from_numpy(out), torch.from_numpy(lse)


def check_against_naive(q, k, v, atol=2e-5, **kw):
    out, lse = attention_ref(q, k, v, **kw)
    for key in ("max_seqlen_q", "max_seqlen_k", "reorder_ops", "upcast"):  # no effect in float64
        kw.pop(key, None)
    if "cache_seqlens" in kw:
        kw["seqused_k"] = kw.pop("cache_seqlens")
    exp_out, exp_lse = naive_attention(q, k, v, **kw)
    assert out.dtype in (torch.float32, torch.float64), "upcast=True must return fp32/fp64 out"
    assert lse.dtype in (torch.float32, torch.float64)
    assert out.shape == exp_out.shape and lse.shape == exp_lse.shape
    torch.testing.assert_close(out.to(torch.float64), exp_out, atol=atol, rtol=1e-5)
    torch.testing.assert_close(lse.to(torch.float64), exp_lse, atol=atol, rtol=1e-5)
    return out, lse


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def random_lengths(batch, max_len, allow_empty=True):
    """Random lengths that always include a 1 and (if allowed) a 0 when batch is large enough."""
    lens = [random.randint(0 if allow_empty else 1, max_len) for _ in range(batch)]
    if batch >= 2:
        lens[0] = 1
    if batch >= 3 and allow_empty:
        lens[1] = 0
    random.shuffle(lens)
    return lens


def cu(lens):
    return torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("b,sq,sk,h,hk,d,dv", [
    (1, 1, 1, 1, 1, 8, 8),
    (2, 5, 7, 4, 2, 16, 16),
    (2, 7, 3, 3, 1, 8, 16),   # MQA, seqlen_q > seqlen_k, dv != d
    (3, 4, 4, 6, 3, 24, 8),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense(b, sq, sk, h, hk, d, dv, causal, dtype):
    q, k, v = rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, dv, dtype=dtype)
    out, _ = check_against_naive(q, k, v, causal=causal, atol=1e-9 if dtype == torch.float64 else 2e-5)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_dense_matches_sdpa():
    b, s, h, d = 2, 9, 4, 32
    q, k, v = rand(b, s, h, d), rand(b, s, h, d), rand(b, s, h, d)
    for causal in (False, True):
        out, _ = attention_ref(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq,sk", [(6, 2), (5, 1), (4, 0)])
def test_causal_more_queries_than_keys_gives_empty_rows(sq, sk):
    q, k, v = rand(1, sq, 2, 8), rand(1, sk, 2, 8), rand(1, sk, 2, 8)
    out, lse = check_against_naive(q, k, v, causal=True)
    empty = sq - sk  # bottom-right alignment: the first sq - sk queries see no key
    assert torch.all(out[0, :empty] == 0)
    assert torch.all(torch.isneginf(lse[0, :, :empty]))
    assert torch.all(torch.isfinite(lse[0, :, empty:]))


@pytest.mark.parametrize("window", [(2, 0), (0, 2), (3, 1), (-1, 2), (1, -1), (0, 0), (-1, 0)])
@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (6, 6)])
def test_window(window, sq, sk):
    q, k, v = rand(2, sq, 2, 8), rand(2, sk, 1, 8), rand(2, sk, 1, 8)
    check_against_naive(q, k, v, window_size=window)


def test_causal_equals_window_left_unbounded_right_zero():
    q, k, v = rand(2, 6, 2, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    a = attention_ref(q, k, v, causal=True)
    b = attention_ref(q, k, v, window_size=(-1, 0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = attention_ref(q, k, v, causal=True, window_size=(2, 5))  # causal forces right = 0
    e = attention_ref(q, k, v, window_size=(2, 0))
    torch.testing.assert_close(c, e, atol=0, rtol=0)


@pytest.mark.parametrize("softcap", [0.5, 5.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(softcap, causal):
    q, k, v = 3 * rand(2, 5, 4, 16), 3 * rand(2, 6, 2, 16), rand(2, 6, 2, 16)
    check_against_naive(q, k, v, softcap=softcap, causal=causal, softmax_scale=0.7)


def test_softcap_changes_result():
    q, k, v = 3 * rand(1, 4, 1, 8), 3 * rand(1, 4, 1, 8), rand(1, 4, 1, 8)
    a, _ = attention_ref(q, k, v)
    b, _ = attention_ref(q, k, v, softcap=0.3)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("scale", [0.0, -0.3, -2.0, 1e-8])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)), (True, (3, 0))])
@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5), (1, 4)])
def test_any_finite_softmax_scale(scale, causal, window, sq, sk):
    """0, negative and tiny scales are valid maths; the reference must agree with the float64 loop for them."""
    q, k, v = 3 * rand(2, sq, 4, 16), 3 * rand(2, sk, 2, 16), rand(2, sk, 2, 16)
    out, lse = check_against_naive(q, k, v, softmax_scale=scale, causal=causal, window_size=window)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def _visible_count_and_mean(v, sq, sk, causal, window):
    """Per query row (bottom-right aligned), how many keys it sees and the plain mean of their values, from an
    explicit loop over (row, key) pairs: what attention with softmax_scale = 0 must return."""
    left, right = window
    if causal:
        right = 0
    counts = torch.zeros(sq, dtype=torch.float64)
    means = torch.zeros(sq, *v.shape[1:], dtype=torch.float64)
    for i in range(sq):
        seen = [j for j in range(sk) if not (left >= 0 and j < i + sk - sq - left)
                and not (right >= 0 and j > i + sk - sq + right)]
        counts[i] = len(seen)
        if seen:
            means[i] = v[seen].to(torch.float64).mean(dim=0)
    return counts, means


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (1, 2)), (False, (0, 0))])
@pytest.mark.parametrize("sq,sk", [(4, 7), (7, 4), (3, 3)])
def test_scale_zero_is_mean_of_visible_values(causal, window, sq, sk):
    """softmax_scale = 0 makes every score 0: out = mean of v over the visible keys, lse = log(count), and a row
    that sees no key still gets out = 0, lse = -inf."""
    h = 2
    q, k, v = rand(1, sq, h, 8), rand(1, sk, h, 8), rand(1, sk, h, 16)
    out, lse = attention_ref(q, k, v, softmax_scale=0.0, causal=causal, window_size=window)
    counts, means = _visible_count_and_mean(v[0], sq, sk, causal, window)
    torch.testing.assert_close(out[0].to(torch.float64), means, atol=1e-6, rtol=1e-6)
    expected_lse = torch.log(counts).unsqueeze(0).expand(h, sq)  # log(0) = -inf for rows without keys
    torch.testing.assert_close(lse[0].to(torch.float64), expected_lse, atol=1e-6, rtol=1e-6)


def test_scale_zero_varlen_and_low_precision():
    lq, lk = [3, 0, 4], [5, 2, 0]
    q, k, v = rand(sum(lq), 2, 8), rand(sum(lk), 1, 8), rand(sum(lk), 1, 8)
    kw = dict(cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), softmax_scale=0.0, causal=True)
    out, lse = check_against_naive(q, k, v, **kw)
    low, _ = attention_ref(q.half(), k.half(), v.half(), upcast=False, **kw)
    assert low.dtype == torch.float16 and not torch.isnan(low).any()
    torch.testing.assert_close(low.float(), out, atol=2e-3, rtol=2e-3)


def test_negative_scale_equals_negated_queries():
    """softmax(-s · q kᵀ) = softmax(s · (-q) kᵀ): a negative scale prefers the least similar keys."""
    q, k, v = rand(2, 5, 2, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8)
    a = attention_ref(q, k, v, softmax_scale=-0.4, causal=True)
    b = attention_ref(-q, k, v, softmax_scale=0.4, causal=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    far = attention_ref(q, k, v, softmax_scale=-50.0)[0]
    near = attention_ref(q, k, v, softmax_scale=50.0)[0]
    assert not torch.allclose(far, near)


@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_softcap_with_non_positive_scale(scale):
    q, k, v = 3 * rand(2, 5, 2, 16), 3 * rand(2, 6, 2, 16), rand(2, 6, 2, 16)
    check_against_naive(q, k, v, softcap=2.0, softmax_scale=scale, causal=True)


# ---------------------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,hk", [(2, 2), (4, 1)])
def test_varlen(batch, causal, h, hk):
    lq, lk = random_lengths(batch, 6), random_lengths(batch, 8)
    q = rand(sum(lq) + 2, h, 8)  # two trailing rows belong to no sequence
    k, v = rand(sum(lk), hk, 8), rand(sum(lk), hk, 16)
    out, lse = check_against_naive(q, k, v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=max(lq),
                                   max_seqlen_k=max(lk), causal=causal)
    assert lse.shape == (h, q.shape[0]) and out.shape == (q.shape[0], h, 16)
    assert torch.all(out[-2:] == 0) and torch.all(torch.isneginf(lse[:, -2:]))
    for i in range(batch):  # a sequence without keys: out 0, lse -inf
        if lk[i] == 0:
            assert torch.all(out[cu(lq)[i]:cu(lq)[i + 1]] == 0)


@pytest.mark.parametrize("use_q,use_k", [(True, False), (False, True), (True, True)])
def test_varlen_seqused(use_q, use_k):
    batch = 4
    lq, lk = random_lengths(batch, 6, allow_empty=False), random_lengths(batch, 7, allow_empty=False)
    q, k, v = rand(sum(lq), 2, 8), rand(sum(lk), 2, 8), rand(sum(lk), 2, 8)
    sq = torch.tensor([random.randint(0, n) for n in lq], dtype=torch.int32) if use_q else None
    sk = torch.tensor([random.randint(0, n) for n in lk], dtype=torch.int32) if use_k else None
    out, lse = check_against_naive(q, k, v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), seqused_q=sq,
                                   seqused_k=sk, causal=True)
    if use_q:  # unused rows: out 0, lse -inf
        for i in range(batch):
            lo, hi = int(cu(lq)[i]) + int(sq[i]), int(cu(lq)[i + 1])
            assert torch.all(out[lo:hi] == 0) and torch.all(torch.isneginf(lse[:, lo:hi]))


def test_dense_q_with_seqused():
    q, k, v = rand(3, 5, 2, 8), rand(3, 6, 2, 8), rand(3, 6, 2, 8)
    check_against_naive(q, k, v, seqused_q=torch.tensor([5, 0, 2], dtype=torch.int32),
                        seqused_k=torch.tensor([1, 6, 0], dtype=torch.int32), causal=True)


def test_dense_q_varlen_k():
    lk = [3, 0, 5]
    q, k, v = rand(3, 4, 2, 8), rand(sum(lk), 1, 8), rand(sum(lk), 1, 8)
    check_against_naive(q, k, v, cu_seqlens_k=cu(lk), max_seqlen_k=5, window_size=(1, 1))


def test_varlen_matches_dense_per_sequence():
    lq, lk = [3, 5], [4, 6]
    q, k, v = rand(sum(lq), 2, 8), rand(sum(lk), 2, 8), rand(sum(lk), 2, 8)
    out, lse = attention_ref(q, k, v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), causal=True)
    for i in range(2):
        qs, ks = slice(cu(lq)[i], cu(lq)[i + 1]), slice(cu(lk)[i], cu(lk)[i + 1])
        o1, l1 = attention_ref(q[qs][None], k[ks][None], v[ks][None], causal=True)
        torch.testing.assert_close(out[qs], o1[0])
        torch.testing.assert_close(lse[:, qs], l1[0])


# -------------------------------------------------------------------------------------------- kv cache


@pytest.mark.parametrize("page_size", [1, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_kv(page_size, causal):
    batch, max_pages, hk = 3, 4, 2
    num_pages = batch * max_pages + 2
    k_cache, v_cache = rand(num_pages, page_size, hk, 8), rand(num_pages, page_size, hk, 16)
    page_table = torch.randperm(num_pages)[:batch * max_pages].reshape(batch, max_pages).to(torch.int32)
    cap = max_pages * page_size
    cache_seqlens = torch.tensor([random.randint(0, cap) for _ in range(batch)], dtype=torch.int32)
    q = rand(batch, 2, 4, 8)
    check_against_naive(q, k_cache, v_cache, page_table=page_table, cache_seqlens=cache_seqlens, causal=causal)


def test_paged_kv_equals_contiguous_cache():
    page_size, pages = 3, 3
    k_cache, v_cache = rand(pages * 2, page_size, 1, 8), rand(pages * 2, page_size, 1, 8)
    page_table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    k_dense = k_cache[page_table.long()].reshape(2, pages * page_size, 1, 8)
    v_dense = v_cache[page_table.long()].reshape(2, pages * page_size, 1, 8)
    q = rand(2, 3, 2, 8)
    seqlens = torch.tensor([7, 2], dtype=torch.int32)
    a = attention_ref(q, k_cache, v_cache, page_table=page_table, cache_seqlens=seqlens, causal=True)
    b = attention_ref(q, k_dense, v_dense, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("int_seqlens", [False, True])
def test_cache_seqlens_leftpad_batch_idx(paged, int_seqlens):
    batch, cache_rows, s_cache, hk = 3, 5, 9, 2
    q = rand(batch, 2, 4, 8)
    leftpad = torch.tensor([random.randint(0, 3) for _ in range(batch)], dtype=torch.int32)
    if int_seqlens:
        seqlens = 7
    else:
        seqlens = torch.tensor([random.randint(4, s_cache) for _ in range(batch)], dtype=torch.int32)
    batch_idx = torch.randperm(cache_rows)[:batch].to(torch.int32)
    if paged:
        page_size = 3
        pages = s_cache // page_size
        k_cache, v_cache = rand(cache_rows * pages, page_size, hk, 8), rand(cache_rows * pages, page_size, hk, 8)
        page_table = torch.randperm(cache_rows * pages).reshape(cache_rows, pages).to(torch.int32)
        check_against_naive(q, k_cache, v_cache, page_table=page_table, cache_seqlens=seqlens,
                            cache_batch_idx=batch_idx, leftpad_k=leftpad, causal=True)
    else:
        k_cache, v_cache = rand(cache_rows, s_cache, hk, 8), rand(cache_rows, s_cache, hk, 8)
        check_against_naive(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                            leftpad_k=leftpad, causal=True)


@pytest.mark.parametrize("varlen_new", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_append_k_new(varlen_new, causal):
    batch, s_cache, hk = 3, 8, 2
    k_cache, v_cache = rand(batch, s_cache, hk, 8), rand(batch, s_cache, hk, 8)
    seqlens = torch.tensor([2, 0, 5], dtype=torch.int32)
    q = rand(batch, 2, 4, 8)
    if varlen_new:
        ln = [1, 3, 2]
        kn, vn, cu_new = rand(sum(ln), hk, 8), rand(sum(ln), hk, 8), cu(ln)
    else:
        kn, vn, cu_new = rand(batch, 2, hk, 8), rand(batch, 2, hk, 8), None
    k_before, v_before = k_cache.clone(), v_cache.clone()
    check_against_naive(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=kn, v_new=vn,
                        cu_seqlens_k_new=cu_new, causal=causal)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before), "reference must not mutate"


def test_append_equals_writing_into_cache():
    k_cache, v_cache = rand(2, 8, 1, 8), rand(2, 8, 1, 8)
    kn, vn = rand(2, 2, 1, 8), rand(2, 2, 1, 8)
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    q = rand(2, 2, 2, 8)
    a = attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=kn, v_new=vn, causal=True)
    k2, v2 = k_cache.clone(), v_cache.clone()
    for b in range(2):
        s = int(seqlens[b])
        k2[b, s:s + 2], v2[b, s:s + 2] = kn[b], vn[b]
    b_ = attention_ref(q, k2, v2, cache_seqlens=seqlens + 2, causal=True)
    torch.testing.assert_close(a, b_, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("with_descale", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_descale(with_descale, causal):
    b, hk, h = 2, 2, 4
    q, k, v = rand(b, 5, h, 16, dtype=FP8), rand(b, 6, hk, 16, dtype=FP8), rand(b, 6, hk, 16, dtype=FP8)
    ds = {}
    if with_descale:
        ds = {name: torch.rand(b, hk) + 0.5 for name in ("q_descale", "k_descale", "v_descale")}
    out, _ = check_against_naive(q, k, v, causal=causal, **ds)
    low, _ = attention_ref(q, k, v, causal=causal, upcast=False, **ds)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, atol=0.1, rtol=0.1)


def test_fp8_descale_is_elementwise_scaling():
    q, k, v = rand(1, 3, 2, 16), rand(1, 4, 1, 16), rand(1, 4, 1, 16)
    q8, k8, v8 = q.to(FP8), k.to(FP8), v.to(FP8)
    qs, ks, vs = torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.tensor([[3.0]])
    a, la = attention_ref(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)
    b, lb = attention_ref(q8.float() * 0.5, k8.float() * 2.0, v8.float() * 3.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


# ----------------------------------------------------------------------------------- precision switches


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_upcast_false_close_to_upcast(dtype, causal):
    q, k, v = rand(2, 16, 4, 32, dtype=dtype), rand(2, 20, 2, 32, dtype=dtype), rand(2, 20, 2, 32, dtype=dtype)
    hi, lse_hi = attention_ref(q, k, v, causal=causal)
    lo, lse_lo = attention_ref(q, k, v, causal=causal, upcast=False)
    assert hi.dtype == torch.float32 and lo.dtype == dtype and lse_lo.dtype == torch.float32
    err = (lo.float() - hi).abs().max().item()
    assert 0 < err < (0.02 if dtype == torch.float16 else 0.1)
    torch.testing.assert_close(lse_lo, lse_hi, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reorder_ops(dtype):
    q, k, v = rand(2, 7, 2, 16, dtype=dtype), rand(2, 9, 2, 16, dtype=dtype), rand(2, 9, 2, 16, dtype=dtype)
    a, la = attention_ref(q, k, v, causal=True, softmax_scale=0.3)
    b, lb = check_against_naive(q, k, v, causal=True, softmax_scale=0.3, reorder_ops=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    lo_a, _ = attention_ref(q, k, v, causal=True, softmax_scale=0.3, upcast=False)
    lo_b, _ = attention_ref(q, k, v, causal=True, softmax_scale=0.3, upcast=False, reorder_ops=True)
    if dtype == torch.bfloat16:  # in low precision the order of a non-power-of-2 scaling is visible
        assert not torch.equal(lo_a, lo_b)


def test_does_not_mutate_inputs():
    q, k, v = rand(2, 4, 2, 8), rand(2, 5, 2, 8), rand(2, 5, 2, 8)
    copies = [t.clone() for t in (q, k, v)]
    attention_ref(q, k, v, causal=True, softcap=1.0)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


# ---------------------------------------------------------------------------------------------- combine


@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("empty_split", [False, True])
def test_combine_ref_equals_attention_over_concatenated_splits(num_splits, empty_split):
    b, sq, h, d = 2, 3, 2, 8
    lens = [random.randint(1, 4) for _ in range(num_splits)]
    if empty_split:
        lens[random.randrange(num_splits)] = 0
    q = rand(b, sq, h, d)
    ks = [rand(b, n, h, d) for n in lens]
    vs = [rand(b, n, h, d) for n in lens]
    parts = [attention_ref(q, k_, v_) for k_, v_ in zip(ks, vs)]
    out_partial = torch.stack([o for o, _ in parts])  # (splits, b, s, h, d)
    lse_partial = torch.stack([lse_.transpose(1, 2) for _, lse_ in parts])  # (splits, b, s, h)
    out, lse = combine_ref(out_partial, lse_partial)
    full_out, full_lse = check_against_naive(q, torch.cat(ks, 1), torch.cat(vs, 1))
    if sum(lens) == 0:
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    else:
        torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, full_lse.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_combine_ref_ignores_garbage_in_empty_splits():
    out_partial = torch.stack([torch.full((1, 2, 1, 4), float("nan")), torch.ones(1, 2, 1, 4)])
    lse_partial = torch.tensor([[[[float("-inf")], [float("-inf")]]], [[[0.5], [float("-inf")]]]])
    out, lse = combine_ref(out_partial, lse_partial)
    assert torch.equal(out[0, 0], torch.ones(1, 4)) and torch.all(out[0, 1] == 0)
    assert lse[0, 0, 0].item() == pytest.approx(0.5) and torch.isneginf(lse[0, 1, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: reference-on-GPU check skipped")
def test_reference_runs_on_cuda():
    q, k, v = rand(2, 4, 2, 8), rand(2, 5, 1, 8), rand(2, 5, 1, 8)
    a = attention_ref(q, k, v, causal=True)
    b = attention_ref(q.cuda(), k.cuda(), v.cuda(), causal=True)
    torch.testing.assert_close(b[0].cpu(), a[0])
    torch.testing.assert_close(b[1].cpu(), a[1])


@pytest.mark.parametrize("sink_value", [-30.0, 0.0, 3.0, 40.0])
def test_sinks_join_the_denominator(sink_value):
    """attention_ref(sinks=) equals a softmax over the keys plus one extra logit per head that attends to
    nothing (written out here by hand), and the LSE includes it; rows that see no key get lse = sink, out = 0."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    sinks = torch.tensor([sink_value, -sink_value])
    out, lse = attention_ref(q, k, v, sinks=sinks, causal=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 16 ** -0.5
    visible = torch.ones(5, 7, dtype=torch.bool).tril(7 - 5)
    scores = scores.masked_fill(~visible, float("-inf"))
    full = torch.cat([scores, sinks.view(1, 2, 1, 1).expand(1, 2, 5, 1)], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :7]
    want = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(full, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 17), (17, 5), (33, 33), (1, 40)])
@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (4, 0), (2, 5)])
def test_visible_keys_chunk_is_the_definition(sq, sk, chunk, window):
    """attention_chunk: query i (aligned position p = i + sk - sq) sees key j iff the window admits it and
    floor(p / chunk) == floor(j / chunk), written out element by element."""
    got = visible_keys(sq, sk, *window, attention_chunk=chunk)
    for i in range(sq):
        p = i + sk - sq
        for j in range(sk):
            ok = (window[0] < 0 or j >= p - window[0]) and (window[1] < 0 or j <= p + window[1])
            ok = ok and math.floor(p / chunk) == j // chunk
            assert bool(got[i, j]) == ok, (i, j)


def test_attention_chunk_splits_a_causal_sequence_into_independent_ones():
    """Causal attention with chunk c over a sequence of length n (sq == sk) equals causal attention run on
    each chunk of c positions alone."""
    torch.manual_seed(0)
    n, c, h, d = 23, 8, 2, 16
    q, k, v = (torch.randn(1, n, h, d, dtype=torch.float64) for _ in range(3))
    out, lse = attention_ref(q, k, v, causal=True, attention_chunk=c)
    for s in range(0, n, c):
        e = min(s + c, n)
        o, l = attention_ref(q[:, s:e], k[:, s:e], v[:, s:e], causal=True)
        torch.testing.assert_close(out[:, s:e], o)
        torch.testing.assert_close(lse[:, :, s:e], l)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("sq", [1, 3, 9])
def test_context_parallel_ranks_merge_to_full_causal(world, sq):
    """Context parallelism (vLLM fork's cp_* arguments): deal each sequence's keys round-robin over `world`
    ranks (global key g to rank g % world, local index g // world), run every rank's share with cp_rank /
    cp_tot_seqused_k, and merge the ranks' (out, lse) with combine_ref: that is causal attention over all the
    keys. Lengths per sequence differ, one shorter than the world (ranks with no key) and one shorter than sq
    (rows that see nothing on every rank)."""
    b, h, hk, d = 3, 4, 2, 8
    totals = [random.randint(world + sq, 40), random.randint(1, world - 1), random.randint(1, sq) if sq > 1 else 1]
    t_max = max(totals)
    q = torch.randn(b, sq, h, d, dtype=torch.float64)
    k = torch.randn(b, t_max, hk, d, dtype=torch.float64)
    v = torch.randn(b, t_max, hk, d, dtype=torch.float64)
    total_t = torch.tensor(totals, dtype=torch.int32)
    outs, lses = [], []
    for rank in range(world):
        local_len = torch.tensor([max(0, -(-(t - rank) // world)) for t in totals], dtype=torch.int32)
        o, l = attention_ref(q, k[:, rank::world], v[:, rank::world], seqused_k=local_len, causal=True,
                             cp_world_size=world, cp_rank=rank, cp_tot_seqused_k=total_t)
        outs.append(o)
        lses.append(l.transpose(1, 2))
    out, lse = combine_ref(torch.stack(outs), torch.stack(lses))
    want_out, want_lse = attention_ref(q, k, v, seqused_k=total_t, causal=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse.transpose(1, 2))


@pytest.mark.parametrize("sq,sk,total", [(1, 5, 17), (4, 3, 9), (6, 2, 7), (3, 4, 12)])
@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2), (4, 1)])
def test_visible_keys_context_parallel_is_the_definition(sq, sk, total, world, rank):
    """Causal with context parallelism: query i sees local key j iff j * world + rank <= i + total - sq."""
    got = visible_keys(sq, sk, -1, 0, cp_world_size=world, cp_rank=rank, cp_seqlen_k=total)
    for i in range(sq):
        for j in range(sk):
            assert bool(got[i, j]) == (j * world + rank <= i + total - sq), (i, j)


def test_context_parallel_world_one_ignores_the_total():
    q, k, v = rand(2, 3, 2, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8)
    a = attention_ref(q, k, v, causal=True)
    b_ = attention_ref(q, k, v, causal=True, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=99)
    torch.testing.assert_close(a[0], b_[0])
    torch.testing.assert_close(a[1], b_[1])
    with pytest.raises(ValueError, match="cp_rank"):
        attention_ref(q, k, v, causal=True, cp_world_size=2, cp_rank=2, cp_tot_seqused_k=12)
    with pytest.raises(ValueError, match="cp_tot_seqused_k"):
        attention_ref(q, k, v, causal=True, cp_world_size=2, cp_rank=1)
