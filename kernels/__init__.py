"""Kernel dispatch: library code calls one function per op and gets Triton or the reference.

  token_logprobs         kernels/logprob.py         <-> nanopairwise.losses.token_logprobs_ref
  linear_token_logprobs  kernels/linear_logprob.py  <-> nanopairwise.losses.linear_token_logprobs_ref
  clipped_ppo_loss       kernels/ppo_loss.py        <-> nanopairwise.losses.ppo_loss_ref

Backend choice, per call: `backend=` argument, else the environment variable
NANOPAIRWISE_KERNELS (`triton`, `ref` or `auto`, default `auto`). `auto` runs Triton when the
tensors are on CUDA or when TRITON_INTERPRET=1 (the CPU interpreter, how CI tests kernels), and
the pure-PyTorch reference otherwise. Kernel modules are imported lazily, so importing this
package never compiles or launches anything. A dispatch function never shares its name with a
kernel module: importing `kernels/ppo_loss.py` binds the attribute `kernels.ppo_loss` to that
module, which would replace a function of the same name after its first Triton call.
"""

import os

import torch

from nanopairwise import losses

BACKENDS = ("auto", "triton", "ref")


def pick_backend(x: torch.Tensor, backend: str = None) -> str:
    """Resolve `auto` to `triton` or `ref` for a tensor; validate explicit choices."""
    backend = backend or os.environ.get("NANOPAIRWISE_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} (from argument or NANOPAIRWISE_KERNELS); "
                         f"choose one of {BACKENDS}")
    if backend == "auto":
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        backend = "triton" if (x.is_cuda or interpret) else "ref"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("Triton kernels need CUDA tensors or TRITON_INTERPRET=1 (set before import)")
    return backend


def token_logprobs(logits, targets, temperature=1.0, ref_logprobs=None, entropy=False,
                   kl_estimator="k3", ignore_index=losses.IGNORE_INDEX, backend=None):
    """See nanopairwise.losses.token_logprobs_ref for the math; returns losses.TokenLogprobs."""
    if pick_backend(logits, backend) == "ref":
        return losses.token_logprobs_ref(logits, targets, temperature, ref_logprobs, entropy,
                                         kl_estimator, ignore_index)
    from kernels.logprob import token_logprobs as fused
    return fused(logits, targets, temperature, ref_logprobs, entropy, kl_estimator, ignore_index)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, ref_logprobs=None, entropy=False,
                          kl_estimator="k3", ignore_index=losses.IGNORE_INDEX, backend=None):
    """See nanopairwise.losses.linear_token_logprobs_ref; returns losses.TokenLogprobs."""
    if pick_backend(hidden, backend) == "ref":
        return losses.linear_token_logprobs_ref(hidden, weight, targets, temperature, ref_logprobs,
                                                entropy, kl_estimator, ignore_index)
    from kernels.linear_logprob import linear_token_logprobs as fused
    return fused(hidden, weight, targets, temperature, ref_logprobs, entropy, kl_estimator, ignore_index)


def clipped_ppo_loss(logprobs, old_logprobs, advantages, mask, backend=None, **kwargs):
    """See nanopairwise.losses.ppo_loss_ref (same keyword arguments); returns losses.PPOLoss."""
    if pick_backend(logprobs, backend) == "ref":
        return losses.ppo_loss_ref(logprobs, old_logprobs, advantages, mask, **kwargs)
    from kernels.ppo_loss import ppo_loss as fused
    return fused(logprobs, old_logprobs, advantages, mask, **kwargs)
