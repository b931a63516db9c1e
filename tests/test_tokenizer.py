"""Tests for nanopairwise/tokenizer.py: chat rendering (literal strings and parity with the upstream
Jinja templates run by transformers), special-token detection, round trips, train_bpe."""

import json
import os
import random
import time

import pytest

from nanopairwise.tokenizer import Tokenizer, detect_chat_template, render_chat, train_bpe

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " sort ascending: 5 3 9 1\n"},
    {"role": "assistant", "content": "1 3 5 9"},
    {"role": "user", "content": "and descending?"},
]

# Upstream templates, as shipped in tokenizer_config.json (the Jinja source, i.e. after JSON decoding).
# Llama 3.0 Instruct (meta-llama/Meta-Llama-3-8B-Instruct), verbatim:
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
                "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# SmolLM2-Instruct, verbatim:
SMOLLM2_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
# Qwen2.5-Instruct: the `tools is none` branch of its template (tool-call messages omitted).
QWEN25_JINJA = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    words = ["sort ascending", "reverse", "keep even", "Assistant", "User", "héllo wörld", "你好"]
    return [f"{rng.choice(words)}: {' '.join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 8)))}"
            for _ in range(n)]


@pytest.fixture(scope="module")
def toks():
    """One small trained tokenizer per template."""
    texts = corpus()
    return {t: train_bpe(texts, 384, chat_template=t) for t in ("chatml", "llama3", "plain")}


def write_hf_dir(path, tok, config):
    os.makedirs(path, exist_ok=True)
    tok.tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(path)


# ----------------------------------------------------------------------------------------------
# rendering: literal expected strings


def test_render_chatml_literal():
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\n sort ascending: 5 3 9 1\n<|im_end|>\n"
                "<|im_start|>assistant\n1 3 5 9<|im_end|>\n"
                "<|im_start|>user\nand descending?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_chat(CONVO, "chatml") == expected
    assert render_chat(CONVO, "chatml", add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    assert render_chat("hi", "chatml", default_system="You are Qwen.") == (
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # an explicit system message wins over the default
    assert render_chat(CONVO, "chatml", default_system="X") == expected


def test_render_llama3_literal():
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nsort ascending: 5 3 9 1<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n1 3 5 9<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nand descending?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(CONVO, "llama3") == expected


def test_render_plain_literal():
    assert render_chat(CONVO[1:3], "plain", add_generation_prompt=False) == (
        "User:  sort ascending: 5 3 9 1\n\nAssistant: 1 3 5 9\n")
    assert render_chat("sort ascending: 5 3", "plain") == "User: sort ascending: 5 3\nAssistant: "


def test_render_rejects_bad_messages():
    with pytest.raises(TypeError, match=r"messages\[1\]\['content'\]"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "chatml")
    with pytest.raises(ValueError, match="unknown chat template"):
        render_chat("hi", "vicuna")


# ----------------------------------------------------------------------------------------------
# rendering: parity with the upstream Jinja templates, run by transformers


@pytest.mark.parametrize("name", ["smollm2", "qwen25", "llama3"])
def test_render_matches_upstream_jinja(name, toks, tmp_path):
    transformers = pytest.importorskip("transformers")
    jinja, template = {"smollm2": (SMOLLM2_JINJA, "chatml"), "qwen25": (QWEN25_JINJA, "chatml"),
                       "llama3": (LLAMA3_JINJA, "llama3")}[name]
    specials = {"chatml": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                "llama3": {"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
                           "eos_token": "<|eot_id|>"}}[template]
    path = write_hf_dir(tmp_path / name, toks[template], {**specials, "chat_template": jinja})
    ours = Tokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == template
    convos = [CONVO, CONVO[1:], CONVO[1:2], [{"role": "user", "content": "héllo 你好 🙂"}]]
    for convo in convos:
        for gen in (True, False):
            expected = theirs.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(convo, add_generation_prompt=gen) == expected, (convo, gen)


# ----------------------------------------------------------------------------------------------
# special tokens and template detection


def test_detect_chat_template(toks):
    for template, tok in toks.items():
        assert detect_chat_template(tok.tokenizer.get_vocab()) == template
        assert tok.chat_template == template


def test_special_tokens_from_config_and_detection(toks, tmp_path):
    llama = toks["llama3"]
    # AddedToken dicts, a null pad
    path = write_hf_dir(tmp_path / "a", llama, {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
                                                "eos_token": {"content": "<|eot_id|>"}, "pad_token": None})
    tok = Tokenizer.from_pretrained(path)
    assert tok.bos_token_id == llama.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_id == llama.token_to_id("<|eot_id|>")
    assert tok.pad_token_id == tok.eos_token_id  # fallback
    assert tok.stop_token_ids == sorted({tok.eos_token_id, llama.token_to_id("<|eot_id|>")})
    # no tokenizer_config.json: detect from the vocabulary
    os.remove(os.path.join(path, "tokenizer_config.json"))
    tok = Tokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.chat_template == "llama3" and tok.default_system is None
    # chatml with eos <|endoftext|> still stops on <|im_end|>
    chatml = toks["chatml"]
    assert chatml.stop_token_ids == sorted({chatml.eos_token_id, chatml.token_to_id("<|im_end|>")})
    assert toks["plain"].stop_token_ids == [toks["plain"].eos_token_id]


def test_bad_special_token_names_the_file(toks, tmp_path):
    path = write_hf_dir(tmp_path / "b", toks["plain"], {"eos_token": "</s>"})
    with pytest.raises(ValueError, match=r"tokenizer\.json: eos_token '</s>'"):
        Tokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path / "missing"))


def test_chat_template_jinja_file_wins_and_enters_the_fingerprint(toks, tmp_path):
    """transformers >= 4.50 saves the template as chat_template.jinja, not in the config: we read it
    (over the config's, as transformers does), keep it on saving, and the fingerprint covers it."""
    transformers = pytest.importorskip("transformers")
    specials = {"bos_token": None, "eos_token": "<|im_end|>"}
    path = write_hf_dir(tmp_path / "j", toks["chatml"], {**specials, "chat_template": QWEN25_JINJA})
    bare = Tokenizer.from_pretrained(write_hf_dir(tmp_path / "bare", toks["chatml"], specials))
    (tmp_path / "j" / "chat_template.jinja").write_text(SMOLLM2_JINJA, encoding="utf-8")
    tok = Tokenizer.from_pretrained(path)
    assert tok.default_system.startswith("You are a helpful AI assistant named SmolLM")
    expected = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        CONVO[1:2], tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(CONVO[1:2]) == expected and expected.startswith("<|im_start|>system\nYou are a helpful")
    assert tok.fingerprint() != bare.fingerprint()              # same vocabulary, other conversations
    tok.save_pretrained(path)                                   # the stale .jinja is rewritten too
    assert Tokenizer.from_pretrained(path).fingerprint() == tok.fingerprint()
    os.remove(os.path.join(path, "chat_template.jinja"))
    assert Tokenizer.from_pretrained(path).render_chat(CONVO[1:2]) == expected


# ----------------------------------------------------------------------------------------------
# round trips


def test_encode_decode_roundtrip_non_ascii(toks):
    text = "héllo wörld 你好 🙂"
    for tok in toks.values():
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_special_tokens_in_text_are_single_ids(toks):
    tok = toks["chatml"]
    prompt = tok.render_chat("sort ascending: 5 3")
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.token_to_id("<|im_end|>")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_save_load_roundtrip(toks, template, tmp_path):
    tok = toks[template]
    tok.save_pretrained(str(tmp_path))
    back = Tokenizer.from_pretrained(str(tmp_path))
    for attr in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "chat_template", "default_system"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    texts = corpus(20, seed=1) + ["héllo wörld 你好 🙂"]
    assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # the saved directory loads in transformers and renders as we do
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(texts[0], add_special_tokens=False)["input_ids"] == tok.encode(texts[0])
    for gen in (True, False):
        assert hf.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=gen) == \
            tok.render_chat(CONVO, add_generation_prompt=gen)


def test_save_keeps_upstream_config(toks, tmp_path):
    src = write_hf_dir(tmp_path / "src", toks["chatml"], {"eos_token": "<|im_end|>", "chat_template": QWEN25_JINJA,
                                                          "model_max_length": 131072})
    tok = Tokenizer.from_pretrained(src)
    assert tok.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    tok.save_pretrained(str(tmp_path / "dst"))
    with open(tmp_path / "dst" / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["chat_template"] == QWEN25_JINJA and config["model_max_length"] == 131072
    assert config["chat_template_name"] == "chatml" and config["eos_token"] == "<|im_end|>"


# ----------------------------------------------------------------------------------------------
# train_bpe


def test_train_bpe_fast_and_compact():
    texts = corpus(4000, seed=2)
    t0 = time.perf_counter()
    tok = train_bpe(texts, 320, special_tokens=("<|endoftext|>", "<|pad|>"), pad_token="<|pad|>")
    assert time.perf_counter() - t0 < 2.0
    assert tok.vocab_size <= 320
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.token_to_id("<|pad|>")
    assert tok.bos_token_id is None and tok.chat_template == "plain"
    # every " d" is one token, so a list of n numbers costs n tokens
    assert len(tok.encode("sort ascending: 5 3 9 1")) <= 2 + 1 + 4
    for d in range(10):
        assert len(tok.encode(f" {d}")) == 1
    assert tok.decode(tok.encode(texts[7] + "<|endoftext|>")) == texts[7]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, 100)
