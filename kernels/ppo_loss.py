"""Fused PPO loss: clipped surrogate + KL penalty + clipped value loss, one launch each way.

Spec: nanopairwise.losses.ppo_loss_ref (same arguments, same PPOLoss back). Over N = B*T tokens
with mask weights m_i (1 = the token counts) and M = max(sum_i m_i, 1):

  lr_i  = lp_i - old_i,   r_i = exp(lr_i)                         (ratio)
  pg1_i = -A_i r_i,       pg2_i = -A_i clip(r_i, 1 - eps_lo, 1 + eps_hi)
  pg_loss = sum_i m_i max(pg1_i, pg2_i) / M
  kl_loss = sum_i m_i k(lp_i, ref_i) / M            k = k1 / k2 / k3 of losses.kl_estimate
  vc_i  = old_v_i + clip(v_i - old_v_i, -c, c)
  v_loss  = 0.5 sum_i m_i max((v_i - R_i)^2, (vc_i - R_i)^2) / M
  loss    = pg_loss + kl_coef kl_loss + vf_coef v_loss
  clipfrac = sum m [pg2 > pg1] / M,  approx_kl = sum m (expm1(lr) - lr) / M,  ratio_mean = sum m r / M,
  ratio_max = max of r over m > 0 (0 if none),  vf_clipfrac = sum m [vl2 > vl1] / M.
Each program reduces one block of tokens to 8 partial sums and a partial max, written to a
(P, N_PARTIALS) buffer; a tiny torch sum/max over P finishes it (deterministic, no atomics, no host sync).
`loss` is assembled from the three scalars by autograd, so the backward receives the upstream
gradients g_pg, g_kl, g_v of pg_loss, kl_loss, v_loss (loss's share already added in).

Gradient, with torch's conventions, which the reference's autograd follows:
maximum(a, b) sends the upstream gradient to the larger input and half to each on a tie;
clamp(x, lo, hi) passes it for lo <= x <= hi (inclusive) and blocks it outside. With
w = 1 if pg1 > pg2, 1/2 if pg1 == pg2, 0 if pg1 < pg2, and in = [lo <= r <= hi]:
  d max(pg1, pg2) / d lp = -A r (w + (1 - w) in)      (d r / d lp = r)
Inside the range clip is the identity, pg1 == pg2 and the halves add to -A r; pg2 > pg1 needs
an active clip, so in = 0 and the token gets no gradient; at r == 1 + eps_hi exactly, the tie
and the inclusive clamp give the full -A r again.
  d k / d lp = 1 (k1),  lp - ref (k2),  1 - exp(ref - lp) (k3)
  d max(vl1, vl2) / d v = 2 (w_v (v - R) + (1 - w_v) in_v (vc - R)),  in_v = [-c <= v - old_v <= c]
  d / d lp_i = m_i (g_pg dpg_i + g_kl dk_i) / M,      d / d v_i = m_i g_v 0.5 dvl_i / M
old_logprobs, advantages, ref_logprobs, old_values and returns are data in PPO: they are
detached here and get no gradient (the reference would differentiate ref_logprobs if it
required grad; PPO never asks). Statistics are not differentiable.

Memory traffic, s_x the bytes of one element of x, P = ceil(N / BLOCK):
  forward  reads N (s_lp + s_old + s_A + s_m [+ s_ref] [+ s_v + s_oldv + s_R]) once, writes 36 P bytes;
  backward reads the same once more, writes N s_lp [+ N s_v] (gradients in the input's dtype).
Nothing (N,)-sized is saved: the backward recomputes every elementwise term from the inputs.
The eager reference materialises every intermediate above as an (N,) tensor, and autograd keeps
many of them for its backward.

Inputs: any shape, any float dtype (fp32, bf16, ...), loaded and cast to fp32 at once (bf16
arithmetic is wrong under TRITON_INTERPRET). Non-contiguous inputs are copied to contiguous
ones by the launcher (one extra read and write of that tensor). Masks may be bool, integer or
float; fractional weights work as in the reference (weighted means; ratio_max over m > 0).
As in the reference, masked-out positions must hold finite numbers (0 * inf is NaN).
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.inputs import check_ppo_inputs
from nanopairwise import losses

KL_KINDS = {None: 0, "k1": 1, "k2": 2, "k3": 3}   # KL_KIND constexpr: 0 = no KL term
BLOCK = 1024                                       # tokens per program
N_PARTIALS = 9   # per block: mask sum, pg, kl, v, clip count, approx-kl, ratio, vf clip count, ratio max
PARTIALS_ROW = tl.constexpr(N_PARTIALS)            # the same, readable inside a jit function (a constexpr)


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (libdevice.expm1 does not run in the interpreter):
    Horner form of the Taylor series for |x| < 0.5 (truncation x^9/9! < 1.1e-8 |x|), else exp - 1."""
    p = 1 + x / 7 * (1 + x / 8)
    p = x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6 * p)))))
    return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def _load(ptr, offs, in_bounds):
    return tl.load(ptr + offs, mask=in_bounds, other=0).to(tl.float32)


@triton.jit
def _token_terms(lp_ptr, old_lp_ptr, adv_ptr, mask_ptr, ref_lp_ptr, v_ptr, old_v_ptr, ret_ptr, offs,
                 in_bounds, ratio_lo, ratio_hi, value_clip,
                 KL_KIND: tl.constexpr, HAS_VALUE: tl.constexpr):
    """Per-token terms shared by forward and backward (the compiler drops what a caller ignores)."""
    # 1. policy: ratio, the two surrogate branches and their derivative w.r.t. lp
    lp = _load(lp_ptr, offs, in_bounds)
    m = _load(mask_ptr, offs, in_bounds)                   # 0 out of bounds: no contribution
    adv = _load(adv_ptr, offs, in_bounds)
    log_ratio = lp - _load(old_lp_ptr, offs, in_bounds)
    ratio = tl.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    w = tl.where(pg1 > pg2, 1.0, tl.where(pg1 == pg2, 0.5, 0.0))       # torch.maximum's split
    inside = ((ratio >= ratio_lo) & (ratio <= ratio_hi)).to(tl.float32)  # torch.clamp's pass
    dpg = -adv * ratio * (w + (1.0 - w) * inside)
    # 2. KL to the reference policy, log r = ref - lp (losses.kl_estimate)
    kl = tl.zeros_like(lp)
    dkl = tl.zeros_like(lp)
    if KL_KIND != 0:
        log_r = _load(ref_lp_ptr, offs, in_bounds) - lp
        if KL_KIND == 1:
            kl = -log_r
            dkl = tl.full(lp.shape, 1.0, tl.float32)
        elif KL_KIND == 2:
            kl = 0.5 * log_r * log_r
            dkl = -log_r
        else:
            kl = _expm1(log_r) - log_r
            dkl = 1.0 - tl.exp(log_r)
    # 3. clipped value loss: the two branches and d max(vl1, vl2) / d v
    vl1 = tl.zeros_like(lp)
    vl2 = tl.zeros_like(lp)
    dvl = tl.zeros_like(lp)
    if HAS_VALUE:
        v = _load(v_ptr, offs, in_bounds)
        old_v = _load(old_v_ptr, offs, in_bounds)
        ret = _load(ret_ptr, offs, in_bounds)
        dv = v - old_v
        v_clipped = old_v + tl.minimum(tl.maximum(dv, -value_clip), value_clip)
        vl1 = (v - ret) * (v - ret)
        vl2 = (v_clipped - ret) * (v_clipped - ret)
        w_v = tl.where(vl1 > vl2, 1.0, tl.where(vl1 == vl2, 0.5, 0.0))
        inside_v = ((dv >= -value_clip) & (dv <= value_clip)).to(tl.float32)
        dvl = 2.0 * (w_v * (v - ret) + (1.0 - w_v) * inside_v * (v_clipped - ret))
    return m, log_ratio, ratio, pg1, pg2, dpg, kl, dkl, vl1, vl2, dvl


@triton.jit
def _ppo_loss_fwd_kernel(
    lp_ptr,                   # (N,) logprobs, any float dtype
    old_lp_ptr,               # (N,) old_logprobs
    adv_ptr,                  # (N,) advantages
    mask_ptr,                 # (N,) mask weights, float or integer (bool viewed as uint8)
    ref_lp_ptr,               # (N,) ref_logprobs; not read when KL_KIND == 0
    v_ptr,                    # (N,) values; the three value pointers are not read unless HAS_VALUE
    old_v_ptr,                # (N,) old_values
    ret_ptr,                  # (N,) returns
    partial_ptr,              # (P, N_PARTIALS) fp32 out: this block's sums and ratio max
    N,                        # number of tokens
    ratio_lo,                 # 1 - clip_low
    ratio_hi,                 # 1 + clip_high
    value_clip,               # c: |v - old_v| beyond it is clipped
    KL_KIND: tl.constexpr,    # 0 no KL term, 1 k1, 2 k2, 3 k3
    HAS_VALUE: tl.constexpr,  # clipped value loss on or off
    BLOCK: tl.constexpr,      # tokens per program
):
    # 1. this program's tokens and their elementwise terms
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < N
    m, log_ratio, ratio, pg1, pg2, dpg, kl, dkl, vl1, vl2, dvl = _token_terms(
        lp_ptr, old_lp_ptr, adv_ptr, mask_ptr, ref_lp_ptr, v_ptr, old_v_ptr, ret_ptr, offs, in_bounds,
        ratio_lo, ratio_hi, value_clip, KL_KIND, HAS_VALUE)
    # 2. masked partial sums, one fp32 per quantity, and the max ratio over counted tokens
    out = partial_ptr + pid * PARTIALS_ROW
    tl.store(out + 0, tl.sum(m, axis=0))
    tl.store(out + 1, tl.sum(tl.maximum(pg1, pg2) * m, axis=0))
    tl.store(out + 2, tl.sum(kl * m, axis=0))
    tl.store(out + 3, tl.sum(tl.maximum(vl1, vl2) * m, axis=0))
    tl.store(out + 4, tl.sum(tl.where(pg2 > pg1, m, 0.0), axis=0))
    tl.store(out + 5, tl.sum((_expm1(log_ratio) - log_ratio) * m, axis=0))
    tl.store(out + 6, tl.sum(ratio * m, axis=0))
    tl.store(out + 7, tl.sum(tl.where(vl2 > vl1, m, 0.0), axis=0))
    tl.store(out + 8, tl.max(tl.where(m > 0, ratio, float("-inf")), axis=0))


@triton.jit
def _ppo_loss_bwd_kernel(
    lp_ptr,                   # (N,) logprobs, any float dtype
    old_lp_ptr,               # (N,) old_logprobs
    adv_ptr,                  # (N,) advantages
    mask_ptr,                 # (N,) mask weights, float or integer (bool viewed as uint8)
    ref_lp_ptr,               # (N,) ref_logprobs; not read when KL_KIND == 0
    v_ptr,                    # (N,) values; the three value pointers are not read unless HAS_VALUE
    old_v_ptr,                # (N,) old_values
    ret_ptr,                  # (N,) returns
    coef_ptr,                 # (3,) fp32: g_pg / M, g_kl / M, g_v / (2 M)
    dlp_ptr,                  # (N,) out: d/d logprobs, in logprobs' dtype
    dv_ptr,                   # (N,) out: d/d values, in values' dtype; not written unless HAS_VALUE
    N,                        # number of tokens
    ratio_lo,                 # 1 - clip_low
    ratio_hi,                 # 1 + clip_high
    value_clip,               # c
    KL_KIND: tl.constexpr,    # 0 no KL term, 1 k1, 2 k2, 3 k3
    HAS_VALUE: tl.constexpr,  # clipped value loss on or off
    BLOCK: tl.constexpr,      # tokens per program
):
    # 1. recompute the elementwise terms (nothing but the inputs was saved)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < N
    m, log_ratio, ratio, pg1, pg2, dpg, kl, dkl, vl1, vl2, dvl = _token_terms(
        lp_ptr, old_lp_ptr, adv_ptr, mask_ptr, ref_lp_ptr, v_ptr, old_v_ptr, ret_ptr, offs, in_bounds,
        ratio_lo, ratio_hi, value_clip, KL_KIND, HAS_VALUE)
    # 2. chain rule with the upstream scalars, already divided by M
    g_pg = tl.load(coef_ptr + 0)
    g_kl = tl.load(coef_ptr + 1)
    g_v = tl.load(coef_ptr + 2)
    tl.store(dlp_ptr + offs, m * (g_pg * dpg + g_kl * dkl), mask=in_bounds)
    if HAS_VALUE:
        tl.store(dv_ptr + offs, m * g_v * dvl, mask=in_bounds)


def _kernel_inputs(logprobs, values, old_logprobs, advantages, mask, ref_logprobs, old_values, returns):
    """The eight input pointers in kernel order; an absent optional input is stood in for by
    logprobs, which the kernel then never reads (its constexpr flag is off)."""
    absent = (logprobs,) * 3
    return (logprobs, old_logprobs, advantages, mask, logprobs if ref_logprobs is None else ref_logprobs,
            *(absent if values is None else (values, old_values, returns)))


class PPOLossFunction(torch.autograd.Function):
    """(pg_loss, kl_loss, v_loss, clipfrac, approx_kl, ratio_mean, ratio_max, vf_clipfrac) of flat,
    contiguous (N,) inputs; differentiable in logprobs and values only."""

    @staticmethod
    def forward(ctx, logprobs, values, old_logprobs, advantages, mask, ref_logprobs, old_values, returns,
                clip_low, clip_high, kl_kind, value_clip):
        n = logprobs.numel()
        grid = (max(triton.cdiv(n, BLOCK), 1),)          # one program even for N = 0: sums are 0
        partials = torch.empty(grid[0], N_PARTIALS, device=logprobs.device, dtype=torch.float32)
        inputs = (logprobs, values, old_logprobs, advantages, mask, ref_logprobs, old_values, returns)
        scalars = (n, 1.0 - clip_low, 1.0 + clip_high, value_clip)
        _ppo_loss_fwd_kernel[grid](*_kernel_inputs(*inputs), partials, *scalars,
                                   KL_KIND=kl_kind, HAS_VALUE=values is not None, BLOCK=BLOCK)
        sums = partials[:, :N_PARTIALS - 1].sum(0)       # (8,)
        count = sums[0]
        means = sums[1:] / count.clamp(min=1.0)          # pg, kl, v, clip, approx-kl, ratio, vf clip
        ratio_max = partials[:, -1].max()
        ratio_max = torch.where(torch.isneginf(ratio_max), torch.zeros_like(ratio_max), ratio_max)
        ctx.save_for_backward(*inputs)                   # references to the inputs, no new memory
        ctx.count, ctx.grid, ctx.scalars, ctx.kl_kind = count, grid, scalars, kl_kind
        stats = (means[3], means[4], means[5], ratio_max, means[6])
        ctx.mark_non_differentiable(*stats)
        return (means[0], means[1], 0.5 * means[2], *stats)

    @staticmethod
    @once_differentiable                                 # the kernel's backward builds no graph
    def backward(ctx, g_pg, g_kl, g_v, *_stats_grads):
        inputs = ctx.saved_tensors
        logprobs, values = inputs[:2]
        coef = torch.stack([g_pg, g_kl, 0.5 * g_v]).float() / ctx.count.clamp(min=1.0)   # (3,)
        dlp = torch.empty_like(logprobs)
        dv = torch.empty_like(values) if values is not None else None
        _ppo_loss_bwd_kernel[ctx.grid](*_kernel_inputs(*inputs), coef, dlp, dlp if dv is None else dv,
                                       *ctx.scalars, KL_KIND=ctx.kl_kind, HAS_VALUE=values is not None,
                                       BLOCK=BLOCK)
        return (dlp, dv) + (None,) * 10


def ppo_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, ref_logprobs=None,
             kl_coef=0.0, kl_estimator="k3", values=None, old_values=None, returns=None, value_clip=0.2,
             vf_coef=0.5) -> losses.PPOLoss:
    """Fused losses.ppo_loss_ref: same arguments, same PPOLoss (fp32 scalars, statistics detached)."""
    # 1. check the inputs
    named = dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                 ref_logprobs=ref_logprobs, values=values, old_values=old_values, returns=returns)
    check_ppo_inputs(named, kl_estimator)
    # 2. flat contiguous views (a copy only when an input is not contiguous); data is detached
    flat = {k: (None if x is None else x.contiguous().reshape(-1)) for k, x in named.items()}
    data = [None if flat[k] is None else flat[k].detach()
            for k in ("old_logprobs", "advantages", "mask", "ref_logprobs", "old_values", "returns")]
    if data[2].dtype == torch.bool:
        data[2] = data[2].view(torch.uint8)               # same bytes; Triton reads it as 0/1
    # 3. fused forward; loss is put together here so autograd routes its gradient to the three terms
    kl_kind = KL_KINDS[kl_estimator if ref_logprobs is not None else None]
    pg_loss, kl_loss, v_loss, *stats = PPOLossFunction.apply(
        flat["logprobs"], flat["values"], *data, float(clip_low), float(clip_high), kl_kind,
        float(value_clip))
    loss = pg_loss + kl_coef * kl_loss + vf_coef * v_loss
    return losses.PPOLoss(loss, pg_loss, v_loss, kl_loss, *stats)
