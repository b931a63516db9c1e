"""The ops with a fused Triton kernel, one function each: Triton or the PyTorch reference, per call.

    op (this module)        kernel                      reference (the spec, nanopairwise/losses.py)
    token_logprobs          kernels/logprob.py          token_logprobs_ref
    linear_token_logprobs   kernels/linear_logprob.py   linear_token_logprobs_ref
    ppo_loss                kernels/ppo_loss.py         ppo_loss_ref

Library code and the scripts call these; each takes the reference's arguments and returns what
the reference returns (losses.TokenLogprobs, losses.PPOLoss). The imports run one way: this is
the only module of nanopairwise/ that imports kernels/, and kernels/ imports only
nanopairwise/losses.py (its specs and their return types).

Backend choice, per call: the `backend=` argument, else the environment variable
NANOPAIRWISE_KERNELS (`triton`, `chunked`, `ref` or `auto`, default `auto`). `auto` runs Triton
when the tensors are on CUDA or when TRITON_INTERPRET=1 (the CPU interpreter, how CI tests
kernels), and `chunked` otherwise: token_logprobs over row chunks in PyTorch
(nanopairwise/logprob_chunked.py, the reference's math without its (N, V) temporaries); the
other two ops have no chunked form and run their reference. Kernel modules are imported on the first Triton call, so importing this
module never compiles or launches anything.
"""

import os

import torch

from nanopairwise import logprob_chunked, losses

BACKENDS = ("auto", "triton", "chunked", "ref")


def pick_backend(x: torch.Tensor, backend: str = None) -> str:
    """Resolve `auto` to `triton` or `chunked` for a tensor; validate explicit choices."""
    backend = backend or os.environ.get("NANOPAIRWISE_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} (from argument or NANOPAIRWISE_KERNELS); "
                         f"choose one of {BACKENDS}")
    if backend == "auto":
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        backend = "triton" if (x.is_cuda or interpret) else "chunked"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("Triton kernels need CUDA tensors or TRITON_INTERPRET=1 (set before import)")
    return backend


def token_logprobs(logits, targets, temperature=1.0, ref_logprobs=None, entropy=False,
                   kl_estimator="k3", ignore_index=losses.IGNORE_INDEX, backend=None) -> losses.TokenLogprobs:
    """See losses.token_logprobs_ref for the math."""
    backend = pick_backend(logits, backend)
    if backend == "ref":
        return losses.token_logprobs_ref(logits, targets, temperature, ref_logprobs, entropy,
                                         kl_estimator, ignore_index)
    if backend == "chunked":
        return logprob_chunked.token_logprobs(logits, targets, temperature, ref_logprobs, entropy,
                                              kl_estimator, ignore_index)
    from kernels.logprob import token_logprobs as fused
    return fused(logits, targets, temperature, ref_logprobs, entropy, kl_estimator, ignore_index)


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, ref_logprobs=None, entropy=False,
                          kl_estimator="k3", ignore_index=losses.IGNORE_INDEX, backend=None) -> losses.TokenLogprobs:
    """See losses.linear_token_logprobs_ref for the math."""
    if pick_backend(hidden, backend) != "triton":
        return losses.linear_token_logprobs_ref(hidden, weight, targets, temperature, ref_logprobs,
                                                entropy, kl_estimator, ignore_index)
    from kernels.linear_logprob import linear_token_logprobs as fused
    return fused(hidden, weight, targets, temperature, ref_logprobs, entropy, kl_estimator, ignore_index)


def ppo_loss(logprobs, old_logprobs, advantages, mask, backend=None, **kwargs) -> losses.PPOLoss:
    """See losses.ppo_loss_ref for the math (same keyword arguments)."""
    if pick_backend(logprobs, backend) != "triton":
        return losses.ppo_loss_ref(logprobs, old_logprobs, advantages, mask, **kwargs)
    from kernels.ppo_loss import ppo_loss as fused
    return fused(logprobs, old_logprobs, advantages, mask, **kwargs)
