"""The generative pairwise judge of Pairwise-RL: its template, model, loss, scoring and metrics.

Pairwise judge (docs/DESIGN.md §1, arXiv 2504.04950). A causal LM reads the principle, the prompt and
responses A and B, each shown as the policy's own chat turn (JudgeTemplate), then the question
"Is the first answer better than the second? Answer Yes or No.", and predicts the next token,
one of two verdict tokens (default " Yes" / " No"; each must be one token of the tokenizer,
checked at start). Training is plain next-token cross-entropy on the verdict token (full
vocabulary, through the fused log-prob kernel); every preference pair is used in both orders
(chosen-first -> Yes, rejected-first -> No), so each position is labelled Yes and No equally
often. That does not make a trained judge position-consistent (measure it: pair_metrics); the
order-symmetrised score below removes position bias by construction. Scoring reads only the two
verdict logits:

    p(a, b)  = softmax([z_yes, z_no])[0] = sigmoid(z_yes - z_no)       one order
    P(a > b) = (p(a, b) + 1 - p(b, a)) / 2                              order-symmetrised

so P(a > b) + P(b > a) = 1 exactly, and an identical pair scores exactly 0.5. In code:
`verdict_probs` gives p(a, b) (one order), `symmetrize` the formula, `win_probs` both at once.
`verdict_probs` runs each prefix its inputs share once, through the KV cache (prefix_sharing.py:
the same probabilities, |dp| <= 1e-5 in fp32).

The judge's input (JudgeTemplate, encode_pair) is laid out in nanopairwise/layouts.py, with every
other model input, so the layouts agree token for token.

Metrics (`pair_metrics`) on held-out pairs: accuracy against the labels and against the oracle's
true ordering, position consistency (and its parts: one-order accuracies, Yes rate, the
consistency of an order-independent judge), ECE (10 bins, over both orientations of every pair)
and Brier score of the pair probability against the oracle's true preference probability.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopairwise import ops, prefix_sharing
from nanopairwise.batching import gather_last, score_batches
from nanopairwise.guards import UserError
from nanopairwise.layouts import JudgeTemplate, encode_pair, encode_pair_segments

# ----------------------------------------------------------------------------------------------
# verdict tokens


class VerdictTokenError(UserError, ValueError):
    """The tokenizer cannot express a verdict as a single token."""


def verdict_token_ids(tokenizer, template: JudgeTemplate):
    """(yes_id, no_id); raises VerdictTokenError unless each verdict is exactly one token."""
    ids = []
    for word in (template.yes, template.no):
        toks = tokenizer.encode(word)
        if len(toks) != 1:
            raise VerdictTokenError(
                f"verdict {word!r} is {len(toks)} tokens {toks} in this tokenizer; the judge needs a "
                f"single token per verdict. Pick other verdicts (e.g. --verdicts ' A',' B') or a tokenizer "
                f"that has {word!r} as one token.")
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise VerdictTokenError(f"verdicts {template.yes!r} and {template.no!r} map to the same token {ids[0]}")
    return ids[0], ids[1]


# ----------------------------------------------------------------------------------------------
# the judge and its loss


class PairwiseJudge(nn.Module):
    """A causal LM used as a judge. forward() returns the next-token logits after each input (B, V),
    so DDP/FSDP see one ordinary forward; `verdict_logits` picks the two verdict columns and counts
    its cost: `rows_scored` inputs and `tokens_scored` (padded) tokens read so far (verdict_probs
    counts them too when it runs the trunk itself, prefix-shared, and reads `verdict_logits_at`)."""

    def __init__(self, lm: nn.Module, yes_id: int, no_id: int):
        super().__init__()
        self.lm = lm
        self.yes_id, self.no_id = yes_id, no_id
        self.rows_scored, self.tokens_scored = 0, 0

    def forward(self, input_ids, attention_mask):
        hidden = self.lm.trunk(input_ids, attention_mask=attention_mask)                # (B, T, C)
        h_last = gather_last(hidden, attention_mask)                                    # (B, C)
        return F.linear(h_last, self.lm.lm_head_weight)                                 # (B, V)

    @torch.no_grad()
    def verdict_logits(self, input_ids, attention_mask):
        """(B, 2) fp32 [z_yes, z_no] without forming the full vocabulary row."""
        self.rows_scored += input_ids.size(0)
        self.tokens_scored += input_ids.numel()            # padded: what the forward computes on (no host sync)
        hidden = self.lm.trunk(input_ids, attention_mask=attention_mask)                # (B, T, C)
        return self.verdict_logits_at(gather_last(hidden, attention_mask))

    def verdict_logits_at(self, h_last):
        """(B, 2) fp32 [z_yes, z_no] from the final hidden states at the answer position (B, C)."""
        w = self.lm.lm_head_weight[[self.yes_id, self.no_id]].float()                   # (2, C)
        return h_last.float() @ w.t()


def judge_loss(logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int):
    """Next-token cross-entropy on the verdict token: label 1 -> yes_id, 0 -> no_id.

    logits (B, V) at the answer position; the log-prob goes through ops.token_logprobs (kernel or reference).
    Returns (loss, p_yes_two_way (B,) detached) for logging.
    """
    targets = torch.where(labels.bool(), torch.full_like(labels, yes_id), torch.full_like(labels, no_id))
    lp = ops.token_logprobs(logits, targets.long()).logprobs                        # (B,)
    with torch.no_grad():
        p_yes = torch.sigmoid(logits[:, yes_id].float() - logits[:, no_id].float())
    return -lp.mean(), p_yes


def position_consistency_loss(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """Mean (p(a > b) - (1 - p(b > a)))^2 over pairs whose two orders are adjacent rows (2i: a
    first, 2i + 1: b first; train_rm.py's batches). With d = z_yes - z_no, p(a > b) = sigmoid(d_2i)
    and 1 - p(b > a) = sigmoid(-d_2i+1): zero exactly when the verdict flips with the order, so
    it penalises position bias, whatever the label. Bounded in [0, 1] like the probabilities."""
    d = logits[:, yes_id].float() - logits[:, no_id].float()                           # (2b,)
    return (torch.sigmoid(d[0::2]) - torch.sigmoid(-d[1::2])).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# scoring


def symmetrize(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """P(a > b) from the judge's two orders: (p(a, b) + 1 - p(b, a)) / 2."""
    return 0.5 * (p_ab + 1.0 - p_ba)


@torch.no_grad()
def verdict_probs(judge: PairwiseJudge, tokenizer, template, items, batch_size=64,
                  max_response_tokens=256, device=None, shared_prefix=True):
    """p(a, b) = sigmoid(z_yes - z_no), the judge's verdict for each (principle, prompt, a, b)
    item in the order given: (n,) fp32 on CPU. With `shared_prefix` every prefix the items share
    (principle + prompt, and the first answer) is run once (nanopairwise/prefix_sharing.py; the
    same probabilities); without, each input is run whole, in length-sorted batches."""
    if shared_prefix and items:
        segmented = [encode_pair_segments(tokenizer, template, *it, max_response_tokens=max_response_tokens)
                     for it in items]
        h_last, tokens = prefix_sharing.last_hidden_states(judge.lm, segmented, tokenizer.pad_token_id, batch_size)
        judge.rows_scored += len(items)
        judge.tokens_scored += tokens                   # padded, each shared prefix once
        z = judge.verdict_logits_at(h_last)                                             # (n, 2)
        return torch.sigmoid(z[:, 0] - z[:, 1]).cpu()
    encode = lambda it: encode_pair(tokenizer, template, *it, max_response_tokens=max_response_tokens)

    def score(ids, mask):
        z = judge.verdict_logits(ids, mask)                                             # (b, 2)
        return torch.sigmoid(z[:, 0] - z[:, 1])
    return score_batches(score, encode, items, tokenizer.pad_token_id, batch_size,
                         device or judge.lm.lm_head_weight.device)


class WinProbs(NamedTuple):
    win: torch.Tensor              # (n,) P(a > b): symmetrize(p_ab, p_ba), or p_ab with one order
    p_ab: torch.Tensor             # (n,) the verdict with a shown first
    p_ba: Optional[torch.Tensor]   # (n,) the verdict with b shown first; None with one order


@torch.no_grad()
def win_probs(judge, tokenizer, template, items, symmetric=True, **kw) -> WinProbs:
    """Win probability of a over b for each (principle, prompt, a, b), both orders by default
    (scored in one verdict_probs call, so the orders share their prefix); with symmetric=False
    only one order is scored (half the cost) and win = p_ab. `kw`: verdict_probs' options."""
    if not symmetric:
        p_ab = verdict_probs(judge, tokenizer, template, items, **kw)
        return WinProbs(p_ab, p_ab, None)
    swapped = [(pr, q, b, a) for pr, q, a, b in items]
    p = verdict_probs(judge, tokenizer, template, list(items) + swapped, **kw)
    p_ab, p_ba = p[:len(items)], p[len(items):]
    return WinProbs(symmetrize(p_ab, p_ba), p_ab, p_ba)


# ----------------------------------------------------------------------------------------------
# metrics


def reliability_bins(prob: torch.Tensor, target_prob: torch.Tensor, n_bins: int = 10) -> dict:
    """The data of a reliability diagram: equal-width bins b of the predicted probability on
    [0, 1], each with its count n_b, mean prediction and mean target (empty bins: None).
    A calibrated model has mean_prob == mean_target in every bin (the diagonal)."""
    prob, target_prob = prob.double(), target_prob.double()
    bins = (prob * n_bins).long().clamp(0, n_bins - 1)
    out = {"bin_edges": [b / n_bins for b in range(n_bins + 1)], "count": [], "mean_prob": [], "mean_target": []}
    for b in range(n_bins):
        sel = bins == b
        out["count"].append(int(sel.sum().item()))
        out["mean_prob"].append(prob[sel].mean().item() if sel.any() else None)
        out["mean_target"].append(target_prob[sel].mean().item() if sel.any() else None)
    return out


def expected_calibration_error(prob: torch.Tensor, target_prob: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of predicted probabilities against target probabilities, equal-width bins on [0, 1]:
    sum_b (n_b / n) * |mean(prob in b) - mean(target_prob in b)| (the bins of reliability_bins)."""
    rel = reliability_bins(prob, target_prob, n_bins)
    n = sum(rel["count"])
    return sum(c / n * abs(p - t) for c, p, t in zip(rel["count"], rel["mean_prob"], rel["mean_target"]) if c)


def both_orientations(prob: torch.Tensor, target_prob: torch.Tensor):
    """(prob, target) over both orientations of every pair: (p, pi) and (1 - p, 1 - pi), (2n,) each.

    Which response of a labelled pair is "chosen" was sampled from the labeller's own probability
    pi, so binning P(chosen > rejected) against pi of the recorded orientation alone is biased: a
    bin's mean target is E[pi^2 | p] / E[pi | p] >= p, above the diagonal for any imperfect model
    (and lower for an overconfident one). Both orientations weigh each pair's two readings equally,
    so a predictor with E[pi | p] = p sits on the diagonal (tests/test_judge.py)."""
    return torch.cat([prob, 1 - prob]), torch.cat([target_prob, 1 - target_prob])


def order_metrics(p_ab: torch.Tensor, p_ba: torch.Tensor) -> dict:
    """Position consistency of a judge scored one order at a time, and its parts.

    p_ab, p_ba (n,) one-order P(first is better) for (chosen, rejected) and (rejected, chosen).
      position_consistency        fraction of pairs whose preferred response is the same in both orders
      accuracy_chosen_first       a1 = fraction of pairs answered right with chosen shown first (Yes)
      accuracy_chosen_second      a2 = the same with chosen shown second (No)
      yes_rate                    fraction of Yes verdicts over both orders (0.5: no position bias)
      independent_consistency     a1 a2 + (1 - a1)(1 - a2): the consistency a judge with these
                                  accuracies would have if its errors in the two orders were independent
    Consistency above the independent value means the orders' errors are correlated (the same pairs
    are hard in both orders); a Yes rate away from 0.5 is position bias."""
    right_ab, right_ba = (p_ab > 0.5).float(), (p_ba <= 0.5).float()    # the verdict is Yes iff p > 0.5
    a1, a2 = right_ab.mean().item(), right_ba.mean().item()
    return {"position_consistency": (right_ab == right_ba).float().mean().item(),
            "accuracy_chosen_first": a1, "accuracy_chosen_second": a2,
            "yes_rate": 0.5 * ((p_ab > 0.5).float().mean() + (p_ba > 0.5).float().mean()).item(),
            "independent_consistency": a1 * a2 + (1 - a1) * (1 - a2)}


def pair_metrics(p_chosen: torch.Tensor, p_true: torch.Tensor, q_chosen: torch.Tensor,
                 q_rejected: torch.Tensor, p_ab: torch.Tensor = None, p_ba: torch.Tensor = None) -> dict:
    """Held-out metrics of a pair probability P(chosen > rejected).

    p_chosen   (n,) model probability that chosen beats rejected
    p_true     (n,) oracle's probability that a labeller prefers chosen (the label-noise model)
    q_chosen, q_rejected (n,) oracle quality scores; pairs with equal quality are left out of
               the oracle accuracy
    p_true / q_* may be None (user data without an oracle): those metrics are then left out.
    Every metric is a float except "reliability" (with p_true), the reliability diagram's bins.
    ECE and the reliability bins are over both orientations of every pair (both_orientations).
    p_ab, p_ba (n,) the judge's one-order probabilities p(chosen, rejected) and p(rejected, chosen):
               position consistency and its parts (order_metrics). A scalar RM is consistent by
               construction (reported as 1.0, without the parts).
    """
    metrics = {"accuracy": (p_chosen > 0.5).float().mean().item(), "position_consistency": 1.0}
    if q_chosen is not None and q_rejected is not None:
        decided = q_chosen != q_rejected
        metrics["oracle_accuracy"] = ((p_chosen > 0.5) == (q_chosen > q_rejected))[decided].float().mean().item()
    if p_true is not None:
        prob, target = both_orientations(p_chosen, p_true)
        metrics["ece"] = expected_calibration_error(prob, target)
        metrics["reliability"] = reliability_bins(prob, target)  # a dict: the diagram's data
        metrics["brier"] = ((p_chosen.double() - p_true.double()) ** 2).mean().item()   # the same in both
    if p_ab is not None and p_ba is not None:
        metrics.update(order_metrics(p_ab, p_ba))
    return metrics
