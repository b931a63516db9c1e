"""Token log-probs (and entropy) over row chunks: losses.token_logprobs_ref's math in PyTorch
without its (N, V) temporaries, the CPU's path (ops.token_logprobs, backend "chunked").

Why. The reference runs each step as a whole-(N, V) tensor op: the fp32 copy of the logits,
logsumexp, softmax, the finite-logits mask, p * z, and in the backward as many again, each a
fresh N x V x 4 bytes (96 MiB at 512 x 49152) streamed through memory and held by autograd. Here
a chunk of `chunk` rows is small enough to stay in cache while every pass runs over it, and the
backward recomputes softmax from the saved logits and logsumexp instead of keeping it. A SmolLM2
PPO step's peak resident set fell by 1.5 GiB with it, its time unchanged; scripts/
bench_policy_update.py --compare kernels times a policy's forward + backward both ways
(docs/BENCHMARKS.md, "PPO step").

Math, per row, z = logits / T, lse = logsumexp(z), p = exp(z - lse), over the valid rows
(target != ignore_index; the others get 0 and no gradient):
  logprob = min(z[t] - lse, 0)                 entropy H = lse - sum_v p_v z_v (-inf logits: p_v = 0, no term)
  d logprob / d z_j = [j = t] - p_j            (0 where the clamp was active: z[t] - lse > 0)
  d H / d z_j       = -p_j (z_j - lse + H)     (= -p_j (log p_j + H); 0 where p_j = 0)
  d / d logits = (g_lp d logprob / d z + g_H d H / d z) / T
The KL term (losses.token_kl) is computed from the returned log-probs by autograd, as the fused
kernels do. Parity with the reference, forward and backward, fp32 and bf16, odd shapes:
tests/test_logprob_chunked.py.
"""

import torch

from nanopairwise import losses

CHUNK = 8   # rows per chunk: 8 x 49152 fp32 = 1.5 MiB, a few times over for the temporaries (L2-sized)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """(logprobs (N,), entropy (N,) or None) of logits (N, V) at targets (N,), fp32."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, entropy, ignore_index, chunk):
        N = logits.size(0)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lp, lse = torch.zeros(N, device=logits.device), torch.empty(N, device=logits.device)
        ent = torch.zeros(N, device=logits.device) if entropy else None
        for i in range(0, N, chunk):
            z = logits[i:i + chunk].float() / temperature                             # (c, V)
            lse[i:i + chunk] = torch.logsumexp(z, dim=-1)
            lp[i:i + chunk] = z.gather(-1, safe[i:i + chunk, None]).squeeze(-1) - lse[i:i + chunk]
            if entropy:
                p = torch.exp(z - lse[i:i + chunk, None])
                ent[i:i + chunk] = lse[i:i + chunk] - (p * torch.where(p > 0, z, 0.0)).sum(-1)
        unclamped = lp <= 0.0                                      # clamp(max=0) passes the gradient here
        lp = torch.where(valid, lp.clamp(max=0.0), 0.0)
        if entropy:
            ent = torch.where(valid, ent, 0.0)
        ctx.save_for_backward(logits, safe, valid & unclamped, valid, lse, ent)
        ctx.temperature, ctx.entropy, ctx.chunk = temperature, entropy, chunk
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, safe, lp_pass, valid, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        g_lp = torch.where(lp_pass, g_lp, 0.0).float()                  # (N,); autograd gives zeros if unused
        use_ent = ctx.entropy and g_ent is not None
        g_ent = torch.where(valid, g_ent, 0.0).float() if use_ent else None
        dlogits = torch.empty_like(logits)
        for i in range(0, logits.size(0), chunk):
            z = logits[i:i + chunk].float() / T                                         # (c, V)
            p = torch.exp(z - lse[i:i + chunk, None])
            d = p * -g_lp[i:i + chunk, None]
            d.scatter_add_(-1, safe[i:i + chunk, None], g_lp[i:i + chunk, None])
            if use_ent:
                log_p_plus_h = torch.where(p > 0, z - lse[i:i + chunk, None] + ent[i:i + chunk, None], 0.0)
                d -= g_ent[i:i + chunk, None] * p * log_p_plus_h
            d.masked_fill_(~valid[i:i + chunk, None], 0.0)   # ignored rows: 0, even where p is NaN (all -inf)
            dlogits[i:i + chunk] = d / T
        return dlogits, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ref_logprobs=None, entropy: bool = False, kl_estimator: str = "k3",
                   ignore_index: int = losses.IGNORE_INDEX, chunk: int = CHUNK) -> losses.TokenLogprobs:
    """losses.token_logprobs_ref's arguments and TokenLogprobs, computed `chunk` rows at a time."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs: logits must be (N, V) and targets (N,); got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    lp, ent = ChunkedTokenLogprobs.apply(logits, targets, float(temperature), entropy, ignore_index, chunk)
    return losses.TokenLogprobs(lp, ent, losses.token_kl(lp, ref_logprobs, targets != ignore_index, kl_estimator))
