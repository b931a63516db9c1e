"""The PPO reward of a sampled response, and what the run fixes for it at the start.

train_ppo.py --reward picks one of three scores of a response y to prompt x (docs/DESIGN.md §1):

    pairwise    the judge's win probability against the prompt's anchor y*, P(y > y*)
                (both orders, judge.win_probs), then --reward-transform
    bt-anchor   the BT reward model's sigmoid(r(x, y) - r(x, y*)) (scalar_head.bt_anchor_win_probs),
                then --reward-transform: bounded and anchor-relative like Pairwise-RL's, from a scalar RM
    bt          the BT reward (r(x, y) - mu) / sigma (losses.normalize_scores), the baseline

Fixed for the run (and kept in its checkpoint): the anchors (gold answers, else best-of-N samples
of the initial policy ranked by the judge: fill_anchors) and, for bt, mu and sigma of the initial
policy's scores (measure_reward_norm).
"""

from dataclasses import dataclass, field

import torch

from nanopairwise import data, losses
from nanopairwise.common import derive_seed
from nanopairwise.distributed import gathered, get_rank, get_world_size
from nanopairwise.guards import UserError
from nanopairwise.judge import JudgeTemplate, win_probs
from nanopairwise.policy import encode_prompt
from nanopairwise.rollout import generate
from nanopairwise.scalar_head import bt_anchor_win_probs, scalar_scores


@dataclass
class RewardConfig:
    """How a response is scored: train_ppo.py's reward flags and the reward model's own layout."""
    kind: str                          # --reward: pairwise, bt or bt-anchor
    template: JudgeTemplate            # the reward model's text layout (its rm_config.json)
    transform: str = "prob"            # --reward-transform, for the win probabilities
    symmetric: bool = True             # --symmetric: the judge scores both orders
    norm: dict = None                  # bt: {"mean": mu, "std": sigma, "n"}; None: raw scores
    anchor_r: dict = field(default_factory=dict)   # bt-anchor: r(x, y*) per anchor, scored once
    shared_prefix: bool = True         # the judge runs each shared prefix once (prefix_sharing.py)


@torch.no_grad()
def score_responses(prompts, texts, rm, tok, reward: RewardConfig):
    """Sequence scores (B,) of responses `texts` to `prompts` (objects with .principle, .prompt,
    .anchor), and the raw win probability against the anchor (B,) (None for bt), on the CPU."""
    if reward.kind != "bt":
        items = [(p.principle, p.prompt, y, p.anchor) for p, y in zip(prompts, texts)]
        with gathered(rm):                      # verdict logits bypass forward(); per-rank anchor cache misses
            win = (win_probs(rm, tok, reward.template, items, symmetric=reward.symmetric,
                             shared_prefix=reward.shared_prefix).win
                   if reward.kind == "pairwise" else bt_anchor_win_probs(rm, tok, reward.template, items, reward.anchor_r))
        return losses.transform_score(win, reward.transform), win
    items = [(p.principle, p.prompt, y) for p, y in zip(prompts, texts)]
    return losses.normalize_scores(scalar_scores(rm, tok, reward.template, items), reward.norm), None


@torch.no_grad()
def fill_anchors(prompts, policy, judge, tok, template, n: int, max_new_tokens: int, temperature: float, seed: int,
                 device):
    """Best-of-n anchors for prompts without one: n samples of the initial `policy` (a
    PolicyLogprobs), each scored by its mean symmetric win probability against the other n - 1
    (round robin, n (n - 1) judge calls in both orders), the best kept. Every rank does the same
    work with the same seed, so all ranks get the same anchors."""
    missing = [p for p in prompts if not p.anchor]
    if not missing:
        return
    if judge is None:
        raise UserError("prompts without an anchor need a judge (--judge) to pick best-of-N anchors")
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "anchors"))
    with gathered(policy), gathered(judge):
        for p in missing:
            rollout = generate(policy.lm, [encode_prompt(tok, p.prompt)] * n, max_new_tokens, tok.stop_token_ids,
                               tok.pad_token_id, temperature=temperature, generator=generator)
            texts = rollout.texts(tok)
            items = [(p.principle, p.prompt, texts[i], texts[j]) for i in range(n) for j in range(n) if i != j]
            win = win_probs(judge, tok, template, items).win.view(n, n - 1).mean(1)   # (n,)
            p.anchor = texts[int(win.argmax())]


@torch.no_grad()
def measure_reward_norm(initial_lm, rm, rm_dir: str, tok, prompts, reward: RewardConfig, n_prompts: int, K: int,
                        max_new_tokens: int, temperature: float, top_p: float, seed: int, device) -> dict:
    """Mean and std of the BT score r(x, y) over K rollouts of the initial policy `initial_lm` on
    `n_prompts` of `prompts` (a seeded draw, split over the ranks; moments all-reduced). 64 prompts x
    K=4 = 256 scores put the std within ~5% (relative standard error 1/sqrt(2n)) for the cost of
    two steps' rollouts. Returns {"mean", "std", "n"}; raises UserError when every score is equal
    (naming `rm_dir`, the reward model's directory)."""
    world = get_world_size()
    n = min(n_prompts, len(prompts)) // world * world
    if n == 0:
        raise UserError(f"--reward-norm-prompts {n_prompts}: fewer than one prompt per rank "
                        f"({world}); raise it, or pass 0 for raw BT scores")
    pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(seed, "reward_norm_prompts")))
    rows = [prompts[i] for i in data.shard_for_rank(pick[:n].tolist(), get_rank(), world) for _ in range(K)]
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "reward_norm_rollouts", get_rank()))
    rollout = generate(initial_lm, [encode_prompt(tok, p.prompt) for p in rows], max_new_tokens, tok.stop_token_ids,
                       tok.pad_token_id, temperature=temperature, top_p=top_p, generator=generator)
    r = scalar_scores(rm, tok, reward.template, [(p.principle, p.prompt, y) for p, y in zip(rows, rollout.texts(tok))])
    mean, var = losses.masked_moments(r.to(device), torch.ones_like(r, device=device), distributed=True)
    if not var.sqrt().item() > 1e-6:
        raise UserError(f"the BT reward model gives every one of {n * K} initial-policy rollouts the same score "
                        f"({mean.item():.4g}), so it cannot be normalised; check --bt-rm {rm_dir} (trained?) "
                        "or pass --reward-norm-prompts 0")
    return {"mean": mean.item(), "std": var.sqrt().item(), "n": n * K}
