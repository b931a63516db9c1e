"""The run directory (--out-dir) of a training script: one run at a time, nothing half-written left.

    claim_out_dir(out_dir)   for the run's life: OUT_DIR/.lock (RunLock) held by rank 0, and what a
                             killed checkpoint write left behind cleaned up (remove_leftovers)
"""

import contextlib
import fcntl
import glob
import os
import shutil
import socket

from nanopairwise.distributed import barrier, get_rank, print0
from nanopairwise.guards import UserError, on_rank0


@contextlib.contextmanager
def claim_out_dir(out_dir: str):
    """The run owns `out_dir` for its life: rank 0 takes the RunLock (a second run on it stops at
    once, naming this one's pid), then removes what a killed checkpoint write left behind (safe:
    with the lock held no live writer is there); the lock is released on the way out."""
    lock = on_rank0(lambda: RunLock(out_dir).acquire())
    try:
        if get_rank() == 0:
            for path in remove_leftovers(out_dir):
                print0(f"removed {path} (left by a write that was killed)")
        barrier()                        # a checkpoint put back is there before any rank looks for it
        yield
    finally:
        if lock is not None:
            lock.release()


class RunLock:
    """`OUT_DIR/.lock`, held for the run's life: an flock (released by the kernel when the process
    dies, so a lock left by a killed run is stale and taken over) plus the holder's pid and host
    in the file, so a second run can name it. Under torchrun rank 0 takes it."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, ".lock")
        self.file = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown pid"
            f.close()
            raise UserError(f"--out-dir {os.path.dirname(self.path)} is in use by another run ({holder}); "
                            "wait for it to finish or pick another --out-dir") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            print(f"note: taking over the stale lock of a run that ended without releasing it ({previous})",
                  flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is not None:
            self.file.truncate(0)                 # an empty lock file: ended cleanly (a pid: it was killed)
            self.file.flush()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


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
