"""scripts/critic_start.py end to end at smoke size: every (arm, critic start) runs and lands in the
table (the warm-up setting's policy does not move). The statistic itself is tested in
test_ppo_math (position_correlation) and test_train_ppo (the init-mean bias). Run as a program, as
test_compare runs compare.py: its in-process bootstrap must not switch this process's Triton off."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import critic_start  # noqa: E402


def test_critic_start_smoke(tmp_path):
    run_dir = tmp_path / "cs"
    env = dict(os.environ, TRITON_INTERPRET="0")  # the reference path, as a plain user run takes
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "critic_start.py"), "--smoke", "--seeds", "0",
                          "--steps", "2", "--jobs", "1", "--run-dir", str(run_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for arm, setting in critic_start.SETTINGS:
        run = run_dir / "seed0" / "critic_start" / f"ppo_{arm}_{setting}"
        norm = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False).get("reward_norm")
        assert norm is None or norm["n"] > 0
        rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward/score" in r]
        assert [r["step"] for r in rows] == [1, 2]
        assert (run / "eval.json").exists()
        assert all(isinstance(r["critic/adv_position_corr"], float) for r in rows)
        if (arm, setting) == ("pairwise", "zero+warmup2"):
            assert all(r.get("ppo/clipfrac", 0.0) == 0.0 for r in rows)  # warm-up: the policy does not move
    table = (run_dir / "critic_start.md").read_text()
    assert table.count("\n| ") == 1 + len(critic_start.SETTINGS) + 1 + 3 and "| bt | rm-head |" in table
