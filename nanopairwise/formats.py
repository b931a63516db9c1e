"""Preference data in the shapes people hold it, mapped to nanopairwise's pair records.

Every reader ends in the record of nanopairwise/data.py: `{"prompt": P, "chosen": str,
"rejected": str, ...}`, P a string or a list of `{"role", "content"}` messages. The formats
(`--data-format` of train_rm.py):

    pairs           nanopairwise's own: {"prompt", "chosen": str, "rejected": str, "principle"?}
    trl             TRL's preference formats. Conversational: "chosen" / "rejected" are message
                    lists, with an explicit "prompt" (string or messages) or without one (the
                    "implicit prompt": both lists start with the same conversation). Standard
                    (all strings, with a "prompt") is read as `pairs`.
    hh              Anthropic HH-RLHF: "chosen" / "rejected" are whole dialogues as text,
                    "\\n\\nHuman: ...\\n\\nAssistant: ...", parsed into messages, then as trl.
    ultrafeedback   UltraFeedback-binarized (HuggingFaceH4): message lists as trl plus
                    "score_chosen" / "score_rejected"; pairs with equal scores are ties and
                    dropped like equal texts (load_preference_pairs). Its "prompt" string
                    repeats the first user turn and is kept as meta "prompt_text".
    auto            detected from the fields of the first readable row; the choice is printed.

Conversations, one rule for trl / hh / ultrafeedback: the prompt is the longest common prefix
of the chosen and rejected message lists (after the explicit prompt, if any), leaving at least
the last message of each; what follows on each side (the "tail") must be exactly one assistant
message, which is the response. A tail of several messages (e.g. an assistant turn, a user
turn, another assistant turn that differ between chosen and rejected) has no single response
to score: that row is an error (`--skip-bad-lines` skips and counts such rows).

Files: JSON lines (what `datasets.Dataset.to_json` writes) or Parquet (`Dataset.to_parquet`;
recognised by its magic bytes, read with pyarrow, an optional extra: `pip install
'nanopairwise[parquet]'`). Errors name `file:line` for JSON lines and `file:row N` (1-based)
for Parquet, as nanopairwise/data.py does for its own format.
"""

import re

from nanopairwise import data
from nanopairwise.distributed import print0
from nanopairwise.guards import UserError

FORMATS = ("auto", "pairs", "trl", "hh", "ultrafeedback")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ----------------------------------------------------------------------------------------------
# files


def load_preference_pairs(path: str, skip_bad: bool = False, report: dict = None, data_format: str = "pairs",
                          default_principle: str = None) -> list:
    """Read preference pairs; ties are dropped and counted in `report["ties"]`; a pair without a
    principle gets `default_principle` (None: left None).

    `data_format` (above; "auto" detects) picks the converter; a Parquet file is read with
    pyarrow. A tie is a pair
    whose chosen and rejected texts are equal, or whose `score_chosen == score_rejected`.
    """
    report = {} if report is None else report
    rows = read_pair_rows(path, data_format, skip_bad, report)
    pairs = data.tag_sources([data.PreferencePair.from_row(r) for r in rows], path, report)
    kept = [p for p in pairs if not _is_tie(p)]
    report.update(ties=len(pairs) - len(kept), kept=len(kept))
    if report["ties"]:
        print0(f"{path}: dropped {report['ties']} tie(s) (chosen == rejected or equal scores) of {len(pairs)} pairs")
    return data.fill_principles(kept, default_principle)


def _is_tie(p: data.PreferencePair) -> bool:
    scores = p.meta.get("score_chosen"), p.meta.get("score_rejected")
    return p.chosen == p.rejected or (None not in scores and scores[0] == scores[1])


def read_pair_rows(path: str, data_format: str = "pairs", skip_bad: bool = False, report: dict = None) -> list:
    """Rows of a pairs file in `data_format`, each converted to a nanopairwise pair dict."""
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; choose one of {', '.join(FORMATS)}")
    entries = _parquet_entries(path) if _is_parquet(path) else data.jsonl_entries(path)
    if data_format == "auto":  # a file with no rows at all has no format: the caller says it is empty
        data_format = detect_format(path, entries) if entries else "pairs"
    convert = CONVERTERS[data_format]

    def validate(row):
        pair = convert(row)
        data.check_pair_row(pair)  # what every format ends in: a valid nanopairwise pair
        return pair

    return data.read_rows(path, entries, validate, skip_bad, report)


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _parquet_entries(path: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: a Parquet file; reading it needs pyarrow, an optional extra: "
                         f"pip install 'nanopairwise[parquet]' (or pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors name neither the file nor a row
        raise data.DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [(f"row {i}", lambda row=row: row) for i, row in enumerate(rows, start=1)]


def detect_format(path: str, entries) -> str:
    """The format of the first row that parses, from its fields; printed, since it is a guess."""
    for where, get_row in entries:
        try:
            row = get_row()
        except data.FieldError:
            continue
        chosen = row.get("chosen")
        if "score_chosen" in row and "score_rejected" in row:
            fmt, why = "ultrafeedback", "fields score_chosen / score_rejected"
        elif isinstance(chosen, list):
            fmt, why = "trl", "'chosen' is a message list"
        elif isinstance(chosen, str) and "prompt" not in row and HH_TURN.match(chosen):
            fmt, why = "hh", "'chosen' is a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue and there is no 'prompt'"
        elif isinstance(chosen, str) and "prompt" in row:
            fmt, why = "pairs", "'prompt' and a string 'chosen'"
        else:
            raise data.DataError(f"{path}:{where}: --data-format auto: cannot tell the format from fields "
                              f"{sorted(row)}; pass --data-format {'|'.join(FORMATS[1:])}")
        print0(f"{path}: data format '{fmt}' detected from {path}:{where} ({why})")
        return fmt
    raise data.DataError(f"{path}: --data-format auto: no readable row to detect the format from")


# ----------------------------------------------------------------------------------------------
# row converters: a source row -> a nanopairwise pair dict (or data.FieldError)


def convert_pairs(row: dict) -> dict:
    return row  # checked by read_pair_rows as every converted row is


def convert_trl(row: dict) -> dict:
    if not isinstance(row.get("chosen"), list) and not isinstance(row.get("rejected"), list):
        return convert_pairs(row)  # TRL's standard (string) format is ours
    prompt = row.get("prompt")
    if prompt is not None:
        data.check_prompt(row)
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    pair = split_conversations(chosen, rejected, prompt)
    return {**{k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}, **pair}


def convert_ultrafeedback(row: dict) -> dict:
    for key in ("score_chosen", "score_rejected"):
        if key not in row:
            raise data.FieldError(f"missing required field {key!r}")
        if isinstance(row[key], bool) or not isinstance(row[key], (int, float)):
            raise data.FieldError(f"field {key!r}: expected a number, got {data.describe(row[key])}")
    pair = split_conversations(_messages(row, "chosen"), _messages(row, "rejected"))
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "messages")}
    return {**meta, "prompt_text": row.get("prompt"), **pair}


def convert_hh(row: dict) -> dict:
    chosen, rejected = (parse_hh(row, key) for key in ("chosen", "rejected"))
    meta = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return {**meta, **split_conversations(chosen, rejected)}


CONVERTERS = {"pairs": convert_pairs, "trl": convert_trl, "hh": convert_hh, "ultrafeedback": convert_ultrafeedback}


# ----------------------------------------------------------------------------------------------
# conversations


def _messages(row: dict, key: str) -> list:
    """row[key] checked as a non-empty list of {"role": str, "content": str} messages."""
    data.check_prompt(row, key)  # a string or a well-formed non-empty message list ...
    if not isinstance(row[key], list):  # ... and here not a string
        raise data.FieldError(f"field {key!r}: expected a list of messages, got {data.describe(row[key])}")
    return row[key]


def parse_hh(row: dict, key: str) -> list:
    """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> [{"role": "user", ...}, {"role": "assistant", ...}, ...]."""
    data.check_str(row, key, required=True)
    text = row[key]
    parts = HH_TURN.split(text)  # [text before the first turn, speaker, content, speaker, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise data.FieldError(f"field {key!r}: expected a dialogue starting with '\\n\\nHuman: ', got {text[:40]!r}")
    return [{"role": HH_ROLES[s], "content": c} for s, c in zip(parts[1::2], parts[2::2])]


def split_conversations(chosen: list, rejected: list, prompt=None) -> dict:
    """{"prompt", "chosen", "rejected"} of two conversations: the prompt is `prompt` (if given)
    followed by their longest common message prefix, the responses their final assistant turns."""
    n = min(len(chosen), len(rejected)) - 1  # keep at least the last message of each side
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    shared = chosen[:k]
    for key, tail in (("chosen", chosen[k:]), ("rejected", rejected[k:])):
        if len(tail) != 1:
            raise data.FieldError(f"field {key!r}: {len(tail)} messages after the shared prompt "
                               f"(roles {[m['role'] for m in tail]}); expected one final assistant response")
        if tail[0]["role"] != "assistant":
            raise data.FieldError(f"field {key!r}: the final message has role {tail[0]['role']!r}, expected 'assistant'")
    if prompt is None and not shared:
        raise data.FieldError("no prompt: field 'prompt' is missing and 'chosen' and 'rejected' share no first message")
    if shared and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    full = shared if prompt is None else (prompt + shared if shared else prompt)
    return {"prompt": full, "chosen": chosen[k]["content"], "rejected": rejected[k]["content"]}
