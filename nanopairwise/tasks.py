"""The built-in principle-following task: prompt generator, hidden oracle, noisy "human" labels.

Why it exists (docs/DESIGN.md §4): with no hub access, the project needs a task where ground
truth is known, so judge accuracy, calibration and PPO gains are measured against an oracle rather
than against the judge itself. The task is built to show the miscalibration Pairwise-RL targets:
prompts differ in difficulty (so absolute response quality differs by prompt) and label noise
differs by principle (so a scalar reward mixes "how noisy / hard is this prompt" into "how good is
this response"); a comparison against an anchor for the same prompt does not.

Prompts. A principle applied to a list of small integers (digits 0..9, length 3..8; the length is
the difficulty). The text is tiny-tokenizer friendly (a keyword, a colon, space-separated digits):

    prompt   "sort ascending: 5 3 9 1"      principle "Sort the numbers in ascending order."
    gold     "1 3 5 9"

Inputs are resampled until the gold answer is non-empty and differs from the input (copying the
prompt is never correct).

Oracle. A response is parsed as whitespace-separated non-negative integers; anything else is
unparseable and scores 0. With r the parsed response, g the gold list and L = max(|r|, |g|):

    pos  = #{i < min(|r|, |g|) : r_i = g_i} / L          position-wise agreement
    bag  = |multiset(r) ∩ multiset(g)| / L               right numbers, any order
    q    = 0.75 * pos + 0.25 * bag                       (q = 1 when L = 0)

so q is in [0, 1], q = 1 exactly when r = g, and partial answers get graded partial credit.

Labels. A "human" comparing responses a and b of the same prompt prefers a with probability

    P(a ≻ b) = σ(β_principle · (q_a − q_b))

(a Bradley-Terry model on the oracle scores), with β from 30 (sorting: labellers rarely err) down
to 4 (add one: labellers are noisy); see PRINCIPLES. `p_true` in pair records is this probability
for the recorded chosen over rejected, so the best achievable judge is known exactly.

Corruptions (wrong answers of graded severity; each step one of): swap two different numbers, drop
one, duplicate one, off-by-one on one number, apply a different principle, truncate. `corrupt`
always returns something other than the gold answer, so its oracle score is below 1.

Demonstrations (for the SFT bootstrap): the gold answer with probability
p_gold(length) = 0.9 − 0.1 · (length − 3) (0.9 at length 3, 0.4 at length 8), otherwise a
corruption of severity 1..(1 + length // 4). Longer prompts thus get worse demonstrations, and the
SFT policy's quality differs by prompt, leaving RL room to improve.

All randomness comes from an explicit `random.Random` passed in, so everything is deterministic
under a seed.
"""

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from nanopairwise.tokenizer import render_chat

MIN_LEN, MAX_LEN = 3, 8  # input length range = difficulty
MAX_DIGIT = 9
W_POS, W_BAG = 0.75, 0.25  # oracle weights (see module docstring)
CORRUPTIONS = ("swap", "drop", "duplicate", "off_by_one", "wrong_principle", "truncate")


# ----------------------------------------------------------------------------------------------
# principles


def _sort_desc(xs):
    return sorted(xs, reverse=True)


def _reverse(xs):
    return xs[::-1]


def _rotate_left(xs):
    return xs[1:] + xs[:1]


def _dedupe(xs):
    return list(dict.fromkeys(xs))


def _keep_even(xs):
    return [x for x in xs if x % 2 == 0]


def _add_one(xs):
    return [x + 1 for x in xs]


@dataclass(frozen=True)
class Principle:
    name: str  # identifier used in records, e.g. "sort_asc"
    keyword: str  # the prompt prefix, e.g. "sort ascending"
    description: str  # the principle text the judge reads
    fn: Callable  # list[int] -> list[int], the gold transformation
    beta: float  # label sharpness: P(a ≻ b) = σ(beta · (q_a − q_b))


PRINCIPLES = (
    Principle("sort_asc", "sort ascending", "Sort the numbers in ascending order.", sorted, 30.0),
    Principle("sort_desc", "sort descending", "Sort the numbers in descending order.", _sort_desc, 20.0),
    Principle("reverse", "reverse", "Reverse the order of the numbers.", _reverse, 14.0),
    Principle("rotate", "rotate left", "Move the first number to the end.", _rotate_left, 10.0),
    Principle("dedupe", "dedupe", "Remove repeated numbers, keeping the first occurrence of each.", _dedupe, 7.0),
    Principle("keep_even", "keep even", "Keep only the even numbers, in their original order.", _keep_even, 5.0),
    Principle("add_one", "add one", "Add one to each number.", _add_one, 4.0),
)
_BY_NAME = {p.name: p for p in PRINCIPLES}


def get_principle(principle) -> Principle:
    """A Principle from itself or its name."""
    if isinstance(principle, Principle):
        return principle
    if principle not in _BY_NAME:
        raise ValueError(f"unknown principle {principle!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[principle]


# ----------------------------------------------------------------------------------------------
# prompts and gold answers


def format_numbers(xs) -> str:
    return " ".join(str(x) for x in xs)


def parse_numbers(text: str):
    """Whitespace-separated ASCII digit strings -> list[int]; None if any token is not one."""
    tokens = text.split()
    if not all(t.isascii() and t.isdigit() for t in tokens):
        return None
    return [int(t) for t in tokens]


@dataclass(frozen=True)
class TaskPrompt:
    principle: Principle
    numbers: tuple
    prompt_text: str
    gold: str

    @property
    def gold_numbers(self) -> list:
        return self.principle.fn(list(self.numbers))


def gold_answer(principle_name, numbers) -> str:
    return format_numbers(get_principle(principle_name).fn(list(numbers)))


def build_prompt(principle, numbers) -> TaskPrompt:
    p = get_principle(principle)
    numbers = tuple(int(x) for x in numbers)
    return TaskPrompt(p, numbers, f"{p.keyword}: {format_numbers(numbers)}", gold_answer(p, numbers))


def make_prompt(rng: random.Random, principle=None, length: int = None) -> TaskPrompt:
    """A random prompt; principle uniform and length uniform in [MIN_LEN, MAX_LEN] unless given."""
    p = get_principle(principle) if principle is not None else rng.choice(PRINCIPLES)
    length = rng.randint(MIN_LEN, MAX_LEN) if length is None else length
    for _ in range(100):  # resample trivial inputs: gold empty or equal to the input
        numbers = [rng.randint(0, MAX_DIGIT) for _ in range(length)]
        gold = p.fn(numbers)
        if gold and gold != numbers:
            break
    return build_prompt(p, numbers)


# ----------------------------------------------------------------------------------------------
# the oracle and the label model


def oracle_score(principle_name, numbers, response: str) -> float:
    """Ground-truth quality in [0, 1]: 0.75 · position match + 0.25 · multiset overlap (docstring)."""
    gold = get_principle(principle_name).fn(list(numbers))
    r = parse_numbers(response)
    if r is None:
        return 0.0
    L = max(len(r), len(gold))
    if L == 0:
        return 1.0
    pos = sum(a == b for a, b in zip(r, gold)) / L
    bag = sum((Counter(r) & Counter(gold)).values()) / L
    return W_POS * pos + W_BAG * bag


def bradley_terry(beta: float, q_a: float, q_b: float) -> float:
    """P(a ≻ b) = σ(β · (q_a − q_b)), the labeller model of both built-in tasks (stable for large |x|)."""
    x = beta * (q_a - q_b)
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_prob(principle, q_a: float, q_b: float) -> float:
    """P(a ≻ b) under this principle's β."""
    return bradley_terry(get_principle(principle).beta, q_a, q_b)


def sample_label(rng: random.Random, principle, q_a: float, q_b: float) -> bool:
    """One noisy human label: True when the labeller prefers a."""
    return rng.random() < preference_prob(principle, q_a, q_b)


def label_pair(rng: random.Random, beta: float, a: str, b: str, q_a: float, q_b: float) -> dict:
    """One noisy label of responses a and b with oracle scores q_a, q_b: the pair record's fields
    chosen, rejected, chosen_score, rejected_score and p_true = σ(β (q_chosen − q_rejected)), below
    0.5 when the label went against the oracle."""
    if rng.random() >= bradley_terry(beta, q_a, q_b):  # the labeller preferred b
        a, b, q_a, q_b = b, a, q_b, q_a
    return {"chosen": a, "rejected": b, "chosen_score": q_a, "rejected_score": q_b,
            "p_true": bradley_terry(beta, q_a, q_b)}


# ----------------------------------------------------------------------------------------------
# corrupted answers and demonstrations


def _corrupt_once(rng, xs, kind, numbers, principle):
    xs = list(xs)
    if kind == "swap":
        pairs = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] != xs[j]]
        if pairs:
            i, j = rng.choice(pairs)
            xs[i], xs[j] = xs[j], xs[i]
    elif kind == "drop" and xs:
        del xs[rng.randrange(len(xs))]
    elif kind == "duplicate" and xs:
        i = rng.randrange(len(xs))
        xs.insert(i + 1, xs[i])
    elif kind == "off_by_one" and xs:
        i = rng.randrange(len(xs))
        xs[i] = xs[i] + 1 if xs[i] == 0 else xs[i] + rng.choice((-1, 1))
    elif kind == "wrong_principle" and numbers is not None and principle is not None:
        wrong = [q.fn(list(numbers)) for q in PRINCIPLES if q.name != get_principle(principle).name]
        wrong = [w for w in wrong if w != xs]
        if wrong:
            xs = rng.choice(wrong)
    elif kind == "truncate" and xs:
        xs = xs[:rng.randrange(len(xs))]
    elif kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    return xs


def corrupt(rng: random.Random, answer_numbers, kind: str = None, severity: int = 1,
            numbers=None, principle=None) -> list:
    """A wrong answer: `severity` corruption steps applied to `answer_numbers`.

    kind: one of CORRUPTIONS, or None for a random kind per step. wrong_principle needs the input
    `numbers` and the `principle`. The result always differs from `answer_numbers` (a step that
    cannot apply, e.g. swapping in a constant list, falls back to an off-by-one).
    """
    answer = list(answer_numbers)
    xs = answer
    for _ in range(severity):
        xs = _corrupt_once(rng, xs, kind or rng.choice(CORRUPTIONS), numbers, principle)
    if xs == answer:
        xs = _corrupt_once(rng, answer, "off_by_one", None, None) if answer else [rng.randint(0, MAX_DIGIT)]
    return xs


def demo_p_gold(length: int) -> float:
    """Probability that a demonstration is the gold answer: 0.9 at length 3 down to 0.4 at length 8."""
    return max(0.0, min(1.0, 0.9 - 0.1 * (length - MIN_LEN)))


def corrupted_response(rng: random.Random, prompt: TaskPrompt, severity: int = None) -> str:
    """A corruption of the gold answer, of random severity 1..(1 + length // 4) unless given."""
    severity = severity or rng.randint(1, 1 + len(prompt.numbers) // 4)
    return format_numbers(corrupt(rng, prompt.gold_numbers, severity=severity, numbers=prompt.numbers,
                                  principle=prompt.principle))


def make_demonstration(rng: random.Random, prompt: TaskPrompt, p_gold: float = None) -> str:
    """An imperfect SFT target: gold with probability p_gold (default demo_p_gold(length)), else a corruption."""
    p_gold = demo_p_gold(len(prompt.numbers)) if p_gold is None else p_gold
    return prompt.gold if rng.random() < p_gold else corrupted_response(rng, prompt)


# ----------------------------------------------------------------------------------------------
# JSONL record builders (docs/DESIGN.md §5 formats, extra fields kept as meta by data.py)


def make_pair(rng: random.Random, prompt: TaskPrompt, response_a: str, response_b: str, source: str = "given"):
    """Label two responses with the noisy labeller; None if the texts are equal (a tie).

    `p_true` = σ(β (q_chosen − q_rejected)): below 0.5 when the label went against the oracle.
    """
    if response_a == response_b:
        return None
    p = prompt.principle
    q_a, q_b = (oracle_score(p, prompt.numbers, r) for r in (response_a, response_b))
    label = label_pair(rng, p.beta, response_a, response_b, q_a, q_b)
    return {"prompt": prompt.prompt_text, "chosen": label["chosen"], "rejected": label["rejected"],
            "principle": p.description, "principle_name": p.name, "numbers": list(prompt.numbers),
            "chosen_score": label["chosen_score"], "rejected_score": label["rejected_score"],
            "p_true": label["p_true"], "source": source}


def make_pairs(rng: random.Random, prompts, responses=None, synthetic_per_prompt: int = 1,
               p_gold: float = 0.5) -> list:
    """Preference-pair records for `prompts` (a list of TaskPrompt, or a count to generate).

    responses: optional list (one entry per prompt) of response lists, e.g. policy samples; they
      are shuffled and paired consecutively (source "policy").
    synthetic_per_prompt: pairs of (gold with prob p_gold, else a corruption) vs a different
      corruption (source "synthetic").
    """
    if isinstance(prompts, int):
        prompts = [make_prompt(rng) for _ in range(prompts)]
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"responses has {len(responses)} entries for {len(prompts)} prompts")
    records = []
    for i, prompt in enumerate(prompts):
        if responses is not None:
            samples = list(responses[i])
            rng.shuffle(samples)
            for a, b in zip(samples[0::2], samples[1::2]):
                records.append(make_pair(rng, prompt, a, b, source="policy"))
        for _ in range(synthetic_per_prompt):
            a = prompt.gold if rng.random() < p_gold else corrupted_response(rng, prompt)
            b = corrupted_response(rng, prompt)
            for _ in range(10):  # two corruptions may coincide; redraw rather than lose the pair
                if b != a:
                    break
                b = corrupted_response(rng, prompt)
            records.append(make_pair(rng, prompt, a, b, source="synthetic"))
    return [r for r in records if r is not None]


def make_rl_prompts(rng: random.Random, n: int, principle=None, length: int = None) -> list:
    """RL prompt records, each with its gold answer as the anchor."""
    records = []
    for _ in range(n):
        t = make_prompt(rng, principle, length)
        records.append({"prompt": t.prompt_text, "anchor": t.gold, "principle": t.principle.description,
                        "principle_name": t.principle.name, "numbers": list(t.numbers)})
    return records


def tokenizer_corpus(rng: random.Random, n_prompts: int = 2000, chat_template: str = "plain",
                     extra_texts=(), extra_repeat: int = 20) -> list:
    """Texts to train the task's BPE tokenizer on (see tokenizer.train_bpe).

    Each prompt is rendered with `chat_template` and followed by its gold answer and a corrupted
    one, so the template words ("User", "Assistant") and " d" digits become single tokens.
    The principle descriptions and `extra_texts` (e.g. the judge template and its verdict words
    "Yes" / "No") are repeated `extra_repeat` times so their words merge into whole tokens too.
    """
    texts = ([p.description for p in PRINCIPLES] + list(extra_texts)) * extra_repeat
    for _ in range(n_prompts):
        t = make_prompt(rng)
        texts += [render_chat(t.prompt_text, chat_template) + t.gold, corrupted_response(rng, t)]
    return texts
