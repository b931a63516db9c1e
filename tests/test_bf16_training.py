"""bf16 training on the CPU against fp32: LoRA on bf16 base weights with fp32 adapters
(`--dtype bfloat16 --lora-rank R`), and full fine-tuning with fp32 master weights and bf16 matmuls
under autocast (`--dtype bf16-mixed`, common.compute_precision).

Both runs start from the same weights and take the same AdamW steps on the same batch of a tiny
random Llama; the losses and the weight updates are compared. Tolerances, keyed by dtype:
  loss      bf16  rtol 2e-2: bf16 keeps 8 bits of mantissa (u = 2^-9 ~ 2e-3 per rounding); the
                  logits pass ~10 roundings over 2 layers, errors partly cancel; 7e-3 (bf16-mixed) seen.
  update    bf16  cosine(delta_bf16, delta_fp32) >= 0.95 over all trained weights: Adam's first
                  steps are ~lr * sign(grad), and entries whose gradient is within bf16 noise of 0
                  may flip sign; 0.996 (LoRA), 0.995 (bf16-mixed) seen. With bf16 adapters the
                  lr = 1e-5 updates of A would be lost below half an ulp (delta 0, cosine 0 over
                  the A's; 0.90 over all adapters, B starting at 0): the test checks the A's alone.
"""

import torch
import torch.nn.functional as F

from nanopairwise import lora
from nanopairwise.common import compute_precision
from nanopairwise.model import ModelConfig, Transformer
from tests.test_model import TINY

LOSS_RTOL = {torch.bfloat16: 2e-2}
MIN_COSINE = {torch.bfloat16: 0.95}


def lm_loss(model, ids):
    logits = model(ids[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def train(model, ids, lr, steps=3, precision="float32"):
    """AdamW steps on the trainable parameters; returns the losses and the updates (fp32)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    losses = []
    with compute_precision(precision, "cpu"):
        for _ in range(steps):
            loss = lm_loss(model, ids)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in params.values())
            opt.step()
            losses.append(loss.item())
    return torch.tensor(losses), {n: (p.detach().float() - start[n]).flatten() for n, p in params.items()}


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY, model_type="llama")).to(dtype)


def batch():
    return torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))


def check_close(losses, deltas, ref_losses, ref_deltas, only="", dtype=torch.bfloat16):
    """Losses within rtol; the updates of the weights whose name contains `only` point the same way."""
    torch.testing.assert_close(losses, ref_losses, rtol=LOSS_RTOL[dtype], atol=0)
    d, ref = (torch.cat([x[n] for n in x if only in n]) for x in (deltas, ref_deltas))
    assert F.cosine_similarity(d, ref, dim=0) >= MIN_COSINE[dtype]


def test_lora_on_bf16_weights_with_fp32_adapters():
    ids = batch()
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(dtype)
        torch.manual_seed(2)  # the same adapter initialisation in both runs
        lora.apply_lora(model, rank=4, alpha=8)
        m = model.model.layers[0].self_attn.q_proj
        assert m.weight.dtype == dtype and m.lora_A.dtype == torch.float32
        assert model(ids).dtype == dtype  # the adapters' output is added in the base's dtype
        runs.append(train(model, ids, lr=1e-5))
    check_close(*runs[1], *runs[0], only="lora_A")  # A's updates, which bf16 adapters would lose
    check_close(*runs[1], *runs[0])


def test_full_fine_tuning_bf16_mixed():
    ids = batch()
    ref = train(tiny_model(), ids, lr=1e-4)
    model = tiny_model()
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = train(model, ids, lr=1e-4, precision="bf16-mixed")
    assert set(seen) == {torch.bfloat16}  # the matmuls ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... over fp32 master weights
    check_close(*out, *ref)
    assert not torch.equal(out[0], ref[0])  # not silently fp32
