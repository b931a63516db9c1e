"""Shared machinery for the scripts: distributed setup, seeding, logging, atomic checkpoint IO.

Nothing here is RL math (that lives in losses.py / judge.py); this is the plumbing every script
needs, written once. Modelled on nanochat's `compute_init()` / `print0` pattern.
"""

import contextlib
import glob
import json
import math
import os
import random
import shutil
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

from nanopairwise import tracking

# ----------------------------------------------------------------------------------------------
# distributed


def is_ddp() -> bool:
    """True when launched by torchrun (it sets RANK / WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args, **kwargs):
    """print on rank 0 only (flushes, so torchrun logs interleave sensibly)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_init(device: str = "auto"):
    """Initialise (optional) DDP and pick the device.

    Returns (ddp, rank, local_rank, world_size, device). Under torchrun the backend is NCCL on
    CUDA and gloo on CPU; each rank takes `cuda:LOCAL_RANK`.
    """
    ddp = is_ddp()
    dev = autodetect_device(device)
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ["WORLD_SIZE"])
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # 2-core CI machines: one intra-op thread per process keeps torchrun from oversubscribing
        # (an explicit OMP_NUM_THREADS wins: scripts/compare.py --jobs sets it per worker).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return ddp, rank, local_rank, world_size, dev


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed). Returns a new tensor."""
    x = x.clone()
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def mean_over_ranks(stats: dict, device, sum_keys=()) -> dict:
    """A dict of numbers averaged over ranks (keys in `sum_keys` summed), in one all-reduce:
    every rank must pass the same keys in the same order. Identity when not distributed."""
    if get_world_size() == 1:
        return stats
    keys = list(stats)
    t = all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device))
    return {k: v if k in sum_keys else v / get_world_size() for k, v in zip(keys, t.tolist())}


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (identity when not distributed)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# data parallelism: DDP (replicated weights) or FSDP2 (sharded weights, torch.distributed.fsdp)


def _fsdp_modules(module):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def shard_model(module: torch.nn.Module, block_type: type) -> torch.nn.Module:
    """FSDP2: `fully_shard` every `block_type` submodule (a transformer block), then the root.

    Each rank keeps 1/world of every parameter; a block's weights are all-gathered for its
    forward and backward and freed after, gradients are reduce-scattered. Works for frozen
    models too (reference, reward model). Call before creating the optimizer.
    """
    from torch.distributed.fsdp import fully_shard
    for m in module.modules():
        if isinstance(m, block_type):
            fully_shard(m)
    fully_shard(module)
    # FSDP2 names its root at the first forward through it, but generation and the judge's verdict
    # logits call the blocks without the root's forward: settle the root now (private API; torch
    # has no public one, and a dummy forward would need each model's arguments)
    module._get_fsdp_state()._lazy_init()
    return module


def wrap_data_parallel(module: torch.nn.Module, fsdp: bool, block_type: type, device: torch.device):
    """The module as trained under torchrun: FSDP2-sharded, DDP-wrapped, or as is (one process)."""
    if get_world_size() == 1:
        return module
    if fsdp:
        return shard_model(module, block_type)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own model)."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Full weights for code that does not go through forward() (token-by-token generation, the
    judge's two verdict logits): every FSDP2 unit is all-gathered once and kept until exit, so
    a decoding step does not all-gather the model again. Without FSDP this does nothing."""
    units = _fsdp_modules(module)
    for m in units:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield module
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_state_dict(module: torch.nn.Module) -> dict:
    """name -> full tensor for a module that may hold FSDP2 shards: under FSDP gathered to rank 0
    on the CPU ({} elsewhere; collective, every rank must call it), else its own state dict."""
    if not _fsdp_modules(module):
        return {k: v.detach() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------
# seeding and dtype


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# atomic checkpoint IO: nothing the user made is ever left half-written


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory next to `path`; on success, swap it into place.

    The temp dir lives in the same parent so the final `os.replace` is a rename on one
    filesystem. If `path` already exists it is moved aside first and removed only after the new
    directory is in place, so at every instant either the old or the new checkpoint is complete.
    On an exception the temp dir is removed and `path` is untouched.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir_all_ranks(path: str):
    """`atomic_dir` for a checkpoint every rank writes into (FSDP shards): rank 0 makes the temp
    directory and tells the others; after a barrier rank 0 swaps it into place. One process: as
    atomic_dir."""
    if get_world_size() == 1:
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if get_rank() == 0:
        with atomic_dir(path) as tmp:
            broadcast_object(tmp)
            yield tmp
            barrier()                                          # every rank has written its files
    else:
        yield broadcast_object(None)
        barrier()
    barrier()                                                  # the directory is in place


def remove_leftovers(out_dir: str, name: str = "checkpoint") -> list:
    """Clean up after a write killed mid-way, at the start of a run (the lock held, so no live
    writer): `.NAME.tmp-*` (an unfinished new checkpoint) and `*.tmp-*` files are removed; a
    `.NAME.old-*` is the previous complete checkpoint, put back if the kill fell between the
    two renames of atomic_dir (no NAME), else removed. Returns what was removed."""
    path = os.path.join(out_dir, name)
    olds = sorted(glob.glob(os.path.join(out_dir, f".{name}.old-*")))
    if olds and not os.path.exists(path):
        os.replace(olds.pop(), path)
    removed = olds + glob.glob(os.path.join(out_dir, f".{name}.tmp-*")) + glob.glob(os.path.join(out_dir, "*.tmp-*"))
    removed += glob.glob(os.path.join(path, "**", "*.tmp-*"), recursive=True)
    for r in removed:
        shutil.rmtree(r, ignore_errors=True) if os.path.isdir(r) else os.remove(r)
    return removed


def atomic_torch_save(obj, path: str):
    """torch.save to `path` via a temp file + rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# logging


class MetricsLogger:
    """One console line per step (rank 0) and the same numbers appended to metrics.jsonl.

    Keys are slash-namespaced (`loss/pg`, `judge/accuracy`). A logger with `out_dir=None` or on a
    rank other than 0 is a dummy, so the training loop never branches on "is logging on".
    `report_to` ("tensorboard", "wandb"; nanopairwise/tracking.py) also sends every row to a
    dashboard; `config` (the run's arguments) goes to W&B.
    """

    def __init__(self, out_dir=None, enabled=True, report_to="none", config=None):
        self.enabled = enabled and get_rank() == 0
        self.path = self.tracker = None
        if self.enabled and out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            self.path = os.path.join(out_dir, "metrics.jsonl")
            self.tracker = tracking.make_tracker(report_to, out_dir, config)

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


def json_safe(obj):
    """`obj` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj, **kw) -> str:
    """json.dumps that writes NaN / inf as null (valid JSON for every reader)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


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


def clock(device: torch.device) -> float:
    """Seconds for phase timings: waits for the GPU's queued work first, so each phase is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Progress:
    """Progress line with an ETA for long phases: `bootstrap sft 120/400 | 12.3 s | eta 28.7 s`."""

    def __init__(self, total: int, desc: str, every: int = None):
        self.total, self.desc = total, desc
        self.every = every or max(1, total // 10)
        self.t0 = time.time()

    def update(self, i: int, extra: str = ""):
        """Call with the 1-based count of finished items; prints every `every` items and at the end."""
        if i % self.every and i != self.total:
            return
        dt = time.time() - self.t0
        eta = dt / max(i, 1) * (self.total - i)
        tail = f" | {extra}" if extra else ""
        print0(f"{self.desc} {i}/{self.total} | {dt:.1f} s | eta {eta:.1f} s{tail}")
