"""The generative pairwise judge and the BT baseline (nanopairwise/judge.py): template rendering,
verdict-token checks, both-orders loss, the symmetric win probability, metrics on hand-made cases.

Tolerances: fp32 on CPU; losses of the same logits in another row order agree to 1e-6.
"""

import math

import pytest
import torch

from nanopairwise.batching import pad_batch
from nanopairwise.judge import (PairwiseJudge, VerdictTokenError, expected_calibration_error, judge_loss, pair_metrics,
                                position_consistency_loss, verdict_token_ids, win_probs)
from nanopairwise.layouts import JudgeTemplate, encode_pair, encode_single
from nanopairwise.losses import masked_moments, normalize_scores
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.rm_checkpoint import load_rm_config, save_rm_config
from nanopairwise.scalar_head import ScalarHeadModel, bt_anchor_win_probs, bt_loss, scalar_scores
from nanopairwise.tokenizer import train_bpe

TEMPLATE = JudgeTemplate()
CORPUS = ["Principle: Sort the numbers in ascending order.", "User: sort ascending: 3 1 2\nAssistant: 1 2 3",
          f"{TEMPLATE.question}\nAnswer: Yes", f"{TEMPLATE.question}\nAnswer: No"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 400)


def random_judge(tok, hidden_size=32, num_attention_heads=4):
    """A tiny random judge (GQA: 2 K/V heads) on `tok`, seeded (also used by test_prefix_sharing.py)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=num_attention_heads, num_key_value_heads=2,
                      tie_word_embeddings=True)
    lm = Transformer(cfg)
    with torch.no_grad():  # larger random weights than the 0.02 init, so verdicts differ by input
        for p in lm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return PairwiseJudge(lm, *verdict_token_ids(tok, TEMPLATE)).eval()


@pytest.fixture(scope="module")
def judge(tok):
    return random_judge(tok)


def test_template_renders_literal_strings(tok):
    text = TEMPLATE.render(tok, "Sort the numbers in ascending order.", "sort ascending: 3 1 2", "1 2 3", "3 2 1")
    assert text == ("Principle: Sort the numbers in ascending order.\n"
                    "User: sort ascending: 3 1 2\nAssistant: 1 2 3<|endoftext|>\n"
                    "User: sort ascending: 3 1 2\nAssistant: 3 2 1<|endoftext|>\n"
                    "Is the first answer better than the second? Answer Yes or No.\nAnswer:")
    assert tok.decode(TEMPLATE.prefix_ids(tok, "P.", "q"), skip_special_tokens=False) == "Principle: P.\nUser: q\nAssistant: "
    assert (tok.decode(TEMPLATE.pair_ids(tok, "P.", "q", tok.encode("gold")), skip_special_tokens=False)
            == "Principle: P.\nUser: q\nAssistant: gold<|endoftext|>\nUser: q\nAssistant: ")
    chatml = train_bpe(CORPUS, 400, chat_template="chatml")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert TEMPLATE.render(chatml, "P.", convo, "a", "b") == (
        "Principle: P.\n<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na"
        "<|im_end|>\n<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nb"
        "<|im_end|>\nIs the first answer better than the second? Answer Yes or No.\nAnswer:")


def test_encode_pair_is_pieces_concatenated_and_truncates(tok):
    e = tok.encode
    head = e("Principle: P.\n") + e("User: q\nAssistant: ")       # plain: no bos
    mid = e("<|endoftext|>\n") + e("User: q\nAssistant: ")
    tail = e("<|endoftext|>\n") + e(f"{TEMPLATE.question}\nAnswer:")
    assert encode_pair(tok, TEMPLATE, "P.", "q", "1 2 3", "3 2 1") == head + e("1 2 3") + mid + e("3 2 1") + tail
    cut = encode_pair(tok, TEMPLATE, "P.", "q", "1 2 3", "3 2 1", max_response_tokens=1)
    assert cut == head + e("1 2 3")[:1] + mid + e("3 2 1")[:1] + tail
    assert encode_single(tok, TEMPLATE, "P.", "q", "1 2 3") == head + e("1 2 3") + [tok.eos_token_id]


def test_verdicts_must_be_single_distinct_tokens(tok):
    assert len(set(verdict_token_ids(tok, TEMPLATE))) == 2
    with pytest.raises(VerdictTokenError, match=r"verdict ' Absolutely' is \d+ tokens"):
        verdict_token_ids(tok, JudgeTemplate(yes=" Absolutely"))
    with pytest.raises(VerdictTokenError, match="map to the same token"):
        verdict_token_ids(tok, JudgeTemplate(yes=" Yes", no=" Yes"))


def test_rm_config_roundtrip(tmp_path):
    t = JudgeTemplate(question="Better?", yes=" A", no=" B")
    save_rm_config(str(tmp_path), "bt", t)
    assert load_rm_config(str(tmp_path)) == ("bt", t)
    assert load_rm_config(str(tmp_path / "none")) == ("pairwise", JudgeTemplate())


def both_orders_batch(tok, pairs, flip=False):
    """Judge inputs for pairs in both orders; flip=True lists each pair rejected-first (label 0) first."""
    seqs, labels = [], []
    for c, r in pairs:
        rows = [(c, r, 1), (r, c, 0)]
        for a, b, label in (rows[::-1] if flip else rows):
            seqs.append(encode_pair(tok, TEMPLATE, "P.", "sort ascending: 3 1 2", a, b))
            labels.append(label)
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    return ids, mask, torch.tensor(labels)


def test_swapping_a_b_with_the_label_leaves_the_loss_unchanged(tok, judge):
    pairs = [("1 2 3", "3 2 1"), ("1 2", "2 1 3"), ("3", "1 2 3 3")]
    losses = []
    for flip in (False, True):
        ids, mask, labels = both_orders_batch(tok, pairs, flip)
        with torch.no_grad():
            losses.append(judge_loss(judge(ids, mask), labels, judge.yes_id, judge.no_id)[0])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    ids, mask, labels = both_orders_batch(tok, pairs)
    with torch.no_grad():  # the test can fail: labels attached to the wrong order change the loss
        wrong = judge_loss(judge(ids, mask), 1 - labels, judge.yes_id, judge.no_id)[0]
    assert abs(wrong.item() - losses[0].item()) > 1e-2


def test_judge_loss_is_verdict_cross_entropy():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 0, 1])
    loss, p_yes = judge_loss(logits, labels, yes_id=3, no_id=7)
    want = torch.nn.functional.cross_entropy(logits, torch.where(labels.bool(), 3, 7))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(p_yes, torch.sigmoid(logits[:, 3] - logits[:, 7]))


def test_symmetric_win_probability(tok, judge):
    items = [("P.", "q", "1 2 3", "3 2 1"), ("P.", "q", "7", "7 7"), ("P.", "q", "1 2", "1 2")]
    p, p_ab, p_ba = win_probs(judge, tok, TEMPLATE, items, batch_size=2)
    q, _, _ = win_probs(judge, tok, TEMPLATE, [(a, b, y, x) for a, b, x, y in items])
    torch.testing.assert_close(p + q, torch.ones(3), atol=1e-6, rtol=0)
    assert p[2].item() == 0.5                                      # identical responses tie exactly
    assert not torch.allclose(p_ab, 1 - p_ba)                      # the raw orders differ (position bias)
    one, p_one, none = win_probs(judge, tok, TEMPLATE, items, symmetric=False, batch_size=2)
    assert none is None and torch.equal(one, p_one) and torch.equal(p_one, p_ab)
    z = judge.verdict_logits(*pad_batch([encode_pair(tok, TEMPLATE, *items[0])], tok.pad_token_id))
    full = judge(*pad_batch([encode_pair(tok, TEMPLATE, *items[0])], tok.pad_token_id))
    torch.testing.assert_close(z[0], full[0, [judge.yes_id, judge.no_id]], atol=1e-5, rtol=1e-5)


def test_bt_loss_and_scalar_head(tok):
    torch.testing.assert_close(bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])),
                               torch.tensor((math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=False)
    rm = ScalarHeadModel(Transformer(cfg))
    assert not rm.lm.lm_head.weight.requires_grad                  # unused by a scalar head: frozen for DDP
    scores = scalar_scores(rm, tok, TEMPLATE, [("P.", "q", "1 2 3")])
    assert scores.tolist() == [0.0]                                # the fresh head starts at zero


def test_bt_anchor_win_prob_is_sigmoid_of_the_score_gap_and_symmetric(tok):
    """sigmoid(r(y) - r(y*)) with r(x, y*) cached once per anchor; swapping y and y* gives 1 - p."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4)
    rm = ScalarHeadModel(Transformer(cfg)).eval()
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)           # a non-zero head: scores differ by response
    items = [("P.", "q", "1 2 3", "3 2 1"), ("P.", "q", "7", "3 2 1"), ("P.", "r", "7 7", "1")]
    cache = {}
    p = bt_anchor_win_probs(rm, tok, TEMPLATE, items, cache)
    r_y = scalar_scores(rm, tok, TEMPLATE, [(a, b, y) for a, b, y, _ in items])
    r_star = scalar_scores(rm, tok, TEMPLATE, [(a, b, s) for a, b, _, s in items])
    torch.testing.assert_close(p, torch.sigmoid(r_y - r_star), atol=1e-6, rtol=0)
    assert len(cache) == 2 and not torch.allclose(p, torch.full_like(p, 0.5))   # two distinct anchors, scored once
    swapped = bt_anchor_win_probs(rm, tok, TEMPLATE, [(a, b, s, y) for a, b, y, s in items], {})
    torch.testing.assert_close(p + swapped, torch.ones(3), atol=1e-6, rtol=0)
    cache[("P.", "q", "3 2 1")] = 100.0                            # the cached anchor score is the one used
    assert bt_anchor_win_probs(rm, tok, TEMPLATE, items[:1], cache).item() < 1e-6


def test_normalize_scores_and_head():
    r = torch.tensor([1.0, 3.0, 5.0])
    mean, var = torch.tensor(3.0), torch.tensor(8.0 / 3.0)
    m, v = masked_moments(r, torch.ones(3))
    torch.testing.assert_close((m, v), (mean, var))
    norm = {"mean": m.item(), "std": v.sqrt().item()}
    z = normalize_scores(r, norm)
    torch.testing.assert_close((z.mean(), z.std(unbiased=False)), (torch.tensor(0.0), torch.tensor(1.0)))
    assert normalize_scores(r, None) is r
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    rm = ScalarHeadModel(Transformer(cfg))
    torch.nn.init.normal_(rm.score_head.weight)
    ids, mask = torch.randint(0, 64, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    raw = rm(ids, mask)
    rm.normalize_head_(norm["mean"], norm["std"])                  # the critic predicts the normalised score
    torch.testing.assert_close(rm(ids, mask), normalize_scores(raw, norm), atol=1e-5, rtol=1e-5)


def test_position_consistency_loss_by_hand():
    """Rows 2i (a first) and 2i + 1 (b first): zero when the verdict flips with the order."""
    logits = torch.zeros(4, 5)
    logits[0, 1], logits[1, 2] = 2.0, 2.0               # pair 1: Yes then No, consistent
    logits[2, 1], logits[3, 1] = 2.0, 2.0               # pair 2: Yes in both orders, position bias
    s = torch.sigmoid(torch.tensor(2.0))
    expected = (0.0 + (s - (1 - s)) ** 2) / 2
    torch.testing.assert_close(position_consistency_loss(logits, 1, 2), expected)


def test_pair_metrics_by_hand():
    p = torch.tensor([0.95, 0.85, 0.35, 0.65])       # model P(chosen > rejected), away from bin edges
    p_true = torch.tensor([0.9, 0.6, 0.4, 0.5])      # labeller model
    q_c = torch.tensor([1.0, 0.5, 0.2, 0.7])
    q_r = torch.tensor([0.5, 0.4, 0.6, 0.7])          # last pair: equal quality, left out of oracle accuracy
    p_ab = torch.tensor([0.9, 0.6, 0.4, 0.7])
    p_ba = torch.tensor([0.2, 0.3, 0.7, 0.6])         # pair 4 gets the same verdict in both orders
    m = pair_metrics(p, p_true, q_c, q_r, p_ab, p_ba)
    assert m["accuracy"] == 0.75 and m["oracle_accuracy"] == 1.0 and m["position_consistency"] == 0.75
    # a1 = 3/4 (pair 3 wrong with chosen first), a2 = 2/4 (pairs 3 and 4 wrong with chosen second); 5 Yes of 8
    assert m["accuracy_chosen_first"] == 0.75 and m["accuracy_chosen_second"] == 0.5 and m["yes_rate"] == 0.625
    assert m["independent_consistency"] == pytest.approx(0.75 * 0.5 + 0.25 * 0.5)
    # both orientations: (p, pi) in bins 9, 8, 3, 6 and (1 - p, 1 - pi) in bins 0, 1, 6, 3; bins 3 and 6
    # hold two each (0.35 vs 0.4 and 0.5; 0.65 vs 0.6 and 0.5), the others one
    assert m["ece"] == pytest.approx((2 * 0.05 + 2 * 0.25 + 2 * 0.10 + 2 * 0.10) / 8)
    assert m["brier"] == pytest.approx((0.05 ** 2 + 0.25 ** 2 + 0.05 ** 2 + 0.15 ** 2) / 4)
    two = expected_calibration_error(torch.tensor([0.71, 0.79]), torch.tensor([1.0, 0.0]))
    assert two == pytest.approx(abs(0.75 - 0.5))     # same bin: averages cancel before the |.|
    rel = m["reliability"]                            # the reliability diagram's bins
    assert rel["count"] == [1, 1, 0, 2, 0, 0, 2, 0, 1, 1] and rel["bin_edges"][3:5] == [0.3, 0.4]
    assert rel["mean_prob"][8] == pytest.approx(0.85) and rel["mean_target"][8] == pytest.approx(0.6)
    assert rel["mean_prob"][2] is None and rel["mean_target"][5] is None  # empty bins
    bare = pair_metrics(p, None, None, None)
    assert set(bare) == {"accuracy", "position_consistency"}


def _sampled_orientation(logit_scale: float, n: int = 40000):
    """Synthetic held-out pairs as the task labels them: pi = the labeller's P(A > B), a predictor
    p = sigmoid(logit_scale * logit(E[pi | p])) (1: calibrated by construction), and the recorded
    orientation sampled from pi: (p, pi) when A was chosen, else (1 - p, 1 - pi)."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    pi = torch.distributions.Beta(4 * p, 4 * (1 - p)).sample()       # E[pi | p] = p, spread like label noise
    a_chosen = torch.rand(n, generator=g, dtype=torch.float64) < pi
    pred = torch.sigmoid(logit_scale * torch.logit(p))
    return torch.where(a_chosen, pred, 1 - pred), torch.where(a_chosen, pi, 1 - pi)


def test_ece_is_unbiased_by_the_sampled_orientation():
    """The calibrated predictor sits on the diagonal over both orientations (ECE <= 0.02), where the
    recorded orientation alone puts it far above; an overconfident one (logit doubled) is clearly worse."""
    torch.manual_seed(0)
    p_chosen, p_true = _sampled_orientation(1.0)
    calibrated = pair_metrics(p_chosen, p_true, None, None)["ece"]
    assert calibrated <= 0.02
    assert expected_calibration_error(p_chosen, p_true) > 0.05     # the one-orientation bias this removes
    overconfident = pair_metrics(*_sampled_orientation(2.0), None, None)["ece"]
    assert overconfident > calibrated + 0.05
