"""Plots of what runs did, from their run directories (metrics.jsonl, eval.json); nothing retrains.

    python scripts/plot.py runs/ppo_pairwise runs/ppo_bt runs/judge runs/bt      # -> plot.png
    python scripts/plot.py runs/ppo_pairwise runs/judge --out docs/my_run.png --labels a b

One figure, six panels: over PPO steps, the rollout reward and the KL to the reference of every
step (metrics.jsonl `reward/score`, `rollout/kl`), the held-out oracle score and oracle win rate
against the anchors at each evaluation (`eval/oracle_score`, `eval/oracle_win_rate`); the
reward model's training loss (`loss/rm`); and the reward model's reliability diagram (eval.json
`reliability` of train_rm.py: per bin of the predicted P(a > b) over both orientations of every
held-out pair, the mean prediction against the labeller model's mean true probability; on the diagonal = calibrated, marker area =
pairs in the bin). A run directory counts as PPO or RM by what its metrics.jsonl holds.

Runs given the same label are one group (one colour): each run a thin line, their mean (over the
steps all of them logged) a thick one; the reliability bins of a group are pooled. scripts/compare.py
draws its figure with `plot_groups`, and its KL frontier (--kl-coefs) with `plot_frontier`. matplotlib is an optional extra: pip install 'nanopairwise[plot]'.
"""

import argparse
import json
import os
import statistics

PANELS = [  # (metrics.jsonl key, title)
    ("reward/score", "PPO reward (rollouts; --reward-norm init-std: initial policy's std = 1)"),
    ("rollout/kl", "KL to reference (rollouts)"),
    ("eval/oracle_score", "held-out oracle score"),
    ("eval/oracle_win_rate", "held-out oracle win rate vs anchor"),
    ("loss/rm", "reward model training loss"),
]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+",
                   help="run directories of train_ppo.py / train_rm.py (metrics.jsonl, eval.json)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per run directory (default: its name); equal labels form a group")
    p.add_argument("--out", default="plot.png", help="the figure (PNG)")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.run_dirs)} run directories")
    return args


def read_run(run_dir: str) -> dict:
    """{"series": {key: [(step, value), ...]}, "reliability": bins or None} of one run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is it a train_ppo.py / train_rm.py run directory?)")
    series = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            for key, _ in PANELS:
                if isinstance(row.get(key), (int, float)):
                    series.setdefault(key, []).append((row["step"], float(row[key])))
    reliability = None
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):
        reliability = json.load(open(eval_path, encoding="utf-8")).get("reliability")
    return {"series": series, "reliability": reliability}


def pooled_reliability(bins_list) -> tuple:
    """Pool reliability bins of several runs: counts add, means are count-weighted.
    Returns (mean_prob, mean_target, count) over the non-empty bins, and the pooled ECE."""
    n_bins = len(bins_list[0]["count"])
    xs, ys, ns = [], [], []
    for b in range(n_bins):
        n = sum(r["count"][b] for r in bins_list)
        if n == 0:
            continue
        xs.append(sum(r["count"][b] * r["mean_prob"][b] for r in bins_list if r["count"][b]) / n)
        ys.append(sum(r["count"][b] * r["mean_target"][b] for r in bins_list if r["count"][b]) / n)
        ns.append(n)
    ece = sum(n * abs(x - y) for x, y, n in zip(xs, ys, ns)) / sum(ns)
    return xs, ys, ns, ece


def plot_groups(groups: dict, out_path: str, title: str = None) -> str:
    """Draw {label: [run_dir, ...]} into one PNG at out_path (see the module docstring)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rel_ax = axes[len(PANELS)]
    rel_ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for g, (label, run_dirs) in enumerate(groups.items()):
        color = colors[g % len(colors)]
        runs = [read_run(d) for d in run_dirs]
        for ax, (key, _) in zip(axes, PANELS):
            curves = [r["series"][key] for r in runs if key in r["series"]]
            for c in curves:
                ax.plot(*zip(*c), color=color, linewidth=0.8 if len(curves) > 1 else 1.6,
                        alpha=0.35 if len(curves) > 1 else 1.0,
                        marker="o" if len(c) < 8 else None, markersize=3,
                        label=None if len(curves) > 1 else label)
            if len(curves) > 1:
                common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
                means = [sum(dict(c)[s] for c in curves) / len(curves) for s in common]
                ax.plot(common, means, color=color, linewidth=2.2, marker="o" if len(common) < 8 else None,
                        label=f"{label} (mean of {len(curves)})")
        bins = [r["reliability"] for r in runs if r["reliability"]]
        if bins:
            xs, ys, ns, ece = pooled_reliability(bins)
            total = sum(ns)
            rel_ax.plot(xs, ys, color=color, linewidth=1.2)
            rel_ax.scatter(xs, ys, s=[20 + 600 * n / total for n in ns], color=color, alpha=0.7,
                           label=f"{label} (ECE {ece:.3f}, {total:,} pairs)")
    for ax, (key, name) in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
    rel_ax.set(title="reward model reliability (held-out pairs, both orders)", xlabel="predicted P(a > b)",
               ylabel="true P(a preferred) (labeller model)", xlim=(0, 1), ylim=(0, 1))
    rel_ax.grid(alpha=0.3)
    rel_ax.legend(fontsize=8, loc="upper left")
    for ax in axes[:len(PANELS)]:  # one legend for the curves: the first panel that has any
        if ax.lines:
            ax.legend(fontsize=8)
            break
    return _save(fig, plt, out_path, title)


def plot_frontier(results: dict, out_path: str, arms: dict, title: str = None) -> str:
    """The KL frontier of scripts/compare.py --kl-coefs into one PNG: held-out oracle score and
    oracle win rate (after PPO) against the exact held-out KL, one colour per arm of `arms`
    ({"ppo_<reward>": label}); each seed's runs a thin line in order of KL, the mean over seeds at
    each coefficient a thick one with ± std bars in both directions; the initial policy dashed.
    `results`: compare.py's {seed: {"frontier": {coef: {"ppo_<reward>": eval history}}}}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, name in zip(axes, ("oracle_score", "oracle_win_rate"), ("held-out oracle score", "held-out oracle win rate vs anchor")):
        befores = [next(iter(r["frontier"].values()))["ppo_pairwise"]["before"][key] for r in results.values()]
        ax.axhline(sum(befores) / len(befores), color="0.5", linestyle="--", linewidth=1, label="before PPO (mean)")
        for g, (arm, label) in enumerate(arms.items()):
            color, by_coef = colors[g % len(colors)], {}
            for r in results.values():
                pts = sorted((run[arm]["after"]["kl"], run[arm]["after"][key]) for run in r["frontier"].values() if arm in run)
                ax.plot(*zip(*pts), color=color, linewidth=0.8, alpha=0.35, marker=".")
                for c, run in r["frontier"].items():
                    by_coef.setdefault(float(c), []).append((run[arm]["after"]["kl"], run[arm]["after"][key]) if arm in run else None)
            points = [[p for p in ps if p] for _, ps in sorted(by_coef.items())]    # per coefficient: seeds' (kl, y)
            mean = [(statistics.mean(x for x, _ in ps), statistics.mean(y for _, y in ps),
                     _std([x for x, _ in ps]), _std([y for _, y in ps])) for ps in points if ps]
            xs, ys, dx, dy = zip(*mean)
            ax.errorbar(xs, ys, xerr=dx, yerr=dy, color=color, linewidth=2.2, marker="o", capsize=3,
                        label=f"{label} (mean of {len(results)} seeds)")
        ax.set(title=name, xlabel="KL(pi || pi_ref), exact, summed over the response (held-out)", ylabel=key, xscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, plt, out_path, title)


def _std(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib, an optional extra: pip install 'nanopairwise[plot]' "
                         "(or pip install matplotlib)") from None
    return plt


def _save(fig, plt, out_path: str, title: str = None) -> str:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)  # atomic: a reader never sees half a PNG
    return out_path


def main(argv=None):
    args = get_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    groups = {}
    for label, run_dir in zip(labels, args.run_dirs):
        groups.setdefault(label, []).append(run_dir)
    print(f"wrote {plot_groups(groups, args.out, args.title)}")


if __name__ == "__main__":
    main()
