"""Run train_rm.py / train_ppo.py on bad inputs and faults, and write what each gets to docs/FAULTS.md.

    python scripts/faults.py                       # bootstraps a tiny task in a temp dir (a few minutes)
    python scripts/faults.py --task-dir runs/task  # reuse a bootstrapped task (only its policy and files are read)

Every case is a real run of the script as a user would start it (a subprocess, so the exit status
and the output are the ones a shell sees). The table records the exit status, the last line of
the output (stderr, else stdout) with the temp directory shown as `$W`, and whether a Python
traceback through our code was printed (torchrun's launcher always prints one of its own). Nothing in the table is typed by hand.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
OUR_FRAME = re.compile(r'File "[^"]*(train_rm\.py|train_ppo\.py|nanopairwise/)')
RM_FAST = ["--batch-size", "8", "--eval-batch-size", "32", "--warmup-steps", "1"]
PPO_FAST = ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--eval-size", "4", "--ppo-epochs", "1", "--minibatches", "2", "--anchor-samples", "2"]


def jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(cmd, w, env=None):
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    last = out[-1] if out else ""
    if "ChildFailedError" in proc.stderr:                     # torchrun: our line, then its summary's root cause
        ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        root = [line.strip() for line in proc.stderr.split("Root Cause")[-1].splitlines() if "traceback :" in line]
        last = f"{' / '.join(ours)} (printed {len(ours)}x); torchrun root cause: {root[0] if root else '?'}"
    traceback = bool(OUR_FRAME.search(proc.stderr))     # torchrun's launcher prints a traceback of its own
    return proc.returncode, last.replace(w, "$W"), traceback, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task-dir", default=None, help="a bootstrapped task (default: a tiny one, made in a temp dir)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "FAULTS.md"), help="the markdown file to write")
    args = p.parse_args()
    w = tempfile.mkdtemp(prefix="faults-")
    py = sys.executable
    task = os.path.join(w, "task")
    if args.task_dir:
        shutil.copytree(args.task_dir, task)
    else:
        from nanopairwise.bootstrap import BootstrapConfig, bootstrap
        bootstrap(task, seed=0, cfg=BootstrapConfig(sft_steps=20, sft_prompts=500, pair_prompts_train=48,
                                                     pair_prompts_test=16, rl_prompts_train=32, rl_prompts_test=8,
                                                     max_new_tokens=12))
    policy = os.path.join(task, "policy")
    rundir = os.path.join(w, "run")
    os.makedirs(rundir)
    os.symlink(task, os.path.join(rundir, "task"))
    print("training a tiny judge for the PPO cases")
    subprocess.run([py, "train_rm.py", "--task-dir", task, "--out-dir", os.path.join(rundir, "judge"), "--max-steps", "2",
                    *RM_FAST], cwd=ROOT, check=True, capture_output=True)
    # inputs
    pairs = os.path.join(task, "pairs_train.jsonl")
    big = "x " * 50_000                                                   # a 100k-character prompt
    f = lambda name, rows: jsonl(os.path.join(w, name), rows)
    empty, blank = f("empty.jsonl", []), f("blank.jsonl", ["", ""])
    ties, few = f("ties.jsonl", [{**PAIR, "rejected": "a"}] * 20), f("few.jsonl", [PAIR] * 7)
    bad = f("bad.jsonl", [PAIR] * 8 + ['{"prompt": "q", "chosen": 3, "rejected": "b"}'])
    long_pair = f("long.jsonl", [PAIR] * 3 + [{**PAIR, "prompt": big}] + [PAIR] * 8)
    long_prompt = f("long_prompts.jsonl", [{"prompt": "q", "anchor": "a"}] * 4 + [{"prompt": big}])
    few_prompts = f("few_prompts.jsonl", [{"prompt": "q", "anchor": "a"}] * 3)
    judge_swapped = os.path.join(w, "judge_swapped")                      # same size, two ids swapped
    shutil.copytree(os.path.join(rundir, "judge", "checkpoint"), judge_swapped)
    tj = json.load(open(os.path.join(judge_swapped, "tokenizer.json")))
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(tj, open(os.path.join(judge_swapped, "tokenizer.json"), "w"))
    readonly = f("a_file", ["x"])
    o = lambda name: ["--out-dir", os.path.join(w, "out", name)]
    rm = lambda *a: [py, "train_rm.py", "--model", policy, *RM_FAST, *a]
    ppo = lambda *a: [py, "train_ppo.py", "--run-dir", rundir, *PPO_FAST, *a]
    user_ppo = lambda *a: ppo("--policy", policy, "--prompts", os.path.join(task, "rl_train.jsonl"), *a)
    cases = [
        ("train_rm: missing --train-data file", rm("--train-data", os.path.join(w, "nope.jsonl"), *o("a"))),
        ("train_rm: --train-data is a directory", rm("--train-data", w, *o("a"))),
        ("train_rm: empty --train-data file", rm("--train-data", empty, *o("a"))),
        ("train_rm: every pair a tie", rm("--train-data", ties, *o("a"))),
        ("train_rm: fewer pairs than --batch-size", rm("--train-data", few, *o("a"))),
        ("train_rm: a malformed line", rm("--train-data", bad, *o("a"))),
        ("train_rm: a 100k-character prompt", rm("--train-data", long_pair, *o("a"))),
        ("train_rm: --eval-data with blank lines only", rm("--train-data", pairs, "--eval-data", blank, *o("a"))),
        ("train_rm: --out-dir not writable (under a file)", rm("--train-data", pairs, "--out-dir", readonly + "/o")),
        ("train_rm: --lr nan", rm("--train-data", pairs, "--lr", "nan", *o("a"))),
        ("train_rm: --batch-size 0", rm("--train-data", pairs, "--batch-size", "0", *o("a"))),
        ("train_rm: --lr 1e3 --warmup-steps 0 --save-every 1 (NaN gradient at step 2)",
         [py, "train_rm.py", "--task-dir", task, "--lr", "1e3", "--warmup-steps", "0", "--save-every", "1",
          "--max-steps", "4", "--batch-size", "8", *o("nan")]),
        ("train_rm under torchrun (2 ranks): a malformed line",
         [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *rm("--train-data", bad, *o("a"))[1:]]),
        ("train_ppo: --max-new-tokens 0", ppo("--max-new-tokens", "0", *o("p"))),
        ("train_ppo: --kl-coef nan", ppo("--kl-coef", "nan", *o("p"))),
        ("train_ppo: fewer prompts than --prompts-per-step",
         ppo("--policy", policy, "--prompts", few_prompts, *o("p"))),
        ("train_ppo: a 100k-character prompt", ppo("--policy", policy, "--prompts", long_prompt, *o("p"))),
        ("train_ppo: --eval-prompts with blank lines only", user_ppo("--eval-prompts", blank, *o("p"))),
        ("train_ppo: judge tokenizer of the policy's size, two ids swapped", user_ppo("--judge", judge_swapped, *o("p"))),
        ("train_ppo: --lr 3 (the policy diverges)", ppo("--lr", "3", "--save-every", "1", *o("lr3"))),
    ]
    rows = []
    for name, cmd in cases:
        rc, last, tb, dt = run(cmd, w)
        print(f"{name}: exit {rc} ({dt:.0f} s): {last}")
        rows.append((name, rc, last, tb))
    # a second run on a --out-dir in use, then the same directory after that run was killed (-9)
    lock_dir = os.path.join(w, "out", "locked")
    holder = subprocess.Popen([py, "-c", "import time; from nanopairwise.rundir import RunLock; "
                               f"lock = RunLock({lock_dir!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    rc, last, tb, _ = run(rm("--train-data", pairs, "--out-dir", lock_dir, "--max-steps", "1"), w)
    rows.append(("train_rm: a second run on an --out-dir in use", rc, re.sub(r"pid \d+", "pid N", last), tb))
    holder.kill()
    holder.wait()
    os.makedirs(os.path.join(lock_dir, ".checkpoint.tmp-0123abcd"))      # as a write killed mid-way leaves it
    proc = subprocess.run(rm("--train-data", pairs, "--out-dir", lock_dir, "--max-steps", "1"), cwd=ROOT,
                          capture_output=True, text=True)
    notes = [line.replace(w, "$W") for line in proc.stdout.splitlines() if line.startswith(("note: taking", "removed"))]
    rows.append(("train_rm: the same --out-dir after that run was killed (kill -9), a killed write's temp dir left",
                 proc.returncode, re.sub(r"pid \d+", "pid N", " / ".join(notes)), bool(OUR_FRAME.search(proc.stderr))))
    write_table(args.out, rows)
    shutil.rmtree(w, ignore_errors=True)


def write_table(path, rows):
    head = (f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}; produced by `python scripts/faults.py`.")
    lines = [head, "", "| fault | exit | our traceback | what it gets (last line; `$W` = the temp dir) |", "|---|---|---|---|"]
    for name, rc, last, tb in rows:
        lines.append(f"| {name} | {rc} | {'yes' if tb else 'no'} | {last.replace('|', '/')} |")
    table = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else "<!-- faults:start -->\n<!-- faults:end -->\n"
    start, end = text.index("<!-- faults:start -->"), text.index("<!-- faults:end -->")
    text = text[:start] + "<!-- faults:start -->\n" + table + "\n" + text[end:]
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
