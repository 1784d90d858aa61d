"""The one declarative table of the forward kernels: which kernel keys exist, which features they carry, the
environment switches that select a subset, and the generator of everything derived from it.

A kernel key is the tuple of compile-time axes, declared once in `AXES`; `KERNELS` is the list of keys that
exist. Everything else is a runtime property of one kernel (varlen, GQA, strides) or a switch compiled into
each instantiation (the mask: no mask / causal). From this file come:
  hopper/instantiations/<key>_sm90.cu  one translation unit per key
  hopper/instantiations/kernel_key.h   the declaration of the kernel template, one parameter per axis
  hopper/instantiations/registry.inc   FLASH3_FWD_KERNEL(...) entries, one per linked key: hopper/api.cu
                                       builds its kernel table, its head-dim rounding and its supported()
                                       predicate from them (csrc/ reaches it through run_fwd)
  hopper/instantiations/features.inc   FLASH3_FEATURE(name, built) for every feature name
  flash_attn3/_build_config.py         the Python record of the build (written by setup.py via build_record)
setup.py and build_standalone.sh both ask this file what to compile; CI checks that
`python tools/kernels.py --check` finds the checked-in files identical to what it would generate.

Environment switches (comma-separated; unset = everything):
  FLASH_ATTN3_DTYPES   e.g. "bf16" or "fp16,bf16"
  FLASH_ATTN3_HDIMS    e.g. "128" or "64,128"
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INST_DIR = ROOT / "hopper" / "instantiations"

# The element type and C enum of each dtype tag.
CPP_ELEMENT = {"fp16": "cutlass::half_t", "bf16": "cutlass::bfloat16_t", "fp8": "cutlass::float_e4m3_t"}
CPP_DTYPE = {"fp16": "FLASH3_FLOAT16", "bf16": "FLASH3_BFLOAT16", "fp8": "FLASH3_FLOAT8_E4M3"}


@dataclass(frozen=True)
class FwdKernel:
    """One kernel key: the compile-time axes, each with the C++ template parameter it becomes, in the order of
    the template run_fwd_sm90<...> (declared from this list in instantiations/kernel_key.h and defined in
    hopper/launch_fwd_sm90.h)."""

    dtype: str = field(metadata={"cpp": "class Element"})  # of q, k, v
    # compiled head dim of q and k; a smaller real one runs here (80 -> 96)
    head_dim: int = field(metadata={"cpp": "int kHeadDim"})
    head_dim_v: int = field(metadata={"cpp": "int kHeadDimV"})  # compiled head dim of v and out

    @property
    def name(self) -> str:
        return f"fwd_{self.dtype}_hdim{self.head_dim}" + (f"_v{self.head_dim_v}" if self.head_dim_v != self.head_dim
                                                          else "")

    @property
    def define(self) -> str:
        """Preprocessor switch that tells hopper/api.cu this kernel is linked in."""
        return f"FLASH3_HAS_{self.name.upper()}"

    @property
    def source(self) -> Path:
        return INST_DIR / f"{self.name}_sm90.cu"

    def template_args(self) -> str:
        """The C++ template arguments of this key, axis by axis."""
        return ", ".join(str(v) if f.name != "dtype" else CPP_ELEMENT[v] for f, v in zip(fields(self), astuple(self)))


AXES = tuple(f.name for f in fields(FwdKernel))

# The kernels that exist. 16-bit (fp16, bf16): head dims 64, 96, 128, 192 and 256 with dv = d, and d 192 with
# dv 128 (DeepSeek-V3's MLA prefill: q/k = 128 nope + 64 rope, v = 128) and d 64 with dv 256 (FA3's pair
# for d <= 64); FP8 e4m3 (BF16 out) at 64, 96, 128
# and 256 (FP8 WGMMA's K is 32, so every compiled head dim is a multiple of 32). A real head dim runs on the
# smallest compiled one that holds it (hopper/api.cu find_kernel); a (d, dv) key with dv != d serves
# only calls whose dv differs from d.
KERNELS = (tuple(FwdKernel(dt, hd, hd) for dt in ("fp16", "bf16") for hd in (64, 96, 128, 192, 256)) +
           tuple(FwdKernel(dt, 192, 128) for dt in ("fp16", "bf16")) +
           tuple(FwdKernel(dt, 64, 256) for dt in ("fp16", "bf16")) +
           tuple(FwdKernel("fp8", hd, hd) for hd in (64, 96, 128, 256)))

# Features beyond the kernel keys, and whether the kernels implement them. A feature that is False is refused
# with NotImplementedError (Python) / FLASH3_NOT_COMPILED (C API) naming it.
FEATURES = {
    "varlen": True,
    "gqa": True,
    "causal": True,
    "local": True,
    "softcap": True,
    "sinks": True,
    "split_kv": True,
    "paged_kv": True,
    "append_kv": True,
    "fp8": True,
    "pack_gqa": True,
    "kv_batch_idx": True,
    "leftpad_k": True,
}


def all_kernels() -> list[FwdKernel]:
    return list(KERNELS)


def _env_list(name: str, env) -> list[str] | None:
    raw = env.get(name, "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def selected_kernels(env=os.environ) -> list[FwdKernel]:
    """The kernels to build under the current environment switches; raises on an unknown value."""
    dtypes = _env_list("FLASH_ATTN3_DTYPES", env)
    hdims = _env_list("FLASH_ATTN3_HDIMS", env)
    known_dtypes = sorted({k.dtype for k in KERNELS})
    known_hdims = sorted({k.head_dim for k in KERNELS})
    if dtypes:
        bad = sorted(set(dtypes) - set(known_dtypes))
        if bad:
            raise ValueError(f"FLASH_ATTN3_DTYPES: unknown dtype(s) {bad}; choose from {known_dtypes}")
    if hdims:
        bad = [h for h in hdims if not h.isdigit() or int(h) not in known_hdims]
        if bad:
            raise ValueError(f"FLASH_ATTN3_HDIMS: unknown head dim(s) {bad}; choose from {known_hdims}")
    out = [
        k for k in KERNELS
        if (dtypes is None or k.dtype in dtypes) and (hdims is None or str(k.head_dim) in hdims)
    ]
    if not out:
        raise ValueError("FLASH_ATTN3_DTYPES/FLASH_ATTN3_HDIMS select no kernel at all")
    return out


def build_record(built: bool, kernels) -> str:
    """The text of flash_attn3/_build_config.py for an install that compiled `kernels` (none if not built)."""
    return "\n".join([
        '"""What this install compiled. Generated by setup.py from tools/kernels.py; do not edit."""',
        f"CUDA_EXTENSION_BUILT = {built!r}",
        f"AXES = {AXES!r}",
        f"FWD_KERNELS = {[astuple(k) for k in kernels]!r}",
        f"FEATURES = {({name: (on and built) for name, on in FEATURES.items()})!r}",
        "",
    ])


GENERATED = "// Generated by tools/kernels.py from its kernel table; do not edit."


def render(kernel: FwdKernel) -> str:
    return (
        f"{GENERATED}\n"
        f"// Forward kernels for {', '.join(f'{a} {v}' for a, v in zip(AXES, astuple(kernel)))}; both mask policies.\n"
        '#include "../launch_fwd_sm90.h"\n\n'
        "namespace flash3 {\n"
        f"template cudaError_t run_fwd_sm90<{kernel.template_args()}>(FwdParams const&, cudaStream_t);\n"
        "}  // namespace flash3\n"
    )


def render_kernel_key() -> str:
    params = ", ".join(f.metadata["cpp"] for f in fields(FwdKernel))
    return "\n".join([
        GENERATED,
        "// The forward kernel of one key: defined in hopper/launch_fwd_sm90.h, instantiated per key in",
        "// <key>_sm90.cu, listed in registry.inc.",
        "#pragma once",
        "",
        "#include <cuda_runtime_api.h>",
        "",
        '#include "../params.h"',
        "",
        "namespace flash3 {",
        f"template <{params}>",
        "cudaError_t run_fwd_sm90(FwdParams const& p, cudaStream_t stream);",
        "}  // namespace flash3",
        "",
    ])


def render_registry() -> str:
    """One entry per kernel key, present only if the build defined its FLASH3_HAS_* switch."""
    lines = [
        GENERATED,
        "// FLASH3_FWD_KERNEL(dtype enum, head_dim, head_dim_v, kernel function): included by hopper/api.cu",
        "// with the macro defined.",
    ]
    for k in KERNELS:
        lines += [f"#ifdef {k.define}",
                  f"FLASH3_FWD_KERNEL({CPP_DTYPE[k.dtype]}, {k.head_dim}, {k.head_dim_v}, "
                  f"(run_fwd_sm90<{k.template_args()}>))",
                  "#endif"]
    return "\n".join(lines) + "\n"


def render_features() -> str:
    lines = [GENERATED, "// FLASH3_FEATURE(name, built): included by hopper/api.cu with the macro defined."]
    lines += [f"FLASH3_FEATURE({name}, {'true' if on else 'false'})" for name, on in FEATURES.items()]
    return "\n".join(lines) + "\n"


def generate(check: bool = False) -> int:
    INST_DIR.mkdir(parents=True, exist_ok=True)
    wanted = {k.source: render(k) for k in KERNELS}
    wanted[INST_DIR / "kernel_key.h"] = render_kernel_key()
    wanted[INST_DIR / "registry.inc"] = render_registry()
    wanted[INST_DIR / "features.inc"] = render_features()
    stale = [p for p in [*INST_DIR.glob("*.cu"), *INST_DIR.glob("*.inc"), *INST_DIR.glob("*.h")] if p not in wanted]
    changed = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in changed + stale:
            print(f"out of date: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if (changed or stale) else 0
    for p in stale:
        p.unlink()
    for p in changed:
        p.write_text(wanted[p])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if hopper/instantiations/ is out of date")
    ap.add_argument("--sources", action="store_true", help="print the selected instantiation files")
    ap.add_argument("--defines", action="store_true", help="print the -D switches of the selected kernels")
    args = ap.parse_args()
    if args.sources:
        print("\n".join(str(k.source.relative_to(ROOT)) for k in selected_kernels()))
        return 0
    if args.defines:
        print(" ".join(f"-D{k.define}" for k in selected_kernels()))
        return 0
    return generate(check=args.check)


if __name__ == "__main__":
    sys.exit(main())
