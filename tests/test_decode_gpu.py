"""GPU tests of split-KV (num_splits), PackGQA (pack_gqa), flash_attn_combine and get_scheduler_metadata, and
the decode correctness grid: s_q 1 to 128 against KV caches of 1 to 65536 tokens.

Attention results are compared with flash_attn3.reference.attention_ref (float32, unsplit) under FA3's rule, as
in tests/test_fwd_gpu.py and tests/test_fp8_gpu.py:

  16-bit  max |out - out_ref| <= 2 * max |out_pt - out_ref| + OUT_FLOOR, with out_pt PyTorch computing in the
          input dtype (attention_ref upcast=False, reorder_ops=True); LSE within LSE_ATOL of the float32 LSE.
  fp8     out is bfloat16; max error <= mult * PyTorch's (mult 2, 4 through the kv cache as FA3) + FA3's fwd_atol
          floor, mean error <= 3 * PyTorch's mean error + FP8_MEAN_FLOOR, with out_pt the bfloat16 baseline with
          FP8 P of tests/_fp8_ref.py; LSE within LSE_ATOL plus the FP8 accumulation allowance.

A split call must give the unsplit answer: out and LSE against the unsplit reference, and its LSE within the same
tolerance of the num_splits=1 kernel's. LSE rows that see no key must be -inf exactly where the reference's are.
flash_attn_combine is compared with flash_attn3.reference.combine_ref evaluated in float64: float32 out within
atol = rtol = 1e-5, float16 / bfloat16 out within one unit of their rounding (rtol = the dtype's eps, atol 1e-5),
LSE within atol = rtol = 1e-5 (FA3's test_flash_attn_combine).

Beyond accuracy: every `out=` buffer starts as NaN (an unwritten element fails), cache positions past
cache_seqlens / seqused_k are filled with NaN or with huge values of random sign (a kernel that reads them into
the result fails), the public functions and varlen_fwd must agree bit for bit, and a scheduler_metadata call
must be bit-identical to the call without it. Inputs are freshly random on every run (the seed is printed on a
failure). The grids are chosen so that every value of every axis appears without the full product; the whole
module is meant to stay within about a minute of GPU time.

The module skips (with the reason) unless an SM90 GPU and the compiled extension are both present; single
cases skip when the build record lacks what they need (split_kv, pack_gqa, fp8, a head dim).
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import pytest
import torch

from _gpu import capture_graph, skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

from _fp8_ref import attention_fp8_lowp  # noqa: E402

from flash_attn3 import (_ops, flash_attn_combine, flash_attn_func, flash_attn_varlen_func,  # noqa: E402
                         flash_attn_with_kvcache, get_scheduler_metadata, varlen_fwd)
from flash_attn3.reference import attention_ref, combine_ref  # noqa: E402

DEVICE = "cuda"
BF16, F16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
FP8_NAN_BYTE, FP8_MAX_BYTE, FP8_MIN_BYTE = 0x7F, 0x7E, 0xFE  # e4m3fn NaN, +448, -448
HUGE_16BIT = 6e4  # near float16's largest finite value; a poisoned key read into the scores dominates them

# 16-bit output floor (as tests/test_fwd_gpu.py): float32 summation-order differences and the 16-bit rounding of
# outputs near zero; only matters where the low-precision baseline is exact (e.g. a single visible key).
OUT_FLOOR = 3e-5
LSE_ATOL = 1e-3  # float32 LSE of identical inputs in kernel and reference
# FP8 (as tests/test_fp8_gpu.py): FA3's multipliers, the mean-error floor, and the allowance for the FP8 tensor
# cores' reduced-precision accumulation of S = Q K^T (about 2^-12 of the largest scaled sum_i |q_i k_i|).
FP8_MAX_MULT, FP8_KVCACHE_MAX_MULT, FP8_MEAN_MULT = 2, 4, 3
FP8_MEAN_FLOOR = 1e-4
FP8_LSE_ACC_REL = 2.0 ** -12
# flash_attn_combine against the float64 reference.
COMBINE_ATOL = COMBINE_RTOL = 1e-5

CAUSAL = [False, True]
S_Q = [1, 2, 7, 64, 128]
CACHE_LENS = [1, 17, 1023, 8192, 65536]
LONG_CACHE = 8192  # caches longer than this run with one key head and batch 3 (small heads, bounded reference)
SPLITS = [1, 2, 3, 7, 64, 256, 0]  # forced counts (1 = off, 256 = the maximum, far more than key blocks) and 0
SPLIT_ON = [2, 3, 7, 64, 256, 0]  # the split-KV tests of the non-cache functions (1 is every other test)
# (num_heads, num_heads_k): group sizes 1, 2, 4, 8, 16 (MQA) and 6 (MQA, not a power of two).
GROUP_HEADS = [(4, 4), (8, 4), (8, 2), (16, 2), (16, 1), (6, 1)]
# PackGQA: group sizes 1, 2, 3, 4, 6, 8, 16.
PACK_HEADS = [(4, 4), (4, 2), (6, 2), (8, 2), (6, 1), (16, 2), (16, 1)]
HEAD_DIMS = [128, 64, 256, 96]
POISON = ["nan", "huge"]


def _grid(main_axes, rotated):
    """The product of `main_axes`; each (axis, pace) of `rotated` cycles along it, advancing every `pace` cases,
    so every value of every axis appears without the full product."""
    cases = []
    for i, main in enumerate(itertools.product(*main_axes)):
        cases.append((*main, *(axis[(i // pace) % len(axis)] for axis, pace in rotated)))
    return cases


def _name(x):
    """Test-id text of one parameter value."""
    if isinstance(x, torch.dtype):
        return {BF16: "bf16", F16: "fp16", FP8: "fp8", torch.float32: "fp32"}.get(x, str(x))
    if isinstance(x, bool):
        return "causal" if x else "full"
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def _require(dtype, d, num_splits=1, pack_gqa=None):
    """Skips a case that needs what this build did not compile (the build record, flash_attn3/_build_config.py)."""
    if dtype == FP8 and not _ops.BUILD.has("fp8"):
        pytest.skip("fp8 kernels are not built (FEATURES['fp8'] is off)")
    if _ops.BUILD.compiled_head_dim(dtype, d) is None:
        pytest.skip(f"no {_name(dtype)} kernel serves head dim {d}; compiled: {list(_ops.BUILD.head_dims_for(dtype))}")
    if num_splits > 1 and not _ops.BUILD.has("split_kv"):
        pytest.skip("split-KV is not built (FEATURES['split_kv'] is off)")
    if pack_gqa is True and not _ops.BUILD.has("pack_gqa"):
        pytest.skip("PackGQA is not built (FEATURES['pack_gqa'] is off)")


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _rand(dtype, *shape):
    """randn in `dtype`; fp8 is drawn in bfloat16 and quantised, so kernel and references see the same values."""
    if dtype == FP8:
        return torch.randn(*shape, device=DEVICE, dtype=BF16).to(FP8)
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _out_dtype(dtype):
    return BF16 if dtype == FP8 else dtype


def _descales(dtype, b, h_k):
    """Random float32 (b, h_k) q/k/v descales for fp8 inputs, none for 16-bit ones."""
    if dtype != FP8:
        return {}
    return {name: torch.rand(b, h_k, device=DEVICE) * 1.75 + 0.25 for name in ("q_descale", "k_descale", "v_descale")}


def _randint(lo, hi, n):
    return torch.randint(lo, hi + 1, (n,)).tolist()


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _cu_seqlens(lengths):
    return _i32([0, *itertools.accumulate(lengths)])


def _cache_lengths(b, cache_len):
    """b valid lengths in [0, cache_len]: one 0 and one cache_len (full) at random positions, the rest random."""
    lengths = _randint(0, cache_len, b)
    zero, full = torch.randperm(b)[:2].tolist()
    lengths[zero], lengths[full] = 0, cache_len
    return lengths


def _poison(view, mode):
    """Overwrites `view` (positions no result may depend on) in place: NaN, or huge values of random sign."""
    if view.numel() == 0:
        return
    if view.dtype == FP8:
        raw = view.view(torch.uint8)
        if mode == "nan":
            raw.fill_(FP8_NAN_BYTE)
        else:
            sign = torch.rand(raw.shape, device=DEVICE) < 0.5
            raw.copy_(torch.where(sign, FP8_MAX_BYTE, FP8_MIN_BYTE).to(torch.uint8))
        return
    if mode == "nan":
        view.fill_(math.nan)
    else:
        sign = torch.rand(view.shape, device=DEVICE) < 0.5
        view.copy_(torch.where(sign, HUGE_16BIT, -HUGE_16BIT))


def _poison_cache_tails(caches, lengths, mode):
    """Poisons positions [lengths[i], end) of row i of each dense cache (b, seqlen_cache, h_k, d)."""
    for t in caches:
        for i, n in enumerate(lengths):
            _poison(t[i, n:], mode)


def _nan_out(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------------------------
# References and checks


class Refs(NamedTuple):
    out: torch.Tensor  # float32 attention of the (dequantised) inputs
    lse: torch.Tensor  # its float32 LSE
    pt: torch.Tensor  # PyTorch at low precision, in the output dtype
    lse_tol: float
    fp8: bool


def _fp8_lse_tolerance(q, k, q_descale=None, k_descale=None, softmax_scale=None):
    """LSE_ATOL plus 2^-12 of a Cauchy-Schwarz bound of the largest scaled sum_i |q_i k_i| (tests/test_fp8_gpu.py)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    bound = abs(scale) * q.float().norm(dim=-1).max().item() * k.float().norm(dim=-1).max().item()
    for descale in (q_descale, k_descale):
        if descale is not None:
            bound *= descale.abs().max().item()
    return LSE_ATOL + FP8_LSE_ACC_REL * bound


def _references(q, k, v, **kw):
    """References of one call from clean inputs (compute them before poisoning). `kw` are attention_ref
    arguments that tests/_fp8_ref.attention_fp8_lowp accepts too."""
    out_ref, lse_ref = attention_ref(q, k, v, upcast=True, **kw)
    if q.dtype == FP8:
        pt = attention_fp8_lowp(q, k, v, **kw)
        tol = _fp8_lse_tolerance(q, k, kw.get("q_descale"), kw.get("k_descale"), kw.get("softmax_scale"))
        return Refs(out_ref, lse_ref, pt, tol, True)
    pt, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
    return Refs(out_ref, lse_ref, pt, LSE_ATOL, False)


def _assert_lse_close(lse, lse_ref, tol, what):
    assert lse.dtype == torch.float32, f"{what}: LSE dtype {lse.dtype}, expected float32"
    assert tuple(lse.shape) == tuple(lse_ref.shape), f"{what}: LSE shape {tuple(lse.shape)} != {tuple(lse_ref.shape)}"
    if lse.numel() == 0:
        return
    assert not torch.isnan(lse).any(), f"{what}: LSE has NaN entries (not written?)"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), (
        f"{what}: LSE -inf positions differ from the reference ({int((torch.isfinite(lse) != finite).sum())} rows)")
    assert (lse[~finite] == -math.inf).all(), f"{what}: rows that see no key must have LSE = -inf"
    if finite.any():
        err = (lse[finite] - lse_ref[finite].float()).abs().max().item()
        assert err <= tol, f"{what}: max |lse - lse_ref| = {err:.3e} > {tol:.3e}"


def _check(out, lse, refs, what, kvcache=False):
    """out and LSE of one call against its references (module docstring's rule)."""
    assert out.dtype == refs.pt.dtype, f"{what}: out dtype {out.dtype}, expected {refs.pt.dtype}"
    assert tuple(out.shape) == tuple(refs.out.shape), f"{what}: out shape {tuple(out.shape)} != {tuple(refs.out.shape)}"
    _assert_lse_close(lse, refs.lse, refs.lse_tol, what)
    if out.numel() == 0:
        return
    nan = torch.isnan(out)
    assert not nan.any(), f"{what}: {int(nan.sum())} output elements are NaN (unwritten, or poison read)"
    err = (out.float() - refs.out.float()).abs()
    pt_err = (refs.pt.float() - refs.out.float()).abs()
    if refs.fp8:
        mult = FP8_KVCACHE_MAX_MULT if kvcache else FP8_MAX_MULT
        r = refs.out.to(BF16)
        floor = 2 * ((r + 0.3 - 0.3) - r).abs().max().item()  # FA3's fwd_atol in the output dtype
        assert err.mean().item() <= FP8_MEAN_MULT * pt_err.mean().item() + FP8_MEAN_FLOOR, (
            f"{what}: mean |out - ref| = {err.mean().item():.3e} exceeds {FP8_MEAN_MULT} * "
            f"{pt_err.mean().item():.3e} (PyTorch, bf16 with fp8 P) + {FP8_MEAN_FLOOR}")
    else:
        mult, floor = 2, OUT_FLOOR
    assert err.max().item() <= mult * pt_err.max().item() + floor, (
        f"{what}: max |out - ref| = {err.max().item():.3e} exceeds {mult} * {pt_err.max().item():.3e} (PyTorch at "
        f"low precision) + {floor:.1e}")


def _assert_same(a, b, what):
    """Bitwise equality of (out, lse) pairs: the same call through another path or buffer."""
    assert torch.equal(a[0], b[0]), f"{what}: outputs differ bitwise"
    assert torch.equal(a[1], b[1]), f"{what}: LSEs differ bitwise"


def _assert_wrote_into(result, buf, what):
    assert result.data_ptr() == buf.data_ptr() and result.stride() == buf.stride(), (
        f"{what}: the call must write into and return the given out= buffer")


def _assert_lse_matches_unsplit(lse, lse_unsplit, refs, what):
    """The LSE of a split call equals the num_splits=1 kernel's (same -inf rows, within the LSE tolerance)."""
    _assert_lse_close(lse, lse_unsplit, refs.lse_tol, f"{what} [vs num_splits=1]")


# ---------------------------------------------------------------------------------------------------------
# The decode grid: flash_attn_with_kvcache (allocating) and varlen_fwd with seqused_k (into a NaN out=) on one
# dense cache with random per-sequence lengths (one 0, one full), NaN / huge values past them.

DECODE_CASES = _grid((CACHE_LENS, SPLITS, CAUSAL),
                     ((S_Q, 1), (GROUP_HEADS, 1), (HEAD_DIMS, 2), (POISON, 3), ([BF16, F16, BF16, FP8, BF16], 7)))


def _decode_id(case):
    cache_len, num_splits, causal, s_q, heads, d, poison, dtype = case
    return (f"cache{cache_len}-splits{num_splits}-{_name(causal)}-sq{s_q}-h{_name(heads)}-d{d}-{poison}-"
            f"{_name(dtype)}")


@pytest.mark.parametrize("cache_len,num_splits,causal,s_q,heads,d,poison,dtype", DECODE_CASES,
                         ids=[_decode_id(c) for c in DECODE_CASES])
def test_decode(cache_len, num_splits, causal, s_q, heads, d, poison, dtype):
    _require(dtype, d, num_splits)
    h, h_k = heads
    b = 4
    if cache_len > LONG_CACHE:  # same group size, one key head: the reference stays small
        h, h_k, b = h // h_k, 1, 3
    q = _rand(dtype, b, s_q, h, d)
    k_cache, v_cache = _rand(dtype, b, cache_len, h_k, d), _rand(dtype, b, cache_len, h_k, d)
    lengths = _cache_lengths(b, cache_len)
    cache_seqlens = _i32(lengths)
    descale = _descales(dtype, b, h_k)
    refs = _references(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=causal, **descale)
    _poison_cache_tails((k_cache, v_cache), lengths, poison)
    what = f"decode h={h} h_k={h_k} s_q={s_q} cache_seqlens={lengths} num_splits={num_splits}"

    kw = dict(causal=causal, num_splits=num_splits, **descale)
    out, lse, *_ = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, return_softmax_lse=True,
                                           **kw)
    buf = _nan_out((b, s_q, h, d), _out_dtype(dtype))
    out2, lse2 = varlen_fwd(q, k_cache, v_cache, seqused_k=cache_seqlens, out=buf, **kw)
    _check(out, lse, refs, f"{what} [flash_attn_with_kvcache]", kvcache=True)
    _check(out2, lse2, refs, f"{what} [varlen_fwd out=]", kvcache=True)
    _assert_wrote_into(out2, buf, what)
    _assert_same((out, lse), (out2, lse2), f"{what}: flash_attn_with_kvcache vs varlen_fwd(seqused_k)")
    if num_splits != 1:
        _, lse1, *_ = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                              return_softmax_lse=True, **{**kw, "num_splits": 1})
        _assert_lse_matches_unsplit(lse, lse1, refs, what)


@pytest.mark.parametrize("num_splits", [-1, -3])
def test_negative_num_splits_is_the_heuristic(num_splits):
    """FA3 treats any num_splits <= 0 as "choose for me": a negative count must run the heuristic's schedule
    (bit-identical to num_splits=0) and match the reference, not raise."""
    dtype, b, h, h_k, d, cache_len = BF16, 2, 8, 2, 128, 3000
    _require(dtype, d, 0)
    q = _rand(dtype, b, 1, h, d)
    k_cache, v_cache = _rand(dtype, b, cache_len, h_k, d), _rand(dtype, b, cache_len, h_k, d)
    cache_seqlens = _i32([cache_len, 1234])
    refs = _references(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)
    got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True,
                                  num_splits=num_splits, return_softmax_lse=True)[:2]
    want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True, num_splits=0,
                                   return_softmax_lse=True)[:2]
    _check(*got, refs, f"num_splits={num_splits}", kvcache=True)
    _assert_same(got, want, f"num_splits={num_splits} vs num_splits=0")


# ---------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache with packed variable-length queries (cu_seqlens_q) against a dense cache


@pytest.mark.parametrize("causal", CAUSAL, ids=_name)
@pytest.mark.parametrize("num_splits", [1, 3, 256, 0])
def test_kvcache_varlen_q(num_splits, causal):
    dtype, b, h, h_k, d, cache_len, max_q = BF16, 5, 8, 2, 128, 2051, 64
    _require(dtype, d, num_splits)
    lq = _randint(0, max_q, b)
    lq[0], lq[2] = max_q, 0  # the longest sequence, and one without queries
    lengths = _cache_lengths(b, cache_len)
    cache_seqlens, cu_q = _i32(lengths), _cu_seqlens(lq)
    q = _rand(dtype, sum(lq), h, d)
    k_cache, v_cache = _rand(dtype, b, cache_len, h_k, d), _rand(dtype, b, cache_len, h_k, d)
    refs = _references(q, k_cache, v_cache, cu_seqlens_q=cu_q, cache_seqlens=cache_seqlens, causal=causal)
    _poison_cache_tails((k_cache, v_cache), lengths, "nan")
    what = f"kvcache varlen q lengths_q={lq} cache_seqlens={lengths} num_splits={num_splits}"

    out, lse, *_ = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, cu_seqlens_q=cu_q,
                                           max_seqlen_q=max_q, causal=causal, num_splits=num_splits,
                                           return_softmax_lse=True)
    buf = _nan_out((sum(lq), h, d), dtype)
    out2, lse2 = varlen_fwd(q, k_cache, v_cache, cu_seqlens_q=cu_q, max_seqlen_q=max_q, seqused_k=cache_seqlens,
                            out=buf, causal=causal, num_splits=num_splits)
    _check(out, lse, refs, f"{what} [flash_attn_with_kvcache]", kvcache=True)
    _check(out2, lse2, refs, f"{what} [varlen_fwd out=]", kvcache=True)
    _assert_wrote_into(out2, buf, what)
    _assert_same((out, lse), (out2, lse2), what)


# ---------------------------------------------------------------------------------------------------------
# Split-KV through flash_attn_func (dense) and flash_attn_varlen_func (cu_seqlens, seqused_k)

SPLIT_SEQLENS = [(1, 1), (1, 4097), (7, 300), (64, 2051), (128, 128), (1023, 239)]
SPLIT_DTYPES = [BF16, F16, BF16, FP8]
SPLIT_DENSE_CASES = _grid((SPLIT_ON, SPLIT_SEQLENS), ((CAUSAL, 1), (GROUP_HEADS, 1), (SPLIT_DTYPES, 2), (HEAD_DIMS, 5)))


@pytest.mark.parametrize("num_splits,seqlens,causal,heads,dtype,d", SPLIT_DENSE_CASES,
                         ids=[f"splits{c[0]}-sq{c[1][0]}-sk{c[1][1]}-{_name(c[2])}-h{_name(c[3])}-{_name(c[4])}-d{c[5]}"
                              for c in SPLIT_DENSE_CASES])
def test_split_dense(num_splits, seqlens, causal, heads, dtype, d):
    _require(dtype, d, num_splits)
    (s_q, s_k), (h, h_k), b = seqlens, heads, 2
    q, k, v = _rand(dtype, b, s_q, h, d), _rand(dtype, b, s_k, h_k, d), _rand(dtype, b, s_k, h_k, d)
    kw = dict(causal=causal, **_descales(dtype, b, h_k))
    refs = _references(q, k, v, **kw)
    what = f"split dense s_q={s_q} s_k={s_k} h={h} h_k={h_k} num_splits={num_splits}"

    out, lse = flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True, **kw)
    buf = _nan_out((b, s_q, h, d), _out_dtype(dtype))
    out2, lse2 = varlen_fwd(q, k, v, out=buf, num_splits=num_splits, **kw)
    _check(out, lse, refs, f"{what} [flash_attn_func]")
    _check(out2, lse2, refs, f"{what} [varlen_fwd out=]")
    _assert_wrote_into(out2, buf, what)
    _assert_same((out, lse), (out2, lse2), what)
    _, lse1 = flash_attn_func(q, k, v, num_splits=1, return_attn_probs=True, **kw)
    _assert_lse_matches_unsplit(lse, lse1, refs, what)


def _split_varlen_batch(pattern):
    """(lengths_q, lengths_k, used_k or None) of one packed batch."""
    if pattern == "random":
        return _randint(1, 200, 5), _randint(1, 1500, 5), None
    if pattern == "zero_k":  # queries that see no key (first and a middle sequence), and an empty sequence
        lq, lk = _randint(1, 128, 5), _randint(1, 1500, 5)
        lk[0] = lk[2] = 0
        lq[3] = lk[3] = 0
        return lq, lk, None
    if pattern == "decode":  # one query per sequence, like a varlen decode step
        lk = _randint(0, 3000, 8)
        lk[int(torch.randint(0, 8, ()))] = 0
        return [1] * 8, lk, None
    if pattern == "long":
        return [int(x) for x in torch.tensor([1, 64, 128])[torch.randint(0, 3, (3,))]], _randint(4000, 9000, 3), None
    if pattern == "seqused_k":  # packed k/v of which only the first used_k[i] rows count (NaN past them)
        lq, lk = _randint(1, 128, 5), _randint(1, 2000, 5)
        used = [int(torch.randint(0, n + 1, ())) for n in lk]
        used[0], used[1] = 0, lk[1]
        return lq, lk, used
    raise ValueError(pattern)


SPLIT_VARLEN_PATTERNS = ["random", "zero_k", "decode", "long", "seqused_k"]
SPLIT_VARLEN_CASES = _grid((SPLIT_ON, SPLIT_VARLEN_PATTERNS),
                           ((CAUSAL, 1), (GROUP_HEADS, 1), (SPLIT_DTYPES, 3), (HEAD_DIMS, 2)))


@pytest.mark.parametrize("num_splits,pattern,causal,heads,dtype,d", SPLIT_VARLEN_CASES,
                         ids=[f"splits{c[0]}-{c[1]}-{_name(c[2])}-h{_name(c[3])}-{_name(c[4])}-d{c[5]}"
                              for c in SPLIT_VARLEN_CASES])
def test_split_varlen(num_splits, pattern, causal, heads, dtype, d):
    _require(dtype, d, num_splits)
    h, h_k = heads
    lq, lk, used = _split_varlen_batch(pattern)
    b = len(lq)
    cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
    q = _rand(dtype, sum(lq), h, d)
    k, v = _rand(dtype, sum(lk), h_k, d), _rand(dtype, sum(lk), h_k, d)
    seqused_k = _i32(used) if used is not None else None
    descale = _descales(dtype, b, h_k)
    refs = _references(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k, causal=causal, **descale)
    if used is not None:
        for start, u, end in zip(cu_k[:-1].tolist(), used, cu_k[1:].tolist()):
            _poison(k[start + u:end], "nan")
            _poison(v[start + u:end], "nan")
    what = f"split varlen lengths_q={lq} lengths_k={lk} used_k={used} h={h} h_k={h_k} num_splits={num_splits}"

    kw = dict(seqused_k=seqused_k, causal=causal, num_splits=num_splits, **descale)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **kw)
    buf = _nan_out((sum(lq), h, d), _out_dtype(dtype))
    out2, lse2 = varlen_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), out=buf, **kw)
    _check(out, lse, refs, f"{what} [flash_attn_varlen_func]")
    _check(out2, lse2, refs, f"{what} [varlen_fwd out=]")
    _assert_wrote_into(out2, buf, what)
    _assert_same((out, lse), (out2, lse2), what)
    _, lse1 = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True,
                                     **{**kw, "num_splits": 1})
    _assert_lse_matches_unsplit(lse, lse1, refs, what)


# ---------------------------------------------------------------------------------------------------------
# PackGQA: pack_gqa None (heuristic), True and False give the same answer for every group size

PACK_CASES = _grid((PACK_HEADS, S_Q),
                   ((CAUSAL, 1), (["dense", "varlen"], 2), ([1, 0, 3], 1), ([128, 64, 256], 4), ([BF16, F16], 3)))


@pytest.mark.parametrize("heads,s_q,causal,layout,num_splits,d,dtype", PACK_CASES,
                         ids=[f"h{_name(c[0])}-sq{c[1]}-{_name(c[2])}-{c[3]}-splits{c[4]}-d{c[5]}-{_name(c[6])}"
                              for c in PACK_CASES])
def test_pack_gqa(heads, s_q, causal, layout, num_splits, d, dtype):
    _require(dtype, d, num_splits, pack_gqa=True)
    h, h_k = heads
    if layout == "dense":
        b, s_k = 2, _randint(1, 700, 1)[0]
        q, k, v = _rand(dtype, b, s_q, h, d), _rand(dtype, b, s_k, h_k, d), _rand(dtype, b, s_k, h_k, d)
        varlen, ref_kw = {}, {}
        what = f"pack_gqa dense s_q={s_q} s_k={s_k} h={h} h_k={h_k} num_splits={num_splits}"

        def call(pack_gqa):
            return flash_attn_func(q, k, v, causal=causal, num_splits=num_splits, pack_gqa=pack_gqa,
                                   return_attn_probs=True)
    else:
        lq, lk = _randint(0, s_q, 4), _randint(0, 700, 4)
        lq[0], lk[1] = s_q, 0  # max_seqlen_q is s_q; one sequence sees no key
        q = _rand(dtype, sum(lq), h, d)
        k, v = _rand(dtype, sum(lk), h_k, d), _rand(dtype, sum(lk), h_k, d)
        cu_q, cu_k = _cu_seqlens(lq), _cu_seqlens(lk)
        varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
        ref_kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        what = f"pack_gqa varlen lengths_q={lq} lengths_k={lk} h={h} h_k={h_k} num_splits={num_splits}"

        def call(pack_gqa):
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, num_splits=num_splits,
                                          pack_gqa=pack_gqa, return_attn_probs=True)

    refs = _references(q, k, v, causal=causal, **ref_kw)
    results = {}
    for pack_gqa in (None, True, False):
        results[pack_gqa] = call(pack_gqa)
        _check(*results[pack_gqa], refs, f"{what} pack_gqa={pack_gqa}")
    buf = _nan_out((*q.shape[:-1], d), dtype)
    out2, lse2 = varlen_fwd(q, k, v, **varlen, out=buf, causal=causal, num_splits=num_splits, pack_gqa=True)
    _check(out2, lse2, refs, f"{what} pack_gqa=True [varlen_fwd out=]")
    _assert_wrote_into(out2, buf, what)
    _assert_same(results[True], (out2, lse2), f"{what} pack_gqa=True")


# ---------------------------------------------------------------------------------------------------------
# flash_attn_combine against combine_ref (float64)

COMBINE_HEAD_DIMS = [64, 80, 128, 256]
COMBINE_SPLITS = [1, 2, 3, 17, 133, 256]
COMBINE_SEQLENS = [1, 3, 113]
# How the partials sit in memory (out_partial's last dim always contiguous):
#  contig       both contiguous (lse stride(-2) = num_heads: FA3 rejects this, flash_attn3 accepts any strides)
#  fa3          lse sequence-contiguous, as FA3 requires: a transposed view of (splits, b, h, s)
#  strided      out_partial every other split of (2 splits, b, h, s, d) with s and h swapped; lse a head slice
#  split_inner  the split dim innermost: views of (b, s, h, splits, d) and (b, s, h, splits)
#  varlen       4-D (splits, total_q, h, d) from (splits, h, total_q, d); lse (splits, total_q, h) from
#               (h, total_q, splits)
COMBINE_LAYOUTS = ["contig", "fa3", "strided", "split_inner", "varlen"]
COMBINE_OUT_DTYPES = [None, torch.float32, F16, BF16]
# -inf LSEs: none; 30% of (split, row) pairs; FA3's pattern (the upper half of the splits for the first third of
# the rows; every split when there is one); 20% of the pairs plus a quarter of the rows in every split.
COMBINE_INF = ["none", "some_splits", "half_splits", "whole_rows"]
# An LSE offset that overflows (100) or underflows (-100) float32 exp without the max subtraction.
COMBINE_OFFSETS = [0.0, 100.0, -100.0]
COMBINE_OUT = ["alloc", "nan", "nan_strided"]
COMBINE_CASES = _grid((COMBINE_HEAD_DIMS, COMBINE_SPLITS, COMBINE_SEQLENS),
                      ((COMBINE_LAYOUTS, 1), (COMBINE_INF, 1), (COMBINE_OUT_DTYPES, 2), (COMBINE_OFFSETS, 4),
                       (COMBINE_OUT, 7)))


def _combine_partials(layout, num_splits, b, s, h, d):
    """(out_partial, lse_partial) float32 randn views in the given layout."""
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    if layout == "contig":
        return randn(num_splits, b, s, h, d), randn(num_splits, b, s, h)
    if layout == "fa3":
        return randn(num_splits, b, s, h, d), randn(num_splits, b, h, s).transpose(-1, -2)
    if layout == "strided":
        return (randn(2 * num_splits, b, h, s, d)[::2].transpose(2, 3),
                randn(num_splits, b, 2 * h, s)[:, :, 1::2].transpose(-1, -2))
    if layout == "split_inner":
        return randn(b, s, h, num_splits, d).permute(3, 0, 1, 2, 4), randn(b, s, h, num_splits).permute(3, 0, 1, 2)
    if layout == "varlen":
        total = b * s + 1
        return randn(num_splits, h, total, d).transpose(1, 2), randn(h, total, num_splits).permute(2, 1, 0)
    raise ValueError(layout)


def _inf_mask(pattern, lse_shape):
    """Bool mask over lse_partial's shape of the (split, row) pairs to set to -inf."""
    num_splits, rows = lse_shape[0], math.prod(lse_shape[1:])
    mask = torch.zeros(num_splits, rows, dtype=torch.bool, device=DEVICE)
    if pattern == "some_splits":
        mask = torch.rand(num_splits, rows, device=DEVICE) < 0.3
    elif pattern == "half_splits":
        mask[num_splits // 2:, :rows // 3 + 1] = True
    elif pattern == "whole_rows":
        mask = torch.rand(num_splits, rows, device=DEVICE) < 0.2
        mask[:, torch.rand(rows, device=DEVICE) < 0.25] = True
    elif pattern != "none":
        raise ValueError(pattern)
    return mask.view(lse_shape)


def _combine_out_buffer(kind, shape, dtype):
    """None, a NaN-filled buffer, or a NaN-filled view of transposed storage ((b, h, s, d) / (h, total, d))."""
    if kind == "alloc":
        return None
    if kind == "nan":
        return _nan_out(shape, dtype)
    if len(shape) == 4:
        b, s, h, d = shape
        return _nan_out((b, h, s, d), dtype).transpose(1, 2)
    total, h, d = shape
    return _nan_out((h, total, d), dtype).transpose(0, 1)


def _assert_combined(out, lse, out_partial, lse_partial, dtype, what):
    """out/lse of flash_attn_combine against combine_ref in float64."""
    ref_out, ref_lse = combine_ref(out_partial.double(), lse_partial.double())
    assert out.dtype == dtype, f"{what}: out dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(out_partial.shape[1:]), f"{what}: out shape {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(lse_partial.shape[1:]), (
        f"{what}: lse must be float32 of shape {tuple(lse_partial.shape[1:])}, got {lse.dtype} {tuple(lse.shape)}")
    assert not torch.isnan(out).any(), f"{what}: out has NaN elements (unwritten, or an empty split read)"
    assert not torch.isnan(lse).any(), f"{what}: lse has NaN entries"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse = -inf exactly on the rows no split saw"
    assert (out[empty] == 0).all(), f"{what}: rows whose splits are all -inf must give out = 0"
    torch.testing.assert_close(lse.double(), ref_lse, atol=COMBINE_ATOL, rtol=COMBINE_RTOL,
                               msg=lambda m: f"{what}: lse: {m}")
    rtol = COMBINE_RTOL if dtype == torch.float32 else torch.finfo(dtype).eps  # one unit of the output rounding
    torch.testing.assert_close(out.double(), ref_out, atol=COMBINE_ATOL, rtol=rtol, msg=lambda m: f"{what}: out: {m}")


def _combine_id(case):
    d, num_splits, s, layout, inf, out_dtype, offset, out_kind = case
    return f"d{d}-splits{num_splits}-s{s}-{layout}-{inf}-{_name(out_dtype)}-lse{offset:+g}-{out_kind}"


@pytest.mark.parametrize("d,num_splits,s,layout,inf,out_dtype,offset,out_kind", COMBINE_CASES,
                         ids=[_combine_id(c) for c in COMBINE_CASES])
def test_combine(d, num_splits, s, layout, inf, out_dtype, offset, out_kind):
    b, h = 2, 3
    out_partial, lse_partial = _combine_partials(layout, num_splits, b, s, h, d)
    lse_partial.mul_(4).add_(offset)
    lse_partial[_inf_mask(inf, tuple(lse_partial.shape))] = -math.inf  # their out_partial stays finite randn
    dtype = out_dtype or torch.float32
    buf = _combine_out_buffer(out_kind, tuple(out_partial.shape[1:]), dtype)
    what = f"combine {tuple(out_partial.shape)} {layout} -inf={inf} out_dtype={out_dtype} lse+{offset} out={out_kind}"

    out, lse = flash_attn_combine(out_partial, lse_partial, out=buf, out_dtype=out_dtype)
    if buf is not None:
        _assert_wrote_into(out, buf, what)
    _assert_combined(out, lse, out_partial, lse_partial, dtype, what)


@pytest.mark.parametrize("garbage", ["nan", "inf"])
@pytest.mark.parametrize("num_splits", [2, 17, 256])
def test_combine_empty_splits_contribute_nothing(num_splits, garbage):
    """A split whose LSE is -inf contributes nothing, whatever its out_partial holds (a split-KV kernel need not
    write the partial output of an empty split)."""
    b, s, h, d = 2, 33, 4, 128
    out_partial = torch.randn(num_splits, b, s, h, d, device=DEVICE)
    lse_partial = torch.randn(num_splits, b, s, h, device=DEVICE) * 4
    mask = torch.rand(num_splits, b, s, h, device=DEVICE) < 0.5
    mask[:, 0, :3] = True  # rows no split saw
    mask[1:, 1, :3] = True  # rows only split 0 saw
    mask[0, 1, :3] = False
    lse_partial[mask] = -math.inf
    out_partial[mask] = math.nan if garbage == "nan" else math.inf
    out, lse = flash_attn_combine(out_partial, lse_partial, out=_nan_out((b, s, h, d), torch.float32))
    _assert_combined(out, lse, out_partial, lse_partial, torch.float32, f"combine with {garbage} in empty splits")


# ---------------------------------------------------------------------------------------------------------
# get_scheduler_metadata: a precomputed schedule changes no bit of the result

PACK = {"auto": None, "on": True, "off": False}
SCHED_CASES = _grid(([0, 1, 3, 64], list(PACK)),
                    (([1, 7, 128], 1), (CAUSAL, 1), ([(8, 2), (32, 8), (6, 1), (4, 4)], 1), ([4096, 1023, 17], 2),
                     (["dense_q", "dense_q", "varlen_q"], 5)))


@pytest.mark.parametrize("num_splits,pack,s_q,causal,heads,cache_len,q_layout", SCHED_CASES,
                         ids=[f"splits{c[0]}-pack_{c[1]}-sq{c[2]}-{_name(c[3])}-h{_name(c[4])}-cache{c[5]}-{c[6]}"
                              for c in SCHED_CASES])
def test_scheduler_metadata_is_bit_identical(num_splits, pack, s_q, causal, heads, cache_len, q_layout):
    dtype, d, b = BF16, 128, 5
    pack_gqa = PACK[pack]
    _require(dtype, d, num_splits, pack_gqa)
    h, h_k = heads
    lengths = _cache_lengths(b, cache_len)
    cache_seqlens = _i32(lengths)
    k_cache, v_cache = _rand(dtype, b, cache_len, h_k, d), _rand(dtype, b, cache_len, h_k, d)
    if q_layout == "varlen_q":
        lq = _randint(0, s_q, b)
        lq[0] = s_q
        cu_q = _cu_seqlens(lq)
        q = _rand(dtype, sum(lq), h, d)
        q_kw, ref_kw = dict(cu_seqlens_q=cu_q, max_seqlen_q=s_q), dict(cu_seqlens_q=cu_q)
    else:
        lq, cu_q = None, None
        q = _rand(dtype, b, s_q, h, d)
        q_kw, ref_kw = {}, {}
    refs = _references(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=causal, **ref_kw)
    _poison_cache_tails((k_cache, v_cache), lengths, "nan")
    what = f"scheduler_metadata cache_seqlens={lengths} lengths_q={lq} h={h} h_k={h_k} num_splits={num_splits}"

    metadata = get_scheduler_metadata(b, s_q, cache_len, h, h_k, d, cache_seqlens, qkv_dtype=dtype, cu_seqlens_q=cu_q,
                                      causal=causal, num_splits=num_splits, pack_gqa=pack_gqa)
    assert isinstance(metadata, torch.Tensor) and metadata.dtype == torch.int32, (
        f"{what}: get_scheduler_metadata must return an int32 tensor, got {metadata!r:.80}")
    assert metadata.device == cache_seqlens.device, f"{what}: metadata on {metadata.device}, not cache_seqlens'"
    kw = dict(cache_seqlens=cache_seqlens, causal=causal, num_splits=num_splits, pack_gqa=pack_gqa,
              return_softmax_lse=True, **q_kw)
    want = flash_attn_with_kvcache(q, k_cache, v_cache, **kw)[:2]
    _check(*want, refs, f"{what} [without metadata]", kvcache=True)
    for use in range(2):  # the same metadata serves repeated calls
        got = flash_attn_with_kvcache(q, k_cache, v_cache, scheduler_metadata=metadata, **kw)[:2]
        _assert_same(got, want, f"{what} [use {use} of the metadata]")


@pytest.mark.parametrize("refresh", [False, True], ids=["metadata_of_capture", "metadata_refreshed"])
def test_cuda_graph_decode_with_scheduler_metadata(refresh):
    """One decode step captured in a CUDA graph, replayed with new cache_seqlens (and new q / cache contents)
    written in place. metadata_of_capture keeps the metadata computed for the capture-time lengths (the graph
    must stay correct); metadata_refreshed copies fresh metadata for the new lengths into the same buffer before
    each replay (the pattern of serving engines), which must then equal the eager call bit for bit."""
    dtype, b, h, h_k, d, cache_len = BF16, 8, 32, 8, 128, 4096
    _require(dtype, d)
    q = _rand(dtype, b, 1, h, d)
    k_cache, v_cache = _rand(dtype, b, cache_len, h_k, d), _rand(dtype, b, cache_len, h_k, d)
    seqlens_buf = _i32(_cache_lengths(b, cache_len))

    def metadata_for(cache_seqlens):
        return get_scheduler_metadata(b, 1, cache_len, h, h_k, d, cache_seqlens, qkv_dtype=dtype, causal=True,
                                      num_splits=0)

    metadata = metadata_for(seqlens_buf)

    def step():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens_buf, scheduler_metadata=metadata,
                                       num_splits=0, causal=True, return_softmax_lse=True)

    graph, (out_g, lse_g, *_) = capture_graph(step)
    for replay in range(4):
        lengths = _cache_lengths(b, cache_len)
        for t in (q, k_cache, v_cache):
            t.copy_(torch.randn_like(t))
        seqlens_buf.copy_(torch.tensor(lengths, dtype=torch.int32))
        if refresh:
            fresh = metadata_for(seqlens_buf)
            assert fresh.shape == metadata.shape, "metadata of the same call shape must have the same size"
            metadata.copy_(fresh)
        refs = _references(q, k_cache, v_cache, cache_seqlens=seqlens_buf, causal=True)
        _poison_cache_tails((k_cache, v_cache), lengths, "nan")
        graph.replay()
        what = f"graph replay {replay} cache_seqlens={lengths}"
        _check(out_g, lse_g, refs, what, kvcache=True)
        if refresh:
            eager = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens_buf, num_splits=0, causal=True,
                                            return_softmax_lse=True)[:2]
            _assert_same((out_g, lse_g), eager, f"{what}: graph vs eager")
