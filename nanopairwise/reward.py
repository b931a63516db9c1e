"""The PPO reward of a sampled response, and what the run fixes for it at the start.

train_ppo.py --reward picks one of four scores of a response y to prompt x (docs/DESIGN.md §1):

    pairwise    the judge's win probability against the prompt's anchor y*, P(y > y*)
                (both orders, judge.win_probs), then --reward-transform, then / sigma
    pairwise-group  y's mean win probability against the other K - 1 samples of its prompt (with
                --group-anchor also against y*): every unordered pair of the group judged once in
                each order (round_robin_win_rates), then --reward-transform, then / sigma
    bt-anchor   the BT reward model's sigmoid(r(x, y) - r(x, y*)) (scalar_head.bt_anchor_win_probs),
                then --reward-transform, then / sigma: bounded and anchor-relative like
                Pairwise-RL's, from a scalar RM
    bt          the BT reward (r(x, y) - mu) / sigma, the baseline

with mu and sigma the mean and std of that score over rollouts of the initial policy
(--reward-norm init-std; losses.normalize_scores), so that --kl-coef, --value-clip and
--truncation-penalty mean the same thing whatever the reward model (--reward-norm none: raw scores).

Fixed for the run (and kept in its checkpoint): the anchors (gold answers, else best-of-N samples
of the initial policy ranked by the judge: fill_anchors) and the initial policy's score statistics
(measure_reward_norm: mu, sigma, and its truncation rate, from which initial_mean_score gives the
critic's starting value, --critic-bias init-mean).

The judge's cost of a step's rewards (rows and padded tokens it read) comes back with the scores,
so the anchor reward (K judge calls per prompt, x2 orders) and the group reward (K (K - 1) / 2
pairs per prompt, x2 orders; K (K + 1) / 2 with the anchor) can be compared per unit of compute.
"""

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from nanopairwise import batching, losses
from nanopairwise.common import Progress, derive_seed
from nanopairwise.distributed import all_reduce_sum, gathered, get_rank, get_world_size
from nanopairwise.guards import UserError
from nanopairwise.judge import win_probs
from nanopairwise.layouts import JudgeTemplate, Sampling, sample
from nanopairwise.scalar_head import bt_anchor_win_probs, scalar_scores


@dataclass(frozen=True)
class RewardConfig:
    """How a response is scored, fixed for the run: train_ppo.py's reward flags, the reward model's
    own layout and the normalisation measured at the start (--reward-norm)."""
    kind: str                          # --reward: pairwise, pairwise-group, bt or bt-anchor
    template: JudgeTemplate            # the reward model's text layout (its rm_config.json)
    transform: str = "prob"            # --reward-transform, for the win probabilities
    symmetric: bool = True             # --symmetric: the judge scores both orders
    group_size: int = 1                # pairwise-group: K, the samples of a prompt (adjacent rows)
    group_anchor: bool = False         # pairwise-group: the anchor is one more member (--group-anchor)
    norm: dict = None                  # {"mean": mu, "std": sigma, ...} (--reward-norm init-std); None: raw
    shared_prefix: bool = True         # the judge runs each shared prefix once (prefix_sharing.py)


class Scores(NamedTuple):
    scores: torch.Tensor            # (B,) the sequence scores, on the CPU
    win: Optional[torch.Tensor]     # (B,) the raw win probability against the anchor; None without one
    cost: dict                      # the judge's work: perf/judge_rows, perf/judge_tokens ({} for bt)


@torch.no_grad()
def score_responses(prompts, texts, rm, tok, reward: RewardConfig, anchor_scores: dict = None) -> Scores:
    """Sequence scores of responses `texts` to `prompts` (objects with .principle, .prompt, .anchor;
    pairwise-group: K = reward.group_size adjacent rows per prompt), with the raw win probability
    against the anchor and the judge's cost (counted by PairwiseJudge: judge.verdict_probs).
    bt-anchor: `anchor_scores`, a dict the caller keeps for the run, caches r(x, y*) per anchor."""
    rows, tokens = getattr(rm, "rows_scored", 0), getattr(rm, "tokens_scored", 0)
    if reward.kind == "bt":
        items = [(p.principle, p.prompt, y) for p, y in zip(prompts, texts)]
        return Scores(losses.normalize_scores(scalar_scores(rm, tok, reward.template, items), reward.norm), None, {})
    with gathered(rm):                          # verdict logits bypass forward(); per-rank anchor cache misses
        if reward.kind == "pairwise-group":
            win, rates = group_scores(prompts, texts, rm, tok, reward)
        else:
            items = [(p.principle, p.prompt, y, p.anchor) for p, y in zip(prompts, texts)]
            win = rates = (win_probs(rm, tok, reward.template, items, symmetric=reward.symmetric,
                                     shared_prefix=reward.shared_prefix).win
                           if reward.kind == "pairwise"
                           else bt_anchor_win_probs(rm, tok, reward.template, items, anchor_scores))
    cost = ({"perf/judge_rows": rm.rows_scored - rows, "perf/judge_tokens": rm.tokens_scored - tokens}
            if hasattr(rm, "rows_scored") else {})
    scores = losses.normalize_scores(losses.transform_score(rates, reward.transform), reward.norm, center=False)
    return Scores(scores, win, cost)


def group_win_matrix(pair_win: torch.Tensor, n: int) -> torch.Tensor:
    """W (G, n, n) with W[g, i, j] = P(member i > member j) of group g, from pair_win (G, n (n - 1) / 2),
    P(i > j) of each unordered pair i < j in the order of torch.triu_indices(n, n, 1):
    W[i, j] = P(i > j), W[j, i] = 1 - P(i > j), W[i, i] = 0. So W + W^T = 1 off the diagonal, and
    the mean win rate against the other members, W.sum(-1) / (n - 1), sums to n / 2 over a group
    (each of the n (n - 1) / 2 pairs adds exactly 1 to the group's total)."""
    G = pair_win.size(0)
    i, j = torch.triu_indices(n, n, offset=1)
    W = pair_win.new_zeros(G, n, n)
    W[:, i, j] = pair_win
    W[:, j, i] = 1.0 - pair_win
    return W


@torch.no_grad()
def round_robin_win_rates(judge, tok, template, groups, symmetric: bool = True,
                          shared_prefix: bool = True) -> torch.Tensor:
    """W (G, n, n) (group_win_matrix) of `groups`, each (principle, prompt, [n texts]) with the same n.
    One judge batch for all groups: n (n - 1) / 2 unordered pairs per group, each scored in both
    orders and order-symmetrised (judge.win_probs; symmetric=False: one order, half the cost)."""
    n = len(groups[0][2])
    i, j = torch.triu_indices(n, n, offset=1).tolist()
    items = [(principle, prompt, ys[a], ys[b]) for principle, prompt, ys in groups for a, b in zip(i, j)]
    win = win_probs(judge, tok, template, items, symmetric=symmetric, shared_prefix=shared_prefix).win
    return group_win_matrix(win.view(len(groups), -1), n)


def group_scores(prompts, texts, judge, tok, reward: RewardConfig):
    """The pairwise-group reward of each row, (win against the anchor (B,) or None, rate (B,)):
    rate = the row's mean win probability against the other K - 1 samples of its prompt, and with
    reward.group_anchor against the anchor too (mean over K members then)."""
    K, B = reward.group_size, len(texts)
    if K < 2 or B % K or any(prompts[r].prompt != prompts[r - r % K].prompt for r in range(B)):
        raise ValueError(f"pairwise-group: {B} rows are not groups of K = {K} >= 2 samples of one prompt each")
    extra = lambda p: [p.anchor] if reward.group_anchor else []
    groups = [(prompts[g].principle, prompts[g].prompt, texts[g:g + K] + extra(prompts[g])) for g in range(0, B, K)]
    W = round_robin_win_rates(judge, tok, reward.template, groups, reward.symmetric,
                              reward.shared_prefix)                                     # (B / K, n, n)
    n = W.size(1)
    rates = (W.sum(-1) / (n - 1))[:, :K].reshape(B)                                     # the rollouts' rates
    return (W[:, :K, K].reshape(B) if reward.group_anchor else None), rates


@torch.no_grad()
def fill_anchors(prompts, policy, judge, tok, template, n: int, sampling: Sampling, seed: int, device,
                 chunk: int = 16):
    """Best-of-n anchors for prompts without one: n samples of the initial `policy` (a
    PolicyLogprobs), each scored by its mean symmetric win probability against the other n - 1
    (round_robin_win_rates: n (n - 1) / 2 pairs in both orders), the best kept. `chunk` prompts at
    a time share one sampling batch (chunk x n rows) and one judge batch. Every rank does the same
    work with the same seed, so all ranks get the same anchors."""
    missing = [p for p in prompts if not p.anchor]
    if not missing:
        return
    if judge is None:
        raise UserError("prompts without an anchor need a judge (--judge) to pick best-of-N anchors")
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "anchors"))
    progress = Progress(len(missing), f"anchors (best of {n})", every=chunk)
    with gathered(judge):
        for i in range(0, len(missing), chunk):
            rows = missing[i:i + chunk]
            texts = sample(policy, tok, [p.prompt for p in rows for _ in range(n)], sampling, generator).texts(tok)
            groups = [(p.principle, p.prompt, texts[j * n:(j + 1) * n]) for j, p in enumerate(rows)]
            rates = round_robin_win_rates(judge, tok, template, groups).sum(-1)             # (len(rows), n)
            for j, p in enumerate(rows):
                p.anchor = groups[j][2][int(rates[j].argmax())]
            progress.update(i + len(rows))


@torch.no_grad()
def measure_reward_norm(initial_lm, rm, rm_dir: str, tok, prompts, reward: RewardConfig, n_prompts: int, K: int,
                        sampling: Sampling, seed: int, device, require_spread: bool = True) -> dict:
    """Mean and std of the raw score (score_responses without a norm: the BT score r(x, y), or the
    transformed win probability) over K rollouts of the initial policy `initial_lm` on `n_prompts`
    of `prompts` (a seeded draw, split over the ranks; moments all-reduced), and the fraction of
    those rollouts cut off without EOS. 64 prompts x K=4 = 256 scores put the std within ~5%
    (relative standard error 1/sqrt(2n)) for the cost of two steps' rollouts. Returns {"mean",
    "std", "truncated", "n"}; with `require_spread` (the std will divide the scores) raises
    UserError when every score is equal (naming `rm_dir`, the reward model's directory)."""
    world = get_world_size()
    n = min(n_prompts, len(prompts)) // world * world
    if n == 0:
        raise UserError(f"--reward-norm-prompts {n_prompts}: fewer than one prompt per rank ({world}); raise it")
    pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(seed, "reward_norm_prompts")))
    rows = [prompts[i] for i in batching.shard_for_rank(pick[:n].tolist(), get_rank(), world) for _ in range(K)]
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "reward_norm_rollouts", get_rank()))
    rollout = sample(initial_lm, tok, [p.prompt for p in rows], sampling, generator)
    raw = replace(reward, norm=None)
    r = score_responses(rows, rollout.texts(tok), rm, tok, raw, anchor_scores={}).scores.to(device)
    mean, var = losses.masked_moments(r, torch.ones_like(r), distributed=True)
    truncated = all_reduce_sum((~rollout.ended).float().sum().to(device)) / (n * K)
    if require_spread and not var.sqrt().item() > 1e-6:
        raise UserError(f"the reward model gives every one of {n * K} initial-policy rollouts the same score "
                        f"({mean.item():.4g}), so it cannot be normalised; check {rm_dir} (trained?) "
                        "or pass --reward-norm none")
    return {"mean": mean.item(), "std": var.sqrt().item(), "truncated": truncated.item(), "n": n * K}
def initial_mean_score(stats: dict, reward: RewardConfig, truncation_penalty: float) -> float:
    """The initial policy's mean score as the PPO reward sees it (in reward.norm's units, less the
    truncation penalty), from measure_reward_norm's `stats`: what a critic's value should start at
    (--critic-bias init-mean) when its head is fresh. A zero head instead gives the first steps'
    advantages a term score * lambda^(R-1-t) that depends on the token's position only."""
    mean = losses.normalize_scores(torch.tensor(stats["mean"]), reward.norm, center=reward.kind == "bt")
    return mean.item() - truncation_penalty * stats.get("truncated", 0.0)
