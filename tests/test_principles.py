"""Tests for nanopairwise/principles.py: every check on passing and failing text (edge cases: empty,
whitespace, unicode), the oracle's range and its topic term by hand, repairs (every compatible
combination can be met), the labeller (deterministic under a seed, noise by principle)."""

import itertools
import math
import random

import pytest

from nanopairwise import principles as P
from nanopairwise import tasks

# kind, arg, texts that meet the check, texts that do not
CASES = [
    ("max_words", 8, ["Paris.", "one two three four five six seven eight", "- a\n- b", "", "   "],
     ["one two three four five six seven eight nine", "a b c d e f g h i"]),
    ("min_words", 25, [" ".join(["word"] * 25), " ".join(["мир"] * 30)], ["", "  \n ", "short answer", "- " * 40]),
    ("no_commas", None, ["No commas here.", "", "日本語です"], ["a, b", "a，b", ","]),
    ("no_digits", None, ["No digits.", "", "seven"], ["7 days", "٣ days", "x²"]),
    ("exclaim", None, ["Wow!", "a!b"], ["", "Calm.", "¡Hola"]),
    ("include_word", "blue", ["The sky is blue.", "BLUE!", "blue", "(blue)", "blue-green sea", "blue_"],
     ["", "bluebird", "The sky is azure.", "blues", "blue2"]),
    ("forbid_word", "very", ["It is quite nice.", "", "everyday veryfine"], ["very", "It is Very nice.", "(very)"]),
    ("lowercase", None, ["all lower, 42 times!", "é à ü", "lower\n- list"],
     ["", "   ", "123 !?", "Upper start", "lower É", "日本語"]),
    ("uppercase", None, ["ALL CAPS, 42!", "ÉTÉ"], ["", "1 2 3", "ALL CAPs", "日本語"]),
    ("start_with", "Yes", ["Yes, of course.", "  Yes", "Yes! Fine.", "Yes"],
     ["", "yes, of course.", "Yesterday it rained.", "Well, yes.", "\"Yes\"", "Yesé"]),
    ("start_with", "In short", ["In short, yes.", "In short"], ["In shortbread", "In  short, yes."]),
    ("end_with", "done", ["All done.", "done", "I am done!  ", "DONE", "finished: done\"", "We're done…"],
     ["", "done it is", "undone", "done 🙂", "done?x"]),
    ("end_question", None, ["Why not?", "Why?  \n"], ["", "Why not?!", "A question? No."]),
    ("bullets", 3, ["- a\n- b\n- c", "\n- one\n\n- two\n  - three\n"],
     ["", "- a\n- b", "- a\n- b\n- c\n- d", "* a\n* b\n* c", "Intro\n- a\n- b\n- c", "- a\n- \n- c", "-a\n-b\n-c"]),
    ("sentences", 2, ["One. Two.", "One! Two?", "First line\nSecond line", "One. Two"],
     ["", "One.", "One. Two. Three.", "One... Two... Three", "...", "One.\n\nTwo.\nThree."]),
    ("json_answer", None, ['{"answer": "Paris is the capital."}', '```json\n{"answer": "Paris"}\n```',
                           ' {"answer": "mot é"} '],
     ["", '{"answer": ""}', '{"answer": "x", "confidence": 1}', '{"answer": 3}', '["Paris"]', 'Answer: Paris',
      '{"answer": "Paris"} Hope this helps.', '{"answer": "!!"}']),
    ("quoted", None, ['"Paris is nice."', '“Paris”', '  "Paris"  '], ["", '""', '"Paris', 'Paris"', '" "', "'Paris'"]),
]


@pytest.mark.parametrize("kind, arg, good, bad", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_each_check_on_passing_and_failing_text(kind, arg, good, bad):
    check = P.get_kind(kind)
    for text in good:
        assert check.passes(text, arg), (kind, arg, text)
    for text in bad:
        assert not check.passes(text, arg), (kind, arg, text)


def test_every_kind_is_tested_and_described():
    assert {c[0] for c in CASES} == set(P.KIND_NAMES)
    for kind in P.KINDS:
        assert kind.args and kind.beta > 0
        for arg in kind.args:
            text = P.describe([(kind.name, arg)])
            assert text.endswith(".") and (arg is None or str(arg) in text)


def test_words_and_sentences():
    assert P.words("- Don't stop: it's well-known, 42 times! {\"a\": 1}") == \
        ["Don't", "stop", "it's", "well-known", "42", "times", "a", "1"]
    assert P.words("") == [] and P.words(" \n\t ") == [] and P.words("— … !") == []
    assert P.words("naïve 日本語 café") == ["naïve", "日本語", "café"]
    assert P.sentences("A b. C d!\nE f? ... g") == ["A b", "C d", "E f", "g"]


def test_check_list_errors_and_compatibility():
    with pytest.raises(ValueError, match="unknown check 'rhyme'"):
        P.check_list([("rhyme", None)])
    with pytest.raises(ValueError, match="arg 7 is not one of"):
        P.check_list([("max_words", 7)])
    with pytest.raises(ValueError, match="constrain different things"):
        P.check_list([("lowercase", None), ("uppercase", None)])
    with pytest.raises(ValueError, match="constrain different things"):
        P.check_list([])
    assert not P.compatible(["quoted", "start_with"]) and not P.compatible(["max_words", "min_words"])
    assert not P.compatible(["json_answer", "bullets"]) and not P.compatible(["no_commas", "no_commas"])
    assert P.compatible(["bullets", "end_with", "no_commas"])
    # the text reads in KINDS order whatever order the checks come in
    assert P.describe([("no_commas", None), ("max_words", 12)]) == \
        "Answer in at most 12 words. Do not use any commas."
    assert P.describe([("sentences", 1)]) == "Answer in exactly 1 sentence."
    assert P.describe([("sentences", 2)]) == "Answer in exactly 2 sentences."


# ----------------------------------------------------------------------------------------------
# the oracle


def test_oracle_by_hand():
    q = "How do I boil an egg?"  # content stems: "boil" ("egg" has 3 letters)
    assert P.topic_score(q, "Boil the egg.") == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert P.topic_score(q, "Boiling works.") == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)   # a stem begins the word
    assert P.topic_score(q, "yes yes yes yes") == pytest.approx(0.5 * 0.0 + 0.5 * 0.25)
    q2 = "How do I keep houseplants alive?"  # stems keep, house, alive
    assert P.topic_score(q2, "Keep them alive with light.") == pytest.approx(0.5 * 1.0 + 0.5 * 1.0)
    checks = [("max_words", 8), ("no_commas", None)]
    assert P.oracle_score(checks, q, "Boil the egg.") == pytest.approx(0.8 + 0.2 * 0.75)
    assert P.oracle_score(checks, q, "Boil, the egg.") == pytest.approx(0.8 * 0.5 + 0.2 * 0.75)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "!!! ...", "- \n- ", "🙂🙂"])
def test_oracle_is_zero_without_a_word(text):
    for checks in ([("max_words", 8)], [("no_commas", None), ("no_digits", None)], [("lowercase", None)]):
        assert P.oracle_score(checks, "Why is the sky blue?", text) == 0.0


def test_oracle_range_and_the_checks_dominate():
    rng = random.Random(0)
    pool = ["The sky is blue because air scatters blue light.", "yes " * 30, "- a\n- b\n- c", "BLUE SKY!",
            '{"answer": "blue light"}', "\"Why?\"", "Well, the sun, the air; done.", "é 日本 ٣", "sky sky sky"]
    for _ in range(400):
        kinds = [k for k in rng.sample(P.KIND_NAMES, 3)]
        kinds = [k for i, k in enumerate(kinds) if P.compatible(kinds[:i + 1])]
        checks = [(k, rng.choice(P.get_kind(k).args)) for k in kinds]
        text = rng.choice(pool)
        q = P.oracle_score(checks, "Why is the sky blue?", text)
        assert 0.0 <= q <= 1.0
        assert (q >= P.W_CHECKS) == all(P.check_results(checks, text).values())  # every check met <=> q >= 0.8


def test_on_topic_beats_off_topic_and_repetition():
    checks, q = [("max_words", 20)], "Why is the sky blue?"
    on, off, loop = "The sky looks blue because air scatters blue light.", "I like pizza with cheese.", "sky " * 12
    assert P.oracle_score(checks, q, on) > P.oracle_score(checks, q, off)
    assert P.oracle_score(checks, q, on) > P.oracle_score(checks, q, loop)


# ----------------------------------------------------------------------------------------------
# repairs


BASE = ("Plants need water, light and soil. Water them when the soil is dry. Put them near a window! "
        "Turn the pot every 7 days. Feed them in spring. Very rarely feed them in winter. "
        "You also should check for pests. Keep them warm.")   # 43 words, short sentences


def test_every_compatible_combination_can_be_met():
    """For every compatible single, pair and triple of kinds, at both ends of each kind's args, the
    repair of an answer of short sentences meets every check (min_words is met by the answer itself), or is None
    only where min_words meets a cut to a few sentences (a program cannot lengthen an answer)."""
    for n in (1, 2, 3):
        for kinds in itertools.combinations(P.KIND_NAMES, n):
            if not P.compatible(kinds):
                continue
            for end in (0, -1):
                checks = [(k, P.get_kind(k).args[end]) for k in kinds]
                fixed = P.repair(checks, BASE)
                if fixed is None:
                    assert "min_words" in kinds and {"sentences", "bullets"} & set(kinds), checks
                    continue
                assert all(P.check_results(checks, fixed).values()), (checks, fixed)


def test_repair_none_where_no_program_can():
    assert P.repair([("min_words", 25)], "Too short.") is None
    assert P.repair([("sentences", 3)], "Only one sentence") is None
    assert P.repair([("bullets", 4)], "One. Two.") is None
    assert P.repair([("no_commas", None)], "") is None          # nothing to repair into an answer
    assert P.repair([("lowercase", None)], "Keep IT.") == "keep it."


# ----------------------------------------------------------------------------------------------
# the labeller


def test_beta_differs_by_principle_and_is_the_mean():
    assert P.beta([("lowercase", None)]) == 30.0 and P.beta([("max_words", 8)]) == 6.0
    assert P.beta([("lowercase", None), ("max_words", 8)]) == pytest.approx(18.0)
    assert len({k.beta for k in P.KINDS}) >= 6


def test_labels_deterministic_and_follow_the_label_model():
    def labels(seed):
        rng = random.Random(seed)
        return [tasks.label_pair(rng, 6.0, "a", "b", 0.6, 0.4) for _ in range(4000)]
    assert labels(3) == labels(3) and labels(3) != labels(4)
    got = labels(3)
    expected = 1 / (1 + math.exp(-6.0 * 0.2))
    hits = sum(r["chosen"] == "a" for r in got)
    assert abs(hits / len(got) - expected) < 4.5 * math.sqrt(expected * (1 - expected) / len(got))
    for r in got:   # p_true is for the recorded chosen over rejected
        assert r["p_true"] == pytest.approx(expected if r["chosen"] == "a" else 1 - expected)
        assert r["chosen_score"] == (0.6 if r["chosen"] == "a" else 0.4)


def test_pass_rates():
    records = [{"checks": [["max_words", 8], ["no_commas", None]]}, {"checks": [["no_commas", None]]}]
    rates = P.pass_rates(records, ["Short, sweet.", "No commas"])
    assert rates == {"max_words": 1.0, "no_commas": 0.5, "all": 0.5}
