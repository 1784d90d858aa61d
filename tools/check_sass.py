"""Checks the machine code of built forward kernels: each one must use Hopper's warpgroup MMA (HGMMA for
16-bit inputs, QGMMA for FP8; the table's "GMMA" column counts both), must
not touch local memory (no LDL/STL instructions), and, where a `-Xptxas -v` log is given, must report
0 bytes of spill stores and loads. It prints one table row per kernel and exits 1 if any check fails.

Works on anything cuobjdump reads: an object (build_standalone/obj/*.o), the standalone executable, or the
Python extension .so. The ptxas log is build_standalone/ptxas.log, or the `pip install -v` output, which
holds the same lines when the extension is built with `-Xptxas -v`.

cuobjdump and nvdisasm are looked up on PATH, in $CUDA_HOME/bin, and in the PyPI wheels
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (site-packages/nvidia/cu*/bin); cuobjdump needs nvdisasm on
PATH to print SASS, so this script puts nvdisasm's folder there.

Usage: python tools/check_sass.py BINARY [BINARY ...] [--ptxas-log LOG] [--pattern REGEX]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The lead's kernel class; kernels launched through cutlass::device_kernel<> carry it in their mangled name.
DEFAULT_PATTERN = r"FwdKernelSm90"

# One SASS instruction line: "/*0a30*/  @!P0 HGMMA.64x128x16.F32 R24, ..." -> opcode "HGMMA.64x128x16.F32".
SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
FUNCTION_LINE = re.compile(r"^\s*Function\s*:\s*(\S+)")
RESOURCE_LINE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class Kernel:
    name: str  # mangled
    binary: str
    opcodes: dict[str, int] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)
    spill_stores: int | None = None
    spill_loads: int | None = None
    ptxas_regs: int | None = None

    def count(self, base: str) -> int:
        """Instructions whose opcode is `base` with any modifiers (HGMMA.64x128x16.F32 counts as HGMMA)."""
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] == base)


def _tool_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CUDA_HOME"):
        dirs.append(Path(os.environ["CUDA_HOME"]) / "bin")
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            dirs.extend(sorted(nvidia.glob("cu*/bin")))
    return dirs


def find_tool(name: str, override: str | None) -> str | None:
    if override:
        return override
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    found = shutil.which(name)
    if found:
        return found
    for d in _tool_dirs():
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def run_cuobjdump(cuobjdump: str, nvdisasm: str | None, flag: str, binary: str) -> str:
    env = dict(os.environ)
    if nvdisasm:
        env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([cuobjdump, flag, binary], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"cuobjdump {flag} {binary} failed: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc.stdout


def parse_sass(text: str, binary: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    current: Kernel | None = None
    for line in text.splitlines():
        m = FUNCTION_LINE.match(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1), binary))
            continue
        m = SASS_LINE.match(line)
        if m and current is not None:
            current.opcodes[m.group(1)] = current.opcodes.get(m.group(1), 0) + 1
    return kernels


def parse_resources(text: str, kernels: dict[str, Kernel]) -> None:
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = kernels.get(m.group(1))
            continue
        if current is not None and "REG:" in line:
            current.resources = {k: int(v) for k, v in RESOURCE_LINE.findall(line)}
            current = None


def parse_ptxas_log(text: str) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Spills (stores, loads) and registers per mangled function name, from `-Xptxas -v` output."""
    spills: dict[str, tuple[int, int]] = {}
    regs: dict[str, int] = {}
    props = entry = None
    for line in text.splitlines():
        m = PTXAS_ENTRY.search(line)
        if m:
            entry = m.group(1)
        m = PTXAS_PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = PTXAS_SPILLS.search(line)
        if m and props:
            spills[props] = (int(m.group(2)), int(m.group(3)))
            props = None
        m = PTXAS_REGS.search(line)
        if m and entry:
            regs[entry] = int(m.group(1))
            entry = None
    return spills, regs


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str, width: int = 80) -> str:
    """A readable prefix of a kernel's name: no namespaces, no parameter list, no launch wrapper, e.g.
    'FwdKernelSm90<MainloopFwdSm90<bfloat16_t, 96, 128, 128, 2, true>, EpilogueFwdSm90<...'."""
    depth, end = 0, len(demangled)
    for i, ch in enumerate(demangled):  # cut the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i > 0:
            end = i
            break
    name = re.sub(r"\b[A-Za-z_]\w*::", "", demangled[:end].removeprefix("void "))
    wrapper = re.match(r"^(\w*(?:_entry|device_kernel))<(.*)>$", name)
    if wrapper:  # a __global__ trampoline templated on the kernel class: show the class
        name = wrapper.group(2).strip()
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="+", help="object files, executables or shared libraries")
    ap.add_argument("--ptxas-log", help="compiler output with -Xptxas -v lines (build log or ptxas.log)")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN,
                    help=f"regex on the mangled or demangled kernel name selecting forward kernels "
                         f"(default {DEFAULT_PATTERN!r})")
    ap.add_argument("--cuobjdump", help="path to cuobjdump (default: searched, see above)")
    ap.add_argument("--nvdisasm", help="path to nvdisasm (default: searched, see above)")
    args = ap.parse_args()

    cuobjdump = find_tool("cuobjdump", args.cuobjdump)
    nvdisasm = find_tool("nvdisasm", args.nvdisasm)
    if not cuobjdump:
        print("check_sass: error: cuobjdump not found. Install it with\n"
              "  pip install --no-deps nvidia-cuda-cuobjdump==13.2.78 nvidia-cuda-nvdisasm==13.2.78\n"
              "or put a CUDA toolkit's bin/ on PATH.", file=sys.stderr)
        return 1
    if not nvdisasm:
        print("check_sass: error: nvdisasm not found (cuobjdump needs it to print SASS); "
              "pip install --no-deps nvidia-cuda-nvdisasm==13.2.78", file=sys.stderr)
        return 1

    kernels: dict[str, Kernel] = {}
    for binary in args.binaries:
        if not Path(binary).is_file():
            print(f"check_sass: error: {binary} does not exist", file=sys.stderr)
            return 1
        try:
            found = parse_sass(run_cuobjdump(cuobjdump, nvdisasm, "--dump-sass", binary), binary)
            parse_resources(run_cuobjdump(cuobjdump, nvdisasm, "--dump-resource-usage", binary), found)
        except RuntimeError as e:
            print(f"check_sass: error: {e}", file=sys.stderr)
            return 1
        for name, k in found.items():
            kernels.setdefault(name, k)  # a kernel linked into several inputs is checked once

    names = demangle(list(kernels))
    pattern = re.compile(args.pattern)
    fwd = [k for k in kernels.values() if pattern.search(k.name) or pattern.search(names[k.name])]
    if not fwd:
        print(f"check_sass: error: no forward kernel found: no kernel name matches /{args.pattern}/ in "
              f"{', '.join(args.binaries)}", file=sys.stderr)
        for name in sorted(kernels)[:20]:
            print(f"  present: {short_name(names[name], 110)}", file=sys.stderr)
        if not kernels:
            print("  (no device code at all: was the build empty, or is this a host-only file?)", file=sys.stderr)
        return 1

    spills, regs = ({}, {})
    if args.ptxas_log:
        log = Path(args.ptxas_log)
        if not log.is_file():
            print(f"check_sass: error: ptxas log {log} does not exist", file=sys.stderr)
            return 1
        spills, regs = parse_ptxas_log(log.read_text(errors="replace"))
        if not spills:
            print(f"check_sass: error: {log} holds no '-Xptxas -v' report ('bytes spill stores' lines); "
                  "build with -Xptxas -v", file=sys.stderr)
            return 1
    for k in fwd:
        if k.name in spills:
            k.spill_stores, k.spill_loads = spills[k.name]
        k.ptxas_regs = regs.get(k.name)

    failures = []
    rows = []
    for k in sorted(fwd, key=lambda k: names[k.name]):
        problems = []
        hgmma, ldl, stl = k.count("HGMMA") + k.count("QGMMA"), k.count("LDL"), k.count("STL")
        if hgmma == 0:
            problems.append("no HGMMA/QGMMA")
        if ldl or stl:
            problems.append(f"local memory ({ldl} LDL, {stl} STL)")
        if args.ptxas_log:
            if k.spill_stores is None:
                problems.append("not in ptxas log")
            elif k.spill_stores or k.spill_loads:
                problems.append(f"spills {k.spill_stores}/{k.spill_loads} B")
        spill = "n/a" if k.spill_stores is None else f"{k.spill_stores}/{k.spill_loads}"
        reg = k.resources.get("REG", k.ptxas_regs)
        rows.append((short_name(names[k.name]), str(reg if reg is not None else "?"),
                     str(k.resources.get("SHARED", "?")), str(k.resources.get("STACK", "?")),
                     str(hgmma), f"{ldl}/{stl}", spill, "ok" if not problems else "FAIL: " + "; ".join(problems)))
        if problems:
            failures.append(k)

    header = ("kernel", "regs", "smem(static)", "stack", "GMMA", "LDL/STL", "spill st/ld", "verdict")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    others = len(kernels) - len(fwd)
    print(f"check_sass: {len(fwd)} forward kernel(s) checked, {len(failures)} failed"
          + (f"; {others} other kernel(s) not checked" if others else "")
          + ("" if args.ptxas_log else "; no ptxas log given, spills not checked"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
