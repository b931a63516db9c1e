"""Benchmark tables for the fused kernels: eager reference vs torch.compile vs Liger vs ours.

  python kernels/bench.py                          # every op at full shapes (needs a CUDA GPU)
  python kernels/bench.py --op logprob --dtype bf16
  python kernels/bench.py --smoke                  # tiny shapes on the CPU, TRITON_INTERPRET=1

Every implementation is checked against the eager reference (nanopairwise/losses.py) on the
same shape before it is timed; if ours is wrong the script prints FAILED and exits 1, a peer
that disagrees is reported and left out. Per op and shape it prints, for forward, backward
and both: ms p50 [p20-p80] (triton.testing.do_bench), GB/s from the op's bytes formula (the
traffic an ideal implementation needs, the same for every implementation, so GB/s is
comparable across rows), that as % of this device's copy bandwidth measured in the same run,
speedup over eager, and the peak memory of one forward + backward beyond the inputs.
Under --smoke the timings come from a plain timer around the Triton interpreter: they only
prove that the path runs. Adding a kernel = one bench_<op>(args, env) function plus its
entry in OPS; the harness (check_outputs, measure, print_table, run_op) is shared.
"""

import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE or not torch.cuda.is_available():      # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import triton  # noqa: E402
import triton.testing  # noqa: E402

from nanopairwise import losses  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]          # p50, p20, p80
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# token_logprobs check tolerances, by logits dtype (tests/test_logprob.py has the tight ones).
# Outputs: the eager reference's entropy is a plain fp32 sum of V terms (error 9e-5 at V = 32k,
# growing with V). Gradients: one rounding to the logits' dtype on both sides (1 ulp apart).
LOGPROB_TOL = {
    torch.float32: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=1e-5)),
    torch.bfloat16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -7)),
    torch.float16: dict(out=dict(atol=1e-3, rtol=1e-4), grad=dict(atol=1e-5, rtol=2 ** -10)),
}


class Env(NamedTuple):
    device: str
    cuda: bool
    copy_gbps: float      # measured device-to-device copy bandwidth, GB/s (read + write)
    smoke: bool


class Impl(NamedTuple):
    name: str
    fn: Callable          # fn(*inputs) -> NamedTuple of outputs (None for absent ones)
    ours: bool            # a mismatch of ours fails the run; a peer's only drops its row


# ----------------------------------------------------------------------------------------------
# harness


def time_fn(fn, leaves, env) -> tuple:
    """(p50, p20, p80) in ms. GPU: do_bench, which flushes L2 and sets leaves' .grad to None."""
    if env.cuda:
        return tuple(triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=leaves))
    times = []
    for _ in range(4):                                  # 1 warm-up + 3 timed (the interpreter is slow)
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return tuple(torch.tensor(times[1:]).quantile(torch.tensor(QUANTILES)).tolist())


def diff_outputs(out) -> list:
    return [t for t in out if t is not None and t.requires_grad]


def forward_backward(impl, inputs, leaves, upstream):
    """One forward + backward with fixed random upstream gradients; returns (outputs, grads)."""
    out = impl.fn(*inputs)
    torch.autograd.backward(diff_outputs(out), upstream)
    return out, [leaf.grad for leaf in leaves]


def check_outputs(name, got, want, tol) -> bool:
    """got / want = (outputs NamedTuple, leaf grads); prints one line, True when they agree."""
    pairs = [(f"out.{k}", a, b) for k, a, b in zip(want[0]._fields, got[0], want[0]) if b is not None]
    pairs += [(f"grad[{i}]", a, b) for i, (a, b) in enumerate(zip(got[1], want[1]))]
    for what, a, b in pairs:
        kind = "grad" if what.startswith("grad") else "out"
        try:
            assert a is not None, "missing"
            torch.testing.assert_close(a.float(), b.float(), **tol[kind])
        except AssertionError as e:
            print(f"  correctness FAILED: {name} {what}: {str(e).strip().splitlines()[-2:]}")
            return False
    print(f"  correctness ok: {name} matches eager ({len(pairs)} tensors)")
    return True


def peak_mb(fn, leaves, env):
    """Peak memory of fn() beyond what is allocated before it (inputs), in MB; None on CPU."""
    if not env.cuda:
        return None
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure(impl, inputs, leaves, env) -> dict:
    """Peak memory, then ms for fwd, bwd (retained graph) and fwd+bwd; OOM gives {'oom': True}."""
    try:
        out = impl.fn(*inputs)
        upstream = [torch.randn_like(t) for t in diff_outputs(out)]
        del out

        def both():
            torch.autograd.backward(diff_outputs(impl.fn(*inputs)), upstream)

        res = {"peak": peak_mb(both, leaves, env), "fwd": time_fn(lambda: impl.fn(*inputs), leaves, env)}
        outs = diff_outputs(impl.fn(*inputs))
        res["bwd"] = time_fn(lambda: torch.autograd.backward(outs, upstream, retain_graph=True), leaves, env)
        del outs
        res["fwd+bwd"] = time_fn(both, leaves, env)
        return res
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        for leaf in leaves:
            leaf.grad = None
        if env.cuda:
            torch.cuda.empty_cache()


def print_table(results, nbytes, env):
    """results: [(impl name, measure() dict)], first row eager; nbytes: pass -> bytes."""
    print(f"  {'impl':<10} {'pass':<8} {'ms p50 [p20-p80]':<28} {'GB/s':>8} {'%copy':>6} "
          f"{'x eager':>8} {'peak MB':>9}")
    eager = results[0][1]
    for name, res in results:
        if res.get("oom"):
            print(f"  {name:<10} out of memory")
            continue
        for phase in ("fwd", "bwd", "fwd+bwd"):
            p50, p20, p80 = res[phase]
            gbps = nbytes[phase] / (p50 * 1e-3) / 1e9
            speedup = f"{eager[phase][0] / p50:7.2f}x" if not eager.get("oom") else "     -"
            peak = f"{res['peak']:9.0f}" if phase == "fwd+bwd" and res["peak"] is not None else f"{'-':>9}"
            print(f"  {name:<10} {phase:<8} {f'{p50:.3f} [{p20:.3f}-{p80:.3f}]':<28} {gbps:8.2f} "
                  f"{100 * gbps / env.copy_gbps:5.1f}% {speedup:>8} {peak}")


def run_op(title, make_inputs, impls, nbytes, tol, env) -> bool:
    """Check every impl against impls[0] (eager) on make_inputs(check=True) with tolerances tol
    (dict out=, grad=), then time the ones that agree on make_inputs(check=False).
    Returns False when one of ours disagrees."""
    print(f"\n== {title}")
    inputs, leaves = make_inputs(check=True)
    probe = impls[0].fn(*inputs)
    upstream = [torch.randn_like(t) for t in diff_outputs(probe)]
    del probe
    want = forward_backward(impls[0], inputs, leaves, upstream)
    ok, passed = True, [impls[0]]
    for impl in impls[1:]:
        fresh, fresh_leaves = make_inputs(check=True)     # own copies: some peers write in place
        try:
            got = forward_backward(impl, fresh, fresh_leaves, upstream)
        except Exception as e:                            # a peer that cannot run here is left out
            if impl.ours:
                raise
            print(f"  {impl.name}: failed to run ({type(e).__name__}: {e}), left out")
            continue
        if check_outputs(impl.name, got, want, tol):
            passed.append(impl)
        elif impl.ours:
            ok = False
    del inputs, leaves, want
    if not ok:
        return False
    results = []
    for impl in passed:
        inputs, leaves = make_inputs(check=False)
        results.append((impl.name, measure(impl, inputs, leaves, env)))
        del inputs, leaves
    print_table(results, nbytes, env)
    return True


def compiled(fn, env):
    """torch.compile of a reference, or None with the reason printed."""
    if env.smoke:
        print("  torch.compile: skipped under --smoke (inductor's CPU build outlasts the smoke budget)")
        return None
    try:
        return torch.compile(fn)
    except Exception as e:                                # no compiler toolchain, unsupported build
        print(f"  torch.compile: unavailable ({type(e).__name__}: {e})")
        return None


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
        ok &= run_op(title, make_inputs, impls, nbytes, LOGPROB_TOL[dtype], env)
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
        ok &= run_op(f"ppo_loss B={B} T={T} fp32, KL k3 + value loss", make_inputs, impls, nbytes, tol, env)
    return ok


OPS = {"logprob": bench_logprob, "ppo_loss": bench_ppo_loss}


def copy_bandwidth(env_device, cuda) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), the roofline here."""
    n = 2 ** 28 if cuda else 2 ** 24                     # 1 GiB on a GPU, 64 MiB on the CPU
    x = torch.empty(n, dtype=torch.float32, device=env_device)
    y = torch.empty_like(x)
    if cuda:
        ms = triton.testing.do_bench(lambda: y.copy_(x), quantiles=[0.5])
    else:
        y.copy_(x)
        t0 = time.perf_counter()
        y.copy_(x)
        ms = (time.perf_counter() - t0) * 1e3
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["all"] + list(OPS), default="all", help="which kernel to bench")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="logits dtype (logprob)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (logprob)")
    parser.add_argument("--entropy", action="store_true", help="also compute the entropy (logprob)")
    parser.add_argument("--kl", action="store_true", help="also compute the k3 KL to a reference (logprob)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("full shapes need a CUDA GPU; use --smoke on the CPU")
    device = "cuda" if cuda else "cpu"
    env = Env(device, cuda, copy_bandwidth(device, cuda), args.smoke)
    name = torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()} (Triton interpreter)"
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        liger = version("liger_kernel")
    except ImportError:
        liger = "not installed"
    print(f"device {name} | torch {torch.__version__} | triton {triton.__version__} | liger {liger}")
    print(f"{datetime.date.today()} | copy bandwidth {env.copy_gbps:.0f} GB/s | dtype {args.dtype}"
          f" | quantiles p50 [p20-p80] | smoke {args.smoke}")
    ok = True
    for op, bench in OPS.items():
        if args.op in ("all", op):
            ok &= bench(args, env)
    print("\nall correctness checks ok" if ok else "\ncorrectness FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
