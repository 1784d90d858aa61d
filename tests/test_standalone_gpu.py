"""The standalone deliverables, run as a user runs them: build_standalone/test_varlen_inference over a table of
cases (each must print its verification and exit 0), and build_standalone/flash3_example, the C program linked
against libflash_attn3.so. Both are built by `bash build_standalone.sh`; these tests skip (with the reason) when
the binaries are absent or there is no SM90 GPU, so CI, which has neither, only collects them.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build_standalone"
RUNNER = BUILD / "test_varlen_inference"
EXAMPLE = BUILD / "flash3_example"


def _skip_reason(binary: Path) -> str | None:
    if not binary.exists():
        return f"{binary.relative_to(ROOT)} is not built (run: bash build_standalone.sh)"
    if not torch.cuda.is_available():
        return "no CUDA device (the standalone binaries need an SM90 GPU)"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the kernels are built for SM90 (Hopper) only"
    return None


# The standalone guide's four production cases (shared/spec/standalone-guide.md), verbatim.
GUIDE_CASES = {
    "guide1_fp8_prefill": "--fp8 --batch_size 3 --max_seqlen_q 1680 --max_seqlen_k 1680 --num_heads 16 "
                          "--num_heads_k 16 --head_size 80",
    "guide2_fp8_small_batch": "--fp8 --batch_size 84 --max_seqlen_q 64 --max_seqlen_k 64 --num_heads 16 "
                              "--num_heads_k 16 --head_size 80",
    "guide3_fp16_gqa_prefill": "--fp16 --batch_size 1 --max_seqlen_q 1285 --max_seqlen_k 1285 --num_heads 16 "
                               "--num_heads_k 2 --head_size 80 --causal",
    "guide4_fp16_gqa_decode": "--fp16 --batch_size 1 --max_seqlen_q 1 --max_seqlen_k 2048 --num_heads 16 "
                              "--num_heads_k 2 --head_size 80 --causal",
}

# Head dims 64/80/96/128 (80 runs on the 96 kernel, 72 and 120 round up too), fp16 and bf16, causal or not,
# GQA ratios 1, 2, 8 and MQA, random varlen with zero-length and length-1 sequences, s_q != s_k both ways,
# dense layout, and one odd seed each so lengths differ between rows.
TABLE_CASES = {
    # FP8 e4m3 (descales 1, BF16 out): edge lengths, GQA/MQA, causal, s_q != s_k, dense, d 64..256.
    "fp8_d80_edge_lengths_gqa4_causal": "--fp8 --batch_size 6 --max_seqlen_q 200 --max_seqlen_k 200 --num_heads 8 "
                                        "--num_heads_k 2 --head_size 80 --edge_lengths --causal --seed 21",
    "fp8_d64_sq_lt_sk": "--fp8 --batch_size 3 --max_seqlen_q 17 --max_seqlen_k 1023 --head_size 64 --seed 22",
    "fp8_d128_mqa_causal": "--fp8 --batch_size 2 --max_seqlen_q 700 --max_seqlen_k 700 --num_heads 8 --num_heads_k 1 "
                           "--head_size 128 --causal --seed 23",
    "fp8_d256_dense": "--fp8 --dense --batch_size 2 --max_seqlen_q 333 --max_seqlen_k 333 --head_size 256 --seed 24",
    "fp8_d96_dense_sq_gt_sk_causal": "--fp8 --dense --batch_size 2 --max_seqlen_q 1023 --max_seqlen_k 113 "
                                     "--head_size 96 --causal --seed 25",
    "fp16_d64": "--fp16 --batch_size 3 --max_seqlen_q 300 --max_seqlen_k 300 --head_size 64 --seed 1",
    "bf16_d64_causal": "--bf16 --batch_size 3 --max_seqlen_q 300 --max_seqlen_k 300 --head_size 64 --causal --seed 2",
    "fp16_d80_gqa2": "--fp16 --batch_size 4 --max_seqlen_q 257 --max_seqlen_k 257 --num_heads 8 --num_heads_k 4 "
                     "--head_size 80 --seed 3",
    "bf16_d96_causal_gqa8": "--bf16 --batch_size 2 --max_seqlen_q 513 --max_seqlen_k 513 --num_heads 16 "
                            "--num_heads_k 2 --head_size 96 --causal --seed 4",
    "fp16_d128_mqa": "--fp16 --batch_size 2 --max_seqlen_q 700 --max_seqlen_k 700 --num_heads 8 --num_heads_k 1 "
                     "--head_size 128 --seed 5",
    "bf16_d128_causal_mqa": "--bf16 --batch_size 2 --max_seqlen_q 700 --max_seqlen_k 700 --num_heads 8 "
                            "--num_heads_k 1 --head_size 128 --causal --seed 6",
    "fp16_d128_edge_lengths": "--fp16 --batch_size 5 --max_seqlen_q 200 --max_seqlen_k 200 --head_size 128 "
                              "--edge_lengths --seed 7",
    "bf16_d64_causal_edge_lengths": "--bf16 --batch_size 6 --max_seqlen_q 129 --max_seqlen_k 129 --head_size 64 "
                                    "--causal --edge_lengths --num_heads 4 --num_heads_k 2 --seed 8",
    "fp16_d96_sq_lt_sk_causal": "--fp16 --batch_size 3 --max_seqlen_q 17 --max_seqlen_k 1023 --head_size 96 "
                                "--causal --seed 9",
    "bf16_d128_sq_gt_sk_causal": "--bf16 --batch_size 3 --max_seqlen_q 1023 --max_seqlen_k 113 --head_size 128 "
                                 "--causal --seed 10",
    "fp16_d64_sq_gt_sk": "--fp16 --batch_size 2 --max_seqlen_q 400 --max_seqlen_k 33 --head_size 64 --seed 11",
    "bf16_d80_decode_gqa8": "--bf16 --batch_size 4 --max_seqlen_q 1 --max_seqlen_k 3000 --num_heads 16 "
                            "--num_heads_k 2 --head_size 80 --causal --seed 12",
    "fp16_d128_dense": "--fp16 --dense --batch_size 2 --max_seqlen_q 333 --max_seqlen_k 333 --head_size 128 --seed 13",
    "bf16_d128_dense_causal": "--bf16 --dense --batch_size 2 --max_seqlen_q 1024 --max_seqlen_k 1024 "
                              "--head_size 128 --causal --seed 14",
    "fp16_d64_dense_sq_ne_sk": "--fp16 --dense --batch_size 2 --max_seqlen_q 113 --max_seqlen_k 239 --head_size 64 "
                               "--causal --seed 15",
    "bf16_d72_equal_lengths": "--bf16 --equal_lengths --batch_size 3 --max_seqlen_q 191 --max_seqlen_k 191 "
                              "--head_size 72 --seed 16",
    "fp16_d120_gqa4": "--fp16 --batch_size 2 --max_seqlen_q 250 --max_seqlen_k 250 --num_heads 8 --num_heads_k 2 "
                      "--head_size 120 --causal --seed 17",
    "fp16_d128_one_token": "--fp16 --batch_size 1 --max_seqlen_q 1 --max_seqlen_k 1 --head_size 128 --seed 18",
    "bf16_d64_many_short": "--bf16 --batch_size 64 --max_seqlen_q 40 --max_seqlen_k 40 --num_heads 4 "
                           "--num_heads_k 4 --head_size 64 --causal --seed 19",
    "fp16_d128_long": "--fp16 --batch_size 2 --max_seqlen_q 2051 --max_seqlen_k 2051 --num_heads 4 --num_heads_k 4 "
                      "--head_size 128 --causal --seed 20",
    "fp16_default": "",
}


def run_binary(binary: Path, args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args.split()], capture_output=True, text=True, timeout=timeout)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted({**GUIDE_CASES, **TABLE_CASES}))
def test_runner_case_verifies(name):
    reason = _skip_reason(RUNNER)
    if reason:
        pytest.skip(reason)
    args = {**GUIDE_CASES, **TABLE_CASES}[name]
    proc = run_binary(RUNNER, f"{args} --verify --iters 3")
    log = f"$ {RUNNER.name} {args} --verify --iters 3\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, log
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "RESULT: PASS (verified)", log
    verify = [line for line in lines if line.startswith("verify:")]
    assert len(verify) == 1 and verify[0].endswith("-> PASS"), log
    assert re.search(r"non-finite or unwritten 0 ", verify[0]), log
    assert re.search(r"\| [0-9.]+ TFLOP/s", proc.stdout), log


@pytest.mark.gpu
def test_runner_rejects_bad_options():
    reason = _skip_reason(RUNNER)
    if reason:
        pytest.skip(reason)
    for args, needle in (("--num_heads 6 --num_heads_k 4", "multiple"), ("--head_size 12", "head_size"),
                         ("--bogus", "unknown option")):
        proc = run_binary(RUNNER, args)
        assert proc.returncode == 1 and needle in proc.stderr, (args, proc.stdout, proc.stderr)


@pytest.mark.gpu
def test_c_example_links_library_and_verifies():
    reason = _skip_reason(EXAMPLE)
    if reason:
        pytest.skip(reason)
    proc = run_binary(EXAMPLE, "")
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, log
    assert proc.stdout.strip().splitlines()[-1] == "RESULT: PASS", log
    assert "FAIL" not in proc.stdout.replace("RESULT: PASS", ""), log
