"""Parity of the fused PPO loss (kernels/ppo_loss.py) with losses.ppo_loss_ref, forward and backward.

Every PPOLoss field and the gradients of logprobs and values, under random upstream gradients on
loss and on each component loss, for fp32 and bf16 inputs, odd shapes, masks with an empty row,
no / k1 / k2 / k3 KL, with and without the value loss, asymmetric clips and ratios spread across
both clip boundaries. Exact boundary cases pin torch's conventions, which the reference inherits:
maximum splits a tie in half, clamp passes its gradient on the closed range [lo, hi].
Devices: 'cpu' runs the kernels under TRITON_INTERPRET=1 (set by conftest.py); 'cuda' runs them
compiled when a GPU is present and NANOPAIRWISE_TEST_GPU=1 keeps the interpreter off.
"""

import os

import pytest
import torch
from torch.testing import assert_close

from kernels.ppo_loss import ppo_loss
from nanopairwise import losses, ops

# Tolerance table, keyed by the dtype of the inputs.
# Forward: both sides cast the same input values to fp32 and do fp32 math, so bf16 inputs need no
# more room than fp32 ones; results differ by summation order (per-block partial sums vs one
# torch sum over <= 3000 O(1) terms, ~sqrt(N) ulp) and a few ulp of exp/expm1 (the kernel's expm1
# is a series; compiled tl.exp is an approximate ex2). Losses near 0 (a mean of signed terms) need atol.
FWD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=1e-5)}
# Backward, compared as M * grad (M = mask sum) so each token's gradient is O(1): fp32 differs by
# a few ulp of exp; bf16 gradients are rounded from nearly equal fp32 values, which can land on
# the two sides of a rounding boundary: one bf16 ulp, 2^-7 relative at most.
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=2 ** -7)}
# approx_kl and the k3 KL at ratios within ~1e-3 of 1 are ~1e-7: atol would accept anything, so
# relative only. Both sides use an expm1 without cancellation (error ~ulp(lr) vs lr^2 / 2: ~1e-4
# relative); exp(lr) - 1 would be off by ~10% per token.
NEAR_ONE_TOL = dict(atol=0.0, rtol=1e-3)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                                  reason="needs CUDA and NANOPAIRWISE_TEST_GPU=1")),
]
SHAPES = [(7, 37), (3, 1000), (1, 1)]     # one partial block; three blocks, the last partial; one token
KL_ESTIMATORS = [None, "k1", "k2", "k3"]       # None: no ref_logprobs, no KL term


def make_inputs(shape, dtype, device, seed, kl=True, value=True, mask_dtype=torch.float32):
    """Random PPO inputs; old_logprobs and old_values are noisy enough that many tokens clip."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda scale=1.0: scale * torch.randn(shape, generator=g)  # noqa: E731
    lp = rnd(0.5) - 1.0
    mask = torch.rand(shape, generator=g) > 0.3
    mask.view(-1)[:1] = True                                       # never empty by chance
    if shape[0] > 1:
        mask[1] = False                                            # an all-padding row
    inp = dict(logprobs=lp, old_logprobs=lp + rnd(0.3), advantages=rnd(), mask=mask.to(mask_dtype))
    if kl:
        inp["ref_logprobs"] = lp + rnd(0.3)
    if value:
        v = rnd()
        inp.update(values=v, old_values=v + rnd(0.3), returns=rnd())
    inp = {k: x.to(device, x.dtype if k == "mask" else dtype) for k, x in inp.items()}
    for k in ("logprobs", "values"):
        if k in inp:
            inp[k].requires_grad_(True)
    return inp


def run(fn, inp, upstream, **kwargs):
    """fn's PPOLoss and d(g . (loss, pg_loss, v_loss, kl_loss)) / d(logprobs, values)."""
    out = fn(**inp, **kwargs)
    total = sum(g * x for g, x in zip(upstream, (out.loss, out.pg_loss, out.v_loss, out.kl_loss)))
    wrt = [inp[k] for k in ("logprobs", "values") if k in inp]
    return out, torch.autograd.grad(total, wrt)


def assert_parity(got, want, dtype, mask):
    """Every PPOLoss field, then the gradients scaled by M (same dtype as the inputs)."""
    (out, grads), (ref, ref_grads) = got, want
    for field in losses.PPOLoss._fields:
        assert_close(getattr(out, field), getattr(ref, field), **FWD_TOL[dtype],
                     msg=lambda m: f"{field}: {m}")
    count = mask.float().sum().clamp(min=1.0)
    for x, y in zip(grads, ref_grads):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert_close(x.float() * count, y.float() * count, **GRAD_TOL[dtype])


def both(inp, upstream, **kwargs):
    """(fused, reference) results of run() on the same inputs."""
    return run(ppo_loss, inp, upstream, **kwargs), run(losses.ppo_loss_ref, inp, upstream, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kl", KL_ESTIMATORS)
@pytest.mark.parametrize("value", [False, True])
def test_parity_with_reference(device, dtype, shape, kl, value):
    seed = 8 * SHAPES.index(shape) + 2 * KL_ESTIMATORS.index(kl) + int(value)     # fixed, one per case
    inp = make_inputs(shape, dtype, device, seed, kl=kl is not None, value=value)
    upstream = torch.randn(4, generator=torch.Generator().manual_seed(5)).tolist()
    kwargs = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator=kl or "k3", vf_coef=0.7)
    got, want = both(inp, upstream, **kwargs)
    assert_parity(got, want, dtype, inp["mask"])
    if shape != (1, 1):        # the inputs reach both branches of each maximum, or the test is weak
        assert 0.05 < want[0].clipfrac.item() < 0.6
        assert not value or 0.05 < want[0].vf_clipfrac.item() < 0.6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (0, 7)])
def test_empty_mask_gives_zeros(device, dtype, shape):
    """No counted token (or no token at all): every field is 0, never NaN, and no gradient flows."""
    inp = make_inputs(shape, dtype, device, seed=1)
    inp["mask"] = torch.zeros(shape, device=device)
    upstream = [0.7, -1.3, 0.4, 2.1]
    got, want = both(inp, upstream)
    assert_parity(got, want, dtype, inp["mask"])
    for field in losses.PPOLoss._fields:
        assert getattr(got[0], field).item() == 0.0, field
    assert all((x == 0).all() for x in got[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.0, 0.2), (0.2, 0.0), (0.0, 0.0)])
def test_ratio_exactly_one_and_on_the_clip_boundary(device, clip_low, clip_high):
    """Ratio exactly 1 (lp == old_lp), inside the range or exactly on 1 - clip_low / 1 + clip_high
    (a zero clip): pg1 == pg2, the tie splits the gradient and the inclusive clamp passes its half,
    so every token gets the full -A r / M. An exclusive clamp would give half of it."""
    adv = torch.tensor([[1.0, -1.0, 0.0, 2.5, -0.5]], device=device)
    lp = torch.full_like(adv, -0.7, requires_grad=True)
    inp = dict(logprobs=lp, old_logprobs=lp.detach().clone(), advantages=adv, mask=torch.ones_like(adv))
    kwargs = dict(clip_low=clip_low, clip_high=clip_high)
    got, want = both(inp, [1.0, 0, 0, 0], **kwargs)
    assert_parity(got, want, torch.float32, inp["mask"])
    out, (grad,) = got
    assert_close(grad * adv.numel(), -adv, **GRAD_TOL[torch.float32])      # -A r with r = 1, times M
    assert out.clipfrac.item() == 0.0 and out.ratio_max.item() == 1.0 and out.approx_kl.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_ratios_near_one_keep_relative_accuracy(device):
    """The first PPO epoch has ratios within ~1e-3 of 1, where expm1(lr) - lr ~ lr^2 / 2 is tiny."""
    inp = make_inputs((7, 37), torch.float32, device, seed=3, value=False)
    g = torch.Generator().manual_seed(8)
    inp["old_logprobs"] = inp["logprobs"].detach() + 1e-3 * torch.randn(7, 37, generator=g).to(device)
    inp["ref_logprobs"] = inp["logprobs"].detach() + 1e-3 * torch.randn(7, 37, generator=g).to(device)
    upstream = [0.5, 1.0, 0.0, -2.0]
    got, want = both(inp, upstream, kl_coef=0.1)
    assert_parity(got, want, torch.float32, inp["mask"])
    assert 1e-8 < want[0].approx_kl.item() < 1e-5 and 1e-8 < want[0].kl_loss.item() < 1e-5
    assert_close(got[0].approx_kl, want[0].approx_kl, **NEAR_ONE_TOL)
    assert_close(got[0].kl_loss, want[0].kl_loss, **NEAR_ONE_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_value_clip_boundaries(device):
    """old_v = 0.5, c = 0.25, all exact in binary. v - old_v = +c and -c exactly: v_clip == v, a tie,
    full gradient v - R per token (0.5 * 2 (v - R)). Beyond the clip: the larger branch decides, and
    on a tie between distinct branches (v, v_clip mirror images about R) torch gives half."""
    v = torch.tensor([[0.75, 0.25, 1.0, 1.0, 1.0]], device=device, requires_grad=True)
    ret = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.875]], device=device)
    zeros = torch.zeros_like(ret)
    inp = dict(logprobs=zeros.clone().requires_grad_(), old_logprobs=zeros, advantages=zeros,
               mask=torch.ones_like(ret), values=v, old_values=torch.full_like(ret, 0.5), returns=ret)
    kwargs = dict(value_clip=0.25, vf_coef=1.0)
    got, want = both(inp, [0, 0, 1.0, 0], **kwargs)
    assert_parity(got, want, torch.float32, inp["mask"])
    # tokens: tie at +c; tie at -c; v_clip = 0.75 is closer to R = 0, so vl1 wins; vl2 wins, no
    # gradient; v - R = 0.125 = -(v_clip - R), a tie: half of v - R
    want_grad = torch.tensor([[0.75, -0.75, 1.0, 0.0, 0.0625]], device=device)   # times M
    assert_close(got[1][1] * 5, want_grad, **GRAD_TOL[torch.float32])
    assert got[0].vf_clipfrac.item() == pytest.approx(0.2)                     # token 4 only


@pytest.mark.parametrize("device", DEVICES)
def test_mask_dtypes_and_fractional_weights(device):
    """bool, int64 and float 0/1 masks give identical results; fractional weights match the reference."""
    inp = make_inputs((5, 29), torch.float32, device, seed=2, mask_dtype=torch.bool)
    upstream = [1.1, -0.3, 0.8, 0.5]
    base = run(ppo_loss, inp, upstream)
    for dtype in (torch.int64, torch.float32):
        other = run(ppo_loss, {**inp, "mask": inp["mask"].to(dtype)}, upstream)
        assert_parity(other, base, torch.float32, inp["mask"])
    weights = inp["mask"] * torch.rand(5, 29, generator=torch.Generator().manual_seed(3)).to(device)
    inp["mask"] = weights
    assert_parity(*both(inp, upstream), torch.float32, weights)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_triton_matches_ref(device):
    """Through ops.ppo_loss, twice each way: a second Triton call must still dispatch."""
    inp = make_inputs((4, 33), torch.bfloat16, device, seed=4)
    upstream = [0.9, 0.2, -0.6, 1.4]
    kwargs = dict(clip_low=0.1, clip_high=0.3, kl_coef=0.1, kl_estimator="k2")
    fused = run(lambda **a: ops.ppo_loss(**a, backend="triton"), inp, upstream, **kwargs)
    ref = run(lambda **a: ops.ppo_loss(**a, backend="ref"), inp, upstream, **kwargs)
    assert_parity(fused, ref, torch.bfloat16, inp["mask"])
    again = run(lambda **a: ops.ppo_loss(**a, backend="triton"), inp, upstream, **kwargs)
    assert_parity(again, ref, torch.bfloat16, inp["mask"])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs_are_not_modified(device):
    """Transposed views work, the inputs are left untouched, data tensors get no gradient."""
    inp = make_inputs((13, 6), torch.float32, device, seed=6)
    views = {k: x.detach().t().contiguous().t() for k, x in inp.items()}   # same values, column-major
    for k in ("logprobs", "values", "old_logprobs"):                       # old_logprobs: data, no grad
        views[k].requires_grad_(True)
    assert not views["logprobs"].is_contiguous()
    before = {k: x.detach().clone() for k, x in views.items()}
    upstream = [1.0, 0.3, -0.2, 0.6]
    out = run(ppo_loss, views, upstream, kl_coef=0.1)
    assert_parity(out, run(losses.ppo_loss_ref, inp, upstream, kl_coef=0.1), torch.float32, inp["mask"])
    assert all(torch.equal(x.detach(), before[k]) for k, x in views.items())
    total = ppo_loss(**views).loss
    assert torch.autograd.grad(total, views["old_logprobs"], allow_unused=True) == (None,)


def test_bad_inputs_are_rejected():
    inp = make_inputs((2, 3), torch.float32, "cpu", seed=7, kl=False)
    with pytest.raises(ValueError, match="all or none"):
        ppo_loss(**{**inp, "returns": None})
    with pytest.raises(ValueError, match="advantages"):
        ppo_loss(**{**inp, "advantages": inp["advantages"][:, :2]})
    with pytest.raises(ValueError, match="KL estimator"):
        ppo_loss(**inp, kl_estimator="k4")
    with pytest.raises(TypeError, match="old_logprobs"):
        ppo_loss(**{**inp, "old_logprobs": inp["old_logprobs"].long()})
