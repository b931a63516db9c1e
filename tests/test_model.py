"""model.py against transformers (the oracle) on tiny random Llama / Qwen2 / Qwen3 / Mistral.

Tier 1, parity: transformers saves -> we load -> same logits; we save -> transformers loads ->
same logits. Tier 2, behaviour: padding (left, right, all-pad rows), the KV cache against a full
forward, config round trips and refusals.

Tolerances (logits, fp32 on CPU), keyed by dtype:
  float32   atol 2e-5, rtol 1.3e-6: the same maths in a different op order (GQA through SDPA
            instead of repeat_kv, our own mask), a few ulp per op over 2 layers; seen 1.5e-6.
  bfloat16  not compared elementwise with transformers' bf16 (the two round in different
            places; both are ~3e-2 off fp32 on logits of size ~4): instead our mean error
            against the fp32 oracle must be within 1.5x transformers' own bf16 error.
  cache     atol 1e-5: cached decoding runs SDPA on a (B, H, 1, S) query instead of (B, H, T, T).
"""

import pytest
import torch
import transformers

from nanopairwise.model import ModelConfig, Transformer

TOL = {torch.float32: dict(atol=2e-5, rtol=1.3e-6)}
CACHE_TOL = dict(atol=1e-5, rtol=1e-5)
V = 301  # odd on purpose
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
HF_CONFIGS = {
    # llama3 scaling with original length 64: the 8 frequencies fall in all three bands
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=500000.0)),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),  # q/k/v bias
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=False),  # D != C / H
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
}


def tiny_hf(model_type: str, seed: int = 0):
    """A tiny random HF model in fp32 eval mode; weights perturbed so biases and norms are not 0/1."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[model_type]()).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def saved_hf(tmp_path, model_type: str, seed: int = 0):
    hf = tiny_hf(model_type, seed)
    path = str(tmp_path / f"hf-{model_type}")
    hf.save_pretrained(path)
    return hf, path


def batch(B=3, T=13, seed=1):
    """Random ids and a mask with a left-padded row, a right-padded row and a full row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, 9:] = 0
    return ids, mask


def masked(x, mask):
    return x[mask.bool()]  # (N, V): padded positions carry no meaning


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_parity_both_directions(tmp_path, model_type):
    hf, path = saved_hf(tmp_path, model_type)
    ours = Transformer.from_pretrained(path)
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, mask)
    torch.testing.assert_close(masked(out, mask), masked(ref, mask), **TOL[torch.float32])
    # and back: we save, transformers loads our config.json + safetensors unchanged
    ours_path = str(tmp_path / "ours")
    ours.save_pretrained(ours_path)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(ours_path, dtype=torch.float32).eval()
    assert type(hf2) is type(hf)
    with torch.no_grad():
        ref2 = hf2(ids, attention_mask=mask).logits
    torch.testing.assert_close(masked(out, mask), masked(ref2, mask), **TOL[torch.float32])


def test_bf16_error_no_worse_than_transformers(tmp_path):
    hf, path = saved_hf(tmp_path, "qwen3")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm_head_weight.dtype == torch.bfloat16 and ours.inv_freq.dtype == torch.float32
    ids, mask = batch()
    with torch.no_grad():
        ref = masked(hf(ids, attention_mask=mask).logits, mask)
        err_hf = (masked(hf_bf16(ids, attention_mask=mask).logits.float(), mask) - ref).abs().mean()
        err_ours = (masked(ours(ids, mask).float(), mask) - ref).abs().mean()
    assert err_ours <= 1.5 * err_hf, (err_ours, err_hf)


def test_trunk_lm_head_weight_and_tying(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")  # tied
    ours = Transformer.from_pretrained(path)
    assert ours.lm_head_weight is ours.model.embed_tokens.weight
    ids, mask = batch()
    with torch.no_grad():
        hidden = ours.trunk(ids, mask)  # (B, T, C)
        torch.testing.assert_close(hidden @ ours.lm_head_weight.T, ours(ids, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_padding_changes_nothing(model_type):
    """A sequence gives the same logits alone, left-padded and right-padded; all-pad rows are finite."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(HF_CONFIGS[model_type]().to_dict())
    model = Transformer(cfg).eval()
    seq = torch.randint(0, V, (1, 7))
    pad = torch.full((1, 4), 3)
    ids = torch.cat([torch.cat([pad, seq], 1), torch.cat([seq, pad], 1), torch.full((1, 11), 3)])  # (3, 11)
    mask = torch.tensor([[0] * 4 + [1] * 7, [1] * 7 + [0] * 4, [0] * 11])
    with torch.no_grad():
        alone = model(seq)[0]  # (7, V)
        out = model(ids, mask)
    torch.testing.assert_close(out[0, 4:], alone, **TOL[torch.float32])
    torch.testing.assert_close(out[1, :7], alone, **TOL[torch.float32])
    assert torch.isfinite(out).all()


def test_kv_cache_matches_full_forward():
    """Prefill a left-padded batch, then decode in chunks of 1 and 3: same hidden states as one pass."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(HF_CONFIGS["qwen2"]().to_dict())).eval()
    ids, mask = batch(B=3, T=14)
    mask[1] = 1  # the cache path is for left padding: a right-padded row would be a mid-sequence gap
    mask[2, :2] = 0
    with torch.no_grad():
        full = model.trunk(ids, mask)
        cache = model.new_kv_cache(3, 20)
        parts = [model.trunk(ids[:, :6], mask[:, :6], kv_cache=cache)]
        for t in range(6, 10):
            parts.append(model.trunk(ids[:, t:t + 1], mask[:, t:t + 1], kv_cache=cache))
        parts.append(model.trunk(ids[:, 10:], mask[:, 10:], kv_cache=cache))
    assert cache.length == 14 and cache.next_pos.tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(masked(torch.cat(parts, 1), mask), masked(full, mask), **CACHE_TOL)
    with pytest.raises(ValueError, match="KV cache full"):
        model.trunk(ids, kv_cache=cache)


def test_gradients_flow_and_init():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, model_type="qwen3", head_dim=24)
    model = Transformer(cfg)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 2e-3 and model.model.layers[0].self_attn.q_norm.weight.eq(1).all()
    ids, mask = batch()
    (model(ids, mask).float().logsumexp(-1) * mask).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_config_roundtrip_and_old_layout():
    for name, make in HF_CONFIGS.items():
        cfg = ModelConfig.from_hf(make().to_dict())
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
    # transformers 4.x layout: top-level rope_theta, rope_scaling with the old "type" key
    old = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=128,
               rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0))
    cfg = ModelConfig.from_hf(old)
    assert cfg.rope_theta == 500000.0 and cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.rope_scaling == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=128)
    # and transformers computes the same RoPE frequencies from our written config
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    torch.testing.assert_close(Transformer(cfg).inv_freq, hf_rope.inv_freq, atol=0, rtol=0)


def test_config_refusals():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf(dict(model_type="gpt2"))
    with pytest.raises(ValueError, match="unsupported model_type 'phi'"):
        ModelConfig(model_type="phi")
    with pytest.raises(ValueError, match="qwen2.*requires attention_bias=True"):
        ModelConfig(**TINY, model_type="qwen2", attention_bias=False)
    with pytest.raises(NotImplementedError, match="hidden_act"):
        ModelConfig.from_hf({**HF_CONFIGS["llama"]().to_dict(), "hidden_act": "gelu"})
    with pytest.raises(NotImplementedError, match="rope_type 'yarn'"):
        ModelConfig.from_hf({**HF_CONFIGS["qwen2"]().to_dict(), "rope_parameters": {"rope_type": "yarn"}})
    model = Transformer(ModelConfig(**{**TINY, "num_hidden_layers": 1}, model_type="mistral", sliding_window=8))
    with pytest.raises(NotImplementedError, match="sliding_window=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
