"""Hugging Face checkpoint IO for model.py: config.json <-> ModelConfig fields, safetensors files.

A checkpoint directory is what `transformers` writes: `config.json` plus either one
`model.safetensors` or shards `model-00001-of-0000N.safetensors` listed by
`model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).
Tensor names are HF's, which model.py uses verbatim, so loading is a copy after checks.

Every failure names the file and the key: a damaged or truncated safetensors file, a shard the
index points at that is missing, a missing / unexpected key, a shape mismatch. Saving goes through
`common.atomic_dir`, so a crash mid-save never leaves a half-written directory.

config.json layouts: transformers 5 keeps `rope_theta` inside `rope_parameters` (with the scaling
keys); 4.x has a top-level `rope_theta` and a separate `rope_scaling`. Both are read; the 5 layout
is written.
"""

import json
import os
import re
import shutil

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanopairwise.common import atomic_dir
from nanopairwise.guards import NonFiniteError, UserError, nonfinite_tensors

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# keys some checkpoints carry that hold no weights of ours: old Llama exports saved RoPE buffers
IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# ----------------------------------------------------------------------------------------------
# config.json


def read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: {path!r} is not a Hugging Face checkpoint directory")
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def config_fields_from_hf(d: dict, supported) -> dict:
    """ModelConfig keyword arguments from an HF config dict; refuses features we do not implement."""
    mt = d.get("model_type")
    if mt not in supported:
        raise ValueError(f"config.json: unsupported model_type {mt!r}; supported: {', '.join(supported)}")
    refuse = {"hidden_act": d.get("hidden_act", "silu") != "silu", "mlp_bias": bool(d.get("mlp_bias")),
              "use_sliding_window": bool(d.get("use_sliding_window")),
              "partial_rotary_factor": d.get("partial_rotary_factor", 1.0) != 1.0}
    for key, bad in refuse.items():
        if bad:
            raise NotImplementedError(f"config.json: {key}={d[key]!r} is not supported")
    # transformers 5 reads `rope_scaling` first, then `rope_parameters`; rope_theta may sit in either
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope_scaling = None
    if rope_type != "default":
        if rope_type != "llama3":
            raise NotImplementedError(f"config.json: rope_type {rope_type!r} is not supported (default, llama3)")
        rope.pop("partial_rotary_factor", None)
        rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        rope_scaling = {"rope_type": "llama3", **rope}
    out = dict(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
               num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
               head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
               rope_scaling=rope_scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
               tie_word_embeddings=d.get("tie_word_embeddings", False), bos_token_id=d.get("bos_token_id"),
               eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
    if mt in ("llama", "qwen3"):  # one flag for q/k/v/o
        out["attention_bias"] = d.get("attention_bias", False)
    if mt == "mistral":
        out["sliding_window"] = d.get("sliding_window")
    return out


def config_to_hf(c: dict) -> dict:
    """HF config dict (transformers 5 layout) from ModelConfig fields (`dataclasses.asdict`)."""
    mt = c["model_type"]
    rope_parameters = {**(c["rope_scaling"] or {"rope_type": "default"}), "rope_theta": c["rope_theta"]}
    d = {"architectures": [ARCHITECTURES[mt]], "model_type": mt, "hidden_act": "silu"}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        d[key] = c[key]
    d["rope_parameters"] = rope_parameters
    if mt in ("llama", "qwen3"):
        d["attention_bias"] = c["attention_bias"]
    if mt in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    if mt == "mistral":
        d["sliding_window"] = c["sliding_window"]
    return d


# ----------------------------------------------------------------------------------------------
# loading


def _load_file(file: str) -> dict:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: damaged or truncated safetensors file ({e})") from None


def load_safetensors(path: str) -> dict:
    """name -> CPU tensor from model.safetensors or from the shards listed in the index."""
    index_file = os.path.join(path, INDEX)
    if not os.path.isfile(index_file):
        single = os.path.join(path, SINGLE)
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX} found")
        return _load_file(single)
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _load_file(os.path.join(path, shard))
        listed = {k for k, v in weight_map.items() if v == shard}
        if listed - tensors.keys():
            raise ValueError(f"{os.path.join(path, shard)}: keys listed in {INDEX} are missing from it: "
                             f"{sorted(listed - tensors.keys())[:5]}")
        state.update(tensors)
    return state


def check_state_dict(state: dict, expected: dict, path: str, tied: bool) -> dict:
    """Check `state` (name -> tensor) against `expected` (name -> shape); return it cleaned.

    A tied model may carry a copy of the embedding as lm_head.weight (some exports do); like
    transformers we ignore it. Old exports' rotary_emb.inv_freq buffers are ignored too.
    """
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.fullmatch(k)}
    if tied:
        state.pop("lm_head.weight", None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[:5]}")
    if unexpected:
        raise KeyError(f"{path}: checkpoint has {len(unexpected)} tensor(s) the config does not use, "
                       f"e.g. {unexpected[:5]} (check model_type / attention_bias / tie_word_embeddings)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(state[name].shape)}, config implies {shape}")
    return state


# ----------------------------------------------------------------------------------------------
# saving


def parse_size(size) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "10KB" (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: expected an int or a string like '5GB' / '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_checkpoint(path: str, hf_config: dict, state: dict, max_shard_size="5GB"):
    """Write config.json + safetensors into `path` atomically (tensors in `state` order).

    Tensors are packed greedily into shards of at most max_shard_size bytes (a single tensor
    larger than the limit gets a shard of its own); one shard is saved as model.safetensors,
    more as model-0000i-of-0000N.safetensors plus the index. Files of an existing `path` that
    are not weights or config (tokenizer.json, trainer state, ...) are copied into the new one.
    """
    refuse_nonfinite(path, state)
    limit = parse_size(max_shard_size)
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        n = len(shards)
        files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for file, names in zip(files, shards):
            tensors = {k: state[k].detach().to("cpu").contiguous() for k in names}
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        _carry_over(path, tmp)


def refuse_nonfinite(path: str, state: dict):
    """A checkpoint never holds NaN / inf: raise before anything is written (the old one stays)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"{path}: not saved, {len(bad)} of {len(state)} tensors hold NaN or inf "
                             f"(e.g. {', '.join(bad[:3])}); the previous checkpoint there is kept")


def _carry_over(old: str, new: str):
    """Copy entries of `old` that are not weights or config into `new` (if `old` exists)."""
    if not os.path.isdir(old):
        return
    for entry in os.listdir(old):
        if entry == CONFIG or re.fullmatch(r"model.*\.safetensors(\.index\.json)?", entry):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def load_trainer_state(path: str, file: str, lora_rank: int, adapters_key: str) -> dict:
    """The trainer state (`path`/`file`) of a run's checkpoint, for --resume: refused when there is
    none, or when it holds LoRA adapters (under `adapters_key`) and this run has no --lora-rank, or
    the other way round."""
    import torch
    if not os.path.exists(os.path.join(path, file)):
        raise UserError(f"--resume: no checkpoint at {path}")
    state = torch.load(os.path.join(path, file), weights_only=False)
    if bool(state.get(adapters_key)) != bool(lora_rank):
        raise UserError(f"--resume: the checkpoint at {path} was written {'with' if lora_rank == 0 else 'without'} "
                        "--lora-rank; resume with the same --lora-* flags")
    return state
