"""Public forward functions, signature-compatible with FlashAttention-3's `flash_attn_interface`.

Each function validates every argument (flash_attn3._checks; device rule last) into one call object, a
FwdCall that holds every argument of the op by name, raises NotImplementedError for what this build did not
compile or this version does not implement, allocates `out` and `softmax_lse`, and calls the one C++ op
`torch.ops.flash_attn3.fwd` with the call's arguments in schema order (FwdCall.op_args, the only place that
knows that order). No kernel selection and no host sync happens here, so every call can be captured in a
CUDA graph and traced by torch.compile (through the fake registered in flash_attn3._ops). The exception is
the opt-in checked mode (flash_attn3._checked), which reads the metadata tensors back once per call to
validate their values. Only the forward pass exists; there is no autograd.

Layouts (b = batch, s_q/s_k = sequence lengths, h/h_k = query/key heads, d/dv = head dims):
dense q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, dv); packed variable-length q (total_q, h, d)
with int32 cu_seqlens_q (b + 1,); out has q's layout with dv; softmax_lse is float32 natural-log
(b, h, s_q) dense or (h, total_q) varlen. Causal and local masks are aligned to the bottom-right corner:
query i of a sequence sees keys [i + s_k - s_q - left, i + s_k - s_q + right].
"""
from __future__ import annotations

import dataclasses

import torch

from flash_attn3 import _checked, _checks, _ops


def _run_fwd(call):
    """Runs one validated call (a FwdCall from check_fwd): checks that the extension and the needed kernels
    exist, checks the metadata values in checked mode, allocates the outputs, calls the op."""
    _ops.require_extension()
    _checks.check_supported(call, _ops.BUILD)
    if _checked.is_enabled():
        _checked.check_metadata(
            call.q, call.k, cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k,
            seqused_q=call.seqused_q, seqused_k=call.seqused_k, max_seqlen_q=call.max_seqlen_q,
            max_seqlen_k=call.max_seqlen_k, page_table=call.page_table, kv_batch_idx=call.kv_batch_idx,
            leftpad_k=call.leftpad_k, names=call.names, cp_world_size=call.cp_world_size, cp_rank=call.cp_rank,
            cp_tot_seqused_k=call.cp_tot_seqused_k)
    args, out, softmax_lse = call.op_args_with_outputs()
    _ops.fwd(*args)
    return out, softmax_lse


def _check_common_extras(qv, attention_chunk, **flags):
    _checks.check_tensor("qv", qv, optional=True)
    _checks.check_int("attention_chunk", attention_chunk, 0)
    for name, flag in flags.items():
        _checks.check_bool(name, flag)


def _reject_unimplemented(qv):
    if qv is not None:
        raise _checks.not_implemented("qv (the extra query of MLA-style absorbed decoding)")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, sinks=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):  # noqa: E501
    """Attention over dense batches: softmax(q kᵀ · softmax_scale) v, per head.

    Args:
        q: (batch, seqlen_q, num_heads, head_dim), float16 / bfloat16 / float8_e4m3fn, last dim contiguous.
        k: (batch, seqlen_k, num_heads_k, head_dim), same dtype; num_heads % num_heads_k == 0 (GQA/MQA:
            query head i uses key head i // (num_heads / num_heads_k)).
        v: (batch, seqlen_k, num_heads_k, head_dim_v), same dtype.
        softmax_scale: scale of q kᵀ, any finite value; default head_dim ** -0.5. 0 weighs every visible key
            equally (out = the mean of v over them); a negative scale favours the least similar keys.
        causal: bottom-right aligned causal mask (same as window_size=(left, 0)).
        qv: not implemented (raises NotImplementedError when given).
        q_descale, k_descale, v_descale: float32 (batch, num_heads_k) dequantisation scales, fp8 only.
        window_size: (left, right) local window, -1 = unbounded; query i sees keys
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]. A tuple or list of two ints, or
            a 2-element integer tensor as FA3 allows (a CUDA one is read back to the host, one sync).
        attention_chunk: 0 = off; > 0: chunked attention (Llama 4): query i sees only keys of its own chunk
            [c, c + attention_chunk), c = floor((i + seqlen_k - seqlen_q) / attention_chunk) * attention_chunk,
            intersected with the causal mask / window.
        softcap: if > 0, scores become tanh(score · softmax_scale / softcap) · softcap before masking.
        num_splits: 1 = no split-KV; 0 (or any value <= 0, as FA3) = heuristic; > 1 (up to 256) forces that many.
        pack_gqa: None = heuristic; True/False force packing the query heads of one key head into one tile.
        deterministic: accepted for compatibility; affects only a backward pass, which does not exist here.
        sm_margin: SMs to leave free for concurrent kernels (e.g. communication).
        return_attn_probs: also return softmax_lse (FA3 returns the LSE, never the probability matrix).
        sinks: float32 (num_heads,) attention-sink logits that join each row's softmax denominator (gpt-oss).
        cp_world_size, cp_rank, cp_tot_seqused_k: context parallelism over the keys (vLLM's FA3 fork): k / v
            hold rank cp_rank's round-robin share of each sequence's keys, local key j being global key
            j * cp_world_size + cp_rank of cp_tot_seqused_k[b] (int32 (batch,), required when cp_world_size > 1);
            the causal mask is the global one (query i at global position i + cp_tot_seqused_k[b] - seqlen_q
            sees the keys at or before it). Merge the ranks' (out, softmax_lse) with flash_attn_combine's rule.
            Causal or no mask only (a window or chunk raises NotImplementedError); sinks, if given, join every
            rank's denominator, so pass them on one rank. cp_world_size 1 (default): off.

    Returns:
        out (batch, seqlen_q, num_heads, head_dim_v) in q's dtype (bfloat16 for fp8 inputs), or
        (out, softmax_lse) with softmax_lse float32 (batch, num_heads, seqlen_q) if return_attn_probs.
        Rows that see no key give out = 0 and softmax_lse = -inf.
    """
    _check_common_extras(qv, attention_chunk, deterministic=deterministic, return_attn_probs=return_attn_probs)
    call = _checks.check_fwd(
        q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, attention_chunk=attention_chunk, softcap=softcap, sinks=sinks, num_splits=num_splits, pack_gqa=pack_gqa,
        sm_margin=sm_margin, extra_tensors={"qv": qv}, cp_world_size=cp_world_size, cp_rank=cp_rank,
        cp_tot_seqused_k=cp_tot_seqused_k)
    _reject_unimplemented(qv)
    out, softmax_lse = _run_fwd(call)
    return (out, softmax_lse) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, deterministic=False, num_heads_q=None, sm_margin=0, return_attn_probs=False, sinks=None):  # noqa: E501
    """flash_attn_func on q, k, v packed in one tensor (FA3's signature), read through views (no copies).

    Args:
        qkv: (batch, seqlen, 3, num_heads, head_dim), q, k, v along dim -3; or 4-D (batch, seqlen,
            num_heads_q + 2 * num_heads_k, head_dim) with num_heads_q given: q heads first, then k's, then
            v's (GQA / MQA).
        num_heads_q: the q heads of a 4-D qkv (required there, not allowed with 5-D).
        The other arguments are flash_attn_func's.

    Returns:
        out (batch, seqlen, num_heads_q, head_dim), or (out, softmax_lse) if return_attn_probs.
    """
    _checks.check_tensor("qkv", qkv)
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv: a 5-D qkv must be (batch, seqlen, 3, num_heads, head_dim), got shape "
                             f"{tuple(qkv.shape)}")
        if num_heads_q is not None:
            raise ValueError("num_heads_q: only for a 4-D qkv (batch, seqlen, num_heads_q + 2 * num_heads_k, "
                             "head_dim); a 5-D one has equal head counts")
        q, k, v = qkv.unbind(dim=-3)
    elif qkv.dim() == 4:
        if num_heads_q is None:
            raise ValueError("num_heads_q: required with a 4-D qkv (batch, seqlen, num_heads_q + 2 * num_heads_k, "
                             "head_dim)")
        _checks.check_int("num_heads_q", num_heads_q, 1)
        heads = qkv.shape[2]
        num_heads_k = (heads - num_heads_q) // 2
        if num_heads_k < 1 or num_heads_q + 2 * num_heads_k != heads:
            raise ValueError(f"num_heads_q: {num_heads_q} leaves {heads - num_heads_q} of qkv's {heads} heads, "
                             "which must be 2 * num_heads_k with num_heads_k >= 1")
        q, k, v = qkv.split([num_heads_q, num_heads_k, num_heads_k], dim=-2)
    else:
        raise ValueError(f"qkv: must be 5-D (batch, seqlen, 3, num_heads, head_dim) or 4-D (batch, seqlen, "
                         f"num_heads_q + 2 * num_heads_k, head_dim), got {qkv.dim()}-D")
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, q_descale=q_descale,
                           k_descale=k_descale, v_descale=v_descale, window_size=window_size,
                           attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                           sm_margin=sm_margin, return_attn_probs=return_attn_probs, sinks=sinks)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, scheduler_metadata=None, out=None, return_softmax_lse=False, block_table=None, fa_version=None, s_aux=None, sinks=None, q_v=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):  # noqa: E501
    """Attention over packed variable-length sequences.

    Sequence i occupies rows [cu_seqlens_q[i], cu_seqlens_q[i + 1]) of q and [cu_seqlens_k[i],
    cu_seqlens_k[i + 1]) of k and v; masks are aligned per sequence.

    Args:
        q: (total_q, num_heads, head_dim); or dense (batch, seqlen_q, num_heads, head_dim) if cu_seqlens_q
            is None.
        k, v: (total_k, num_heads_k, head_dim / head_dim_v); or dense 4-D if cu_seqlens_k is None.
        cu_seqlens_q, cu_seqlens_k: int32 contiguous (batch + 1,) prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sequence (required with the matching
            cu_seqlens; used for grid sizing). Ignored for a dense side. Nothing checks them against the
            device-side cu_seqlens unless checked mode is on (flash_attn3.checked_mode).
        seqused_q, seqused_k: optional int32 (batch,): only the first seqused[i] rows of sequence i are used;
            output rows beyond them are not written.
        scheduler_metadata: optional, from get_scheduler_metadata with the same sizes (as vLLM passes it).
        Other arguments: as in flash_attn_func.

    The call surface of vLLM's FA3 fork is accepted as well (keywords; upstream's defaults stay): `out=`
    (written and returned), `return_softmax_lse` (as return_attn_probs), `block_table` (a paged cache:
    k / v are (num_pages, page_size, num_heads_k, head_dim), with seqused_k and cu_seqlens_k None, as
    flash_attn_with_kvcache's page_table), `fa_version` (accepted, ignored), `q_v` (qv's other name).
    `s_aux` / `sinks` (vLLM's / SGLang's name): float32 (num_heads,) attention-sink logits that join each row's
    softmax denominator (gpt-oss). `cp_world_size`, `cp_rank`, `cp_tot_seqused_k`: context parallelism, as
    in flash_attn_func (the fork's decode context parallelism; cp_tot_seqused_k int32 (batch,)).

    Returns:
        out (total_q, num_heads, head_dim_v), or (out, softmax_lse) with softmax_lse float32
        (num_heads, total_q) if return_attn_probs or return_softmax_lse.
    """
    _check_common_extras(qv, attention_chunk, deterministic=deterministic, return_attn_probs=return_attn_probs,
                         return_softmax_lse=return_softmax_lse)
    if q_v is not None:
        if qv is not None:
            raise ValueError("q_v, qv: the same argument under two names (vLLM's and FA3's); give one")
        qv = q_v
    if fa_version is not None:
        _checks.check_int("fa_version", fa_version, 0)  # accepted and ignored, as vLLM's fork selects with it
    if s_aux is not None and sinks is not None:
        raise ValueError("s_aux, sinks: the same argument under two names (vLLM's and SGLang's); give one")
    sink_name = "s_aux" if s_aux is not None else "sinks"
    sinks = s_aux if s_aux is not None else sinks
    names = {"sinks": sink_name, **({"page_table": "block_table"} if block_table is not None else {})}
    call = _checks.check_fwd(
        q, k, v, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_table=block_table,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, attention_chunk=attention_chunk, softcap=softcap, sinks=sinks, num_splits=num_splits, pack_gqa=pack_gqa,
        sm_margin=sm_margin, names=names, extra_tensors={"qv": qv, "scheduler_metadata": scheduler_metadata},
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k)
    _check_scheduler_metadata(scheduler_metadata, call)
    _reject_unimplemented(qv)
    out, softmax_lse = _run_fwd(call)
    return (out, softmax_lse) if return_attn_probs or return_softmax_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0, return_softmax_lse=False, sinks=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):  # noqa: E501
    """Attention of new queries against a KV cache (inference decode / prefill with a cache).

    Args:
        q: (batch, seqlen_q, num_heads, head_dim), or (total_q, num_heads, head_dim) with cu_seqlens_q
            (int32 (batch + 1,)) and max_seqlen_q.
        k_cache, v_cache: (batch_cache, seqlen_cache, num_heads_k, head_dim / head_dim_v); with page_table,
            (num_pages, page_size, num_heads_k, head_dim / head_dim_v) with any page size.
        k, v: new keys/values, (batch, seqlen_new, num_heads_k, head_dim / head_dim_v) or packed
            (total_new, ...) with cu_seqlens_k_new: written in place into k_cache / v_cache at positions
            cache_seqlens[i] .. cache_seqlens[i] + seqlen_new_i - 1 of entry i's cache row (paged or not, through
            cache_batch_idx), then attended in the same call. The cache must have room (checked mode checks it;
            positions past the capacity are not written).
        rotary_cos, rotary_sin: (positions, rotary_dim / 2) in q's dtype, rotary_dim a multiple of 16 up to the
            head dim, at least as many rows as the cache has positions: the new keys are rotated at positions
            (rotary_seqlens or cache_seqlens) + j, and q at that base + i when causal / local, else all at the
            base (FA3's rule); rotary_interleaved: GPT-J pairs (True, the default) or GPT-NeoX halves. Only with
            k, v; not for float8 inputs. rotary_seqlens without rotary_cos is ignored, as in FA3.
        qv: not implemented (NotImplementedError).
        cache_seqlens: int or int32 (batch,): valid cache length of each batch entry, counted from index 0
            of the cache row (so including cache_leftpad). Default: the whole cache.
        cache_batch_idx: int32 (batch,): cache row (or page-table row) of each batch entry.
        cache_leftpad: int32 (batch,): first valid cache index of each batch entry.
        page_table: int32 (batch, max_pages): page indices into k_cache/v_cache; the cache of batch entry i
            is the concatenation of its pages, max_pages * page_size positions.
        cu_seqlens_k_new: varlen layout of k/v; ignored without them (as FA3 does; SGLang always passes it).
        scheduler_metadata: optional int32 tensor from get_scheduler_metadata for the same sizes and options.
            The kernel schedules itself on the device from cache_seqlens (no host sync, so a captured decode
            step replays correctly with new lengths), so the metadata only records the host-side choices
            (num_splits, pack_gqa); its dtype, shape and device are checked, and in checked mode its tag. The
            call's own plan (from its shapes and num_splits / pack_gqa) is what runs, so metadata made with a
            different max_seqlen_k (vLLM passes the batch's longest) is harmless.
        num_splits: 0 (or any value <= 0) = heuristic (default), 1 = no split-KV, > 1 (up to 256) forced.
        cp_world_size, cp_rank, cp_tot_seqused_k: context parallelism (flash_attn_func): the cache holds this
            rank's share of the keys. Not with new k, v (NotImplementedError): append on the rank that owns the
            new positions first, then attend.
        Other arguments: as in flash_attn_func.

    Returns:
        out with q's layout and head_dim_v, or, if return_softmax_lse, the FA3 4-tuple
        (out, softmax_lse, out_accum, softmax_lse_accum) where the two accumulators are empty float32
        tensors (split-KV partials are not exposed).
    """
    _checks.check_tensor("k", k, optional=True)
    _checks.check_tensor("v", v, optional=True)
    _checks.check_tensor("cu_seqlens_k_new", cu_seqlens_k_new, optional=True)
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("rotary_seqlens", rotary_seqlens),
                    ("scheduler_metadata", scheduler_metadata)):
        _checks.check_tensor(name, t, optional=True)
    _check_common_extras(qv, attention_chunk, rotary_interleaved=rotary_interleaved,
                         return_softmax_lse=return_softmax_lse)
    if (k is None) != (v is None):
        raise ValueError("k, v: the new keys and values must be given together")
    if k is not None and _checks._is_int(cp_world_size) and cp_world_size > 1:
        raise _checks.not_implemented("k, v (KV append) with cp_world_size > 1 (context parallelism)")
    if k is not None and cache_seqlens is None:
        raise ValueError("cache_seqlens: required when new k, v are given (it is where they are appended)")
    # cu_seqlens_k_new without new k, v describes nothing and is ignored, as FA3 ignores it: SGLang passes
    # cu_seqlens_k_new=cu_seqlens_k on every call (shared/research/anchors.md 7.3).
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: must be given together")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos: rotary embedding is applied to appended keys; it requires new k, v")
    # rotary_seqlens without rotary_cos / rotary_sin is ignored, as FA3 ignores it.
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_tensor(name, t)
        _checks.check_last_dim_contiguous(name, t)

    seqused_k = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    cache_seqlens_int = None if cache_seqlens is None or seqused_k is not None else cache_seqlens
    if cache_seqlens_int is not None:
        _checks.check_int("cache_seqlens", cache_seqlens_int, 0)
    names = {"k": "k_cache", "v": "v_cache", "seqused_k": "cache_seqlens", "kv_batch_idx": "cache_batch_idx",
             "leftpad_k": "cache_leftpad"}
    extra = {"k": k, "v": v, "qv": qv, "rotary_cos": rotary_cos, "rotary_sin": rotary_sin,
             "rotary_seqlens": rotary_seqlens, "cu_seqlens_k_new": cu_seqlens_k_new,
             "scheduler_metadata": scheduler_metadata}
    call = _checks.check_fwd(
        q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        page_table=page_table, kv_batch_idx=cache_batch_idx, leftpad_k=cache_leftpad, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, attention_chunk=attention_chunk, softcap=softcap, sinks=sinks, num_splits=num_splits, pack_gqa=pack_gqa,
        sm_margin=sm_margin, cache_seqlens_int=cache_seqlens_int, names=names, extra_tensors=extra,
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k)
    _reject_unimplemented(qv)
    _check_scheduler_metadata(scheduler_metadata, call)
    if cache_seqlens_int is not None:
        # A tensor built on the device from a Python int: no host sync, graph-capturable.
        call = dataclasses.replace(
            call, seqused_k=torch.full((call.batch,), int(cache_seqlens_int), dtype=torch.int32, device=q.device),
            features=call.features | {"varlen"})
    if k is not None:
        call = _append_kv(call, k, v, cu_seqlens_k_new, rotary_cos, rotary_sin, rotary_seqlens, rotary_interleaved,
                          page_table, cache_batch_idx)
    out, softmax_lse = _run_fwd(call)
    if not return_softmax_lse:
        return out
    empty = torch.empty(0, dtype=torch.float32, device=q.device)
    return out, softmax_lse, empty, empty


def _append_kv(call, k_new, v_new, cu_seqlens_k_new, rotary_cos, rotary_sin, rotary_seqlens, rotary_interleaved,
               page_table, cache_batch_idx):
    """flash_attn_with_kvcache's k=, v=: writes the new keys/values into the cache at cache_seqlens (keys and q
    rotated when rotary_cos/sin are given), then returns the call to run on the rotated q with the lengths after
    the append (hopper/append_kv.h; one kernel before the attention)."""
    q, k_cache, v_cache = call.q, call.k, call.v
    # Checked here, before the append writes into the cache, rather than with the attention's features.
    _checks.check_supported(dataclasses.replace(call, features=frozenset({"append_kv"})), _ops.BUILD)
    for name, t in (("k", k_new), ("v", v_new)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} must match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: must be on q's device {q.device}, got {t.device}")
        _checks.check_last_dim_contiguous(name, t)
    varlen_new = cu_seqlens_k_new is not None
    rank = 3 if varlen_new else 4
    layout = "(total_new, num_heads_k, head_dim)" if varlen_new else "(batch, seqlen_new, num_heads_k, head_dim)"
    _checks.check_rank("k", k_new, rank, layout)
    _checks.check_rank("v", v_new, rank, layout.replace("head_dim", "head_dim_v"))
    if k_new.shape[-2:] != k_cache.shape[-2:] or v_new.shape[-1] != v_cache.shape[-1] or \
            v_new.shape[:-1] != k_new.shape[:-1]:
        raise ValueError(f"k, v: shapes {tuple(k_new.shape)}, {tuple(v_new.shape)} must match k_cache's heads and head "
                         f"dim {tuple(k_cache.shape[-2:])} and v_cache's head dim {v_cache.shape[-1]}")
    if varlen_new:
        _checks.check_index_vector("cu_seqlens_k_new", cu_seqlens_k_new, call.batch + 1, "batch + 1 prefix sums")
        max_new = k_new.shape[0]  # a bound; the kernel maps each packed row to its sequence on the device
    else:
        if k_new.shape[0] != call.batch:
            raise ValueError(f"k: batch {k_new.shape[0]} must equal q's batch {call.batch}")
        max_new = 0
    if rotary_cos is not None:
        if q.dtype == torch.float8_e4m3fn:
            raise _checks.not_implemented("rotary_cos / rotary_sin with float8_e4m3fn inputs (rotary embedding)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if t.dtype != q.dtype or t.dim() != 2 or not t.is_contiguous() or t.device != q.device:
                raise ValueError(f"{name}: must be a contiguous 2-D (seqlen_ro, rotary_dim / 2) tensor of q's dtype "
                                 f"on q's device, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin: shape {tuple(rotary_sin.shape)} must equal rotary_cos's "
                             f"{tuple(rotary_cos.shape)}")
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim % 16 or not 16 <= rotary_dim <= q.shape[-1]:
            raise ValueError(f"rotary_cos: rotary_dim = 2 * shape[1] = {rotary_dim} must be a multiple of 16 in "
                             f"[16, head_dim = {q.shape[-1]}]")
        if page_table is not None and rotary_cos.shape[0] < call.max_seqlen_k:  # FA3's rule (paged only)
            raise ValueError(f"rotary_cos: {rotary_cos.shape[0]} rows (positions) must cover the paged cache's "
                             f"{call.max_seqlen_k} positions")
        if rotary_seqlens is not None:
            _checks.check_index_vector("rotary_seqlens", rotary_seqlens, call.batch, "one position per batch entry")
    seqused = call.seqused_k
    if seqused is None:
        raise ValueError("cache_seqlens: required when new k, v are given (it is where they are appended)")
    seqused_out = torch.empty_like(seqused)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary_cos is not None else None
    # Queries at their own positions when the call is causal or local by FA3's normalisation, which compares
    # the window with max_seqlen_q (call.window_* were normalised with the packed row count).
    sq = call.max_seqlen_q if call.cu_seqlens_q is not None else q.shape[1]
    right = call.window_size_right if call.window_size_right < max(sq - 1, 0) or call.window_size_left >= 0 else -1
    causal_or_local = call.window_size_left >= 0 or right >= 0 or call.attention_chunk > 0
    _ops.append_kv(k_cache, v_cache, k_new, v_new, seqused, seqused_out, cu_seqlens_k_new, max_new, page_table,
                   cache_batch_idx, q, q_out, rotary_cos, rotary_sin,
                   rotary_seqlens if rotary_cos is not None else None, bool(rotary_interleaved), causal_or_local,
                   call.cu_seqlens_q, call.max_seqlen_q if call.cu_seqlens_q is not None else 0)
    return dataclasses.replace(call, q=q if q_out is None else q_out, seqused_k=seqused_out,
                               features=call.features | {"append_kv"})


def varlen_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *, seqused_q=None, seqused_k=None, out=None, softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0, page_table=None, kv_batch_idx=None, leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, num_splits=1, pack_gqa=None, sm_margin=0, sinks=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):  # noqa: E501
    """Thin mirror of the C++ op `flash_attn3::fwd`, for callers that manage buffers themselves.

    Accepts every layout of the op (dense or packed q; dense, packed or paged k/v), validates like the
    other functions, writes into `out` if given (q's dtype, bfloat16 for fp8; q's layout with head_dim_v;
    last dim contiguous), and returns (out, softmax_lse) with softmax_lse float32 (batch, num_heads,
    seqlen_q) dense or (num_heads, total_q) packed. seqused_k plays the role of cache_seqlens.
    """
    return _run_fwd(_checks.check_fwd(
        q, k, v, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_table=page_table,
        kv_batch_idx=kv_batch_idx, leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, sinks=sinks, num_splits=num_splits, pack_gqa=pack_gqa,
        sm_margin=sm_margin, cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k))


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merges split-KV partial results: lse = logsumexp_i(lse_i), out = Σ_i exp(lse_i - lse) · out_i.

    Args:
        out_partial: float32 (num_splits, batch, seqlen, num_heads, head_dim) or (num_splits, total_q,
            num_heads, head_dim), last dim contiguous; num_splits <= 256.
        lse_partial: float32 (num_splits, batch, seqlen, num_heads) (or varlen (num_splits, total_q,
            num_heads)), any strides (FA3 requires stride(-2) == 1; every layout FA3 accepts works here).
        out: optional output buffer; out_dtype: float32 (default), float16 or bfloat16.

    Returns:
        (out, lse): out with out_partial's shape without the split dim, in out_dtype; lse float32 with
        lse_partial's shape without the split dim (a view of a (batch, num_heads, seqlen) buffer, as FA3).
        Rows whose splits all have lse = -inf give out = 0, lse = -inf. flash_attn3.reference.combine_ref
        computes the same in PyTorch.
    """
    _checks.check_tensor("out_partial", out_partial)
    _checks.check_tensor("lse_partial", lse_partial)
    _checks.check_tensor("out", out, optional=True)
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype: must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    for name, t in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: must have dtype torch.float32, got {t.dtype}")
    if out_partial.dim() not in (4, 5):
        raise ValueError("out_partial: must be 5-D (num_splits, batch, seqlen, num_heads, head_dim) or 4-D "
                         f"(num_splits, total_q, num_heads, head_dim), got shape {tuple(out_partial.shape)}")
    if tuple(lse_partial.shape) != tuple(out_partial.shape[:-1]):
        raise ValueError(f"lse_partial: shape {tuple(lse_partial.shape)} must be out_partial's shape without "
                         f"the head dim, {tuple(out_partial.shape[:-1])}")
    _checks.check_int("num_splits (out_partial.shape[0])", out_partial.shape[0], 1, _checks.MAX_SPLITS)
    _checks.check_last_dim_contiguous("out_partial", out_partial)
    if out_partial.shape[-1] < 1:
        raise ValueError("out_partial: the head dim (last dimension) must be >= 1, got 0")
    out_dtype = out_dtype or torch.float32
    if out is not None:
        if out.dtype != out_dtype:
            raise TypeError(f"out: dtype {out.dtype} must be {out_dtype}")
        if tuple(out.shape) != tuple(out_partial.shape[1:]):
            raise ValueError(f"out: shape {tuple(out.shape)} must be {tuple(out_partial.shape[1:])}")
        _checks.check_last_dim_contiguous("out", out)
    _checks.check_devices({"out_partial": out_partial, "lse_partial": lse_partial, "out": out})
    _ops.require_extension()
    if out is None:
        out = torch.empty(out_partial.shape[1:], dtype=out_dtype, device=out_partial.device)
    if out_partial.dim() == 5:  # (batch, seqlen, heads) as a view of a (batch, heads, seqlen) buffer
        b, sq, h = out_partial.shape[1:4]
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=out_partial.device).transpose(1, 2)
    else:
        tq, h = out_partial.shape[1:3]
        lse = torch.empty((h, tq), dtype=torch.float32, device=out_partial.device).t()
    _ops.combine(out_partial, lse_partial, out, lse)
    return out, lse


def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim, cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None, cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0, causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False, num_splits=0, pack_gqa=None, sm_margin=0):  # noqa: E501
    """Precomputes the schedule of a later flash_attn_with_kvcache call with these sizes (FA3 API).

    Returns an int32 tensor on cache_seqlens' device: [tag, num_splits, pack_gqa, block_m, block_n,
    num_m_blocks, num_tiles, grid], the host-side choices the call will make (the device-side split of each
    sequence follows cache_seqlens at run time, so the metadata stays valid when the lengths change between
    CUDA-graph replays). Built with device fills only, so it may be created while a graph is captured. Pass
    it as scheduler_metadata= together with the same num_splits and pack_gqa.
    """
    for name, x in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k),
                    ("max_seqlen_k_new", max_seqlen_k_new), ("attention_chunk", attention_chunk),
                    ("sm_margin", sm_margin)):
        _checks.check_int(name, x, 0)
    for name, x in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv), ("headdim", headdim)):
        _checks.check_int(name, x, 1)
    _checks.check_int("num_splits", num_splits, None, _checks.MAX_SPLITS)
    num_splits = max(num_splits, 0)  # FA3: any value <= 0 selects the heuristic
    _checks.check_tensor("cache_seqlens", cache_seqlens)
    if headdim_v is not None:
        _checks.check_int("headdim_v", headdim_v, 1)
    if pack_gqa is not None:
        _checks.check_bool("pack_gqa", pack_gqa)
    _checks.check_bool("has_softcap", has_softcap)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k_new", cu_seqlens_k_new),
                    ("cache_leftpad", cache_leftpad)):
        _checks.check_tensor(name, t, optional=True)
    # cu_seqlens_k_new / max_seqlen_k_new (an append in the call) do not change the schedule: the attention
    # runs over the cache after the append, whose lengths the kernels read on the device.
    if page_size is not None:  # the schedule does not depend on it (paged K/V is gathered per key block)
        _checks.check_int("page_size", page_size, 1)
    if not cache_seqlens.is_cuda:
        raise ValueError(f"cache_seqlens: must be a CUDA tensor, got device {cache_seqlens.device}")
    _ops.require_extension()
    window_left, window_right = _checks.normalize_window(window_size, causal, max_seqlen_q, max_seqlen_k)
    plan = _ops.plan(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                     headdim if headdim_v is None else headdim_v, qkv_dtype, cu_seqlens_q is not None,
                     window_left, window_right, attention_chunk, 1.0 if has_softcap else 0.0, num_splits,
                     -1 if pack_gqa is None else int(pack_gqa), sm_margin, cache_seqlens.device)
    values = [_ops.METADATA_TAG, *plan]
    md = torch.empty(len(values), dtype=torch.int32, device=cache_seqlens.device)
    for i, v in enumerate(values):
        md[i].fill_(v)
    return md


def _check_scheduler_metadata(md, call):
    """The rules a scheduler_metadata tensor must follow (checked mode: also that it was made for `call`)."""
    if md is None:
        return
    if md.dtype != torch.int32 or md.dim() != 1 or md.numel() != _ops.METADATA_LEN:
        raise ValueError(f"scheduler_metadata: must be the int32 ({_ops.METADATA_LEN},) tensor of "
                         f"get_scheduler_metadata, got {md.dtype} of shape {tuple(md.shape)}")
    if md.device != call.q.device:
        raise ValueError(f"scheduler_metadata: must be on q's device ({call.q.device}), got {md.device}")
    if _checked.is_enabled() and int(md[0]) != _ops.METADATA_TAG:
        raise ValueError("scheduler_metadata: not a tensor made by flash_attn3.get_scheduler_metadata")
