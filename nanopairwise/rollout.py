"""Batched sampling with a KV cache: the rollout engine of PPO.

    prompts (lists of ids) --left-pad--> prefill once (KV cache) --> one token per step for all rows

Prompts of different lengths are left-padded so that every row's next token lands in the same
cache slot; position ids count real tokens only, so padding changes nothing. A row stops at its
first EOS (EOS is a sampled token: response_mask 1); later tokens are pad with mask 0. Generation
stops when every row has ended or after max_new_tokens; the host checks that every token on the
CPU (free there) and every EOS_CHECK_EVERY tokens on a GPU (each check waits for the device).

Two engines run the model, with one loop and one sampler (sampling.py):

  "fast" (default)  decode.py: fused q/k/v and gate/up weights, a static KV cache and a compiled
                    step (CUDA graphs on a GPU), bf16 weights on bf16 CPUs; for models of at least
                    decode.COMPILE_MIN_PARAMS, below that the same step eagerly in the model's dtype;
  "model"           the training model's own `trunk` through its growing KVCache: the reference.

`logprobs` are the sampler's: log softmax(logits / T)[token] in fp32 of the engine that sampled.
The fast engine's arithmetic (bf16, fused and compiled kernels) differs from the training
forward's, so PPO recomputes them with its training path and logs the gap (train_ppo.py).
Sampler draws one uniform per row and token from the given generator, so a seed fixes the output
and the global RNG is never touched.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanopairwise.batching import pad_batch
from nanopairwise.decode import decoder_for
from nanopairwise.sampling import Sampler

EOS_CHECK_EVERY = {"cpu": 1}  # tokens between host-side "has every row ended?" checks; 8 elsewhere


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) long, 1 = real prompt token
    response_ids: torch.Tensor  # (B, R) long, pad after EOS / the end
    response_mask: torch.Tensor  # (B, R) long, 1 = sampled token (EOS included)
    logprobs: torch.Tensor  # (B, R) fp32, log softmax(logits / T)[token], 0 where response_mask is 0
    ended: torch.Tensor  # (B,) bool, True if the row sampled EOS
    compile_s: float = 0.0  # seconds this call spent compiling the decode step (first calls only)

    def sequences(self):
        """(input_ids (B, P+R), attention_mask (B, P+R)) for a training forward. The logits at
        position P-1+j of that forward score response token j (teacher forcing)."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    def texts(self, tokenizer) -> list:
        """The sampled responses as text (special tokens such as EOS dropped, whitespace stripped)."""
        return [tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip()
                for ids, mask in zip(self.response_ids.tolist(), self.response_mask.tolist())]


def left_pad(prompts: list, pad_token_id: int, device=None):
    """list of B id lists, none empty -> (ids (B, P), mask (B, P)), right-aligned (left padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    ids, mask = pad_batch(prompts, pad_token_id, side="left")                          # (B, P)
    return ids.to(device), mask.to(device)


class ModelEngine:
    """The reference engine: the model's own trunk and KVCache (model.py), eager, its dtype."""

    def __init__(self, model):
        self.model, self.compile_s = model, 0.0

    def reset(self, batch_size: int, length: int):
        self.cache = self.model.new_kv_cache(batch_size, length)

    def logits(self, ids, real):
        hidden = self.model.trunk(ids, real.long(), kv_cache=self.cache)[:, -1]  # (B, C)
        return F.linear(hidden, self.model.lm_head_weight).float()  # (B, V): the head on the last position only

    def prefill(self, ids, mask, sampling, u):
        return sampling(self.logits(ids, mask), u)

    def step(self, sampling, tokens, real, slot, u):
        return sampling(self.logits(tokens[:, None], real[:, None]), u)


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, eos_token_id, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator = None, top_k: int = 0, engine: str = "fast",
             dtype: torch.dtype = None, compile: bool = None) -> Rollout:
    """Sample up to max_new_tokens for each prompt (a list of token ids).

    eos_token_id: an id, a list of ids, or None (never stop early: benchmarks). generator: a
    torch.Generator on the model's device; None uses torch's default generator for it. engine:
    "fast" or "model" (module docstring); dtype / compile: the fast engine's, None = automatic
    (decode.decoder_for).
    """
    sampling = Sampler(temperature, top_k, top_p, greedy)
    if engine not in ("fast", "model"):
        raise ValueError(f"engine must be 'fast' or 'model', got {engine!r}")
    device = model.lm_head_weight.device
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).view(-1)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # (B, P)
    B, P = prompt_ids.shape
    R = max_new_tokens
    runner = ModelEngine(model) if engine == "model" else decoder_for(model, dtype, compile)
    compile_s = runner.compile_s
    runner.reset(B, P + R)
    u = (torch.zeros(R, B, device=device) if greedy                  # one uniform per row and token
         else torch.rand(R, B, generator=generator, device=device))
    response_ids = torch.full((B, R), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(B, R, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, R, dtype=torch.float32, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    slots = torch.arange(P, P + R, device=device)  # the cache slot of each response token
    check_every = EOS_CHECK_EVERY.get(device.type, 8)
    tokens, lp = runner.prefill(prompt_ids, prompt_mask, sampling, u[0])
    for t in range(R):
        alive = ~ended  # rows still generating; ended rows get pad with mask 0
        fed = torch.where(alive, tokens, pad_token_id)
        response_ids[:, t], response_mask[:, t] = fed, alive
        logprobs[:, t] = torch.where(alive, lp, 0.0)
        ended |= alive & torch.isin(tokens, eos)
        if t + 1 == R or ((t + 1) % check_every == 0 and bool(ended.all())):  # the one host sync
            break
        tokens, lp = runner.step(sampling, fed, alive, slots[t:t + 1], u[t + 1])
    steps = int(response_mask.any(0).nonzero().max()) + 1  # the last column any row sampled
    return Rollout(prompt_ids, prompt_mask, response_ids[:, :steps], response_mask[:, :steps],
                   logprobs[:, :steps], ended, runner.compile_s - compile_s)
