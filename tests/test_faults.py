"""Nothing lost, nothing silent (nanopairwise/guards.py and its use in train_rm.py / train_ppo.py).

Each test is one fault from docs/FAULTS.md with the exact behaviour it must get: a NaN stops the
run before the optimizer step and the last good checkpoint survives byte for byte; bad flags and
bad files are refused with one line naming the flag or file:line before any model is loaded
(`no_model_loads` makes loading one fail the test); one run per --out-dir; resume leaves clean
files; under torchrun a data error is printed once.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train_ppo
import train_rm
from nanopairwise import model as model_module, rm_checkpoint
from nanopairwise.guards import NonFiniteError, UserError
from nanopairwise.rundir import RunLock, remove_leftovers
from nanopairwise.tracking import MetricsLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
RM_FAST = ["--batch-size", "8", "--eval-batch-size", "32", "--warmup-steps", "2"]
PPO_FAST = ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--eval-size", "4", "--ppo-epochs", "1", "--minibatches", "2", "--anchor-samples", "2"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def dir_bytes(path):
    return {os.path.relpath(f, path): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)) if os.path.isfile(f)}


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were validated")
    monkeypatch.setattr(model_module.Transformer, "from_pretrained", classmethod(refuse))


# ----------------------------------------------------------------------------------------------
# 1. finite or nothing


def test_nan_grad_norm_stops_before_the_step_and_keeps_the_last_checkpoint(tiny_task, tmp_path, monkeypatch):
    """The issue's case: at step 2 the loss is finite, the gradient norm NaN."""
    out = str(tmp_path / "rm")
    saved = {}
    save = rm_checkpoint.save

    def save_and_record(path, *a):
        save(path, *a)
        saved[torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["step"]] = dir_bytes(path)

    monkeypatch.setattr(rm_checkpoint, "save", save_and_record)
    argv = ["--task-dir", tiny_task, "--out-dir", out, "--lr", "1e3", "--warmup-steps", "0", "--save-every", "1",
            "--max-steps", "6", "--batch-size", "8"]
    with pytest.raises(NonFiniteError) as e:
        train_rm.main(argv)
    # on our CPU step 2 (as logged) is the first with a NaN gradient norm; whichever step k it is, the
    # message names it, nothing after step k - 1 was saved, and that checkpoint is byte-identical
    m = re.fullmatch(r"step (\d+): pairwise RM (grad norm is nan|loss is nan, pairwise RM grad norm is nan); stopped "
                     r"before the optimizer step, the last checkpoint \(step (\d+)\) is untouched\. Look at --lr 1000 "
                     r"\(this step's: [\d.e+]+\), --warmup-steps, --grad-clip, --dtype, and the data", str(e.value))
    assert m is not None, str(e.value)
    k = int(m.group(1))
    assert k >= 2 and int(m.group(3)) == k - 1 and list(saved) == list(range(1, k))
    assert dir_bytes(os.path.join(out, "checkpoint")) == saved[k - 1]
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, k))


def test_a_checkpoint_with_a_nan_tensor_is_not_written(tiny_task, tmp_path):
    model = model_module.Transformer.from_pretrained(os.path.join(tiny_task, "policy"))
    out = str(tmp_path / "ckpt")
    model.save_pretrained(out)
    before = dir_bytes(out)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"ckpt: not saved, 1 of \d+ tensors hold NaN or inf \(e.g. model.norm.weight\)"):
        model.save_pretrained(out)
    assert dir_bytes(out) == before and not glob.glob(str(tmp_path / ".ckpt.*"))


def test_json_outputs_write_nan_as_null(tmp_path):
    MetricsLogger(str(tmp_path)).log(1, {"a": float("nan"), "b": torch.tensor(float("inf")), "c": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "a": None, "b": None, "c": 0.5}


# ----------------------------------------------------------------------------------------------
# 2. validation before any model is loaded: one line naming the flag, file or file:line


RM_FLAG_CASES = [(["--lr", "nan"], r"^--lr nan: must be a finite number > 0$"),
                 (["--batch-size", "0"], r"^--batch-size 0: must be a finite number >= 1$"),
                 (["--epochs", "0"], r"^--epochs 0.0: must be a finite number > 0$"),
                 (["--grad-clip", "-1"], r"^--grad-clip -1.0: must be a finite number > 0 \(or 0 = off\)$"),
                 (["--dtype", "fp8"], r"^--dtype fp8: choose one of"),
                 (["--consistency-coef", "-1"], r"^--consistency-coef -1.0: must be a finite number >= 0$")]


@pytest.mark.parametrize("flags,message", RM_FLAG_CASES)
def test_train_rm_flags(tmp_path, no_model_loads, flags, message):
    with pytest.raises(UserError, match=message):
        train_rm.main(["--task-dir", str(tmp_path / "never"), "--out-dir", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "never").exists()                        # refused before the bootstrap too


def rm_file_cases(tmp_path):
    big = "x " * 50_000                                                  # the 100k-character prompt
    return [("missing", str(tmp_path / "nope.jsonl"), r"--train-data \S+nope.jsonl: no such file$"),
            ("directory", str(tmp_path), r"--train-data \S+: is a directory, not a file$"),
            ("empty", write_jsonl(tmp_path / "empty.jsonl", []), r"empty.jsonl: the file is empty$"),
            ("ties", write_jsonl(tmp_path / "ties.jsonl", [{**PAIR, "rejected": "a"}] * 20),
             r"ties.jsonl: 0 usable pairs \(after dropping ties and bad lines\), fewer than one batch \(--batch-size 8\)"),
            ("short", write_jsonl(tmp_path / "short.jsonl", [PAIR] * 7), r"short.jsonl: 7 usable pairs .* \(--batch-size 8\)"),
            ("long", write_jsonl(tmp_path / "long.jsonl", [PAIR] * 3 + [{**PAIR, "prompt": big}] + [PAIR] * 8),
             r"long.jsonl:4: the reward model's input is [\d,]+ tokens, more than the 512 positions the model reads")]


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "ties", "short", "long"])
def test_train_rm_input_files(tiny_task, tmp_path, no_model_loads, case):
    _, path, message = next(c for c in rm_file_cases(tmp_path) if c[0] == case)
    with pytest.raises(UserError, match=message):
        train_rm.main(["--train-data", path, "--model", os.path.join(tiny_task, "policy"),
                       "--out-dir", str(tmp_path / "o"), "--batch-size", "8"])


def test_empty_eval_data_and_unwritable_out_dir(tiny_task, tmp_path, no_model_loads):
    common = ["--train-data", os.path.join(tiny_task, "pairs_train.jsonl"), "--model", os.path.join(tiny_task, "policy")]
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(UserError, match=r"--eval-data \S+blank.jsonl: no usable pairs"):
        train_rm.main(common + ["--eval-data", str(blank), "--out-dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match=r"--out-dir \S+blank.jsonl/o: not writable \(Not a directory\)"):
        train_rm.main(common + ["--out-dir", str(blank / "o")])


@pytest.fixture
def ppo_dirs(tiny_task, tmp_path):
    """A policy and a "judge" (a copy of the policy: validation never loads its weights)."""
    judge = tmp_path / "judge"
    shutil.copytree(os.path.join(tiny_task, "policy"), judge)
    return ["--policy", os.path.join(tiny_task, "policy"), "--judge", str(judge), "--out-dir", str(tmp_path / "o")]


PPO_FLAG_CASES = [(["--max-new-tokens", "0"], r"^--max-new-tokens 0: must be a finite number >= 1$"),
                  (["--kl-coef", "nan"], r"^--kl-coef nan: must be a finite number >= 0$"),
                  (["--top-p", "1.5"], r"^--top-p 1.5: must be a finite number > 0 and <= 1$"),
                  (["--anchor-samples", "1"], r"^--anchor-samples 1: must be a finite number >= 2$"),
                  (["--max-kl", "-1"], r"^--max-kl -1.0: must be a finite number > 0 \(or 0 = off\)$"),
                  (["--reward-norm-prompts", "-1"], r"^--reward-norm-prompts -1: must be a finite number >= 1$"),
                  (["--critic-warmup-steps", "-1"], r"^--critic-warmup-steps -1: must be a finite number >= 0$")]


@pytest.mark.parametrize("flags,message", PPO_FLAG_CASES)
def test_train_ppo_flags(tmp_path, no_model_loads, flags, message):
    with pytest.raises(UserError, match=message):
        train_ppo.main(["--run-dir", str(tmp_path / "never"), *flags])
    assert not (tmp_path / "never").exists()


def test_train_ppo_inputs(tiny_task, tmp_path, ppo_dirs, no_model_loads):
    prompts = os.path.join(tiny_task, "rl_train.jsonl")
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "q", "anchor": "a"}] * 3)
    with pytest.raises(UserError, match=r"few.jsonl: 3 usable prompts .* fewer than one batch \(--prompts-per-step 4\)"):
        train_ppo.main(["--prompts", few, *ppo_dirs, *PPO_FAST])
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "anchor": "a"}] * 4 + [{"prompt": "y " * 50_000}])
    with pytest.raises(UserError, match=r"long.jsonl:5: prompt \+ response is [\d,]+ tokens, more than the 512"):
        train_ppo.main(["--prompts", long, *ppo_dirs, *PPO_FAST])
    # bt-anchor without a judge: the BT model reads principle + prompt + anchor (cut to 256 tokens) on its
    # own; with a 300-token principle the critic's input (principle + prompt + 8-token response) fits, that does not
    long_anchor = write_jsonl(tmp_path / "long_anchor.jsonl", [{"prompt": "q", "anchor": "a"}] * 4
                              + [{"prompt": "q", "anchor": "y " * 1000, "principle": "y " * 150}])
    bt_anchor = ["--reward", "bt-anchor", "--bt-rm", ppo_dirs[ppo_dirs.index("--judge") + 1], "--judge",
                 str(tmp_path / "no_judge")]
    with pytest.raises(UserError, match=r"long_anchor.jsonl:5: the reward model's input \(anchor\) is [\d,]+ tokens, "
                                        r"more than the 512"):
        train_ppo.main(["--prompts", long_anchor, *ppo_dirs, *PPO_FAST, *bt_anchor])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(UserError, match=r"--eval-prompts \S+blank.jsonl: 0 usable prompts"):
        train_ppo.main(["--prompts", prompts, "--eval-prompts", str(blank), *ppo_dirs, *PPO_FAST])


def test_a_judge_tokenizer_of_the_same_size_but_another_mapping_is_refused(tiny_task, tmp_path, ppo_dirs,
                                                                            no_model_loads):
    judge = ppo_dirs[ppo_dirs.index("--judge") + 1]
    tj = json.load(open(os.path.join(judge, "tokenizer.json")))
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]                     # swap two ordinary tokens' ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(tj, open(os.path.join(judge, "tokenizer.json"), "w"))
    with pytest.raises(UserError, match=rf"the tokenizer of {judge} maps text to ids differently from the "
                                        rf"policy's \({os.path.join(tiny_task, 'policy')}\)"):
        train_ppo.main(["--prompts", os.path.join(tiny_task, "rl_train.jsonl"), *ppo_dirs, *PPO_FAST])


# ----------------------------------------------------------------------------------------------
# 4. one run per output directory


def test_a_second_run_on_the_same_out_dir_is_refused_and_a_stale_lock_taken_over(tiny_task, tmp_path, capsys):
    out = str(tmp_path / "o")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanopairwise.rundir import RunLock; "
                               f"lock = RunLock({out!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"--out-dir {out} is in use by another run \(pid {holder.pid} on "):
            train_rm.main(["--task-dir", tiny_task, "--out-dir", out])
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out).acquire()                                     # its pid is dead: taken over, said so
    assert f"taking over the stale lock of a run that ended without releasing it (pid {holder.pid} " in capsys.readouterr().out
    lock.release()


# ----------------------------------------------------------------------------------------------
# 7. resume leaves clean files


def test_leftovers_of_a_killed_write_are_cleaned_and_metrics_cut_back(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / ".checkpoint.tmp-1234abcd").mkdir()                  # a killed write: removed
    (tmp_path / "eval.json.tmp-deadbeef").write_text("{")
    removed = remove_leftovers(str(tmp_path))
    assert sorted(os.path.basename(r) for r in removed) == [".checkpoint.tmp-1234abcd", "eval.json.tmp-deadbeef"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    # killed between atomic_dir's two renames: no checkpoint, the complete old one is put back
    os.rename(tmp_path / "checkpoint", tmp_path / ".checkpoint.old-0000aaaa")
    remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    logger = MetricsLogger(str(tmp_path))
    for step in (0, 1, 2, 3):
        logger.log(step, {"x": float(step)})
    logger.truncate(2)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# 6. under torchrun an error is printed once


def test_torchrun_data_error_is_printed_once(tiny_task, tmp_path):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 8 + ['{"prompt": "q", "chosen": 3, "rejected": "b"}'])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_rm.py"), "--train-data", bad, "--model", os.path.join(tiny_task, "policy"),
           "--out-dir", str(tmp_path / "o"), *RM_FAST]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    message = f"error: {bad}:9: field 'chosen': expected a string, got int"
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and output.splitlines().count(message) == 1, output[-3000:]  # printed by rank 0 only
    assert 'train_rm.py", line' not in output, output[-3000:]       # one line from us, no traceback of ours
    root_cause = output.split("Root Cause")[1]                      # torchrun's summary names it as the root cause
    assert "rank      : 0" in root_cause and f"traceback : {message}" in root_cause, output[-3000:]
    assert time.time() - t0 < 120
