"""Generation throughput: nanopairwise.rollout.generate against transformers' generate, and both
against the machine's limits measured in the same run.

    python scripts/bench_generate.py --model ~/.cache/nanopairwise/smollm2-135m-instruct   # real weights (CPU)
    python scripts/bench_generate.py                      # Qwen2.5-0.5B shape, random weights (GPU: bf16, batch 1/32/128)
    python scripts/bench_generate.py --smoke              # tiny model on the CPU (what the test runs)

Both sides get the same weights (--model, or random ones transformers builds and saves), the same
random prompts of --prompt-len tokens, greedy decoding, no EOS (every row generates exactly
--new-tokens tokens, so both do the same work). Ours loads the model in fp32, as train_ppo.py does,
and samples in --dtype (default: bf16 on a GPU or a CPU with AVX512-BF16/AMX, else fp32): its
compiled step is what PPO runs. Transformers runs in --dtype too. Correctness first: at batch 1
the two greedy outputs are compared token by token (in fp32 they must agree; in bf16 they may
part after a near-tie, and the agreeing prefix is reported). Throughput = batch * new tokens /
wall time of the whole call (prefill included), median of --repeats runs after one warm-up (which
compiles; its time is reported).

The limits, measured in the same run (not under --smoke): matmul peak per dtype (a 2048^3 GEMM),
read bandwidth (the sum of a 512 MB tensor), and the floor: a bare chain of --dtype matmuls over the
same weights with fused projections (per layer [q;k;v], o, [gate;up], down, then the LM head; no
attention, norms or sampling), at each batch size. Goals (issue 22): batch 1 within 1.25x of the
floor's time, batch 16 at >= 2.4x transformers' tok/s. Then the log-prob gap of a sampled rollout
against the fp32 training forward (train_ppo.py's rollout/logprob_gap). --line measures where compiling pays off:
compile seconds and eager vs compiled ms per decode step for this model and the built-in tiny one.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from nanopairwise import decode
from nanopairwise.bootstrap import TINY_POLICY
from nanopairwise.common import parse_dtype
from nanopairwise.distributed import tune_cpu_process
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.rollout import generate

# Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B-Instruct config.json), random weights
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an HF checkpoint directory (default: random weights, see --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny model, small batches, CPU: proves the path runs")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: GPU 1,32,128; CPU 1,16; smoke 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default GPU 256, CPU 64, smoke 16)")
    p.add_argument("--prompt-len", type=int, default=48, help="prompt tokens per row")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default bf16 where the device computes it natively)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--line", action="store_true", help="also measure compile time vs eager per-step time (--line)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    args.device = "cuda" if cuda else "cpu"
    default_b = "1,4" if args.smoke else "1,32,128" if cuda else "1,16"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_b).split(",")]
    args.new_tokens = args.new_tokens or (16 if args.smoke else 256 if cuda else 64)
    native_bf16 = cuda or decode.cpu_has_bf16()
    args.dtype = parse_dtype(args.dtype or ("bf16" if native_bf16 and not args.smoke else "fp32"))
    return args


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=True):
    """Median wall seconds of `repeats` calls (after one warm-up call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_limits(device, repeats):
    """Matmul GFLOP/s per dtype (2048^3) and read bandwidth in GB/s (the sum of a 512 MB tensor)."""
    n, out = 2048, {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[dtype] = 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e9
    x = torch.ones(128 * 2 ** 20, device=device)  # 512 MB of fp32
    out["read_gbps"] = x.numel() * 4 / timed(lambda: x.sum(), device, repeats) / 1e9
    return out


def floor_chain(dec, B):
    """The bare matmul chain of one decode step over the Decoder's fused weights (B rows): what
    streaming the weights through torch's own kernels costs, with nothing else."""
    C, x = dec.cfg.hidden_size, torch.randn(B, dec.cfg.hidden_size, dtype=dec.dtype, device=dec.embed.device)
    hd = dec.cfg.num_attention_heads * dec.cfg.head_dim

    def step():
        h = x
        for layer in dec.layers:
            h = F.linear(F.linear(h, layer.wqkv)[:, :hd], layer.wo)
            h = F.linear(F.linear(h, layer.w_gate_up)[:, :layer.w_down.size(1)], layer.w_down)
        return F.linear(h[:, :C], dec.lm_head)
    return step


def compile_line(model, dtype, device, B=16, R=16):
    """(compile s, eager ms/step, compiled ms/step) of the decode step at batch B; a fresh Decoder each."""
    ids = torch.randint(0, model.config.vocab_size, (B, 8)).tolist()
    out = []
    for compiled in (False, True):
        run = lambda: generate(model, ids, R, None, 0, greedy=True, dtype=dtype, compile=compiled)  # noqa: E731
        first = run()
        prefill = timed(lambda: generate(model, ids, 1, None, 0, greedy=True, dtype=dtype, compile=compiled), device, 3)
        out.append((first.compile_s, 1000 * (timed(run, device, 3) - prefill) / (R - 1)))
    return out[1][0], out[0][1], out[1][1]


def load_models(args):
    """(ours: fp32 Transformer, hf: transformers model in --dtype, description)."""
    import transformers
    if args.model:
        ours = Transformer.from_pretrained(args.model, dtype=torch.float32, device=args.device).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).eval()
        return ours, hf.to(args.device), os.path.basename(os.path.normpath(args.model))
    torch.manual_seed(0)
    shape = TINY if args.smoke else QWEN25_05B
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp, dtype=torch.float32, device=args.device).eval()
    return ours, hf.to(args.dtype).to(args.device), "random " + ("tiny" if args.smoke else "Qwen2.5-0.5B-shaped")


def throughput_table(args, run_ours, run_hf, prompts, dec):
    """The table rows, one per batch size; returns {B: (ours / transformers, ours time / floor time)}."""
    R, dev, ratios = args.new_tokens, args.device, {}
    print("\n| batch | ours tok/s | transformers tok/s | speedup | floor tok/s | floor time / ours |"
          "\n|---:|---:|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        ids = prompts(B)
        with torch.no_grad():
            first = time.perf_counter()
            compile_s = run_ours(ids).compile_s  # the warm-up call: compiles for a new shape
            first = time.perf_counter() - first
            t_ours = timed(lambda: run_ours(ids), dev, args.repeats, warmup=False)
            t_hf = None if args.no_hf else timed(lambda: run_hf(ids), dev, args.repeats)
            t_floor = None if args.smoke else timed(floor_chain(dec, B), dev, 5 * args.repeats)
        hf_col, speed = ("-", "-") if t_hf is None else (f"{B * R / t_hf:,.1f}", f"{t_hf / t_ours:.2f}x")
        floor_col, floor_ratio = ("-", "-") if t_floor is None else (f"{B / t_floor:,.1f}", f"{t_floor * R / t_ours:.2f}")
        ratios[B] = (t_hf / t_ours if t_hf else None, t_ours / (t_floor * R) if t_floor else None)
        print(f"| {B} | {B * R / t_ours:,.1f} | {hf_col} | {speed} | {floor_col} | {floor_ratio} |  "
              f"(first call {first:.1f} s, of which compiling {compile_s:.1f} s)", flush=True)
    return ratios


def print_limits(limits, ratios, dec, dtype_name):
    weights_gb = sum(t.numel() * t.element_size() for n, t in dec.named_buffers() if ".kv." not in n and t.dim() == 2) / 1e9
    print(f"\nlimits: fp32 matmul {limits[torch.float32]:.0f} GFLOP/s, bf16 matmul {limits[torch.bfloat16]:.0f} "
          f"GFLOP/s, read bandwidth {limits['read_gbps']:.1f} GB/s; a batch-1 step reads {weights_gb * 1e3:.0f} MB "
          f"of {dtype_name} weights: bandwidth limit {limits['read_gbps'] / weights_gb:.1f} tok/s")
    for B, (vs_hf, vs_floor) in ratios.items():
        if B == 1 and vs_floor:
            print(f"goal, batch 1: ours time / floor time {vs_floor:.2f} (goal <= 1.25)")
        if B == 16 and vs_hf:
            print(f"goal, batch 16: ours / transformers {vs_hf:.2f}x (goal >= 2.4x)")


def print_compile_line(args, ours, name):
    tiny = Transformer(ModelConfig.from_hf({**TINY_POLICY, "vocab_size": 512})).to(args.device).eval()
    for label, model, dtype in ((name, ours, args.dtype), ("built-in tiny (0.84M)", tiny, torch.float32)):
        c, eager, comp = compile_line(model, dtype, args.device)
        gain = eager - comp
        pays = f"pays off after {c * 1000 / gain:,.0f} decode steps" if gain > 0 else "never pays off"
        print(f"compile line, {label}, batch 16: compile {c:.1f} s, eager {eager:.2f} ms/step, compiled "
              f"{comp:.2f} ms/step: {pays}", flush=True)


def logprob_gap(ours, ids, args):
    """A sampled rollout (T = 1) of the fast engine against the fp32 training forward's log-probs of
    the same tokens (policy.PolicyLogprobs, what train_ppo.py recomputes): the rollout/logprob_gap."""
    from nanopairwise.policy import PolicyLogprobs
    ro = generate(ours, ids.tolist(), args.new_tokens, None, 0, dtype=args.dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train = PolicyLogprobs(ours)(*ro.sequences(), ro.response_mask).logprobs
    gap = (ro.logprobs - train).abs()[ro.response_mask.bool()]
    capped = ((train - ro.logprobs).exp() > 2.0)[ro.response_mask.bool()].float().mean()
    print(f"rollout/logprob_gap ({str(args.dtype).removeprefix('torch.')} rollout vs fp32 training forward, "
          f"{gap.numel()} sampled tokens): mean {gap.mean():.4f}, max {gap.max():.3f} nats; "
          f"importance weight above the cap of 2 on {100 * capped:.2f}% of tokens", flush=True)


def main(argv=None):
    args = get_args(argv)
    import transformers
    ours, hf, name = load_models(args)
    V, R, dev = ours.config.vocab_size, args.new_tokens, args.device
    dtype_name = str(args.dtype).removeprefix("torch.")
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# generation throughput | {where} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| {name}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params | {dtype_name} | prompt "
          f"{args.prompt_len} + {R} new tokens, greedy | {datetime.datetime.now():%Y-%m-%d %H:%M} | load "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    def prompts(B):
        return torch.randint(0, V, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))

    def run_ours(ids):
        return generate(ours, ids.tolist(), R, eos_token_id=None, pad_token_id=0, greedy=True, dtype=args.dtype)

    def run_hf(ids):
        ids = ids.to(dev)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=R, min_new_tokens=R,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, ids.size(1):]

    with torch.no_grad():  # correctness first: batch-1 greedy outputs against transformers
        a, b = run_ours(prompts(1)).response_ids, (None if args.no_hf else run_hf(prompts(1)))
    if b is not None:
        prefix = int((a.cpu() == b.cpu())[0].long().cumprod(0).sum())
        print(f"check: batch-1 greedy tokens agree with transformers for {prefix}/{R} steps", flush=True)
        if args.dtype == torch.float32 and prefix != R:
            print("FAILED: fp32 greedy decoding must agree with transformers")
            return 1
    limits = None if args.smoke else machine_limits(dev, args.repeats)
    dec = decode.decoder_for(ours, args.dtype)
    ratios = throughput_table(args, run_ours, run_hf, prompts, dec)
    if limits:
        print_limits(limits, ratios, dec, dtype_name)
    if not args.smoke:
        logprob_gap(ours, prompts(16), args)
    if args.line:
        print_compile_line(args, ours, name)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    tune_cpu_process()   # the process setup of train_*.py (distributed.compute_init)
    sys.exit(main())
