"""Tests for nanopairwise/data.py: JSONL validation errors name file:line and field, skip_bad
counting, conversational prompts, atomic writes, padding, minibatches, sharding."""

import json
import os

import pytest
import torch

from nanopairwise.batching import iterate_minibatches, pad_batch, shard_for_rank
from nanopairwise.data import DataError, PreferencePair, RLPrompt, load_rl_prompts, read_jsonl, write_jsonl
from nanopairwise.formats import load_preference_pairs

GOOD_PAIR = {"prompt": "sort ascending: 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1",
             "principle": "Sort the numbers in ascending order."}
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: 1 2 3"}]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def dumps(row):
    return json.dumps(row, ensure_ascii=False)


# (bad line, pattern its error must match after "file:line: ")
BAD_PAIR_LINES = [
    ('{"prompt": "a", "chosen": "b", ', r"malformed JSON"),
    ('[1, 2]', r"expected a JSON object, got list"),
    ('"just a string"', r"expected a JSON object, got str"),
    (dumps({"chosen": "b", "rejected": "c"}), r"missing required field 'prompt'"),
    (dumps({"prompt": "a", "rejected": "c"}), r"missing required field 'chosen'"),
    (dumps({"prompt": "a", "chosen": "b"}), r"missing required field 'rejected'"),
    (dumps({"prompt": "a", "chosen": 7, "rejected": "c"}), r"field 'chosen': expected a string, got int"),
    (dumps({"prompt": "a", "chosen": "b", "rejected": None}), r"field 'rejected': expected a string, got null"),
    (dumps({"prompt": 3, "chosen": "b", "rejected": "c"}), r"field 'prompt': expected a string or a non-empty list"),
    (dumps({"prompt": [], "chosen": "b", "rejected": "c"}), r"field 'prompt': .*non-empty list"),
    (dumps({"prompt": ["hi"], "chosen": "b", "rejected": "c"}), r"field 'prompt'\[0\]: expected an object"),
    (dumps({"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}),
     r"field 'prompt'\[0\]: missing key 'content'"),
    (dumps({"prompt": [CONVO[0], {"role": 1, "content": "x"}], "chosen": "b", "rejected": "c"}),
     r"field 'prompt'\[1\]\['role'\]: expected a string, got int"),
    (dumps({**GOOD_PAIR, "principle": ["x"]}), r"field 'principle': expected a string, got list"),
]


@pytest.mark.parametrize("bad, pattern", BAD_PAIR_LINES)
def test_bad_pair_line_names_file_line_and_field(tmp_path, bad, pattern):
    # the bad line is line 3: one good line, one empty line (skipped but counted), then it
    path = write_lines(tmp_path / "pairs.jsonl", [dumps(GOOD_PAIR), "", bad, dumps(GOOD_PAIR)])
    with pytest.raises(DataError, match=rf"^{path}:3: {pattern}"):
        load_preference_pairs(path)
    assert issubclass(DataError, ValueError)


def test_bad_rl_lines(tmp_path):
    for bad, pattern in [(dumps({"anchor": "x"}), r"missing required field 'prompt'"),
                         (dumps({"prompt": "p", "anchor": 1.5}), r"field 'anchor': expected a string, got float"),
                         (dumps({"prompt": "p", "principle": True}),
                          r"field 'principle': expected a string, got bool")]:
        path = write_lines(tmp_path / "rl.jsonl", [dumps({"prompt": "ok"}), bad])
        with pytest.raises(DataError, match=rf"^{path}:2: {pattern}"):
            load_rl_prompts(path)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(dumps(GOOD_PAIR).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        read_jsonl(str(path))


def test_load_pairs_conversational_meta_and_ties(tmp_path):
    rows = [GOOD_PAIR,
            {"prompt": CONVO, "chosen": "3 2 1", "rejected": "1 2 3", "chosen_score": 1.0, "p_true": 0.97},
            {"prompt": "x", "chosen": "same", "rejected": "same"},  # a tie: dropped
            {"prompt": "héllo 你好", "chosen": "🙂", "rejected": "", "principle": None}]
    path = write_lines(tmp_path / "pairs.jsonl", [dumps(r) for r in rows])
    report = {}
    pairs = load_preference_pairs(path, report=report)
    assert report["ties"] == 1 and report["kept"] == 3 and report["bad"] == 0
    assert [p.chosen for p in pairs] == ["1 2 3", "3 2 1", "🙂"]
    assert pairs[1].prompt == CONVO and pairs[1].principle is None
    assert pairs[1].meta == {"chosen_score": 1.0, "p_true": 0.97}
    assert pairs[0].principle == GOOD_PAIR["principle"] and pairs[0].meta == {}
    assert pairs[2].rejected == "" and pairs[2].principle is None
    assert pairs[1].to_dict() == rows[1]


def test_skip_bad_counts_and_reports(tmp_path, capsys):
    lines = [dumps(GOOD_PAIR)] + [bad for bad, _ in BAD_PAIR_LINES] + [dumps(GOOD_PAIR)]
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    report = {}
    pairs = load_preference_pairs(path, skip_bad=True, report=report)
    assert len(pairs) == 2 and report["bad"] == len(BAD_PAIR_LINES) and report["rows"] == 2
    assert report["first_error"].startswith(f"{path}:2: malformed JSON")
    out = capsys.readouterr().out
    assert f"skipped {len(BAD_PAIR_LINES)} bad line(s) in {path}" in out


def test_rl_prompts_roundtrip(tmp_path):
    rows = [{"prompt": "reverse: 1 2 3", "anchor": "3 2 1", "principle": "Reverse the order.",
             "numbers": [1, 2, 3]},
            {"prompt": CONVO},
            {"prompt": "p", "anchor": None}]
    path = str(tmp_path / "sub" / "rl.jsonl")
    write_jsonl(path, [RLPrompt.from_row(r) for r in rows])
    prompts = load_rl_prompts(path)
    assert prompts[0] == RLPrompt("reverse: 1 2 3", "3 2 1", "Reverse the order.", {"numbers": [1, 2, 3]})
    assert prompts[1].prompt == CONVO and prompts[1].anchor is None
    assert [p.to_dict() for p in prompts] == [rows[0], rows[1], {"prompt": "p"}]


def test_write_jsonl_atomic_and_readable(tmp_path):
    path = str(tmp_path / "out.jsonl")
    pairs = [PreferencePair("p", "a", "b", "principle", {"k": [1, 2]}),
             {"prompt": "q", "chosen": "c", "rejected": "d"}]
    write_jsonl(path, pairs)
    assert read_jsonl(path) == [pairs[0].to_dict(), pairs[1]]
    # a failing write leaves the old file untouched and no temp file behind
    with pytest.raises(TypeError):
        write_jsonl(path, [{"bad": object()}])
    assert read_jsonl(path) == [pairs[0].to_dict(), pairs[1]]
    assert os.listdir(tmp_path) == ["out.jsonl"]


# ----------------------------------------------------------------------------------------------
# batching


def test_pad_batch_right_and_left():
    seqs = [[5, 6, 7], [8], [], [1, 2, 3, 4, 9]]
    ids, mask = pad_batch(seqs, pad_id=0, side="right")
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (4, 5)
    torch.testing.assert_close(ids, torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [0] * 5, [1, 2, 3, 4, 9]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [1] * 5]))
    ids, mask = pad_batch(seqs, pad_id=-1, side="left")
    torch.testing.assert_close(ids, torch.tensor([[-1, -1, 5, 6, 7], [-1, -1, -1, -1, 8], [-1] * 5,
                                                  [1, 2, 3, 4, 9]]))
    torch.testing.assert_close(mask, torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0] * 5, [1] * 5]))
    # masked positions hold the pad id, unmasked ones give back each sequence
    for side in ("right", "left"):
        ids, mask = pad_batch(seqs, pad_id=3, side=side)
        assert [ids[b][mask[b].bool()].tolist() for b in range(4)] == seqs
    with pytest.raises(ValueError, match="side"):
        pad_batch(seqs, 0, side="middle")
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], 0)


def test_iterate_minibatches():
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_minibatches(10, 4, g))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == torch.long for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in iterate_minibatches(10, 4, g, drop_last=True)] == [4, 4]
    assert torch.cat(list(iterate_minibatches(7, 3, shuffle=False))).tolist() == list(range(7))
    # same seed, same order; different seed, different order
    a = torch.cat(list(iterate_minibatches(50, 8, torch.Generator().manual_seed(1))))
    b = torch.cat(list(iterate_minibatches(50, 8, torch.Generator().manual_seed(1))))
    c = torch.cat(list(iterate_minibatches(50, 8, torch.Generator().manual_seed(2))))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shard_for_rank():
    items = list(range(11))
    shards = [shard_for_rank(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 4, 3]
    assert shard_for_rank(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank=3, world_size=3"):
        shard_for_rank(items, 3, 3)
