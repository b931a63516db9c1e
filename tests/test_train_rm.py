"""train_rm.py end to end on the tiny built-in task (tests/conftest.py::tiny_task): a 2-process
torchrun run, exact resume after a crash, and clear refusals of bad data and bad verdicts.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import train_rm
from nanopairwise.data import DataError
from nanopairwise.judge import VerdictTokenError
from nanopairwise.layouts import JudgeTemplate
from nanopairwise.model import Transformer
from nanopairwise.rm_checkpoint import load_rm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "8", "--eval-batch-size", "32", "--warmup-steps", "2"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes(tiny_task, tmp_path, sharding):
    """DDP, or FSDP2 with each rank's optimiser shards saved beside the weights (--save-every 2: a
    checkpoint written over an earlier one)."""
    out = str(tmp_path / "judge")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_rm.py"), "--task-dir", tiny_task, "--out-dir", out, "--max-steps", "3",
           "--save-every", "2", *FAST, "--length-buckets", "2"] + (["--fsdp"] if sharding == "fsdp" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) on cpu" in proc.stdout and proc.stdout.count("step 3/3 |") == 1  # rank 0 logs alone
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss/rm" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss/rm"])) for r in rows if "loss/rm" in r)
    metrics = json.load(open(os.path.join(out, "eval.json")))
    assert {"accuracy", "oracle_accuracy", "position_consistency", "ece", "brier"} <= set(metrics)
    ckpt = os.path.join(out, "checkpoint")
    assert load_rm_config(ckpt) == ("pairwise", JudgeTemplate())
    Transformer.from_pretrained(ckpt)  # loads back
    shards = [os.path.exists(os.path.join(ckpt, f"optimizer.rank{r}.pt")) for r in (0, 1)]
    assert shards == ([True, True] if sharding == "fsdp" else [False, False])


class Crash(Exception):
    pass


@pytest.mark.parametrize("objective,lora", [("bt", []), ("pairwise", []), ("bt", ["--lora-rank", "4"])])
def test_resume_after_a_crash_is_exact(tiny_task, tmp_path, monkeypatch, objective, lora):
    """Crash at step 4, after the step-2 checkpoint and step 3's metrics row; resume, and end with the
    uninterrupted run's weights and metrics (step 3's row not repeated). With LoRA: the merged weights;
    base from --model, adapters and head from the trainer state."""
    args = ["--objective", objective, "--task-dir", tiny_task, "--max-steps", "4", "--save-every", "2", *FAST, *lora]
    train_rm.main(args + ["--out-dir", str(tmp_path / "straight")])
    lr_at = train_rm.lr_at

    def crash_at_step_4(step, run):
        if step == 3:
            raise Crash()
        return lr_at(step, run)

    monkeypatch.setattr(train_rm, "lr_at", crash_at_step_4)
    with pytest.raises(Crash):
        train_rm.main(args + ["--out-dir", str(tmp_path / "crashed")])
    monkeypatch.setattr(train_rm, "lr_at", lr_at)
    train_rm.main(args + ["--out-dir", str(tmp_path / "crashed"), "--resume"])
    a = Transformer.from_pretrained(str(tmp_path / "straight" / "checkpoint")).state_dict()
    b = Transformer.from_pretrained(str(tmp_path / "crashed" / "checkpoint")).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    losses = lambda d: [r["loss/rm"] for r in read_metrics(str(tmp_path / d)) if "loss/rm" in r]
    assert losses("crashed") == losses("straight")  # steps 1-2 before the crash, 3-4 after resume (3 once)
    if lora:  # only adapters (and the new head) trained; the merged checkpoint differs from the start
        start = Transformer.from_pretrained(os.path.join(tiny_task, "policy")).state_dict()
        assert any(not torch.equal(a[k], start[k]) for k in a if "proj" in k)
        assert all(torch.equal(a[k], start[k]) for k in a if "proj" not in k)


def test_resume_keeps_the_epochs_the_run_started_with(tiny_task, tmp_path, capsys):
    """--epochs left out on --resume: the schedule of the run being resumed (its stored epochs), not
    today's default (lora.DEFAULT_EPOCHS: 12 for this tiny judge), which would lengthen it and change the lr."""
    args = ["--task-dir", tiny_task, "--out-dir", str(tmp_path / "o"), *FAST]
    train_rm.main(args + ["--epochs", "0.25"])                      # 96 pairs / 8 = 12 steps an epoch: 3 steps
    assert "| 3 steps of 8 pairs |" in capsys.readouterr().out
    train_rm.main(args + ["--resume"])                              # already at step 3 of 3: nothing to train
    assert "| 3 steps of 8 pairs |" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(tmp_path / "o")) if "loss/rm" in r] == [1, 2, 3]


def test_bad_jsonl_is_named_with_file_and_line(tiny_task, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    policy = os.path.join(tiny_task, "policy")
    with pytest.raises(DataError, match=rf"{bad}:2: field 'chosen': expected a string, got int"):
        train_rm.main(["--train-data", str(bad), "--model", policy, "--out-dir", str(tmp_path / "o")])


def test_verdict_that_is_not_one_token_is_refused(tiny_task, tmp_path):
    with pytest.raises(VerdictTokenError, match="Absolutely"):
        train_rm.main(["--task-dir", tiny_task, "--verdicts", " Absolutely, No", "--out-dir", str(tmp_path / "o")])


def test_consistency_term_enters_the_judge_loss(tiny_task, tmp_path):
    """--consistency-coef adds a non-negative term: same seed, same first batch, a larger loss."""
    first_loss = {}
    for coef in ("0", "5"):
        out = str(tmp_path / coef)
        train_rm.main(["--task-dir", tiny_task, "--max-steps", "1", "--consistency-coef", coef, "--out-dir", out, *FAST])
        first_loss[coef] = [r["loss/rm"] for r in read_metrics(out) if "loss/rm" in r][0]
    assert first_loss["5"] > first_loss["0"]
