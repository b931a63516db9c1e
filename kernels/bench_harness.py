"""The op-independent half of kernels/bench.py: check against the eager reference, then time.

run_op does, for one op and shape, given implementations (Impl: a name, a function of the op's
inputs that returns a NamedTuple of outputs, and whether a mismatch is a bug of this repository):
  1. correctness: one forward + backward of every implementation, on its own fresh copy of the
     check inputs, with the same random upstream gradients, compared output by output and input
     gradient by input gradient with the eager reference (check_outputs). A mismatch of ours fails
     the op and nothing is timed; a peer that disagrees or cannot run is reported and left out.
  2. measurement of the ones that agree (measure): peak memory of one forward + backward beyond
     the inputs, then ms for forward, backward (retained graph) and both.
  3. a table (print_table): ms p50 [p20-p80]; a rate from the op's work formula (Rate: bytes ->
     GB/s against this device's copy bandwidth, or FLOPs -> TFLOP/s against a cuBLAS GEMM, both
     measured in the same run); speedup, peak MB and peak ratio against a baseline row.
On a GPU times come from triton.testing.do_bench (L2 flushed, leaves' .grad reset between calls);
on the CPU (--smoke, Triton interpreter) from a plain timer: those only prove the path runs.
This module imports triton, so kernels/bench.py sets TRITON_INTERPRET before importing it.
"""

import time
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.testing

QUANTILES = [0.5, 0.2, 0.8]          # p50, p20, p80
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}   # --dtype names


class Impl(NamedTuple):
    name: str
    fn: Callable          # fn(*inputs) -> NamedTuple of outputs (None for absent ones)
    ours: bool            # a mismatch of ours fails the run; a peer's only drops its row
    tol: dict = None      # own tolerances (out=, grad=) when it rounds differently; None: the op's


class Rate(NamedTuple):
    """The rate column: the work of each pass, the same for every implementation (so the column
    ranks rows like the time does), and the best rate this device reached on a plain op."""
    work: dict            # pass -> bytes or FLOPs
    unit: str             # "GB/s" or "TFLOP/s"
    scale: float          # 1e9 or 1e12
    roof: float           # copy bandwidth (GB/s) or a cuBLAS GEMM (TFLOP/s), measured in this run
    roof_name: str        # its column header, "%copy" or "%mm"


def bandwidth(nbytes, env) -> Rate:
    """Rate of a memory-bound op: bytes per pass, against the copy bandwidth."""
    return Rate(nbytes, "GB/s", 1e9, env.copy_gbps, "%copy")


# ----------------------------------------------------------------------------------------------
# checking and measuring


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
    """got / want = (outputs NamedTuple, leaf grads); prints one line, True when they agree.
    tol: out= and grad= keyword dicts for assert_close; `atol_rel` in place of atol means atol
    = atol_rel * the reference tensor's largest magnitude (for sums of terms of either sign)."""
    pairs = [(f"out.{k}", a, b) for k, a, b in zip(want[0]._fields, got[0], want[0]) if b is not None]
    pairs += [(f"grad[{i}]", a, b) for i, (a, b) in enumerate(zip(got[1], want[1]))]
    for what, a, b in pairs:
        kw = dict(tol["grad" if what.startswith("grad") else "out"])
        if "atol_rel" in kw:
            kw["atol"] = kw.pop("atol_rel") * b.float().abs().max().item()
        try:
            assert a is not None, "missing"
            torch.testing.assert_close(a.float(), b.float(), **kw)
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
        outs = None   # frees the retained graph before the fwd+bwd timing
        res["fwd+bwd"] = time_fn(both, leaves, env)
        return res
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        for leaf in leaves:
            leaf.grad = None
        if env.cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# one table


def print_table(results, rate, baseline="eager"):
    """results: {impl name: measure() dict}; speedup and peak ratio are against results[baseline]
    ("-" where it is missing, out of memory, or peak memory is not measured, as on the CPU)."""
    print(f"  {'impl':<10} {'pass':<8} {'ms p50 [p20-p80]':<28} {rate.unit:>8} {rate.roof_name:>6} "
          f"{'x ' + baseline:>10} {'peak MB':>9} {'peak x':>7}")
    base = results.get(baseline, {"oom": True})
    for name, res in results.items():
        if res.get("oom"):
            print(f"  {name:<10} out of memory")
            continue
        for phase in PASSES:
            p50, p20, p80 = res[phase]
            value = rate.work[phase] / (p50 * 1e-3) / rate.scale
            speedup = f"{base[phase][0] / p50:.2f}x" if not base.get("oom") else "-"
            peak = ratio = "-"
            if phase == "fwd+bwd" and res["peak"] is not None:
                peak = f"{res['peak']:.0f}"
                ratio = f"{res['peak'] / base['peak']:.3f}" if not base.get("oom") and base["peak"] else "-"
            print(f"  {name:<10} {phase:<8} {f'{p50:.3f} [{p20:.3f}-{p80:.3f}]':<28} {value:8.2f} "
                  f"{100 * value / rate.roof:5.1f}% {speedup:>10} {peak:>9} {ratio:>7}")


def print_versus(results, name, baseline, time_goal, peak_goal):
    """One line: name's fwd+bwd time and peak memory as ratios to baseline's, each with its goal
    (an upper bound). A report, never the exit code: that is for correctness."""
    ours, base = results.get(name, {"oom": True}), results.get(baseline, {"oom": True})
    if ours.get("oom") or base.get("oom"):
        print(f"  {name} vs {baseline}: - (a row is missing or out of memory)")
        return
    time_x = ours["fwd+bwd"][0] / base["fwd+bwd"][0]
    peak_x = f"{ours['peak'] / base['peak']:.3f}x" if ours["peak"] is not None else "- (not measured on CPU)"
    print(f"  {name} vs {baseline}: fwd+bwd time {time_x:.2f}x (goal <= {time_goal}x), "
          f"peak memory {peak_x} (goal <= {peak_goal}x)")


def run_op(title, make_inputs, impls, rate, tol, env, baseline="eager") -> Optional[dict]:
    """Check every impl against impls[0] (eager) on make_inputs(check=True) with tolerances tol
    (dict out=, grad=; an Impl's own tol wins), then measure the ones that agree on
    make_inputs(check=False) and print the table. Returns {impl name: measure() dict}, or None
    when one of ours disagrees (nothing is timed then)."""
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
        if check_outputs(impl.name, got, want, impl.tol or tol):
            passed.append(impl)
        elif impl.ours:
            ok = False
    del inputs, leaves, want
    if not ok:
        return None
    results = {}
    for impl in passed:
        inputs, leaves = make_inputs(check=False)
        results[impl.name] = measure(impl, inputs, leaves, env)
        del inputs, leaves
    print_table(results, rate, baseline)
    return results


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
# the compute roofline of a FLOP-rated table


def gemm_tflops(M, K, N, dtype, env) -> float:
    """TFLOP/s (2 M K N FLOPs) of one (M, K) @ (K, N) matmul on random operands in dtype: the
    compute roofline of a table whose work is that GEMM (cuBLAS on a GPU)."""
    a = torch.randn(M, K, device=env.device).to(dtype)
    b = torch.randn(N, K, device=env.device).to(dtype)
    ms = time_fn(lambda: a @ b.t(), [], env)[0]
    return 2 * M * K * N / (ms * 1e-3) / 1e12
