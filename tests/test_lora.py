"""LoRA (nanopairwise/lora.py) on a tiny random Llama: merged == unmerged, only adapters get
gradients, adapters off == the base model, the merged checkpoint loads in transformers, PPO's
reference shares the policy's weights. Exact resume with LoRA: tests/test_train_rm.py and
tests/test_train_ppo.py (parametrized with --lora-rank).

Tolerances, fp32 on CPU:
  merged    atol 1e-5: x (W + s B A)^T and x W^T + s (x A^T) B^T are the same sum in another
            order; logits ~1, seen ~1e-6.
  hf        atol 2e-5, rtol 1.3e-6: as tests/test_model.py (transformers vs our kernels).
  adapters off / zero B: exact (the adapter term is skipped, or adds exactly 0).
"""

import copy

import pytest
import torch

from nanopairwise import lora
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.policy import PolicyLogprobs

MERGED_TOL = dict(atol=1e-5, rtol=1e-5)
HF_TOL = dict(atol=2e-5, rtol=1.3e-6)
CFG = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFG)).eval()


def adapted(rank=4, alpha=8.0, targets=lora.ALL_TARGETS, seed=1):
    """(base copy, LoRA model with random non-zero B so the adapters matter)."""
    base = tiny()
    model = lora.apply_lora(copy.deepcopy(base), rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return base, model


def inputs(B=3, T=11):
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0                                                       # a left-padded row
    return ids, mask


def test_zero_b_is_the_base_model_and_targets_are_honoured():
    base = tiny()
    model = lora.apply_lora(copy.deepcopy(base), 4, 8.0, ["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in lora.lora_modules(model)}) == ["q_proj", "v_proj"]
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), base(ids, mask))           # B = 0 at the start
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.apply_lora(tiny(), 4, 8.0, ["qkv"])


def test_merged_equals_unmerged_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, model = adapted()
    ids, mask = inputs()
    with torch.no_grad():
        y = model(ids, mask)                                                       # (B, T, V)
        assert not torch.allclose(y, base(ids, mask), atol=1e-3)                   # the adapters matter
        model.save_pretrained(str(tmp_path))                                       # merges
        merged = Transformer.from_pretrained(str(tmp_path)).eval()
        assert not lora.lora_modules(merged)
        torch.testing.assert_close(merged(ids, mask), y, **MERGED_TOL)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids[1:], attention_mask=mask[1:]).logits, merged(ids[1:], mask[1:]), **HF_TOL)


def test_only_adapters_get_gradients():
    _, model = adapted()
    ids, mask = inputs()
    up = torch.randn(ids.shape + (CFG["vocab_size"],), generator=torch.Generator().manual_seed(3))
    (model(ids, mask) * up).mean().backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name


def test_adapters_off_is_the_base_model_without_a_copy():
    base, model = adapted()
    ids, mask = inputs()
    with torch.no_grad(), lora.adapters_disabled(model):
        assert torch.equal(model(ids, mask), base(ids, mask))
    assert all(m.adapter_on for m in lora.lora_modules(model).values())          # switched back on
    policy = PolicyLogprobs(model)
    ref = lora.AdaptersOff(PolicyLogprobs(policy.lm))
    response_mask = torch.ones(3, 5, dtype=torch.long)
    got = ref(ids, mask, response_mask).logprobs
    want = PolicyLogprobs(base)(ids, mask, response_mask).logprobs
    assert torch.equal(got, want) and not got.requires_grad
    assert policy(ids, mask, response_mask).logprobs.requires_grad                # the policy still trains
    n_params = sum(p.numel() for p in policy.parameters())
    assert n_params == sum(p.numel() for p in model.parameters())                 # one copy of the weights


def test_trainable_state_round_trip():
    _, model = adapted()
    state = lora.trainable_state_dict(model)
    assert state and all(".lora_" in k for k in state)
    fresh = lora.apply_lora(tiny(), 4, 8.0)
    lora.load_trainable_state_dict(fresh, state, "here")
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), model(ids, mask))
    with pytest.raises(ValueError, match="here: trainable parameters do not match"):
        lora.load_trainable_state_dict(lora.apply_lora(tiny(), 4, 8.0, ["q_proj"]), state, "here")
