"""rollout.generate: greedy parity with transformers' generate, the KV cache against full
recomputation, left padding, EOS handling and seeding (the default, fast engine; test_decode.py compares it
with the reference engine and tests the sampler).

Tolerances (fp32 on CPU):
  logprobs  atol 1e-5: a cached step runs attention on a (B, H, 1, S) query where the full
            recomputation runs (B, H, T, T); the same maths in another order, ~1e-6 seen.
Token comparisons are exact: the random models below have no near-ties at the top of their
next-token distributions (checked by `top2_margin` so a test cannot pass or fail by rounding).
"""

import pytest
import torch

from nanopairwise.model import Transformer
from nanopairwise.rollout import generate, left_pad
from tests.test_model import V, saved_hf

LP_TOL = dict(atol=1e-5, rtol=1e-5)
PAD = 0


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def full_logprobs(model, prompt, response, temperature=1.0):
    """Log-probs of `response` after `prompt`, from one uncached forward over the whole sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float() / temperature  # (R, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1), logits


def top2_margin(logits):
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate(tmp_path, model_type):
    hf, path = saved_hf(tmp_path, model_type)
    ours = Transformer.from_pretrained(path).eval()
    for prompt in prompts_of([5, 9, 1]):
        ro = generate(ours, [prompt], max_new_tokens=12, eos_token_id=None, pad_token_id=PAD, greedy=True)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
        assert ro.response_ids[0].tolist() == ref[0, len(prompt):].tolist()
        assert top2_margin(full_logprobs(ours, prompt, ro.response_ids[0].tolist())[1]) > 1e-4


def test_cached_generation_equals_full_recomputation(tmp_path):
    """Greedy and sampled tokens from the cache; each step's log-prob equals that of one full forward."""
    _, path = saved_hf(tmp_path, "qwen3")
    model = Transformer.from_pretrained(path).eval()
    prompt = prompts_of([7])[0]
    greedy = generate(model, [prompt], 16, None, PAD, greedy=True)
    resp = greedy.response_ids[0].tolist()
    lp, logits = full_logprobs(model, prompt, resp)
    assert resp == logits.argmax(-1).tolist()  # recomputation picks the same greedy tokens
    torch.testing.assert_close(greedy.logprobs[0], lp, **LP_TOL)
    g = torch.Generator().manual_seed(3)
    sampled = generate(model, [prompt], 16, None, PAD, temperature=0.7, generator=g)
    lp, _ = full_logprobs(model, prompt, sampled.response_ids[0].tolist(), temperature=0.7)
    torch.testing.assert_close(sampled.logprobs[0], lp, **LP_TOL)
    assert (sampled.logprobs <= 0).all()


def test_left_padded_batch_equals_each_prompt_alone(tmp_path):
    _, path = saved_hf(tmp_path, "llama")
    model = Transformer.from_pretrained(path).eval()
    prompts = prompts_of([3, 11, 6, 1], seed=1)
    batch = generate(model, prompts, 10, None, PAD, greedy=True)
    assert batch.prompt_mask.sum(1).tolist() == [3, 11, 6, 1]
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 10, None, PAD, greedy=True)
        assert batch.response_ids[i].tolist() == alone.response_ids[0].tolist(), i
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], **LP_TOL)


def test_eos_stops_each_row_and_masks_the_rest(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    model = Transformer.from_pretrained(path).eval()
    prompts = prompts_of([4, 8, 5], seed=2)
    free = generate(model, prompts, 12, None, PAD, greedy=True)
    # pick as EOS the token row 0 emits at step 3: row 0 must stop there, with EOS counted as sampled
    eos = free.response_ids[0, 3].item()
    out = generate(model, prompts, 12, eos, PAD, greedy=True)
    for b in range(3):
        row = free.response_ids[b].tolist()
        n = row.index(eos) + 1 if eos in row else 12
        assert out.response_mask[b].sum().item() == n and out.ended[b].item() == (eos in row)
        assert out.response_ids[b, :n].tolist() == row[:n]
        assert (out.response_ids[b, n:] == PAD).all() and (out.logprobs[b, n:] == 0).all()
    assert out.ended[0] and out.response_ids.size(1) <= 12


def test_same_seed_same_output_and_global_rng_untouched(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2")
    model = Transformer.from_pretrained(path).eval()
    prompts = prompts_of([4, 6])

    def run(seed):
        return generate(model, prompts, 10, None, PAD, temperature=1.3, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed)).response_ids

    state = torch.get_rng_state()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []], PAD)
    model = Transformer.__new__(Transformer)  # never reached: arguments are checked first
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 4, None, PAD, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 4, None, PAD, top_p=1.5)
    with pytest.raises(ValueError, match="engine"):
        generate(model, [[1]], 4, None, PAD, engine="vllm")


def test_bf16_generation_runs_and_masks(tmp_path):
    _, path = saved_hf(tmp_path, "qwen3")
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16).eval()
    ro = generate(model, prompts_of([3, 7]), 6, None, PAD, generator=torch.Generator().manual_seed(0))
    assert ro.logprobs.dtype == torch.float32 and torch.isfinite(ro.logprobs).all()
    assert ro.response_mask.all() and (ro.logprobs <= 0).all()
