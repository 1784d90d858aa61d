"""Plain-PyTorch reference of everything the flash_attn3 kernels compute, for tests and for debugging.

It is written for clarity, not speed: it loops over the batch in Python and reads the metadata tensors
(cu_seqlens, seqused, page tables, ...) back to the host, which the real op never does. Layouts are
FA3's: dense q (b, s_q, h, d) or packed (total_q, h, d); k/v dense (b, s_k, h_k, d), packed
(total_k, h_k, d) or paged (num_pages, page_size, h_k, d); out has q's layout with v's head dim; the LSE is
natural-log, (b, h, s_q) dense or (h, total_q) packed. Works on CPU and CUDA tensors and never modifies
its arguments.
"""
from __future__ import annotations

import torch

_FP8 = torch.float8_e4m3fn


def _per_batch(x, batch: int, name: str) -> list[int] | None:
    """Host list of one int per batch entry from an int32 tensor, a Python int, or None."""
    if x is None:
        return None
    if isinstance(x, int):
        return [x] * batch
    vals = [int(v) for v in x.reshape(-1).tolist()]
    if len(vals) != batch:
        raise ValueError(f"{name}: expected {batch} entries, got {len(vals)}")
    return vals


def visible_keys(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, device=None,
                 attention_chunk: int = 0, cp_world_size: int = 1, cp_rank: int = 0,
                 cp_seqlen_k: int | None = None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k) mask: query i sees key j iff
    i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right (bottom-right
    aligned); a negative window side is unbounded. attention_chunk > 0 (FA3's chunked attention) further
    keeps only the keys of the query's chunk: c <= j < c + attention_chunk with
    c = floor((i + seqlen_k - seqlen_q) / attention_chunk) * attention_chunk (floor: rows before the first
    key, when seqlen_q > seqlen_k, fall in a chunk of negative positions and see nothing).

    Context parallelism (cp_world_size > 1, the vLLM fork's decode context parallelism): the sequence has
    cp_seqlen_k keys in all, dealt round-robin over the ranks, and these seqlen_k are rank cp_rank's: local
    key j is global key j * cp_world_size + cp_rank. The rule above then holds for the global positions,
    aligned on cp_seqlen_k (i + cp_seqlen_k - seqlen_q is query i's position)."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diag = i + seqlen_k - seqlen_q
    if cp_world_size > 1:
        if cp_seqlen_k is None:
            raise ValueError("cp_seqlen_k: required when cp_world_size > 1")
        j = j * cp_world_size + cp_rank
        diag = i + cp_seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= diag - window_left
    if window_right >= 0:
        mask &= j <= diag + window_right
    if attention_chunk > 0:
        start = torch.div(diag, attention_chunk, rounding_mode="floor") * attention_chunk
        mask &= (j >= start) & (j < start + attention_chunk)
    return mask


def attention_ref(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                  max_seqlen_q=None, max_seqlen_k=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                  softmax_scale=None, page_table=None, cache_seqlens=None, cache_batch_idx=None, leftpad_k=None,
                  k_new=None, v_new=None, cu_seqlens_k_new=None, q_descale=None, k_descale=None, v_descale=None,
                  upcast=True, reorder_ops=False, sinks=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):
    """Reference attention forward; returns (out, softmax_lse).

    Semantics, per batch entry b:
      * queries: rows of q[b] (dense) or q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] (packed); only the first
        seqused_q[b] are used. Unused rows (and packed rows outside every sequence) get out = 0, lse = -inf.
      * keys: the cache row r = cache_batch_idx[b] (default b) of k/v: k[r] dense, the concatenation of pages
        page_table[r] when paged, or k[cu_seqlens_k[b]:cu_seqlens_k[b+1]] packed. Of it, positions
        [leftpad_k[b], end) are attended, with end = seqused_k[b] (FA3's kv-cache name: cache_seqlens, an int
        or an int32 (b,) tensor, counted from index 0 of the row) or the full length. New keys k_new/v_new
        ((b, s_new, h_k, d) or packed with cu_seqlens_k_new) are appended after `end`, as FA3 writes them at
        cache position cache_seqlens[b]; the caller's caches are not modified.
      * GQA: query head i uses key head i // (h // h_k).
      * scores = (q * scale) @ kᵀ (reorder_ops: q @ (k * scale)ᵀ) with scale = softmax_scale or d ** -0.5;
        any finite scale is valid (0: equal weights, out = mean of v over the visible keys, lse = log of their
        count; negative: the least similar keys weigh most). softcap > 0: scores = tanh(scores / softcap) *
        softcap, before masking.
      * mask: bottom-right aligned window and attention_chunk (see visible_keys); causal = window (left, 0).
        A row with no visible key gets out = 0 and lse = -inf.
      * context parallelism (vLLM fork's cp_world_size / cp_rank / cp_tot_seqused_k, an int or an int32 (b,)
        tensor): the keys are rank cp_rank's share of cp_tot_seqused_k[b] keys dealt round-robin, local key j
        being global key j * cp_world_size + cp_rank; the mask is the global one (visible_keys). Merging the
        ranks' (out, lse) with combine_ref gives attention over all the keys. cp_world_size 1: ignored.
      * fp8 (float8_e4m3fn) inputs are upcast and multiplied by q/k/v_descale (float32 (b, h_k); the q heads
        of kv head g share q_descale[b, g]).
    max_seqlen_q/max_seqlen_k are accepted for signature parity and unused (lengths are read from the data).

    Precision: upcast=True computes in float32 (float64 for float64 inputs) and returns out in that dtype;
    upcast=False computes in the input dtype (bfloat16 for fp8) and returns out in it: the "PyTorch at low
    precision" baseline of FA3's tolerance rule. softmax_lse is float32 (float64 when computed in float64).
    """
    del max_seqlen_q, max_seqlen_k
    if cache_seqlens is not None:
        if seqused_k is not None:
            raise ValueError("give seqused_k or cache_seqlens (the kv-cache name of the same thing), not both")
        seqused_k = cache_seqlens
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")

    varlen_q = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_heads_k, head_dim_v = k.shape[-2], v.shape[-1]
    group = num_heads // num_heads_k
    if num_heads % num_heads_k:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_heads_k {num_heads_k}")

    is_fp8 = q.dtype == _FP8
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    else:
        cdt = torch.bfloat16 if is_fp8 else q.dtype
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0

    if cp_world_size < 1 or not 0 <= cp_rank < cp_world_size:
        raise ValueError(f"cp_rank {cp_rank} must be in [0, cp_world_size = {cp_world_size})")
    cp_total = _per_batch(cp_tot_seqused_k, batch, "cp_tot_seqused_k") if cp_world_size > 1 else None
    if cp_world_size > 1 and cp_total is None:
        raise ValueError("cp_tot_seqused_k: required when cp_world_size > 1")

    cu_q = _per_batch(cu_seqlens_q, batch + 1, "cu_seqlens_q") if varlen_q else None
    cu_k = _per_batch(cu_seqlens_k, batch + 1, "cu_seqlens_k")
    cu_new = _per_batch(cu_seqlens_k_new, batch + 1, "cu_seqlens_k_new")
    used_q = _per_batch(seqused_q, batch, "seqused_q")
    used_k = _per_batch(seqused_k, batch, "seqused_k")
    pad_k = _per_batch(leftpad_k, batch, "leftpad_k")
    kv_row = _per_batch(cache_batch_idx, batch, "cache_batch_idx")

    out = torch.zeros(*q.shape[:-1], head_dim_v, dtype=cdt, device=q.device)
    if varlen_q:
        lse = torch.full((num_heads, q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    else:
        lse = torch.full((batch, num_heads, q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device)

    def load(x, b, descale, is_q):
        """x in the compute dtype (fp8 dequantised by its (b, h_k) descale), with one head per q head."""
        x = x.to(torch.float32 if is_fp8 else cdt)
        if descale is not None:
            per_kv_head = descale[b].to(x.dtype)
            x = x * (per_kv_head.repeat_interleave(group) if is_q else per_kv_head)[None, :, None]
        x = x.to(cdt)
        return x if is_q else x.repeat_interleave(group, dim=1)

    for b in range(batch):
        q_start = cu_q[b] if varlen_q else 0
        q_rows = q[cu_q[b]:cu_q[b + 1]] if varlen_q else q[b]
        if used_q is not None:
            q_rows = q_rows[:used_q[b]]
        r = kv_row[b] if kv_row is not None else b
        if page_table is not None:
            # Only the pages that hold this sequence's keys: the table's entries past them may be garbage.
            page_size = k.shape[1]
            n_keys = used_k[b] if used_k is not None else page_table.shape[1] * page_size
            pages = page_table[r, :(n_keys + page_size - 1) // page_size].long()
            k_row = k[pages].reshape(-1, num_heads_k, head_dim)
            v_row = v[pages].reshape(-1, num_heads_k, head_dim_v)
        elif cu_k is not None:
            k_row, v_row = k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        else:
            k_row, v_row = k[r], v[r]
        k_end = used_k[b] if used_k is not None else k_row.shape[0]
        k_begin = pad_k[b] if pad_k is not None else 0
        k_rows, v_rows = k_row[k_begin:k_end], v_row[k_begin:k_end]
        if k_new is not None:
            if cu_new is not None:
                kn, vn = k_new[cu_new[b]:cu_new[b + 1]], v_new[cu_new[b]:cu_new[b + 1]]
            else:
                kn, vn = k_new[b], v_new[b]
            k_rows, v_rows = torch.cat([k_rows, kn]), torch.cat([v_rows, vn])

        sq, sk = q_rows.shape[0], k_rows.shape[0]
        if sq == 0:
            continue
        qf = load(q_rows, b, q_descale, True)  # (sq, h, d)
        kf = load(k_rows, b, k_descale, False)  # (sk, h, d)
        vf = load(v_rows, b, v_descale, False)  # (sk, h, dv)
        if reorder_ops:
            scores = torch.einsum("qhd,khd->hqk", qf, kf * scale)
        else:
            scores = torch.einsum("qhd,khd->hqk", qf * scale, kf)
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        visible = visible_keys(sq, sk, left, right, device=q.device, attention_chunk=attention_chunk,
                               cp_world_size=cp_world_size, cp_rank=cp_rank,
                               cp_seqlen_k=cp_total[b] if cp_total is not None else None)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (h, sq); -inf for rows with no visible key
        probs = torch.where(visible, torch.exp(scores - row_lse.unsqueeze(-1)), torch.zeros((), dtype=cdt,
                                                                                              device=q.device))
        if sinks is not None:  # one logit per q head joins each row's denominator and attends to nothing
            sink = sinks.to(device=q.device, dtype=row_lse.dtype).view(-1, 1).expand_as(row_lse)
            merged = torch.logaddexp(row_lse, sink)
            factor = torch.where(torch.isfinite(row_lse), torch.exp(row_lse - merged), torch.zeros((), dtype=cdt,
                                                                                                    device=q.device))
            probs = probs * factor.unsqueeze(-1).to(probs.dtype)
            row_lse = merged
        o = torch.einsum("hqk,khd->qhd", probs, vf)
        if varlen_q:
            out[q_start:q_start + sq] = o
            lse[:, q_start:q_start + sq] = row_lse.to(lse_dtype)
        else:
            out[b, :sq] = o
            lse[b, :, :sq] = row_lse.to(lse_dtype)
    return out, lse


def combine_ref(out_partial, lse_partial):
    """Reference of flash_attn_combine: merges split-KV partials.

    out_partial (num_splits, ..., d) and lse_partial (num_splits, ...) (FA3: (num_splits, b, s, h, d) and
    (num_splits, b, s, h), or packed (num_splits, total_q, h, ...)). Returns (out, lse) in float32 (float64
    for float64 inputs) with lse = logsumexp over splits and out = Σ exp(lse_i - lse) · out_i; a split whose
    weight is not a finite positive number (lse_i = -inf, or every split -inf) contributes nothing, so rows
    that no split saw come out as out = 0, lse = -inf.
    """
    dt = torch.float64 if out_partial.dtype == torch.float64 else torch.float32
    out_partial, lse_partial = out_partial.to(dt), lse_partial.to(dt)
    lse = torch.logsumexp(lse_partial, dim=0)
    weight = torch.exp(lse_partial - lse.unsqueeze(0))
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros((), dtype=dt, device=weight.device))
    contrib = torch.where(weight.unsqueeze(-1) > 0, weight.unsqueeze(-1) * out_partial,
                          torch.zeros((), dtype=dt, device=out_partial.device))
    return contrib.sum(dim=0), lse
