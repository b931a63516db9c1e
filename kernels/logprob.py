"""Fused token log-probs, entropy and KL over the vocabulary: the PPO hot spot, in Triton.

Spec: nanopairwise.losses.token_logprobs_ref (this file must match it forward and backward).

The math. Row n of the logits x (V,), temperature T, target y, z = x / T, p = softmax(z):
  logZ    = log sum_v exp(z_v)                     online over vocabulary blocks (Milakov &
                                                   Gimelshein 2018, arXiv 1805.02867)
  logprob = min(z_y - logZ, 0)                     a log-probability is never positive: rounding
                                                   can make z_y - logZ = +1e-7 when p_y ~ 1, and
                                                   fused kernels that returned such values have
                                                   broken PPO runs (verl #2656)
  entropy = logZ - E_p[z]                          = -sum_v p_v log p_v; -inf logits contribute 0
  kl      = kl_estimate(logprob, ref_logprobs)     k1 / k2 / k3, elementwise on (N,) in PyTorch
Online statistics, kept relative to the running max m so nothing overflows at |z| ~ 1e4:
  s = sum_v e^(z_v - m),   t = sum_v e^(z_v - m) (z_v - m)     (t only over finite z_v)
  when the max moves m -> m' (alpha = e^(m - m')):  s' = alpha s,  t' = alpha (t + (m - m') s)
  then logZ = m + log s,  E_p[z] = m + t / s,  entropy = log s - t / s.

The gradient. d logZ / d z_v = p_v, and d E_p[z] / d z_v = p_v (1 + z_v - E_p[z]), so
  d logprob / d x_v = (onehot_y(v) - p_v) / T         (0 where the clamp was active)
  d entropy / d x_v = -p_v (z_v - E_p[z]) / T         (0 at -inf logits, where p_v = 0)
With upstream gradients g_lp, g_H (N,) the backward writes, once per element,
  d loss / d x_v = [g_lp (onehot_y(v) - p_v) - g_H p_v (z_v - E_p[z])] / T.
The KL depends on the logits only through logprob, so it is computed after the kernel with
losses.kl_estimate itself; autograd folds dk/dlogprob (k1: 1, k2: logprob - ref, k3:
1 - e^(ref - logprob)) into g_lp, and gives ref_logprobs its gradient (k1: -1, k2: ref - logprob,
k3: e^(ref - logprob) - 1) when it requires one. That costs a few (N,) ops and no kernel flags.

Memory traffic (E = bytes per logit, 2 for bf16): forward reads N*V*E once and writes at most
5 floats per row (logprob, entropy, and m, log s, E_p[z] - m saved for backward); backward reads
N*V*E once more and writes the (N, V) gradient once, in the logits' dtype. Nothing (N, V) in
fp32 is ever allocated: peak extra memory is the gradient itself. The gradient is written to a
new buffer, never into `logits` (an in-place write would save that buffer but silently corrupt
any other consumer of the logits, Liger #272), so the default and only mode is out-of-place.
Ignored rows (target == ignore_index) are not read at all; their gradient rows are written as 0.
Not supported: +inf logits (logZ = inf; the reference returns NaN there too).
"""

import torch
import triton
import triton.language as tl

from kernels.inputs import KernelInputError, check_token_inputs
from nanopairwise.losses import IGNORE_INDEX, TokenLogprobs, token_kl

NEG_INF = tl.constexpr(float("-inf"))  # a jit function may read a module global only if it is a constexpr


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,         # (N, V) fp32/bf16/fp16, unit column stride
    stride_n,           # elements between consecutive rows of logits
    targets_ptr,        # (N,) int64, ignore_index marks rows to skip
    logprobs_ptr,       # (N,) fp32 out: min(z_y - logZ, 0), 0 on ignored rows
    entropy_ptr,        # (N,) fp32 out: log s - t / s (written only if ENTROPY)
    row_max_ptr,        # (N,) fp32 out, for backward: m, the max of z over the row
    log_sum_ptr,        # (N,) fp32 out, for backward: log s, so that logZ = m + log s
    ez_ptr,             # (N,) fp32 out, for backward: E_p[z] - m = t / s (only if ENTROPY)
    V,                  # vocabulary size, any value (the last block is masked)
    inv_temp,           # 1 / temperature
    ignore_index,       # target value of rows that get 0 and no gradient
    BLOCK_V: tl.constexpr,   # vocabulary entries per loop step (power of two)
    ENTROPY: tl.constexpr,   # also accumulate t and write the entropy
):
    # 1. one program per row; int64 so that row * stride_n does not overflow at N*V > 2^31
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # 2. stream the row once: running max m, s = sum e^(z - m), t = sum e^(z - m) (z - m).
    #    An ignored row runs the loop zero times, so it is never read.
    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, tl.where(valid, V, 0), BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        # cast at once: bf16 arithmetic is wrong in the interpreter and imprecise anyway
        z = tl.load(row_ptr + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new > NEG_INF, m_new, 0.0)      # all -inf so far: any finite anchor
        alpha = tl.exp(m - m_ref)                          # 0 while m = -inf (s = t = 0 then)
        e = tl.exp(z - m_ref)                              # (BLOCK_V,), 0 at -inf and padding
        if ENTROPY:
            d = tl.where(z > NEG_INF, z - m_ref, 0.0)      # 0 * -inf would be NaN
            shift = tl.where(m > NEG_INF, m - m_ref, 0.0)  # same, for the rescaling term
            t = alpha * (t + shift * s) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    # 3. row results; ignored rows get m = 0, log s = 0 so backward reads p = e^(-inf) = 0
    m = tl.where(valid, m, 0.0)
    log_s = tl.log(tl.where(valid, s, 1.0))
    z_y = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32) * inv_temp
    logprob = tl.minimum((z_y - m) - log_s, 0.0)           # z_y = -inf gives -inf, as the ref
    tl.store(logprobs_ptr + row, tl.where(valid, logprob, 0.0))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    if ENTROPY:
        ez = t / tl.where(valid, s, 1.0)
        tl.store(ez_ptr + row, ez)
        tl.store(entropy_ptr + row, tl.where(valid, log_s - ez, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr,         # (N, V) fp32/bf16/fp16, unit column stride (as in forward)
    stride_n,           # elements between consecutive rows of logits
    targets_ptr,        # (N,) int64
    grad_ptr,           # (N, V) out: d loss / d logits in the logits' dtype, contiguous
    g_logprobs_ptr,     # (N,) fp32 upstream gradient of the log-probs (KL path included)
    g_entropy_ptr,      # (N,) fp32 upstream gradient of the entropy (read only if ENTROPY)
    row_max_ptr,        # (N,) fp32 m from forward
    log_sum_ptr,        # (N,) fp32 log s from forward
    ez_ptr,             # (N,) fp32 E_p[z] - m from forward (read only if ENTROPY)
    V,                  # vocabulary size
    inv_temp,           # 1 / temperature
    ignore_index,       # target value of rows whose gradient row is all zeros
    BLOCK_V: tl.constexpr,   # vocabulary entries per loop step (power of two)
    ENTROPY: tl.constexpr,   # add the entropy term -g_H p (z - E_p[z]) / T
):
    # 1. per-row coefficients; everything (N,)-sized is a scalar here
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    grad_row_ptr = grad_ptr + row * V
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    m = tl.load(row_max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    # the clamp min(., 0) passes the gradient where it was not active (as torch.clamp does)
    z_y = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32) * inv_temp
    keep = valid & ((z_y - m) - log_s <= 0.0)
    c_lp = tl.where(keep, tl.load(g_logprobs_ptr + row), 0.0) * inv_temp
    if ENTROPY:
        c_ent = tl.where(valid, tl.load(g_entropy_ptr + row), 0.0) * inv_temp
        ez = tl.load(ez_ptr + row)
    # 2. stream the row again and write every gradient element exactly once. Ignored rows load
    #    nothing (masked, other=-inf gives p = 0) but still write their zeros: the buffer is
    #    torch.empty, and writing here is cheaper than a separate memset pass.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        x = tl.load(row_ptr + cols, mask=col_mask & valid, other=NEG_INF).to(tl.float32)
        zm = x * inv_temp - m                              # z - m, exact near the max
        p = tl.exp(zm - log_s)
        grad = c_lp * (tl.where(cols == target, 1.0, 0.0) - p)
        if ENTROPY:
            grad -= c_ent * p * tl.where(zm > NEG_INF, zm - ez, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=col_mask)


def _launch_config(V: int):
    """BLOCK_V and num_warps: three fixed configurations (autotune with several configs fails
    under the interpreter), so the compile gate (kernels/aot.py) covers all of them.

    A thread's share of a block is BLOCK_V / (32 num_warps) elements: 16 at 4096 and 8 warps,
    i.e. two 16-byte vector loads of bf16/fp16 or four of fp32 per step (ld.global.v4, checked in
    the PTX by tests/test_compile_gate.py). Bytes in flight: one step of a program loads
    BLOCK_V * e bytes (8 KB for bf16); the forward's 48 registers per thread leave room for 5
    programs of 8 warps per SM (the backward's 32: 8), so 40 KB per SM, against the ~17 KB per
    SM Little's law asks for at 3.35 TB/s (table in docs/BENCHMARKS.md). Small vocabularies (< 2048) use 1024 or 2048 entries, never fewer, so
    every load stays a full vector per thread; the interpreter is fast at any of these sizes.
    """
    block_v = min(4096, max(1024, triton.next_power_of_2(V)))
    return block_v, (4 if block_v == 1024 else 8)


class TokenLogprobsFunction(torch.autograd.Function):
    """(logits, targets) -> (logprobs, entropy or None); KL is added outside, in PyTorch."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, entropy, ignore_index):
        N, V = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        logprobs, row_max, log_sum = (torch.empty(N, **f32) for _ in range(3))
        ent, ez = (torch.empty(N, **f32), torch.empty(N, **f32)) if entropy else (None, None)
        block_v, num_warps = _launch_config(V)
        if N > 0:
            _logprob_fwd_kernel[(N,)](
                logits, logits.stride(0), targets, logprobs, ent, row_max, log_sum, ez,
                V, 1.0 / temperature, ignore_index, BLOCK_V=block_v, ENTROPY=entropy,
                num_warps=num_warps)
        ctx.save_for_backward(logits, targets, row_max, log_sum, ez)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.set_materialize_grads(False)                   # unused outputs give None, not zeros
        return logprobs, ent

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        logits, targets, row_max, log_sum, ez = ctx.saved_tensors
        N, V = logits.shape
        if g_logprobs is None:                             # only the entropy was used
            g_logprobs = torch.zeros(N, dtype=torch.float32, device=logits.device)
        use_entropy = g_entropy is not None
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)   # (N, V)
        block_v, num_warps = _launch_config(V)
        if N > 0:
            _logprob_bwd_kernel[(N,)](
                logits, logits.stride(0), targets, grad, g_logprobs.float().contiguous(),
                g_entropy.float().contiguous() if use_entropy else None, row_max, log_sum,
                ez, V, 1.0 / ctx.temperature, ctx.ignore_index, BLOCK_V=block_v,
                ENTROPY=use_entropy, num_warps=num_warps)
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ref_logprobs: torch.Tensor = None, entropy: bool = False,
                   kl_estimator: str = "k3", ignore_index: int = IGNORE_INDEX) -> TokenLogprobs:
    """Fused losses.token_logprobs_ref: same arguments, same outputs, same gradients.

    logits (N, V) fp32 / bf16 / fp16 on CUDA (or on the CPU under TRITON_INTERPRET=1), targets
    (N,) integer, ref_logprobs (N,) or None. Returns fp32 (N,) log-probs (<= 0), entropy and
    KL (None unless asked for). Gradients flow to logits and, if it requires grad, ref_logprobs.
    Inputs are checked here (kernels/inputs.py), including the target range: that costs one
    device sync, and an out-of-range target would otherwise read another row's memory.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise KernelInputError(f"token_logprobs: logits must be (N, V) and targets (N,); got "
                               f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    check_token_inputs("token_logprobs", {"logits": logits}, targets, logits.shape[1], temperature, ref_logprobs,
                       ignore_index)
    targets = targets.to(torch.int64).contiguous()
    valid = targets != ignore_index                                      # (N,)
    if logits.stride(1) != 1:
        logits = logits.contiguous()   # a copy; row-strided views (e.g. x[:, :V]) need none
    logprobs, ent = TokenLogprobsFunction.apply(logits, targets, float(temperature), bool(entropy),
                                                int(ignore_index))
    return TokenLogprobs(logprobs, ent, token_kl(logprobs, ref_logprobs, valid, kl_estimator))
