"""GPU replays of the calls vLLM and SGLang make to their FA3 forks (shared/research/serving-callers.md section
1; issue #14), with small tensors, each against the float32 reference by FA3's tolerance rule
(tests/test_decode_gpu.py's checks): vLLM's decode / chunked-prefill call of flash_attn_varlen_func (packed q,
block_table of page size 16 or 1, seqused_k, out=, scheduler_metadata from get_scheduler_metadata, a window
list, softcap, fa_version, num_splits=0, s_aux sinks; FP8 with per-tensor scales expanded to (B, Hkv)), the
same call captured in a CUDA graph and replayed with new lengths, and SGLang's flash_attn_with_kvcache call
(packed q with cu_seqlens_q, page_table, cache_seqlens, cu_seqlens_k_new=cu_seqlens_k, window tuple, softcap,
return_softmax_lse, sinks), vLLM's context-parallel decode (cp_world_size / cp_rank / cp_tot_seqused_k), and
the MLA prefills of both (d 192 / dv 128 unpadded: vLLM's causal varlen call with out= and the LSE, SGLang's
chunked-prefix pair of calls merged with flash_attn_combine).
Not replayed (not built): the MLA decode call (q_v / qv).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from _gpu import capture_graph, skip_reason  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu

_SKIP_REASON = skip_reason()
if _SKIP_REASON is not None:
    pytest.skip(_SKIP_REASON, allow_module_level=True)

import test_decode_gpu as D  # noqa: E402
import test_paged_gpu as P  # noqa: E402

from flash_attn3 import (_ops, flash_attn_combine, flash_attn_varlen_func, flash_attn_with_kvcache,  # noqa: E402
                         get_scheduler_metadata)

BF16, FP8 = D.BF16, D.FP8
H, H_K, D_HEAD = 8, 2, 128


def _require(dtype, *features):
    P._require_paged(dtype, D_HEAD)
    for f in features:
        if not _ops.BUILD.has(f):
            pytest.skip(f"{f} is not built")


def _paged_cache(dtype, lengths, cap, page_size):
    """Dense caches (b, cap, h_k, d) poisoned past each length, and the same keys in pages (NaN elsewhere)."""
    b = len(lengths)
    k, v = D._rand(dtype, b, cap, H_K, D_HEAD), D._rand(dtype, b, cap, H_K, D_HEAD)
    (kp, vp), table = P._to_pages((k, v), lengths, page_size, "nan")
    return (k, v), (kp, vp), table


def _lse_packed_to_dense(lse, b, s_q):
    """(h, b * s_q) varlen LSE -> (b, h, s_q), the dense layout of the references."""
    return lse.view(H, b, s_q).permute(1, 0, 2)


@pytest.mark.parametrize("page_size", [16, 1])
@pytest.mark.parametrize("variant", ["plain", "window_softcap_sinks", "fp8"])
def test_vllm_decode_call(page_size, variant):
    """vLLM's FlashAttentionImpl decode call: one token per sequence, against the paged cache."""
    dtype = FP8 if variant == "fp8" else BF16
    _require(dtype, *(("sinks",) if variant == "window_softcap_sinks" else ()))
    b, cap = 5, 700
    lengths = D._cache_lengths(b, cap)
    (k, v), (kp, vp), table = _paged_cache(dtype, lengths, cap, page_size)
    q = D._rand(dtype, b, 1, H, D_HEAD)
    seqlens = D._i32(lengths)
    window, softcap, sinks, descale = [-1, -1], 0.0, None, {}
    if variant == "window_softcap_sinks":
        # bfloat16, as vLLM keeps gpt-oss's sinks (the reference gets the same values)
        window, softcap, sinks = [127, 0], 30.0, (torch.randn(H, device=D.DEVICE) * 2).bfloat16()
    if variant == "fp8":  # vLLM's per-tensor scales, expanded to (B, Hkv) without copies
        descale = {n: torch.rand((), device=D.DEVICE).add(0.5).reshape(1, 1).expand(b, H_K)
                   for n in ("q_descale", "k_descale", "v_descale")}
    ref_kw = dict(causal=True, window_size=tuple(window), softcap=softcap, **descale)
    if sinks is not None:
        ref_kw["sinks"] = sinks
    refs = D._references(q, k, v, cache_seqlens=seqlens, **ref_kw)
    meta = get_scheduler_metadata(b, 1, cap, H, H_K, D_HEAD, seqlens, qkv_dtype=dtype, page_size=page_size,
                                  causal=True, window_size=window, num_splits=0)
    buf = D._nan_out((b, H, D_HEAD), D._out_dtype(dtype))
    out, lse = flash_attn_varlen_func(
        q=q.flatten(0, 1), k=kp, v=vp, out=buf, cu_seqlens_q=D._cu_seqlens([1] * b), max_seqlen_q=1,
        seqused_k=seqlens, max_seqlen_k=cap, softmax_scale=D_HEAD ** -0.5, causal=True, window_size=window,
        block_table=table, softcap=softcap, scheduler_metadata=meta, fa_version=3, num_splits=0, s_aux=sinks,
        return_softmax_lse=True, **descale)[:2]
    assert out is buf, "the call must write into and return out="
    D._check(out.view(b, 1, H, D_HEAD), _lse_packed_to_dense(lse, b, 1), refs,
             f"vLLM decode page_size={page_size} {variant} lengths={lengths}", kvcache=True)


@pytest.mark.parametrize("page_size", [16, 1])
def test_vllm_chunked_prefill_call(page_size):
    """vLLM's mixed batch: decode rows and chunked-prefill rows (several new queries each) in one varlen call
    against the paged cache, with a sliding window and sinks (gpt-oss)."""
    _require(BF16, "sinks")
    q_lens = [1, 17, 1, 113, 3]
    b, cap = len(q_lens), 600
    lengths = [max(ql, n) for ql, n in zip(q_lens, D._cache_lengths(b, cap))]  # a query sees itself
    (_, _), (kp, vp), table = _paged_cache(BF16, lengths, cap, page_size)
    cu_q = D._cu_seqlens(q_lens)
    q = D._rand(BF16, sum(q_lens), H, D_HEAD)
    seqlens = D._i32(lengths)
    sinks = torch.randn(H, device=D.DEVICE)
    kw = dict(cu_seqlens_q=cu_q, causal=True, window_size=(63, 0), sinks=sinks)
    refs = D._references(q, kp, vp, page_table=table, cache_seqlens=seqlens, **kw)
    meta = get_scheduler_metadata(b, max(q_lens), cap, H, H_K, D_HEAD, seqlens, qkv_dtype=BF16, cu_seqlens_q=cu_q,
                                  page_size=page_size, causal=True, window_size=(63, 0), num_splits=0)
    out, lse = flash_attn_varlen_func(q=q, k=kp, v=vp, max_seqlen_q=max(q_lens), seqused_k=seqlens,
                                      max_seqlen_k=cap, block_table=table, scheduler_metadata=meta, fa_version=3,
                                      num_splits=0, s_aux=sinks, return_softmax_lse=True,
                                      **{n: kw[n] for n in ("cu_seqlens_q", "causal", "window_size")})[:2]
    D._check(out, lse, refs, f"vLLM chunked prefill page_size={page_size} q_lens={q_lens} lengths={lengths}",
             kvcache=True)


def test_vllm_decode_graph_replay_with_scheduler_metadata():
    """vLLM captures the decode step once and replays it with new lengths and block tables; the metadata is
    made inside the capture (device fills only) and stays valid across replays."""
    _require(BF16)
    b, cap, page_size = 6, 1024, 16
    max_pages = cap // page_size
    num_pages = b * max_pages
    kp, vp = D._rand(BF16, num_pages, page_size, H_K, D_HEAD), D._rand(BF16, num_pages, page_size, H_K, D_HEAD)
    q = D._rand(BF16, b, H, D_HEAD)
    table = torch.randperm(num_pages, device=D.DEVICE).to(torch.int32).view(b, max_pages).contiguous()
    seqlens = D._i32(D._cache_lengths(b, cap))
    cu_q = D._cu_seqlens([1] * b)
    buf = D._nan_out((b, H, D_HEAD), BF16)

    def step():
        meta = get_scheduler_metadata(b, 1, cap, H, H_K, D_HEAD, seqlens, qkv_dtype=BF16, page_size=page_size,
                                      causal=True, num_splits=0)
        return flash_attn_varlen_func(q=q, k=kp, v=vp, out=buf, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seqlens,
                                      max_seqlen_k=cap, causal=True, block_table=table, scheduler_metadata=meta,
                                      fa_version=3, num_splits=0, return_softmax_lse=True)[:2]

    graph, (out_g, lse_g) = capture_graph(step)
    for _ in range(3):
        seqlens.copy_(D._i32(D._cache_lengths(b, cap)))
        table.copy_(torch.randperm(num_pages, device=D.DEVICE).to(torch.int32).view(b, max_pages))
        graph.replay()
        torch.cuda.synchronize()
        refs = D._references(q.view(b, 1, H, D_HEAD), kp, vp, page_table=table, cache_seqlens=seqlens, causal=True)
        D._check(out_g.view(b, 1, H, D_HEAD), _lse_packed_to_dense(lse_g, b, 1), refs,
                 f"graph replay lengths={seqlens.tolist()}", kvcache=True)


@pytest.mark.parametrize("page_size", [1, 16])
def test_sglang_kvcache_call(page_size):
    """SGLang's FlashAttentionBackend call: packed q of the batch's new tokens with cu_seqlens_q, the token
    (page 1) or paged cache, cache_seqlens counting the new tokens, cu_seqlens_k_new=cu_seqlens_k without new
    keys (FA3 ignores it), a window tuple, softcap, return_softmax_lse and sinks."""
    _require(BF16, "sinks")
    q_lens = [1, 5, 1, 31]
    b, cap = len(q_lens), 500
    lengths = [max(ql, n) for ql, n in zip(q_lens, D._cache_lengths(b, cap))]
    (_, _), (kp, vp), table = _paged_cache(BF16, lengths, cap, page_size)
    cu_q = D._cu_seqlens(q_lens)
    q = D._rand(BF16, sum(q_lens), H, D_HEAD)
    seqlens = D._i32(lengths)
    sinks = torch.randn(H, device=D.DEVICE)
    refs = D._references(q, kp, vp, cu_seqlens_q=cu_q, page_table=table, cache_seqlens=seqlens, causal=True,
                         window_size=(100, 0), softcap=20.0, sinks=sinks)
    out, lse, *_ = flash_attn_with_kvcache(q=q, k_cache=kp, v_cache=vp, page_table=table, cache_seqlens=seqlens,
                                           cu_seqlens_q=cu_q, cu_seqlens_k_new=D._cu_seqlens(lengths),
                                           max_seqlen_q=max(q_lens), softmax_scale=D_HEAD ** -0.5, causal=True,
                                           window_size=(100, 0), softcap=20.0, k_descale=None, v_descale=None,
                                           return_softmax_lse=True, sinks=sinks)
    D._check(out, lse, refs, f"SGLang page_size={page_size} q_lens={q_lens} lengths={lengths}", kvcache=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("page_size", [16, None])
@pytest.mark.parametrize("num_splits", [1, 0, 3])
def test_vllm_context_parallel_decode_call(world, page_size, num_splits):
    """vLLM's decode context parallelism (its fork's cp_world_size / cp_rank / cp_tot_seqused_k): global key
    g of a sequence lives on rank g % world at local index g // world. Every rank's call (decode rows and a
    17-query chunk, GQA, paged or contiguous, split or not) against the reference with the same cp arguments;
    then the ranks' (out, lse) merged by flash_attn_combine against causal attention over whole sequences, a
    check that does not rely on the reference's reading of the cp arguments."""
    _require(BF16)
    q_lens = [1, 1, 3, 1, 17]
    b, cap = len(q_lens), 900
    totals = [max(ql, t) for ql, t in zip(q_lens, D._cache_lengths(b, cap))]
    totals[1] = 0  # a sequence with no key at all: every rank gives O = 0, LSE = -inf
    k, v = D._rand(BF16, b, cap, H_K, D_HEAD), D._rand(BF16, b, cap, H_K, D_HEAD)
    cu_q = D._cu_seqlens(q_lens)
    q = D._rand(BF16, sum(q_lens), H, D_HEAD)
    total_t = D._i32(totals)
    outs, lses, pts, ref_lses = [], [], [], []
    for rank in range(world):
        local = D._i32([max(0, -(-(t - rank) // world)) for t in totals])
        k_r, v_r = k[:, rank::world].contiguous(), v[:, rank::world].contiguous()
        cp = dict(cp_world_size=world, cp_rank=rank, cp_tot_seqused_k=total_t)
        refs = D._references(q, k_r, v_r, cu_seqlens_q=cu_q, cache_seqlens=local, causal=True, **cp)
        if page_size is None:
            kk, vv, table = k_r, v_r, None
        else:
            (kk, vv), table = P._to_pages((k_r, v_r), local.tolist(), page_size, "nan")
        out, lse = flash_attn_varlen_func(q=q, k=kk, v=vv, cu_seqlens_q=cu_q, max_seqlen_q=max(q_lens),
                                          seqused_k=local, max_seqlen_k=k_r.shape[1], block_table=table,
                                          causal=True, num_splits=num_splits, return_softmax_lse=True, **cp)[:2]
        D._check(out, lse, refs, f"cp rank {rank}/{world} page_size={page_size} splits={num_splits} "
                 f"totals={totals}", kvcache=True)
        outs.append(out.float())
        lses.append(lse.transpose(0, 1))
        pts.append(refs.pt.float())
        ref_lses.append(refs.lse.transpose(0, 1))
    merged, merged_lse = flash_attn_combine(torch.stack(outs), torch.stack(lses))  # (total_q, h, d), (total_q, h)
    full_out, full_lse = D.attention_ref(q, k, v, cu_seqlens_q=cu_q, cache_seqlens=total_t, causal=True)
    # FA3's rule on the merged result: the same merge of PyTorch's low-precision rank results is the baseline.
    merged_pt, _ = D.combine_ref(torch.stack(pts), torch.stack(ref_lses))
    err = (merged - full_out).abs().max().item()
    pt_err = (merged_pt - full_out).abs().max().item()
    assert err <= 2 * pt_err + D.OUT_FLOOR, f"merged ranks: max error {err:.3e} > 2 x {pt_err:.3e} (totals={totals})"
    torch.testing.assert_close(merged_lse.transpose(0, 1), full_lse, atol=D.LSE_ATOL, rtol=0)


# DeepSeek-V3's MLA prefill: q and k are nope 128 + rope 64 = 192, v is 128, passed unpadded (section 1).
MLA_D, MLA_DV, MLA_H = 192, 128, 8


def _require_mla_prefill():
    if _ops.BUILD.compiled_head_dims(BF16, MLA_D, MLA_DV) is None:
        pytest.skip(f"no bfloat16 kernel serves (d, dv) = ({MLA_D}, {MLA_DV})")


def _mla_qkv(q_lens, k_lens):
    return (D._rand(BF16, sum(q_lens), MLA_H, MLA_D), D._rand(BF16, sum(k_lens), MLA_H, MLA_D),
            D._rand(BF16, sum(k_lens), MLA_H, MLA_DV))


def test_vllm_mla_prefill_call():
    """vLLM's MLA prefill: one causal varlen call over the new tokens, d 192 / dv 128 without padding,
    out= (NaN-poisoned) and return_softmax_lse, MHA heads, odd and empty sequences."""
    _require_mla_prefill()
    lens = [77, 1, 0, 300, 513]
    cu = D._cu_seqlens(lens)
    q, k, v = _mla_qkv(lens, lens)
    scale = MLA_D ** -0.5
    refs = D._references(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, softmax_scale=scale)
    buf = D._nan_out((sum(lens), MLA_H, MLA_DV), BF16)
    result = flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                    max_seqlen_k=max(lens), softmax_scale=scale, causal=True,
                                    return_softmax_lse=True, out=buf, fa_version=3)
    out, lse = result[:2]
    D._assert_wrote_into(out, buf, "vLLM MLA prefill")
    D._check(out, lse, refs, f"vLLM MLA prefill lengths={lens}")


def test_sglang_mla_chunked_prefix_prefill_call():
    """SGLang's MLA prefill over a cached prefix: the new tokens attend to the prefix (causal=False) and to
    themselves (causal=True) in two varlen calls that return the LSE; each against the reference, then their
    (out, lse) merged by flash_attn_combine against causal attention over prefix + new tokens."""
    _require_mla_prefill()
    new, prefix = [5, 64, 1, 17], [100, 0, 37, 1024]
    cu_new, cu_pre = D._cu_seqlens(new), D._cu_seqlens(prefix)
    q, k_new, v_new = _mla_qkv(new, new)
    _, k_pre, v_pre = _mla_qkv(new, prefix)
    scale = MLA_D ** -0.5
    parts = [(k_pre, v_pre, cu_pre, max(prefix), False), (k_new, v_new, cu_new, max(new), True)]
    outs, lses, pts, ref_lses = [], [], [], []
    for k, v, cu_k, max_k, causal in parts:
        refs = D._references(q, k, v, cu_seqlens_q=cu_new, cu_seqlens_k=cu_k, causal=causal, softmax_scale=scale)
        out, lse = flash_attn_varlen_func(q, k, v, cu_new, cu_k, max(new), max_k, softmax_scale=scale,
                                          causal=causal, return_softmax_lse=True)[:2]
        D._check(out, lse, refs, f"SGLang MLA prefix prefill causal={causal} new={new} prefix={prefix}")
        outs.append(out.float())
        lses.append(lse.transpose(0, 1))
        pts.append(refs.pt.float())
        ref_lses.append(refs.lse.transpose(0, 1))
    merged, merged_lse = flash_attn_combine(torch.stack(outs), torch.stack(lses))  # (total_q, h, dv), (total_q, h)
    # The whole sequences: each one's prefix keys, then its new keys; bottom-right causal over all of them.
    starts_pre, starts_new = [0, *itertools.accumulate(prefix)], [0, *itertools.accumulate(new)]

    def whole(pre, cur):
        pieces = []
        for b in range(len(new)):
            pieces += [pre[starts_pre[b]:starts_pre[b + 1]], cur[starts_new[b]:starts_new[b + 1]]]
        return torch.cat(pieces)

    k_all, v_all = whole(k_pre, k_new), whole(v_pre, v_new)
    cu_all = D._cu_seqlens([p + n for p, n in zip(prefix, new)])
    full_out, full_lse = D.attention_ref(q, k_all, v_all, cu_seqlens_q=cu_new, cu_seqlens_k=cu_all, causal=True,
                                         softmax_scale=scale)
    merged_pt, _ = D.combine_ref(torch.stack(pts), torch.stack(ref_lses))
    err = (merged - full_out).abs().max().item()
    pt_err = (merged_pt - full_out).abs().max().item()
    assert err <= 2 * pt_err + D.OUT_FLOOR, f"merged prefix + new: max error {err:.3e} > 2 x {pt_err:.3e}"
    torch.testing.assert_close(merged_lse.transpose(0, 1), full_lse, atol=D.LSE_ATOL, rtol=0)
