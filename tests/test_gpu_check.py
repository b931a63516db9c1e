"""scripts/gpu_check.py, the first-GPU-run command, on the CPU: one real step under --smoke writes
its section of a copy of docs/BENCHMARKS.md and leaves the others alone; failing and hanging steps
are named in the last line and give exit code 1; every step's command exists. The other steps'
smoke commands are the ones tests/test_bench.py, tests/test_bench_ppo_step.py and
tests/test_bench_judge.py run (too slow to
run twice here: `python scripts/gpu_check.py --smoke` runs them all in about 100 s on 2 cores).
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402


def test_smoke_step_writes_its_section_only(tmp_path, capsys):
    docs = str(tmp_path / "BENCHMARKS.md")
    shutil.copy(gpu_check.DOCS, docs)
    before = open(docs).read()
    assert gpu_check.main(["--smoke", "--only", "ppo_loss", "--docs", docs]) == 0
    assert capsys.readouterr().out.rstrip().endswith("gpu_check: all 1 step(s) ok")
    after = open(docs).read()
    section = after.split("<!-- gpu-check-ppo_loss:begin -->")[1].split("<!-- gpu-check-ppo_loss:end -->")[0]
    assert "kernels/bench.py --smoke --op ppo_loss" in section and "| ok" in section
    assert "correctness ok: triton matches eager" in section
    strip = lambda text: text.split("<!-- gpu-check-ppo_loss:begin -->")[0] + text.split(
        "<!-- gpu-check-ppo_loss:end -->")[1]
    assert strip(after) == strip(before)                                  # nothing else changed


def test_failed_and_timed_out_steps_are_named(monkeypatch, capsys):
    py = sys.executable
    monkeypatch.setattr(gpu_check, "STEPS", {
        "good": ([py, "-c", "print('fine')"],) * 2 + (30,),
        "boom": ([py, "-c", "import sys; sys.exit(3)"],) * 2 + (30,),
        "hang": ([py, "-c", "import time; time.sleep(30)"],) * 2 + (30,)})
    monkeypatch.setattr(gpu_check, "SMOKE_LIMIT_S", 2)
    assert gpu_check.main(["--smoke"]) == 1
    out = capsys.readouterr().out
    assert "=== good: ok" in out and "fine" in out
    assert out.rstrip().endswith("FAILED step(s): boom (exit code 3), hang (timed out after 2 s)")


def test_steps_name_existing_scripts_and_the_parity_tests():
    for gpu, smoke, limit in gpu_check.STEPS.values():
        for cmd in (gpu, smoke):
            assert os.path.exists(os.path.join(ROOT, cmd[1])) or cmd[1] == "-m", cmd
    parity = gpu_check.STEPS["parity"][0]
    assert {"tests/test_logprob.py", "tests/test_ppo_loss.py", "tests/test_linear_logprob.py"} <= set(parity)
    assert sum(limit for _, _, limit in gpu_check.STEPS.values()) <= 11 * 60 - 45  # the 11-minute budget
