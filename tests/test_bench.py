"""Benchmark scripts (kernels/bench.py, scripts/bench_generate.py): the --smoke runs work end to end,
and a wrong kernel fails the kernel run.

The smoke run is a subprocess (bench.py sets TRITON_INTERPRET itself, before importing triton)
on tiny shapes; the failure path is checked in-process with plain-PyTorch "kernels", so it
needs no Triton at all.
"""

import os
import subprocess
import sys

import torch

from kernels import bench
from nanopairwise import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_checks_then_prints_tables():
    env = dict(os.environ, TRITON_INTERPRET="1")
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


def _make_inputs(check):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g).requires_grad_(True)
    return (logits, torch.randint(0, 50, (8,), generator=g), None), [logits]


def _ref(x, y, r):
    return losses.token_logprobs_ref(x, y, 1.0, r)


def _off_by_a_little(x, y, r):
    out = losses.token_logprobs_ref(x, y, 1.0, r)
    return out._replace(logprobs=out.logprobs * 1.01)


ENV = bench.Env("cpu", False, 1.0, True)
NBYTES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}
TOL = bench.LOGPROB_TOL[torch.float32]


def test_wrong_kernel_of_ours_fails_the_run(capsys):
    impls = [bench.Impl("eager", _ref, False), bench.Impl("triton", _off_by_a_little, True)]
    assert bench.run_op("t", _make_inputs, impls, NBYTES, TOL, ENV) is False
    out = capsys.readouterr().out
    assert "correctness FAILED: triton out.logprobs" in out and "ms p50" not in out   # not timed


def test_wrong_peer_is_dropped_but_ours_is_timed(capsys):
    impls = [bench.Impl("eager", _ref, False), bench.Impl("peer", _off_by_a_little, False),
             bench.Impl("triton", _ref, True)]
    assert bench.run_op("t", _make_inputs, impls, NBYTES, TOL, ENV) is True
    out = capsys.readouterr().out
    assert "correctness FAILED: peer" in out and "correctness ok: triton" in out
    assert "triton     fwd+bwd" in out and "peer       fwd" not in out


def test_generation_benchmark_smoke():
    """scripts/bench_generate.py --smoke: ours and transformers on a tiny model, fp32 greedy parity first."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_generate.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "check: batch-1 greedy tokens agree with transformers for 16/16 steps" in out
    assert "| batch | ours tok/s | transformers tok/s | speedup |" in out
    assert out.count("x |") == 2                                                  # batches 1 and 4
