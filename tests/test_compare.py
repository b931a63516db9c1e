"""scripts/compare.py end to end at smoke size: every arm on two seeds, run by two worker processes
(--jobs 2), then the table and the figure. Checks the plumbing, not the numbers."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import compare  # noqa: E402


def test_compare_smoke_two_seeds_in_two_jobs(tmp_path):
    run_dir = tmp_path / "compare"
    env = dict(os.environ, TRITON_INTERPRET="0")  # the reference path, as a plain user run takes
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare.py"), "--smoke", "--seeds", "0", "1",
                          "--jobs", "2", "--run-dir", str(run_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results) == ["0", "1"]
    for seed in ("0", "1"):
        assert set(results[seed]) == {"judge", "bt", "ppo_pairwise", "ppo_bt", "ppo_bt-anchor"}
        assert 0.0 <= results[seed]["judge"]["position_consistency"] <= 1.0
        assert results[seed]["bt"]["position_consistency"] == 1.0          # a scalar RM, by construction
        for arm in ("ppo_pairwise", "ppo_bt", "ppo_bt-anchor"):
            assert {"before", "after"} <= set(results[seed][arm])
        # the two workers ran different seeds: the tasks differ
        assert os.path.exists(run_dir / f"seed{seed}" / "task" / "task.json")
    assert (run_dir / "seed0" / "task" / "pairs_train.jsonl").read_text() != \
        (run_dir / "seed1" / "task" / "pairs_train.jsonl").read_text()
    table = (run_dir / "results.md").read_text()
    assert str(tmp_path) not in table                                      # no path of this machine
    assert "Seeds 0, 1 (mean ± std)" in table and "--jobs 2" in table and table.count("\n| ") == 4 + 3 + 3  # head + 3 arms, paired head + 2, RM head + 2
    assert (run_dir / "compare.png").stat().st_size > 10_000


def test_header_command_names_no_path_of_the_machine():
    """The README's header is read on other machines: --run-dir inside the repository is written
    relative to it, outside it left out; every other word as it was."""
    assert compare.header_command(["--seeds", "0", "1", "--jobs", "2", "--run-dir", "/elsewhere/runs_compare"]) == \
        "python scripts/compare.py --seeds 0 1 --jobs 2"
    assert compare.header_command([f"--run-dir={ROOT}/runs/c", "--ppo-args", "--steps 60"]) == \
        "python scripts/compare.py --run-dir runs/c --ppo-args '--steps 60'"


def test_compare_kl_frontier_smoke(tmp_path):
    """--kl-coefs: every arm at each coefficient (two jobs), the frontier and matched-KL tables, the
    RM table with the judge's consistency parts, and the frontier figure; a rerun trains nothing."""
    run_dir = tmp_path / "frontier"
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "compare.py"), "--smoke", "--seeds", "0", "--jobs", "2",
           "--kl-coefs", "0.01", "1", "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["0"]["frontier"]) == ["0.01", "1"]
    for coef in ("0.01", "1"):
        assert set(results["0"]["frontier"][coef]) == {"ppo_pairwise", "ppo_bt", "ppo_bt-anchor"}
        assert (run_dir / "seed0" / f"kl{coef}" / "ppo_bt" / "eval.json").exists()
        assert all(r["after"]["kl"] >= -1e-6 for r in results["0"]["frontier"][coef].values())   # the exact KL
    table = (run_dir / "results.md").read_text()
    assert "| 0.01 | Pairwise-RL |" in table and "At matched held-out KL" in table and "Yes rate" in table
    assert {"accuracy_chosen_first", "accuracy_chosen_second", "yes_rate", "independent_consistency"} <= \
        set(results["0"]["judge"])
    assert (run_dir / "frontier.png").stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "PPO | reward" not in again.stdout        # every stage was finished
