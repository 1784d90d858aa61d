"""Loops of a kernel's SASS that contain (W|H|Q)GMMA instructions, smallest first, with their opcode counts:
the steady-state main loop is the smallest one holding all of an iteration's GMMAs. Works on our cubins and on
FA3's (the fa3-fwd wheel's `_C.abi3.so`), so an iteration's instruction mix can be compared without a GPU.

Usage: cuobjdump -sass KERNEL.cubin > k.sass   (or: cuobjdump -sass -fun MANGLED_NAME LIB.so > k.sass)
       python tools/sass_loops.py k.sass [FUNCTION_INDEX] [--top N]
Counts are static (every path of a branch inside the loop is counted): subtract a path the call does not
take (a softcap or sign branch, found with `grep BRA`) for the executed count (benchmarks/NOTES.md, session 5).
"""
import argparse
import collections
import re
import sys


def parse(path: str, function: int):
    lines = open(path).read().split("\n")
    starts = [i for i, ln in enumerate(lines) if "Function :" in ln]
    if starts:
        s = starts[function]
        e = starts[function + 1] if function + 1 < len(starts) else len(lines)
        print(lines[s].strip()[:200])
        lines = lines[s:e]
    ins = []
    for ln in lines:
        m = re.search(r"/\*([0-9a-f]{4,6})\*/\s+(.*?);", ln)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # drop a guard predicate
    return text.split(" ")[0].split(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("function", nargs="?", type=int, default=0, help="index of the function in the dump")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    ins = parse(args.sass, args.function)
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA (?:`\()?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            body = ins[index[int(m.group(1), 16)]:i + 1]
            gmma = sum("GMMA" in x for _, x in body)
            if gmma:
                loops.append((len(body), gmma, body))
    print(f"{len(ins)} instructions, {len(loops)} loops with GMMA")
    for n, gmma, body in sorted(loops, key=lambda x: x[0])[:args.top]:
        ops = collections.Counter(opcode(x) for _, x in body)
        guarded = sum(x.startswith("@") and opcode(x) not in ("BRA", "NANOSLEEP") for _, x in body)
        print(f"loop {hex(body[0][0])}-{hex(body[-1][0])}: {n} instructions, {gmma} GMMA, {guarded} predicated; "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
        # Where the loop waits for all its GEMMs (P V): exponentials after that wait no longer overlap P V
        # (benchmarks/NOTES.md, session 18). Static counts, both paths of a branch included.
        waits = [k for k, (_, x) in enumerate(body) if "DEPBAR.LE gsb0, 0x0" in x]
        if waits:
            before = sum(opcode(x) == "MUFU" for _, x in body[:waits[-1]])
            after = sum(opcode(x) == "MUFU" for _, x in body[waits[-1]:])
            print(f"    MUFU before the last WARPGROUP.DEPBAR.LE gsb0, 0x0: {before}, after it: {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
