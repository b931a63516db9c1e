"""scripts/critic_start.py end to end at smoke size: every (arm, critic start) runs and lands in the
table (the warm-up setting's policy does not move). The statistic itself is tested in
test_ppo_math (position_correlation) and test_train_ppo (the init-mean bias)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import critic_start  # noqa: E402


def test_critic_start_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run_dir = tmp_path / "cs"
    results = critic_start.main(["--smoke", "--seeds", "0", "--steps", "2", "--jobs", "1", "--run-dir", str(run_dir)])
    assert set(results) == set(critic_start.SETTINGS)
    for (arm, setting), by_seed in results.items():
        rows, norm = by_seed[0]
        assert norm is None or norm["n"] > 0
        assert [r["step"] for r in rows] == [1, 2]
        assert (run_dir / "seed0" / "critic_start" / f"ppo_{arm}_{setting}" / "eval.json").exists()
        assert all(isinstance(r["critic/adv_position_corr"], float) for r in rows)
    warm = results["pairwise", "zero+warmup2"][0][0]
    assert all(r.get("ppo/clipfrac", 0.0) == 0.0 for r in warm)          # warm-up: the policy does not move
    table = (run_dir / "critic_start.md").read_text()
    assert table.count("\n| ") == 1 + len(critic_start.SETTINGS) + 1 + 3 and "| bt | rm-head |" in table
