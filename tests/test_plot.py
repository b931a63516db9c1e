"""Tests for scripts/plot.py and compare.py --plot-only on small synthetic run directories (the
metrics.jsonl / eval.json that train_ppo.py and train_rm.py write), so no training runs."""

import json
import os
import sys

import pytest
import torch

from nanopairwise.judge import pair_metrics
from nanopairwise.pipeline import REWARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import compare  # noqa: E402
import plot  # noqa: E402


def write_ppo_run(path, seed, steps=6, eval_every=3):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(0, steps + 1):
            if step % eval_every == 0:
                f.write(json.dumps({"step": step, "eval/oracle_score": 0.7 + 0.01 * step,
                                    "eval/oracle_win_rate": 0.2 + 0.005 * step, "eval/kl": 0.02 * step}) + "\n")
            if step:
                noise = 0.01 * torch.rand(1, generator=g).item()
                f.write(json.dumps({"step": step, "reward/score": 0.4 + 0.02 * step + noise,
                                    "rollout/kl": 0.01 * step, "perf/ms": 800.0}) + "\n")
    json.dump({"before": {"oracle_score": 0.7}, "after": {"oracle_score": 0.76, "oracle_win_rate": 0.23, "kl": 0.12}},
              open(os.path.join(path, "eval.json"), "w"))


def write_rm_run(path, seed, n=200):
    """An RM run whose eval.json holds the reliability bins of train_rm.py (judge.pair_metrics)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(1, 5):
            f.write(json.dumps({"step": step, "loss/rm": 0.7 - 0.05 * step, "lr": 1e-3}) + "\n")
    p_true = torch.rand(n, generator=g)
    p_chosen = (0.5 + 1.4 * (p_true - 0.5)).clamp(0, 1)  # over-confident
    metrics = pair_metrics(p_chosen, p_true, p_true, 1 - p_true)
    json.dump(metrics, open(os.path.join(path, "eval.json"), "w"))
    return metrics


def test_plot_reads_runs_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_ppo_run(str(tmp_path / "ppo_a"), 0)
    write_ppo_run(str(tmp_path / "ppo_b"), 1)
    metrics = write_rm_run(str(tmp_path / "judge"), 0)
    run = plot.read_run(str(tmp_path / "ppo_a"))
    assert [s for s, _ in run["series"]["eval/oracle_score"]] == [0, 3, 6] and len(run["series"]["reward/score"]) == 6
    xs, ys, ns, ece = plot.pooled_reliability([metrics["reliability"]])
    assert sum(ns) == 2 * 200 and ece == pytest.approx(metrics["ece"])  # both orientations; one run: pooling changes nothing
    out = str(tmp_path / "fig" / "plot.png")
    plot.main([str(tmp_path / "ppo_a"), str(tmp_path / "ppo_b"), str(tmp_path / "judge"), "--out", out])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pooled_reliability_weights_by_count():
    a = {"count": [2, 0], "mean_prob": [0.2, None], "mean_target": [0.4, None]}
    b = {"count": [1, 3], "mean_prob": [0.5, 0.8], "mean_target": [0.1, 0.6]}
    xs, ys, ns, ece = plot.pooled_reliability([a, b])
    assert ns == [3, 3] and xs == pytest.approx([0.3, 0.8]) and ys == pytest.approx([0.3, 0.6])
    assert ece == pytest.approx((3 * 0.0 + 3 * 0.2) / 6)


def test_plot_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.read_run(str(tmp_path))


def test_compare_plot_only_redraws_without_training(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    for seed in (0, 1):
        for name in [f"ppo_{reward}" for reward in REWARDS]:   # every arm
            write_ppo_run(str(tmp_path / f"seed{seed}" / name), seed)
        for name in ("judge", "bt"):
            write_rm_run(str(tmp_path / f"seed{seed}" / name), seed)
    for stage in ("prepare_seed", "run_arm"):
        monkeypatch.setattr(compare, stage, lambda *a: pytest.fail("--plot-only must not train"))
    figure = str(tmp_path / "docs" / "compare.png")
    monkeypatch.setattr(compare, "FIGURE", figure)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{compare.README_START}\nold table\n{compare.README_END}\nrest\n")
    monkeypatch.setattr(compare.write_readme, "__defaults__", (str(readme),))
    (tmp_path / "results.md").write_text("the runs' table\n")
    outs = compare.main(["--run-dir", str(tmp_path), "--seeds", "0", "1", "--plot-only"])
    assert outs == [str(tmp_path / "compare.png"), figure] and all(os.path.getsize(p) > 10_000 for p in outs)
    assert readme.read_text() == (f"intro\n{compare.README_START}\nthe runs' table\n{compare.FIGURE_MD}"
                                  f"{compare.README_END}\nrest\n")
    with pytest.raises(SystemExit, match="no finished runs"):
        compare.main(["--run-dir", str(tmp_path), "--seeds", "0", "2", "--plot-only", "--no-readme"])


def test_plot_only_rerenders_the_table_from_results_json_with_paired_differences(tmp_path, monkeypatch):
    """The README table comes from results.json (header line kept from results.md, less machine
    paths; its seeds by default); the paired rows are Pairwise-RL minus each arm, seed by seed:
    here +0.03 and +0.01 over bt, -0.02 and 0.00 over bt-anchor."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(compare, "draw", lambda args, results=None: [])
    readme = tmp_path / "README.md"
    readme.write_text(f"{compare.README_START}\n{compare.README_END}\n")
    monkeypatch.setattr(compare.write_readme, "__defaults__", (str(readme),))
    rm = {"oracle_accuracy": 0.7, "ece": 0.2, "position_consistency": 0.6}
    ppo = lambda after, win: {"before": {"oracle_score": 0.70, "oracle_win_rate": 0.2},
                              "after": {"oracle_score": after, "oracle_win_rate": win, "kl": None}}
    results = {seed: {"judge": rm, "bt": rm, "ppo_pairwise": ppo(0.80 + d, 0.25), "ppo_bt": ppo(0.77 + d + e, 0.20),
                      "ppo_bt-anchor": ppo(0.82 + d - e, 0.25)} for seed, d, e in ((0, 0.0, 0.0), (1, 0.05, 0.02))}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "results.md").write_text("Seeds 0, 1 (mean ± std), the header line; produced by `python "
                                         "scripts/compare.py --seeds 0 1 --run-dir /a/machine/path`.\n\nan old table\n")
    compare.main(["--run-dir", str(tmp_path), "--plot-only"])        # --seeds: every seed of results.json
    text = readme.read_text()
    assert "the header line; produced by `python scripts/compare.py --seeds 0 1`." in text  # no machine path
    assert "an old table" not in text
    assert "| Bradley-Terry RM + standard PPO | +0.020 ± 0.014 | 2 of 2 | +0.050 ± 0.000 | 2 of 2 |" in text
    assert "| BT anchor win prob | -0.010 ± 0.014 | 0 of 2 | +0.000 ± 0.000 | 0 of 2 |" in text
    assert "| n/a |" in text                                          # KL null in every run
