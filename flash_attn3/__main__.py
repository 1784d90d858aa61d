"""`python -m flash_attn3`: version, environment, build record, and a one-line kernel self-test.

Exit code 0 unless the self-test runs and fails (1).
"""
from __future__ import annotations

import sys

import torch


def _gpu_line() -> str:
    try:
        if not torch.cuda.is_available():
            return "none"
        cap = torch.cuda.get_device_capability()
        return (f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}, device {torch.cuda.current_device()} of "
                f"{torch.cuda.device_count()})")
    except Exception as exc:  # noqa: BLE001 -- the CLI reports any failure
        return f"unknown ({type(exc).__name__}: {exc})"


def _self_test() -> tuple[bool, str]:
    """(passed, line): flash_attn_func vs reference.attention_ref on one small bf16 causal GQA-free case."""
    from flash_attn3 import _ops
    from flash_attn3.interface import flash_attn_func
    from flash_attn3.reference import attention_ref

    dtype = next((dt for dt in (torch.bfloat16, torch.float16) if _ops.BUILD.head_dims_for(dt)), None)
    if dtype is None:
        return True, "self-test skipped: no float16/bfloat16 kernel was compiled"
    d = _ops.BUILD.head_dims_for(dtype)[0]
    causal = _ops.BUILD.has("causal")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 128, 4, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = flash_attn_func(q, k, v, causal=causal)
        ref, _ = attention_ref(q, k, v, causal=causal)
        low, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    torch.cuda.synchronize()
    err = (out.float() - ref).abs().max().item()
    base = (low.float() - ref).abs().max().item()
    tol = 2 * base + 1e-3
    ok = err <= tol
    what = f"{str(dtype).replace('torch.', '')}, head_dim {d}, causal={causal}"
    return ok, f"self-test {'PASS' if ok else 'FAIL'}: max error {err:.3g} (tolerance {tol:.3g}; {what})"


def main() -> int:
    import flash_attn3
    from flash_attn3 import _ops
    from flash_attn3.availability import unavailable_reason

    reason = unavailable_reason()
    build = _ops.BUILD
    print(f"flash_attn3 {flash_attn3.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"GPU: {_gpu_line()}")
    print(f"available: {reason is None}" + ("" if reason is None else f" ({reason})"))
    print(f"extension loaded: {_ops.HAS_EXTENSION}" + ("" if _ops.HAS_EXTENSION else f" ({_ops.LOAD_ERROR})"))
    if _ops.BUILD_CONFIG_ERROR:
        print(f"build record: {_ops.BUILD_CONFIG_ERROR}")
    print(f"build: cuda_extension_built={build.cuda_extension_built}")
    if build.head_dims:
        for tag, hds in sorted(build.head_dims.items()):
            pairs = build.head_dim_pairs.get(tag, ())
            print(f"  {tag}: head dims {list(hds)}" + (f", (d, dv) pairs {list(pairs)}" if pairs else ""))
    else:
        print("  no kernels compiled")
    on = [f for f in _ops.FEATURE_NAMES if build.has(f)]
    off = [f for f in _ops.FEATURE_NAMES if not build.has(f)]
    print(f"  features on: {', '.join(on) or 'none'}")
    print(f"  features off: {', '.join(off) or 'none'}")
    if reason is not None:
        print(f"self-test skipped: {reason}")
        return 0
    try:
        ok, line = _self_test()
    except Exception as exc:  # noqa: BLE001 -- the CLI reports any failure
        ok, line = False, f"self-test FAIL: {type(exc).__name__}: {exc}"
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
