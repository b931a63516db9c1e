"""The principle-following task: everyday questions with checkable principles, for a real chat model.

    python -m nanopairwise.bootstrap --task principles --model SMOLLM2_DIR --out runs/principles
    python -m nanopairwise.bootstrap --task principles --out runs/principles_tiny --smoke   # tiny random model

Why a second task (docs/DESIGN.md §4.2): the digit task is foreign to a pretrained chat model;
following instructions such as "Answer in at most 12 words. Do not use any commas." is what such a
model was trained for, and a program can still check every instruction, so the oracle stays exact
(nanopairwise/principles.py: the checks, the oracle score, the labeller's β, the repairs).

Prompts. A question of nanopairwise/questions.py followed by its principle's text; the principle is
one to three checks of different kinds (1, 2 or 3 with equal probability), each kind's argument
uniform among its values. Held out, so the test split measures both kinds of generalisation:
  - questions: question i is a test question when i % 5 == 4 (63 of 315), never a training one;
  - principle combinations: a set of two or three check kinds is held out when the SHA-1 of its
    sorted names is 0 mod 4 (about a quarter); single checks are never held out, so every kind is
    trained. Train prompts: train questions with single checks or seen combinations; test prompts:
    test questions with single checks (1/3) or held-out combinations (2/3). Records say which
    (`combo`: single, seen, held_out).

Pairs. For each pair prompt the initial policy (SmolLM2 with its chat template, or for tests a tiny
random model) samples `samples_per_prompt` answers at temperature 1; they are shuffled and paired
(source "policy"), and the first is paired with its repair where one exists and differs (source
"repaired": the sample edited to meet every check, principles.repair), so the judge sees contrast
on checks the initial policy never meets. Each pair is labelled by the noisy labeller with the
principle's β (principles.beta); `chosen_score`, `rejected_score` and `p_true` are kept.

Anchors. RL prompts carry no anchor, so train_ppo.py takes the best of --anchor-samples samples of
the initial policy ranked by the judge, the paper's reading for prompts without a reference answer.
We do not use a constructed gold answer: no program writes a good answer to "How do I keep
houseplants alive?"; it can only edit a sample to meet the checks (the repairs above), which gives
mechanical text (a cut mid-sentence, a word stuck on the end) that the policy should not be pulled
towards, and none exists for min_words or for answers with too few sentences.

Everything is a function of the seed: one random.Random for the task, torch generators for samples.
"""

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from nanopairwise import data, principles, tasks
from nanopairwise.bootstrap import TINY_POLICY, sample_texts, task_paths
from nanopairwise.common import atomic_dir, atomic_write_text
from nanopairwise.layouts import JudgeTemplate
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.questions import QUESTIONS
from nanopairwise.tokenizer import Tokenizer, train_bpe


@dataclass
class PrinciplesConfig:
    pair_prompts_train: int = 384   # each gives samples_per_prompt / 2 policy pairs and <= 1 repaired pair
    pair_prompts_test: int = 96
    samples_per_prompt: int = 2
    rl_prompts_train: int = 512
    rl_prompts_test: int = 128
    probe_prompts: int = 32         # held-out RL prompts the initial policy's pass rates are measured on
    max_new_tokens: int = 64
    batch_size: int = 32            # rows per generation batch

    @classmethod
    def smoke(cls) -> "PrinciplesConfig":
        """Tiny sizes on the same code path: the tests and --smoke check plumbing, not results."""
        return cls(pair_prompts_train=12, pair_prompts_test=6, rl_prompts_train=16, rl_prompts_test=8,
                   probe_prompts=6, max_new_tokens=10)


# ----------------------------------------------------------------------------------------------
# splits and prompts


def question_split(i: int) -> str:
    """"test" for every fifth question (i % 5 == 4), else "train": fixed, whatever the seed."""
    return "test" if i % 5 == 4 else "train"


def combo_held_out(kinds) -> bool:
    """True for about a quarter of the sets of two or three kinds (SHA-1 of the sorted names), never for one."""
    kinds = sorted(set(kinds))
    return len(kinds) > 1 and int(hashlib.sha1("+".join(kinds).encode()).hexdigest(), 16) % 4 == 0


def sample_kinds(rng: random.Random, split: str) -> list:
    """One to three compatible kinds, in KINDS order: train gets singles and seen combinations,
    test singles (1/3) and held-out combinations (2/3)."""
    n = rng.choice((1, 2, 3))
    for _ in range(10_000):
        kinds = []
        for _ in range(n):
            kinds.append(rng.choice([k for k in principles.KIND_NAMES if principles.compatible(kinds + [k])]))
        if n == 1 or combo_held_out(kinds) == (split == "test"):
            return sorted(kinds, key=principles.KIND_NAMES.index)
    raise RuntimeError(f"no {n}-check combination for split {split!r}")  # unreachable with the built-in kinds


def make_prompt(rng: random.Random, split: str) -> dict:
    """An RL prompt record: question + principle text, with the fields the oracle reads."""
    questions = [q for i, q in enumerate(QUESTIONS) if question_split(i) == split]
    question = rng.choice(questions)
    kinds = sample_kinds(rng, split)
    checks = [[k, rng.choice(principles.get_kind(k).args)] for k in kinds]
    principle = principles.describe(checks)
    combo = "single" if len(kinds) == 1 else ("held_out" if combo_held_out(kinds) else "seen")
    return {"prompt": f"{question} {principle}", "principle": principle, "question": question, "checks": checks,
            "combo": combo}


def make_pairs(rng: random.Random, prompts: list, samples: list) -> list:
    """Labelled pair records from each prompt's samples (module docstring: policy and repaired pairs)."""
    records = []
    for prompt, texts in zip(prompts, samples):
        texts = list(texts)
        fixed = principles.repair(prompt["checks"], texts[0]) if texts else None
        candidates = [(fixed, texts[0], "repaired")] if fixed is not None else []
        rng.shuffle(texts)
        candidates = [(a, b, "policy") for a, b in zip(texts[0::2], texts[1::2])] + candidates
        for a, b, source in candidates:
            if a == b:                                                 # a tie: no label
                continue
            q_a, q_b = (principles.oracle_score(prompt["checks"], prompt["question"], y) for y in (a, b))
            label = tasks.label_pair(rng, principles.beta(prompt["checks"]), a, b, q_a, q_b)
            records.append({**prompt, **label, "source": source})
    return records


# ----------------------------------------------------------------------------------------------
# the initial policy


def tiny_policy(rng: random.Random, seed: int):
    """A random tiny Llama-shaped model with a chatml BPE trained on the task's texts (tests, --smoke)."""
    template = JudgeTemplate()
    texts = [make_prompt(rng, split)["prompt"] for split in ("train", "test") for _ in range(300)]
    texts += [f"{template.question}\nAnswer:{v}" for v in (template.yes, template.no)] * 20
    tok = train_bpe(texts, 512, special_tokens=("<|endoftext|>",), chat_template="chatml", eos_token="<|im_end|>")
    torch.manual_seed(seed)
    config = ModelConfig.from_hf({**TINY_POLICY, "vocab_size": tok.vocab_size, "bos_token_id": None,
                                  "eos_token_id": tok.eos_token_id})
    return Transformer(config), tok


def load_policy(model_dir: str):
    tok = Tokenizer.from_pretrained(model_dir)
    return Transformer.from_pretrained(model_dir), tok


def probe(model, tok, records: list, cfg: PrinciplesConfig, seed: int, desc: str = "probe") -> dict:
    """One sample per record (temperature 1): the oracle's mean score, per-kind pass rates and the
    number of records each rate is over, and the samples."""
    texts = [s[0] for s in sample_texts(model, tok, [r["prompt"] for r in records], 1, cfg, seed,
                                          batch_size=cfg.batch_size, desc=desc)]
    scores = [principles.oracle_score(r["checks"], r["question"], y) for r, y in zip(records, texts)]
    rates = principles.pass_rates(records, texts)
    counts = {k: sum(any(c[0] == k for c in r["checks"]) for r in records) for k in rates if k != "all"}
    return {"n": len(records), "oracle_score": sum(scores) / len(scores), "pass_rates": rates,
            "counts": {**counts, "all": len(records)},
            "samples": [{"prompt": r["prompt"], "response": y, "score": q} for r, y, q in zip(records, texts, scores)]}


# ----------------------------------------------------------------------------------------------
# the bootstrap


def bootstrap(task_dir: str, model_dir: str = None, seed: int = 0, cfg: PrinciplesConfig = None) -> dict:
    """Write the task directory (bootstrap.task_paths layout), atomically: policy/ (a link to
    `model_dir`, or the tiny random model without one), pairs_{train,test}.jsonl,
    rl_{train,test}.jsonl and task.json (sizes, seed, the initial policy's probe)."""
    cfg, t0, rng = cfg or PrinciplesConfig(), time.time(), random.Random(seed)
    model, tok = load_policy(model_dir) if model_dir else tiny_policy(rng, seed)
    prompts = {split: [make_prompt(rng, split) for _ in range(n)]
               for split, n in (("train", cfg.pair_prompts_train), ("test", cfg.pair_prompts_test))}
    rl = {split: [make_prompt(rng, split) for _ in range(n)]
          for split, n in (("train", cfg.rl_prompts_train), ("test", cfg.rl_prompts_test))}
    pairs = {}
    for split, offset in (("train", 1), ("test", 2)):
        samples = sample_texts(model, tok, [p["prompt"] for p in prompts[split]], cfg.samples_per_prompt, cfg,
                                 seed * 1000 + offset, batch_size=cfg.batch_size, desc=f"pairs {split} samples")
        pairs[split] = make_pairs(rng, prompts[split], samples)
    found = probe(model, tok, rl["test"][:cfg.probe_prompts], cfg, seed * 1000 + 3)
    info = {"task": "principles", "seed": seed, "config": asdict(cfg), "model": os.path.abspath(model_dir) if model_dir
            else "tiny random", "pairs": {k: len(v) for k, v in pairs.items()},
            "sources": {k: {s: sum(r["source"] == s for r in v) for s in ("policy", "repaired")} for k, v in pairs.items()},
            "initial_policy": {k: v for k, v in found.items() if k != "samples"}}
    with atomic_dir(task_dir) as tmp:
        paths = task_paths(tmp)
        if model_dir:
            os.symlink(os.path.abspath(model_dir), paths["policy"])
        else:
            model.save_pretrained(paths["policy"])
            tok.save_pretrained(paths["policy"])
        for split in ("train", "test"):
            data.write_jsonl(paths[f"pairs_{split}"], pairs[split])
            data.write_jsonl(paths[f"rl_{split}"], rl[split])
        data.write_jsonl(os.path.join(tmp, "probe_samples.jsonl"), found["samples"])
        info["seconds"] = round(time.time() - t0, 1)
        atomic_write_text(paths["info"], json.dumps(info, indent=2))
    rates = " ".join(f"{k} {v:.2f}" for k, v in found["pass_rates"].items())
    print(f"principles task done in {time.time() - t0:.0f} s | {info['pairs']['train']:,} train / "
          f"{info['pairs']['test']:,} test pairs | initial policy on {found['n']} held-out prompts: oracle score "
          f"{found['oracle_score']:.3f} | pass rates {rates}", flush=True)
    return info
