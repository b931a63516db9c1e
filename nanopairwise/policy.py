"""Training-time forward of the policy: per-token log-probs of a response, from hidden states.

Wrapped as an nn.Module so that DDP and FSDP see one ordinary `forward` (they hook it). Only the
response positions go through the LM head: for a (B, P + R) sequence the head reads hidden
states P-1 .. P+R-2, which predict response tokens 0 .. R-1. With `fused_head=True` the head
and the log-prob are one kernel (kernels/linear_logprob.py) and the (B*R, V) logits never exist;
otherwise the logits are formed and read once by the fused log-prob kernel.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopairwise import ops
from nanopairwise.losses import IGNORE_INDEX, TokenLogprobs


class PolicyLogprobs(nn.Module):
    def __init__(self, lm: nn.Module, fused_head: bool = False):
        super().__init__()
        self.lm = lm
        self.fused_head = fused_head

    def forward(self, input_ids, attention_mask, response_mask, temperature=1.0, ref_logprobs=None,
                entropy=False, kl_estimator="k3", full_vocab=False) -> TokenLogprobs:
        """input_ids / attention_mask (B, P + R): left-padded prompt then response; response_mask
        (B, R) 1 = sampled token. Returns TokenLogprobs with (B, R) fields, 0 where masked; with
        `full_vocab` instead the whole next-token distribution, log_softmax(logits / T) (B, R, V) fp32
        (evaluation's exact KL; through forward() so DDP / FSDP / AdaptersOff apply as usual)."""
        B, R = response_mask.shape
        P = input_ids.size(1) - R
        hidden = self.lm.trunk(input_ids, attention_mask=attention_mask)[:, P - 1:P + R - 1]  # (B, R, C)
        if full_vocab:
            return torch.log_softmax(F.linear(hidden, self.lm.lm_head_weight).float() / temperature, dim=-1)
        targets = input_ids[:, P:].masked_fill(response_mask == 0, IGNORE_INDEX).reshape(-1)   # (N,)
        ref = ref_logprobs.reshape(-1) if ref_logprobs is not None else None
        h = hidden.reshape(B * R, -1)                                                         # (N, C)
        if self.fused_head:
            out = ops.linear_token_logprobs(h, self.lm.lm_head_weight, targets, temperature, ref,
                                                entropy, kl_estimator)
        else:
            logits = F.linear(h, self.lm.lm_head_weight)                                     # (N, V)
            out = ops.token_logprobs(logits, targets, temperature, ref, entropy, kl_estimator)
        return TokenLogprobs(*(x.view(B, R) if x is not None else None for x in out))

    def reference(self, lm: nn.Module) -> "PolicyLogprobs":
        """The frozen reference policy for the KL term: `lm` (the initial weights) behind this
        policy's own head path, so old, new and reference log-probs share one arithmetic. Mixing
        them would bias the KL: under bf16 the fused head's logits are fp32 accumulators while
        F.linear rounds them to bf16, so KL(policy || reference) would not be 0 at step 0."""
        return PolicyLogprobs(lm, self.fused_head).eval().requires_grad_(False)
