"""Parity of kernels/logprob.py with nanopairwise.losses.token_logprobs_ref, and of the
reference with autograd of the naive formula in float64.

On the CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py). On a machine with CUDA,
`NANOPAIRWISE_TEST_GPU=1 pytest tests/test_logprob.py` runs the same tests compiled on the GPU;
each test takes a `device` and the device that cannot run is skipped with its reason.
Every case uses random upstream gradients for all three outputs, with a quarter of them zeroed
(a loss mask), ignored rows, -inf logits away from the target, and V not a multiple of BLOCK_V.
"""

import os

import pytest
import torch

from kernels.logprob import token_logprobs
from nanopairwise import ops
from nanopairwise.losses import IGNORE_INDEX, token_logprobs_ref

# tolerance table, keyed by the logits' dtype; "out" = log-prob / entropy / KL, "grad" = d/dlogits
TOL = {
    # fp32 math on both sides, summed in different orders. The entropy gets atol 2e-4 because
    # the reference's is a plain fp32 sum of V terms p*z (measured error 9e-5 at V = 32003 against
    # float64; the kernel's is 1e-6, see test_kernel_is_accurate_in_float64).
    # grad atol 1e-5: an entry is c_lp (onehot - p) - c_H p (z - E_p[z]) with row coefficients
    # up to |g_kl (logprob - ref)| ~ 70 (k2 at log-probs of -35) that can cancel; 70 * 2^-24
    # times a few roundings is ~1e-5 (measured 3.6e-6)
    torch.float32: dict(out=dict(atol=1e-5, rtol=1e-5), entropy=dict(atol=2e-4, rtol=1e-5),
                        grad=dict(atol=1e-5, rtol=1e-5)),
    # bf16 logits upcast exactly, so the outputs are the fp32 case; the gradient is rounded to
    # bf16 once on both sides, and two fp32 values a hair apart can round one bf16 ulp
    # (2^-7 relative) apart
    torch.bfloat16: dict(out=dict(atol=1e-5, rtol=1e-5), entropy=dict(atol=2e-4, rtol=1e-5),
                         grad=dict(atol=1e-5, rtol=2 ** -7)),
}
# |logits| up to 1e4 at T = 0.7: z = x / T and logZ are each rounded to the fp32 grid, whose
# spacing is 2^-10 ~ 1e-3 at |z| ~ 1.4e4, so outputs may differ by two such steps (measured 2e-3).
# p = exp(z - logZ) inherits that error as a relative one; gradient entries are c (onehot - p)
# with |c| < 5 (measured difference 7e-5 in fp32, one bf16 ulp in bf16).
TOL_EXTREME = dict(out=dict(atol=4e-3, rtol=1e-5), grad=dict(atol=1e-3, rtol=2 ** -7))
# reference (fp32) vs float64 autograd on small shapes: fp32 rounding of O(10) values
TOL_F64 = dict(atol=1e-5, rtol=1e-5)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs Triton only "
                                                 "under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                                  reason="compiled GPU run needs CUDA and "
                                                  "NANOPAIRWISE_TEST_GPU=1")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make_case(N, V, dtype, device, scale=3.0, seed=0):
    """Logits with -inf entries (never at the target), a row whose first half is -inf, a row
    whose target wins by a wide margin (log-prob ~ 0, where rounding could go positive), and
    every 7th row ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * scale
    targets = torch.randint(0, V, (N,), generator=g)
    logits[torch.rand(N, V, generator=g) < 0.1] = float("-inf")
    if V > 1:
        logits[1, : V // 2] = float("-inf")
        targets[1] = V // 2 + int(targets[1]) % (V - V // 2)
    logits[torch.arange(N), targets] = torch.randn(N, generator=g) * scale
    logits[2, targets[2]] = logits[2].max() + 30.0
    targets[::7] = IGNORE_INDEX
    ref_logprobs = -torch.rand(N, generator=g) * 3.0
    return logits.to(dtype).to(device), targets.to(device), ref_logprobs.to(device)


def run(fn, logits, targets, ref_logprobs, upstream, **kw):
    """Forward + backward with upstream gradients (dict output name -> (N,)); returns outputs
    and the gradients of logits and ref_logprobs."""
    logits = logits.detach().clone().requires_grad_(True)
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.detach().clone().requires_grad_(True)
    out = fn(logits, targets, ref_logprobs=ref_logprobs, **kw)
    loss = sum((getattr(out, k) * g).sum() for k, g in upstream.items() if getattr(out, k) is not None)
    loss.backward()
    return out, logits.grad, None if ref_logprobs is None else ref_logprobs.grad


def random_upstream(N, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(3, N, generator=g) > 0.25).float()
    grads = torch.randn(3, N, generator=g) * keep
    return {k: grads[i].to(device) for i, k in enumerate(("logprobs", "entropy", "kl"))}


def check_parity(got, want, tol):
    (out, grad, grad_ref), (out_w, grad_w, grad_ref_w) = got, want
    for name in ("logprobs", "entropy", "kl"):
        a, b = getattr(out, name), getattr(out_w, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, **tol.get(name, tol["out"]), msg=lambda m: f"{name}: {m}")
    assert (out.logprobs <= 0).all(), "a log-prob must never be positive"
    assert grad.dtype == grad_w.dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(grad.float(), grad_w.float(), **tol["grad"])
    if grad_ref_w is not None:
        torch.testing.assert_close(grad_ref, grad_ref_w, **tol["out"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,V,temperature,kl", [
    (37, 1000, 1.0, "k1"), (37, 1000, 0.7, "k2"),        # one block, V < BLOCK_V
    (37, 32003, 0.7, "k3"),                              # 8 blocks, max moves between them
    (5, 7, 0.7, "k3"),                                   # tiny V
])
def test_kernel_matches_reference(device, dtype, N, V, temperature, kl):
    logits, targets, ref_logprobs = make_case(N, V, dtype, device)
    upstream = random_upstream(N, device)
    kw = dict(temperature=temperature, entropy=True, kl_estimator=kl)
    got = run(token_logprobs, logits, targets, ref_logprobs, upstream, **kw)
    want = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, **kw)
    check_parity(got, want, TOL[dtype])
    ignored = targets == IGNORE_INDEX
    assert (got[1][ignored] == 0).all(), "ignored rows must get an all-zero gradient"
    assert all((getattr(got[0], k)[ignored] == 0).all() for k in ("logprobs", "entropy", "kl"))


@pytest.mark.parametrize("entropy,with_ref,used", [
    (False, False, ("logprobs",)),                        # plain log-probs: the ENTROPY=False kernels
    (True, False, ("entropy",)),                          # entropy alone: g_logprobs is None
    (True, True, ("logprobs", "kl")),                     # entropy computed but unused in the loss
])
def test_optional_outputs(device, entropy, with_ref, used):
    logits, targets, ref_logprobs = make_case(37, 1000, torch.float32, device, seed=2)
    upstream = {k: g for k, g in random_upstream(37, device).items() if k in used}
    kw = dict(temperature=0.7, entropy=entropy)
    ref_logprobs = ref_logprobs if with_ref else None
    got = run(token_logprobs, logits, targets, ref_logprobs, upstream, **kw)
    want = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, **kw)
    check_parity(got, want, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits(device, dtype):
    """|logits| up to 1e4, ties at the clamp, -inf entries; no NaN, matches the reference."""
    logits, targets, ref_logprobs = make_case(37, 5003, dtype, device, scale=1e4, seed=3)
    logits = logits.clamp(-1e4, 1e4).masked_fill(logits == float("-inf"), float("-inf"))
    upstream = random_upstream(37, device)
    # k1 only: k3's e^(ref - logprob) overflows at log-probs of -1e4 in any implementation
    kw = dict(temperature=0.7, entropy=True, kl_estimator="k1")
    got = run(token_logprobs, logits, targets, ref_logprobs, upstream, **kw)
    want = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, **kw)
    check_parity(got, want, TOL_EXTREME)
    assert torch.isfinite(got[0].entropy).all() and torch.isfinite(got[0].logprobs).all()


def test_target_at_minus_inf(device):
    """A -inf target logit gives log-prob -inf (as the reference), finite entropy and gradient."""
    logits, targets, _ = make_case(6, 300, torch.float32, device, seed=4)
    logits[3, targets[3]] = float("-inf")
    upstream = {k: g for k, g in random_upstream(6, device).items() if k != "kl"}
    got = run(token_logprobs, logits, targets, None, upstream, entropy=True)
    want = run(token_logprobs_ref, logits, targets, None, upstream, entropy=True)
    assert got[0].logprobs[3] == float("-inf")
    finite = torch.isfinite(want[0].logprobs)
    torch.testing.assert_close(got[0].logprobs[finite], want[0].logprobs[finite], **TOL[torch.float32]["out"])
    torch.testing.assert_close(got[0].entropy, want[0].entropy, **TOL[torch.float32]["entropy"])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32]["grad"])


def test_row_strided_and_transposed_logits(device):
    logits, targets, _ = make_case(37, 1000, torch.float32, device, seed=5)
    wide = torch.cat([logits, torch.randn(37, 9, device=device)], dim=1)[:, :1000]   # stride 1009
    upstream = {"logprobs": random_upstream(37, device)["logprobs"]}
    want = run(token_logprobs_ref, logits, targets, None, upstream)
    for view in (wide, logits.t().contiguous().t()):                 # the second copies
        out = token_logprobs(view, targets)
        torch.testing.assert_close(out.logprobs, want[0].logprobs, **TOL[torch.float32]["out"])


def test_dispatch_runs_the_kernel(device):
    logits, targets, ref_logprobs = make_case(37, 1000, torch.bfloat16, device, seed=6)
    upstream = random_upstream(37, device)
    kw = dict(temperature=0.7, entropy=True, kl_estimator="k3")
    got = run(ops.token_logprobs, logits, targets, ref_logprobs, upstream, backend="triton", **kw)
    want = run(ops.token_logprobs, logits, targets, ref_logprobs, upstream, backend="ref", **kw)
    assert "TokenLogprobsFunction" in type(got[0].logprobs.grad_fn).__name__
    assert "TokenLogprobsFunction" not in type(want[0].logprobs.grad_fn).__name__
    check_parity(got, want, TOL[torch.bfloat16])


def test_launcher_rejects_bad_inputs(device):
    logits, targets, _ = make_case(4, 10, torch.float32, device)
    bad = targets.clone()
    bad[1] = 10
    with pytest.raises(ValueError, match="targets must be in"):
        token_logprobs(logits, bad)
    with pytest.raises(ValueError, match="must be"):
        token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="fp32, bf16"):
        token_logprobs(logits.double(), targets)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, targets.float())


def test_kernel_is_accurate_in_float64(device):
    """The kernel's shifted online sums against float64 (tighter than against the fp32 ref)."""
    logits, targets, _ = make_case(37, 32003, torch.float32, device, seed=7)
    out = token_logprobs(logits, targets, temperature=0.7, entropy=True)
    z = logits.double() / 0.7
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    lp64 = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * valid
    ent64 = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) * valid
    torch.testing.assert_close(out.logprobs.double(), lp64, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.entropy.double(), ent64, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# the reference itself, against the naive formula in float64


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_reference_matches_float64_autograd(kl):
    N, V, T = 9, 13, 0.7
    logits, targets, ref_logprobs = make_case(N, V, torch.float32, "cpu", seed=8)
    logits = torch.where(torch.isinf(logits), torch.randn_like(logits), logits)  # finite: 0*log 0
    upstream = random_upstream(N, "cpu")
    got = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, temperature=T,
              entropy=True, kl_estimator=kl)

    x, r = logits.double().requires_grad_(True), ref_logprobs.double().requires_grad_(True)
    valid = (targets != IGNORE_INDEX).double()
    logp = torch.log_softmax(x / T, dim=-1)                                    # (N, V)
    lp = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    log_r = r - lp
    kl_val = {"k1": -log_r, "k2": log_r ** 2 / 2, "k3": torch.exp(log_r) - 1 - log_r}[kl]
    want = dict(logprobs=lp * valid, entropy=entropy * valid, kl=kl_val * valid)
    sum((want[k] * upstream[k].double()).sum() for k in want).backward()
    for k in want:
        torch.testing.assert_close(getattr(got[0], k).double(), want[k], **TOL_F64)
    torch.testing.assert_close(got[1].double(), x.grad, **TOL_F64)
    torch.testing.assert_close(got[2].double(), r.grad, **TOL_F64)


def test_reference_minus_inf_equals_dropped_columns():
    """-inf logits are exactly absent tokens: same outputs as deleting those columns, zero grad."""
    N, V = 6, 20
    g = torch.Generator().manual_seed(9)
    logits, ref_logprobs = torch.randn(N, V, generator=g), -torch.rand(N, generator=g)
    logits[:, ::3] = float("-inf")
    keep = torch.arange(V) % 3 != 0
    targets = keep.nonzero().squeeze(-1)[torch.randint(0, int(keep.sum()), (N,), generator=g)]
    targets[::4] = IGNORE_INDEX
    upstream = random_upstream(N, "cpu")
    kw = dict(temperature=0.7, entropy=True)
    full = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, **kw)
    new_index = torch.cumsum(keep, 0) - 1
    small_targets = torch.where(targets == IGNORE_INDEX, targets, new_index[targets.clamp(min=0)])
    small = run(token_logprobs_ref, logits[:, keep], small_targets, ref_logprobs, upstream, **kw)
    for k in ("logprobs", "entropy", "kl"):
        torch.testing.assert_close(getattr(full[0], k), getattr(small[0], k), **TOL_F64)
    assert (full[1][:, ~keep] == 0).all()
    torch.testing.assert_close(full[1][:, keep], small[1], **TOL_F64)
