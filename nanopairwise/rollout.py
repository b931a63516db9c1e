"""Batched sampling with a static KV cache: the rollout engine of PPO.

    prompts (lists of ids) --left-pad--> prefill once (KV cache) --> one token per step for all rows

Prompts of different lengths are left-padded so that every row's next token lands in the same
cache slot; position ids count real tokens only (model.trunk), so padding changes nothing. A row
stops at its first EOS (EOS is a sampled token: response_mask 1); later tokens are pad with mask 0.
Generation stops when every row has ended or after max_new_tokens.

Per step: one (B, 1) trunk call through the cache, the LM head on the last hidden state only,
temperature, optional top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751), a sample, and one
host sync (`ended.all()`) to stop early. The prompt is never recomputed.

`logprobs` are log softmax(logits / T)[token] in fp32 with top-p NOT applied: this is the
behaviour-policy log-prob a training forward with the same temperature recomputes (PPO's
`old_logprobs`), not the probability of the truncated sampling distribution. Greedy uses T = 1.

Sampling draws from a Gumbel-style race, argmax(p / E) with E ~ Exp(1) i.i.d., which picks i
with probability p_i (as torch.multinomial) from one `exponential_` call on the given generator,
so a seed fixes the output and the global RNG is never touched.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanopairwise.batching import pad_batch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) long, 1 = real prompt token
    response_ids: torch.Tensor  # (B, R) long, pad after EOS / the end
    response_mask: torch.Tensor  # (B, R) long, 1 = sampled token (EOS included)
    logprobs: torch.Tensor  # (B, R) fp32, log softmax(logits / T)[token], 0 where response_mask is 0
    ended: torch.Tensor  # (B,) bool, True if the row sampled EOS

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


def top_p_filter(probs, top_p: float):
    """Zero the tail of each row of probs (B, V): keep the smallest set of most likely tokens whose
    mass reaches top_p (a token is kept if the mass strictly before it is < top_p)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_next(logits, temperature: float, top_p: float, greedy: bool, generator):
    """logits (B, V) fp32 -> (tokens (B,), logprobs (B,) of log softmax(logits / T)[token])."""
    logp = F.log_softmax(logits if greedy else logits / temperature, dim=-1)  # (B, V)
    if greedy:
        tokens = logp.argmax(-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:
            probs = top_p_filter(probs, top_p)
        race = torch.empty_like(probs).exponential_(generator=generator)  # E ~ Exp(1)
        race.clamp_(min=torch.finfo(race.dtype).tiny)  # E == 0 can happen; p / 0 would be inf or nan
        tokens = (probs / race).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, eos_token_id, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator = None) -> Rollout:
    """Sample up to max_new_tokens for each prompt (a list of token ids) with model's KV cache.

    eos_token_id: an id, a list of ids, or None (never stop early: benchmarks). generator: a
    torch.Generator on the model's device; None uses torch's default generator for it.
    """
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    W = model.lm_head_weight  # (V, C)
    device = W.device
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).view(-1)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # (B, P)
    B, P = prompt_ids.shape
    R = max_new_tokens
    response_ids = torch.full((B, R), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(B, R, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, R, dtype=torch.float32, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    kv_cache = model.new_kv_cache(B, P + R)
    hidden = model.trunk(prompt_ids, prompt_mask, kv_cache=kv_cache)[:, -1]  # (B, C) prefill
    steps = 0
    for t in range(R):
        logits = F.linear(hidden, W).float()  # (B, V): the LM head on the last position only
        tokens, lp = sample_next(logits, temperature, top_p, greedy, generator)
        alive = ~ended  # rows still generating; ended rows get pad with mask 0
        response_ids[:, t] = torch.where(alive, tokens, pad_token_id)
        response_mask[:, t] = alive
        logprobs[:, t] = torch.where(alive, lp, 0.0)
        ended |= alive & torch.isin(tokens, eos)
        steps = t + 1
        if steps == R or bool(ended.all()):  # the one host sync per step
            break
        step_ids = response_ids[:, t:t + 1]  # (B, 1)
        hidden = model.trunk(step_ids, alive[:, None].long(), kv_cache=kv_cache)[:, -1]  # (B, C)
    return Rollout(prompt_ids, prompt_mask, response_ids[:, :steps], response_mask[:, :steps],
                   logprobs[:, :steps], ended)
