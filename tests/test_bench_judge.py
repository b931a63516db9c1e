"""scripts/bench_judge.py: the --smoke run checks the two scoring paths agree, then prints one row
per K with the ideal speed-up from the token counts beside the measured one (tiny random model,
one thread, a few seconds). Speed itself is checked by the benchmark, never by a test."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def test_smoke_run_checks_parity_and_prints_every_k():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_judge.py"), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.startswith("# judge scoring | tiny random model") and "| float32 |" in out
    assert out.count(": ok\n") == 2 and "FAILED" not in out
    for K, inputs in ((1, 4), (4, 16)):                                   # 2 prompts x K rollouts x 2 orders
        m = re.search(rf"^\| {K} \| {inputs} \| ({NUM}) \| ({NUM}) \| ({NUM})x \|", out, re.M)
        assert m, out
        naive, shared, ideal = (float(g.replace(",", "")) for g in m.groups())
        assert naive > shared and abs(ideal - naive / shared) < 0.01
