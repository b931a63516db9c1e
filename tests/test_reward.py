"""The PPO reward's judge-side parts (nanopairwise/reward.py): the in-group round robin of
--reward pairwise-group and the best-of-N anchors, with test_judge's tiny random judge.

Tolerances: fp32 on CPU; probabilities scored in another batch layout agree to 1e-5.
"""

from types import SimpleNamespace

import pytest
import torch

from nanopairwise import reward
from nanopairwise.judge import win_probs
from nanopairwise.reward import RewardConfig, round_robin_win_rates, score_responses
from nanopairwise.tokenizer import train_bpe
from test_judge import CORPUS, TEMPLATE, random_judge


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 400)


@pytest.fixture(scope="module")
def judge(tok):
    return random_judge(tok)


def test_pairwise_group_rewards_sum_to_half_k(tok, judge):
    """--reward pairwise-group with the random judge: each rollout's reward is its mean symmetric
    win probability against the other K - 1 samples of its prompt (checked against the pairs scored
    one by one), so a group's rewards sum to K / 2; the anchor as one more member makes it (K + 1) / 2
    over the K + 1 members. The judge's cost is K (K - 1) / 2 pairs x 2 orders per prompt."""
    K = 3
    prompts = [SimpleNamespace(principle="P.", prompt=q, anchor=a) for q, a in (("q", "1 2 3"), ("r", "7"))
               for _ in range(K)]
    texts = ["1 2 3", "3 2 1", "2", "7 7", "1", "7 7"]                 # a tie inside group 2 (rows 3 and 5)
    scores, win, cost = score_responses(prompts, texts, judge, tok, RewardConfig("pairwise-group", TEMPLATE,
                                                                                 group_size=K))
    torch.testing.assert_close(scores.view(2, K).sum(1), torch.full((2,), K / 2), atol=1e-6, rtol=0)
    assert win is None and cost["perf/judge_rows"] == 2 * 3 * 2 and cost["perf/judge_tokens"] > 0
    for i in range(len(texts)):                                     # by hand: mean over the others of P(y_i > y_j)
        g = i - i % K
        items = [("P.", prompts[i].prompt, texts[i], texts[j]) for j in range(g, g + K) if j != i]
        torch.testing.assert_close(scores[i], win_probs(judge, tok, TEMPLATE, items).win.mean(), atol=1e-5, rtol=0)
    assert not torch.allclose(scores, torch.full_like(scores, 0.5))  # the judge tells the rollouts apart
    anchored = RewardConfig("pairwise-group", TEMPLATE, group_size=K, group_anchor=True)
    scores_a, win_a, cost_a = score_responses(prompts, texts, judge, tok, anchored)
    groups = [("P.", "q", texts[:K] + ["1 2 3"]), ("P.", "r", texts[K:] + ["7"])]      # the anchor last
    W = round_robin_win_rates(judge, tok, TEMPLATE, groups)
    rates = W.sum(-1) / K                                           # (2, K + 1)
    torch.testing.assert_close(rates.sum(1), torch.full((2,), (K + 1) / 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores_a, rates[:, :K].reshape(-1), atol=1e-6, rtol=0)
    vs_anchor = win_probs(judge, tok, TEMPLATE, [(p.principle, p.prompt, y, p.anchor)
                                                   for p, y in zip(prompts, texts)])
    torch.testing.assert_close(win_a, vs_anchor.win, atol=1e-5, rtol=0)
    assert cost_a["perf/judge_rows"] == 2 * 6 * 2                    # (K + 1) K / 2 pairs per prompt
    one_order = RewardConfig("pairwise-group", TEMPLATE, symmetric=False, group_size=K)
    scores_1, _, cost_1 = score_responses(prompts, texts, judge, tok, one_order)
    torch.testing.assert_close(scores_1.view(2, K).sum(1), torch.full((2,), K / 2), atol=1e-6, rtol=0)
    assert cost_1["perf/judge_rows"] == cost["perf/judge_rows"] // 2
    with pytest.raises(ValueError, match="not groups of K = 4"):
        score_responses(prompts, texts, judge, tok, RewardConfig("pairwise-group", TEMPLATE, group_size=4))


def test_fill_anchors_keeps_each_prompts_round_robin_best(tok, judge, monkeypatch):
    """Best-of-n anchors in batches of `chunk` prompts (3 prompts, chunk 2: a batch boundary inside):
    each prompt without an anchor gets the sample with the highest mean win rate against its own
    other samples, as one prompt scored alone picks it; a prompt with an anchor keeps it."""
    n = 3
    samples = {"q": ["1 2 3", "3 2 1", "2"], "r": ["7 7", "1", "7"], "s": ["4 4 4", "5", "4 5"]}
    monkeypatch.setattr(reward, "sample", lambda policy, tok, prompts, sampling, generator: SimpleNamespace(
        texts=lambda tok: [samples[q][i % n] for i, q in enumerate(prompts)]))
    prompts = [SimpleNamespace(principle="P.", prompt=q, anchor=None) for q in ("q", "r", "s")]
    prompts.append(SimpleNamespace(principle="P.", prompt="t", anchor="gold"))
    reward.fill_anchors(prompts, None, judge, tok, TEMPLATE, n, None, 0, torch.device("cpu"), chunk=2)
    for p in prompts[:3]:
        rates = reward.round_robin_win_rates(judge, tok, TEMPLATE, [("P.", p.prompt, samples[p.prompt])])[0].sum(-1)
        assert p.anchor == samples[p.prompt][int(rates.argmax())]
    assert prompts[3].anchor == "gold"
    assert len({p.anchor for p in prompts[:3]} & {"1 2 3", "7 7", "4 4 4"}) < 3   # not always the first sample
