"""Benchmark scripts (kernels/bench.py, scripts/bench_generate.py): the --smoke runs work end to end,
and a wrong kernel fails the kernel run.

The smoke run is a subprocess (bench.py sets TRITON_INTERPRET itself, before importing triton)
on tiny shapes; the harness (kernels/bench_harness.py: failure path, tolerances, baseline
column) is checked in-process with plain-PyTorch "kernels", so it needs no Triton at all.
"""

import os
import re
import subprocess
import sys

import torch

from kernels import bench, bench_device, bench_harness
from nanopairwise import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_checks_then_prints_tables():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)  # the repo importable without pip install -e
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--smoke",
                           "--entropy", "--kl"], capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "device CPU" in out and "copy bandwidth" in out                       # the header
    assert "== token_logprobs N=64 V=1000 bf16" in out
    assert "correctness ok: triton matches eager" in out
    assert out.count("ms p50 [p20-p80]") >= 1
    for impl_pass in ("eager      fwd ", "triton     bwd ", "triton     fwd+bwd "):
        assert impl_pass in out, impl_pass
    assert "correctness FAILED" not in out and out.rstrip().endswith("all correctness checks ok")
    # the fused LM head table: fp32 operands under --smoke (bf16 tl.dot is wrong in the interpreter),
    # ours and the unfused path both checked, TFLOP/s against the GEMM, speedup against unfused
    linear = out[out.index("== linear_token_logprobs N=37 C=40 V=333 fp32"):]
    for line in ("correctness ok: unfused matches eager (5 tensors)",
                 "correctness ok: triton matches eager (5 tensors)", "TFLOP/s    %mm  x unfused",
                 "unfused    fwd+bwd ", "triton     bwd ", "triton vs unfused: fwd+bwd time"):
        assert line in linear, line
    peers = out[out.index("linear_logprob: fp32 under --smoke"):out.index("== linear_token_logprobs")]
    for peer in (r"liger: (liger_kernel not installed|skipped \(its fused linear cross-entropy has no temp)",
                 r"cce: (cut_cross_entropy not installed|skipped \(Cut Cross-Entropy has no temp)"):
        assert re.search(peer, peers), peer               # --entropy --kl: never run, never silently


def _make_inputs(check):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g).requires_grad_(True)
    return (logits, torch.randint(0, 50, (8,), generator=g), None), [logits]


def _ref(x, y, r):
    return losses.token_logprobs_ref(x, y, 1.0, r)


def _off_by_a_little(x, y, r):
    out = losses.token_logprobs_ref(x, y, 1.0, r)
    return out._replace(logprobs=out.logprobs * 1.01)


ENV = bench_device.Env("cpu", False, 1.0, True)
RATE = bench_harness.bandwidth({"fwd": 1, "bwd": 2, "fwd+bwd": 3}, ENV)
TOL = bench.LOGPROB_TOL[torch.float32]
Impl = bench_harness.Impl


def test_wrong_kernel_of_ours_fails_the_run(capsys):
    impls = [Impl("eager", _ref, False), Impl("triton", _off_by_a_little, True)]
    assert bench_harness.run_op("t", _make_inputs, impls, RATE, TOL, ENV) is None
    out = capsys.readouterr().out
    assert "correctness FAILED: triton out.logprobs" in out and "ms p50" not in out   # not timed


def test_wrong_peer_is_dropped_but_ours_is_timed(capsys):
    impls = [Impl("eager", _ref, False), Impl("peer", _off_by_a_little, False), Impl("triton", _ref, True)]
    results = bench_harness.run_op("t", _make_inputs, impls, RATE, TOL, ENV)
    assert results is not None and list(results) == ["eager", "triton"]
    out = capsys.readouterr().out
    assert "correctness FAILED: peer" in out and "correctness ok: triton" in out
    assert "triton     fwd+bwd" in out and "peer       fwd" not in out


def test_own_tolerance_and_baseline_row(capsys):
    """An Impl's own tol replaces the op's (here: loose enough for its 1% error; with the op's it
    would fail the run), and speedups are against the named baseline row."""
    loose = dict(out=dict(atol=0.0, rtol=0.02), grad=dict(atol=0.0, rtol=0.02))
    impls = [Impl("eager", _ref, False), Impl("rounds", _off_by_a_little, True, loose),
             Impl("triton", _ref, True)]
    results = bench_harness.run_op("t", _make_inputs, impls, RATE, TOL, ENV, baseline="rounds")
    assert list(results) == ["eager", "rounds", "triton"]
    out = capsys.readouterr().out
    assert "correctness ok: rounds" in out and "x rounds" in out
    assert [line.split()[-3] for line in out.splitlines() if line.startswith("  rounds ")] == ["1.00x"] * 3


def test_versus_line_gives_ratios_to_the_baseline(capsys):
    results = {"base": {"fwd+bwd": (2.0, 1.9, 2.1), "peak": 400.0},
               "ours": {"fwd+bwd": (3.0, 2.9, 3.1), "peak": 100.0}}
    bench_harness.print_versus(results, "ours", "base", time_goal=1.2, peak_goal=0.25)
    assert capsys.readouterr().out.strip() == ("ours vs base: fwd+bwd time 1.50x (goal <= 1.2x), "
                                               "peak memory 0.250x (goal <= 0.25x)")


def test_atol_rel_is_relative_to_the_largest_entry(capsys):
    want = (losses.TokenLogprobs(torch.tensor([100.0, 0.0]), None, None), [])
    off = (losses.TokenLogprobs(torch.tensor([100.0, 0.5]), None, None), [])
    tol = lambda rel: dict(out=dict(atol_rel=rel, rtol=0.0), grad=None)             # noqa: E731
    assert bench_harness.check_outputs("x", off, want, tol(1e-2))                     # 0.5 <= 1e-2 * 100
    assert not bench_harness.check_outputs("x", off, want, tol(1e-3))                 # 0.5 > 0.1
    assert "correctness FAILED: x out.logprobs" in capsys.readouterr().out


def test_generation_benchmark_smoke():
    """scripts/bench_generate.py --smoke: ours and transformers on a tiny model, fp32 greedy parity first."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_generate.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "check: batch-1 greedy tokens agree with transformers for 16/16 steps" in out
    assert "| batch | ours tok/s | transformers tok/s | speedup | floor tok/s | floor time / ours |" in out
    assert out.count("x |") == 2                                                  # batches 1 and 4
