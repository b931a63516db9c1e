"""Per-principle pass rates of a policy on the principle-following task's held-out prompts.

    python scripts/pass_rates.py --policy ~/.cache/nanopairwise/smollm2-135m-instruct --n 32
    python scripts/pass_rates.py --policy RUN/checkpoint/policy --prompts TASK/rl_test.jsonl --n 32

One sample per prompt at --temperature (the training temperature, 1.0), stopping at the end of the
assistant turn; prints the oracle's mean score and, per check kind, the share of responses that
meet it among the prompts that have it ("all": every check of the prompt met), and writes them
with every sample to --out. Without --prompts the held-out prompts are drawn as the task's
bootstrap draws them (principles_task.make_prompt, test split, --seed), so two policies compared
with one seed read the same prompts. The same numbers, for the initial policy, are in the task's
task.json ("initial_policy").
"""

import argparse
import json
import os
import random

import torch

from nanopairwise import data, principles_task
from nanopairwise.common import atomic_write_text


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="HF directory of the policy (its tokenizer and chat template)")
    p.add_argument("--prompts", default=None, help="rl_test.jsonl of a principles task (default: draw --n prompts)")
    p.add_argument("--n", type=int, default=32, help="held-out prompts to sample (the first N of --prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn prompts and of the samples")
    p.add_argument("--max-new-tokens", type=int, default=principles_task.PrinciplesConfig.max_new_tokens, help="response budget")
    p.add_argument("--batch-size", type=int, default=32, help="rows per generation batch")
    p.add_argument("--out", default=None, help="JSON file for the numbers and samples (default: none)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n {args.n}: need at least one prompt")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.prompts:
        records = [{"prompt": r["prompt"], **{k: r[k] for k in ("question", "checks")}}
                   for r in data.read_jsonl(args.prompts)[:args.n]]
    else:
        rng = random.Random(args.seed)
        records = [principles_task.make_prompt(rng, "test") for _ in range(args.n)]
    model, tok = principles_task.load_policy(args.policy)
    cfg = principles_task.PrinciplesConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    found = principles_task.probe(model, tok, records, cfg, args.seed)
    print(f"{args.policy}: {found['n']} held-out prompts, oracle score {found['oracle_score']:.3f}")
    for kind, rate in found["pass_rates"].items():
        print(f"  {kind:<13} {rate:.2f}  ({found['counts'][kind]} prompts)")
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), **found}, indent=2, ensure_ascii=False))
    return found


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
