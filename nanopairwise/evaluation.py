"""Held-out evaluation: of a PPO policy (what train_ppo.py reports before, during and after
training) and of a reward model on preference pairs (what train_rm.py reports at the end).

One sample per held-out prompt at the training temperature, with a fixed seed per rank, so two
policies (or the same policy before and after) are compared on the same draws. Measured against
ground truth where the prompts carry a built-in task's oracle fields (docs/DESIGN.md §4):

    kl               sum over the response of the full-vocabulary KL(pi || pi_ref) of each position's
                     next-token distribution (losses.exact_kl): exact per sampled prefix, no estimator noise
    kl_k1            sum over the response of log pi(y_t) - log pi_ref(y_t) (the sampled k1 estimate of it)
    length           response tokens (EOS included)
    eos_rate         fraction of responses that ended with EOS before --max-new-tokens
    judge_win_rate   the judge's symmetric P(y > y*) against the prompt's anchor (with a judge)
    oracle_score     the oracle's score of y in [0, 1]
    oracle_win_rate  P(oracle(y) > oracle(y*)), a tie counting half (a gold anchor can only be tied)
    pass_all         principle-following task: the share of responses that meet every check
    pass_<kind>      ... the share that meet the check of that kind, among the prompts that have one

A reward model (evaluate_reward_model): judge.pair_metrics of its P(chosen > rejected) on held-out
pairs (accuracy, oracle accuracy, position consistency, ECE, Brier, the reliability diagram).
"""

import torch

from nanopairwise import batching, losses, principles, tasks
from nanopairwise.common import derive_seed
from nanopairwise.distributed import all_reduce_sum, gathered, get_rank, get_world_size
from nanopairwise.judge import pair_metrics, win_probs
from nanopairwise.layouts import Sampling, sample
from nanopairwise.scalar_head import bt_win_prob, scalar_scores


def has_oracle(meta: dict) -> bool:
    """Whether a prompt record carries a built-in task's oracle fields (digits or principles)."""
    return "checks" in meta or "principle_name" in meta


def oracle_score(meta: dict, response: str) -> float:
    """The oracle of the record's built-in task: principles.oracle_score where it has "checks"
    (nanopairwise/principles_task.py), else the digit task's tasks.oracle_score."""
    if "checks" in meta:
        return principles.oracle_score(meta["checks"], meta["question"], response)
    return tasks.oracle_score(meta["principle_name"], meta["numbers"], response)


@torch.no_grad()
def evaluate_policy(policy, ref, judge, prompts, tok, judge_template, sampling: Sampling, seed: int, device) -> dict:
    """The metrics above, means over `prompts`, each rank scoring its share (every rank calls
    this: FSDP forwards are collective; sums are all-reduced). policy / ref: PolicyLogprobs;
    judge: PairwiseJudge or None."""
    policy.eval()
    mine = batching.shard_for_rank(prompts, get_rank(), get_world_size())
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "eval", get_rank()))
    rollout = sample(policy, tok, [p.prompt for p in mine], sampling, generator)
    texts = rollout.texts(tok)
    input_ids, attention_mask = rollout.sequences()                  # (B, P + R)
    response_mask = rollout.response_mask.float()                    # (B, R)
    kl, kl_k1 = exact_sequence_kl(policy, ref, input_ids, attention_mask, rollout.response_mask, sampling.temperature)
    sums = {"kl": kl, "kl_k1": kl_k1, "length": response_mask.sum(1), "eos_rate": rollout.ended.float()}
    if judge is not None:
        items = [(p.principle, p.prompt, y, p.anchor) for p, y in zip(mine, texts)]
        with gathered(judge):
            sums["judge_win_rate"] = win_probs(judge, tok, judge_template, items).win
    if all(has_oracle(p.meta) for p in prompts):
        score = torch.tensor([oracle_score(p.meta, y) for p, y in zip(mine, texts)])
        anchor_score = torch.tensor([oracle_score(p.meta, p.anchor) for p in mine])
        sums.update(oracle_score=score,
                    oracle_win_rate=(score > anchor_score).float() + 0.5 * (score == anchor_score).float())
    counts = {}
    if all("checks" in p.meta for p in prompts):                     # the principle-following task
        met = [principles.check_results(p.meta["checks"], y) for p, y in zip(mine, texts)]
        sums["pass_all"] = torch.tensor([float(all(m.values())) for m in met])
        for kind in principles.KIND_NAMES:
            counts[f"pass_{kind}"] = sum(any(c[0] == kind for c in p.meta["checks"]) for p in prompts)
            if counts[f"pass_{kind}"]:
                sums[f"pass_{kind}"] = torch.tensor([float(m.get(kind, False)) for m in met])
    totals = all_reduce_sum(torch.stack([v.float().sum().to(device) for v in sums.values()]))
    policy.train()
    return {k: (t / counts.get(k, len(prompts))).item() for k, t in zip(sums, totals)}


@torch.no_grad()
def evaluate_reward_model(model, objective: str, pairs, tok, template, batch_size: int, max_response_tokens: int) -> dict:
    """judge.pair_metrics of P(chosen > rejected) on `pairs`; oracle metrics when the pairs carry
    the built-in task's oracle fields. `model`: PairwiseJudge (objective "pairwise", both orders)
    or ScalarHeadModel ("bt")."""
    was_training = model.training
    model.eval()
    items = [(p.principle, p.prompt, p.chosen, p.rejected) for p in pairs]
    kw = dict(batch_size=batch_size, max_response_tokens=max_response_tokens)
    if objective == "pairwise":
        p_chosen, p_ab, p_ba = win_probs(model, tok, template, items, **kw)
    else:
        r_c = scalar_scores(model, tok, template, [(a, b, c) for a, b, c, _ in items], **kw)
        r_r = scalar_scores(model, tok, template, [(a, b, d) for a, b, _, d in items], **kw)
        p_chosen, p_ab, p_ba = bt_win_prob(r_c, r_r), None, None
    meta = lambda k: torch.tensor([float(p.meta[k]) for p in pairs]) if all(k in p.meta for p in pairs) else None
    metrics = pair_metrics(p_chosen, meta("p_true"), meta("chosen_score"), meta("rejected_score"), p_ab, p_ba)
    model.train(was_training)
    return metrics


@torch.no_grad()
def exact_sequence_kl(policy, ref, input_ids, attention_mask, response_mask, temperature: float, chunk: int = 16):
    """(exact, k1) per response (B,): losses.exact_kl summed over the response's positions, and the
    k1 sum log pi(y_t) - log pi_ref(y_t) of its sampled tokens, read off the same distributions.
    `chunk` rows at a time bound the (rows, R, V) log-distributions (every rank makes the same
    number of calls: FSDP forwards are collective)."""
    exact, k1 = [], []
    mask = response_mask.float()
    R = response_mask.size(1)
    for i in range(0, input_ids.size(0), chunk):
        rows = slice(i, i + chunk)
        args = (input_ids[rows], attention_mask[rows], response_mask[rows], temperature)
        log_p, log_q = policy(*args, full_vocab=True), ref(*args, full_vocab=True)    # (b, R, V)
        exact.append((losses.exact_kl(log_p, log_q) * mask[rows]).sum(1))
        y = input_ids[rows, -R:, None]
        k1.append(((log_p.gather(-1, y) - log_q.gather(-1, y)).squeeze(-1) * mask[rows]).sum(1))
    return torch.cat(exact), torch.cat(k1)


def value_at(points, x: float):
    """Linear interpolation of a frontier at `x`: points [(kl, value), ...] of one seed's runs (one
    per KL coefficient), sorted by kl here; None where x lies outside their kl range (no
    extrapolation). How the comparison at matched KL reads each arm's held-out score."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None
