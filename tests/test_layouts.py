"""Every input layout (policy prompt, judge pair, BT single, critic prefixes) on real chat
families: the SmolLM2-135M-Instruct tokenizer (skipped when not fetched), and tokenizers with the
Llama 3 and Qwen2.5 chat templates (tiny BPEs carrying the upstream Jinja and special tokens).

Oracle for a chat turn: transformers' `apply_chat_template` on the same tokenizer directory. The
layouts are then checked as exact token sequences assembled from independently encoded pieces,
plus the invariants the issue found broken: bos once at position 0 where the family has one, as
many turn openers as closers (no turn loses its <|im_start|>), the critic prefixes being exact
prefixes of the judge's and BT inputs.
"""

import pytest
import torch

from nanopairwise.layouts import JudgeTemplate, encode_pair, encode_prompt, encode_single
from nanopairwise.tokenizer import Tokenizer, train_bpe

from test_tokenizer import LLAMA3_JINJA, QWEN25_JINJA, corpus

T = JudgeTemplate()
PRINCIPLE = "Sort the numbers in ascending order."
PROMPT, A, B = "sort ascending: 5 3 9 1", "1 3 5 9", "9 5 3 1"
OPEN_CLOSE = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|eot_id|>")}


def tiny_family(tmp_path, name):
    """An HF tokenizer directory with the family's special tokens, bos and Jinja template."""
    if name == "llama3":  # bos <|begin_of_text|> (train_bpe's default for llama3)
        tok = train_bpe(corpus(), 400, chat_template="llama3", eos_token="<|eot_id|>")
        tok.config = {"chat_template": LLAMA3_JINJA}
    else:  # Qwen2.5: chatml, no bos (null in its tokenizer_config.json), a default system prompt
        tok = train_bpe(corpus(), 400, chat_template="chatml", eos_token="<|im_end|>")
        tok.config = {"chat_template": QWEN25_JINJA}
    tok.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


@pytest.fixture(scope="module", params=["smollm2", "llama3", "qwen2.5"])
def family(request, tmp_path_factory):
    """(name, tokenizer directory)."""
    if request.param == "smollm2":
        return "smollm2", request.getfixturevalue("smollm2_dir")
    return request.param, tiny_family(tmp_path_factory.mktemp("tok"), request.param)


def hf_turn_ids(path, messages):
    """Oracle: transformers renders the conversation with the directory's own Jinja template."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(path)
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf.encode(text, add_special_tokens=False)


def test_every_layout_is_the_same_pieces(family):
    name, path = family
    tok = Tokenizer.from_pretrained(path)
    e = tok.encode
    msgs = [{"role": "user", "content": PROMPT}]
    turn = hf_turn_ids(path, msgs)
    bos = [tok.bos_token_id] if name == "llama3" else []    # SmolLM2's bos <|im_start|> opens turns only
    assert tok.chat_bos_ids == bos and turn[:len(bos)] == bos
    assert encode_prompt(tok, PROMPT) == turn                                          # policy prompt
    turn = turn[len(bos):]
    end = e(tok.turn_end_text)
    assert end[0] == tok.end_of_turn_id
    head = bos + e(f"Principle: {PRINCIPLE}\n") + turn
    pair = encode_pair(tok, T, PRINCIPLE, PROMPT, A, B)
    assert pair == head + e(A) + end + turn + e(B) + end + e(f"{T.question}\nAnswer:")  # judge pair
    if bos:
        assert pair.count(bos[0]) == 1 and pair[0] == bos[0]
    opener, closer = OPEN_CLOSE[tok.chat_template]
    assert pair.count(tok.token_to_id(opener)) == pair.count(tok.token_to_id(closer)) > 0   # turns intact
    single = encode_single(tok, T, PRINCIPLE, PROMPT, A)
    assert single == head + e(A) + [tok.end_of_turn_id] == pair[:len(single)]          # BT single
    critic = JudgeTemplate().pair_ids(tok, PRINCIPLE, PROMPT, e(A))
    assert critic == pair[:len(critic)] and pair[len(critic):len(critic) + len(e(B))] == e(B)  # critic


def test_smollm2_judge_input_literal(smollm2_dir):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    turn = f"{system}<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert T.render(tok, PRINCIPLE, PROMPT, A, B) == (
        f"Principle: {PRINCIPLE}\n{turn}{A}<|im_end|>\n{turn}{B}<|im_end|>\n{T.question}\nAnswer:")


def test_plain_template_anchor_keeps_the_rollout_tokens(smollm2_dir):
    """Prompt "...Assistant: " ends in a space: the anchor must keep its own ids (['1', ...]), as
    the policy sampled them, not BPE-merge into 'Ġ1' as one joined string would."""
    tok = Tokenizer.from_pretrained(smollm2_dir, chat_template="plain")
    prefix = T.prefix_ids(tok, PRINCIPLE, PROMPT)
    critic = T.pair_ids(tok, PRINCIPLE, PROMPT, tok.encode(A))
    assert critic[len(prefix):len(prefix) + len(tok.encode(A))] == tok.encode(A)
    assert tok.id_to_token(prefix[-1]) == "Ġ" and tok.id_to_token(tok.encode(A)[0]) == "1"
    assert encode_pair(tok, T, PRINCIPLE, PROMPT, A, B)[:len(critic)] == critic


def test_sample_stops_at_every_stop_token_and_keeps_top_p(monkeypatch):
    """Every caller samples through layouts.sample: the tokenizer's stop ids (eos and the end of
    turn, which differ for chatml) and all three sampling settings reach the engine."""
    import nanopairwise.layouts as layouts
    seen = {}
    monkeypatch.setattr(layouts, "generate", lambda lm, prompts, R, stop, pad, **kw: seen.update(stop=stop, R=R, **kw))
    tok = train_bpe(corpus(), 400, chat_template="chatml", eos_token="<|endoftext|>")
    layouts.sample(torch.nn.Linear(1, 1), tok, ["q"], layouts.Sampling(7, temperature=0.5, top_p=0.9))
    assert seen["stop"] == tok.stop_token_ids and len(seen["stop"]) == 2
    assert (seen["R"], seen["temperature"], seen["top_p"]) == (7, 0.5, 0.9)


def test_smollm2_chat_template_jinja_layout(smollm2_dir, tmp_path):
    """A directory as recent transformers save it (the template in chat_template.jinja, none in
    tokenizer_config.json) renders with SmolLM2's default system turn: the exact ids of
    transformers' apply_chat_template (41 for one user turn, not 20), and the fingerprint of the
    directory as it came equals the re-saved one's."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    hf.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    assert "chat_template" not in (tmp_path / "saved" / "tokenizer_config.json").read_text()
    tok = Tokenizer.from_pretrained(str(tmp_path / "saved"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    expected = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    expected = hf.encode(expected, add_special_tokens=False)
    assert encode_prompt(tok, msgs) == expected and len(expected) > 30
    assert tok.default_system is not None
    assert tok.fingerprint() == Tokenizer.from_pretrained(smollm2_dir).fingerprint()
    tok.save_pretrained(str(tmp_path / "ours"))                       # our save keeps the template
    assert encode_prompt(Tokenizer.from_pretrained(str(tmp_path / "ours")), msgs) == expected
