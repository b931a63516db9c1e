"""Data: validated JSONL readers for preference pairs and RL prompts, and token batching helpers.

Formats (docs/DESIGN.md §5), one JSON object per line, empty lines ignored:

    preference pairs  {"prompt": P, "chosen": str, "rejected": str, "principle"?: str, ...}
    RL prompts        {"prompt": P, "anchor"?: str, "principle"?: str, ...}

where P is a string or a conversation `[{"role": str, "content": str}, ...]` (non-empty). Optional
fields may be null. Any other field (e.g. the oracle scores the built-in task writes) is kept in a
`meta` dict and written back by `to_dict()`.

A bad line is a `DataError` (a ValueError) that names `file:line`, the field and what is wrong,
e.g. `pairs.jsonl:17: field 'chosen': expected a string, got int`. Nothing is skipped silently:
with `skip_bad=True` bad lines are skipped, counted and reported (print0, and the optional
`report` dict). Pairs whose chosen and rejected texts are equal carry no preference and are
dropped, with a count (our reading: the paper does not say; docs/DESIGN.md §1).

Preference pairs in other shapes (TRL conversational, Anthropic HH, UltraFeedback-binarized,
Parquet files) are read by nanopairwise/formats.py, to which `load_preference_pairs(path,
data_format=...)` hands every file; it maps them to these records and reuses `read_rows` here.
"""

import json
import os
from dataclasses import dataclass, field, fields

import torch

from nanopairwise.common import atomic_write_text, derive_seed
from nanopairwise.distributed import print0
from nanopairwise.guards import UserError


DEFAULT_PRINCIPLE = "Prefer the response that follows the instruction best."  # for records that carry none


class DataError(UserError, ValueError):
    """A malformed data line: the message starts with `file:line:` (a user error: one line, exit 2)."""


class FieldError(ValueError):
    """Raised by a row validator; read_jsonl turns it into a DataError with the file and line."""


class Record:
    """A JSONL line as a dataclass: named fields, plus `meta` for every other key of the line.
    The readers below also set `source` = "file:line" (not a field: never written back)."""

    source = None

    @classmethod
    def from_row(cls, row: dict):
        names = [f.name for f in fields(cls) if f.name != "meta"]
        return cls(**{k: row.get(k) for k in names}, meta={k: v for k, v in row.items() if k not in names})

    def to_dict(self) -> dict:
        """The line back (optional fields that are None are left out)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        return {**{k: v for k, v in row.items() if v is not None}, **self.meta}


@dataclass
class PreferencePair(Record):
    prompt: object  # str or list of {"role", "content"} dicts
    chosen: str
    rejected: str
    principle: str = None
    meta: dict = field(default_factory=dict)  # every other field of the line


@dataclass
class RLPrompt(Record):
    prompt: object  # str or list of {"role", "content"} dicts
    anchor: str = None
    principle: str = None
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# validation of one row


def _check_prompt(row: dict, name: str = "prompt"):
    """row[name] is a string or a non-empty list of messages (formats.py checks message lists with it)."""
    if name not in row:
        raise FieldError(f"missing required field {name!r}")
    prompt = row[name]
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise FieldError(f"field {name!r}: expected a string or a non-empty list of messages, "
                         f"got {_describe(prompt)}")
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise FieldError(f"field {name!r}[{i}]: expected an object with 'role' and 'content', "
                             f"got {_describe(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise FieldError(f"field {name!r}[{i}]: missing key {key!r}")
            if not isinstance(msg[key], str):
                raise FieldError(f"field {name!r}[{i}][{key!r}]: expected a string, got {_describe(msg[key])}")


def _check_str(row: dict, key: str, required: bool):
    if key not in row or (row[key] is None and not required):
        if required:
            raise FieldError(f"missing required field {key!r}")
        return
    if not isinstance(row[key], str):
        raise FieldError(f"field {key!r}: expected a string, got {_describe(row[key])}")


def _describe(value) -> str:
    name = {bool: "bool", int: "int", float: "float", list: "list", dict: "object", type(None): "null"}
    return name.get(type(value), type(value).__name__)


def check_pair_row(row: dict):
    _check_prompt(row)
    for key, required in (("chosen", True), ("rejected", True), ("principle", False)):
        _check_str(row, key, required)


def check_rl_row(row: dict):
    _check_prompt(row)
    for key in ("anchor", "principle"):
        _check_str(row, key, required=False)


# ----------------------------------------------------------------------------------------------
# reading and writing


def read_jsonl(path: str, validate=None, skip_bad: bool = False, report: dict = None) -> list:
    """Parse a JSONL file into a list of dicts; `validate(row)` may raise FieldError.

    Raises DataError("path:line: what") on malformed JSON, a non-object line or a FieldError,
    unless `skip_bad`, in which case such lines are skipped and counted in `report["bad"]`
    (the first error message goes to `report["first_error"]`).
    """
    return read_rows(path, jsonl_entries(path), validate, skip_bad, report)


def jsonl_entries(path: str) -> list:
    """(line number, parse) per non-empty line of a JSONL file, for read_rows."""
    with open(path, "rb") as f:
        return [(lineno, lambda raw=raw: _parse_json_line(raw)) for lineno, raw in enumerate(f, start=1)
                if raw.strip()]


def _parse_json_line(raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FieldError(f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FieldError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise FieldError(f"expected a JSON object, got {_describe(row)}")
    return row


def read_rows(path: str, entries, validate=None, skip_bad: bool = False, report: dict = None) -> list:
    """The error handling of every reader (JSONL here, Parquet in formats.py), written once.

    `entries` are (where, get_row) pairs: `where` is the line number (or "row N") that errors
    name after `path:`, `get_row()` returns the row dict or raises FieldError. `validate(row)` may
    raise FieldError, and may return a replacement row (a format converter does).
    """
    rows, wheres, bad, first_error = [], [], 0, None
    for where, get_row in entries:
        try:
            row = get_row()
            out = validate(row) if validate is not None else None
        except FieldError as e:
            error = DataError(f"{path}:{where}: {e}")
            if not skip_bad:
                raise error from None
            bad += 1
            first_error = first_error or str(error)
            continue
        rows.append(row if out is None else out)
        wheres.append(where)
    if report is not None:
        report.update(path=path, rows=len(rows), bad=bad, first_error=first_error, lines=wheres)
    if bad:
        print0(f"warning: skipped {bad} bad line(s) in {path} (skip_bad=True); first: {first_error}")
    return rows


def load_preference_pairs(path: str, skip_bad: bool = False, report: dict = None, data_format: str = "pairs",
                          default_principle: str = None) -> list:
    """Read preference pairs; ties are dropped and counted in `report["ties"]`; a pair without a
    principle gets `default_principle` (None: left None).

    `data_format` other than "pairs", or a Parquet file, goes through nanopairwise/formats.py
    (TRL conversational, Anthropic HH, UltraFeedback-binarized; "auto" detects). A tie is a pair
    whose chosen and rejected texts are equal, or whose `score_chosen == score_rejected`.
    """
    from nanopairwise import formats  # formats.py builds on this module's readers

    report = {} if report is None else report
    rows = formats.read_pair_rows(path, data_format, skip_bad, report)
    pairs = _with_source([PreferencePair.from_row(r) for r in rows], path, report)
    kept = [p for p in pairs if not _is_tie(p)]
    report.update(ties=len(pairs) - len(kept), kept=len(kept))
    if report["ties"]:
        print0(f"{path}: dropped {report['ties']} tie(s) (chosen == rejected or equal scores) of {len(pairs)} pairs")
    return _with_principle(kept, default_principle)


def _is_tie(p: PreferencePair) -> bool:
    scores = p.meta.get("score_chosen"), p.meta.get("score_rejected")
    return p.chosen == p.rejected or (None not in scores and scores[0] == scores[1])


def load_rl_prompts(path: str, skip_bad: bool = False, report: dict = None, default_principle: str = None) -> list:
    """Read RL prompts; a prompt without a principle gets `default_principle` (None: left None)."""
    report = {} if report is None else report
    prompts = _with_source([RLPrompt.from_row(r) for r in read_jsonl(path, check_rl_row, skip_bad, report)],
                           path, report)
    report.update(kept=len(prompts))
    return _with_principle(prompts, default_principle)


def _with_principle(records, default_principle):
    if default_principle is not None:                   # None: keep each record's own ("" included)
        for r in records:
            r.principle = r.principle or default_principle
    return records


def _with_source(records, path, report):
    """Tag each record with where it came from (`path:line`, or `path:row N` for Parquet)."""
    for r, where in zip(records, report["lines"]):
        r.source = f"{path}:{where}"
    return records


def write_jsonl(path: str, rows):
    """Write dicts (or objects with `to_dict()`) one per line, atomically (temp file + rename)."""
    lines = [json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, ensure_ascii=False) for r in rows]
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------------------------
# batching


def pad_batch(seqs, pad_id: int, side: str = "right"):
    """Pad token lists to one length. Returns (ids (B, T) long, mask (B, T) long, 1 = real token).

    Right padding suits training (positions start at 0); left padding suits batched generation
    (every prompt ends at the last column, so new tokens append in lockstep).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_batch: empty batch")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def score_batches(score, encode, items, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """One number per item, `batch_size` items per forward: (n,) fp32 on the CPU, in the items'
    order. Each item becomes token ids by `encode(item)`; the inputs are sorted by length and cut
    into batches (length-bucketed: little padding); a batch is right-padded and `score(ids (b, T),
    mask (b, T))`, on `device`, returns its (b,) numbers (the judge's verdict probability, the BT
    model's score)."""
    seqs = [encode(it) for it in items]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = pad_batch([seqs[r] for r in rows], pad_id, side="right")
        out[rows] = score(ids.to(device), mask.to(device)).float().cpu()
    return out


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each right-padded row of mask (B, T) (0 for an empty row)."""
    return mask.long().sum(1).clamp(min=1) - 1


def gather_last(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at each right-padded row's last real token: (B, ...). Where a causal model
    has read the whole input: the judge's verdict logits, the BT reward model's score."""
    rows = torch.arange(x.size(0), device=x.device)
    return x[rows, last_index(mask.to(x.device))]


def rank_batch(n: int, batch_size: int, step: int, seed: int, rank: int, world_size: int, lengths=None,
               window: int = 0) -> list:
    """Indices (into n records) of this rank's share of global batch `step`.

    The data order is one permutation of range(n) per epoch, the same on every rank and a function
    of (seed, epoch) only, so a resumed run continues exactly; epoch e holds n // batch_size batches
    (the remainder is not used that epoch), and rank r takes the r-th of world_size equal slices.
    With `lengths` (one per record) and `window` > 0 the order is length-bucketed (bucket_order).
    """
    epoch, pos = divmod(step, n // batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data_order", epoch)))
    if lengths is not None and window > 0:
        generator = torch.Generator().manual_seed(derive_seed(seed, "length_buckets", epoch))
        order = bucket_order(order[:n // batch_size * batch_size], lengths, batch_size, window, generator)
    per_rank = batch_size // world_size
    start = pos * batch_size + rank * per_rank
    return order[start:start + per_rank].tolist()


def bucket_order(order: torch.Tensor, lengths, batch_size: int, window: int, generator) -> torch.Tensor:
    """Length-bucketed batches: each run of `window` batches of `order` (a shuffled index list, a
    multiple of batch_size long) is sorted by length and cut into batches, which are then put in
    random order within the run. Batches hold inputs of similar length (little padding); which
    inputs meet stays random across runs and epochs."""
    out = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start:start + window * batch_size].tolist(), key=lambda i: lengths[i])
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        out += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return torch.tensor(out, dtype=torch.long)


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator = None, shuffle: bool = True,
                        drop_last: bool = False):
    """Yield LongTensor index batches covering range(n) once (a fresh permutation if shuffle)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def shard_for_rank(items, rank: int, world_size: int) -> list:
    """Items rank, rank + world_size, ... (strided, so shard sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]
