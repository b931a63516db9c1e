"""train_ppo.py on two nodes, as a cluster runs it (the README's command): two torchrun
launchers (`--nnodes=2 --nproc_per_node=1`, c10d rendezvous on localhost, gloo) on one machine,
smoke sizes, then the same two launchers again with --resume. Each rank records what it did
(tests/fixtures/train_ppo_recorded.py): both nodes ran, each drew its own half of every step's
prompts, the logged statistics are the all-reduced ones and equal on both ranks, the checkpoint is
written once (rank 0, one atomic directory swap per save, nothing left over), and --resume
continues at the next step. Plumbing only, not learning.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "fixtures", "train_ppo_recorded.py")
SMOKE = ["--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-size", "2",
         "--ppo-epochs", "1", "--minibatches", "1", "--anchor-samples", "2", "--save-every", "1"]
KEYS = ("reward/score", "rollout/kl", "loss/pg", "loss/v", "rollout/length")   # logged statistics checked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, record_dir, timeout=300) -> str:
    """Both launchers of a 2-node job, started together; returns rank 0's stdout."""
    os.makedirs(record_dir)
    port = free_port()
    env = dict(os.environ, RECORD_DIR=str(record_dir), TRITON_INTERPRET="0",   # the reference path, as on a CPU
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",   # the README's command
           "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=two-nodes-{port}",
           "--rdzv_conf=join_timeout=120", SCRIPT, *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outs)
    return next(out for out in outs if "rank(s) on cpu" in out)   # the node rendezvous made rank 0


def records(record_dir, rank, kind) -> list:
    with open(os.path.join(record_dir, f"rank{rank}.jsonl"), encoding="utf-8") as f:
        return [row for row in map(json.loads, f) if row["kind"] == kind]


def check_run(record_dir, steps, out_dir):
    """Per step: disjoint halves of the prompts, all-reduced statistics equal on both ranks (from
    unequal local ones) and as logged; the checkpoint swapped in by rank 0 alone, once a step."""
    starts = [records(record_dir, r, "start")[0] for r in (0, 1)]
    assert sorted(s["GROUP_RANK"] for s in starts) == ["0", "1"]      # two nodes, one process each
    assert {s["WORLD_SIZE"] for s in starts} == {"2"} and {s["LOCAL_RANK"] for s in starts} == {"0"}
    batches = [records(record_dir, r, "batch") for r in (0, 1)]
    assert [b["step"] for b in batches[0]] == [b["step"] for b in batches[1]] == steps
    for a, b in zip(*batches):
        assert len(a["indices"]) == len(b["indices"]) == 2 and not set(a["indices"]) & set(b["indices"])
    stats = [records(record_dir, r, "stats") for r in (0, 1)]
    assert len(stats[0]) == len(stats[1]) == len(steps)
    logged = {row["step"]: row for row in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))
              if "reward/score" in row}
    for step, a, b in zip(steps, *stats):
        assert a["reduced"] == b["reduced"]
        assert any(a["local"][key] != b["local"][key] for key in KEYS)    # each rank's own batch, then one mean
        for key in KEYS:
            mean = (a["local"][key] + b["local"][key]) / 2
            assert a["reduced"][key] == pytest.approx(mean, rel=1e-12) == logged[step + 1][key]
        assert a["reduced"]["tokens"] == a["local"]["tokens"] + b["local"]["tokens"]
    checkpoint = os.path.join(out_dir, "checkpoint")
    swaps = [[row["path"] for row in records(record_dir, r, "atomic_dir") if row["path"].endswith("checkpoint")]
             for r in (0, 1)]
    assert swaps == [[checkpoint] * len(steps), []]                  # (policy/ and critic/ are swapped in it)
    saved = [sorted(row["file"] for row in records(record_dir, r, "save")) for r in (0, 1)]
    assert saved == [sorted(["optimizers.pt", "trainer_state.pt"] * len(steps)), []]
    assert sorted(os.listdir(out_dir)) == [".lock", "checkpoint", "eval.json", "metrics.jsonl"]   # no temp dirs
    assert sorted(os.listdir(checkpoint)) == ["critic", "optimizers.pt", "policy", "trainer_state.pt"]


def test_two_nodes_shard_reduce_checkpoint_once_and_resume(run_dir, tmp_path):
    out = str(tmp_path / "out")
    args = ["--run-dir", str(run_dir), "--out-dir", out, *SMOKE]
    stdout = two_nodes(args + ["--steps", "1"], tmp_path / "first")
    assert "2 rank(s) on cpu" in stdout and "held-out metric" in stdout
    check_run(tmp_path / "first", [0], out)
    first = json.load(open(os.path.join(out, "eval.json")))
    two_nodes(args + ["--steps", "2", "--resume"], tmp_path / "resumed")
    check_run(tmp_path / "resumed", [1], out)                      # step 2 only: step 1 came from the checkpoint
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=False)
    assert state["step"] == 2 and state["world_size"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert sorted({r["step"] for r in rows if "reward/score" in r}) == [1, 2]
    assert json.load(open(os.path.join(out, "eval.json")))["before"] == first["before"]   # kept from the first run
