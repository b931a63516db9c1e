"""The fused LM head's benchmark (kernels/bench.py --op linear_logprob): our
linear_token_logprobs against the unfused path (F.linear logits + kernels/logprob.py), the eager
reference, torch.compile, and the peers Liger-Kernel and Cut Cross-Entropy where installed, each
checked against the reference with a tolerance derived from where it rounds.

Imports triton (through kernels/bench_harness.py): import it after kernels/bench.py has set
TRITON_INTERPRET.
"""

import torch
import torch.nn.functional as F

from kernels.bench_harness import DTYPES, Impl, Rate, compiled, gemm_tflops, print_versus, run_op
from nanopairwise import losses

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
