"""Tests for nanopairwise/tracking.py: a train_rm.py run with --report-to tensorboard writes event
files that tensorboard's own reader gives back as exactly the metrics.jsonl rows; a missing
backend package (wandb is never installed in CI) is a clear error before anything runs."""

import builtins
import importlib.util
import json
import math
import os

import pytest

import train_ppo
import train_rm
from nanopairwise import tracking
from nanopairwise.tracking import MetricsLogger

FAST = ["--batch-size", "8", "--eval-batch-size", "32", "--warmup-steps", "2"]


def read_event_scalars(log_dir) -> dict:
    """{tag: [(step, value), ...]} with tensorboard's event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(metrics_path) -> dict:
    out = {}
    for line in open(metrics_path):
        row = json.loads(line)
        for k, v in tracking.scalars(row).items():
            out.setdefault(k, []).append((row["step"], v))
    return out


def test_train_rm_tensorboard_events_are_the_metrics_rows(tiny_task, tmp_path):
    pytest.importorskip("tensorboard")
    out = str(tmp_path / "judge")
    train_rm.main(["--task-dir", tiny_task, "--out-dir", out, "--max-steps", "3", "--report-to", "tensorboard", *FAST])
    events = read_event_scalars(os.path.join(out, "tensorboard"))
    expected = expected_scalars(os.path.join(out, "metrics.jsonl"))
    assert {"loss/rm", "train/accuracy", "lr", "eval/accuracy", "eval/ece"} <= set(expected)
    assert set(events) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        for (_, got), (_, want) in zip(events[tag], points):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-7), (tag, got, want)  # stored as float32


def test_resume_purges_the_crashed_runs_later_steps_from_tensorboard(tmp_path):
    """A run logs steps 1-3 and dies; its resume from the step-1 checkpoint cuts metrics.jsonl back
    to step 1 and logs steps 2-3 again: TensorBoard shows each step once, the resumed values."""
    pytest.importorskip("tensorboard")
    crashed = MetricsLogger(str(tmp_path), report_to="tensorboard")
    for step in (1, 2, 3):
        crashed.log(step, {"loss/x": float(step)})
    crashed.close()
    resumed = MetricsLogger(str(tmp_path), report_to="tensorboard")
    resumed.truncate(1)
    for step in (2, 3):
        resumed.log(step, {"loss/x": 10.0 * step})
    resumed.close()
    assert read_event_scalars(os.path.join(tmp_path, "tensorboard"))["loss/x"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert read_event_scalars(os.path.join(tmp_path, "tensorboard")) == expected_scalars(tmp_path / "metrics.jsonl")


def test_logger_sends_numbers_only(tmp_path):
    pytest.importorskip("tensorboard")
    logger = MetricsLogger(str(tmp_path), report_to="tensorboard")
    logger.log(1, {"a/x": 1.5, "a/n": 3, "a/s": "text", "a/none": None, "a/flag": True, "a/nan": float("nan")})
    logger.log(2, {"a/x": -2.0})
    logger.close()
    assert read_event_scalars(str(tmp_path / "tensorboard")) == {"a/x": [(1, 1.5), (2, -2.0)], "a/n": [(1, 3.0)]}


def test_only_rank_0_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "get_rank", lambda: 1)
    monkeypatch.setattr(tracking, "make_tracker", lambda *a: pytest.fail("rank 1 must not open a dashboard"))
    logger = MetricsLogger(str(tmp_path), report_to="tensorboard")
    logger.log(1, {"a/x": 1.0})
    logger.close()
    assert os.listdir(tmp_path) == []  # neither metrics.jsonl nor event files


@pytest.mark.parametrize("script", [train_rm, train_ppo])
def test_missing_backend_package_is_named(script, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(SystemExit):
        script.get_args(["--report-to", "wandb"])
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package" in err and "pip install 'nanopairwise[tracking]'" in err


def test_wandb_defaults_to_offline(tmp_path, monkeypatch):
    """WandbTracker sets WANDB_MODE=offline (unless set) before wandb is imported; checked with a
    stand-in module, since wandb itself is not installed in CI."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seen = {}

    class FakeRun:
        def log(self, row, step):
            seen.setdefault("rows", []).append((step, row))

        def finish(self):
            seen["finished"] = True

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            seen.update(mode=os.environ.get("WANDB_MODE"), **kwargs)
            return FakeRun()

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: FakeWandb if name == "wandb" else real_import(name, *a, **k))
    tracker = tracking.WandbTracker(str(tmp_path / "run"), {"lr": 1e-3})
    tracker.log(4, {"step": 4, "loss/rm": 0.5, "note": "x"})
    tracker.close()
    assert seen["mode"] == "offline" and seen["dir"] == str(tmp_path / "run") and seen["config"] == {"lr": 1e-3}
    assert seen["rows"] == [(4, {"loss/rm": 0.5})] and seen["finished"]
    monkeypatch.setenv("WANDB_MODE", "online")
    tracking.WandbTracker(str(tmp_path / "run2"))
    assert seen["mode"] == "online"  # the user's choice stands
