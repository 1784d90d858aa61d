"""GPU correctness tests of the forward kernel against flash_attn3.reference (issue #3, "Verify").

Each case runs the kernel through the public functions and compares with the float32 reference under FA3's
rule: the kernel may be at most twice as far from the float32 answer as PyTorch computing in the input
dtype, plus a small floor. Every case also checks that every output element is written (outputs start as
NaN), that the LSE matches, and that repeated runs are bitwise identical. The default grid covers every
value of every axis in a few hundred cases (< 2 minutes on an H100); FLASH_ATTN3_FULL_TESTS=1 runs the full
cartesian product. Inputs are freshly random on every run; failures print the lengths involved.

The module skips (with the reason) unless an SM90 GPU and the compiled extension are both present.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch


from _gpu import skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

from _op_args import op_args  # noqa: E402  (raw-op arguments by schema name)

from flash_attn3 import flash_attn_func, flash_attn_varlen_func, varlen_fwd  # noqa: E402
from flash_attn3.reference import attention_ref  # noqa: E402

FULL = os.environ.get("FLASH_ATTN3_FULL_TESTS", "0") == "1"
DEVICE = "cuda"

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 80, 96, 128]
CAUSAL = [False, True]
# (seqlen_q, seqlen_k) from {1, 17, 113, 239, 1023, 1024, 2051}: s_q < s_k, s_q > s_k and s_q == s_k, with
# lengths one below, at and past tile multiples so partial tiles and bottom-right causal offsets are exercised.
SEQLEN_PAIRS = [
    (1, 1), (1, 1024), (17, 113), (113, 17), (113, 113), (239, 1023), (1023, 239), (1024, 1024), (1023, 2051),
    (2051, 1024),
]
# (num_heads, num_heads_k): ratios 1, 2, 8 and MQA (one key head; odd query head count).
HEADS = [(4, 4), (6, 3), (16, 2), (3, 1)]
# How q/k/v sit in memory (always with a contiguous last dim):
#  contig      standard (b, s, h, d) / (total, h, d)
#  packed      views into one qkv tensor (self-attention) or q plus one kv tensor
#  transposed  storage (h, b, s, d) / (h, total, d) viewed as (b, s, h, d) / (total, h, d)
LAYOUTS = ["contig", "packed", "transposed"]
# Varlen batches (see _varlen_lengths): random lengths, zero-length sequences, long and decode-like batches.
VARLEN_PATTERNS = ["random", "zero_qk", "zero_k", "equal", "long", "decode", "no_keys"]

# Output floor of the tolerance rule. It only matters when the low-precision PyTorch baseline is (nearly)
# exact, e.g. a single visible key where both compute out = v. It absorbs float32 summation-order
# differences (~1e-6 of |out| <= ~3) and the 16-bit rounding of outputs within ~0.015 of zero, where a
# bfloat16 half-ulp is <= 3e-5; a real bug (wrong mask, missed row or tile) moves outputs by ~0.1.
OUT_FLOOR = 3e-5
# LSE is float32 in both kernel and reference, computed from identical 16-bit inputs.
LSE_ATOL = 1e-3


def _rotating_grid(main_axes, rotated_axes):
    """Full product of `main_axes`; each `rotated_axes` axis cycles along it at its own pace, so every value
    of every axis appears and neighbouring cases differ in several axes. Full product when FULL."""
    if FULL:
        return list(itertools.product(*main_axes, *rotated_axes))
    cases = []
    for i, main in enumerate(itertools.product(*main_axes)):
        rotated, pace = [], 1
        for axis in rotated_axes:
            rotated.append(axis[(i // pace) % len(axis)])
            pace *= len(axis)
        cases.append((*main, *rotated))
    return cases


def _name(x):
    """Test-id text of one parameter value."""
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, bool):
        return "causal" if x else "full"
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def _case_id(case):
    return "-".join(_name(x) for x in case)


# ---------------------------------------------------------------------------------------------------------
# Input construction


def _dense_qkv(layout, b, s_q, s_k, h, h_k, d, dtype):
    if layout == "packed" and s_q == s_k:
        qkv = torch.randn(b, s_q, h + 2 * h_k, d, device=DEVICE, dtype=dtype)
        return qkv[:, :, :h], qkv[:, :, h:h + h_k], qkv[:, :, h + h_k:]
    if layout == "packed":
        q = torch.randn(b, s_q, h, d, device=DEVICE, dtype=dtype)
        k, v = torch.randn(b, s_k, 2, h_k, d, device=DEVICE, dtype=dtype).unbind(2)
        return q, k, v
    if layout == "transposed":
        def make(s, heads):
            return torch.randn(heads, b, s, d, device=DEVICE, dtype=dtype).permute(1, 2, 0, 3)
        return make(s_q, h), make(s_k, h_k), make(s_k, h_k)
    return tuple(torch.randn(b, s, heads, d, device=DEVICE, dtype=dtype)
                 for s, heads in ((s_q, h), (s_k, h_k), (s_k, h_k)))


def _packed_qkv(layout, total_q, total_k, h, h_k, d, dtype, same_lengths):
    if layout == "packed" and same_lengths:
        qkv = torch.randn(total_q, h + 2 * h_k, d, device=DEVICE, dtype=dtype)
        return qkv[:, :h], qkv[:, h:h + h_k], qkv[:, h + h_k:]
    if layout == "packed":
        q = torch.randn(total_q, h, d, device=DEVICE, dtype=dtype)
        k, v = torch.randn(total_k, 2, h_k, d, device=DEVICE, dtype=dtype).unbind(1)
        return q, k, v
    if layout == "transposed":
        def make(total, heads):
            return torch.randn(heads, total, d, device=DEVICE, dtype=dtype).transpose(0, 1)
        return make(total_q, h), make(total_k, h_k), make(total_k, h_k)
    return tuple(torch.randn(total, heads, d, device=DEVICE, dtype=dtype)
                 for total, heads in ((total_q, h), (total_k, h_k), (total_k, h_k)))


def _nan_like_out(q, dv, layout):
    """A NaN-filled output buffer in q's layout (transposed storage for the transposed layout), so that any
    element the kernel does not write stays NaN and a kernel that ignores the out strides is caught."""
    shape = (*q.shape[:-1], dv)
    if layout == "transposed":
        perm = (2, 0, 1, 3) if q.dim() == 4 else (1, 0, 2)  # storage (h, b, s, dv) / (h, total, dv)
        storage = torch.full([shape[i] for i in perm], math.nan, device=DEVICE, dtype=q.dtype)
        inverse = [perm.index(i) for i in range(len(perm))]
        return storage.permute(*inverse)
    return torch.full(shape, math.nan, device=DEVICE, dtype=q.dtype)


def _randint(lo, hi, n):
    return torch.randint(lo, hi + 1, (n,)).tolist()


def _varlen_lengths(pattern):
    """Host lists (lengths_q, lengths_k) of one batch."""
    if pattern == "random":
        b = 5
        return _randint(1, 300, b), _randint(1, 300, b)
    if pattern == "zero_qk":  # some sequences empty on both sides, including the first and the last
        b = 6
        lq, lk = _randint(1, 200, b), _randint(1, 200, b)
        for i in (0, int(torch.randint(1, b - 1, ())), b - 1):
            lq[i] = lk[i] = 0
        return lq, lk
    if pattern == "zero_k":  # queries that see no key at all: out 0, LSE -inf
        b = 5
        lq, lk = _randint(1, 200, b), _randint(1, 200, b)
        for i in (0, int(torch.randint(1, b, ()))):
            lk[i] = 0
        return lq, lk
    if pattern == "equal":  # self-attention lengths (allows one packed qkv tensor)
        lengths = _randint(0, 400, 5) + [1]
        return lengths, list(lengths)
    if pattern == "long":
        choices = [1, 17, 113, 239, 1023, 1024, 2051]
        pick = lambda: [choices[i] for i in torch.randint(0, len(choices), (3,)).tolist()]  # noqa: E731
        return pick(), pick()
    if pattern == "decode":
        b = 8
        return [1] * b, _randint(1, 1500, b)
    if pattern == "no_keys":  # every sequence has zero keys (total_k == 0)
        b = 3
        return _randint(1, 100, b), [0] * b
    raise ValueError(pattern)


def _cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------------------------------------------------
# Checks


def _assert_out_close(out, ref, pt, rows=None, what=""):
    """FA3's rule: max|out - ref| <= 2 * max|pt - ref| + OUT_FLOOR. `rows` (bool, over the token dim of a
    packed layout or (b, s) of a dense one) restricts the check to the rows the call defines."""
    if rows is not None:
        out, ref, pt = out[rows], ref[rows], pt[rows]
    if out.numel() == 0:
        return
    nan = torch.isnan(out)
    assert not nan.any(), f"{what}: {int(nan.sum())} output elements were not written (still NaN)"
    err = (out.float() - ref.float()).abs().max().item()
    pt_err = (pt.float() - ref.float()).abs().max().item()
    assert err <= 2 * pt_err + OUT_FLOOR, (
        f"{what}: max |out - ref| = {err:.3e} exceeds 2 * {pt_err:.3e} (PyTorch at low precision) + {OUT_FLOOR}")


def _assert_lse_close(lse, lse_ref, rows=None, what=""):
    """LSE within LSE_ATOL where the reference is finite, and -inf exactly where it is -inf (rows with no
    keys). `rows` selects the last (token) dim of (h, total_q) or the (b, s) rows of (b, h, s_q)."""
    if rows is not None:
        if lse.dim() == 2:
            lse, lse_ref = lse[:, rows], lse_ref[:, rows]
        else:
            lse, lse_ref = lse.transpose(1, 2)[rows], lse_ref.transpose(1, 2)[rows]
    if lse.numel() == 0:
        return
    lse_ref = lse_ref.to(lse.dtype)
    assert not torch.isnan(lse).any(), f"{what}: LSE has NaN entries (not written?)"
    finite = torch.isfinite(lse_ref)
    assert (lse_ref[~finite] == -math.inf).all(), f"{what}: reference LSE has non-finite values other than -inf"
    assert torch.equal(torch.isfinite(lse), finite), (
        f"{what}: LSE -inf positions differ from the reference ({int((torch.isfinite(lse) != finite).sum())} rows)")
    assert (lse[~finite] == -math.inf).all(), f"{what}: rows with no keys must have LSE = -inf"
    if finite.any():
        err = (lse[finite] - lse_ref[finite]).abs().max().item()
        assert err <= LSE_ATOL, f"{what}: max |lse - lse_ref| = {err:.3e} > {LSE_ATOL}"


def _references(q, k, v, **kw):
    out_ref, lse_ref = attention_ref(q, k, v, upcast=True, **kw)
    out_pt, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
    return out_ref, lse_ref, out_pt


def _check_all_paths(q, k, v, *, causal, layout, softmax_scale=None, varlen=None, rows=None, refs=None, what=""):
    """Runs the allocating function twice and varlen_fwd into a NaN-poisoned `out=`; checks each against the
    reference and that all three agree bitwise. `varlen` = (cu_q, cu_k, max_q, max_k) or None (dense).
    `refs` lets a caller supply references computed from clean inputs (NaN-safety tests)."""
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    if varlen is not None:
        cu_q, cu_k, max_q, max_k = varlen
        vkw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    else:
        vkw = {}
    out_ref, lse_ref, out_pt = refs if refs is not None else _references(q, k, v, **vkw, **kw)

    def allocated():
        if varlen is None:
            return flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kw)

    out1, lse1 = allocated()
    out2, lse2 = allocated()
    buf = _nan_like_out(q, v.shape[-1], layout)
    out3, lse3 = varlen_fwd(q, k, v, **vkw, out=buf, **kw)

    assert out3.data_ptr() == buf.data_ptr() and out3.shape == buf.shape and out3.stride() == buf.stride(), (
        "varlen_fwd(out=buf) must write into and return `buf`")
    assert out1.dtype == q.dtype and lse1.dtype == torch.float32
    assert lse1.shape == lse_ref.shape, f"LSE shape {tuple(lse1.shape)} != reference {tuple(lse_ref.shape)}"
    for name, out, lse in (("allocated", out1, lse1), ("out=", out3, lse3)):
        _assert_out_close(out, out_ref, out_pt, rows, f"{what} [{name}]")
        _assert_lse_close(lse, lse_ref, rows, f"{what} [{name}]")
    # The forward pass is deterministic: same inputs, same bits, whatever the output buffer.
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    assert torch.equal(sel(out1), sel(out2)) and torch.equal(sel(out1), sel(out3)), f"{what}: outputs differ"
    lsel = (lambda t: t) if rows is None else (lambda t: t[:, rows] if t.dim() == 2 else t.transpose(1, 2)[rows])
    assert torch.equal(lsel(lse1), lsel(lse2)) and torch.equal(lsel(lse1), lsel(lse3)), f"{what}: LSE differs"


# ---------------------------------------------------------------------------------------------------------
# Dense batches

DENSE_CASES = _rotating_grid((DTYPES, HEAD_DIMS, CAUSAL, SEQLEN_PAIRS), (HEADS, LAYOUTS))


@pytest.mark.parametrize("dtype,d,causal,seqlens,heads,layout", DENSE_CASES, ids=[_case_id(c) for c in DENSE_CASES])
def test_dense(dtype, d, causal, seqlens, heads, layout):
    s_q, s_k = seqlens
    h, h_k = heads
    q, k, v = _dense_qkv(layout, 2, s_q, s_k, h, h_k, d, dtype)
    _check_all_paths(q, k, v, causal=causal, layout=layout, what=f"dense s_q={s_q} s_k={s_k} h={h} h_k={h_k}")


# ---------------------------------------------------------------------------------------------------------
# Variable-length batches

VARLEN_CASES = _rotating_grid((DTYPES, HEAD_DIMS, CAUSAL, VARLEN_PATTERNS), (HEADS, LAYOUTS))


@pytest.mark.parametrize("dtype,d,causal,pattern,heads,layout", VARLEN_CASES, ids=[_case_id(c) for c in VARLEN_CASES])
def test_varlen(dtype, d, causal, pattern, heads, layout):
    lq, lk = _varlen_lengths(pattern)
    h, h_k = heads
    q, k, v = _packed_qkv(layout, sum(lq), sum(lk), h, h_k, d, dtype, same_lengths=lq == lk)
    varlen = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
    _check_all_paths(q, k, v, causal=causal, layout=layout, varlen=varlen,
                     what=f"varlen lengths_q={lq} lengths_k={lk} h={h} h_k={h_k}")


# ---------------------------------------------------------------------------------------------------------
# Long causal calls: 16-bit d 128 causal runs on a 128 x 176 tile only when >= 128 queries see >= 4096 keys
# on average (hopper/tile_config.h causal_narrow); the grids above are all shorter, so these cases are the
# ones that run that kernel (its diagonal spans two 176-key blocks of a 128-row tile), chunked prefill among
# them (a few hundred new queries against a long context).

LONG_CAUSAL = [  # (lengths_q, lengths_k) per batch entry; a single entry runs dense
    ([4111], [8209]),                      # s_q < s_k, odd lengths past tile multiples
    ([4096], [16384]),                     # the diag benchmark's shape, exact multiples of 128
    ([4500, 4099, 0, 23], [9001, 8200, 5, 23]),  # varlen: max 4500 x 9001, with short and empty entries
    ([133], [8211]),                       # chunked prefill: one partial query tile, odd lengths
    ([512, 129, 0, 1], [8192, 4300, 7, 9000]),  # varlen chunked prefill: max 512 x 9000, empty and 1-query entries
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("lengths", LONG_CAUSAL, ids=lambda c: "x".join(map(str, c[0])) + "-" + "x".join(map(str, c[1])))
def test_long_causal_wide_tile(dtype, lengths):
    lq, lk = lengths
    h, h_k, d = 4, 2, 128
    if len(lq) == 1:
        q, k, v = _dense_qkv("contig", 1, lq[0], lk[0], h, h_k, d, dtype)
        _check_all_paths(q, k, v, causal=True, layout="contig", what=f"long causal dense s_q={lq[0]} s_k={lk[0]}")
    else:
        q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d, dtype, same_lengths=False)
        varlen = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
        _check_all_paths(q, k, v, causal=True, layout="contig", varlen=varlen,
                         what=f"long causal varlen lengths_q={lq} lengths_k={lk}")


# ---------------------------------------------------------------------------------------------------------
# seqused: only the first seqused[i] rows of each sequence take part; the rest must not matter, even as NaN


def _poison_rows(t, starts, used, ends):
    """NaN into rows [starts[i] + used[i], ends[i]) of the token dim of a packed tensor."""
    for s, u, e in zip(starts, used, ends):
        t[s + u:e] = math.nan


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("which", ["seqused_k", "seqused_q", "both"])
def test_varlen_seqused_nan_safe(dtype, causal, which):
    h, h_k, d = 6, 2, 128
    lq, lk = _randint(1, 300, 5), _randint(1, 300, 5)
    lq[1], lk[1] = 0, 0  # an empty sequence keeps seqused 0 as well
    uq = [int(torch.randint(0, n + 1, ())) for n in lq] if which != "seqused_k" else list(lq)
    uk = [int(torch.randint(0, n + 1, ())) for n in lk] if which != "seqused_q" else list(lk)
    if which != "seqused_q":
        uk[-1] = 0  # used q rows that see no key: out 0, LSE -inf
    cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
    seqused_q = torch.tensor(uq, dtype=torch.int32, device=DEVICE) if which != "seqused_k" else None
    seqused_k = torch.tensor(uk, dtype=torch.int32, device=DEVICE) if which != "seqused_q" else None
    q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d, dtype, same_lengths=False)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk),
              seqused_q=seqused_q, seqused_k=seqused_k, causal=causal)
    refs = _references(q, k, v, **kw)  # from clean inputs: unused rows do not enter the maths

    starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
    ends_q, ends_k = cu_q[1:].tolist(), cu_k[1:].tolist()
    _poison_rows(q, starts_q, uq, ends_q)
    _poison_rows(k, starts_k, uk, ends_k)
    _poison_rows(v, starts_k, uk, ends_k)
    rows = torch.zeros(sum(lq), dtype=torch.bool, device=DEVICE)  # used q rows: the only defined outputs
    for s, u in zip(starts_q, uq):
        rows[s:s + u] = True

    what = f"seqused lengths_q={lq} used_q={uq} lengths_k={lk} used_k={uk}"
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), seqused_q=seqused_q,
                                      seqused_k=seqused_k, causal=causal, return_attn_probs=True)
    buf = _nan_like_out(q, d, "contig")
    out2, lse2 = varlen_fwd(q, k, v, out=buf, **kw)
    for name, o, l in (("allocated", out, lse), ("out=", out2, lse2)):
        _assert_out_close(o, refs[0], refs[2], rows, f"{what} [{name}]")
        _assert_lse_close(l, refs[1], rows, f"{what} [{name}]")
    assert torch.equal(out[rows], out2[rows]) and torch.equal(lse[:, rows], lse2[:, rows])


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
def test_dense_seqused_k_nan_safe(dtype, causal):
    """KV-cache style: dense k/v of capacity s_k, of which seqused_k[i] rows are valid."""
    b, s_q, s_k, h, h_k, d = 4, 17, 1024, 8, 1, 64
    q, k, v = _dense_qkv("contig", b, s_q, s_k, h, h_k, d, dtype)
    used = _randint(1, s_k, b)
    used[0], used[1] = 0, s_k
    seqused_k = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    refs = _references(q, k, v, seqused_k=seqused_k, causal=causal)
    for i, u in enumerate(used):
        k[i, u:] = math.nan
        v[i, u:] = math.nan
    out, lse = varlen_fwd(q, k, v, seqused_k=seqused_k, causal=causal, out=_nan_like_out(q, d, "contig"))
    what = f"dense seqused_k={used}"
    _assert_out_close(out, refs[0], refs[2], what=what)
    _assert_lse_close(lse, refs[1], what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("d", [64, 128, 256], ids=lambda d: f"d{d}")
def test_dense_rows_past_the_view_nan_safe(dtype, causal, d):
    """k / v views of the first s_k rows of NaN-filled buffers with more rows: what lies past the view (inside
    the allocation, in every batch entry's stride) must not reach the result. s_k is a multiple of no key block
    (64 ... 224), so every tile's boundary block reaches past the view; the kernel may rely on TMA zero-filling
    rows outside the tensor, never on what memory holds there."""
    b, s_q, s_k, h, h_k, pad = 2, 113, 1001, 4, 2, 40
    q, k0, v0 = _dense_qkv("contig", b, s_q, s_k, h, h_k, d, dtype)
    refs = _references(q, k0, v0, causal=causal)
    k_buf, v_buf = (torch.full((b, s_k + pad, h_k, d), math.nan, device=DEVICE, dtype=dtype) for _ in range(2))
    k, v = k_buf[:, :s_k], v_buf[:, :s_k]
    k.copy_(k0)
    v.copy_(v0)
    assert torch.isnan(k_buf[:, s_k:]).all() and k.stride(0) == (s_k + pad) * h_k * d
    out, lse = varlen_fwd(q, k, v, causal=causal, out=_nan_like_out(q, d, "contig"))
    what = f"dense views d={d} s_k={s_k} of buffers with {pad} NaN rows more"
    _assert_out_close(out, refs[0], refs[2], what=what)
    _assert_lse_close(lse, refs[1], what=what)


# ---------------------------------------------------------------------------------------------------------
# Every element written, including the LSE, through the raw op (the public functions allocate their LSE with
# torch.empty, which may hold a previous run's correct values)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_op_writes_every_element(dtype, causal, varlen):
    h, h_k, d = 4, 2, 128
    if varlen:
        lq, lk = [0, 113, 1, 239, 5], [0, 17, 300, 0, 64]  # both empty, k-only empty, s_q > s_k, s_q < s_k
        q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d, dtype, same_lengths=False)
        lse = torch.full((h, sum(lq)), math.nan, device=DEVICE)
        kw = dict(cu_seqlens_q=_cu_seqlens(lq), cu_seqlens_k=_cu_seqlens(lk), max_seqlen_q=max(lq),
                  max_seqlen_k=max(lk))
    else:
        b, s_q, s_k = 3, 239, 113
        q, k, v = _dense_qkv("contig", b, s_q, s_k, h, h_k, d, dtype)
        lse = torch.full((b, h, s_q), math.nan, device=DEVICE)
        kw = {}
    out = _nan_like_out(q, d, "contig")
    # Unnamed arguments take op_args' defaults: the dense lengths, softmax_scale = d ** -0.5, FA3's options.
    torch.ops.flash_attn3.fwd(*op_args(q, k, v, out=out, softmax_lse=lse, window_size_right=0 if causal else -1,
                                       **kw))
    out_ref, lse_ref, out_pt = _references(q, k, v, causal=causal, **kw)
    _assert_out_close(out, out_ref, out_pt, what="raw op")
    _assert_lse_close(lse, lse_ref, what="raw op")


# ---------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_softmax_scale(dtype, causal, varlen):
    scale = float(torch.empty(()).uniform_(0.02, 0.5))  # away from the default 128 ** -0.5 ~ 0.088 on average
    h, h_k, d = 8, 2, 128
    if varlen:
        lq, lk = _randint(1, 500, 4), _randint(1, 500, 4)
        q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d, dtype, same_lengths=False)
        varlen_args = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
        what = f"softmax_scale={scale} lengths_q={lq} lengths_k={lk}"
    else:
        q, k, v = _dense_qkv("contig", 2, 239, 1023, h, h_k, d, dtype)
        varlen_args = None
        what = f"softmax_scale={scale}"
    _check_all_paths(q, k, v, causal=causal, layout="contig", softmax_scale=scale, varlen=varlen_args, what=what)


def test_default_scale_is_head_dim_rsqrt():
    q, k, v = _dense_qkv("contig", 2, 113, 239, 4, 4, 96, torch.bfloat16)
    explicit = flash_attn_func(q, k, v, softmax_scale=96 ** -0.5)
    assert torch.equal(flash_attn_func(q, k, v), explicit)


# Softcap and local attention: tests/test_local_softcap_gpu.py.


@pytest.mark.parametrize("packing", ["5d", "4d_gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_func(packing, causal):
    """FA3's flash_attn_qkvpacked_func: the reference's answer, and bitwise flash_attn_func's on the views."""
    from flash_attn3 import flash_attn_qkvpacked_func

    b, s, d = 2, 1023, 128
    if packing == "5d":
        qkv = torch.randn(b, s, 3, 6, d, device=DEVICE, dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
        out, lse = flash_attn_qkvpacked_func(qkv, causal=causal, return_attn_probs=True)
    else:
        qkv = torch.randn(b, s, 8 + 2 * 2, d, device=DEVICE, dtype=torch.bfloat16)
        q, k, v = qkv.split([8, 2, 2], dim=2)
        out, lse = flash_attn_qkvpacked_func(qkv, causal=causal, num_heads_q=8, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, upcast=True)
    low, _ = attention_ref(q, k, v, causal=causal, upcast=False, reorder_ops=True)
    err, base = (out.float() - ref).abs().max().item(), (low.float() - ref).abs().max().item()
    assert err <= 2 * base + OUT_FLOOR, f"{packing} causal={causal}: max error {err:.3e} > 2 x {base:.3e} + floor"
    torch.testing.assert_close(lse, ref_lse.float(), atol=LSE_ATOL, rtol=0)
    plain = flash_attn_func(q, k, v, causal=causal)
    assert torch.equal(out, plain), f"{packing} causal={causal}: differs from flash_attn_func on the same views"
