"""The raw op's positional arguments built by name, for the tests that call `flash_attn3::fwd` (or its CPU
twin in tests/test_validation.py) directly.

No test lists the op's arguments itself: their names and order come from flash_attn3._ops.FWD_ARG_NAMES (the
fields of FwdArgs), which tests/test_validation.py checks against the schema text in csrc/flash_api.cpp and
tests/test_ops_gpu.py against the registered op. A test names only the arguments it cares about.
"""
from __future__ import annotations

import math

import torch

from flash_attn3._ops import FWD_ARG_NAMES, FwdArgs

# FA3's defaults of the scalar options: full attention, no chunks, no softcap, no context parallelism, one split,
# pack_gqa heuristic, no SM margin.
SCALAR_DEFAULTS = dict(window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0, cp_world_size=1,
                       cp_rank=0, num_splits=1, pack_gqa=-1, sm_margin=0)


def op_args(q, k, v, fill=math.nan, **named) -> list:
    """The op's positional arguments for q, k, v, with any argument replaced by its schema name.

    Not named: out and softmax_lse are new buffers of the layout q and v imply, filled with `fill` (an unwritten
    element then shows); max_seqlen_q / max_seqlen_k are the dense lengths (0 for a packed side, whose caller
    names the real one); softmax_scale is head_dim ** -0.5; the optional tensors are None and the scalar options
    SCALAR_DEFAULTS. A default is only computed when not named, so a broken q can still be passed with explicit
    buffers. A name that is not an op argument is a TypeError.
    """
    args = {**dict.fromkeys(FWD_ARG_NAMES), **SCALAR_DEFAULTS, "q": q, "k": k, "v": v, **named}
    varlen_q, varlen_k = args["cu_seqlens_q"] is not None, args["cu_seqlens_k"] is not None
    if "out" not in named:
        out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
        args["out"] = torch.full((*q.shape[:-1], v.shape[-1]), fill, dtype=out_dtype, device=q.device)
    if "softmax_lse" not in named:
        shape = (q.shape[1], q.shape[0]) if varlen_q else (q.shape[0], q.shape[2], q.shape[1])
        args["softmax_lse"] = torch.full(shape, fill, device=q.device)
    if "max_seqlen_q" not in named:
        args["max_seqlen_q"] = 0 if varlen_q else q.shape[1]
    if "max_seqlen_k" not in named:
        args["max_seqlen_k"] = 0 if varlen_k else k.shape[1]
    if "softmax_scale" not in named:
        args["softmax_scale"] = q.shape[-1] ** -0.5
    return FwdArgs(**args).op_args()
