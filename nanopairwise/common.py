"""Shared machinery for the scripts: seeding, dtypes, atomic checkpoint IO, JSON without NaN, timers.

Nothing here is RL math (that lives in losses.py, judge.py, scalar_head.py) and nothing here is
distributed setup (distributed.py); the metrics logger is in tracking.py, the run directory's
lock in rundir.py. This is the plumbing every script needs, written once.
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
import uuid

import numpy as np
import torch

from nanopairwise.distributed import barrier, broadcast_object, get_rank, get_world_size, print0

# ----------------------------------------------------------------------------------------------
# seeding and dtype


# Every random stream of a run is seeded from --seed and a named purpose, never from a shared
# global generator, so that adding a draw in one place cannot shift another and a resumed run
# re-seeds each stream exactly. Seed of (purpose, index) = seed * multiplier + offset + index: the
# multipliers keep runs with seeds s and s + 1 from sharing a stream of one purpose (for indices
# below the multiplier), the offsets keep one run's purposes apart. The numbers are those the
# streams always had, so runs reproduce earlier runs bit for bit.
SEED_PURPOSES = {                   # purpose: (multiplier, offset)      index
    "data_order": (1000, 0),        # order of the training records       epoch
    "length_buckets": (1000, 500),  # order of the length-bucketed batches epoch
    "rollout": (1_000_003, 0),      # PPO sampling, on the device         step * world_size + rank
    "minibatches": (7919, 0),       # PPO minibatch shuffles              step * world_size + rank
    "anchors": (1, 17),             # best-of-N anchor samples            0
    "reward_norm_prompts": (1, 29),  # which prompts measure the BT norm  0
    "reward_norm_rollouts": (1, 31),  # their samples                     rank
    "eval": (1, 12345),             # held-out evaluation samples         rank
}


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """The seed of one random stream: seed * multiplier + offset + index (SEED_PURPOSES)."""
    multiplier, offset = SEED_PURPOSES[purpose]
    return seed * multiplier + offset + index


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
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "bf16-mixed": torch.float32}  # the weights' dtype; bf16-mixed computes in AUTOCAST's
# mixed precision: fp32 weights (the master copy the optimizer updates, fp32 gradients) and bf16
# matmuls under torch.autocast, on the CPU (native bf16 on AVX512-BF16 / AMX) as on CUDA
AUTOCAST = {"bf16-mixed": torch.bfloat16}


def compute_precision(name: str, device):
    """The autocast context a --dtype trains under (none but for a mixed one). Wraps the whole run:
    autocast changes only which dtype matmuls compute in, not optimizer steps or saved weights."""
    if name not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST[name])


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
