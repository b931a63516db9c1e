"""Experiment tracking: the metrics.jsonl rows, also sent to TensorBoard or Weights & Biases.

`--report-to none|tensorboard|wandb` in train_rm.py and train_ppo.py. The tracker receives
exactly the rows MetricsLogger (below) appends to metrics.jsonl (one `log(step, row)` per row,
rank 0 only, since only rank 0's logger is live), so a dashboard never shows a number the run
directory does not hold. Numbers become scalars under their slash-namespaced key (`loss/pg`,
`eval/oracle_score`: TensorBoard and W&B both group by the part before the slash); anything
that is not a number (a string, null) is left to metrics.jsonl.

Backends are optional installs (`pip install 'nanopairwise[tracking]'`):
  tensorboard  torch.utils.tensorboard's SummaryWriter, event files in OUT_DIR/tensorboard
               (`tensorboard --logdir OUT_DIR`).
  wandb        a run in OUT_DIR/wandb, offline unless the user set WANDB_MODE: nothing goes over
               the network until `wandb sync OUT_DIR/wandb/offline-run-*`.
"""

import importlib.util
import json
import math
import os

import numpy as np
import torch

from nanopairwise.common import atomic_write_text, dumps_json
from nanopairwise.distributed import get_rank
from nanopairwise.guards import UserError

# ----------------------------------------------------------------------------------------------
# the metrics logger


class MetricsLogger:
    """One console line per step (rank 0) and the same numbers appended to metrics.jsonl.

    Keys are slash-namespaced (`loss/pg`, `judge/accuracy`). A logger with `out_dir=None` or on a
    rank other than 0 is a dummy, so the training loop never branches on "is logging on".
    `report_to` ("tensorboard", "wandb"; nanopairwise/tracking.py) also sends every row to a
    dashboard; `config` (the run's arguments) goes to W&B.
    """

    def __init__(self, out_dir=None, report_to="none", config=None):
        self.enabled = get_rank() == 0
        self.path = self.tracker = None
        if self.enabled and out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            self.path = os.path.join(out_dir, "metrics.jsonl")
            self.tracker = make_tracker(report_to, out_dir, config)

    def log(self, step: int, metrics: dict, total: int = None, console_keys=None):
        if not self.enabled:
            return
        row = {"step": step, **{k: _to_py(v) for k, v in metrics.items()}}
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(dumps_json(row) + "\n")
        if self.tracker is not None:
            self.tracker.log(step, row)
        keys = console_keys if console_keys is not None else list(metrics)
        head = f"step {step}/{total}" if total is not None else f"step {step}"
        parts = [head] + [f"{k} {_fmt(row[k])}" for k in keys if k in row]
        print(" | ".join(parts), flush=True)

    def close(self):
        """Flush and close the dashboard, if any (metrics.jsonl is written line by line)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def truncate(self, step: int):
        """On resume: drop the rows logged after checkpoint `step` (the crashed run's), so the
        resumed run does not log them twice; a half-written last line of a killed run goes too."""
        if not self.enabled or self.path is None or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        atomic_write_text(self.path, "".join(line for line in lines if _row_step(line) <= step))
        if self.tracker is not None:
            self.tracker.purge(step + 1)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line a killed write left unparseable."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _to_py(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fmt(v):
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# dashboards


BACKENDS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package it needs


def add_arguments(parser):
    """The --report-to flag of train_rm.py and train_ppo.py."""
    parser.add_argument("--report-to", choices=BACKENDS, default="none",
                        help="also send the metrics.jsonl rows to TensorBoard (OUT_DIR/tensorboard) or W&B (offline "
                             "unless WANDB_MODE is set); optional installs: pip install 'nanopairwise[tracking]'")


def check_arguments(parser, args):
    """Stop with the parser's error if the --report-to backend is not installed (on every rank)."""
    problem = check_available(args.report_to)
    if problem:
        parser.error(problem)


def check_available(report_to: str) -> str:
    """None if the backend can be used, else the message to stop with (checked on every rank
    right after parsing, so a missing package never leaves the other ranks waiting for rank 0)."""
    if report_to not in BACKENDS:
        return f"--report-to {report_to!r}: choose one of {', '.join(BACKENDS)}"
    package = PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"--report-to {report_to} needs the {package} package, an optional extra: "
                f"pip install 'nanopairwise[tracking]' (or pip install {package})")
    return None


def make_tracker(report_to: str, out_dir: str, config: dict = None):
    """The tracker for `report_to`, or None for "none"."""
    problem = check_available(report_to)
    if problem:
        raise UserError(problem)
    if report_to == "tensorboard":
        return TensorBoardTracker(out_dir)
    if report_to == "wandb":
        return WandbTracker(out_dir, config)
    return None


def scalars(row: dict) -> dict:
    """The finite numbers of a metrics row, except its "step"."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, out_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = os.path.join(out_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def log(self, step: int, row: dict):
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a crashed run's dashboard still shows every step it logged

    def purge(self, step: int):
        """On resume: a new event file whose first event purges every scalar logged at `step` or
        later (the crashed run's), so the dashboard shows each step once, as metrics.jsonl does."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=step)

    def close(self):
        self.writer.close()  # flushes the event file


class WandbTracker:
    def __init__(self, out_dir: str, config: dict = None):
        os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asked for it
        import wandb
        os.makedirs(out_dir, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanopairwise"), dir=out_dir,
                              name=os.path.basename(os.path.normpath(out_dir)), config=config or {})

    def log(self, step: int, row: dict):
        self.run.log(scalars(row), step=step)

    def purge(self, step: int):
        """A wandb run cannot drop logged steps; a resumed run is a new (offline) run."""

    def close(self):
        self.run.finish()
