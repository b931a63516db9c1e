"""scripts/bench_subnormal.py: the --smoke run times kept and flushed steps from the same start and
prints the census; the census finds subnormal entries where a tensor holds them (tiny random
model, seconds). The speed-up itself is the benchmark's to measure, never a test's."""

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_subnormal  # noqa: E402


def test_smoke_run_times_both_modes_from_the_same_start():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_subnormal.py"), "--smoke",
                           "--pairs", "2", "--steps", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.startswith("# subnormals | tiny random model | float32, LoRA r=16 | 2 pairs x 2 orders")
    assert re.search(r"^ms per step, median of 2: kept [0-9,]+ \| flushed [0-9,]+ \| kept / flushed [0-9.]+x$", out, re.M)
    kept = re.search(r"^losses kept: +(.*)$", out, re.M).group(1).split()
    flushed = re.search(r"^losses flushed: +(.*)$", out, re.M).group(1).split()
    assert len(kept) == 2 and kept == flushed     # the same batches from the same weights; nothing subnormal here
    assert float(kept[1]) != float(kept[0])       # the second step ran after an update (AdamW moved the adapters)
    assert "subnormal entries of one step with flushing off" in out


def test_census_counts_subnormal_entries_where_they_are():
    args = bench_subnormal.get_args(["--smoke", "--pairs", "2"])
    judge, tok, template, pairs = bench_subnormal.build(args)
    batch = bench_subnormal.encode_rm_batch(tok, template, pairs[:2], "pairwise")
    with torch.no_grad():
        judge.lm.model.norm.weight.fill_(1e-40)   # a subnormal scale: the final norm's output is subnormal
    optimizer = torch.optim.AdamW([p for p in judge.parameters() if p.requires_grad], lr=1e-3)
    torch.set_flush_denormal(False)
    try:
        rows = bench_subnormal.census(judge, optimizer, batch, top=3)
    finally:
        torch.set_flush_denormal(True)
    n_sub, n, name = rows[0]
    assert name == "forward lm.model.norm" and 0 < n_sub <= n and n == batch[0].numel() * 64
