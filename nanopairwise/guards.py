"""Guards: nothing lost, nothing silent. The checks every script runs before and during training.

Three kinds of failure, three behaviours:

  - an expected user error (a bad flag, a missing or empty file, a prompt longer than the model
    can read, a second run on the same --out-dir (rundir.py), a loss that turned NaN) is a `UserError`: the
    script prints one line, `error: <what> (<which flag / file:line>)`, and exits with status 2.
    `cli_main` is that one place. Under torchrun only rank 0 prints it (these errors are found
    the same way on every rank: flags and files are checked by all, a NaN is all-reduced first).
  - a programming error keeps its traceback (it is a bug to fix, not a message to read).
  - nothing is ever written that is not finite: `check_finite` runs before every optimizer step
    and on every tensor a checkpoint saves, so the last good checkpoint survives a divergence.

Validation happens before any model is loaded (`check_flag`, `check_input_file`,
`check_model_dir`, `check_out_dir`, `check_rows`), so a typo costs a second, not a model load.
"""

import json
import math
import operator
import os
import sys
import time

import torch


class UserError(Exception):
    """An expected error with a one-line message naming the flag, file or file:line at fault."""


class NonFiniteError(UserError):
    """A loss, gradient norm or saved tensor that is NaN or inf."""


def cli_main(main):
    """Run `main()`; a UserError becomes one line on stderr and exit status 2.

    Under torchrun every rank finds the same error (flags and files are checked by all, a NaN is
    all-reduced first), and torchrun stops the job at the first rank that exits. So rank 0 prints
    and exits at once; another rank waits a few seconds first and is normally stopped in that
    wait; only an error rank 0 did not hit is then printed, by the rank that hit it, once."""
    try:
        main()
    except UserError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            time.sleep(5)
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        _torchelastic_error_file(f"error: {e}")
        sys.exit(2)


def _torchelastic_error_file(msg: str):
    """Under torchrun, leave the message where its failure summary looks for the root cause
    (TORCHELASTIC_ERROR_FILE), so the summary names it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                 "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def on_rank0(fn, *args):
    """Run `fn(*args)` on rank 0 only (e.g. take the run lock); a UserError it raises is raised on
    every rank, so all stop together instead of the others waiting at the next collective."""
    from nanopairwise.distributed import broadcast_object, get_rank
    error, result = None, None
    if get_rank() == 0:
        try:
            result = fn(*args)
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result


# ----------------------------------------------------------------------------------------------
# flags


COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_flag(args, name: str, lo=None, hi=None, above=None, below=None, zero_ok=False):
    """args.<name> must be a finite number with lo <= v <= hi, v > above, v < below (each optional);
    `zero_ok` lets 0 through as "off" whatever the bounds say. Errors name the flag: `--lr nan: ...`."""
    v = getattr(args, name.lstrip("-").replace("-", "_"))
    if v is None:  # left unset: its default is chosen later (e.g. the learning rate by model regime)
        return
    if zero_ok and v == 0:
        return
    bounds = [(op, b) for op, b in ((">=", lo), (">", above), ("<=", hi), ("<", below)) if b is not None]
    if not (math.isfinite(v) and all(COMPARE[op](v, b) for op, b in bounds)):
        need = " and ".join(f"{op} {b}" for op, b in bounds)
        raise UserError(f"{name} {v}: must be a finite number {need}{' (or 0 = off)' if zero_ok else ''}")


def check_divides(total: int, name: str, world_size: int):
    if total % world_size:
        raise UserError(f"{name} {total} must divide by the number of ranks ({world_size})")


# ----------------------------------------------------------------------------------------------
# files and directories


def check_input_file(path: str, flag: str):
    """An existing, readable, non-empty regular file; the error names the flag and the path."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: is a directory, not a file" if os.path.isdir(path)
                        else f"{flag} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} {path}: the file is empty")


def check_model_dir(path: str, flag: str):
    """A Hugging Face checkpoint directory: config.json and tokenizer.json in it."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{flag} {path}: no {name} in it (not a Hugging Face checkpoint directory)")


def check_out_dir(path: str, flag: str = "--out-dir"):
    """Create `path` if needed and prove it writable by writing (and removing) a probe file."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: not writable ({e.strerror})") from None


def check_rows(rows: list, need: int, flag: str, path: str, what: str, need_flag: str):
    """At least `need` usable rows (after ties and skipped bad lines were dropped)."""
    if len(rows) < need:
        raise UserError(f"{flag} {path}: {len(rows)} usable {what}, fewer than one batch ({need_flag} {need})")


def check_length(n_tokens: int, limit: int, where: str, what: str, hint: str):
    """A sequence the model would read must fit its max_position_embeddings; names file:line."""
    if n_tokens > limit:
        raise UserError(f"{where}: {what} is {n_tokens:,} tokens, more than the {limit:,} positions "
                        f"the model reads ({hint})")


# ----------------------------------------------------------------------------------------------
# finite or nothing


def check_finite(step: int, values: dict, hint: str, last_saved=None):
    """Stop before the optimizer step if any of `values` (name -> 0-d tensor or float) is not
    finite. One host transfer for all of them. `step` is the 1-based step being computed, as logged."""
    names = list(values)
    dev = next((v.device for v in values.values() if torch.is_tensor(v)), "cpu")
    got = torch.stack([torch.as_tensor(values[k], device=dev).detach().float().reshape(()) for k in names]).tolist()
    bad = [f"{k} is {v}" for k, v in zip(names, got) if not math.isfinite(v)]
    if bad:
        saved = f"the last checkpoint (step {last_saved}) is untouched" if last_saved else "no checkpoint was written"
        raise NonFiniteError(f"step {step}: {', '.join(bad)}; stopped before the optimizer step, {saved}. "
                             f"Look at {hint}")


def check_finite_over_ranks(step: int, values: dict, hint: str, last_saved=None) -> dict:
    """`values` (name -> 0-d tensor) averaged over the ranks in one all-reduce, then check_finite,
    so every rank stops alike. Returns name -> float: the caller's one host sync for them."""
    from nanopairwise.distributed import all_reduce_sum, get_world_size
    means = all_reduce_sum(torch.stack([v.detach().float() for v in values.values()])) / get_world_size()
    out = dict(zip(values, means.tolist()))
    check_finite(step, out, hint, last_saved)
    return out


def check_divergence(step: int, what: str, value: float, flag: str, limit: float, hint: str, last_saved=None,
                     device="cpu"):
    """The divergence guard: a policy far from the reference (or from the rollout policy within an
    update) has run away, whatever its reward says; stop before it is saved. `value` is maxed over
    the ranks first, so every rank decides alike; `limit` is the value of `flag`, 0 turns it off."""
    from nanopairwise.distributed import get_world_size
    if get_world_size() > 1:
        import torch.distributed as dist
        value = torch.tensor(value, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        value = value.item()
    if limit and not value <= limit:
        saved = f"the last checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written"
        raise UserError(f"step {step}: {what} is {value:.4g}, above {flag} {limit:g}: the policy diverged; stopped "
                        f"before saving, {saved}. Look at {hint} ({flag} 0 turns this guard off)")


def nonfinite_tensors(state: dict) -> list:
    """Names of floating-point tensors of `state` holding a NaN or inf."""
    return [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
