"""GPU tests of the KV-cache addressing of flash_attn_with_kvcache / varlen_fwd: paged caches (page_table, any
page size), cache_batch_idx (kv_batch_idx) and cache_leftpad (leftpad_k), alone and combined, with split-KV,
PackGQA, GQA, causal, varlen q and every dtype.

Every paged call is checked twice: against the float32 reference of the same attention (FA3's rule, as in
tests/test_decode_gpu.py, whose helpers this module uses), and bit for bit against the same call on a dense
cache holding the same keys, which the kernel must reproduce exactly (the paged path only changes where the
rows come from). Unused memory is poisoned: pages no sequence uses, the slots of a sequence's last page past
its length, and the page-table entries past a sequence's pages (garbage indices, in or out of range, which
must not be dereferenced). cache_batch_idx / cache_leftpad are checked against the dense call on the cache
rows rearranged by torch (gathered rows; rows shifted so that the padding is gone).
"""
from __future__ import annotations

import math

import pytest
import torch

from _gpu import capture_graph, skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

import test_decode_gpu as D  # noqa: E402  (the decode tests' inputs, references and checks)

from flash_attn3 import _ops, flash_attn_with_kvcache, varlen_fwd  # noqa: E402

BF16, F16, FP8 = D.BF16, D.F16, D.FP8
PAGE_SIZES = [1, 3, 16, 64, 128, 256]
GARBAGE_INDEX = [2**31 - 1, -1, -(2**31), 12345]  # written into page-table entries that must not be read


def _require_paged(dtype, d, num_splits=1):
    D._require(dtype, d, num_splits)
    for feat in ("paged_kv", "kv_batch_idx", "leftpad_k"):
        if not _ops.BUILD.has(feat):
            pytest.skip(f"{feat} is not built")


def _to_pages(dense, lengths, page_size, poison, extra_pages=3):
    """Scatters the dense caches (b, cap, h_k, d) into paged caches (num_pages, page_size, h_k, d) through a
    random page table; returns (paged caches, page_table). Pages are assigned in random order from a pool
    with spare pages; unused pages, unused slots and the table entries past each sequence's pages are
    poisoned / garbage."""
    b, cap = dense[0].shape[:2]
    max_pages = math.ceil(cap / page_size)
    used = [math.ceil(n / page_size) for n in lengths]
    num_pages = sum(used) + extra_pages
    perm = torch.randperm(num_pages).tolist()
    table = torch.empty(b, max_pages, dtype=torch.int32)
    garbage = torch.tensor(GARBAGE_INDEX * (b * max_pages // len(GARBAGE_INDEX) + 1), dtype=torch.int32)
    table.copy_(garbage[:b * max_pages].view(b, max_pages))
    paged = []
    for t in dense:
        p = torch.empty(num_pages, page_size, *t.shape[2:], dtype=t.dtype, device=t.device)
        D._poison(p, poison)
        paged.append(p)
    nxt = 0
    for i, n in enumerate(lengths):
        for j in range(used[i]):
            page = perm[nxt]
            nxt += 1
            table[i, j] = page
            rows = min(page_size, n - j * page_size)
            for p, t in zip(paged, dense):
                p[page, :rows] = t[i, j * page_size:j * page_size + rows]
    return paged, table.to(D.DEVICE)


PAGED_CASES = D._grid(
    (PAGE_SIZES, [False, True]),
    (([BF16, F16, FP8, BF16], 1), ([1, 0, 3], 1), ([1, 4, 64], 2), ([128, 64, 96], 3), ([(8, 2), (4, 4), (16, 1)], 5),
     ([1000, 3000, 200], 2), (D.POISON, 1)))


@pytest.mark.parametrize("page_size,causal,dtype,num_splits,s_q,d,heads,cap,poison", PAGED_CASES,
                         ids=[f"page{c[0]}-{D._name(c[1])}-{D._name(c[2])}-splits{c[3]}-sq{c[4]}-d{c[5]}-"
                              f"h{D._name(c[6])}-cap{c[7]}-{c[8]}" for c in PAGED_CASES])
def test_paged_matches_dense(page_size, causal, dtype, num_splits, s_q, d, heads, cap, poison):
    _require_paged(dtype, d, num_splits)
    h, h_k = heads
    b = 4
    q = D._rand(dtype, b, s_q, h, d)
    k, v = D._rand(dtype, b, cap, h_k, d), D._rand(dtype, b, cap, h_k, d)
    lengths = D._cache_lengths(b, cap)
    seqlens = D._i32(lengths)
    descale = D._descales(dtype, b, h_k)
    refs = D._references(q, k, v, cache_seqlens=seqlens, causal=causal, **descale)
    (k_pages, v_pages), table = _to_pages((k, v), lengths, page_size, poison)
    D._poison_cache_tails((k, v), lengths, poison)
    what = f"paged page_size={page_size} lengths={lengths} num_splits={num_splits}"
    kw = dict(causal=causal, num_splits=num_splits, return_softmax_lse=True, **descale)
    got = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, page_table=table, **kw)[:2]
    D._check(*got, refs, what, kvcache=True)
    dense = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, **kw)[:2]
    if (got[0].isnan() == dense[0].isnan()).all() and not torch.equal(got[0], dense[0]):
        # Page sizes TMA cannot load block by block run on the gather variant, whose 128-key blocks differ
        # from the dense kernel's wider ones (176 / 192 keys) where those exist: the sums are ordered
        # differently, so the two agree to rounding, not bitwise (both passed the reference check above).
        D._check(*dense, refs, f"{what} (dense)", kvcache=True)
        # FP8: P is rounded to e4m3 per block, so other block widths (224 dense, 192 gathered at d 128) move
        # outputs by e4m3's rounding (GPU run 2 of session 6: 0.017 at page 256), not bf16's.
        atol, rtol = (5e-2, 5e-2) if dtype == FP8 else (4e-3, 2e-2)
        torch.testing.assert_close(got[0].float(), dense[0].float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what}: paged vs dense cache: {m}")
        torch.testing.assert_close(got[1], dense[1], atol=1e-4, rtol=1e-5,
                                   msg=lambda m: f"{what}: paged vs dense LSE: {m}")
    else:
        D._assert_same(got, dense, f"{what}: paged vs dense cache")
    # The raw op through varlen_fwd, into a NaN out=.
    buf = D._nan_out((b, s_q, h, d), D._out_dtype(dtype))
    out2, lse2 = varlen_fwd(q, k_pages, v_pages, seqused_k=seqlens, page_table=table, out=buf, causal=causal,
                            num_splits=num_splits, **descale)
    D._assert_same((out2, lse2), got, f"{what}: varlen_fwd vs flash_attn_with_kvcache")


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=D._name)
def test_cache_batch_idx(paged, dtype):
    """Batch entry i reads cache row idx[i]: a permutation of a subset, with one row used twice."""
    d, h, h_k, cap, rows = 128, 8, 2, 777, 6
    _require_paged(dtype, d)
    b = 4
    idx = torch.randperm(rows)[:b]
    idx[3] = idx[0]
    q = D._rand(dtype, b, 3, h, d)
    k, v = D._rand(dtype, rows, cap, h_k, d), D._rand(dtype, rows, cap, h_k, d)
    lengths = D._cache_lengths(b, cap)
    seqlens = D._i32(lengths)
    descale = D._descales(dtype, b, h_k)
    kg, vg = k[idx.to(D.DEVICE)].clone(), v[idx.to(D.DEVICE)].clone()
    refs = D._references(q, kg, vg, cache_seqlens=seqlens, causal=True, **descale)
    kw = dict(causal=True, return_softmax_lse=True, **descale)
    want = flash_attn_with_kvcache(q, kg, vg, cache_seqlens=seqlens, **kw)[:2]
    row_lengths = [0] * rows
    for i, n in zip(idx.tolist(), lengths):
        row_lengths[i] = max(row_lengths[i], n)
    if paged:
        (k, v), table = _to_pages((k, v), row_lengths, 16, "nan")
        got = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_batch_idx=D._i32(idx.tolist()),
                                      page_table=table, **kw)[:2]
    else:
        for i, n in enumerate(row_lengths):
            D._poison(k[i, n:], "nan")
            D._poison(v[i, n:], "nan")
        got = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_batch_idx=D._i32(idx.tolist()), **kw)[:2]
    D._check(*got, refs, f"cache_batch_idx={idx.tolist()} paged={paged}", kvcache=True)
    D._assert_same(got, want, f"cache_batch_idx={idx.tolist()}: vs the gathered cache")


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged3"])
@pytest.mark.parametrize("num_splits", [1, 0])
@pytest.mark.parametrize("dtype", [F16, FP8], ids=D._name)
def test_cache_leftpad(paged, num_splits, dtype):
    """Keys [leftpad[i], cache_seqlens[i]) of row i: equal to a cache whose rows start at the padding's end."""
    d, h, h_k, cap, b = 64, 6, 2, 1500, 5
    _require_paged(dtype, d, num_splits)
    q = D._rand(dtype, b, 2, h, d)
    k, v = D._rand(dtype, b, cap, h_k, d), D._rand(dtype, b, cap, h_k, d)
    ends = D._cache_lengths(b, cap)
    pads = [torch.randint(0, n + 1, ()).item() for n in ends]
    pads[0] = ends[0]  # an entry whose padding takes all of it: no key
    descale = D._descales(dtype, b, h_k)
    shifted_k, shifted_v = torch.zeros_like(k), torch.zeros_like(v)
    for i, (lp, n) in enumerate(zip(pads, ends)):
        shifted_k[i, :n - lp] = k[i, lp:n]
        shifted_v[i, :n - lp] = v[i, lp:n]
    lengths = [n - lp for lp, n in zip(pads, ends)]
    refs = D._references(q, shifted_k, shifted_v, cache_seqlens=D._i32(lengths), causal=True, **descale)
    kw = dict(causal=True, num_splits=num_splits, return_softmax_lse=True, **descale)
    want = flash_attn_with_kvcache(q, shifted_k, shifted_v, cache_seqlens=D._i32(lengths), **kw)[:2]
    for i, (lp, n) in enumerate(zip(pads, ends)):  # the padding and the tail are never read
        for t in (k, v):
            D._poison(t[i, :lp], "huge")
            D._poison(t[i, n:], "nan")
    if paged:
        (k, v), table = _to_pages((k, v), ends, 3, "nan")
        extra = dict(page_table=table)
    else:
        extra = {}
    got = flash_attn_with_kvcache(q, k, v, cache_seqlens=D._i32(ends), cache_leftpad=D._i32(pads), **extra, **kw)[:2]
    what = f"cache_leftpad={pads} cache_seqlens={ends} paged={paged}"
    D._check(*got, refs, what, kvcache=True)
    D._assert_same(got, want, f"{what}: vs the shifted cache")


def test_paged_graph_replay_with_new_lengths_and_pages():
    """A paged decode step captured once and replayed with new cache_seqlens and a new page table written in
    place equals the eager call each time."""
    dtype, b, h, h_k, d, cap, page_size = BF16, 6, 16, 4, 128, 2048, 16
    _require_paged(dtype, d)
    q = D._rand(dtype, b, 1, h, d)
    max_pages = cap // page_size
    num_pages = b * max_pages
    k_pages, v_pages = D._rand(dtype, num_pages, page_size, h_k, d), D._rand(dtype, num_pages, page_size, h_k, d)
    table = torch.randperm(num_pages, device=D.DEVICE).to(torch.int32).view(b, max_pages).contiguous()
    seqlens = D._i32(D._cache_lengths(b, cap))

    def step():
        return flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, page_table=table, causal=True,
                                       num_splits=0, return_softmax_lse=True)

    graph, (out_g, lse_g, *_) = capture_graph(step)
    for _ in range(3):
        seqlens.copy_(D._i32(D._cache_lengths(b, cap)))
        table.copy_(torch.randperm(num_pages, device=D.DEVICE).to(torch.int32).view(b, max_pages))
        q.copy_(torch.randn_like(q))
        graph.replay()
        eager = step()[:2]
        D._assert_same((out_g, lse_g), eager, "graph replay vs eager (paged)")


def test_page_index_out_of_range_reads_nothing():
    """Page-table entries below a sequence's length that point outside the cache must not be dereferenced
    (they read zeros: the result is finite and the call does not fault)."""
    dtype, b, h, h_k, d, page_size = BF16, 2, 4, 2, 128, 16
    _require_paged(dtype, d)
    q = D._rand(dtype, b, 1, h, d)
    k_pages, v_pages = D._rand(dtype, 8, page_size, h_k, d), D._rand(dtype, 8, page_size, h_k, d)
    table = D._i32([[0, 1, 2**31 - 1, 3], [-5, 4, 5, 8]])
    out = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=D._i32([64, 64]), page_table=table)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all(), "out-of-range pages must read as zeros, not memory"
    # The same as a dense cache whose out-of-range pages are zeros (both load paths zero-fill them).
    dense = [torch.zeros(b, 4 * page_size, h_k, d, dtype=dtype, device=D.DEVICE) for _ in range(2)]
    for i, row in enumerate(table.tolist()):
        for j, page in enumerate(row):
            if 0 <= page < 8:
                for t, pages in zip(dense, (k_pages, v_pages)):
                    t[i, j * page_size:(j + 1) * page_size] = pages[page]
    want = flash_attn_with_kvcache(q, *dense, cache_seqlens=D._i32([64, 64]))
    torch.testing.assert_close(out.float(), want.float(), atol=4e-3, rtol=2e-2)


@pytest.mark.parametrize("page_size", [16, 1])
def test_vllm_varlen_block_table_call(page_size):
    """vLLM's decode call (flash_attn_varlen_func with packed q, block_table, seqused_k, out=,
    return_softmax_lse, fa_version) equals flash_attn_with_kvcache(page_table=...) bit for bit."""
    from flash_attn3 import flash_attn_varlen_func
    dtype, b, h, h_k, d, cap = BF16, 5, 16, 4, 128, 900
    _require_paged(dtype, d)
    q = D._rand(dtype, b, 1, h, d)
    k, v = D._rand(dtype, b, cap, h_k, d), D._rand(dtype, b, cap, h_k, d)
    lengths = D._cache_lengths(b, cap)
    (kp, vp), table = _to_pages((k, v), lengths, page_size, "nan")
    seqlens = D._i32(lengths)
    want = flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, page_table=table, causal=True, num_splits=0,
                                   return_softmax_lse=True)[:2]
    buf = D._nan_out((b, h, d), dtype)
    got = flash_attn_varlen_func(q=q.flatten(0, 1), k=kp, v=vp, out=buf, cu_seqlens_q=D._cu_seqlens([1] * b),
                                 max_seqlen_q=1, seqused_k=seqlens, max_seqlen_k=cap, softmax_scale=d ** -0.5,
                                 causal=True, window_size=[-1, -1], block_table=table, softcap=0.0, fa_version=3,
                                 num_splits=0, return_softmax_lse=True)
    assert got[0] is buf
    assert torch.equal(got[0].view(b, 1, h, d), want[0]), "out differs from the kvcache call"
    assert torch.equal(got[1].view(h, b).t().reshape(b, h, 1), want[1]), "lse differs from the kvcache call"
