"""Why GPU tests cannot run here, shared by the GPU test modules (each skips at module level with this reason)."""
from __future__ import annotations

import torch


def skip_reason() -> str | None:
    """None when an SM90 GPU and the compiled extension are both present, else the reason to skip."""
    if not torch.cuda.is_available():
        return "no CUDA device (the forward kernels need an SM90 GPU)"
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return f"the forward kernels are built for SM90 (Hopper); this GPU is sm_{cap[0]}{cap[1]}"
    try:
        from flash_attn3 import _ops
    except Exception as exc:  # a broken package must show up as a skip reason, not a collection error
        return f"flash_attn3 is not importable: {type(exc).__name__}: {exc}"
    if not getattr(_ops, "HAS_EXTENSION", False):
        return f"flash_attn3._C is not built or failed to load: {getattr(_ops, 'LOAD_ERROR', None)}"
    return None


def capture_graph(fn):
    """Warms `fn` up on a side stream (first-call work such as attribute setup must not land in the capture),
    then captures one call of it in a CUDA graph. Returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
