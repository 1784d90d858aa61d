"""FP8 attention accuracy with outliers: the numerical-error experiment of the FlashAttention-3 paper (arXiv
2407.08608), for the scaling choices flash_attn3.quantize offers.

Inputs: q, k, v with entries from N(0, 1), of which a fraction --outlier-frac (default 0.1%) is replaced by draws
from N(0, --outlier-std²) (default std 10), the paper's model of the outlier features of large language models.
The error of each method is the RMSE of its attention output against attention of the same inputs in float64:

    bf16              q, k, v rounded to bfloat16 (the 16-bit baseline)
    fp8 per-tensor    one descale per tensor (the paper's "baseline FP8")
    fp8 per-(b,h)     one descale per (batch entry, kv head), the kernels' q/k/v_descale granularity
    fp8 per-(b,h)+rot as above after rotating q and k by one random orthogonal matrix
                      (flash_attn3.quantize.hadamard_rotation; "incoherent processing"), which leaves q kᵀ unchanged

Rotation hardly changes the plain RMS error of the scores q kᵀ; it removes the error's concentration on the
large scores that involve outliers, which are the ones the softmax weighs, and that is what halves the output
error. The paper's FP8 FlashAttention-3 row combines incoherent processing with block quantisation (a scale per
tile of rows), which the kernels do not have; the last row here is the closest that they can run.

Backends: `kernel` runs flash_attn3.flash_attn_func (bf16 inputs, or fp8 inputs with their descales; needs an
SM90 GPU and a build with the fp8 kernels). `emulate` computes the same in PyTorch with the kernel's FP8
intermediate: dequantised fp8 q, k, v (x_fp8.float() * descale), scores and softmax in float32, the weights
P = exp(s - rowmax) scaled by 256, rounded to e4m3 and divided back (as the kernel forms its e4m3 P operand),
P @ V in float32 divided by the row sum of the unrounded P, the output rounded to bfloat16; for the bf16 row
the inputs and P are rounded to bfloat16 instead. `auto` (the default) picks `kernel` when CUDA and the
compiled extension are present, else `emulate`.

Long context (issue #14's FP8 accuracy question): --seqlen-q sets fewer queries than keys (--seqlen), so that 32k
or 128k keys stay affordable for the float64 reference, and `--backend both` runs the kernel and the emulator on
the same inputs. The emulator sums P V exactly in float32; the kernel accumulates it in its tensor cores across
every key block, so an error of the kernel's that grows with the keys beyond the emulator's is the accumulation's
(what "two-level accumulation", flushing the FP8 products into float32 every few blocks, would remove), e.g.
`python benchmarks/fp8_error.py --backend both --seqlen-q 128 --seqlen 131072 --heads 8`.

Prints a markdown table (backend, method, RMSE, ratio to the fp8 per-tensor RMSE); --csv PATH also writes the
rows. The default size (b 1, s 2048, h 8, d 128) takes well under a minute on a CPU with the emulator.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import time
from pathlib import Path

import torch

try:  # an installed build (with its CUDA extension) first; else the checkout, for --backend emulate
    import flash_attn3  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash_attn3.quantize import FP8, dequantize_fp8, hadamard_rotation, quantize_fp8, rotate

P_SCALE = 256.0  # the kernel scales P by 2^8 before its cast to e4m3 (exact: a power of two)
METHODS = ("bf16", "fp8 per-tensor", "fp8 per-(b,h)", "fp8 per-(b,h)+rot")
CSV_FIELDS = ("date", "method", "backend", "rmse", "ratio_vs_per_tensor", "rel_rmse", "batch", "seqlen_q", "seqlen", "heads",
              "heads_k", "head_dim", "outlier_frac", "outlier_std", "seed", "device", "torch")


def make_inputs(batch, seqlen, heads, heads_k, head_dim, outlier_frac, outlier_std, seed, seqlen_q=None):
    """float32 q (b, s_q, h, d), k and v (b, s, h_k, d), s_q = seqlen_q or seqlen: N(0, 1) with a fraction
    outlier_frac of the entries replaced by N(0, outlier_std²) draws; generated on the CPU from `seed`, so every
    device sees the same."""
    gen = torch.Generator().manual_seed(seed)

    def one(rows, h):
        x = torch.randn(batch, rows, h, head_dim, generator=gen)
        outlier = torch.rand(x.shape, generator=gen) < outlier_frac
        return torch.where(outlier, torch.randn(x.shape, generator=gen) * outlier_std, x)

    return one(seqlen_q or seqlen, heads), one(seqlen, heads_k), one(seqlen, heads_k)


def _expand_kv(x, heads):
    """(b, s, h_k, d) -> (b, s, h, d): query head i reads kv head i // (h / h_k)."""
    group = heads // x.shape[2]
    return x.repeat_interleave(group, dim=2) if group > 1 else x


def attention_fp64(q, k, v, softmax_scale):
    """Float64 attention, one head at a time (bounded memory); returns (b, s, h, d) float64."""
    heads = q.shape[2]
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(heads):
        qh, kh, vh = (t[:, :, h].double() for t in (q, k, v))  # (b, s, d)
        scores = torch.matmul(qh, kh.transpose(1, 2)) * softmax_scale
        out[:, :, h] = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out


def attention_emulated(q, k, v, softmax_scale, p_dtype, p_scale):
    """The low-precision kernel's arithmetic on already dequantised (float32) q, k, v: float32 scores,
    P = exp(s - rowmax) rounded to p_dtype after scaling by p_scale, (P @ V) / (p_scale · Σ unrounded P),
    out in bfloat16. One head at a time."""
    heads = q.shape[2]
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    for h in range(heads):
        qh, kh, vh = (t[:, :, h].float() for t in (q, k, v))
        scores = torch.matmul(qh, kh.transpose(1, 2)) * softmax_scale
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        row_sum = p.sum(dim=-1, keepdim=True)
        p_op = (p * p_scale).to(p_dtype).float()
        out[:, :, h] = (torch.matmul(p_op, vh) / (row_sum * p_scale)).to(torch.bfloat16)
    return out


def quantized_inputs(q, k, v, method, seed):
    """(q8, k8, v8, q_descale, k_descale, v_descale) for one fp8 method."""
    heads_k = k.shape[2]
    if method == "fp8 per-(b,h)+rot":
        rot = hadamard_rotation(q.shape[-1], seed=seed, device=q.device)
        q, k = rotate(q, rot), rotate(k, rot)
    granularity = "per_tensor" if method == "fp8 per-tensor" else "per_head"
    q8, q_descale = quantize_fp8(q, granularity=granularity, num_heads_k=heads_k)
    k8, k_descale = quantize_fp8(k, granularity=granularity)
    v8, v_descale = quantize_fp8(v, granularity=granularity)
    return q8, k8, v8, q_descale, k_descale, v_descale


def run_method(q, k, v, method, backend, softmax_scale, seed):
    """Attention output of one method (bfloat16, (b, s, h, d))."""
    if method == "bf16":
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        if backend == "kernel":
            import flash_attn3
            return flash_attn3.flash_attn_func(qb, kb, vb, softmax_scale=softmax_scale)
        return attention_emulated(qb, kb, vb, softmax_scale, torch.bfloat16, 1.0)
    q8, k8, v8, q_ds, k_ds, v_ds = quantized_inputs(q, k, v, method, seed)
    if backend == "kernel":
        import flash_attn3
        return flash_attn3.flash_attn_func(q8, k8, v8, softmax_scale=softmax_scale, q_descale=q_ds,
                                           k_descale=k_ds, v_descale=v_ds)
    qd, kd, vd = dequantize_fp8(q8, q_ds), dequantize_fp8(k8, k_ds), dequantize_fp8(v8, v_ds)
    return attention_emulated(qd, kd, vd, softmax_scale, FP8, P_SCALE)


def rmse(out, ref):
    return math.sqrt(torch.mean((out.double() - ref) ** 2).item())


def resolve_backend(backend):
    if backend != "auto":
        return backend
    if not torch.cuda.is_available():
        return "emulate"
    from flash_attn3 import _ops
    return "kernel" if _ops.HAS_EXTENSION else "emulate"


def measure(args):
    """One row per method: dicts with the CSV_FIELDS."""
    backend = resolve_backend(args.backend)
    device = torch.device(args.device or ("cuda" if backend in ("kernel", "both") or torch.cuda.is_available()
                                          else "cpu"))
    if backend in ("kernel", "both") and device.type != "cuda":
        raise SystemExit(f"--backend {backend} needs a CUDA device")
    heads_k = args.heads_k or args.heads
    if args.heads % heads_k:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --heads-k ({heads_k})")
    q, k, v = (t.to(device) for t in make_inputs(args.batch, args.seqlen, args.heads, heads_k, args.head_dim,
                                                  args.outlier_frac, args.outlier_std, args.seed, args.seqlen_q))
    softmax_scale = args.head_dim ** -0.5
    ref = attention_fp64(q, k, v, softmax_scale)
    ref_rms = math.sqrt(torch.mean(ref ** 2).item())  # |O| shrinks as more keys are averaged: rel_rmse = rmse / it
    common = {"date": datetime.date.today().isoformat(), "batch": args.batch, "seqlen_q": q.shape[1],
              "seqlen": args.seqlen, "heads": args.heads, "heads_k": heads_k, "head_dim": args.head_dim,
              "outlier_frac": args.outlier_frac, "outlier_std": args.outlier_std, "seed": args.seed,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    rows = []
    for be in (("kernel", "emulate") if backend == "both" else (backend,)):
        errors = {}
        for method in METHODS:
            try:
                errors[method] = rmse(run_method(q, k, v, method, be, softmax_scale, args.seed), ref)
            except NotImplementedError as exc:  # e.g. a build without the fp8 kernels
                raise SystemExit(f"{method}: {exc}") from exc
        base = errors["fp8 per-tensor"]
        rows += [dict(common, backend=be, method=m, rmse=e, ratio_vs_per_tensor=e / base if base > 0 else float("nan"),
                      rel_rmse=e / ref_rms if ref_rms > 0 else float("nan")) for m, e in errors.items()]
    return rows


def markdown_table(rows):
    lines = ["| backend | method | RMSE | RMSE / rms(O) | ratio vs fp8 per-tensor |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['method']} | {r['rmse']:.3e} | {r['rel_rmse']:.3e} | "
              f"{r['ratio_vs_per_tensor']:.3f} |" for r in rows]
    return "\n".join(lines)


def write_csv(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("auto", "kernel", "emulate", "both"), default="auto",
                   help="both: the kernel and the emulator on the same inputs")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=2048, help="keys (and queries, unless --seqlen-q)")
    p.add_argument("--seqlen-q", type=int, default=None, help="queries (default: --seqlen)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-k", type=int, default=None, help="kv heads (GQA); default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--outlier-frac", type=float, default=1e-3)
    p.add_argument("--outlier-std", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0, help="inputs and rotation")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    rows = measure(args)
    r = rows[0]
    print(f"backend {args.backend} on {r['device']}: b {r['batch']}, s_q {r['seqlen_q']}, s_k {r['seqlen']}, "
          f"h {r['heads']}/{r['heads_k']}, "
          f"d {r['head_dim']}, outliers {args.outlier_frac:g} of N(0, {args.outlier_std:g}^2), seed {args.seed} "
          f"({time.perf_counter() - start:.1f} s)\n")
    print(markdown_table(rows))
    if args.csv:
        write_csv(args.csv, rows)
        print(f"\nwrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
