"""The policy half of a PPO update on the CPU, under two settings of the process, each in its own
child process: the log-probs and entropy of a LoRA policy's sampled tokens, forward and backward,
as nanopairwise/ppo.py's ppo_update runs them.

    python scripts/bench_policy_update.py --model ~/.cache/nanopairwise/smollm2-135m-instruct  # memory: kept vs default
    python scripts/bench_policy_update.py --model ~/.cache/nanopairwise/smollm2-135m-instruct --compare kernels
    python scripts/bench_policy_update.py --smoke        # tiny random model (what the test runs)

--compare memory: freed memory kept for reuse (distributed.tune_cpu_process) against glibc's
default. glibc serves each allocation over 32 MiB with its own mmap and unmaps it on free, so a
(N, V) logits-sized tensor (512 x 49152 fp32: 96 MiB) page-faults in afresh every time it is
made, 4 KiB a page, zeroed by the kernel; in a VM each fault is costly. tune_cpu_process sets
M_MMAP_MAX = 0 and the largest M_TRIM_THRESHOLD, so such tensors come from the heap and freed
memory stays there. A process cannot switch that back for memory it already holds, hence the
child processes (NANOPAIRWISE_KEEP_FREED_MEMORY = 1 / 0).
--compare kernels: the token log-probs over 32-row chunks (nanopairwise/logprob_chunked.py, the
CPU's default) against the reference's whole-(N, V) passes (NANOPAIRWISE_KERNELS = chunked / ref).

The two settings alternate for --rounds rounds; each child does one untimed warm-up call, then
--steps timed calls, and reports ms per call and its peak resident set. Printed: the median per
setting, the ratio, and the peaks.
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_judge import cpu_name  # this script's own directory is on sys.path
from nanopairwise import gguf, lora
from nanopairwise.common import parse_dtype
from nanopairwise.distributed import tune_cpu_process
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.policy import PolicyLogprobs


# --compare -> the environment variable and its two values: (name, value) of the new setting, then the old
SETTINGS = {"memory": ("NANOPAIRWISE_KEEP_FREED_MEMORY", [("kept", "1"), ("default", "0")]),
            "kernels": ("NANOPAIRWISE_KERNELS", [("chunked", "chunked"), ("ref", "ref")])}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--rows", type=int, default=8, help="sequences per call (a PPO minibatch)")
    p.add_argument("--prompt-len", type=int, default=80, help="prompt tokens (chat template included)")
    p.add_argument("--new-tokens", type=int, default=64, help="response tokens scored")
    p.add_argument("--steps", type=int, default=3, help="timed calls per child process")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two settings (one child each)")
    p.add_argument("--compare", choices=sorted(SETTINGS), default="memory", help="what the two settings change")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--dtype", default="bf16", help="base weights (adapters fp32): bf16 or fp32")
    p.add_argument("--smoke", action="store_true", help="tiny random model: the path runs, numbers meaningless")
    p.add_argument("--profile", action="store_true", help="then one call of the first setting under torch.profiler: "
                   "its top ops by self CPU time")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one setting's timings, as JSON
    return p.parse_args(argv)


def child(args) -> dict:
    """In this process, under the environment its parent set: ms per call, peak RSS."""
    tune_cpu_process()
    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype)
    if args.smoke:
        lm = Transformer(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    else:
        lm = Transformer.from_pretrained(args.model or gguf.default_cache_dir())
    policy = PolicyLogprobs(lora.apply_lora(lm.to(dtype), args.lora_rank, 2.0 * args.lora_rank))
    B, P, R = args.rows, args.prompt_len, args.new_tokens
    ids = torch.randint(lm.config.vocab_size // 8, lm.config.vocab_size, (B, P + R))
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[:, :P // 8] = 0                                   # left padding, as rollouts have
    response_mask = torch.ones(B, R)

    def call():
        out = policy(ids, mask, response_mask, 1.0, entropy=True)
        (out.logprobs.sum() + 0.01 * out.entropy.sum()).backward()

    call()
    ms = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": ms, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return out


def main(argv=None):
    args = get_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    var, settings = SETTINGS[args.compare]
    (new, _), (old, _) = settings
    print(f"# {new} vs {old} ({var}) | {'tiny random model' if args.smoke else args.model or 'SmolLM2-135M-Instruct'}"
          f" | {args.dtype} base, LoRA r={args.lora_rank} | policy log-probs + entropy fwd + bwd of {args.rows} x "
          f"({args.prompt_len} + {args.new_tokens}) tokens | CPU {cpu_name()}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | {datetime.date.today()}", flush=True)
    runs = {name: [] for name, _ in settings}
    for rnd in range(args.rounds):
        for name, value in settings:
            child_argv = [a for a in argv if a != "--profile"] + ["--child"]
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv], capture_output=True,
                                  text=True, env=dict(os.environ, **{var: value}))
            if proc.returncode:
                raise SystemExit(f"child ({name}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(res)
            print(f"round {rnd} {name:<7}: ms {' / '.join(f'{x:,.0f}' for x in res['ms'])} | peak RSS "
                  f"{res['peak_rss_gib']:.2f} GiB", flush=True)
    med = {k: statistics.median(x for r in v for x in r["ms"]) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_gib"] for r in v) for k, v in runs.items()}
    print(f"\nms per call, median of {args.rounds * args.steps}: {new} {med[new]:,.0f} | {old} {med[old]:,.0f}"
          f" | {old} / {new} {med[old] / med[new]:.2f}x | peak RSS {new} {peak[new]:.2f} GiB, {old} "
          f"{peak[old]:.2f} GiB")
    if args.profile:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child"], capture_output=True,
                              text=True, env=dict(os.environ, **{var: settings[0][1]}), check=True)
        print(f"\none call with {new} under torch.profiler, top ops by self CPU time:\n"
              + json.loads(proc.stdout.strip().splitlines()[-1])["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
