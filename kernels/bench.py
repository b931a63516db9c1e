"""Benchmark tables for the fused kernels: eager reference vs torch.compile vs peers vs ours.

  python kernels/bench.py                          # every op at full shapes (needs a CUDA GPU)
  python kernels/bench.py --op logprob --dtype bf16
  python kernels/bench.py --op linear_logprob      # fused LM head vs logits + log-prob kernel
  python kernels/bench.py --smoke                  # tiny shapes on the CPU, TRITON_INTERPRET=1

Every implementation is checked against the eager reference (nanopairwise/losses.py) on the
same shape before it is timed; if ours is wrong the script prints FAILED and exits 1, a peer
that disagrees is reported and left out. Per op and shape it prints, for forward, backward
and both: ms p50 [p20-p80] (triton.testing.do_bench), a rate from the op's work formula (the
work an ideal implementation needs, the same for every row, so the rate compares rows): GB/s
as % of this device's copy bandwidth for the memory-bound ops, TFLOP/s as % of a cuBLAS GEMM
for the LM head; speedup over a baseline row (eager; the unfused path for the LM head), and the
peak memory of one forward + backward beyond the inputs, also as a ratio to the baseline's.
Under --smoke the timings come from a plain timer around the Triton interpreter: they only
prove that the path runs. This file is the CLI and one bench_<op>(args, env) function per
kernel, registered in OPS (the fused LM head's, with its peers and tolerance model, in
kernels/bench_linear_logprob.py); the shared harness is kernels/bench_harness.py, the device and header
kernels/bench_device.py.
"""

import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE or not torch.cuda.is_available():      # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402

from kernels.bench_device import make_env, print_header  # noqa: E402
from kernels.bench_harness import DTYPES, Impl, bandwidth, compiled, run_op  # noqa: E402
from kernels.bench_linear_logprob import bench_linear_logprob  # noqa: E402
from nanopairwise import losses  # noqa: E402

# token_logprobs check tolerances, by logits dtype (tests/test_logprob.py has the tight ones).
# Outputs: the eager reference's entropy is a plain fp32 sum of V terms (error 9e-5 at V = 32k,
# growing with V). Gradients: one rounding to the logits' dtype on both sides (1 ulp apart).
LOGPROB_TOL = {
    torch.float32: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=1e-5)),
    torch.bfloat16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -7)),
    torch.float16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -10)),
}


# ----------------------------------------------------------------------------------------------
# ops


def bench_logprob(args, env) -> bool:
    """token_logprobs over (N, V) logits. Bytes: forward reads N*V*E; backward reads N*V*E and
    writes the (N, V) gradient; both = 3 N*V*E (E bytes per logit; O(N) terms left out)."""
    from kernels.logprob import token_logprobs
    dtype, T = DTYPES[args.dtype], args.temperature
    kw = dict(entropy=args.entropy, kl_estimator="k3")

    def call(fn):                                          # inputs: (logits, targets, ref_logprobs)
        return lambda x, y, r: fn(x, y, T, r, **kw)
    impls = [Impl("eager", call(losses.token_logprobs_ref), False)]
    ref_compiled = compiled(losses.token_logprobs_ref, env)
    if ref_compiled is not None:
        impls.append(Impl("compile", call(ref_compiled), False))
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        if T != 1.0 or args.entropy or args.kl:
            print("  liger: skipped (its cross-entropy has no temperature, entropy or KL output)")
        else:
            liger_ce = LigerCrossEntropyLoss(reduction="none", ignore_index=losses.IGNORE_INDEX)
            # log-prob = -cross-entropy per token; Liger writes d/dlogits into the logits buffer
            # during forward (in place), which is why run_op gives every impl its own inputs
            impls.append(Impl("liger", lambda x, y, r: losses.TokenLogprobs(-liger_ce(x, y), None, None), False))
    except ImportError:
        print("  liger: liger_kernel not installed, skipped")
    impls.append(Impl("triton", call(token_logprobs), True))

    shapes = [(64, 1000)] if env.smoke else list(itertools.product([4096, 16384, 65536],
                                                                     [32000, 128256, 151936]))
    ok = True
    for N, V in shapes:
        def make_inputs(check, N=N, V=V):
            n = min(N, 1024) if check else N               # rows are independent; V is what varies
            g = torch.Generator(device=env.device).manual_seed(0)
            logits = (torch.randn(n, V, generator=g, device=env.device) * 2).to(dtype).requires_grad_(True)
            targets = torch.randint(0, V, (n,), generator=g, device=env.device)
            ref = -torch.rand(n, generator=g, device=env.device) * 3 if args.kl else None
            return (logits, targets, ref), [logits]
        E = torch.finfo(dtype).bits // 8
        nbytes = {"fwd": N * V * E, "bwd": 2 * N * V * E, "fwd+bwd": 3 * N * V * E}
        title = (f"token_logprobs N={N} V={V} {args.dtype} T={T} entropy={args.entropy} kl={args.kl}"
                 f" | one (N, V) gradient = {N * V * E / 2 ** 20:.0f} MB")
        ok &= run_op(title, make_inputs, impls, bandwidth(nbytes, env), LOGPROB_TOL[dtype], env) is not None
    return ok


def bench_ppo_loss(args, env) -> bool:
    """ppo_loss over (B, T) fp32 tokens with the KL term and the value loss. Bytes: forward reads
    the 8 inputs; backward reads them again and writes d/dlogprobs and d/dvalues."""
    try:
        from kernels.ppo_loss import ppo_loss
    except ImportError as e:
        print(f"\n== ppo_loss: skipped, kernels/ppo_loss.py not importable ({e})")
        return True
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", value_clip=0.2, vf_coef=0.5)

    def call(fn):       # inputs: (logprobs, old_logprobs, advantages, mask, ref, values, old_values, returns)
        return lambda *x: fn(*x[:4], ref_logprobs=x[4], values=x[5], old_values=x[6], returns=x[7], **kw)
    impls = [Impl("eager", call(losses.ppo_loss_ref), False)]
    ref_compiled = compiled(losses.ppo_loss_ref, env)
    if ref_compiled is not None:
        impls.append(Impl("compile", call(ref_compiled), False))
    print("  liger: no fused PPO loss over given log-probs to compare with")
    impls.append(Impl("triton", call(ppo_loss), True))
    ok = True
    for B, T in ([(4, 37)] if env.smoke else [(256, 1024), (512, 2048), (1024, 4096)]):
        def make_inputs(check, B=B, T=T):
            g = torch.Generator(device=env.device).manual_seed(0)
            r = lambda: torch.randn(B, T, generator=g, device=env.device)   # noqa: E731
            logprobs, values = (r() * 0.1 - 1).requires_grad_(True), r().requires_grad_(True)
            mask = (torch.rand(B, T, generator=g, device=env.device) < 0.8).float()
            inputs = (logprobs, logprobs.detach() + r() * 0.1, r(), mask, logprobs.detach() + r() * 0.1,
                      values, values.detach() + r() * 0.1, r())
            return inputs, [logprobs, values]
        nbytes = {"fwd": 8 * B * T * 4, "bwd": 10 * B * T * 4, "fwd+bwd": 18 * B * T * 4}
        # scalars are fp32 means over up to 4M tokens summed in different orders (block partial
        # sums vs torch's cascade): rtol 1e-4. Gradients are elementwise m g dpg / M, of size
        # ~1 / (B T), so atol scales with that
        tol = dict(out=dict(atol=1e-5, rtol=1e-4), grad=dict(atol=1e-5 / (B * T), rtol=1e-5))
        title = f"ppo_loss B={B} T={T} fp32, KL k3 + value loss"
        ok &= run_op(title, make_inputs, impls, bandwidth(nbytes, env), tol, env) is not None
    return ok


OPS = {"logprob": bench_logprob, "ppo_loss": bench_ppo_loss, "linear_logprob": bench_linear_logprob}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["all"] + list(OPS), default="all", help="which kernel to bench")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="logits dtype (logprob), hidden / weight dtype (linear_logprob)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (logprob ops)")
    parser.add_argument("--entropy", action="store_true", help="also the entropy (logprob ops)")
    parser.add_argument("--kl", action="store_true", help="also the k3 KL to a reference (logprob ops)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("full shapes need a CUDA GPU; use --smoke on the CPU")
    env = make_env(args.smoke)
    print_header(env, args.dtype)
    ok = True
    for op, bench in OPS.items():
        if args.op in ("all", op):
            ok &= bench(args, env)
    print("\nall correctness checks ok" if ok else "\ncorrectness FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
