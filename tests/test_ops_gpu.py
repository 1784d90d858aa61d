"""GPU tests of the op as a PyTorch citizen: the `flash_attn3::fwd` schema (its argument names are
flash_attn3._ops.FWD_ARG_NAMES), fake and dispatch registration (torch.library.opcheck), torch.compile,
CUDA-graph capture, non-default streams, and the C++ argument checks that protect a direct
`torch.ops.flash_attn3.fwd` call (clear exceptions, never a device fault).

The module skips (with the reason) unless an SM90 GPU and the compiled extension are both present.
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

from _op_args import op_args  # noqa: E402  (raw-op arguments by schema name)

from flash_attn3 import _ops, flash_attn_func, flash_attn_varlen_func  # noqa: E402

DEVICE = "cuda"
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _op_args(q, k, v, **named):
    """The op's positional arguments (tests/_op_args.py) with zero-filled outputs, not NaN-filled ones: opcheck
    compares mutated buffers across runs, and rows the op leaves unwritten (unused seqused_q rows) must compare
    equal."""
    return op_args(q, k, v, fill=0.0, **named)


def _dense(b=2, s_q=113, s_k=239, h=4, h_k=2, d=128, dtype=torch.bfloat16):
    return (torch.randn(b, s_q, h, d, device=DEVICE, dtype=dtype),
            torch.randn(b, s_k, h_k, d, device=DEVICE, dtype=dtype),
            torch.randn(b, s_k, h_k, d, device=DEVICE, dtype=dtype))


def _varlen(lq, lk, h=4, h_k=2, d=128, dtype=torch.bfloat16):
    q = torch.randn(sum(lq), h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lk), h_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lk), h_k, d, device=DEVICE, dtype=dtype)
    return q, k, v, _cu_seqlens(lq), _cu_seqlens(lk)


# ---------------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    q, k, v = _dense()
    yield "dense", _op_args(q, k, v)
    yield "dense_causal_mqa", _op_args(*_dense(s_q=239, s_k=113, h=8, h_k=1, d=64, dtype=torch.float16),
                                       window_size_right=0)
    lq, lk = [17, 0, 113], [239, 0, 5]
    q, k, v, cu_q, cu_k = _varlen(lq, lk)
    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    yield "varlen", _op_args(q, k, v, **packed)
    used = torch.tensor([9, 0, 100], dtype=torch.int32, device=DEVICE)
    yield "varlen_causal_seqused", _op_args(q, k, v, **packed, seqused_q=used, window_size_right=0)


def test_argument_names_match_the_registered_op():
    """flash_attn3._ops.FWD_ARG_NAMES, the one Python list of the op's arguments (every wrapper and test builds
    its positional call from it), must name the arguments of the op the extension registered, in order."""
    registered = tuple(a.name for a in torch.ops.flash_attn3.fwd.default._schema.arguments)
    assert registered == _ops.FWD_ARG_NAMES


@pytest.mark.parametrize("case", ["dense", "dense_causal_mqa", "varlen", "varlen_causal_seqused"])
def test_opcheck(case):
    args = dict(_opcheck_cases())[case]
    torch.library.opcheck(torch.ops.flash_attn3.fwd.default, args, test_utils=OPCHECK_UTILS)


# ---------------------------------------------------------------------------------------------------------
# torch.compile, CUDA graphs, streams


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v = _dense(s_q=239, s_k=1024)

    def attn(q, k, v):
        return flash_attn_func(q, k, v, causal=True, return_attn_probs=True)

    compiled = torch.compile(attn, fullgraph=True)
    out_c, lse_c = compiled(q, k, v)
    out_e, lse_e = attn(q, k, v)
    # Same kernel on the same inputs: the forward pass is deterministic, so the bits must agree.
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)


def test_cuda_graph_capture_and_replay_varlen():
    lq, lk = [113, 1, 0, 239, 17], [239, 17, 0, 1023, 1]
    q, k, v, cu_q, cu_k = _varlen(lq, lk, h=6, h_k=3, d=96, dtype=torch.float16)
    max_q, max_k = max(lq), max(lk)

    def attn():
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, return_attn_probs=True)

    graph, (out_g, lse_g) = capture_graph(attn)

    # New data, and new lengths with the same totals and maxima: the op must read its metadata on the device
    # at replay time, not bake in what it saw at capture.
    perm_q, perm_k = [lq[i] for i in (3, 0, 2, 4, 1)], [lk[i] for i in (3, 0, 2, 4, 1)]
    for replay in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        if replay == 1:
            cu_q.copy_(_cu_seqlens(perm_q))
            cu_k.copy_(_cu_seqlens(perm_k))
        graph.replay()
        out_e, lse_e = attn()
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e), f"replay {replay} differs from eager"


def test_runs_on_the_current_stream():
    """The op must launch on the caller's current stream. On a side stream we sleep, then overwrite q, then
    call the op: launched on that stream it sees the new q; launched on another stream it would run during the
    sleep and read the old q."""
    q, k, v = _dense(s_q=1024, s_k=1024)
    q_new = torch.randn_like(q)
    expected = flash_attn_func(q_new, k, v)
    q_live = q.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time, far longer than the launch below
        q_live.copy_(q_new)
        out = flash_attn_func(q_live, k, v)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------
# C++ checks of a direct op call: a clear exception naming the argument, and a healthy device afterwards


def _bad_calls():
    q, k, v = _dense()
    lq, lk = [17, 5], [113, 0]
    vq, vk, vv, cu_q, cu_k = _varlen(lq, lk)
    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=113)
    return {
        "cu_seqlens_int64": (RuntimeError, "cu_seqlens_q must be int32",
                             _op_args(vq, vk, vv, **{**packed, "cu_seqlens_q": cu_q.long()})),
        "cu_seqlens_k_batch": (RuntimeError, "same batch size",
                               _op_args(vq, vk, vv, **{**packed, "cu_seqlens_k": torch.cat([cu_k, cu_k[-1:]])})),
        "seqused_k_length": (RuntimeError, "seqused_k must have 2 entries",
                             _op_args(vq, vk, vv, **packed,
                                      seqused_k=torch.zeros(3, dtype=torch.int32, device=DEVICE))),
        "heads_not_multiple": (RuntimeError, "multiple of the number of k/v heads",
                               _op_args(q[:, :, :3], k, v)),
        "last_dim_strided": (RuntimeError, "q must have a contiguous last dimension",
                             _op_args(torch.randn(2, 113, 4, 256, device=DEVICE, dtype=q.dtype)[..., ::2], k, v)),
        "head_dim_too_big": (RuntimeError, "head_dim must be a multiple of 8",
                             _op_args(*_dense(d=264))),
        "head_dim_not_multiple_of_8": (RuntimeError, "head_dim must be a multiple of 8",
                                       _op_args(*_dense(d=60))),
        "k_dtype": (RuntimeError, "same dtype", _op_args(q, k.half(), v)),
        "k_on_cpu": (RuntimeError, "k must be a CUDA tensor", _op_args(q, k.cpu(), v)),
        "out_dtype": (RuntimeError, "out must have dtype",
                      _op_args(q, k, v, out=torch.empty(q.shape, dtype=torch.float32, device=DEVICE))),
        "lse_shape": (RuntimeError, "softmax_lse must have shape",
                      _op_args(q, k, v, softmax_lse=torch.empty(2, 4, 112, device=DEVICE))),
        "k_batch": (RuntimeError, "same batch size", _op_args(q, k[:1], v[:1])),
        "pack_gqa": (RuntimeError, "pack_gqa", _op_args(q, k, v, pack_gqa=2)),
        "sm_margin": (RuntimeError, "sm_margin", _op_args(q, k, v, sm_margin=100_000)),
        "misaligned": (RuntimeError, "16-byte aligned",
                       _op_args(torch.randn(2 * 113 * 4 * 128 + 1, device=DEVICE, dtype=q.dtype)[1:]
                                .view(2, 113, 4, 128), k, v)),
        "page_table": (RuntimeError, "page_table must be int32",
                       _op_args(q, k, v, page_table=torch.zeros(2, 1, dtype=torch.int64, device=DEVICE))),
        "softcap": (RuntimeError, "softcap must be finite and >= 0", _op_args(q, k, v, softcap=-1.0)),
        "local_window": (RuntimeError, "window_size_left/right must be >= -1",
                         _op_args(q, k, v, window_size_left=-2, window_size_right=0)),
        # With FP8 built, a descale of the wrong shape; without, the feature itself.
        "fp8": (RuntimeError, "q_descale",
                _op_args(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)),
                         out=torch.empty(q.shape, dtype=torch.bfloat16, device=DEVICE),
                         q_descale=torch.ones(1, 1, device=DEVICE)))
        if _ops.BUILD.has("fp8") else
        (NotImplementedError, "float8",
         _op_args(*(t.to(torch.float8_e4m3fn) for t in (q, k, v)),
                  out=torch.empty(q.shape, dtype=torch.bfloat16, device=DEVICE))),
    }


BAD_CASES = ["cu_seqlens_int64", "cu_seqlens_k_batch", "seqused_k_length", "heads_not_multiple", "last_dim_strided",
             "head_dim_too_big", "head_dim_not_multiple_of_8", "k_dtype", "k_on_cpu", "out_dtype", "lse_shape",
             "k_batch", "pack_gqa", "sm_margin", "misaligned", "page_table", "softcap",
             "local_window", "fp8"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_op_rejects_bad_arguments(case):
    exc, message, args = _bad_calls()[case]
    with pytest.raises(exc, match=message):
        torch.ops.flash_attn3.fwd(*args)
    torch.cuda.synchronize()  # no asynchronous fault was left behind


def test_empty_problems_launch_nothing_and_fill_empty_rows():
    """total_q == 0 returns at once; total_k == 0 gives out 0 and LSE -inf on every row."""
    q, k, v, cu_q, cu_k = _varlen([0, 0], [5, 3])
    torch.ops.flash_attn3.fwd(*_op_args(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=0,
                                        max_seqlen_k=5))
    q, k, v, cu_q, cu_k = _varlen([7, 2], [0, 0])
    out = torch.full((9, 4, 128), math.nan, dtype=q.dtype, device=DEVICE)
    lse = torch.full((4, 9), math.nan, device=DEVICE)
    torch.ops.flash_attn3.fwd(*_op_args(q, k, v, out=out, softmax_lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        max_seqlen_q=7, max_seqlen_k=0))
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == -math.inf).all()
