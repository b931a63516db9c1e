"""Generation throughput: nanopairwise.rollout.generate against transformers' generate.

    python scripts/bench_generate.py                      # Qwen2.5-0.5B shape, bf16, batch 1/32/128 (GPU)
    python scripts/bench_generate.py --batch-sizes 1,8 --new-tokens 64
    python scripts/bench_generate.py --smoke              # tiny model on the CPU (what the test runs)

Both sides get the same random weights (transformers builds the model, saves it, we load the
directory), the same random prompts of --prompt-len tokens, greedy decoding, no EOS (every row
generates exactly --new-tokens tokens, so both do the same work). Correctness first: at batch 1
the two greedy outputs are compared token by token (in fp32 they must agree; in bf16 they may
part after a near-tie, and the agreeing prefix is reported). Throughput = batch * new tokens /
wall time of the whole call (prefill included), median of --repeats runs after one warm-up.
"""

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time

import torch

from nanopairwise.common import parse_dtype
from nanopairwise.model import Transformer
from nanopairwise.rollout import generate

# Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B-Instruct config.json), random weights
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, small batches, CPU: proves the path runs")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32,128; smoke 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 256; smoke 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    args.device = "cuda" if cuda else "cpu"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if args.smoke else "1,32,128")).split(",")]
    args.new_tokens = args.new_tokens or (16 if args.smoke else 256)
    args.dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    return args


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median wall seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = get_args(argv)
    import transformers
    torch.manual_seed(0)
    shape = TINY if args.smoke else QWEN25_05B
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).to(args.dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp, dtype=args.dtype, device=args.device).eval()
    hf = hf.to(args.device)
    V, R = shape["vocab_size"], args.new_tokens
    dtype_name = str(args.dtype).removeprefix("torch.")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# generation throughput | {gpu} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | {dtype_name} | {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M "
          f"params | prompt {args.prompt_len} + {R} new tokens, greedy | {datetime.date.today()}")

    def prompts(B):
        g = torch.Generator().manual_seed(B)
        return torch.randint(0, V, (B, args.prompt_len), generator=g)

    def run_ours(ids):
        return generate(ours, ids.tolist(), R, eos_token_id=None, pad_token_id=0, greedy=True).response_ids

    def run_hf(ids):
        ids = ids.to(args.device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=R, min_new_tokens=R,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, ids.size(1):]

    # correctness first: batch-1 greedy outputs against transformers
    with torch.no_grad():
        a, b = run_ours(prompts(1)), (None if args.no_hf else run_hf(prompts(1)))
    if b is not None:
        same = (a.cpu() == b.cpu())[0].long()
        prefix = int(same.cumprod(0).sum())
        print(f"check: batch-1 greedy tokens agree with transformers for {prefix}/{R} steps")
        if args.dtype == torch.float32 and prefix != R:
            print("FAILED: fp32 greedy decoding must agree with transformers")
            return 1
    print("\n| batch | ours tok/s | transformers tok/s | speedup |\n|---:|---:|---:|---:|")
    for B in args.batch_sizes:
        ids = prompts(B)
        with torch.no_grad():
            t_ours = timed(lambda: run_ours(ids), args.device, args.repeats)
            t_hf = None if args.no_hf else timed(lambda: run_hf(ids), args.device, args.repeats)
        tps = lambda t: B * R / t
        hf_col = "-" if t_hf is None else f"{tps(t_hf):,.0f}"
        speed = "-" if t_hf is None else f"{t_hf / t_ours:.2f}x"
        print(f"| {B} | {tps(t_ours):,.0f} | {hf_col} | {speed} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
