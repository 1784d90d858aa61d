"""Top stall locations of one kernel from Nsight Compute's source page (SASS), as text.

Usage: ncu -i REPORT.ncu-rep --page source --csv --print-source sass > src.csv
       python tools/ncu_hotspots.py src.csv [N]
Prints the N instructions with the most warp-stall samples (all samples), with their share, the columns
that break the samples down by reason where the report has them, and a summary of the sampled opcodes."""
import collections
import csv
import sys


def main() -> int:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.strip() and not ln.startswith("==")]
    rows = list(csv.reader(lines))
    # The header is the first row that names a source column.
    hi = next(i for i, r in enumerate(rows) if any(c.strip() in ("Source", "# Source") for c in r))
    head = [c.strip() for c in rows[hi]]
    body = [r for r in rows[hi + 1:] if len(r) == len(head)]
    col = {c: i for i, c in enumerate(head)}
    print("columns:", ", ".join(head))
    src = col.get("Source", col.get("# Source"))
    samp = next((i for c, i in col.items() if c.startswith("Warp Stall Sampling (All")), None)
    if samp is None:
        print("no stall-sampling column")
        return 1

    def num(x):
        try:
            return float(x.replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(num(r[samp]) for r in body) or 1.0
    addr = col.get("Address", 0)
    ranked = sorted(range(len(body)), key=lambda i: -num(body[i][samp]))
    print(f"total samples {total:.0f}; top {n}:")
    for i in ranked[:n]:
        r = body[i]
        print(f"{num(r[samp]) / total * 100:5.1f}%  {r[addr]:>6}  {r[src].strip()[:110]}")
    ops = collections.Counter()
    for r in body:
        words = r[src].split()  # SASS separates a guard predicate by several spaces
        if words and words[0].startswith("@"):
            words = words[1:]
        ops[words[0].split(".")[0] if words else "?"] += num(r[samp])
    print("samples by opcode:", ", ".join(f"{k} {v / total * 100:.1f}%" for k, v in ops.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
