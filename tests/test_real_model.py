"""scripts/real_model.py --smoke: the real-model recipe end to end at tiny sizes on SmolLM2-135M-
Instruct (skipped when the model has not been fetched): every phase runs, the table and the
zero-shot line come out, and the PPO policy was LoRA-trained from the SFT policy."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import real_model  # noqa: E402


def test_smoke_recipe(smollm2_dir, tmp_path):
    results, zero_shot, times = real_model.main(["--smoke", "--model", smollm2_dir, "--run-dir", str(tmp_path)])
    assert set(times) == {"task", "zero-shot judge", "sft", "judge", "bt", "ppo_pairwise", "ppo_bt"}
    assert 0.0 <= zero_shot["oracle_accuracy"] <= 1.0 and 0.0 <= zero_shot["position_consistency"] <= 1.0
    assert {"oracle_accuracy", "ece", "position_consistency"} <= set(results["judge"]) & set(results["bt"])
    for reward in ("pairwise", "bt"):
        assert {"oracle_score", "oracle_win_rate", "kl"} <= set(results[f"ppo_{reward}"]["after"])
    text = open(tmp_path / "results.md").read()
    assert "`python scripts/real_model.py --smoke`" in text and "Zero-shot SmolLM2" in text
    args = json.load(open(tmp_path / "phase_seconds.json"))
    assert args == times
