"""Tests for nanopairwise/tasks.py: gold answers, oracle (gold = 1, every corruption < 1, unparseable = 0),
the label-noise model checked statistically per principle, demonstrations, records, determinism."""

import math
import random

import pytest

from nanopairwise import tasks
from nanopairwise.data import load_rl_prompts, write_jsonl
from nanopairwise.formats import load_preference_pairs
from nanopairwise.tasks import (CORRUPTIONS, MAX_LEN, MIN_LEN, PRINCIPLES, corrupt, gold_answer, make_demonstration,
                                make_pair, make_pairs, make_prompt, make_rl_prompts, oracle_score,
                                preference_prob, sample_label)

# z for a two-sided binomial band. The seeds are fixed, so these tests are deterministic; were they not,
# ~35 frequency checks at z = 4.5 (two-sided tail 7e-6 each) would false-alarm with probability < 3e-4,
# while a wrong model (e.g. beta off by 30 %) lands far outside the band.
Z = 4.5


def within_band(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= Z * math.sqrt(p * (1 - p) / n) + 1 / n


def test_gold_answers_literal():
    xs = [5, 3, 9, 3, 4]
    expected = {"sort_asc": "3 3 4 5 9", "sort_desc": "9 5 4 3 3", "reverse": "4 3 9 3 5", "rotate": "3 9 3 4 5",
                "dedupe": "5 3 9 4", "keep_even": "4", "add_one": "6 4 10 4 5"}
    assert {p.name: gold_answer(p.name, xs) for p in PRINCIPLES} == expected
    assert len(PRINCIPLES) >= 6 and len({p.beta for p in PRINCIPLES}) == len(PRINCIPLES)
    with pytest.raises(ValueError, match="unknown principle 'shuffle'"):
        gold_answer("shuffle", xs)


def test_prompts_lengths_and_format():
    rng = random.Random(0)
    for length in range(MIN_LEN, MAX_LEN + 1):
        for p in PRINCIPLES:
            t = make_prompt(rng, p.name, length)
            assert len(t.numbers) == length and all(0 <= x <= 9 for x in t.numbers)
            assert t.prompt_text == f"{p.keyword}: " + " ".join(map(str, t.numbers))
            assert t.gold == gold_answer(p.name, t.numbers) and t.gold  # non-empty
            assert t.gold_numbers != list(t.numbers)  # copying the input is never gold
    lengths = {len(make_prompt(rng).numbers) for _ in range(300)}
    assert lengths == set(range(MIN_LEN, MAX_LEN + 1))


def test_oracle_formula_by_hand():
    # gold of sort_asc [3, 1, 2] is [1, 2, 3]
    assert oracle_score("sort_asc", [3, 1, 2], "1 2 3") == 1.0
    assert oracle_score("sort_asc", [3, 1, 2], " 1  2 3\n") == 1.0  # whitespace is free
    # pos = 1/3 (only the 3 in place), bag = 3/3
    assert oracle_score("sort_asc", [3, 1, 2], "2 1 3") == pytest.approx(0.75 / 3 + 0.25)
    # L = 4, pos = 3/4, bag = 3/4
    assert oracle_score("sort_asc", [3, 1, 2], "1 2 3 3") == pytest.approx(0.75)
    # L = 3, pos = 1/3 ([1] matches), bag = 1/3
    assert oracle_score("sort_asc", [3, 1, 2], "1") == pytest.approx(1 / 3)
    assert oracle_score("sort_asc", [3, 1, 2], "") == 0.0
    assert oracle_score("sort_asc", [3, 1, 2], "7 8 9") == 0.0


@pytest.mark.parametrize("response", ["1, 2, 3", "one two", "1 2 3.", "1 2 -3", "１ ２ ３", "1 2 ³", "[1, 2, 3]"])
def test_unparseable_scores_zero(response):
    assert oracle_score("sort_asc", [3, 1, 2], response) == 0.0


def test_every_corruption_scores_below_one_for_every_principle():
    rng = random.Random(1)
    for p in PRINCIPLES:
        for kind in CORRUPTIONS:
            for severity in (1, 2, 3):
                for _ in range(20):
                    t = make_prompt(rng, p.name)
                    bad = corrupt(rng, t.gold_numbers, kind, severity, numbers=t.numbers, principle=p.name)
                    assert bad != t.gold_numbers, (p.name, kind, t)
                    q = oracle_score(p.name, t.numbers, " ".join(map(str, bad)))
                    assert 0.0 <= q < 1.0, (p.name, kind, severity, t, bad)
        assert oracle_score(p.name, t.numbers, t.gold) == 1.0
    # degenerate answers still get corrupted
    assert corrupt(rng, [4, 4, 4], "swap") != [4, 4, 4]
    assert corrupt(rng, [], "drop") != []
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(rng, [1, 2], "scramble")


def test_corruption_kinds_do_what_they_say():
    rng = random.Random(2)
    gold = [1, 2, 3, 4, 5]
    assert sorted(corrupt(rng, gold, "swap")) == gold
    assert len(corrupt(rng, gold, "drop")) == 4 and len(corrupt(rng, gold, "duplicate")) == 6
    off = corrupt(rng, gold, "off_by_one")
    assert sum(abs(a - b) for a, b in zip(off, gold)) == 1
    cut = corrupt(rng, gold, "truncate")
    assert len(cut) < 5 and cut == gold[:len(cut)]
    wrong = corrupt(rng, [5, 3, 9, 3, 4], "wrong_principle", numbers=[5, 3, 9, 3, 4], principle="sort_asc")
    assert wrong in [q.fn([5, 3, 9, 3, 4]) for q in PRINCIPLES if q.name != "sort_asc"]
    # higher severity is worse on average
    t = make_prompt(rng, "reverse", 8)
    mean_q = [sum(oracle_score("reverse", t.numbers, " ".join(map(str, corrupt(rng, t.gold_numbers, severity=s,
              numbers=t.numbers, principle="reverse")))) for _ in range(300)) / 300 for s in (1, 3)]
    assert mean_q[0] > mean_q[1] + 0.05


def test_preference_prob_model():
    for p in PRINCIPLES:
        assert preference_prob(p.name, 0.7, 0.7) == 0.5
        assert preference_prob(p.name, 0.9, 0.6) == pytest.approx(1 / (1 + math.exp(-p.beta * 0.3)))
        assert preference_prob(p.name, 0.6, 0.9) + preference_prob(p.name, 0.9, 0.6) == pytest.approx(1.0)
    assert preference_prob("add_one", 1.0, 0.0) < preference_prob("sort_asc", 1.0, 0.0)
    assert preference_prob("sort_asc", 0.0, 1e3) == 0.0  # no overflow


@pytest.mark.parametrize("principle", [p.name for p in PRINCIPLES])
def test_label_noise_matches_model(principle):
    """Empirical frequency of 'a preferred' within a binomial band of σ(β (q_a − q_b)), per principle."""
    rng = random.Random([p.name for p in PRINCIPLES].index(principle))
    n = 3000
    for q_a, q_b in [(0.9, 0.8), (0.75, 0.6), (0.5, 0.7), (1.0, 0.4)]:
        p = preference_prob(principle, q_a, q_b)
        hits = sum(sample_label(rng, principle, q_a, q_b) for _ in range(n))
        assert within_band(hits, n, p), (principle, q_a, q_b, hits / n, p)


def test_label_noise_differs_by_principle():
    """At the same quality gap, the noisiest principle flips far more labels than the cleanest one."""
    rng = random.Random(3)
    flips = {name: sum(not sample_label(rng, name, 0.8, 0.7) for _ in range(2000)) / 2000
             for name in ("sort_asc", "add_one")}
    assert flips["sort_asc"] < 0.1 < 0.3 < flips["add_one"]


def test_make_pair_labels_follow_model():
    rng = random.Random(4)
    t = make_prompt(rng, "dedupe", 6)
    a, b = t.gold, " ".join(map(str, corrupt(rng, t.gold_numbers, "drop", numbers=t.numbers, principle="dedupe")))
    q_a, q_b = oracle_score("dedupe", t.numbers, a), oracle_score("dedupe", t.numbers, b)
    n = 3000
    records = [make_pair(rng, t, a, b) for _ in range(n)]
    hits = sum(r["chosen"] == a for r in records)
    assert within_band(hits, n, preference_prob("dedupe", q_a, q_b))
    for r in records[:50]:
        assert r["p_true"] == pytest.approx(preference_prob("dedupe", r["chosen_score"], r["rejected_score"]))
        assert r["principle"] == PRINCIPLES[4].description and r["numbers"] == list(t.numbers)
    assert make_pair(rng, t, a, a) is None  # ties are not pairs


def test_demonstrations_worse_on_longer_prompts():
    rng = random.Random(5)
    mean_q, gold_rate = {}, {}
    for length in (MIN_LEN, MAX_LEN):
        qs = []
        for _ in range(1500):
            t = make_prompt(rng, length=length)
            qs.append(oracle_score(t.principle, t.numbers, make_demonstration(rng, t)))
        mean_q[length] = sum(qs) / len(qs)
        gold_rate[length] = sum(q == 1.0 for q in qs)
    assert within_band(gold_rate[MIN_LEN], 1500, tasks.demo_p_gold(MIN_LEN))
    assert within_band(gold_rate[MAX_LEN], 1500, tasks.demo_p_gold(MAX_LEN))
    assert mean_q[MIN_LEN] > mean_q[MAX_LEN] + 0.1
    t = make_prompt(rng)
    assert make_demonstration(rng, t, p_gold=1.0) == t.gold
    assert make_demonstration(rng, t, p_gold=0.0) != t.gold


def test_records_roundtrip_through_data_loaders(tmp_path):
    rng = random.Random(6)
    prompts = [make_prompt(rng) for _ in range(20)]
    samples = [[make_demonstration(rng, t) for _ in range(4)] for t in prompts]
    pairs = make_pairs(rng, prompts, responses=samples, synthetic_per_prompt=2)
    assert {r["source"] for r in pairs} == {"policy", "synthetic"}
    assert sum(r["source"] == "synthetic" for r in pairs) == 40  # synthetic pairs never tie
    for r in pairs:
        assert r["chosen"] != r["rejected"]
        assert r["chosen_score"] == oracle_score(r["principle_name"], r["numbers"], r["chosen"])
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    loaded = load_preference_pairs(str(tmp_path / "pairs.jsonl"))
    assert [p.to_dict() for p in loaded] == pairs
    rl = make_rl_prompts(rng, 30)
    write_jsonl(tmp_path / "rl.jsonl", rl)
    for rec in load_rl_prompts(str(tmp_path / "rl.jsonl")):
        assert oracle_score(rec.meta["principle_name"], rec.meta["numbers"], rec.anchor) == 1.0
        assert gold_answer(rec.meta["principle_name"], rec.meta["numbers"]) == rec.anchor
    with pytest.raises(ValueError, match="responses has 1 entries for 2 prompts"):
        make_pairs(rng, prompts[:2], responses=[["1"]])


def test_deterministic_under_seed():
    def build(seed):
        rng = random.Random(seed)
        return (make_pairs(rng, 15, synthetic_per_prompt=2), make_rl_prompts(rng, 10),
                [make_demonstration(rng, make_prompt(rng)) for _ in range(20)], tasks.tokenizer_corpus(rng, 50))
    assert build(7) == build(7)
    assert build(7) != build(8)


def test_tokenizer_corpus_gives_compact_tokens():
    from nanopairwise.tokenizer import train_bpe
    rng = random.Random(9)
    tok = train_bpe(tasks.tokenizer_corpus(rng, 1000, extra_texts=["Yes", "No"]), 512)
    for p in PRINCIPLES:
        t = make_prompt(rng, p.name, MAX_LEN)
        # "User" ":" keyword-words ":" 8 digits "\n" "Assistant" ":" " " -> at most 8 + 11 tokens
        assert len(tok.encode(tok.render_chat(t.prompt_text))) <= MAX_LEN + 11, p.name
        assert len(tok.encode(t.gold)) == len(t.gold.split())  # one token per number
    assert len(tok.encode("Yes")) == len(tok.encode("No")) == 1
