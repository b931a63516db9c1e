"""Tests for nanopairwise/formats.py on the committed fixtures in tests/fixtures/ (one file per
format, each with one malformed row): what each row maps to, auto-detection, the file:line (or
file:row N) error of the malformed row, and Parquet read with pyarrow or refused clearly without."""

import builtins
import json
import os

import pytest

from nanopairwise import formats
from nanopairwise.data import DataError
from nanopairwise.formats import load_preference_pairs
from nanopairwise.guards import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
fixture = lambda name: os.path.join(FIXTURES, name)
user = lambda c: {"role": "user", "content": c}

# (file, format, its malformed row's location, the error after "file:where: ")
MALFORMED = [
    ("trl_implicit.jsonl", "trl", "3", r"field 'chosen': 2 messages after the shared prompt \(roles \['assistant', "
                                       r"'user'\]\); expected one final assistant response"),
    ("trl_explicit.jsonl", "trl", "2", r"field 'rejected'\[0\]: missing key 'content'"),
    ("hh.jsonl", "hh", "2", r"field 'chosen': expected a dialogue starting with '\\n\\nHuman: '"),
    ("ultrafeedback.jsonl", "ultrafeedback", "3", r"field 'score_rejected': expected a number, got str"),
]


@pytest.mark.parametrize("name, fmt, where, pattern", MALFORMED)
def test_malformed_row_names_file_line_and_field(name, fmt, where, pattern):
    for data_format in (fmt, "auto"):
        with pytest.raises(DataError, match=rf"^{fixture(name)}:{where}: {pattern}"):
            load_preference_pairs(fixture(name), data_format=data_format)


@pytest.mark.parametrize("name, fmt, where, pattern", MALFORMED)
def test_auto_detects_and_says_so(name, fmt, where, pattern, capsys):
    report = {}
    auto = load_preference_pairs(fixture(name), skip_bad=True, report=report, data_format="auto")
    assert f"data format '{fmt}' detected from {fixture(name)}:1" in capsys.readouterr().out
    assert auto == load_preference_pairs(fixture(name), skip_bad=True, data_format=fmt)
    assert report["bad"] == 1 and report["first_error"].startswith(f"{fixture(name)}:{where}: ")


def test_trl_implicit_prompt_is_the_shared_prefix():
    report = {}
    pairs = load_preference_pairs(fixture("trl_implicit.jsonl"), skip_bad=True, report=report, data_format="trl")
    assert report["ties"] == 1 and len(pairs) == 2  # line 4: identical conversations
    assert pairs[0].prompt == [user("sort: 3 1 2")] and (pairs[0].chosen, pairs[0].rejected) == ("1 2 3", "3 2 1")
    # multi-turn: every shared message, earlier assistant turns included, is prompt
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user", "assistant", "user"]
    assert pairs[1].prompt[-1] == user("and 3 4?") and (pairs[1].chosen, pairs[1].rejected) == ("4 3", "3 4")


def test_trl_explicit_prompt_and_standard_rows():
    pairs = load_preference_pairs(fixture("trl_explicit.jsonl"), skip_bad=True, data_format="trl")
    assert pairs[0].prompt == [user("sort: 3 1 2")] and pairs[0].chosen == "1 2 3"
    assert (pairs[1].prompt, pairs[1].principle) == ("copy: 7 8", "Copy exactly.")


def test_hh_dialogues_become_conversations():
    pairs = load_preference_pairs(fixture("hh.jsonl"), skip_bad=True, data_format="hh")
    assert pairs[0].prompt == [user("sort: 3 1 2")] and (pairs[0].chosen, pairs[0].rejected) == ("1 2 3", "3 2 1")
    assert pairs[1].prompt == [user("hi"), {"role": "assistant", "content": "hello"}, user("reverse: 1 2")]
    assert (pairs[1].chosen, pairs[1].rejected) == ("2 1", "1 2")


def test_ultrafeedback_scores_kept_and_score_ties_dropped():
    report = {}
    pairs = load_preference_pairs(fixture("ultrafeedback.jsonl"), skip_bad=True, report=report,
                                  data_format="ultrafeedback")
    assert report["ties"] == 1 and [p.chosen for p in pairs] == ["1 2 3", "7 8"]  # "min: 4 2" scored 7 vs 7
    assert pairs[0].prompt == [user("sort: 3 1 2")]
    assert pairs[0].meta["score_chosen"] == 9.0 and pairs[0].meta["prompt_text"] == "sort: 3 1 2"
    assert json.loads(json.dumps(pairs[0].to_dict()))["score_rejected"] == 4.0  # written back


@pytest.mark.parametrize("row, pattern", [
    ({"chosen": [user("a"), user("b")], "rejected": [user("a"), {"role": "assistant", "content": "c"}]},
     r"field 'chosen': the final message has role 'user'"),
    ({"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     r"no prompt"),
    ({"chosen": "plain text", "rejected": "other"}, r"cannot tell the format"),
])
def test_conversation_errors(tmp_path, row, pattern):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: .*{pattern}"):
        load_preference_pairs(str(path), data_format="auto")


def test_parquet_rows_named_by_row_number():
    pytest.importorskip("pyarrow")
    path = fixture("ultrafeedback.parquet")  # as datasets.Dataset.to_parquet writes it; row 2 is malformed
    with pytest.raises(DataError, match=rf"^{path}:row 2: field 'rejected': the final message has role 'user'"):
        load_preference_pairs(path, data_format="auto")
    pairs = load_preference_pairs(path, skip_bad=True, data_format="ultrafeedback")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([user("sort: 3 1 2")], "1 2 3", "3 2 1"), ([user("copy: 7 8")], "7 8", "8 7")]


def test_truncated_parquet_is_named(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "cut.parquet"
    path.write_bytes(open(fixture("ultrafeedback.parquet"), "rb").read()[:200])  # starts with PAR1, no footer
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        load_preference_pairs(str(path))


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    message = r"ultrafeedback.parquet: a Parquet file; .*pip install 'nanopairwise\[parquet\]'"
    with pytest.raises(UserError, match=message):
        load_preference_pairs(fixture("ultrafeedback.parquet"))


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        formats.read_pair_rows(fixture("hh.jsonl"), "csv")


def test_train_rm_reads_each_format(tiny_task, tmp_path, capsys):
    """train_rm.py end to end on converted rows: conversational prompts through the judge template."""
    import train_rm
    policy = os.path.join(tiny_task, "policy")
    metrics = train_rm.main(["--model", policy, "--train-data", fixture("trl_implicit.jsonl"),
                             "--eval-data", fixture("hh.jsonl"), "--skip-bad-lines", "--batch-size", "2",
                             "--max-steps", "1", "--out-dir", str(tmp_path / "judge")])
    out = capsys.readouterr().out
    assert "data format 'trl' detected" in out and "data format 'hh' detected" in out
    assert "2 train pairs, 2 eval pairs" in out and 0.0 <= metrics["accuracy"] <= 1.0
