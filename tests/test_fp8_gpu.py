"""GPU tests of the FP8 (float8_e4m3fn) forward kernels through the public functions.

Inputs are drawn in bfloat16 and quantised to e4m3, so the kernel and both references see the same values.
Each case is checked with FA3's FP8 rule (shared/research/fa3.md §5.3): with out_ref the float32 attention of
the dequantised inputs (flash_attn3.reference.attention_ref, upcast=True) and out_pt PyTorch at low precision
(tests/_fp8_ref.py: bfloat16 arithmetic with P rounded to e4m3 after the kernel's 2^8 scaling, before P @ V),

    max |out - out_ref|  <= MAX_MULT  * max |out_pt - out_ref|  + floor      (MAX_MULT 2; 4 for the kv cache)
    mean |out - out_ref| <= MEAN_MULT * mean |out_pt - out_ref| + MEAN_FLOOR (MEAN_MULT 3)

with floor = 2 * max |(out_ref + 0.3 - 0.3) - out_ref| evaluated in bfloat16, the output dtype: FA3's fwd_atol,
whose out_ref is in the output dtype too. It is about twice the bfloat16 rounding of the largest outputs and
only matters where out_pt is (nearly) exact, e.g. rows that see one key, where out = v * v_descale and both
sides round the same product to bfloat16. The LSE is compared with the reference's float32 LSE, in natural-log
units of the descaled scores softmax_scale * (q * q_descale) . (k * k_descale).

Beyond accuracy: outputs go into a NaN-filled `out=` view whose guard columns must stay NaN (nothing written
outside `out`), rows past seqused_q stay unwritten, NaN inputs past seqused do not leak in, descales of any
stride (expanded scalars, transposed and sliced views) give bit-identical results, a CUDA graph of an FP8 call
replays with new data and new descale values, torch.compile(fullgraph=True) traces it through the fake, and bad
FP8 arguments raise errors that name the argument.

The module skips (with the reason) unless an SM90 GPU and the compiled extension are present; the accuracy
tests also skip when the build record says fp8 was not built (FEATURES["fp8"] in flash_attn3/_build_config.py)
or no fp8 kernel serves the head dim. The argument checks run in either case.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from _gpu import capture_graph, skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

from _fp8_ref import attention_fp8_lowp  # noqa: E402
from _op_args import op_args  # noqa: E402

from flash_attn3 import (_ops, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,  # noqa: E402
                         varlen_fwd)
from flash_attn3.reference import attention_ref  # noqa: E402

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
DEVICE = "cuda"
FP8_NAN_BYTE = 0x7F  # e4m3fn NaN (S.1111.111)

FP8_BUILT = _ops.BUILD.has("fp8")
needs_fp8 = pytest.mark.skipif(not FP8_BUILT, reason="fp8 kernels are not built (FEATURES['fp8'] is off in "
                                                     "flash_attn3/_build_config.py)")

MAX_MULT = 2
KVCACHE_MAX_MULT = 4  # FA3's test_flash_attn_kvcache uses 4 for fp8 (2 for 16-bit)
MEAN_MULT = 3  # FA3's fp8 mean-error factor (1.5 for 16-bit)
# The mean check's floor: a few one-ulp bfloat16 differences among thousands of elements stay far below it;
# any systematic error (a descale applied twice, a wrong row) is orders of magnitude larger.
MEAN_FLOOR = 1e-4
# LSE: float32 in both kernel and reference, from identical fp8 inputs and float32 descales. What separates
# them is the FP8 tensor cores' accumulation of S = Q K^T, which keeps fewer bits than fp32 (about 14 of the
# mantissa, as measured by DeepSeek-V3 on Hopper): its error grows with sum_i |q_i k_i|, not with |S|. The
# tolerance therefore adds 2^-12 times a bound of the largest scaled sum_i |q_i k_i| (Cauchy-Schwarz: the
# largest |q| times the largest |k| times the scale and descales): 1e-3 to ~2e-2 here, where a descale or row
# mix-up moves the LSE by O(1).
LSE_ATOL = 1e-3
LSE_ACC_REL = 2.0 ** -12

HEAD_DIMS = [64, 80, 96, 128, 256]  # 80 runs on the compiled 96
CAUSAL = [False, True]
DESCALE_MODES = ["none", "random", "strided"]
# (seqlen_q, seqlen_k): odd lengths around tile edges, s_q < s_k, s_q > s_k (causal: leading rows see no key).
SEQLEN_PAIRS = [(1, 1), (1, 1023), (17, 113), (113, 17), (113, 1023), (1023, 1023), (1023, 113)]
HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA, MQA
LAYOUTS = ["contig", "packed", "transposed"]
# Varlen batches (lengths_q, lengths_k); None = drawn at random per run.
VARLEN_PATTERNS = {
    "odd": ([0, 1, 17, 113, 1023], [0, 113, 17, 1023, 1]),  # an empty sequence, then s_q <, =, > s_k
    "zero_k": ([17, 1, 113, 1023], [0, 1023, 0, 17]),  # query rows that see no key: out 0, LSE -inf
    "equal": ([113, 0, 1023, 1, 17], [113, 0, 1023, 1, 17]),  # self-attention lengths (one packed qkv)
    "decode": ([1, 1, 1, 1, 1, 1], [1, 17, 0, 113, 1023, 511]),
    "random": None,
}


def _name(x):
    if isinstance(x, bool):
        return "causal" if x else "full"
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def _grid(main_axes, rotated):
    """The product of `main_axes`; each (axis, pace) of `rotated` cycles along it, advancing every `pace`
    cases, so every value of every axis appears without the full product."""
    cases = []
    for i, main in enumerate(itertools.product(*main_axes)):
        cases.append((*main, *(axis[(i // pace) % len(axis)] for axis, pace in rotated)))
    return cases


def _require_head_dim(d):
    if _ops.BUILD.compiled_head_dim(FP8, d) is None:
        pytest.skip(f"no fp8 kernel serves head dim {d}; this build compiled fp8 head dims "
                    f"{list(_ops.BUILD.head_dims_for(FP8))}")


# ---------------------------------------------------------------------------------------------------------
# Inputs: bfloat16 randn quantised to e4m3 as a whole storage, then viewed, so the layouts survive the cast


def _fp8(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=BF16).to(FP8)


def _dense_qkv(layout, b, s_q, s_k, h, h_k, d):
    if layout == "packed" and s_q == s_k:
        qkv = _fp8(b, s_q, h + 2 * h_k, d)
        return qkv[:, :, :h], qkv[:, :, h:h + h_k], qkv[:, :, h + h_k:]
    if layout == "packed":
        k, v = _fp8(b, s_k, 2, h_k, d).unbind(2)
        return _fp8(b, s_q, h, d), k, v
    if layout == "transposed":  # storage (h, b, s, d)
        return tuple(_fp8(heads, b, s, d).permute(1, 2, 0, 3) for s, heads in ((s_q, h), (s_k, h_k), (s_k, h_k)))
    return _fp8(b, s_q, h, d), _fp8(b, s_k, h_k, d), _fp8(b, s_k, h_k, d)


def _packed_qkv(layout, total_q, total_k, h, h_k, d):
    if layout == "packed" and total_q == total_k:
        qkv = _fp8(total_q, h + 2 * h_k, d)
        return qkv[:, :h], qkv[:, h:h + h_k], qkv[:, h + h_k:]
    if layout == "packed":
        k, v = _fp8(total_k, 2, h_k, d).unbind(1)
        return _fp8(total_q, h, d), k, v
    if layout == "transposed":  # storage (h, total, d)
        return tuple(_fp8(heads, total, d).transpose(0, 1) for total, heads in ((total_q, h), (total_k, h_k),
                                                                                (total_k, h_k)))
    return _fp8(total_q, h, d), _fp8(total_k, h_k, d), _fp8(total_k, h_k, d)


def _rand_descale(*shape):
    return torch.rand(*shape, device=DEVICE) * 1.75 + 0.25


def _descales(mode, b, h_k):
    """q/k/v_descale keyword arguments: none; random contiguous (b, h_k); or q an expanded scalar (strides
    (0, 0)), k a transposed view (strides (1, b)) and v None (= 1)."""
    if mode == "none":
        return {}
    if mode == "random":
        return {name: _rand_descale(b, h_k) for name in ("q_descale", "k_descale", "v_descale")}
    assert mode == "strided"
    return {"q_descale": torch.tensor(0.5, device=DEVICE).expand(b, h_k), "k_descale": _rand_descale(h_k, b).t()}


def _randint(lo, hi, n):
    return torch.randint(lo, hi + 1, (n,)).tolist()


def _varlen_lengths(pattern):
    fixed = VARLEN_PATTERNS[pattern]
    if fixed is not None:
        return list(fixed[0]), list(fixed[1])
    lq, lk = _randint(1, 300, 5), _randint(0, 300, 5)
    lq[2] = lk[2] = 0
    return lq, lk


def _cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _poison_rows(t, rows):
    """NaN into the given rows of the first dim of an fp8 tensor (through its bytes, as e4m3fn NaN)."""
    t.view(torch.uint8)[rows] = FP8_NAN_BYTE


GUARD = 16  # NaN columns after the head dim of every guarded out= row


def _guarded_out(q, dv):
    """(storage, out): a NaN-filled bfloat16 storage with GUARD extra columns per row, and out, its view of the
    first dv columns (row stride dv + GUARD), so any write past out's head dim shows as a non-NaN guard."""
    storage = torch.full((*q.shape[:-1], dv + GUARD), math.nan, dtype=BF16, device=DEVICE)
    return storage, storage[..., :dv]


def _assert_guard_intact(storage, dv, what):
    assert torch.isnan(storage[..., dv:]).all(), f"{what}: the kernel wrote past out's head dim (guard overwritten)"


# ---------------------------------------------------------------------------------------------------------
# Checks


def _floor(out_ref):
    """FA3's fwd_atol, 2 * max |(out_ref + 0.3 - 0.3) - out_ref|, in the output dtype bfloat16."""
    r = out_ref.to(BF16)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item()


def _assert_out_close(out, ref, pt, rows=None, what="", max_mult=MAX_MULT):
    if rows is not None:
        out, ref, pt = out[rows], ref[rows], pt[rows]
    if out.numel() == 0:
        return
    assert out.dtype == BF16, f"{what}: fp8 inputs must give a bfloat16 output, got {out.dtype}"
    nan = torch.isnan(out)
    assert not nan.any(), f"{what}: {int(nan.sum())} output elements were not written (still NaN)"
    err = (out.float() - ref.float()).abs()
    pt_err = (pt.float() - ref.float()).abs()
    floor = _floor(ref)
    assert err.max().item() <= max_mult * pt_err.max().item() + floor, (
        f"{what}: max |out - ref| = {err.max().item():.3e} exceeds {max_mult} * {pt_err.max().item():.3e} "
        f"(PyTorch, bf16 with fp8 P) + {floor:.1e}")
    assert err.mean().item() <= MEAN_MULT * pt_err.mean().item() + MEAN_FLOOR, (
        f"{what}: mean |out - ref| = {err.mean().item():.3e} exceeds {MEAN_MULT} * {pt_err.mean().item():.3e} "
        f"(PyTorch, bf16 with fp8 P) + {MEAN_FLOOR}")


def _lse_tolerance(q, k, *, q_descale=None, k_descale=None, softmax_scale=None, **_):
    """LSE_ATOL plus the FP8 accumulation allowance for this call (see LSE_ACC_REL)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    bound = abs(scale) * q.float().norm(dim=-1).max().item() * k.float().norm(dim=-1).max().item()
    for d in (q_descale, k_descale):
        if d is not None:
            bound *= d.abs().max().item()
    return LSE_ATOL + LSE_ACC_REL * bound


def _assert_lse_close(lse, lse_ref, rows=None, what="", tol=LSE_ATOL):
    """Within LSE_ATOL where the reference is finite, -inf exactly where it is -inf (rows with no key). `rows`
    selects the token dim of (h, total_q) or the (b, s) rows of (b, h, s_q)."""
    if rows is not None:
        if lse.dim() == 2:
            lse, lse_ref = lse[:, rows], lse_ref[:, rows]
        else:
            lse, lse_ref = lse.transpose(1, 2)[rows], lse_ref.transpose(1, 2)[rows]
    if lse.numel() == 0:
        return
    assert lse.dtype == torch.float32 and not torch.isnan(lse).any(), f"{what}: LSE has NaN entries (not written?)"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), (
        f"{what}: LSE -inf positions differ from the reference ({int((torch.isfinite(lse) != finite).sum())} rows)")
    assert (lse[~finite] == -math.inf).all(), f"{what}: rows with no keys must have LSE = -inf"
    if finite.any():
        err = (lse[finite] - lse_ref[finite].float()).abs().max().item()
        assert err <= tol, f"{what}: max |lse - lse_ref| = {err:.3e} > {tol:.3e}"


def _references(q, k, v, **kw):
    """(out_ref float32, lse_ref float32, out_pt bfloat16, LSE tolerance) for the same call."""
    out_ref, lse_ref = attention_ref(q, k, v, upcast=True, **kw)
    return out_ref, lse_ref, attention_fp8_lowp(q, k, v, **kw), _lse_tolerance(q, k, **kw)


def _check_paths(q, k, v, *, causal, descale, varlen=None, what=""):
    """The allocating function and varlen_fwd into a guarded NaN out= view: both against the references,
    bit-identical to each other, nothing written outside out."""
    kw = dict(causal=causal, **descale)
    vkw = {}
    if varlen is not None:
        cu_q, cu_k, max_q, max_k = varlen
        vkw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        out_ref, lse_ref, out_pt, lse_tol = _references(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
        out1, lse1 = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kw)
    else:
        out_ref, lse_ref, out_pt, lse_tol = _references(q, k, v, **kw)
        out1, lse1 = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    dv = v.shape[-1]
    storage, buf = _guarded_out(q, dv)
    out2, lse2 = varlen_fwd(q, k, v, **vkw, out=buf, **kw)

    assert out2.data_ptr() == buf.data_ptr() and out2.stride() == buf.stride(), "varlen_fwd must write into out="
    assert out1.shape == (*q.shape[:-1], dv) and lse1.shape == lse_ref.shape
    for name, out, lse in (("allocated", out1, lse1), ("out=", out2, lse2)):
        _assert_out_close(out, out_ref, out_pt, what=f"{what} [{name}]")
        _assert_lse_close(lse, lse_ref, what=f"{what} [{name}]", tol=lse_tol)
    _assert_guard_intact(storage, dv, what)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2), f"{what}: outputs differ between the two paths"


# ---------------------------------------------------------------------------------------------------------
# Accuracy: dense and variable-length batches

DENSE_CASES = _grid((HEAD_DIMS, CAUSAL, DESCALE_MODES), ((SEQLEN_PAIRS, 1), (HEADS, 3), (LAYOUTS, 7)))


@needs_fp8
@pytest.mark.parametrize("d,causal,descale,seqlens,heads,layout", DENSE_CASES,
                         ids=["-".join(map(_name, c)) for c in DENSE_CASES])
def test_dense(d, causal, descale, seqlens, heads, layout):
    _require_head_dim(d)
    (s_q, s_k), (h, h_k), b = seqlens, heads, 2
    q, k, v = _dense_qkv(layout, b, s_q, s_k, h, h_k, d)
    _check_paths(q, k, v, causal=causal, descale=_descales(descale, b, h_k),
                 what=f"dense d={d} s_q={s_q} s_k={s_k} h={h} h_k={h_k} {layout} descale={descale}")


VARLEN_CASES = _grid((HEAD_DIMS, CAUSAL), ((list(VARLEN_PATTERNS), 1), (HEADS, 1), (DESCALE_MODES, 2),
                                           (LAYOUTS, 3)))


@needs_fp8
@pytest.mark.parametrize("d,causal,pattern,heads,descale,layout", VARLEN_CASES,
                         ids=["-".join(map(_name, c)) for c in VARLEN_CASES])
def test_varlen(d, causal, pattern, heads, descale, layout):
    _require_head_dim(d)
    lq, lk = _varlen_lengths(pattern)
    h, h_k = heads
    q, k, v = _packed_qkv(layout, sum(lq), sum(lk), h, h_k, d)
    varlen = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
    _check_paths(q, k, v, causal=causal, descale=_descales(descale, len(lq), h_k), varlen=varlen,
                 what=f"varlen d={d} lengths_q={lq} lengths_k={lk} h={h} h_k={h_k} {layout} descale={descale}")


# ---------------------------------------------------------------------------------------------------------
# Short calls: every sequence's query rows (times the PackGQA group) fit one 64-row tile and its keys one
# 128-key block; they run on the short tile, two CTAs per SM (hopper/tile_config.h short_tiles)

SHORT_CASES = [  # (name, lengths_q, lengths_k, (h, h_k), causal)
    ("guide_case2", [64] * 84, [64] * 84, (16, 16), False),  # 1344 tiles: several per CTA
    ("odd", [0, 1, 17, 64, 63, 33], [128, 0, 113, 64, 1, 127], (8, 8), True),
    ("gqa", [16, 1, 9, 0], [100, 128, 9, 77], (8, 2), False),  # 4 heads x 16 rows fill one packed tile
    ("mqa_decode", [1] * 40, list(range(3, 123, 3)), (8, 1), True),
]
SHORT_GRID = [(d, *c) for d in (64, 80, 128) for c in SHORT_CASES]


@needs_fp8
@pytest.mark.parametrize("d,name,lq,lk,heads,causal", SHORT_GRID, ids=[f"d{c[0]}-{c[1]}" for c in SHORT_GRID])
def test_short_sequences(d, name, lq, lk, heads, causal):
    _require_head_dim(d)
    h, h_k = heads
    q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d)
    varlen = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
    _check_paths(q, k, v, causal=causal, descale=_descales("random", len(lq), h_k), varlen=varlen,
                 what=f"short {name} d={d} h={h} h_k={h_k} causal={causal}")


# ---------------------------------------------------------------------------------------------------------
# seqused and the kv cache: NaN past the used rows must not leak in, and out rows past seqused_q stay unwritten


@needs_fp8
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense_seqused_k", "varlen_seqused_qk"])
def test_seqused_nan_safe(causal, varlen):
    d, h, h_k = 128, 8, 2
    _require_head_dim(d)
    if varlen:
        lq, lk = [113, 0, 1023, 17, 1], [1023, 0, 113, 239, 17]
        uq = [int(torch.randint(0, n + 1, ())) for n in lq]
        uk = [int(torch.randint(0, n + 1, ())) for n in lk]
        uq[0], uq[2], uk[4] = 50, 1023, 0  # a partial sequence, a full one, used queries that see no key
        b = len(lq)
        q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d)
        cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
        seqused_q = torch.tensor(uq, dtype=torch.int32, device=DEVICE)
        meta = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=seqused_q)
        starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
        rows = torch.zeros(sum(lq), dtype=torch.bool, device=DEVICE)  # the used q rows: the defined outputs
        for s, u in zip(starts_q, uq):
            rows[s:s + u] = True
        poison_q = [slice(s + u, s + n) for s, u, n in zip(starts_q, uq, lq)]
        poison_k = [slice(s + u, s + n) for s, u, n in zip(starts_k, uk, lk)]
        vkw = dict(meta, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    else:
        b, s_q, s_k = 4, 17, 1023
        uk = _randint(1, s_k, b)
        uk[0], uk[1] = 0, s_k
        q, k, v = _dense_qkv("contig", b, s_q, s_k, h, h_k, d)
        meta, rows, poison_q = {}, None, []
        poison_k = [(i, slice(u, s_k)) for i, u in enumerate(uk)]
        vkw = {}
    seqused_k = torch.tensor(uk, dtype=torch.int32, device=DEVICE)
    descale = _descales("random", b, h_k)
    out_ref, lse_ref, out_pt, lse_tol = _references(q, k, v, seqused_k=seqused_k, causal=causal, **meta, **descale)
    for sl in poison_q:
        _poison_rows(q, sl)
    for sl in poison_k:
        _poison_rows(k, sl)
        _poison_rows(v, sl)

    storage, buf = _guarded_out(q, d)
    out, lse = varlen_fwd(q, k, v, **vkw, seqused_k=seqused_k, causal=causal, out=buf, **descale)
    what = f"seqused used_k={uk}" + (f" lengths_q={lq} used_q={uq} lengths_k={lk}" if varlen else "")
    _assert_out_close(out, out_ref, out_pt, rows, what)
    _assert_lse_close(lse, lse_ref, rows, what, tol=lse_tol)
    _assert_guard_intact(storage, d, what)
    if rows is not None:
        assert torch.isnan(out[~rows]).all(), (
            f"{what}: rows past seqused_q must be left unwritten (varlen_fwd's contract), but some were written")


@needs_fp8
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("s_q", [1, 17])
def test_kvcache(s_q, causal):
    """flash_attn_with_kvcache on fp8 caches with random cache_seqlens (one of them 0), NaN past them, GQA."""
    b, s_cache, h, h_k, d = 5, 1023, 8, 2, 128
    _require_head_dim(d)
    q, k_cache, v_cache = _dense_qkv("contig", b, s_q, s_cache, h, h_k, d)
    lengths = _randint(1, s_cache, b)
    lengths[0], lengths[1] = 0, s_cache
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    descale = _descales("random", b, h_k)
    out_ref, lse_ref, out_pt, lse_tol = _references(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=causal,
                                                    **descale)
    for i, n in enumerate(lengths):
        _poison_rows(k_cache, (i, slice(n, s_cache)))
        _poison_rows(v_cache, (i, slice(n, s_cache)))
    out, lse, *_ = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=causal,
                                           return_softmax_lse=True, **descale)
    what = f"kvcache s_q={s_q} cache_seqlens={lengths}"
    _assert_out_close(out, out_ref, out_pt, what=what, max_mult=KVCACHE_MAX_MULT)
    _assert_lse_close(lse, lse_ref, what=what, tol=lse_tol)


# ---------------------------------------------------------------------------------------------------------
# Descale strides: the kernel reads (b, h_k) through the tensor's strides, and None means exactly 1


@needs_fp8
@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
def test_descale_layouts_give_identical_results(causal):
    b, s, h, h_k, d = 3, 239, 8, 2, 128
    _require_head_dim(d)
    q, k, v = _dense_qkv("contig", b, s, s, h, h_k, d)

    def run(**descale):
        return flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, **descale)

    def same(a, c, what):
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]), f"{what} changed the result"

    vals = {name: _rand_descale(b, h_k) for name in ("q_descale", "k_descale", "v_descale")}
    base = run(**vals)
    same(base, run(**{n: x.t().contiguous().t() for n, x in vals.items()}), "column-major (b, h_k) descales")
    wide = {n: torch.full((b, 3 * h_k), math.nan, device=DEVICE) for n in vals}  # NaN between the used columns
    for n, x in vals.items():
        wide[n][:, 1::3] = x
    same(base, run(**{n: w[:, 1::3] for n, w in wide.items()}), "sliced (b, h_k) descale views (strides (3h_k, 3))")

    scalar = {"q_descale": 0.5, "k_descale": 1.25, "v_descale": 3.0}
    full = run(**{n: torch.full((b, h_k), x, device=DEVICE) for n, x in scalar.items()})
    same(full, run(**{n: torch.tensor(x, device=DEVICE).expand(b, h_k) for n, x in scalar.items()}),
         "expanded scalar descales (strides (0, 0))")
    ones = {n: torch.ones(b, h_k, device=DEVICE) for n in vals}
    same(run(), run(**ones), "all-ones descales instead of None")
    kd = vals["k_descale"]
    same(run(k_descale=kd), run(k_descale=kd, q_descale=None, v_descale=ones["v_descale"]),
         "v_descale = 1 instead of None")


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


@needs_fp8
def test_cuda_graph_capture_and_replay():
    d, h, h_k = 128, 8, 2
    _require_head_dim(d)
    lq, lk = [113, 1, 0, 1023, 17], [239, 17, 0, 1023, 1]
    q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d)
    cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
    q_scalar = torch.tensor(0.5, device=DEVICE)
    descale = {"q_descale": q_scalar.expand(len(lq), h_k), "k_descale": _rand_descale(len(lq), h_k),
               "v_descale": _rand_descale(len(lq), h_k)}

    def attn():
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, return_attn_probs=True,
                                      **descale)

    graph, (out_g, lse_g) = capture_graph(attn)

    # New data and new descale values (read at replay time, not baked in at capture), then new lengths with
    # the same totals and maxima.
    perm = (3, 0, 2, 4, 1)
    for replay in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device=DEVICE, dtype=BF16).to(FP8))
        q_scalar.fill_(float(torch.empty(()).uniform_(0.25, 2.0)))
        descale["k_descale"].copy_(_rand_descale(len(lq), h_k))
        descale["v_descale"].copy_(_rand_descale(len(lq), h_k))
        if replay == 2:
            cu_q.copy_(_cu_seqlens([lq[i] for i in perm]))
            cu_k.copy_(_cu_seqlens([lk[i] for i in perm]))
        graph.replay()
        out_e, lse_e = attn()
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e), f"replay {replay} differs from eager"


@needs_fp8
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_matches_eager(varlen):
    d, h, h_k = 128, 8, 2
    _require_head_dim(d)
    torch._dynamo.reset()
    if varlen:
        lq, lk = [17, 0, 239], [1023, 5, 113]
        q, k, v = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d)
        cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
        b = len(lq)

        def attn(q, k, v, qd, kd, vd):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, q_descale=qd,
                                          k_descale=kd, v_descale=vd, return_attn_probs=True)
    else:
        b = 2
        q, k, v = _dense_qkv("contig", b, 239, 1023, h, h_k, d)

        def attn(q, k, v, qd, kd, vd):
            return flash_attn_func(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd,
                                   return_attn_probs=True)

    args = (q, k, v, torch.tensor(0.75, device=DEVICE).expand(b, h_k), _rand_descale(b, h_k), _rand_descale(b, h_k))
    out_c, lse_c = torch.compile(attn, fullgraph=True)(*args)
    out_e, lse_e = attn(*args)
    assert out_c.dtype == BF16 and out_c.shape == out_e.shape
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: errors that name the argument, before any kernel runs (these need no fp8 kernel)


def _bad_calls():
    b, s, h, h_k, d = 2, 113, 8, 2, 128
    q, k, v = _dense_qkv("contig", b, s, s, h, h_k, d)
    lq, lk = [17, 113], [239, 5]
    pq, pk, pv = _packed_qkv("contig", sum(lq), sum(lk), h, h_k, d)
    packed = (_cu_seqlens(lq), _cu_seqlens(lk), max(lq), max(lk))
    q16, k16, v16 = (t.to(torch.float16) for t in (q, k, v))
    ok = _rand_descale(b, h_k)
    return {
        "out_fp16": (TypeError, r"^out: .*bfloat16",
                     lambda: varlen_fwd(q, k, v, out=torch.empty(b, s, h, d, dtype=torch.float16, device=DEVICE))),
        "out_fp8": (TypeError, r"^out: .*bfloat16",
                    lambda: varlen_fwd(q, k, v, out=torch.empty(b, s, h, d, device=DEVICE).to(FP8))),
        "k_descale_heads": (ValueError, r"^k_descale: must have shape \(batch, num_heads_k\)",
                            lambda: flash_attn_func(q, k, v, q_descale=ok, k_descale=_rand_descale(b, h))),
        "q_descale_1d": (ValueError, r"^q_descale: must have shape",
                         lambda: flash_attn_func(q, k, v, q_descale=_rand_descale(b))),
        "v_descale_varlen_batch": (ValueError, r"^v_descale: must have shape \(batch, num_heads_k\) = \(2, 2\)",
                                   lambda: flash_attn_varlen_func(pq, pk, pv, *packed,
                                                                  v_descale=_rand_descale(3, h_k))),
        "kvcache_k_descale": (ValueError, r"^k_descale: must have shape",
                              lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=s,
                                                              k_descale=_rand_descale(b + 1, h_k))),
        "descale_dtype": (TypeError, r"^v_descale: must have dtype torch.float32",
                          lambda: flash_attn_func(q, k, v, v_descale=ok.half())),
        "descale_fp16_inputs": (ValueError, r"^q_descale: only valid with torch.float8_e4m3fn",
                                lambda: flash_attn_func(q16, k16, v16, q_descale=ok)),
        "descale_bf16_varlen": (ValueError, r"^k_descale: only valid with torch.float8_e4m3fn",
                                lambda: flash_attn_varlen_func(pq.to(BF16), pk.to(BF16), pv.to(BF16), *packed,
                                                               k_descale=torch.ones(2, h_k, device=DEVICE))),
    }


BAD_CASES = ["out_fp16", "out_fp8", "k_descale_heads", "q_descale_1d", "v_descale_varlen_batch", "kvcache_k_descale",
             "descale_dtype", "descale_fp16_inputs", "descale_bf16_varlen"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_arguments_raise(case):
    exc, message, call = _bad_calls()[case]
    with pytest.raises(exc, match=message):
        call()
    torch.cuda.synchronize()  # nothing was launched that could fault later


OP_BAD_CASES = ["out_fp16", "k_descale_shape", "descale_fp16_inputs"]


@pytest.mark.parametrize("case", OP_BAD_CASES)
def test_op_rejects_bad_fp8_arguments(case):
    """The same rules in the C++ op, for callers of torch.ops.flash_attn3.fwd: a clear error naming the
    argument, and a healthy device afterwards. The fp8-input cases need the fp8 build (otherwise the op may
    refuse the dtype first)."""
    if case != "descale_fp16_inputs" and not FP8_BUILT:
        pytest.skip("fp8 kernels are not built (FEATURES['fp8'] is off in flash_attn3/_build_config.py)")
    b, s, h, h_k, d = 2, 113, 8, 2, 128
    q, k, v = _dense_qkv("contig", b, s, s, h, h_k, d)
    if case == "out_fp16":
        args = op_args(q, k, v, out=torch.empty(b, s, h, d, dtype=torch.float16, device=DEVICE))
        match = r"\bout\b.*dtype"
    elif case == "k_descale_shape":
        args, match = op_args(q, k, v, k_descale=_rand_descale(b, h)), r"k_descale.*shape"
    else:
        q16, k16, v16 = (t.to(torch.float16) for t in (q, k, v))
        args, match = op_args(q16, k16, v16, q_descale=_rand_descale(b, h_k)), r"q_descale.*float8"
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.flash_attn3.fwd(*args)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# An understated max_seqlen_k (a host bound below the longest sequence) must not leave part of the transposed
# V copy unwritten: nothing non-finite appears, the result meets FA3's rule against the references, and where
# both bounds pick the same kernel it equals the call with the true bound bit for bit. A bound <= 128 picks the
# 128-key tile (tile_config.h keys_fit_narrow), whose blocks round P to FP8 against other running maxima, so
# there the true bound's call is not bitwise the same computation (session 15: torch.equal failed at 0, 1, 64
# with every output finite).

@needs_fp8
@pytest.mark.parametrize("max_k", [0, 1, 64, 200])
def test_varlen_understated_max_seqlen_k(max_k):
    d = 128
    _require_head_dim(d)
    lk, lq = [17, 1023, 400, 0], [5, 33, 200, 9]
    cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
    q, k, v = _packed_qkv("contig", sum(lq), sum(lk), 8, 2, d)
    kw = dict(causal=False, **_descales("random", len(lq), 2))
    out_ref, _, out_pt, _ = _references(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    want = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw)
    # Fill the caching allocator's free blocks with fp8 NaN bytes, so stale workspace memory would show.
    junk = torch.full((64 << 20,), 0x7F, dtype=torch.uint8, device=DEVICE)
    del junk
    got = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max_k, **kw)
    assert torch.isfinite(got).all(), f"max_seqlen_k={max_k}: non-finite output (unwritten workspace read)"
    _assert_out_close(got, out_ref, out_pt, what=f"max_seqlen_k={max_k}")
    if max_k > 128:  # the same tile as the true bound's (max(lk) > 128)
        assert torch.equal(got, want), f"max_seqlen_k={max_k}: result differs from the true bound's"
