"""PPO math in nanopairwise/losses.py: GAE, clipping, a toy bandit update, masks, global whitening.

These are behaviour tests of the reference math the training loop uses (the fused kernel is
tested against the same reference in test_ppo_loss.py).
"""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanopairwise import losses

# tolerance table: all math here is fp32; sums of <= 50 terms of O(1) values
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one Python loop per row, reversed over each row's own steps."""
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_reversed_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 13
    lengths = [13, 1, 7, 9, 4]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    adv, ret = losses.gae(rewards, values, mask, gamma, lam)
    want = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, want, **TOL[torch.float32])
    torch.testing.assert_close(ret, (want + values) * mask, **TOL[torch.float32])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda1_gamma1_is_return_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = losses.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0.4, 0.0]]))


def _pg(lp, old_lp, adv, clip=0.2):
    return losses.ppo_loss_ref(lp, old_lp, adv, torch.ones_like(lp), clip_low=clip, clip_high=clip)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_boundaries(sign):
    """Inside [1-eps, 1+eps] the gradient is the unclipped one; beyond the clip in the direction the
    advantage pushes, the gradient is zero and the token counts in clipfrac."""
    eps = 0.2
    old = torch.zeros(1)
    adv = torch.tensor([sign])
    for log_ratio, clipped in [(0.0, False), (0.9 * eps, False), (-0.9 * eps, False),
                               (sign * 1.5 * eps, True), (-sign * 1.5 * eps, False)]:
        lp = torch.tensor([log_ratio], requires_grad=True)
        out = _pg(lp, old, adv, eps)
        out.pg_loss.backward()
        ratio = torch.exp(lp.detach())
        if clipped:
            assert lp.grad.abs().item() == 0.0, (sign, log_ratio)
            assert out.clipfrac.item() == 1.0
        else:
            torch.testing.assert_close(lp.grad, -adv * ratio)                  # d(-A r)/d lp = -A r
            assert out.clipfrac.item() == 0.0
    # exactly at ratio 1: the loss is -A and the ratio statistics are 1
    out = _pg(torch.zeros(1), old, adv, eps)
    torch.testing.assert_close(out.pg_loss, -adv[0])
    assert out.ratio_mean.item() == 1.0 and out.approx_kl.item() == 0.0


def test_asymmetric_clip():
    adv = torch.tensor([1.0])
    lp = torch.tensor([0.25], requires_grad=True)                  # ratio 1.284
    loose = losses.ppo_loss_ref(lp, torch.zeros(1), adv, torch.ones(1), clip_low=0.2, clip_high=0.3)
    tight = losses.ppo_loss_ref(lp, torch.zeros(1), adv, torch.ones(1), clip_low=0.2, clip_high=0.2)
    assert loose.clipfrac.item() == 0.0 and tight.clipfrac.item() == 1.0


def test_bandit_update_raises_advantaged_action():
    """One PPO step on a 4-armed bandit policy raises the log-prob of the action with A > 0."""
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3, 2, 2])
    adv = torch.tensor([-1.0, -1.0, 2.0, -1.0, 2.0, 2.0])
    old_lp = torch.log_softmax(logits, -1)[actions].detach()
    opt = torch.optim.SGD([logits], lr=0.5)
    lp = torch.log_softmax(logits, -1)[actions]
    losses.ppo_loss_ref(lp, old_lp, adv, torch.ones(6)).loss.backward()
    opt.step()
    new = torch.log_softmax(logits.detach(), -1)
    assert new[2] > old_lp[2] + 0.1
    assert (new[[0, 1, 3]] < old_lp[[0, 1, 3]]).all()


def test_only_sampled_tokens_get_advantages_and_gradients():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    scores = torch.randn(B, generator=g)
    kl = torch.randn(B, T, generator=g).abs()
    rewards = losses.shape_rewards(scores, mask, kl, kl_coef=0.1)
    assert (rewards[mask == 0] == 0).all()
    torch.testing.assert_close(rewards[0, 2], scores[0] - 0.1 * kl[0, 2])      # score lands on the last token
    adv, ret = losses.gae(rewards, torch.randn(B, T, generator=g), mask)
    adv = losses.masked_whiten(adv, mask)
    assert (adv[mask == 0] == 0).all()
    lp = torch.randn(B, T, generator=g, requires_grad=True)
    values = torch.randn(B, T, generator=g, requires_grad=True)
    out = losses.ppo_loss_ref(lp, lp.detach() + 0.05, adv, mask, values=values, old_values=values.detach(),
                              returns=ret)
    out.loss.backward()
    assert (lp.grad[mask == 0] == 0).all() and (values.grad[mask == 0] == 0).all()
    assert (lp.grad[mask == 1] != 0).any()


def test_masked_whiten_statistics():
    g = torch.Generator().manual_seed(2)
    x = 3 + 5 * torch.randn(4, 9, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    w = losses.masked_whiten(x, mask)
    sel = w[mask == 1]
    assert abs(sel.mean().item()) < 1e-5 and abs(sel.var(unbiased=False).item() - 1) < 1e-4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whiten_worker(rank, world, port, x, mask, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    half = x.size(0) // world
    rows = slice(rank * half, (rank + 1) * half)
    out[rows] = losses.masked_whiten(x[rows], mask[rows], distributed=True)
    dist.destroy_process_group()


def test_global_whitening_equals_single_process():
    """Whitening over 2 gloo ranks, each with half the rows, equals whitening the whole batch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 7, generator=g) * 2 + 1
    mask = (torch.rand(6, 7, generator=g) > 0.4).float()
    mask[:3] *= 0.0
    mask[0, :2] = 1.0                                            # the ranks hold very different counts
    out = torch.zeros_like(x).share_memory_()
    mp.spawn(_whiten_worker, args=(2, _free_port(), x, mask, out), nprocs=2, join=True)
    torch.testing.assert_close(out, losses.masked_whiten(x, mask), **TOL[torch.float32])
    per_rank = torch.cat([losses.masked_whiten(x[:3], mask[:3]), losses.masked_whiten(x[3:], mask[3:])])
    assert not torch.allclose(out, per_rank)                     # the test can tell the two apart


def test_reward_transforms_and_kl_estimators():
    p = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(losses.transform_score(p, "centered"), p - 0.5)
    torch.testing.assert_close(losses.transform_score(p, "logit"), torch.log(p / (1 - p)))
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(losses.kl_estimate(lp, ref, "k1"), lp - ref)
    torch.testing.assert_close(losses.kl_estimate(lp, ref, "k2"), 0.5 * (ref - lp) ** 2)
    torch.testing.assert_close(losses.kl_estimate(lp, ref, "k3"), torch.exp(ref - lp) - 1 - (ref - lp))
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(lp, ref, "k4")


# ----------------------------------------------------------------------------------------------
# critic-free advantages: grpo / rloo over each prompt's K samples


def test_group_advantages_hand_computed_with_masks_and_unequal_lengths():
    """Two groups of K = 3 rows, lengths 4, 2, 1 and 3, 3, 2; padding holds garbage the mask must
    drop. Group 1 returns R = 0.8, 0.5, 0.2 (KL part included): mean 0.5, sample std 0.3, so grpo
    gives 1, 0, -1 and rloo R_i - mean(others) = 0.45, 0, -0.45. Group 2's returns are all 0.5:
    every advantage is 0 (grpo divides 0 by eps)."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    rewards = torch.tensor([[-0.1, -0.1, 0.0, 1.0], [0.2, 0.3, 5.0, 5.0], [0.2, 9.0, 9.0, 9.0],
                            [0.0, 0.0, 0.5, 7.0], [0.1, -0.1, 0.5, 7.0], [0.25, 0.25, 3.0, 3.0]])
    per_row = {"grpo": [1.0, 0.0, -1.0, 0.0, 0.0, 0.0], "rloo": [0.45, 0.0, -0.45, 0.0, 0.0, 0.0]}
    for estimator, want in per_row.items():
        adv = losses.group_advantages_ref(rewards, mask, 3, estimator)
        torch.testing.assert_close(adv, torch.tensor(want)[:, None] * mask, **TOL[torch.float32])
        assert (adv[mask == 0] == 0).all()
    swapped = losses.group_advantages_ref(rewards[[3, 4, 5, 0, 1, 2]], mask[[3, 4, 5, 0, 1, 2]], 3, "grpo")
    torch.testing.assert_close(swapped[3:], losses.group_advantages_ref(rewards, mask, 3, "grpo")[:3])
    # the groups are the K adjacent rows: read as K = 2, the same rows give other advantages
    assert not torch.allclose(losses.group_advantages_ref(rewards, mask, 2, "rloo"),
                              losses.group_advantages_ref(rewards, mask, 3, "rloo"))
    with pytest.raises(ValueError, match="not groups of K = 4"):
        losses.group_advantages_ref(rewards, mask, 4, "grpo")


def test_estimate_advantages_per_estimator():
    """gae = GAE whitened (and the critic's lambda-returns); rloo = the group advantages whitened;
    grpo = the group advantages as they are (the group std normalises); no returns without a critic."""
    g = torch.Generator().manual_seed(4)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).float()
    rewards, values = torch.randn(6, 5, generator=g) * mask, torch.randn(6, 5, generator=g) * mask
    adv, ret = losses.estimate_advantages("gae", rewards, values, mask, 3, 1.0, 0.9, 1.0)
    torch.testing.assert_close(adv, losses.masked_whiten(losses.gae(rewards, values, mask, 1.0, 0.9)[0], mask))
    torch.testing.assert_close(ret, losses.gae(rewards, values, mask, 1.0, 1.0)[1])
    adv, ret = losses.estimate_advantages("grpo", rewards, None, mask, 3)
    assert ret is None and torch.equal(adv, losses.group_advantages_ref(rewards, mask, 3, "grpo"))
    adv, ret = losses.estimate_advantages("rloo", rewards, None, mask, 3)
    assert ret is None
    torch.testing.assert_close(adv, losses.masked_whiten(losses.group_advantages_ref(rewards, mask, 3, "rloo"), mask))
    with pytest.raises(ValueError, match="choose one of gae, grpo, rloo"):
        losses.estimate_advantages("vtrace", rewards, values, mask, 3)


def test_exact_kl_is_the_full_vocabulary_sum():
    """losses.exact_kl against torch's KL divergence, 0 for equal distributions, and a token with
    pi(v) = 0 (logit -inf) adds nothing even where pi_ref(v) > 0."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    log_q = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(losses.exact_kl(log_p, log_q), expected)
    torch.testing.assert_close(losses.exact_kl(log_p, log_p), torch.zeros(3, 5))
    log_p0 = torch.log_softmax(torch.tensor([0.0, 0.0, -float("inf")]), -1)
    log_q0 = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    assert losses.exact_kl(log_p0, log_q0).item() == pytest.approx(math.log(2.0))


def test_value_at_interpolates_inside_the_range_only():
    from nanopairwise.evaluation import value_at
    points = [(0.5, 0.7), (0.1, 0.6), (1.0, 0.9)]                    # unsorted: sorted by KL inside
    assert value_at(points, 0.3) == pytest.approx(0.65) and value_at(points, 0.75) == pytest.approx(0.8)
    assert value_at(points, 0.1) == pytest.approx(0.6) and value_at(points, 1.0) == pytest.approx(0.9)
    assert value_at(points, 0.05) is None and value_at(points, 1.5) is None   # no extrapolation


def test_position_correlation_sees_the_zero_critic_artefact():
    """A constant critic at 0 under a positive score: GAE's advantages are lam^(L-1-t) s, highly
    correlated with that shape; a critic at the mean score leaves only s - mean, uncorrelated."""
    g = torch.Generator().manual_seed(0)
    B, T = 64, 20
    lengths = torch.randint(8, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    scores = 0.45 + 0.1 * torch.randn(B, generator=g)
    rewards = losses.shape_rewards(scores, mask)
    corr = {}
    for name, bias in (("zero", 0.0), ("mean", scores.mean().item())):
        advantages, _ = losses.gae(rewards, torch.full((B, T), bias) * mask, mask, 1.0, 0.95)
        corr[name] = losses.position_correlation(advantages, mask, 0.95).item()
    assert corr["zero"] > 0.6 and abs(corr["mean"]) < 0.1, corr
