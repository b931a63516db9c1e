"""Pairwise-RL against the Bradley-Terry baselines on the built-in task, over several seeds.

    python scripts/compare.py                      # seeds 0 1 2: results.json + the README table
    python scripts/compare.py --seeds 0 --no-readme
    python scripts/compare.py --seeds 0 1 2 3 4 --jobs 2   # two seeds at a time, one thread each
    python scripts/compare.py --smoke              # tiny task and runs: checks the plumbing (the test)
    python scripts/compare.py --plot-only          # redraw the figure from finished run dirs, no training
    python scripts/compare.py --arm 'grpo-group=--reward pairwise-group --advantage-estimator grpo'   # one more arm

Per seed, in RUN_DIR/seed<S> (a finished stage is skipped, so an interrupted run continues):
  task/         bootstrap: tokenizer, SFT policy, preference pairs, RL prompts (nanopairwise/bootstrap.py)
  judge/, bt/   train_rm.py: the generative pairwise judge and the BT reward model, same pairs and steps
  ppo_pairwise/ train_ppo.py --reward pairwise: judge win probability against the gold anchor, pairwise critic
  ppo_bt/       train_ppo.py --reward bt: normalised BT scalar reward, standard critic from the RM
  ppo_bt-anchor/ train_ppo.py --reward bt-anchor: the BT model's win probability against the same
                anchor, sigmoid(r(x, y) - r(x, y*)), standard critic; every other setting shared
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
import multiprocessing
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
from nanopairwise.pipeline import run_seed as run_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE = os.path.join(ROOT, "docs", "compare.png")
FIGURE_MD = ("\n![Pairwise-RL vs the Bradley-Terry arms (bt, bt-anchor) over PPO steps, and the reward models' reliability diagrams]"
             "(docs/compare.png)\n\n")
METHODS = {"Pairwise-RL (generative judge + pairwise PPO)": ("judge", "ppo_pairwise"),  # label: (RM dir, PPO dir)
           "Bradley-Terry RM + standard PPO": ("bt", "ppo_bt"),
           "BT anchor win prob (BT RM, sigmoid(r(y) - r(y*)) + standard PPO)": ("bt", "ppo_bt-anchor")}

README_START, README_END = "<!-- compare:start -->", "<!-- compare:end -->"
SMOKE_RM = ["--max-steps", "2", "--batch-size", "8"]
SMOKE_PPO = ["--steps", "2", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
             "--eval-size", "4", "--ppo-epochs", "1"]


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
    args.arm = [arm.split("=", 1) for arm in args.arm]
    if any(len(arm) != 2 or not re.fullmatch(r"[\w.-]+", arm[0]) for arm in args.arm):
        p.error("--arm takes NAME=FLAGS with a NAME of letters, digits, '.', '_' or '-'")
    # the table's rows and the figure's groups: each arm with the judge's RM columns unless its reward is a BT one
    args.methods = METHODS | {name: ("bt" if re.search(r"--reward[ =]bt", flags) else "judge", f"ppo_{name}")
                              for name, flags in args.arm}
    return args


def _worker_threads(threads: int):
    """Pool initializer: this worker's torch (and every train_*.py it runs) uses `threads` threads."""
    os.environ["NANOPAIRWISE_NUM_THREADS"] = str(threads)  # what compute_init() in the train_*.py children then sets
    torch.set_num_threads(threads)


def run_seeds(args) -> dict:
    """{seed: run_seed(seed)} in order; --jobs > 1 runs the seeds in a pool of spawned processes."""
    if args.jobs == 1 or len(args.seeds) == 1:
        return {seed: run_seed(seed, args) for seed in args.seeds}
    jobs = min(args.jobs, len(args.seeds))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with multiprocessing.get_context("spawn").Pool(jobs, _worker_threads, (threads,)) as pool:
        return dict(zip(args.seeds, pool.starmap(run_seed, [(seed, args) for seed in args.seeds], chunksize=1)))


def run_seed(seed, args) -> dict:
    """All stages for one seed (nanopairwise/pipeline.py); {"judge": eval, "bt": eval, "ppo_<reward>": history}."""
    return run_pipeline(os.path.join(args.run_dir, f"seed{seed}"), seed, args.smoke, SMOKE_RM if args.smoke else [],
                        (SMOKE_PPO if args.smoke else []) + args.ppo_args.split(),
                        [(name, shlex.split(flags)) for name, flags in args.arm])


def mean_std(values, signed: bool = False) -> str:
    """'mean ± std' over the seeds; a metric that is null in some runs (NaN/inf, written as JSON null)
    is averaged over the others and says so, 'n/a' where it is null everywhere."""
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return f"{mean_std(known, signed)} ({len(known)} of {len(values)} runs)" if known else "n/a"
    mean = f"{statistics.mean(values):{'+' if signed else ''}.3f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f}"


def table(results: dict, seconds: float, command: str = "python scripts/compare.py", methods=METHODS) -> str:
    """The header line (seeds, machine, date, time, command), then body(results)."""
    cpu = platform.processor() or platform.machine()
    head = (f"Seeds {', '.join(map(str, sorted(results)))} (mean ± std), {os.cpu_count()}-core CPU ({cpu}), torch "
            f"{torch.__version__}, {datetime.date.today()}, {seconds / 60:.0f} min; produced by `{command}`.")
    return head + "\n\n" + body(results, methods)


def header_command(argv: list) -> str:
    """The command line for the table's header without paths of the machine that ran it: --run-dir
    relative to the repository when inside it, else left out (a reader reruns with the default)."""
    words = [w for arg in argv for w in (arg.split("=", 1) if arg.startswith("--run-dir=") else [arg])]
    if "--run-dir" in words[:-1]:
        i = words.index("--run-dir")
        rel = os.path.relpath(os.path.abspath(words[i + 1]), ROOT)
        words[i:i + 2] = [] if rel.startswith("..") else ["--run-dir", rel]
    return shlex.join(["python", "scripts/compare.py", *words])


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
    return ("| method | RM oracle accuracy | RM ECE | RM position consistency | oracle score before → after "
            "| oracle win rate vs anchor before → after | KL to reference |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nPer seed, Pairwise-RL after PPO minus each other arm after PPO (mean ± std of "
            "the paired differences, and on how many seeds Pairwise-RL is higher):\n\n"
            "| Pairwise-RL minus | oracle score | seeds higher | oracle win rate | seeds higher |\n|---|---|---|---|---|\n"
            + "\n".join(diffs) + "\n")


def write_readme(text: str, path=os.path.join(ROOT, "README.md")):
    readme = open(path, encoding="utf-8").read()
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"{path}: no {README_START} ... {README_END} markers to put the table between")
    before, rest = readme.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    atomic_write_text(path, f"{before}{README_START}\n{text}{README_END}{after}")


def draw(args) -> list:
    """The figure from the seeds' run directories: RUN_DIR/compare.png, and docs/compare.png unless --no-readme."""
    groups = {label.split(" (")[0]: [os.path.join(args.run_dir, f"seed{s}", d) for s in args.seeds for d in dirs]
              for label, dirs in args.methods.items()}
    missing = [d for dirs in groups.values() for d in dirs if not os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if missing:
        raise SystemExit(f"--plot-only: no finished runs in {', '.join(missing)}; run scripts/compare.py first")
    title = f"built-in task, seeds {', '.join(map(str, args.seeds))}: Pairwise-RL vs the Bradley-Terry arms (scripts/compare.py)"
    outs = [plot.plot_groups(groups, os.path.join(args.run_dir, "compare.png"), title)]
    if not args.no_readme:
        outs.append(plot.plot_groups(groups, FIGURE, title))
    for out in outs:
        print(f"wrote {out}")
    return outs


def main(argv=None):
    args = get_args(argv)
    results_md = os.path.join(args.run_dir, "results.md")
    if args.plot_only:
        outs = draw(args)
        if os.path.exists(results_md):  # the table of the same runs (printed; with the figure into the README)
            text = open(results_md, encoding="utf-8").read()
            results_json = os.path.join(args.run_dir, "results.json")
            if os.path.exists(results_json):  # re-rendered from the numbers of --seeds; time and command as they were
                results = {int(k): v for k, v in json.load(open(results_json)).items()}
                if set(args.seeds) - set(results):
                    raise SystemExit(f"--plot-only: {results_json} has no results for seeds "
                                     f"{sorted(set(args.seeds) - set(results))}; run scripts/compare.py with them")
                head = re.sub(r"produced by `python scripts/compare.py(.*)`",   # written before paths were left out
                              lambda m: f"produced by `{header_command(shlex.split(m.group(1)))}`",
                              text.split("\n\n", 1)[0])
                if sorted(results) != sorted(args.seeds):
                    head = re.sub(r"^Seeds [\d, ]+", f"Seeds {', '.join(map(str, args.seeds))} (of the runs below) ", head)
                text = head + "\n\n" + body({s: results[s] for s in args.seeds}, args.methods)
            print("\n" + text)
            if not args.no_readme:
                write_readme(text + FIGURE_MD)
        return outs
    t0 = time.time()
    results = run_seeds(args)
    text = table(results, time.time() - t0, header_command(argv if argv is not None else sys.argv[1:]), args.methods)
    os.makedirs(args.run_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.run_dir, "results.json"), json.dumps(results, indent=2))
    atomic_write_text(results_md, text)
    print("\n" + text)
    draw(args)  # without matplotlib this stops here; install it and rerun with --plot-only
    if not args.no_readme:
        write_readme(text + FIGURE_MD)
    return results


if __name__ == "__main__":
    main()
