"""Checked mode (flash_attn3._checked) with CPU tensors: the switches, every metadata rule, and how the public
functions use it (no GPU, no extension needed).

The rules are exercised by calling the checker directly (it is device-agnostic), and through the public
functions with the device rule, the build record and the op replaced by `op_stub` below, so that a test can
tell whether the op was reached. The GPU side (real device tensors, CUDA-graph capture) is in
tests/test_fuzz_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

import flash_attn3
from flash_attn3 import _checked, _checks, _ops
from flash_attn3 import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, varlen_fwd

F16 = torch.float16
LENS_Q, LENS_K = (3, 1, 5), (5, 2, 6)  # packed q: 9 rows, packed k: 13 rows
KV_NAMES = {"k": "k_cache", "seqused_k": "cache_seqlens", "kv_batch_idx": "cache_batch_idx",
            "leftpad_k": "cache_leftpad"}


def i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


def cu(lens):
    return i32(0, *torch.tensor(lens).cumsum(0).tolist())


@pytest.fixture(autouse=True)
def clean_switch(monkeypatch):
    """Each test starts with the Python switch unset and FLASH_ATTN3_CHECKED absent, and leaves them so."""
    monkeypatch.setattr(_checked, "_switch", None)
    monkeypatch.delenv(_checked.ENV_VAR, raising=False)


# ------------------------------------------------------------------------------------------- switches


def test_off_by_default():
    assert not _checked.is_enabled()


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("", False)])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", value)
    assert _checked.is_enabled() is expected


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_environment_variable_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", value)
    with pytest.raises(ValueError, match=r"FLASH_ATTN3_CHECKED: must be 1 \(checked mode on\) or 0 / unset"):
        _checked.is_enabled()


def test_python_switch_overrides_environment(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", "1")
    flash_attn3.set_checked_mode(False)
    assert not _checked.is_enabled()
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", "0")
    flash_attn3.set_checked_mode(True)
    assert _checked.is_enabled()


def test_context_manager_restores_previous_state():
    with flash_attn3.checked_mode():
        assert _checked.is_enabled()
        with flash_attn3.checked_mode(False):
            assert not _checked.is_enabled()
        assert _checked.is_enabled()
    assert _checked._switch is None, "leaving the block must give control back to the environment"
    flash_attn3.set_checked_mode(True)
    with pytest.raises(KeyError), flash_attn3.checked_mode(False):
        raise KeyError("an exception inside the block")
    assert _checked.is_enabled(), "the state before the block must come back after an exception too"


@pytest.mark.parametrize("bad", [1, None, "on"])
def test_switches_take_bools_only(bad):
    with pytest.raises(TypeError, match=r"enabled: expected a bool"):
        flash_attn3.set_checked_mode(bad)
    with pytest.raises(TypeError, match=r"enabled: expected a bool"), flash_attn3.checked_mode(bad):
        pass


# ------------------------------------------------------------------------------------- metadata rules


def varlen_args(**over):
    q, k = torch.zeros(sum(LENS_Q), 2, 8), torch.zeros(sum(LENS_K), 2, 8)
    args = dict(cu_seqlens_q=cu(LENS_Q), cu_seqlens_k=cu(LENS_K), max_seqlen_q=max(LENS_Q),
                max_seqlen_k=max(LENS_K))
    args.update(over)
    return (q, k), args


def dense_args(**over):
    return (torch.zeros(3, 4, 2, 8), torch.zeros(3, 6, 2, 8)), over


def paged_args(**over):
    """Batch 2 over a paged cache of 8 pages of 5 keys, 3 pages per row (capacity 15)."""
    q, k = torch.zeros(2, 1, 2, 8), torch.zeros(8, 5, 2, 8)
    args = dict(page_table=i32(0, 1, 2, 3, 4, 5).reshape(2, 3), seqused_k=i32(3, 15), names=KV_NAMES)
    args.update(over)
    return (q, k), args


LIES = [
    # (id, (tensors, kwargs), message regex)
    ("cu_q_first_nonzero", varlen_args(cu_seqlens_q=i32(1, 3, 4, 9)),
     r"cu_seqlens_q: entry 0 \(= 1\) must be 0: the first sequence starts at row 0"),
    ("cu_q_first_negative", varlen_args(cu_seqlens_q=i32(-2, 3, 4, 9)), r"cu_seqlens_q: entry 0 \(= -2\) must be 0"),
    ("cu_q_decreasing", varlen_args(cu_seqlens_q=i32(0, 3, 2, 9)),
     r"cu_seqlens_q: entry 2 \(= 2\) is smaller than entry 1 \(= 3\): cu_seqlens must never decrease"),
    ("cu_q_negative_middle", varlen_args(cu_seqlens_q=i32(0, -4, 4, 9)),
     r"cu_seqlens_q: entry 1 \(= -4\) is smaller than entry 0 \(= 0\)"),
    ("cu_q_last_short", varlen_args(cu_seqlens_q=i32(0, 3, 4, 8)),
     r"cu_seqlens_q: the last entry \(entry 3 = 8\) must equal the packed row count of q \(q.shape\[0\] = 9\)"),
    ("cu_q_last_long", varlen_args(cu_seqlens_q=i32(0, 3, 4, 10)), r"cu_seqlens_q: the last entry \(entry 3 = 10\)"),
    ("cu_q_last_huge", varlen_args(cu_seqlens_q=i32(0, 3, 4, 2**30)),
     r"cu_seqlens_q: the last entry \(entry 3 = 1073741824\)"),
    ("cu_k_decreasing", varlen_args(cu_seqlens_k=i32(0, 5, 4, 13)),
     r"cu_seqlens_k: entry 2 \(= 4\) is smaller than entry 1 \(= 5\)"),
    ("cu_k_last_int_max", varlen_args(cu_seqlens_k=i32(0, 5, 7, 2**31 - 1)),
     r"cu_seqlens_k: the last entry \(entry 3 = 2147483647\) must equal the packed row count of k \(k.shape\[0\] = "
     r"13\)"),
    ("max_q_small", varlen_args(max_seqlen_q=4),
     r"max_seqlen_q: sequence 2 uses 5 rows \(cu_seqlens_q\[3\] - cu_seqlens_q\[2\]\), more than max_seqlen_q = 4"),
    ("max_q_zero", varlen_args(max_seqlen_q=0),
     r"max_seqlen_q: sequence 0 uses 3 rows .* more than max_seqlen_q = 0; it must be at least the longest"),
    ("max_k_small", varlen_args(max_seqlen_k=5), r"max_seqlen_k: sequence 2 uses 6 rows"),
    ("max_q_below_seqused", varlen_args(seqused_q=i32(3, 1, 5), max_seqlen_q=4),
     r"max_seqlen_q: sequence 2 uses 5 rows \(seqused_q\[2\]\)"),
    ("seqused_q_too_big", varlen_args(seqused_q=i32(3, 2, 5)),
     r"seqused_q: entry 1 \(= 2\) must be within \[0, 1\], the length of sequence 1 \(cu_seqlens_q\[2\] - "
     r"cu_seqlens_q\[1\]\)"),
    ("seqused_q_negative", varlen_args(seqused_q=i32(0, -1, 0)), r"seqused_q: entry 1 \(= -1\) must be within"),
    ("seqused_k_negative", varlen_args(seqused_k=i32(5, -1, 6)),
     r"seqused_k: entry 1 \(= -1\) must be within \[0, 2\]"),
    ("seqused_k_int_max", varlen_args(seqused_k=i32(5, 2, 2**31 - 1)),
     r"seqused_k: entry 2 \(= 2147483647\) must be within \[0, 6\]"),
    ("dense_seqused_q", dense_args(seqused_q=i32(4, 5, 0)),
     r"seqused_q: entry 1 \(= 5\) must be within \[0, 4\], the length of sequence 1 \(q.shape\[1\]\)"),
    ("dense_seqused_k", dense_args(seqused_k=i32(6, 0, 7)),
     r"seqused_k: entry 2 \(= 7\) must be within \[0, 6\], the length of sequence 2 \(k.shape\[1\]\)"),
    ("dense_q_varlen_k_cu", ((torch.zeros(3, 4, 2, 8), torch.zeros(13, 2, 8)), dict(cu_seqlens_k=i32(0, 5, 7, 12))),
     r"cu_seqlens_k: the last entry \(entry 3 = 12\)"),
    ("cache_seqlens_too_big", paged_args(seqused_k=i32(3, 16)),
     r"cache_seqlens: entry 1 \(= 16\) must be within \[0, 15\], the length of sequence 1 \(the cache capacity, "
     r"page_table.shape\[1\] \* page_size = 3 \* 5\)"),
    ("cache_seqlens_negative", paged_args(seqused_k=i32(-1, 2)), r"cache_seqlens: entry 0 \(= -1\)"),
    ("page_table_too_big", paged_args(page_table=i32(0, 1, 2, 3, 8, 5).reshape(2, 3)),
     r"page_table: entry \[1, 1\] \(= 8\) must be within \[0, 8\), the pages of k_cache \(k_cache.shape\[0\]\); "
     r"batch entry 1 reads the first 3 pages of row 1 \(cache_seqlens\[1\] = 15, page size 5\)"),
    ("page_table_negative", paged_args(page_table=i32(-1, 1, 2, 3, 4, 5).reshape(2, 3)),
     r"page_table: entry \[0, 0\] \(= -1\)"),
    ("page_table_last_page_read", paged_args(page_table=i32(0, 1, 2, 3, 4, 99).reshape(2, 3), seqused_k=i32(3, 11)),
     r"page_table: entry \[1, 2\] \(= 99\).*reads the first 3 pages"),  # 11 keys need ceil(11 / 5) = 3 pages
    ("page_table_full_capacity", paged_args(page_table=i32(0, 1, 2, 3, 4, 99).reshape(2, 3), seqused_k=None),
     r"page_table: entry \[1, 2\] \(= 99\).*\(the cache capacity"),
    ("cache_batch_idx_too_big", paged_args(kv_batch_idx=i32(1, 2)),
     r"cache_batch_idx: entry 1 \(= 2\) must be within \[0, 2\), the cache rows \(page_table.shape\[0\] = 2\)"),
    ("cache_batch_idx_negative", dense_args(kv_batch_idx=i32(0, -1, 2)),
     r"kv_batch_idx: entry 1 \(= -1\) must be within \[0, 3\), the cache rows \(k.shape\[0\] = 3\)"),
    ("page_row_from_batch_idx", paged_args(kv_batch_idx=i32(1, 0), page_table=i32(0, 1, 2, 3, 9, 5).reshape(2, 3),
                                           seqused_k=i32(6, 1)),
     r"page_table: entry \[1, 1\] \(= 9\).* batch entry 0 reads the first 2 pages of row 1"),
    ("cache_leftpad_too_big", paged_args(leftpad_k=i32(4, 0)),
     r"cache_leftpad: entry 0 \(= 4\) must be within \[0, 3\], the end of the valid keys of batch entry 0 "
     r"\(cache_seqlens\[0\]\)"),
    ("cache_leftpad_negative", paged_args(leftpad_k=i32(0, -2)), r"cache_leftpad: entry 1 \(= -2\)"),
    ("leftpad_beyond_capacity", dense_args(leftpad_k=i32(0, 7, 0)),
     r"leftpad_k: entry 1 \(= 7\) must be within \[0, 6\], .*\(k.shape\[1\]\)"),
    # Context parallelism: rank 1 of 3 holds ceil((total - 1) / 3) keys of a sequence of `total` keys: 6 local
    # keys need total >= 17, and 15 (paged_args' second entry) need total >= 44.
    ("cp_total_too_small", varlen_args(cp_world_size=3, cp_rank=1, cp_tot_seqused_k=i32(15, 7, 13)),
     r"cp_tot_seqused_k: entry 2 \(= 13\) must be >= 0 and hold this rank's 6 keys \(cu_seqlens_k\[3\] - "
     r"cu_seqlens_k\[2\]\): rank 1 of 3 holds ceil\(\(13 - 1\) / 3\) = 4 of them"),
    ("cp_total_negative", paged_args(cp_world_size=2, cp_rank=0, cp_tot_seqused_k=i32(-1, 40)),
     r"cp_tot_seqused_k: entry 0 \(= -1\) must be >= 0"),
    ("cp_paged_share", paged_args(cp_world_size=3, cp_rank=1, cp_tot_seqused_k=i32(8, 43)),
     r"cp_tot_seqused_k: entry 1 \(= 43\).*this rank's 15 keys \(cache_seqlens\[1\]\).* = 14 of them"),
]

VALID = [
    ("varlen", varlen_args()),
    ("cp_exact_shares", varlen_args(cp_world_size=3, cp_rank=1, cp_tot_seqused_k=i32(16, 7, 19))),
    ("cp_paged_exact", paged_args(cp_world_size=3, cp_rank=1, cp_tot_seqused_k=i32(10, 44))),
    ("cp_rank_without_keys", paged_args(cp_world_size=4, cp_rank=3, cp_tot_seqused_k=i32(15, 63), seqused_k=i32(3, 15))),
    # World size 1: the totals are not read (the call ignores them).
    ("cp_world_one_ignores_totals", varlen_args(cp_world_size=1, cp_tot_seqused_k=i32(-5, -5, -5))),
    ("varlen_empty_sequences", ((torch.zeros(4, 2, 8), torch.zeros(5, 2, 8)),
                                dict(cu_seqlens_q=i32(0, 0, 4, 4), cu_seqlens_k=i32(0, 0, 0, 5), max_seqlen_q=4,
                                     max_seqlen_k=5))),
    ("varlen_all_empty", ((torch.zeros(0, 2, 8), torch.zeros(0, 2, 8)),
                          dict(cu_seqlens_q=i32(0, 0), cu_seqlens_k=i32(0, 0), max_seqlen_q=0, max_seqlen_k=0))),
    ("max_seqlen_larger", varlen_args(max_seqlen_q=9, max_seqlen_k=13)),
    # max_seqlen must bound the rows a sequence uses: with seqused that is seqused, not the cu_seqlens length.
    ("max_seqlen_bounds_seqused", varlen_args(seqused_q=i32(3, 1, 2), max_seqlen_q=3, seqused_k=i32(0, 2, 1),
                                              max_seqlen_k=2)),
    ("seqused_at_bounds", varlen_args(seqused_q=i32(3, 0, 5), seqused_k=i32(0, 2, 6))),
    ("dense_seqused", dense_args(seqused_q=i32(4, 0, 2), seqused_k=i32(6, 0, 1))),
    ("dense_batch_idx_leftpad", dense_args(kv_batch_idx=i32(2, 0, 1), leftpad_k=i32(6, 0, 3))),
    ("dense_nothing_on_device", dense_args()),
    ("paged", paged_args()),
    # Entries past the pages a sequence reads are never dereferenced: garbage there is fine.
    ("paged_unread_garbage", paged_args(page_table=i32(7, -5, 2**31 - 1, 3, 4, 5).reshape(2, 3), seqused_k=i32(5, 15))),
    ("paged_empty_sequence", paged_args(page_table=i32(-1, -1, -1, 3, 4, 5).reshape(2, 3), seqused_k=i32(0, 15))),
    ("paged_batch_idx_leftpad", paged_args(kv_batch_idx=i32(1, 1), leftpad_k=i32(3, 15))),
    ("paged_no_seqlens", paged_args(seqused_k=None)),
]


@pytest.mark.parametrize("case", LIES, ids=[c[0] for c in LIES])
def test_lying_metadata_raises(case):
    _, ((q, k), kwargs), match = case
    with pytest.raises(ValueError, match=match):
        _checked.check_metadata(q, k, **kwargs)


@pytest.mark.parametrize("case", VALID, ids=[c[0] for c in VALID])
def test_honest_metadata_passes(case):
    _, ((q, k), kwargs) = case
    _checked.check_metadata(q, k, **kwargs)


def test_one_host_transfer(monkeypatch):
    """All metadata tensors come to the host in one transfer, however many there are."""
    calls = [varlen_args(seqused_q=i32(3, 1, 5), seqused_k=i32(5, 2, 6)),
             paged_args(kv_batch_idx=i32(1, 0), leftpad_k=i32(0, 1)), dense_args()]
    reads = []

    def counted(method):
        real = getattr(torch.Tensor, method)

        def read_back(self, *args, **kwargs):
            reads.append(method)
            return real(self, *args, **kwargs)
        return read_back

    for method in ("tolist", "item", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, counted(method))
    for (q, k), kwargs in calls[:2]:
        _checked.check_metadata(q, k, **kwargs)
    assert reads == ["tolist", "tolist"], f"expected one tolist() per call, got {reads}"
    reads.clear()
    (q, k), kwargs = calls[2]
    _checked.check_metadata(q, k, **kwargs)
    assert reads == [], "a call without metadata tensors must not read anything back"


def test_refuses_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(_checked, "_capturing", lambda t: True)
    (q, k), kwargs = dense_args()
    with pytest.raises(RuntimeError, match=r"checked mode: cannot check metadata during CUDA-graph capture .*"
                                           r"set_checked_mode\(False\).*FLASH_ATTN3_CHECKED"):
        _checked.check_metadata(q, k, **kwargs)


# ------------------------------------------------------------------------------- through the public API

FULL_BUILD = _ops.BuildConfig(True, {"fp16": (64, 128), "bf16": (64, 128)},
                              {name: True for name in _ops.FEATURE_NAMES})


@pytest.fixture
def op_stub(monkeypatch):
    """CPU tensors pass the device rule, every feature counts as built, and op calls are counted, not run."""
    calls = []
    monkeypatch.setattr(_checks, "check_devices", lambda tensors: None)
    monkeypatch.setattr(_ops, "HAS_EXTENSION", True)
    monkeypatch.setattr(_ops, "BUILD", FULL_BUILD)
    monkeypatch.setattr(_ops, "fwd", lambda *args: calls.append(args))
    return calls


def _packed(lens_q=LENS_Q, lens_k=LENS_K):
    q = torch.randn(sum(lens_q), 4, 64).to(F16)
    k, v = torch.randn(sum(lens_k), 2, 64).to(F16), torch.randn(sum(lens_k), 2, 64).to(F16)
    return q, k, v


def _cache(b=2, sk=9):
    return torch.randn(b, 1, 4, 64).to(F16), torch.randn(b, sk, 2, 64).to(F16), torch.randn(b, sk, 2, 64).to(F16)


PUBLIC_LIES = [
    # (id, call, message regex): each call is valid for the normal checks and lies only in device values.
    ("varlen_func_cu_q", lambda: flash_attn_varlen_func(*_packed(), i32(0, 3, 2, 9), cu(LENS_K), 5, 6),
     r"cu_seqlens_q: entry 2 \(= 2\) is smaller than entry 1 \(= 3\)"),
    ("varlen_func_max_q_zero", lambda: flash_attn_varlen_func(*_packed(), cu(LENS_Q), cu(LENS_K), 0, 6),
     r"max_seqlen_q: sequence 0 uses 3 rows"),
    ("varlen_func_seqused_k", lambda: flash_attn_varlen_func(*_packed(), cu(LENS_Q), cu(LENS_K), 5, 6,
                                                             seqused_k=i32(5, 3, 6)),
     r"seqused_k: entry 1 \(= 3\) must be within \[0, 2\]"),
    ("varlen_fwd_cu_k_last", lambda: varlen_fwd(*_packed(), cu(LENS_Q), i32(0, 5, 7, 12), 5, 6),
     r"cu_seqlens_k: the last entry \(entry 3 = 12\)"),
    ("varlen_fwd_dense_seqused_q", lambda: varlen_fwd(*_cache(sk=9), seqused_q=i32(1, 2)),
     r"seqused_q: entry 1 \(= 2\) must be within \[0, 1\]"),
    ("kvcache_cache_seqlens", lambda: flash_attn_with_kvcache(*_cache(sk=9), cache_seqlens=i32(3, 10)),
     r"cache_seqlens: entry 1 \(= 10\) must be within \[0, 9\], the length of sequence 1 \(k_cache.shape\[1\]\)"),
    ("kvcache_batch_idx", lambda: flash_attn_with_kvcache(*_cache(sk=9), cache_batch_idx=i32(0, 2)),
     r"cache_batch_idx: entry 1 \(= 2\) must be within \[0, 2\), the cache rows \(k_cache.shape\[0\] = 2\)"),
    ("kvcache_leftpad", lambda: flash_attn_with_kvcache(*_cache(sk=9), cache_seqlens=4, cache_leftpad=i32(5, 0)),
     r"cache_leftpad: entry 0 \(= 5\) must be within \[0, 4\], .*\(cache_seqlens\[0\]\)"),
    ("kvcache_page_table", lambda: flash_attn_with_kvcache(
        torch.randn(2, 1, 4, 64).half(), torch.randn(8, 5, 2, 64).half(), torch.randn(8, 5, 2, 64).half(),
        page_table=i32(0, 1, 2, 3, 4, 8).reshape(2, 3), cache_seqlens=i32(3, 15)),
     r"page_table: entry \[1, 2\] \(= 8\) must be within \[0, 8\), the pages of k_cache"),
]


@pytest.mark.parametrize("case", PUBLIC_LIES, ids=[c[0] for c in PUBLIC_LIES])
def test_public_functions_check_before_the_op(op_stub, case):
    _, call, match = case
    call()  # checked mode off (the default): the lie reaches the op unread, by design
    assert len(op_stub) == 1
    with flash_attn3.checked_mode(), pytest.raises(ValueError, match=match):
        call()
    assert len(op_stub) == 1, "the op must not run when checked mode finds a lie"


def test_public_functions_pass_honest_metadata(op_stub, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN3_CHECKED", "1")
    flash_attn_func(*_cache(sk=9))
    flash_attn_varlen_func(*_packed(), cu(LENS_Q), cu(LENS_K), 5, 6, seqused_q=i32(3, 0, 5), causal=True)
    varlen_fwd(*_packed(), cu(LENS_Q), cu(LENS_K), 5, 6)
    flash_attn_with_kvcache(*_cache(sk=9), cache_seqlens=i32(9, 0), cache_batch_idx=i32(1, 0),
                            cache_leftpad=i32(2, 0))
    flash_attn_with_kvcache(*_cache(sk=9), cache_seqlens=9)
    assert len(op_stub) == 5


def test_public_functions_refuse_capture_in_checked_mode(op_stub, monkeypatch):
    monkeypatch.setattr(_checked, "_capturing", lambda t: True)
    flash_attn_func(*_cache())  # off: capture is none of checked mode's business
    with flash_attn3.checked_mode(), pytest.raises(RuntimeError, match=r"CUDA-graph capture"):
        flash_attn_func(*_cache())
    assert len(op_stub) == 1
