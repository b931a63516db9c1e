"""The critic's start, measured: the first PPO steps' advantages under each way a critic can start.

    python scripts/critic_start.py --run-dir runs/compare --seeds 0 1 2 --jobs 2
    python scripts/critic_start.py --smoke --seeds 0 --run-dir /tmp/cs      # plumbing only (the test)

A fresh value head predicts V = bias everywhere. Under a reward whose mean over the initial
policy's rollouts is s (the win-probability arms: s ~ 0.45 in raw units), GAE with gamma 1 gives the
first steps' advantages a term (s - bias) * lambda^(L-1-t) that depends on the token's position
only; `critic/adv_position_corr` (losses.position_correlation) is the advantages' correlation with
that shape (~0 when they carry only the score's deviations). Settings, per arm:

    init-mean     --critic-bias init-mean: the bias is the initial policy's mean score (the default)
    zero          --critic-bias zero: V = 0
    zero+warmup2  --critic-bias zero --critic-warmup-steps 2: two steps that train only the critic
    rm-head       --reward bt --no-critic-fresh-head: the BT critic starts as the RM, its head rescaled

Per seed (the task and reward models of a scripts/compare.py run directory, trained here if
missing), each (arm, setting) runs --steps 4 of train_ppo.py in RUN_DIR/seed<S>/critic_start/ppo_<arm>_<setting>
(a finished run is skipped). The tables, into RUN_DIR/critic_start.md: per step, mean ± std over
seeds of the position correlation and of the critic's explained variance; and per arm the initial
policy's raw score statistics that --reward-norm init-std divides by (reward.measure_reward_norm,
kept in the run's trainer state) beside the first step's reward/score_std after the division.
"""

import argparse
import json
import os

import torch

from compare import mean_std  # scripts/compare.py (this script's own directory is on sys.path)
from nanopairwise.common import atomic_write_text
from nanopairwise.pipeline import pool_map, prepare_seed, run_arm
from nanopairwise.ppo_checkpoint import TRAINER_STATE

SETTINGS = {  # (arm, setting): train_ppo.py flags
    ("pairwise", "init-mean"): ["--reward", "pairwise", "--critic-bias", "init-mean"],
    ("pairwise", "zero"): ["--reward", "pairwise", "--critic-bias", "zero"],
    ("pairwise", "zero+warmup2"): ["--reward", "pairwise", "--critic-bias", "zero", "--critic-warmup-steps", "2"],
    ("bt-anchor", "init-mean"): ["--reward", "bt-anchor", "--critic-bias", "init-mean"],
    ("bt-anchor", "zero"): ["--reward", "bt-anchor", "--critic-bias", "zero"],
    ("bt", "init-mean"): ["--reward", "bt", "--critic-bias", "init-mean"],
    ("bt", "rm-head"): ["--reward", "bt", "--no-critic-fresh-head"],
}
KEYS = ("critic/adv_position_corr", "critic/explained_var")
SMOKE_RM = ["--max-steps", "2", "--batch-size", "8"]
SMOKE_PPO = ["--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--ppo-epochs", "1",
             "--reward-norm", "none"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/compare", help="scripts/compare.py's run directory (one subdirectory per seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4, help="PPO steps per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (cores / jobs threads each)")
    p.add_argument("--smoke", action="store_true", help="tiny task and runs (plumbing only)")
    return p.parse_args(argv)


def run_one(seed, arm, setting, args) -> tuple:
    """(the metrics.jsonl step rows, the initial score statistics) of one run (trained unless finished)."""
    run = os.path.join(args.run_dir, f"seed{seed}")
    flags = ["--steps", str(args.steps), "--eval-every", "0", "--eval-size", "8"] + (SMOKE_PPO if args.smoke else [])
    run_arm(run, seed, f"{arm}_{setting}", flags + SETTINGS[arm, setting], "critic_start")
    out = os.path.join(run, "critic_start", f"ppo_{arm}_{setting}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    state = torch.load(os.path.join(out, "checkpoint", TRAINER_STATE), weights_only=False)
    return [r for r in rows if "reward/score" in r], state.get("reward_norm")   # training steps, not evaluations


def table(results: dict, seeds: list, steps: int) -> str:
    """Markdown: one row per (arm, setting), per step the position correlation and explained variance."""
    head = "| arm | critic start | " + " | ".join(f"step {t} corr | step {t} expl. var" for t in range(1, steps + 1)) + " |"
    lines = [head, "|---" * (2 + 2 * steps) + "|"]
    for (arm, setting), by_seed in results.items():
        cells = []
        for t in range(steps):
            for key in KEYS:
                cells.append(mean_std([rows[t].get(key) if t < len(rows) else None for rows, _ in by_seed.values()],
                                      signed=True, digits=2))
        lines.append(f"| {arm} | {setting} | " + " | ".join(cells) + " |")
    scale = ["| arm | initial raw score mean | initial raw score std | truncated | step-1 reward/score_std (init-std) |",
             "|---|---|---|---|---|"]
    for (arm, setting), by_seed in results.items():
        if setting == "init-mean":
            norms = [norm for _, norm in by_seed.values() if norm]
            scale.append(f"| {arm} | " + " | ".join(mean_std([n[k] for n in norms]) for k in ("mean", "std", "truncated"))
                         + " | " + mean_std([rows[0].get("reward/score_std") for rows, _ in by_seed.values()], digits=2)
                         + " |")
    return (f"Seeds {', '.join(map(str, seeds))} (mean ± std over seeds); corr = critic/adv_position_corr, the "
            "advantages' correlation with lambda^(L-1-t); expl. var = critic/explained_var.\n\n" + "\n".join(lines)
            + "\n\nThe reward's scale (reward.measure_reward_norm over the initial policy's rollouts; a bt score's "
            "offset is arbitrary):\n\n" + "\n".join(scale) + "\n")


def main(argv=None):
    args = get_args(argv)
    pool_map(prepare_seed, [(os.path.join(args.run_dir, f"seed{s}"), s, args.smoke, SMOKE_RM if args.smoke else [])
                            for s in args.seeds], args.jobs)
    units = [(seed, arm, setting, args) for seed in args.seeds for arm, setting in SETTINGS]
    results = {}
    for (seed, arm, setting, _), rows in zip(units, pool_map(run_one, units, args.jobs)):
        results.setdefault((arm, setting), {})[seed] = rows
    text = table(results, args.seeds, args.steps)
    atomic_write_text(os.path.join(args.run_dir, "critic_start.md"), text)
    print("\n" + text)
    return results


if __name__ == "__main__":
    main()
