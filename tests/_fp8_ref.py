"""The low-precision PyTorch baseline of FA3's tolerance rule for FP8 inputs (shared/research/fa3.md §5.3).

FA3's tests compare the kernel with two references: out_ref, float32 attention of the dequantised inputs
(flash_attn3.reference.attention_ref with upcast=True), and out_pt, "PyTorch at low precision": attention_ref
with upcast=False, reorder_ops=True and intermediate_dtype=float8_e4m3fn, i.e. bfloat16 arithmetic with the
probabilities P rounded to FP8 before the P @ V product, as the kernel's tensor cores need them. The kernel may
be at most a small multiple further from out_ref than out_pt is. flash_attn3.reference has no intermediate
dtype, so this module computes out_pt itself, with the same argument semantics as attention_ref for the
arguments it accepts (dense or packed q, k, v; cu_seqlens, seqused / cache_seqlens, causal and window masks,
softcap, attention sinks, GQA, (b, h_k) descales).

The FP8 P is emulated the way the kernel forms it (FA3's softmax with Max_offset = 8): P is taken relative to
the row maximum, p = exp(s - max) in [0, 1], scaled by 2^8 so that it uses the normal range of e4m3 (max 448,
smallest normal 2^-6), rounded to e4m3, and the product with V is divided by 2^8 and by the row sum of the
unrounded p. Scaling by a power of two is exact, so the only rounding P sees is e4m3's (3 mantissa bits:
relative error up to 2^-4), which dominates the error of an FP8 kernel's output.
"""
from __future__ import annotations

import torch

from flash_attn3.reference import visible_keys

FP8 = torch.float8_e4m3fn
P_SCALE = 256.0  # 2^8: the kernel's scaling of P before its cast to e4m3


def _per_batch(x, n):
    if x is None:
        return None
    if isinstance(x, int):
        return [x] * n
    vals = [int(t) for t in x.reshape(-1).tolist()]
    assert len(vals) == n, f"expected {n} entries, got {len(vals)}"
    return vals


def attention_fp8_lowp(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                       cache_seqlens=None, causal=False, window_size=(-1, -1), attention_chunk=0,
                       softmax_scale=None, q_descale=None, k_descale=None, v_descale=None, softcap=0.0, sinks=None,
                       intermediate_dtype=FP8,
                       p_scale=P_SCALE):
    """Low-precision attention of FP8 (or any) inputs; returns out in bfloat16 with q's layout.

    Layouts and argument meanings as flash_attn3.reference.attention_ref (cache_seqlens is seqused_k's kv-cache
    name). Per batch entry: q, k, v dequantised (upcast, multiplied by their (b, h_k) descale in float32) and
    rounded to bfloat16; scores = q @ (k * scale)ᵀ in bfloat16 (FA3's reorder_ops, which estimates the error of
    the other order); softcap > 0: scores = tanh(scores / softcap) * softcap (bfloat16), before the mask;
    masked; p = exp(scores - row max) in bfloat16; P rounded through `intermediate_dtype` after scaling by
    `p_scale` (None: no rounding, the plain bfloat16 baseline); out = (P @ V) / (p_scale * (Σ p + e^(sink -
    row max))) with the product in bfloat16 and the normalisation in float32 (sinks: float32 (h,) logits in
    the scaled scores' units, as the kernel adds them after the row's keys), rounded to bfloat16. Rows with
    no visible key and unused rows get 0.
    """
    if cache_seqlens is not None:
        assert seqused_k is None, "give seqused_k or cache_seqlens, not both"
        seqused_k = cache_seqlens
    lp = torch.bfloat16
    varlen_q = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    h, d = q.shape[-2], q.shape[-1]
    h_k = k.shape[-2]
    group = h // h_k
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    cu_q, cu_k = _per_batch(cu_seqlens_q, batch + 1), _per_batch(cu_seqlens_k, batch + 1)
    used_q, used_k = _per_batch(seqused_q, batch), _per_batch(seqused_k, batch)

    def load(x, b, descale, is_q):
        x = x.float()
        if descale is not None:
            per_kv_head = descale[b].float()
            x = x * (per_kv_head.repeat_interleave(group) if is_q else per_kv_head)[None, :, None]
        x = x.to(lp)
        return x if is_q else x.repeat_interleave(group, dim=1)

    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=lp, device=q.device)
    for b in range(batch):
        q_rows = q[cu_q[b]:cu_q[b + 1]] if varlen_q else q[b]
        if used_q is not None:
            q_rows = q_rows[:used_q[b]]
        k_rows = k[cu_k[b]:cu_k[b + 1]] if cu_k is not None else k[b]
        v_rows = v[cu_k[b]:cu_k[b + 1]] if cu_k is not None else v[b]
        if used_k is not None:
            k_rows, v_rows = k_rows[:used_k[b]], v_rows[:used_k[b]]
        sq, sk = q_rows.shape[0], k_rows.shape[0]
        if sq == 0:
            continue
        qf, kf, vf = load(q_rows, b, q_descale, True), load(k_rows, b, k_descale, False), load(v_rows, b, v_descale,
                                                                                             False)
        scores = torch.einsum("qhd,khd->hqk", qf, kf * scale)  # bfloat16
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        visible = visible_keys(sq, sk, left, right, device=q.device, attention_chunk=attention_chunk)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True) if sk > 0 else torch.zeros(h, sq, 1, dtype=lp, device=q.device)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros((), dtype=lp, device=q.device))
        p = torch.exp(scores - row_max)  # bfloat16, 0 where masked, 1 at the row maximum
        row_sum = p.float().sum(dim=-1, keepdim=True)  # float32, of the unrounded p, as the kernel's row sum
        if sinks is not None:  # each head's sink joins the denominator relative to the same row maximum
            row_sum = row_sum + torch.exp(sinks.float().view(h, 1, 1) - row_max.float())
        if intermediate_dtype is not None:
            p_op = ((p.float() * p_scale).to(intermediate_dtype).float()).to(lp)  # the scaled FP8 operand
            denom = row_sum * p_scale
        else:
            p_op, denom = p, row_sum
        o = torch.einsum("hqk,khd->hqd", p_op, vf)  # bfloat16
        o = torch.where(denom > 0, o.float() / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        o = o.to(lp).transpose(0, 1)  # (sq, h, dv)
        if varlen_q:
            out[cu_q[b]:cu_q[b] + sq] = o
        else:
            out[b, :sq] = o
    return out
