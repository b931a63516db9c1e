"""Pairwise-RL against the Bradley-Terry baselines on the built-in task, over several seeds.

    python scripts/compare.py                      # seeds 0 1 2: results.json + the README table
    python scripts/compare.py --seeds 0 --no-readme
    python scripts/compare.py --seeds 0 1 2 3 4 --jobs 2   # two seeds at a time, one thread each
    python scripts/compare.py --smoke              # tiny task and runs: checks the plumbing (the test)
    python scripts/compare.py --plot-only          # redraw the figure from finished run dirs, no training
    python scripts/compare.py --arm 'grpo-group=--reward pairwise-group --advantage-estimator grpo'   # one more arm
    python scripts/compare.py --kl-coefs 0.02 0.05 0.2 0.5 --jobs 2   # the KL frontier: every arm at each coefficient

Per seed, in RUN_DIR/seed<S> (a finished stage is skipped, so an interrupted run continues):
  task/         bootstrap: tokenizer, SFT policy, preference pairs, RL prompts (nanopairwise/bootstrap.py)
  judge/, bt/   train_rm.py: the generative pairwise judge and the BT reward model, same pairs and steps
  ppo_pairwise/ train_ppo.py --reward pairwise: judge win probability against the gold anchor, pairwise critic
  ppo_bt/       train_ppo.py --reward bt: normalised BT scalar reward, standard critic from the RM
  ppo_bt-anchor/ train_ppo.py --reward bt-anchor: the BT model's win probability against the same
                anchor, sigmoid(r(x, y) - r(x, y*)), standard critic; every other setting shared
With --kl-coefs, every arm runs at each coefficient instead, in RUN_DIR/seed<S>/kl<C>/ppo_<arm>/
(the seed's task and reward models shared), and the report is the KL frontier: held-out oracle score
and oracle win rate against the exact held-out KL (nanopairwise/evaluation.py), per arm, and the
arms compared at matched KL (each seed's frontier interpolated at --kl-levels; frontier_tables),
with the figure docs/frontier.png (plot.plot_frontier). Runs are ordered coefficient by
coefficient, so an interrupted sweep has whole coefficients; rerunning continues it.
The bt-anchor arm separates the judge from the anchor: it has Pairwise-RL's bounded, anchor-relative
reward but a scalar RM. All PPO runs start from the same SFT policy and are evaluated on the same held-out prompts with the
same sampling seed, so "before" is shared. Everything is measured against the task's oracle.
The table (mean ± sample std over seeds) goes to RUN_DIR/results.md and, unless --no-readme,
between the compare markers of README.md, with the machine and the date. The figure (scripts/plot.py:
reward, KL, oracle score and win rate over PPO steps, RM loss, RM reliability diagram; needs
matplotlib) goes next to it, RUN_DIR/compare.png, and unless --no-readme to docs/compare.png, shown
under the README table. --plot-only redraws it from the run directories alone (every stage
finished), and puts the same runs' table (re-rendered from RUN_DIR/results.json, with the header
line of RUN_DIR/results.md) and the figure into the README.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time

import torch

import plot  # scripts/plot.py (this script's own directory is on sys.path)
from nanopairwise.common import atomic_write_text
from nanopairwise.evaluation import value_at
from nanopairwise.pipeline import default_arms, pool_map, prepare_seed, run_arm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE = os.path.join(ROOT, "docs", "compare.png")
FIGURE_MD = ("\n![Pairwise-RL vs the Bradley-Terry arms (bt, bt-anchor) over PPO steps, and the reward models' reliability diagrams]"
             "(docs/compare.png)\n\n")
METHODS = {"Pairwise-RL (generative judge + pairwise PPO)": ("judge", "ppo_pairwise"),  # label: (RM dir, PPO dir)
           "Bradley-Terry RM + standard PPO": ("bt", "ppo_bt"),
           "BT anchor win prob (BT RM, sigmoid(r(y) - r(y*)) + standard PPO)": ("bt", "ppo_bt-anchor")}
FRONTIER = os.path.join(ROOT, "docs", "frontier.png")
FRONTIER_MD = ("\n![Held-out oracle score and oracle win rate against the exact held-out KL, one curve per arm "
               "(scripts/compare.py --kl-coefs)](docs/frontier.png)\n\n")
ARMS = {"ppo_pairwise": "Pairwise-RL", "ppo_bt": "BT + standard PPO", "ppo_bt-anchor": "BT anchor win prob"}
README_START, README_END = "<!-- compare:start -->", "<!-- compare:end -->"
SMOKE_RM = ["--max-steps", "2", "--batch-size", "8"]
SMOKE_PPO = ["--steps", "2", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
             "--eval-size", "4", "--ppo-epochs", "1",
             "--reward-norm", "none"]  # a 2-step BT model scores every response alike: no spread to divide by


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run (default 0 1 2); --plot-only: default every seed of RUN_DIR/results.json")
    p.add_argument("--run-dir", default="runs/compare", help="one subdirectory per seed")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--smoke", action="store_true", help="tiny task and runs (plumbing only; implies --no-readme)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run in parallel, each in its own process with cores/jobs threads (a tiny model "
                        "gains little from a second thread, so 2 jobs on 2 cores nearly halve the time)")
    p.add_argument("--ppo-args", default="", help="extra train_ppo.py flags for every arm, e.g. '--steps 60'")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more PPO arm per seed, in ppo_NAME: train_ppo.py FLAGS after --ppo-args, e.g. "
                        "'rloo=--advantage-estimator rloo' (repeatable; --plot-only needs the same --arm)")
    p.add_argument("--kl-coefs", type=float, nargs="+", default=None,
                   help="run every arm at each of these --kl-coef values (the KL frontier) instead of once")
    p.add_argument("--kl-levels", type=float, nargs="+", default=None,
                   help="KL values at which the arms are compared, each seed's frontier interpolated (default: "
                        "three, evenly spaced in log KL inside the range every seed and arm reached)")
    p.add_argument("--curves-kl-coef", type=float, default=None,
                   help="with --kl-coefs: the coefficient whose runs compare.png shows over PPO steps (default: the median)")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw the figure from the finished run directories under --run-dir (no training)")
    args = p.parse_args(argv)
    args.no_readme = args.no_readme or args.smoke
    if args.seeds is None:
        results_json = os.path.join(args.run_dir, "results.json")
        args.seeds = (sorted(int(k) for k in json.load(open(results_json))) if args.plot_only and
                      os.path.exists(results_json) else [0, 1, 2])
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    args.arm, args.methods, args.arms = parse_arms(p, args.arm)
    if args.kl_coefs and (min(args.kl_coefs) < 0 or len(set(args.kl_coefs)) < len(args.kl_coefs)):
        p.error(f"--kl-coefs must be distinct and >= 0, got {args.kl_coefs}")
    if args.kl_coefs and any("--kl-coef" in shlex.split(f) for f in [args.ppo_args] + [f for _, f in args.arm]):
        p.error("--ppo-args or an --arm sets --kl-coef, which --kl-coefs sets per run; leave it out")
    return args


def parse_arms(p, specs: list):
    """--arm NAME=FLAGS strings -> ([[NAME, FLAGS]], METHODS and ARMS with each arm added): the
    table's rows and the figure's groups (each arm with the judge's RM columns unless its reward is
    a BT one), the frontier's curves and columns. A malformed one is a p.error."""
    arms = [arm.split("=", 1) for arm in specs]
    if any(len(arm) != 2 or not re.fullmatch(r"[\w.-]+", arm[0]) for arm in arms):
        p.error("--arm takes NAME=FLAGS with a NAME of letters, digits, '.', '_' or '-'")
    methods = METHODS | {name: ("bt" if re.search(r"--reward[ =]bt", flags) else "judge", f"ppo_{name}")
                         for name, flags in arms}
    return arms, methods, ARMS | {f"ppo_{name}": name for name, _ in arms}


def run_seeds(args) -> dict:
    """{seed: {"judge": eval, "bt": eval, "ppo_<arm>": history, ...}}: every seed's task and reward
    models first (a seed per job), then every PPO run (a run per job, nanopairwise/pipeline.py):
    once per arm, or with --kl-coefs at each coefficient, coefficient by coefficient, under "frontier"."""
    results = dict(zip(args.seeds, pool_map(prepare, [(s, args) for s in args.seeds], args.jobs)))
    arms = default_arms() + [(name, shlex.split(flags)) for name, flags in args.arm]
    units = [(seed, coef, name, flags, args) for coef in args.kl_coefs or [None] for seed in args.seeds
             for name, flags in arms]
    for (seed, coef, name, _, _), history in zip(units, pool_map(run_ppo, units, args.jobs)):
        where = results[seed] if coef is None else results[seed].setdefault("frontier", {}).setdefault(f"{coef:g}", {})
        where[f"ppo_{name}"] = history
    return results


def prepare(seed, args) -> dict:
    """The seed's task and both reward models (pipeline.prepare_seed): {"judge": eval, "bt": eval}."""
    return prepare_seed(os.path.join(args.run_dir, f"seed{seed}"), seed, args.smoke, SMOKE_RM if args.smoke else [])


def run_ppo(seed, coef, name, flags, args) -> dict:
    """One PPO run of the seed (pipeline.run_arm): --kl-coef `coef` in kl<coef>/ (None: the default)."""
    kl = [] if coef is None else ["--kl-coef", f"{coef:g}"]
    return run_arm(os.path.join(args.run_dir, f"seed{seed}"), seed, name,
                   (SMOKE_PPO if args.smoke else []) + args.ppo_args.split() + kl + list(flags),
                   "" if coef is None else f"kl{coef:g}")


def with_costs(results: dict, run_dir: str) -> dict:
    """Each PPO run's history gains "cost": its mean wall seconds per step and judge rows per step
    (metrics.jsonl's perf/ms, perf/judge_rows; None where not logged): compute beside the score."""
    for seed, r in results.items():
        runs = [("", r)] + [(f"kl{c}", runs) for c, runs in r.get("frontier", {}).items()]
        for sub, where in runs:
            for name, history in where.items():
                path = os.path.join(run_dir, f"seed{seed}", sub, name, "metrics.jsonl")
                if name.startswith("ppo_") and os.path.exists(path):
                    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
                    steps = [row for row in rows if "perf/ms" in row]                   # training steps
                    mean = lambda k: statistics.mean(row[k] for row in steps) if all(k in row for row in steps) else None
                    history["cost"] = {"step_s": statistics.mean(row["perf/ms"] for row in steps) / 1000 if steps else None,
                                       "judge_rows": mean("perf/judge_rows") if steps else None}
    return results


def mean_std(values, signed: bool = False, digits: int = 3) -> str:
    """'mean ± std' over the seeds; a metric that is null in some runs (NaN/inf, written as JSON null)
    is averaged over the others and says so, 'n/a' where it is null everywhere."""
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return f"{mean_std(known, signed, digits)} ({len(known)} of {len(values)} runs)" if known else "n/a"
    mean = f"{statistics.mean(values):{'+' if signed else ''}.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict, seconds: float, command: str = "python scripts/compare.py", methods=METHODS, arms=ARMS,
          levels=None) -> str:
    """The header line (seeds, machine, date, time, command), then report(results, ...)."""
    cpu = platform.processor() or platform.machine()
    head = (f"Seeds {', '.join(map(str, sorted(results)))} (mean ± std), {os.cpu_count()}-core CPU ({cpu}), torch "
            f"{torch.__version__}, {datetime.date.today()}, {seconds / 60:.0f} min; produced by `{command}`.")
    return head + "\n\n" + report(results, methods, arms, levels)


def is_frontier(results: dict) -> bool:
    return any("frontier" in r for r in results.values())


def report(results: dict, methods=METHODS, arms=ARMS, levels=None) -> str:
    """The tables: the KL frontier's (at `levels`, default default_kl_levels) or the one-coefficient
    body; then the reward models' (rm_table)."""
    if is_frontier(results):
        return frontier_tables(results, levels or default_kl_levels(results, arms), arms) + "\n" + rm_table(results)
    return body(results, methods) + "\n" + rm_table(results)


def header_command(argv: list, script: str = "scripts/compare.py") -> str:
    """The command line for the table's header without paths of the machine that ran it: --run-dir
    relative to the repository when inside it, else left out (a reader reruns with the default)."""
    words = [w for arg in argv for w in (arg.split("=", 1) if arg.startswith("--run-dir=") else [arg])]
    if "--run-dir" in words[:-1]:
        i = words.index("--run-dir")
        rel = os.path.relpath(os.path.abspath(words[i + 1]), ROOT)
        words[i:i + 2] = [] if rel.startswith("..") else ["--run-dir", rel]
    return shlex.join(["python", script, *words])


def body(results: dict, methods=METHODS) -> str:
    """Markdown table of the per-seed results (mean ± sample std over seeds), then the per-seed
    differences between Pairwise-RL and each other arm, which share a seed's task, SFT policy and
    held-out prompts (paired differences carry a claim better than overlapping means)."""
    seeds = sorted(results)
    col = lambda f: mean_std([f(results[s]) for s in seeds])
    rows = []
    for label, (rm, ppo) in methods.items():
        rows.append("| " + " | ".join([
            label, col(lambda r: r[rm]["oracle_accuracy"]), col(lambda r: r[rm]["ece"]),
            col(lambda r: r[rm]["position_consistency"]),
            f"{col(lambda r: r[ppo]['before']['oracle_score'])} → {col(lambda r: r[ppo]['after']['oracle_score'])}",
            f"{col(lambda r: r[ppo]['before']['oracle_win_rate'])} → {col(lambda r: r[ppo]['after']['oracle_win_rate'])}",
            col(lambda r: r[ppo]["after"]["kl"])]) + " |")
    main_rm, main_ppo = next(iter(methods.values()))
    diffs = []
    for label, (rm, ppo) in list(methods.items())[1:]:
        cells = [label.split(" (")[0]]
        for key in ("oracle_score", "oracle_win_rate"):
            d = [results[s][main_ppo]["after"][key] - results[s][ppo]["after"][key] for s in seeds
                 if results[s][main_ppo]["after"].get(key) is not None and results[s][ppo]["after"].get(key) is not None]
            cells += [mean_std(d, signed=True) if d else "n/a", f"{sum(round(x, 6) > 0 for x in d)} of {len(d)}"]  # not float noise
        diffs.append("| " + " | ".join(cells) + " |")
    paired = ("\n\nPer seed, Pairwise-RL after PPO minus each other arm after PPO (mean ± std of "
            "the paired differences, and on how many seeds Pairwise-RL is higher):\n\n"
            "| Pairwise-RL minus | oracle score | seeds higher | oracle win rate | seeds higher |\n|---|---|---|---|---|\n"
            + "\n".join(diffs) + "\n") if diffs else "\n"   # none with Pairwise-RL alone
    return ("| method | RM oracle accuracy | RM ECE | RM position consistency | oracle score before → after "
            "| oracle win rate vs anchor before → after | KL to reference |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + paired)


def rm_table(results: dict) -> str:
    """The reward models on held-out pairs (mean ± std over seeds): oracle accuracy, ECE over both
    orientations of every pair, and the judge's position consistency beside its parts (judge.order_metrics)."""
    seeds = sorted(results)
    col = lambda rm, key: mean_std([results[s][rm].get(key) for s in seeds])
    rows = []
    for label, rm in (("generative pairwise judge", "judge"), ("Bradley-Terry RM", "bt")):
        parts = ([col(rm, "independent_consistency"), f"{col(rm, 'accuracy_chosen_first')} / "
                  f"{col(rm, 'accuracy_chosen_second')}", col(rm, "yes_rate")] if rm == "judge"
                 else ["1 (by construction)", "—", "—"])
        rows.append("| " + " | ".join([label, col(rm, "oracle_accuracy"), col(rm, "ece"),
                                       col(rm, "position_consistency"), *parts]) + " |")
    return ("| reward model | oracle accuracy | ECE (both orientations) | position consistency | consistency if the "
            "orders erred independently | accuracy chosen first / second | Yes rate |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def frontier_points(results: dict, seed, arm: str, key: str) -> list:
    """[(held-out KL, held-out `key`), ...] after PPO, one per --kl-coefs value the seed's arm finished."""
    runs = results[seed].get("frontier", {}).values()
    return [(r[arm]["after"]["kl"], r[arm]["after"][key]) for r in runs if arm in r and r[arm]["after"].get(key) is not None]


def default_kl_levels(results: dict, arms=ARMS, n: int = 3) -> list:
    """n KL values evenly spaced in log KL inside the range that every seed's every arm reached
    (so each is read off every frontier by interpolation, never extrapolated); [] if there is none."""
    ranges = [[kl for kl, _ in frontier_points(results, s, arm, "oracle_score")] for s in results for arm in arms]
    if not all(ranges):
        return []
    lo, hi = max(max(min(r), 1e-3) for r in ranges), min(max(r) for r in ranges)
    if lo >= hi:
        return []
    return sorted({float(f"{lo * (hi / lo) ** f:.2g}") for f in ((0.5 + i) / n for i in range(n))})


def frontier_tables(results: dict, levels: list, arms=ARMS) -> str:
    """Per coefficient, each arm's held-out KL, oracle score and win rate (mean ± std over seeds);
    then, at each matched KL level, each arm's values read off its own per-seed frontier, and
    Pairwise-RL minus each other arm (paired per seed, with on how many seeds it is ahead)."""
    seeds = sorted(results)
    coefs = sorted({c for s in seeds for c in results[s].get("frontier", {})}, key=float)
    lines = ["| --kl-coef | arm | held-out KL | oracle score | oracle win rate | s / step | judge rows / step |",
             "|---|---|---|---|---|---|---|"]
    for c in coefs:
        for arm, label in arms.items():
            runs = [results[s]["frontier"][c][arm] for s in seeds if arm in results[s]["frontier"].get(c, {})]
            cells = [mean_std([r["after"].get(k) for r in runs]) if runs else "n/a"
                     for k in ("kl", "oracle_score", "oracle_win_rate")]
            cells += [mean_std([r.get("cost", {}).get(k) for r in runs], digits=d) if runs else "n/a"
                      for k, d in (("step_s", 1), ("judge_rows", 0))]
            lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    before = lambda key: mean_std([next(iter(results[s]["frontier"].values()))["ppo_pairwise"]["before"][key]
                                   for s in seeds])   # the initial policy, shared by every run of a seed
    lines.append(f"\nBefore PPO: oracle score {before('oracle_score')}, oracle win rate {before('oracle_win_rate')}.")
    others = list(arms)[1:]
    for key, name in (("oracle_score", "oracle score"), ("oracle_win_rate", "oracle win rate")):
        lines += [f"\nAt matched held-out KL, {name} (each seed's frontier interpolated linearly in KL; Pairwise-RL "
                  "minus each other arm paired per seed):\n",
                  "| KL | " + " | ".join(arms.values()) + " | " + " | ".join(f"Pairwise-RL − {arms[a]} | seeds ahead"
                                                                    for a in others) + " |",
                  "|---" * (1 + len(arms) + 2 * len(others)) + "|"]
        for level in levels:
            at = {arm: {s: value_at(frontier_points(results, s, arm, key), level) for s in seeds} for arm in arms}
            cells = [mean_std(list(at[arm].values())) for arm in arms]
            for arm in others:
                d = [at["ppo_pairwise"][s] - at[arm][s] for s in seeds if None not in (at["ppo_pairwise"][s], at[arm][s])]
                cells += [mean_std(d, signed=True) if d else "n/a", f"{sum(round(x, 6) > 0 for x in d)} of {len(d)}"]
            lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme(text: str, path=os.path.join(ROOT, "README.md")):
    readme = open(path, encoding="utf-8").read()
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"{path}: no {README_START} ... {README_END} markers to put the table between")
    before, rest = readme.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    atomic_write_text(path, f"{before}{README_START}\n{text}{README_END}{after}")


def draw(args, results: dict = None) -> list:
    """The figures: with frontier `results` the KL frontier (plot.plot_frontier: RUN_DIR/frontier.png,
    and docs/frontier.png unless --no-readme); always the training curves and the reward models'
    reliability diagrams from the seeds' run directories (RUN_DIR/compare.png, and docs/compare.png),
    for a frontier those of the runs at --curves-kl-coef."""
    seeds, outs, sub, at = ", ".join(map(str, args.seeds)), [], "", ""
    if results and is_frontier(results):
        title = f"built-in task, seeds {seeds}: held-out oracle metrics vs exact held-out KL (scripts/compare.py --kl-coefs)"
        outs = [plot.plot_frontier(results, os.path.join(args.run_dir, "frontier.png"), args.arms, title)]
        outs += [] if args.no_readme else [plot.plot_frontier(results, FRONTIER, args.arms, title)]
        coefs = sorted({c for r in results.values() for c in r["frontier"]}, key=float)
        coef = f"{args.curves_kl_coef:g}" if args.curves_kl_coef is not None else coefs[len(coefs) // 2]
        sub, at = f"kl{coef}", f" at --kl-coef {coef}"
    groups = {label.split(" (")[0]: [os.path.join(args.run_dir, f"seed{s}", rm) for s in args.seeds] +
              [os.path.join(args.run_dir, f"seed{s}", sub, ppo) for s in args.seeds]
              for label, (rm, ppo) in args.methods.items()}
    missing = [d for dirs in groups.values() for d in dirs if not os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if missing:
        raise SystemExit(f"--plot-only: no finished runs in {', '.join(missing)}; run scripts/compare.py first")
    title = f"built-in task, seeds {seeds}: Pairwise-RL vs the other arms{at} (scripts/compare.py)"
    outs.append(plot.plot_groups(groups, os.path.join(args.run_dir, "compare.png"), title))
    outs += [] if args.no_readme else [plot.plot_groups(groups, FIGURE, title)]
    for out in outs:
        print(f"wrote {out}")
    return outs


def load_results(args):
    """--plot-only: RUN_DIR/results.json's results for --seeds (None without the file)."""
    results_json = os.path.join(args.run_dir, "results.json")
    if not os.path.exists(results_json):
        return None
    results = {int(k): v for k, v in json.load(open(results_json)).items()}
    if set(args.seeds) - set(results):
        raise SystemExit(f"--plot-only: {results_json} has no results for seeds "
                         f"{sorted(set(args.seeds) - set(results))}; run scripts/compare.py with them")
    return with_costs({s: results[s] for s in args.seeds}, args.run_dir)


def figure_md(results) -> str:
    return (FRONTIER_MD if results and is_frontier(results) else "") + FIGURE_MD


def main(argv=None):
    args = get_args(argv)
    results_md = os.path.join(args.run_dir, "results.md")
    if args.plot_only:
        results = load_results(args)
        outs = draw(args, results)
        if os.path.exists(results_md):  # the table of the same runs (printed; with the figure into the README)
            text = open(results_md, encoding="utf-8").read()
            if results:  # re-rendered from the numbers of --seeds; time and command as they were
                head = re.sub(r"produced by `python scripts/compare.py(.*)`",   # written before paths were left out
                              lambda m: f"produced by `{header_command(shlex.split(m.group(1)))}`",
                              text.split("\n\n", 1)[0])
                if len(results) < len(re.match(r"Seeds ([\d, ]+)", head).group(1).split(",")):
                    head = re.sub(r"^Seeds [\d, ]+", f"Seeds {', '.join(map(str, args.seeds))} (of the runs below) ", head)
                text = head + "\n\n" + report(results, args.methods, args.arms, args.kl_levels)
            print("\n" + text)
            if not args.no_readme:
                write_readme(text + figure_md(results))
        return outs
    t0 = time.time()
    results = with_costs(run_seeds(args), args.run_dir)
    text = table(results, time.time() - t0, header_command(argv if argv is not None else sys.argv[1:]), args.methods,
                 args.arms, args.kl_levels)
    os.makedirs(args.run_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.run_dir, "results.json"), json.dumps(results, indent=2))
    atomic_write_text(results_md, text)
    print("\n" + text)
    draw(args, results)  # without matplotlib this stops here; install it and rerun with --plot-only
    if not args.no_readme:
        write_readme(text + figure_md(results))
    return results


if __name__ == "__main__":
    main()
