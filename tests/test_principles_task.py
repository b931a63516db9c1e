"""Tests for nanopairwise/principles_task.py: held-out questions and combinations, prompt and pair
records, determinism under a seed, the bootstrap on a tiny random model (its files read back by
the training scripts' loaders), and the evaluation's oracle for these records."""

import json
import math
import os
import random

import pytest

from nanopairwise import bootstrap as B, data, evaluation, principles as P, principles_task as PT
from nanopairwise.formats import load_preference_pairs
from nanopairwise.questions import QUESTIONS

TINY = PT.PrinciplesConfig(pair_prompts_train=4, pair_prompts_test=2, rl_prompts_train=4, rl_prompts_test=2,
                           probe_prompts=2, max_new_tokens=6)


def test_question_split_is_fixed_and_disjoint():
    test = [q for i, q in enumerate(QUESTIONS) if PT.question_split(i) == "test"]
    train = [q for i, q in enumerate(QUESTIONS) if PT.question_split(i) == "train"]
    assert len(QUESTIONS) >= 300 and len(set(QUESTIONS)) == len(QUESTIONS)
    assert len(test) == len(QUESTIONS) // 5 and not set(test) & set(train)


def test_held_out_combinations():
    assert not any(PT.combo_held_out([k]) for k in P.KIND_NAMES)          # every kind is trained alone
    pairs = [c for c in ((a, b) for a in P.KIND_NAMES for b in P.KIND_NAMES if a < b) if P.compatible(c)]
    held = [c for c in pairs if PT.combo_held_out(c)]
    assert 0.1 < len(held) / len(pairs) < 0.4
    assert PT.combo_held_out(held[0][::-1])                                 # order does not matter


def test_prompts_respect_the_splits():
    rng = random.Random(0)
    test_questions = {q for i, q in enumerate(QUESTIONS) if PT.question_split(i) == "test"}
    for split in ("train", "test"):
        records = [PT.make_prompt(rng, split) for _ in range(600)]
        for r in records:
            kinds = [k for k, _ in r["checks"]]
            assert (r["question"] in test_questions) == (split == "test")
            assert P.compatible(kinds) and 1 <= len(kinds) <= 3
            assert r["principle"] == P.describe(r["checks"]) and r["prompt"] == f"{r['question']} {r['principle']}"
            assert r["combo"] == ("single" if len(kinds) == 1 else "held_out" if PT.combo_held_out(kinds) else "seen")
            assert r["combo"] != ("seen" if split == "test" else "held_out")
        counts = {c: sum(r["combo"] == c for r in records) for c in ("single", "seen", "held_out")}
        assert 150 < counts["single"] < 250                                   # a third
        assert {k for r in records for k, _ in r["checks"]} == set(P.KIND_NAMES)
    assert [PT.make_prompt(random.Random(5), "test") for _ in range(3)] == \
        [PT.make_prompt(random.Random(5), "test") for _ in range(3)]


def test_pairs_labels_and_sources():
    rng = random.Random(1)
    prompts = [PT.make_prompt(rng, "train") for _ in range(40)]
    samples = [["The sky is blue, very blue.", "Air scatters blue light"] for _ in prompts]
    samples[0] = ["same", "same"]                                             # a tie: no policy pair
    records = PT.make_pairs(random.Random(2), prompts, samples)
    assert records == PT.make_pairs(random.Random(2), prompts, samples)       # deterministic under a seed
    assert records != PT.make_pairs(random.Random(3), prompts, samples)
    for r in records:
        assert r["chosen"] != r["rejected"] and r["source"] in ("policy", "repaired")
        q = [P.oracle_score(r["checks"], r["question"], y) for y in (r["chosen"], r["rejected"])]
        assert (r["chosen_score"], r["rejected_score"]) == tuple(q)
        assert r["p_true"] == pytest.approx(1 / (1 + math.exp(-P.beta(r["checks"]) * (q[0] - q[1]))))
        if r["source"] == "repaired":                                         # the first sample and its repair
            original = next(x for x in ("same", samples[1][0]) if x in (r["chosen"], r["rejected"]))
            fixed = r["rejected"] if r["chosen"] == original else r["chosen"]
            assert fixed == P.repair(r["checks"], original) and all(P.check_results(r["checks"], fixed).values())
    assert sum(r["source"] == "policy" for r in records) == len(prompts) - 1
    assert sum(r["source"] == "repaired" for r in records) > len(prompts) // 2


def test_evaluation_oracle_reads_both_tasks():
    rec = PT.make_prompt(random.Random(0), "test")
    assert evaluation.has_oracle(rec) and evaluation.has_oracle({"principle_name": "sort_asc", "numbers": [2, 1]})
    assert not evaluation.has_oracle({"question": "x"})
    assert evaluation.oracle_score(rec, "") == 0.0
    assert evaluation.oracle_score({"principle_name": "sort_asc", "numbers": [2, 1]}, "1 2") == 1.0


# ----------------------------------------------------------------------------------------------
# the bootstrap on a tiny random model


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    task_dir = str(tmp_path_factory.mktemp("principles") / "task")
    info = PT.bootstrap(task_dir, None, seed=0, cfg=TINY)
    return task_dir, info


def test_bootstrap_writes_a_task_the_scripts_read(tiny_task):
    task_dir, info = tiny_task
    paths = B.task_paths(task_dir)
    for key in ("policy", "pairs_train", "pairs_test", "rl_train", "rl_test", "info"):
        assert os.path.exists(paths[key]), key
    assert os.path.isfile(os.path.join(paths["policy"], "model.safetensors"))
    pairs = load_preference_pairs(paths["pairs_train"])
    assert pairs and all({"chosen_score", "rejected_score", "p_true", "checks"} <= set(p.meta) for p in pairs)
    prompts = data.load_rl_prompts(paths["rl_test"])
    assert len(prompts) == TINY.rl_prompts_test and all(p.anchor is None for p in prompts)  # best-of-N in PPO
    assert all(evaluation.has_oracle(p.meta) and p.principle == P.describe(p.meta["checks"]) for p in prompts)
    with open(paths["info"]) as f:
        on_disk = json.load(f)
    assert on_disk["task"] == "principles" and on_disk["model"] == "tiny random"
    assert set(on_disk["initial_policy"]["pass_rates"]) >= {"all"}
    assert on_disk["pairs"] == info["pairs"] == {"train": len(pairs), "test": len(data.read_jsonl(paths["pairs_test"]))}


def test_bootstrap_is_deterministic_under_a_seed(tiny_task, tmp_path):
    task_dir, _ = tiny_task
    again = str(tmp_path / "again")
    PT.bootstrap(again, None, seed=0, cfg=TINY)
    for name in ("pairs_train.jsonl", "pairs_test.jsonl", "rl_train.jsonl", "rl_test.jsonl", "probe_samples.jsonl"):
        with open(os.path.join(task_dir, name)) as a, open(os.path.join(again, name)) as b:
            assert a.read() == b.read(), name


def test_bootstrap_cli_rejects_model_for_digits(capsys):
    with pytest.raises(SystemExit):
        B.main(["--task", "digits", "--model", "x", "--out", "unused"])
    assert "--model" in capsys.readouterr().err


def test_judge_and_pairwise_ppo_run_on_the_task(tiny_task, tmp_path):
    """The training scripts read the task as it is: a judge step on its pairs, then a PPO step with
    best-of-N anchors, evaluated by the principles oracle."""
    import train_ppo
    import train_rm
    paths = B.task_paths(tiny_task[0])
    judge = str(tmp_path / "judge")
    train_rm.main(["--model", paths["policy"], "--train-data", paths["pairs_train"], "--eval-data",
                   paths["pairs_test"], "--out-dir", judge, "--max-steps", "1", "--batch-size", "2",
                   "--eval-batch-size", "8", "--warmup-steps", "1"])
    assert "oracle_accuracy" in json.load(open(os.path.join(judge, "eval.json")))
    out = str(tmp_path / "ppo")
    train_ppo.main(["--policy", paths["policy"], "--judge", os.path.join(judge, "checkpoint"), "--prompts",
                    paths["rl_train"], "--eval-prompts", paths["rl_test"], "--out-dir", out, "--steps", "1",
                    "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--eval-size",
                    "2", "--ppo-epochs", "1", "--minibatches", "1", "--anchor-samples", "2"])
    after = json.load(open(os.path.join(out, "eval.json")))["after"]
    assert 0.0 <= after["oracle_score"] <= 1.0 and 0.0 <= after["oracle_win_rate"] <= 1.0
    kinds = {k for r in data.read_jsonl(paths["rl_test"])[:2] for k, _ in r["checks"]}
    assert {k for k in after if k.startswith("pass_")} == {"pass_all"} | {f"pass_{k}" for k in kinds}
    assert all(0.0 <= after[f"pass_{k}"] <= 1.0 for k in kinds)
