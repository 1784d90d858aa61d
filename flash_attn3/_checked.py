"""Checked mode: the values of the metadata tensors, validated on the host before a call runs (off by default).

The normal path never reads device memory (flash_attn3._checks): a host sync per call would cost more than a
short attention call and could not be captured in a CUDA graph. So when metadata that lives on the GPU lies,
the kernel can only clamp it to the real tensors and compute something the caller did not mean; for
example rows past an understated max_seqlen_q are left unwritten, silently. Checked mode is the debugging
switch that turns such lies into errors.

When it is on, every forward call (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
varlen_fwd) first copies all its metadata tensors to the host in one transfer (one synchronisation), after the
usual argument checks and before anything is launched, and checks:
  * cu_seqlens_q / cu_seqlens_k start at 0, never decrease, and end at the packed row count of q / k (packed
    rows after the last sequence would be left unwritten, so they count as a lie too);
  * seqused_q / seqused_k (cache_seqlens) lie within [0, that sequence's length]: the cu_seqlens difference,
    else the dense seqlen, else the cache capacity (page_table.shape[1] * page_size);
  * max_seqlen_q / max_seqlen_k (with cu_seqlens) are at least the rows every sequence uses (seqused where
    given), so that max_seqlen_q = 0 with a non-empty sequence is an error;
  * cache_batch_idx lies within [0, the number of cache rows); cache_leftpad within [0, cache_seqlens[b]];
  * the page_table entries each batch entry reads (its first ceil(cache_seqlens[b] / page_size)) lie within
    [0, num_pages); the entries past them are never read, so they may hold anything;
  * with context parallelism (cp_world_size > 1), cp_tot_seqused_k[b] >= 0, and the keys this rank holds
    (seqused_k, else the sequence's length) are at most its round-robin share of them, ceil((total - cp_rank) /
    cp_world_size): more local keys than that cannot all be keys of the whole sequence.
A broken rule raises ValueError naming the argument (under the caller's name, e.g. cache_seqlens), the entry
and the values. The mode cannot be used during CUDA-graph capture, where a host sync is not allowed: such a call
raises RuntimeError. The library never prints.

Switches: the environment variable FLASH_ATTN3_CHECKED=1 (0 or unset: off), read at each call, and from Python
`flash_attn3.set_checked_mode(True / False)` or `with flash_attn3.checked_mode(): ...`, which take precedence
over the environment. The state is process-wide, not per thread.
"""
from __future__ import annotations

import contextlib
import os

import torch

from flash_attn3._checks import check_bool

ENV_VAR = "FLASH_ATTN3_CHECKED"

_switch: bool | None = None  # the Python switch; None = follow the environment


def is_enabled() -> bool:
    """Whether checked mode is on: the Python switch if it was set, else FLASH_ATTN3_CHECKED."""
    if _switch is not None:
        return _switch
    value = os.environ.get(ENV_VAR, "")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"{ENV_VAR}: must be 1 (checked mode on) or 0 / unset (off), got {value!r}")


def set_checked_mode(enabled: bool) -> None:
    """Turns checked mode on or off for the whole process, overriding FLASH_ATTN3_CHECKED."""
    global _switch
    check_bool("enabled", enabled)
    _switch = enabled


@contextlib.contextmanager
def checked_mode(enabled: bool = True):
    """Context manager: checked mode on (or off, with enabled=False) inside the block, the previous state after."""
    global _switch
    check_bool("enabled", enabled)
    previous, _switch = _switch, enabled
    try:
        yield
    finally:
        _switch = previous


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_metadata(q, k, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                   max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None, leftpad_k=None,
                   names=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None) -> None:
    """Checks the values of one call's metadata tensors (see the module docstring) with one host sync.

    The arguments are those of the op; their dtypes, shapes and devices must already have passed
    flash_attn3._checks.check_fwd. max_seqlen_q / max_seqlen_k are only read together with the matching
    cu_seqlens. `names` renames arguments in messages as in check_fwd. Works on CPU tensors too (no sync).
    """
    n = {a: a for a in ("q", "k", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "max_seqlen_q",
                        "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k")}
    n.update(names or {})
    if _capturing(q):
        raise RuntimeError(
            "checked mode: cannot check metadata during CUDA-graph capture (it needs a host sync); turn it off "
            f"for the capture with flash_attn3.set_checked_mode(False) or by unsetting {ENV_VAR}")
    given = {a: t for a, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                                ("seqused_q", seqused_q), ("seqused_k", seqused_k), ("page_table", page_table),
                                ("kv_batch_idx", kv_batch_idx), ("leftpad_k", leftpad_k),
                                ("cp_tot_seqused_k", cp_tot_seqused_k if cp_world_size > 1 else None))
             if t is not None}
    if not given:
        return
    flat = torch.cat([t.reshape(-1) for t in given.values()]).tolist()  # the one host sync
    host, start = {}, 0
    for a, t in given.items():
        host[a] = flat[start:start + t.numel()]
        start += t.numel()

    batch = len(host["cu_seqlens_q"]) - 1 if cu_seqlens_q is not None else q.shape[0]
    if page_table is not None:
        capacity = page_table.shape[1] * k.shape[1]
        capacity_text = (f"the cache capacity, {n['page_table']}.shape[1] * page_size = {page_table.shape[1]} * "
                         f"{k.shape[1]}")
    else:
        capacity, capacity_text = k.shape[1], f"{n['k']}.shape[1]"
    # Per side: the length of each sequence, where that number comes from, and the rows it uses.
    sides = {}
    for a, t, static, static_text in (("q", q, q.shape[1], f"{n['q']}.shape[1]"),
                                      ("k", k, capacity, capacity_text)):
        cu_name = n["cu_seqlens_" + a]
        cu = host.get("cu_seqlens_" + a)
        if cu is None:
            sides[a] = ([static] * batch, _same_text(static_text))
        else:
            _check_cu_seqlens(cu_name, cu, t.shape[0], n[a])
            sides[a] = ([cu[b + 1] - cu[b] for b in range(batch)], _difference_text(cu_name))

    used, used_text = {}, {}
    for a, (length, source) in sides.items():
        name = n["seqused_" + a]
        vals = host.get("seqused_" + a)
        if vals is None:
            used[a], used_text[a] = length, source
            continue
        for b, (u, total) in enumerate(zip(vals, length)):
            if not 0 <= u <= total:
                raise ValueError(f"{name}: entry {b} (= {u}) must be within [0, {total}], the length of sequence "
                                 f"{b} ({source(b)})")
        used[a], used_text[a] = vals, _entry_text(name)

    for a, mx in (("q", max_seqlen_q), ("k", max_seqlen_k)):
        if "cu_seqlens_" + a not in host or mx is None:
            continue
        mx_name = n["max_seqlen_" + a]
        for b, u in enumerate(used[a]):
            if u > mx:
                raise ValueError(f"{mx_name}: sequence {b} uses {u} rows ({used_text[a](b)}), more than "
                                 f"{mx_name} = {mx}; it must be at least the longest sequence")

    row_of = host.get("kv_batch_idx")
    if row_of is not None:
        cache_rows = page_table.shape[0] if page_table is not None else k.shape[0]
        rows_text = f"{n['page_table']}.shape[0]" if page_table is not None else f"{n['k']}.shape[0]"
        for b, r in enumerate(row_of):
            if not 0 <= r < cache_rows:
                raise ValueError(f"{n['kv_batch_idx']}: entry {b} (= {r}) must be within [0, {cache_rows}), the "
                                 f"cache rows ({rows_text} = {cache_rows})")

    if page_table is not None:
        _check_pages(n, host["page_table"], page_table.shape[1], k.shape[0], k.shape[1], used["k"], row_of,
                     used_text["k"])

    totals = host.get("cp_tot_seqused_k")
    if totals is not None:
        for b, (total, local) in enumerate(zip(totals, used["k"])):
            share = max(0, -(-(total - cp_rank) // cp_world_size))
            if total < 0 or local > share:
                raise ValueError(
                    f"cp_tot_seqused_k: entry {b} (= {total}) must be >= 0 and hold this rank's {local} keys "
                    f"({used_text['k'](b)}): rank {cp_rank} of {cp_world_size} holds ceil(({total} - {cp_rank}) / "
                    f"{cp_world_size}) = {share} of them")

    pads = host.get("leftpad_k")
    if pads is not None:
        for b, (pad, end) in enumerate(zip(pads, used["k"])):
            if not 0 <= pad <= end:
                raise ValueError(f"{n['leftpad_k']}: entry {b} (= {pad}) must be within [0, {end}], the end of the "
                                 f"valid keys of batch entry {b} ({used_text['k'](b)})")


# Where a per-sequence number comes from, as message text for batch entry b.
def _same_text(text: str):
    return lambda b: text


def _difference_text(cu_name: str):
    return lambda b: f"{cu_name}[{b + 1}] - {cu_name}[{b}]"


def _entry_text(name: str):
    return lambda b: f"{name}[{b}]"


def _check_cu_seqlens(name: str, cu: list, rows: int, tensor_name: str) -> None:
    if cu[0] != 0:
        raise ValueError(f"{name}: entry 0 (= {cu[0]}) must be 0: the first sequence starts at row 0")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"{name}: entry {i} (= {cu[i]}) is smaller than entry {i - 1} (= {cu[i - 1]}): "
                             "cu_seqlens must never decrease")
    if cu[-1] != rows:
        raise ValueError(f"{name}: the last entry (entry {len(cu) - 1} = {cu[-1]}) must equal the packed row "
                         f"count of {tensor_name} ({tensor_name}.shape[0] = {rows})")


def _check_pages(n: dict, table: list, max_pages: int, num_pages: int, page_size: int, ends: list, row_of,
                 end_text) -> None:
    """The page-table entries each batch entry reads: its first ceil(end / page_size) pages, of row
    kv_batch_idx[b] (default b). `table` is the row-major host copy of the (rows, max_pages) table."""
    for b, end in enumerate(ends):
        r = row_of[b] if row_of is not None else b
        pages_read = -(-end // page_size) if page_size else 0
        for p in range(pages_read):
            page = table[r * max_pages + p]
            if not 0 <= page < num_pages:
                raise ValueError(
                    f"{n['page_table']}: entry [{r}, {p}] (= {page}) must be within [0, {num_pages}), the pages of "
                    f"{n['k']} ({n['k']}.shape[0]); batch entry {b} reads the first {pages_read} pages of row {r} "
                    f"({end_text(b)} = {end}, page size {page_size})")
