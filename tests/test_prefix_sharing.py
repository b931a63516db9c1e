"""Prefix-shared scoring (nanopairwise/prefix_sharing.py) against the naive path.

The judge's probabilities through the shared-prefix KV cache equal the naive path's, whole inputs
in padded batches: fp32 |dp| <= 1e-5 on a tiny random model (GQA, chat template with bos),
with responses of unequal length (padding in every batch, right-padded prefixes in the cache),
K rollouts per prompt, duplicates, both orders, and batches small enough that a tree level spans
several batches. The tree's token counts, chain merging and the BT scores' length bucketing are
checked on hand-made cases.
"""

import random

import pytest
import torch

from nanopairwise import judge as J, prefix_sharing as PS, scalar_head as SH
from nanopairwise.tokenizer import train_bpe
from test_judge import random_judge as tiny_judge

random_judge = lambda tok: tiny_judge(tok, hidden_size=48, num_attention_heads=6)    # 3 query heads per K/V head

TEMPLATE = J.JudgeTemplate()
WORDS = "sort the numbers in ascending order 3 1 2 a b c answer yes no first second".split()
CORPUS = [f"Principle: Sort the numbers.\nUser: {' '.join(WORDS[i % 7:])}" for i in range(20)] + [
    f"{TEMPLATE.question}\nAnswer: Yes", f"{TEMPLATE.question}\nAnswer: No"] * 20
# max |p_shared - p_naive| of the judge's verdict probability, by dtype
TOL = {torch.float32: 1e-5}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 400, chat_template="chatml")


def rollout_items(K: int, seed: int = 0):
    """(principle, prompt, y, anchor) for 3 prompts x K rollouts of random lengths (1 to 12 words),
    two principles; the last prompt's first two rollouts are identical."""
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    items = []
    for i in range(3):
        principle, prompt, anchor = ("Be short." if i == 2 else "Sort."), text(2 + 3 * i), text(rng.randint(1, 12))
        ys = [text(rng.randint(1, 12)) for _ in range(K)]
        if i == 2 and K > 1:
            ys[1] = ys[0]
        items += [(principle, prompt, y, anchor) for y in ys]
    return items


@pytest.mark.parametrize("K,batch_size", [(1, 64), (4, 64), (4, 3), (8, 5)])
def test_shared_prefix_probabilities_equal_the_naive_path(tok, K, batch_size):
    judge = random_judge(tok)
    items = rollout_items(K, seed=K)
    naive = J.win_probs(judge, tok, TEMPLATE, items, batch_size=batch_size, shared_prefix=False)
    shared = J.win_probs(judge, tok, TEMPLATE, items, batch_size=batch_size)
    for a, b in ((naive.p_ab, shared.p_ab), (naive.p_ba, shared.p_ba)):
        assert (a - b).abs().max().item() <= TOL[torch.float32]
    assert naive.p_ab.std() > 1e-3                                    # the verdicts differ by input
    # the naive path is the whole input's: one item alone, unbatched
    pr, q, y, a = items[-1]
    ids = torch.tensor([J.encode_pair(tok, TEMPLATE, pr, q, y, a)])
    z = judge.verdict_logits(ids, torch.ones_like(ids))
    assert abs(torch.sigmoid(z[0, 0] - z[0, 1]).item() - shared.p_ab[-1].item()) <= TOL[torch.float32]


def test_round_robin_both_orders_are_one_tree(tok):
    """Best-of-N anchors score every ordered pair in both orders: each input once, same numbers."""
    judge = random_judge(tok)
    texts = ["1 2 3", "3 2 1", "a b", "answer yes no first"]
    items = [("Sort.", "sort 3 1 2", texts[i], texts[j]) for i in range(4) for j in range(4) if i != j]
    naive = J.win_probs(judge, tok, TEMPLATE, items, shared_prefix=False).win
    shared = J.win_probs(judge, tok, TEMPLATE, items).win
    assert (naive - shared).abs().max().item() <= TOL[torch.float32]
    segmented = [J.encode_pair_segments(tok, TEMPLATE, *it) for it in items]
    swapped = [J.encode_pair_segments(tok, TEMPLATE, pr, q, b, a) for pr, q, a, b in items]
    n_naive, n_shared = PS.shared_token_counts(segmented + swapped)
    assert n_shared == PS.shared_token_counts(segmented)[1]          # the swapped inputs are the same inputs
    assert n_naive == 2 * sum(map(len, (sum(s, []) for s in segmented)))


def test_tree_merges_chains_and_counts_tokens():
    segmented = [([1, 2], [3], [4, 5]), ([1, 2], [3], [6]), ([1, 2], [7, 8], [9]), ([1, 2], [3], [4, 5]),
                 ([10], [11], [12])]
    (root, single) = PS.build_tree(segmented)
    assert root.ids == [1, 2] and single.ids == [10, 11, 12] and single.items == [4] and not single.children
    mid, chain = root.children.values()
    assert mid.ids == [3] and chain.ids == [7, 8, 9] and chain.items == [2]   # a one-child chain is one node
    assert [c.items for c in mid.children.values()] == [[0, 3], [1]]         # duplicates are one node
    assert PS.shared_token_counts(segmented) == (5 + 4 + 5 + 5 + 3, 2 + 1 + 2 + 1 + 3 + 3)
    with pytest.raises(ValueError, match="input 1 has no tokens"):
        PS.build_tree([([1],), ([], [])])


def test_scalar_scores_are_length_bucketed_and_in_order(tok):
    """score_batches sorts by length before batching: the scores come back in the items' order
    and equal each input's score alone."""
    torch.manual_seed(0)
    lm = random_judge(tok).lm
    rm = SH.ScalarHeadModel(lm).eval()
    with torch.no_grad():
        rm.score_head.weight.normal_()
    items = [(pr, q, y) for pr, q, y, _ in rollout_items(3, seed=1)]
    batched = SH.scalar_scores(rm, tok, TEMPLATE, items, batch_size=4)
    alone = torch.cat([SH.scalar_scores(rm, tok, TEMPLATE, [it]) for it in items])
    assert (batched - alone).abs().max().item() <= 1e-5


def test_length_bucketed_training_batches_cover_the_epoch_with_little_padding():
    """batching.rank_batch with lengths: the epoch's batches are the same records as without, each
    batch of one window sorted by length (so its padding is small), and the order is a function
    of (seed, epoch) only (resume is exact)."""
    from nanopairwise import batching
    n, batch_size, window = 103, 8, 4
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (n,), generator=g).tolist()
    steps = n // batch_size
    plain = [batching.rank_batch(n, batch_size, s, 0, 0, 1) for s in range(steps)]
    bucketed = [batching.rank_batch(n, batch_size, s, 0, 0, 1, lengths, window) for s in range(steps)]
    assert sorted(sum(plain, [])) == sorted(sum(bucketed, []))               # the same records this epoch
    assert bucketed == [batching.rank_batch(n, batch_size, s, 0, 0, 1, lengths, window) for s in range(steps)]
    pad = lambda batches: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert pad(bucketed) < pad(plain) / 3
    two_ranks = [batching.rank_batch(n, batch_size, 5, 0, r, 2, lengths, window) for r in (0, 1)]
    assert two_ranks[0] + two_ranks[1] == bucketed[5]


def test_real_model_probabilities_equal_the_naive_path(smollm2_dir):
    """SmolLM2-135M-Instruct (chatml turns, real weights, GQA 9/3): the same fp32 bound."""
    from nanopairwise.model import Transformer
    from nanopairwise.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(smollm2_dir)
    judge = J.PairwiseJudge(Transformer.from_pretrained(smollm2_dir, dtype=torch.float32),
                            *J.verdict_token_ids(tok, TEMPLATE)).eval()
    items = [("Be brief.", "What is 2 + 2?", y, "4") for y in ("4", "The answer is four.")]
    items += [("Be polite.", "Name a colour.", y, "Blue, thank you.") for y in ("Red.", "Green, please.")]
    naive = J.win_probs(judge, tok, TEMPLATE, items, shared_prefix=False)
    shared = J.win_probs(judge, tok, TEMPLATE, items)
    assert (naive.win - shared.win).abs().max().item() <= TOL[torch.float32]
    assert (naive.p_ab - shared.p_ab).abs().max().item() <= TOL[torch.float32]
