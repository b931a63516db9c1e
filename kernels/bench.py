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
kernel, registered in OPS; the shared harness is kernels/bench_harness.py.
"""

import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE or not torch.cuda.is_available():      # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from kernels.bench_harness import (Impl, Rate, bandwidth, compiled, gemm_tflops, make_env,  # noqa: E402
                                   print_header, print_versus, run_op)
from nanopairwise import losses  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# token_logprobs check tolerances, by logits dtype (tests/test_logprob.py has the tight ones).
# Outputs: the eager reference's entropy is a plain fp32 sum of V terms (error 9e-5 at V = 32k,
# growing with V). Gradients: one rounding to the logits' dtype on both sides (1 ulp apart).
LOGPROB_TOL = {
    torch.float32: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=1e-5)),
    torch.bfloat16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -7)),
    torch.float16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -10)),
}

# linear_token_logprobs check tolerances, by hidden / weight dtype, u its unit roundoff (2^-8
# bf16, 2^-11 fp16); tests/test_linear_logprob.py has the tight ones at small V. Outputs: ours,
# torch.compile and CCE form fp32 dot products of the operands as the reference does (16-bit
# products are exact in fp32), so as LOGPROB_TOL, bound by the reference's own fp32 entropy sum.
# Gradients, 16-bit: d-logits and the gradients are each rounded once to the operand dtype (u
# each; one ulp apart is up to 2u): rtol 4u, and atol 4u of the tensor's largest entry (atol_rel):
# entries of d weight off the target rows are tiny next to the largest, sums of N terms of either
# sign whose error is relative to the terms. fp32: sums in other orders (the tests' 1e-5).
# Seen (interpreter, fp32 and fp16, N 64, C 128, V 4096, entropy and KL): gradients 0.19 of the
# bound, outputs 0.002; bf16 only runs compiled, on a GPU.
LINEAR_LOGPROB_TOL = {
    torch.float32: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol_rel=1e-5, rtol=1e-5)),
    torch.bfloat16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol_rel=2 ** -6, rtol=2 ** -6)),
    torch.float16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol_rel=2 ** -9, rtol=2 ** -9)),
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


def rounded_logits_tol(dtype, temperature) -> dict:
    """LINEAR_LOGPROB_TOL for the unfused path and Liger, which round the logits x to the operand
    dtype before the softmax: a log-prob moves by up to u |x_y| / T, and |x| <= 6 for the
    unit-normal logits here (the largest of N V normal draws at the largest shape is ~5.9); the
    KL by that times |e^(ref - lp) - 1|, < 1 mostly (ref = lp + noise of 0.3); the entropy by
    ~0.1 u. So out atol 6u / T. Gradients as LINEAR_LOGPROB_TOL, whose atol_rel also covers p's
    relative change u |x|. Seen on the CPU, as a fraction of these bounds, with entropy and KL (the
    reference's maths on bf16 / fp16 logits, N 1024, C 896, V 32000, T 1 and 0.7; our log-prob
    kernel on bf16 logits, N 64): log-prob 0.31, KL 0.20, d hidden 0.29, d weight 0.37."""
    tol = {kind: dict(entry) for kind, entry in LINEAR_LOGPROB_TOL[dtype].items()}
    tol["out"]["atol"] = max(tol["out"]["atol"], 6 * torch.finfo(dtype).eps / 2 / temperature)
    return tol


def near_true_logprobs(hidden, weight, targets, temperature, g):
    """ref_logprobs for --kl: the true log-probs plus N(0, 0.3^2) noise, clamped to <= 0, as from
    a reference policy near the policy (tests/test_linear_logprob.py does the same), so k3's
    e^(ref - lp) stays realistic. Eager, 1024 rows at a time (their fp32 logits), without grad."""
    with torch.no_grad():
        lp = torch.cat([losses.linear_token_logprobs_ref(hidden[i:i + 1024], weight, targets[i:i + 1024],
                                                         temperature).logprobs
                        for i in range(0, len(targets), 1024)])
    return (lp + 0.3 * torch.randn(lp.shape, generator=g, device=lp.device)).clamp(max=0.0)


def linear_ce_peers(comparable, tol_rounded) -> list:
    """Liger's fused linear cross-entropy and Cut Cross-Entropy where installed, as log-prob =
    -(per-token cross-entropy) with reduction "none". Neither has a temperature, an entropy or a
    KL output, so they run only at T = 1 without --entropy and --kl (comparable)."""
    peers = []
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        if not comparable:
            print("  liger: skipped (its fused linear cross-entropy has no temperature, entropy or KL)")
        else:
            liger_ce = LigerFusedLinearCrossEntropyLoss(ignore_index=losses.IGNORE_INDEX, reduction="none")

            def liger(h, w, y, r):
                # logits chunks in the operand dtype (hence tol_rounded). Under reduction "none" it
                # recomputes them in backward since Liger PR #1298 (0.8.5 has it); before, forward
                # computed the gradients and backward scaled them all by grad_output[0] (Liger
                # #968): the check's random upstream gradients catch that and drop the row.
                loss = liger_ce(w, h, y)
                return losses.TokenLogprobs(-(loss[0] if isinstance(loss, tuple) else loss), None, None)
            peers.append(Impl("liger", liger, False, tol_rounded))
    except ImportError:
        print("  liger: liger_kernel not installed, skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy
        if not comparable:
            print("  cce: skipped (Cut Cross-Entropy has no temperature, entropy or KL)")
        else:
            def cce(h, w, y, r):
                # fp32 logits tiles never stored, like ours. Its defaults (impl "cce") skip gradient
                # blocks below the operand dtype's resolution and accumulate gradients in it; if
                # that exceeds the tolerance the row is dropped with the error printed.
                loss = linear_cross_entropy(h, w, y, ignore_index=losses.IGNORE_INDEX, reduction="none")
                return losses.TokenLogprobs(-loss, None, None)
            peers.append(Impl("cce", cce, False))
    except ImportError:
        print("  cce: cut_cross_entropy not installed, skipped")
    return peers


def bench_linear_logprob(args, env) -> bool:
    """linear_token_logprobs: the LM head and token log-probs from hidden (N, C) and weight (V, C).
    FLOPs: the unfused path's model FLOPs, credited to every row alike so TFLOP/s ranks rows as
    time does: forward 2 N V C (the logits GEMM), backward 4 N V C (the d hidden and d weight
    GEMMs), both 6 N V C. Left out: the O(N V) softmax work, and our backward's recompute of the
    logits (2 N V C more, see kernels/linear_logprob.py). %mm: of one (N, C) x (C, V) GEMM in the
    same dtype, timed in this run. Baseline: "unfused", what train_ppo.py runs without
    --fused-head: F.linear to (N, V) logits in the operand dtype, then kernels/logprob.py."""
    from kernels.linear_logprob import linear_token_logprobs
    from kernels.logprob import token_logprobs
    dtype, T = DTYPES[args.dtype], args.temperature
    if env.smoke and dtype == torch.bfloat16:
        # the interpreter runs tl.dot with numpy, which holds bf16 as raw uint16 bits: wrong results
        print("\n  linear_logprob: fp32 under --smoke (tl.dot on bf16 is wrong in the Triton interpreter)")
        dtype = torch.float32
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    kw = dict(entropy=args.entropy, kl_estimator="k3")

    def call(fn):                                          # inputs: (hidden, weight, targets, ref_logprobs)
        return lambda h, w, y, r: fn(h, w, y, T, r, **kw)

    def unfused(h, w, y, r):
        return token_logprobs(F.linear(h, w), y, T, r, **kw)              # (N, V) logits, operand dtype
    tol_rounded = rounded_logits_tol(dtype, T)
    # unfused runs our log-prob kernel: a mismatch there is a bug of ours, so it fails the run
    impls = [Impl("eager", call(losses.linear_token_logprobs_ref), False),
             Impl("unfused", unfused, True, tol_rounded)]
    ref_compiled = compiled(losses.linear_token_logprobs_ref, env)
    if ref_compiled is not None:
        impls.append(Impl("compile", call(ref_compiled), False))
    impls += linear_ce_peers(T == 1.0 and not args.entropy and not args.kl, tol_rounded)
    impls.append(Impl("triton", call(linear_token_logprobs), True))

    # Qwen2.5-0.5B head (the goal's shape at N = 16384), Llama-3.2-1B head; smoke: odd sizes that
    # leave partial interpreter tiles (16, 32, 16) in N, V and C
    shapes = [(37, 40, 333)] if env.smoke else [(4096, 896, 151936), (16384, 896, 151936),
                                                 (8192, 2048, 128256)]
    ok = True
    for N, C, V in shapes:
        def make_inputs(check, N=N, C=C, V=V):
            n = min(N, 1024) if check else N               # rows are independent; V and C are what vary
            g = torch.Generator(device=env.device).manual_seed(0)
            hidden = torch.randn(n, C, generator=g, device=env.device).to(dtype).requires_grad_(True)
            weight = torch.randn(V, C, generator=g, device=env.device) / C ** 0.5    # unit-normal logits
            weight = weight.to(dtype).requires_grad_(True)
            targets = torch.randint(0, V, (n,), generator=g, device=env.device)
            targets[torch.rand(n, generator=g, device=env.device) < 0.05] = losses.IGNORE_INDEX
            ref = near_true_logprobs(hidden, weight, targets, T, g) if args.kl else None
            return (hidden, weight, targets, ref), [hidden, weight]
        flops = {"fwd": 2 * N * V * C, "bwd": 4 * N * V * C, "fwd+bwd": 6 * N * V * C}
        rate = Rate(flops, "TFLOP/s", 1e12, gemm_tflops(N, C, V, dtype, env), "%mm")
        E = torch.finfo(dtype).bits // 8
        title = (f"linear_token_logprobs N={N} C={C} V={V} {dtype_name} T={T} entropy={args.entropy} "
                 f"kl={args.kl} | unfused (N, V) logits = {N * V * E / 2 ** 20:.0f} MB")
        results = run_op(title, make_inputs, impls, rate, LINEAR_LOGPROB_TOL[dtype], env, baseline="unfused")
        if results is None:
            ok = False
        else:   # the fused head issue's goal, at C 896, V 151936, N 16384 bf16
            print_versus(results, "triton", "unfused", time_goal=1.2, peak_goal=0.25)
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
