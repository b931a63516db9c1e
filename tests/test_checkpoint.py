"""Checkpoint IO (nanopairwise/checkpoint.py through Transformer.from_pretrained / save_pretrained):
every bad checkpoint is refused with an error that names the problem, sharded checkpoints load
both ways with transformers, and a save that fails half-way leaves the old checkpoint untouched.
"""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanopairwise import checkpoint
from nanopairwise.model import Transformer
from tests.test_model import TOL, batch, masked, saved_hf


def rewrite_weights(path, edit):
    """Apply `edit(state)` to the single-file checkpoint at `path`."""
    file = os.path.join(path, checkpoint.SINGLE)
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def test_unknown_model_type(tmp_path):
    _, path = saved_hf(tmp_path, "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "model_type": "gpt_neox"}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        Transformer.from_pretrained(path)


def test_missing_config_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json: invalid JSON at line 1"):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_key(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    rewrite_weights(path, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(KeyError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        Transformer.from_pretrained(path)


def test_unexpected_key(tmp_path):
    _, path = saved_hf(tmp_path, "llama")
    rewrite_weights(path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"does not use.*model\.layers\.0\.mlp\.extra\.weight"):
        Transformer.from_pretrained(path)


def test_shape_mismatch(tmp_path):
    _, path = saved_hf(tmp_path, "qwen3")
    rewrite_weights(path, lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight has shape \(63,\), config implies \(64,\)"):
        Transformer.from_pretrained(path)


def test_damaged_file(tmp_path):
    _, path = saved_hf(tmp_path, "llama")
    file = os.path.join(path, checkpoint.SINGLE)
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])  # truncated, as by a crash or a partial copy
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged or truncated safetensors file"):
        Transformer.from_pretrained(path)
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        Transformer.from_pretrained(path)


def test_sharded_both_ways(tmp_path):
    hf, path = saved_hf(tmp_path, "llama")
    ours = Transformer.from_pretrained(path)
    out = str(tmp_path / "sharded")
    ours.save_pretrained(out, max_shard_size="40KB")
    index = json.load(open(os.path.join(out, checkpoint.INDEX)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(out, checkpoint.SINGLE))
    ids, mask = batch()
    with torch.no_grad():
        want = masked(hf(ids, attention_mask=mask).logits, mask)
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(masked(hf2(ids, attention_mask=mask).logits, mask), want, **TOL[torch.float32])
        again = Transformer.from_pretrained(out)
        torch.testing.assert_close(masked(again(ids, mask), mask), want, **TOL[torch.float32])
    # a shard the index points at that is gone, or that lacks a listed key, is named
    os.remove(os.path.join(out, shards[1]))
    with pytest.raises(FileNotFoundError, match=shards[1]):
        Transformer.from_pretrained(out)


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    _, path = saved_hf(tmp_path, "qwen2")
    model = Transformer.from_pretrained(path)
    out = str(tmp_path / "ckpt")
    model.save_pretrained(out)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # a user file beside the weights
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_second_shard)
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, max_shard_size="40KB")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]
    # a successful save replaces the weights and carries the user's file over
    monkeypatch.undo()
    model.save_pretrained(out)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    assert Transformer.from_pretrained(out).model.norm.weight.eq(7.0).all()


def test_tied_checkpoint_with_explicit_lm_head_loads(tmp_path):
    """Some exports of tied models also store lm_head.weight; like transformers we ignore it."""
    _, path = saved_hf(tmp_path, "qwen2")
    rewrite_weights(path, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    model = Transformer.from_pretrained(path)
    assert model.lm_head_weight is model.model.embed_tokens.weight


def test_parse_size():
    assert checkpoint.parse_size("5GB") == 5 * 10**9 and checkpoint.parse_size("40KB") == 40_000
    assert checkpoint.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size '5 parsecs'"):
        checkpoint.parse_size("5 parsecs")
