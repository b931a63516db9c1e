"""Data: the records (preference pairs, RL prompts) and their validated JSONL readers.

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

Preference pairs are loaded by nanopairwise/formats.py (`load_preference_pairs`), which also reads
other shapes (TRL conversational, Anthropic HH, UltraFeedback-binarized, Parquet files), maps
them to these records and reuses `read_rows` here. Token tensors: nanopairwise/batching.py.
"""

import json
import os
from dataclasses import dataclass, field, fields

from nanopairwise.common import atomic_write_text
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


def check_prompt(row: dict, name: str = "prompt"):
    """row[name] is a string or a non-empty list of messages (formats.py checks message lists with it)."""
    if name not in row:
        raise FieldError(f"missing required field {name!r}")
    prompt = row[name]
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise FieldError(f"field {name!r}: expected a string or a non-empty list of messages, "
                         f"got {describe(prompt)}")
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise FieldError(f"field {name!r}[{i}]: expected an object with 'role' and 'content', "
                             f"got {describe(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise FieldError(f"field {name!r}[{i}]: missing key {key!r}")
            if not isinstance(msg[key], str):
                raise FieldError(f"field {name!r}[{i}][{key!r}]: expected a string, got {describe(msg[key])}")


def check_str(row: dict, key: str, required: bool):
    if key not in row or (row[key] is None and not required):
        if required:
            raise FieldError(f"missing required field {key!r}")
        return
    if not isinstance(row[key], str):
        raise FieldError(f"field {key!r}: expected a string, got {describe(row[key])}")


def describe(value) -> str:
    name = {bool: "bool", int: "int", float: "float", list: "list", dict: "object", type(None): "null"}
    return name.get(type(value), type(value).__name__)


def check_pair_row(row: dict):
    check_prompt(row)
    for key, required in (("chosen", True), ("rejected", True), ("principle", False)):
        check_str(row, key, required)


def check_rl_row(row: dict):
    check_prompt(row)
    for key in ("anchor", "principle"):
        check_str(row, key, required=False)


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
        raise FieldError(f"expected a JSON object, got {describe(row)}")
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


def load_rl_prompts(path: str, skip_bad: bool = False, report: dict = None, default_principle: str = None) -> list:
    """Read RL prompts; a prompt without a principle gets `default_principle` (None: left None)."""
    report = {} if report is None else report
    prompts = tag_sources([RLPrompt.from_row(r) for r in read_jsonl(path, check_rl_row, skip_bad, report)],
                           path, report)
    report.update(kept=len(prompts))
    return fill_principles(prompts, default_principle)


def fill_principles(records, default_principle):
    if default_principle is not None:                   # None: keep each record's own ("" included)
        for r in records:
            r.principle = r.principle or default_principle
    return records


def tag_sources(records, path, report):
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
