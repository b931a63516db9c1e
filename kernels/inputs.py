"""The launchers' input checks: the token log-prob ops' (kernels/logprob.py and
kernels/linear_logprob.py share it) and the PPO loss's (kernels/ppo_loss.py).

A launcher hands raw pointers to a kernel that has no bounds checking, so every input it cannot
compute on is refused here, before anything launches: an out-of-range target id would read
another row's memory and return a plausible wrong number.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelInputError(ValueError, TypeError):
    """An input a launcher cannot compute on. Both a ValueError (a wrong value or shape) and a
    TypeError (a wrong dtype), so callers catch whichever they expect."""


def check_token_inputs(op: str, operands: dict, targets, V: int, temperature, ref_logprobs, ignore_index: int):
    """Refuse unusable inputs of a token log-prob op with a message naming `op` and the tensor.

    operands: name -> float tensor (`logits`, or `hidden` and `weight`), one dtype among fp32 /
    bf16 / fp16; targets (N,) integer ids in [0, V) or `ignore_index`, on the operands' device;
    ref_logprobs (N,) or None; temperature > 0. The target range costs one device sync.
    Shapes of the operands themselves are the caller's to check (they differ per op).
    """
    names = ", ".join(operands)
    dtypes = {x.dtype for x in operands.values()}
    if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
        raise KernelInputError(f"{op}: {names} must be fp32, bf16 or fp16 (one dtype); got "
                               f"{', '.join(str(x.dtype) for x in operands.values())}")
    device = next(iter(operands.values())).device
    if any(x.device != device for x in operands.values()) or targets.device != device:
        raise KernelInputError(f"{op}: {names} and targets must be on one device; got "
                               f"{', '.join(str(x.device) for x in (*operands.values(), targets))}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise KernelInputError(f"{op}: targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0.0:
        raise KernelInputError(f"{op}: temperature must be > 0, got {temperature}")
    if ref_logprobs is not None and ref_logprobs.shape != targets.shape:
        raise KernelInputError(f"{op}: ref_logprobs must be {tuple(targets.shape)} like targets, "
                               f"got {tuple(ref_logprobs.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise KernelInputError(f"{op}: targets must be in [0, {V}) or {ignore_index}; bad at rows "
                               f"{bad.nonzero()[:5, 0].tolist()}")


def check_ppo_inputs(named: dict, kl_estimator: str):
    """Refuse unusable inputs of the fused PPO loss. named: name -> tensor or None, logprobs first;
    every tensor given has logprobs' shape and device, and all but the mask are float; values,
    old_values and returns come all or none; kl_estimator is k1, k2 or k3."""
    given_values = [named[k] is not None for k in ("values", "old_values", "returns")]
    if any(given_values) and not all(given_values):
        raise KernelInputError("ppo_loss: values, old_values and returns go together (all or none)")
    if kl_estimator not in ("k1", "k2", "k3"):
        raise KernelInputError(f"unknown KL estimator {kl_estimator!r}; choose k1, k2 or k3")
    shape, device = named["logprobs"].shape, named["logprobs"].device
    for name, x in named.items():
        if x is None:
            continue
        if x.shape != shape or x.device != device:
            raise KernelInputError(f"ppo_loss: {name} is {tuple(x.shape)} on {x.device}; expected "
                                   f"{tuple(shape)} on {device} like logprobs")
        if name != "mask" and not x.is_floating_point():
            raise KernelInputError(f"ppo_loss: {name} must be a float tensor, got {x.dtype}")
