"""The principle-following task's checks and hidden oracle: instructions a program can verify.

A *principle* is one to three checks, each a (kind, arg) pair, e.g. (max_words, 12) "Answer in at
most 12 words." and (no_commas, None) "Do not use any commas."; its text is the checks'
instructions joined by spaces. The policy reads the question followed by the principle, the judge
reads the principle (docs/DESIGN.md §4.2). The task itself (questions, splits, pairs) is
nanopairwise/principles_task.py.

Checks (`KINDS`; each a pure function of the response text, True = met). Words are runs of
Unicode letters and digits (apostrophes and hyphens inside a word keep it whole), so bullet dashes,
JSON braces and punctuation are not words; sentences are the pieces between '.', '!', '?' and line
breaks that hold a word.

    max_words n / min_words n   at most / at least n words
    no_commas                   no ',' and no full-width '，'
    no_digits                   no Unicode digit
    exclaim                     at least one '!'
    include_word w              w as a whole word, any case
    forbid_word w               w nowhere as a whole word, any case
    lowercase / uppercase       at least one cased letter, and none of the other case
    start_with p                the text, leading whitespace removed, starts with p (case as
                                written) and no letter or digit follows p
    end_with w                  the last word, trailing punctuation removed, is w (any case)
    end_question                the last non-space character is '?'
    bullets n                   exactly n non-empty lines, each starting with "- " and holding a word
    sentences n                 exactly n sentences
    json_answer                 the text (a ``` fence around it allowed) parses as a JSON object whose
                                only key is "answer", a string holding a word
    quoted                      starts with '"' or '“', ends with '"' or '”', a word inside

Two checks that constrain the same thing (`slots`: the case of the letters, the first or last
characters, the form of the whole answer, the length) are never combined, so every principle can
be met.

Oracle. With c the share of the principle's checks met and `topic` in [0, 1]:

    q = 0                                  if the response holds no word (empty, whitespace, symbols)
    q = 0.8 · c + 0.2 · topic              otherwise
    topic = 0.5 · min(1, shared / 2) + 0.5 · distinct

shared counts the question's content words (4+ letters, not in STOPWORDS) whose stem (its first
five letters, lower case) begins a response word (lower case); distinct is the share of the
response's words (lower case) that are distinct. So q is in [0, 1], q >= 0.8 exactly when every
check is met (a missed check costs at least 0.8 / 3), and among answers that meet the same checks the one that shares the question's words and does
not repeat itself scores higher: the small term keeps RL from trading the topic for the checks
(an answer of "done" meets "end with done") or from looping.

Labels. A labeller prefers a over b with probability σ(β · (q_a − q_b)) (tasks.bradley_terry), β
the mean over the principle's checks of each kind's `beta`: 30 for what a reader sees at a glance
(letter case, the first words, quotes) down to 6 for counting words, so label noise differs by
principle as in the built-in digit task.

Repairs. `repair` edits a response so that it meets the checks a program can enforce (truncate to
n words, change case, drop commas, digits or a word, add a word, a first phrase, a last word, a '?'
or a '!', wrap in quotes or JSON; keep the first n sentences or make them n bullets when there are
enough); min_words cannot be repaired (padding would be degenerate), and a repair that does not
meet every check in the end is None. The task pairs repaired samples with the samples they came
from, not as anchors (principles_task.py says why).
"""

import json
import re
from dataclasses import dataclass
from typing import Callable

W_CHECKS, W_TOPIC = 0.8, 0.2  # oracle weights (module docstring)
STEM = 5                      # letters of a word's stem in the topic term
STOPWORDS = frozenset(("what", "which", "when", "where", "does", "have", "your", "with", "that", "this", "from",
                       "they", "them", "some", "should", "would", "could", "about", "there", "their", "into",
                       "more", "most", "tell", "give", "make", "good", "best", "ways", "things", "tips"))

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+|\n")
_FENCE = re.compile(r"^```[a-zA-Z]*\n?(.*?)\n?```$", re.S)
_PUNCT = ".,!?;:\"'”’)]*… \t\n"


def words(text: str) -> list:
    """The response's words: runs of Unicode letters and digits (module docstring)."""
    return _WORD.findall(text)


def sentences(text: str) -> list:
    """The pieces between sentence ends and line breaks that hold a word, stripped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if words(s)]


def _has_word(text: str, w: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(w)}(?![^\W_])", text, re.I) is not None


def _json_answer(text: str):
    """The "answer" string of a JSON answer, or None when the text is not one."""
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    if isinstance(obj, dict) and list(obj) == ["answer"] and isinstance(obj["answer"], str):
        return obj["answer"] if words(obj["answer"]) else None
    return None


def _starts_with(text: str, p: str) -> bool:
    text = text.lstrip()
    return text.startswith(p) and not text[len(p):len(p) + 1].isalnum()


def _bullets(text: str) -> list:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if all(line.startswith("- ") and words(line) for line in lines) else []


def _cased(text: str, upper: bool) -> bool:
    letters = [c for c in text if c.isupper() or c.islower()]
    return bool(letters) and all(c.isupper() == upper for c in letters)


def _first_sentences(text: str, n: int):
    """The first n sentences (each keeps its end mark, or gets a '.'), or None when there are fewer."""
    found = [x.strip() for x in re.findall(r"[^.!?\n]*[^\W_][^.!?\n]*(?:[.!?]+|$)", text, re.M)]
    found = [x if x[-1] in ".!?" else x + "." for x in found if x]
    return found[:n] if len(found) >= n else None


def _strip_end(text: str) -> str:
    return text.rstrip(_PUNCT)


def _drop(text: str, pattern: str) -> str:
    """text without `pattern` (case-insensitive), runs of spaces left behind made one."""
    return re.sub(r"[ \t]{2,}", " ", re.sub(pattern, "", text, flags=re.I)).strip()


# ----------------------------------------------------------------------------------------------
# the check kinds


@dataclass(frozen=True)
class Kind:
    name: str
    instruction: str      # the text the policy and the judge read; {} is the arg, {s} a plural "s"
    args: tuple           # the values a principle may use (None: the check has no argument)
    passes: Callable      # (text, arg) -> bool
    repair: Callable      # (text, arg) -> text that meets the check, or None where no program can
    beta: float           # label sharpness of this kind (module docstring)
    slots: frozenset      # what it constrains; kinds sharing a slot never combine


def _kind(name, instruction, args, passes, repair, beta, *slots):
    return Kind(name, instruction, args, passes, repair, beta, frozenset(slots))


def _ends_with_word(text, w):
    return bool(words(text)) and words(text)[-1].lower() == w.lower() and _strip_end(text).lower().endswith(w.lower())


def _quoted(text, _):
    text = text.strip()
    return len(text) >= 2 and text[0] in "\"“" and text[-1] in "\"”" and bool(words(text))


def _cut_words(text, n):
    """text up to the end of its n-th word (line breaks kept); unchanged when it has at most n."""
    found = list(_WORD.finditer(text))
    return text[:found[n - 1].end()] if len(found) > n else text


def _add_exclaim(text, _):
    if "!" in text:
        return text
    if "." in text:  # the last full stop: a last word or a '?' added before stays last
        i = text.rindex(".")
        return text[:i] + "!" + text[i + 1:]
    text = text.rstrip()
    return text[:-1] + "!?" if text.endswith("?") else text + "!"


def _as_sentences(text, n):
    found = _first_sentences(text, n)
    return " ".join(found) if found else None


def _as_bullets(text, n):
    found = _first_sentences(text, n)
    return "\n".join(f"- {x}" for x in found) if found else None


# in the order `repair` applies them: content first, then first / last words, letter case (after
# every added word), then the wrappers
KINDS = (
    _kind("forbid_word", "Do not use the word '{}'.", ("very", "also", "you", "important", "really"),
          lambda t, w: not _has_word(t, w), lambda t, w: _drop(t, rf"(?<![^\W_]){re.escape(w)}(?![^\W_])"), 12.0),
    _kind("no_digits", "Do not use any digits.", (None,), lambda t, _: not any(c.isdigit() for c in t),
          lambda t, _: _drop(t, r"\d"), 12.0),
    _kind("sentences", "Answer in exactly {} sentence{s}.", (1, 2, 3), lambda t, n: len(sentences(t)) == n,
          _as_sentences, 10.0, "form"),
    _kind("bullets", "Answer with exactly {} bullet points, each on its own line starting with '- '.", (2, 3, 4),
          lambda t, n: len(_bullets(t)) == n, _as_bullets, 20.0, "form", "start"),
    _kind("max_words", "Answer in at most {} words.", (8, 12, 20), lambda t, n: len(words(t)) <= n, _cut_words,
          6.0, "length"),
    _kind("min_words", "Answer in at least {} words.", (25, 40), lambda t, n: len(words(t)) >= n,
          lambda t, n: t if len(words(t)) >= n else None, 6.0, "length"),
    _kind("include_word", "Use the word '{}' at least once.", ("blue", "ocean", "simple", "friend", "banana"),
          _has_word, lambda t, w: t if _has_word(t, w) else f"{_strip_end(t)}, {w}.", 20.0),
    _kind("start_with", "Start your answer with '{}'.", ("Yes", "Sure", "In short", "Well"), _starts_with,
          lambda t, p: t if _starts_with(t, p) else f"{p}, {t.lstrip()}", 30.0, "start", "case"),
    _kind("end_with", "End your answer with the word '{}'.", ("done", "thanks", "indeed"), _ends_with_word,
          lambda t, w: t if _ends_with_word(t, w) else f"{_strip_end(t)} {w}.", 20.0, "end"),
    _kind("end_question", "End your answer with a question.", (None,), lambda t, _: t.rstrip().endswith("?"),
          lambda t, _: t if t.rstrip().endswith("?") else _strip_end(t) + "?", 25.0, "end"),
    _kind("exclaim", "Include at least one exclamation mark.", (None,), lambda t, _: "!" in t, _add_exclaim, 20.0),
    _kind("lowercase", "Write only lowercase letters.", (None,), lambda t, _: _cased(t, upper=False),
          lambda t, _: t.lower(), 30.0, "case"),
    _kind("uppercase", "Write in capital letters only.", (None,), lambda t, _: _cased(t, upper=True),
          lambda t, _: t.upper(), 30.0, "case"),
    _kind("no_commas", "Do not use any commas.", (None,), lambda t, _: "," not in t and "，" not in t,
          lambda t, _: t.replace(",", "").replace("，", ""), 8.0),
    _kind("quoted", "Wrap your whole answer in double quotation marks.", (None,), _quoted,
          lambda t, _: t if _quoted(t, _) else f'"{t.strip()}"', 30.0, "start", "end"),
    _kind("json_answer", 'Answer only with a JSON object with one key, "answer", whose value is a string.', (None,),
          lambda t, _: _json_answer(t) is not None,
          lambda t, _: json.dumps({"answer": t.strip()}, ensure_ascii=False), 25.0, "form", "start", "end", "case"),
)
KIND_NAMES = tuple(k.name for k in KINDS)
_BY_NAME = {k.name: k for k in KINDS}


def get_kind(name: str) -> Kind:
    if name not in _BY_NAME:
        raise ValueError(f"unknown check {name!r}; choose one of {list(KIND_NAMES)}")
    return _BY_NAME[name]


def compatible(kind_names) -> bool:
    """True when no two of the kinds constrain the same slot (and none repeats)."""
    seen, names = set(), list(kind_names)
    for name in names:
        slots = get_kind(name).slots
        if slots & seen:
            return False
        seen |= slots
    return len(set(names)) == len(names)


def check_list(checks) -> list:
    """[(kind, arg), ...] from records' [[kind, arg], ...], each kind known and each arg one of its args."""
    out = []
    for kind, arg in checks:
        if arg not in get_kind(kind).args:
            raise ValueError(f"check {kind!r}: arg {arg!r} is not one of {get_kind(kind).args}")
        out.append((kind, arg))
    if not out or not compatible(k for k, _ in out):
        raise ValueError(f"checks {out}: need one to three checks that constrain different things")
    return out


def describe(checks) -> str:
    """The principle's text: each check's instruction, in KINDS order, joined by spaces."""
    ordered = sorted(check_list(checks), key=lambda c: KIND_NAMES.index(c[0]))
    return " ".join(get_kind(k).instruction.format(a, s="" if a == 1 else "s") for k, a in ordered)


# ----------------------------------------------------------------------------------------------
# the oracle, the labeller's sharpness, repairs


def check_results(checks, response: str) -> dict:
    """{kind: met} for each check of the principle."""
    return {k: bool(get_kind(k).passes(response, a)) for k, a in check_list(checks)}


def topic_score(question: str, response: str) -> float:
    """0.5 · min(1, shared content stems / 2) + 0.5 · distinct-word share (module docstring)."""
    said = [w.lower() for w in words(response)]
    if not said:
        return 0.0
    stems = {w.lower()[:STEM] for w in words(question) if len(w) >= 4 and w.lower() not in STOPWORDS}
    shared = sum(any(w.startswith(stem) for w in said) for stem in stems)
    return 0.5 * min(1.0, shared / 2) + 0.5 * len(set(said)) / len(said)


def oracle_score(checks, question: str, response: str) -> float:
    """Ground-truth quality in [0, 1]: 0.8 · share of checks met + 0.2 · topic; 0 without a word."""
    if not words(response):
        return 0.0
    met = check_results(checks, response)
    return W_CHECKS * sum(met.values()) / len(met) + W_TOPIC * topic_score(question, response)


def beta(checks) -> float:
    """The labeller's sharpness for this principle: the mean of its checks' kinds' beta."""
    checks = check_list(checks)
    return sum(get_kind(k).beta for k, _ in checks) / len(checks)


def repair(checks, response: str, shrink_tries: int = 8):
    """The response edited to meet every check (each kind's repair, in KINDS order), or None when
    that fails. A later repair may add words (a first phrase, a last word, the JSON key), so with
    max_words the cut is retried up to `shrink_tries` words shorter."""
    checks = sorted(check_list(checks), key=lambda c: KIND_NAMES.index(c[0]))
    for shrink in range(shrink_tries + 1):
        text = response.strip()
        for kind, arg in checks:
            arg = max(1, arg - shrink) if kind == "max_words" else arg
            text = get_kind(kind).repair(text, arg) if text is not None else None
        if text is not None and words(text) and all(check_results(checks, text).values()):
            return text
        if text is None or not any(k == "max_words" for k, _ in checks):
            return None
    return None


def pass_rates(records, responses) -> dict:
    """Per check kind, the share of responses that meet it among the records whose principle has it;
    "all": the share that meet every check of their principle. records: dicts or objects with a
    "checks" entry (a record dict, or data.Prompt's meta)."""
    met, seen, every = {}, {}, []
    for record, response in zip(records, responses):
        checks = record["checks"] if isinstance(record, dict) else record.meta["checks"]
        results = check_results(checks, response)
        for kind, ok in results.items():
            met[kind], seen[kind] = met.get(kind, 0) + ok, seen.get(kind, 0) + 1
        every.append(all(results.values()))
    rates = {k: met[k] / seen[k] for k in KIND_NAMES if k in seen}
    rates["all"] = sum(every) / max(len(every), 1)
    return rates
