"""decode.py and sampling.py: the fast engine of rollout.generate against the reference engine
(the model's own trunk), the compiled step, LoRA merging, weight refresh, and the sampler.

Tolerances, fp32 on CPU, keyed by what is compared:
  tokens      exact under greedy decoding: the random models below have no near-ties at the top
              (test_rollout.top2_margin checks the margin).
  logprobs    atol 1e-5: fused q/k/v and gate/up matmuls and attention over the whole static
              cache sum the same terms in another order; ~1e-6 seen.
  bf16        the fast engine's bf16 snapshot of an fp32 model: mean |log-prob gap| < 0.05 nats
              on these 2-layer models, tokens not compared (bf16 changes near-ties).
The compiled step is tested once (compiling costs ~10-30 s on a 2-core CPU); every other test runs
the same step eagerly.
"""

import pytest
import torch

from nanopairwise import decode, lora
from nanopairwise.model import Transformer
from nanopairwise.rollout import generate
from nanopairwise.sampling import Sampler, inverse_cdf, top_k_filter, top_p_filter
from tests.test_model import saved_hf
from tests.test_rollout import PAD, full_logprobs, prompts_of

LP_TOL = dict(atol=1e-5, rtol=1e-5)


def both_engines(model, prompts, n=10, seed=None, **kw):
    """The fast and the reference engine's rollouts; sampled ones from generators seeded alike."""
    g = lambda: None if seed is None else torch.Generator().manual_seed(seed)  # noqa: E731
    fast = generate(model, prompts, n, None, PAD, engine="fast", generator=g(), **kw)
    ref = generate(model, prompts, n, None, PAD, engine="model", generator=g(), **kw)
    return fast, ref


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fast_engine_equals_reference(tmp_path, model_type):
    """Greedy tokens and log-probs of a left-padded batch; a sampled run with the same seed too."""
    _, path = saved_hf(tmp_path, model_type)
    model = Transformer.from_pretrained(path).eval()
    prompts = prompts_of([3, 9, 1, 6], seed=4)
    fast, ref = both_engines(model, prompts, greedy=True)
    assert torch.equal(fast.response_ids, ref.response_ids)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, **LP_TOL)
    fast, ref = both_engines(model, prompts, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    assert torch.equal(fast.response_ids, ref.response_ids)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, **LP_TOL)


def test_compiled_step_equals_reference(tmp_path):
    """torch.compile'd static-cache step, fp32, greedy: the reference engine's tokens, EOS and all."""
    _, path = saved_hf(tmp_path, "qwen3")  # q/k norm, GQA, head_dim != C / H
    model = Transformer.from_pretrained(path).eval()
    prompts = prompts_of([5, 2, 8], seed=5)
    ref = generate(model, prompts, 12, None, PAD, greedy=True, engine="model")
    eos = ref.response_ids[1, 4].item()  # row 1 stops at step 4
    ref = generate(model, prompts, 12, eos, PAD, greedy=True, engine="model")
    out = generate(model, prompts, 12, eos, PAD, greedy=True, compile=True)
    assert out.compile_s > 0 and decode.decoder_for(model, compile=True).compile
    assert torch.equal(out.response_ids, ref.response_ids) and torch.equal(out.response_mask, ref.response_mask)
    torch.testing.assert_close(out.logprobs, ref.logprobs, **LP_TOL)
    again = generate(model, prompts, 12, eos, PAD, greedy=True, compile=True)  # cached graph: no compile
    assert again.compile_s == 0 and torch.equal(again.response_ids, out.response_ids)


def test_lora_merged_and_refreshed_after_updates(tmp_path):
    """The snapshot merges switched-on adapters, and follows in-place weight updates and adapter toggles."""
    _, path = saved_hf(tmp_path, "llama")
    model = lora.apply_lora(Transformer.from_pretrained(path).eval(), rank=4, alpha=8)
    prompts = prompts_of([4, 7], seed=6)
    base = generate(model, prompts, 8, None, PAD, greedy=True)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.3)  # in place, as an optimizer step
    fast, ref = both_engines(model, prompts, 8, greedy=True)
    assert torch.equal(fast.response_ids, ref.response_ids) and not torch.equal(fast.response_ids, base.response_ids)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, **LP_TOL)
    with lora.adapters_disabled(model):
        off = generate(model, prompts, 8, None, PAD, greedy=True)
    assert torch.equal(off.response_ids, base.response_ids)


def test_bf16_snapshot_of_an_fp32_model(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    model = Transformer.from_pretrained(path).eval()
    prompt = prompts_of([6], seed=8)[0]
    out = generate(model, [prompt], 10, None, PAD, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    lp, _ = full_logprobs(model, prompt, out.response_ids[0].tolist())  # the fp32 training forward's
    assert (out.logprobs[0] - lp).abs().mean() < 0.05
    assert decode.decoder_for(model).dtype == torch.float32  # automatic: a tiny model stays in its dtype
    assert isinstance(decode.cpu_has_bf16(), bool)


def sort_top_p(probs, top_p):
    """The textbook nucleus: sort, keep while the mass strictly before a token is < top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))


def test_top_p_bisection_equals_sorting():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_filter(probs, 0.75)[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert top_p_filter(probs, 0.1)[0].tolist() == pytest.approx([0.5, 0, 0, 0])
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 8.0):  # flat to peaked rows, V = 49152
        probs = torch.softmax(scale * torch.randn(4, 49152, generator=g), -1)
        for top_p in (0.3, 0.9, 0.99):
            assert torch.equal(top_p_filter(probs, top_p) > 0, sort_top_p(probs, top_p) > 0), (scale, top_p)
    assert (top_k_filter(probs, 5) > 0).sum(-1).tolist() == [5] * 4


def test_sampling_frequencies():
    """The inverse CDF picks i with probability p_i, never a zero-probability token; top-k and
    top-p sample only their kept tokens; the log-prob is the untruncated one."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens = inverse_cdf(probs.expand(n, 5), u)
    freq = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)  # 4.5 sigma of a binomial at n=20000
    assert inverse_cdf(probs[None], torch.tensor([1 - 2 ** -24]))[0] == 4  # u -> 1 still lands on a token
    logits = probs.clamp(min=1e-30).log().expand(n, 5)
    tokens, lp = Sampler(top_p=0.75)(logits, u)
    assert set(tokens.tolist()) == {0, 2}
    torch.testing.assert_close(lp, logits[0].log_softmax(-1)[tokens])
    assert set(Sampler(top_k=3)(logits, u)[0].tolist()) == {0, 2, 3}
    assert Sampler(greedy=True)(logits, u)[0].eq(0).all()
    with pytest.raises(ValueError, match="top_k"):
        Sampler(top_k=-1)
