"""Reference math for RLHF, in plain PyTorch and fp32: the spec every kernel is tested against.

Each function here is written for clarity, not speed. `kernels/<op>.py` implements the same
function fused in Triton and must match it forward and backward; `nanopairwise/ops.py` picks
one or the other at run time. Nothing in the training scripts computes these quantities any
other way.

Conventions: `mask` tensors are 1 (or True) where a token counts (a sampled response token) and
0 on padding / prompt; all means over tokens are masked token-means (sum(x * mask) / sum(mask)).
Shapes: N flattened tokens, V vocabulary, B batch, T time (every letter: docs/DESIGN.md §6).

Contents
- token_logprobs_ref: log softmax(z / T)[target], entropy of softmax(z / T), KL estimate (token_kl)
- kl_estimate: Schulman's k1 / k2 / k3 estimators of KL(pi || pi_ref) from sampled log-probs;
  sequence_kl sums one over a response; exact_kl: the full-vocabulary KL of two distributions
- ppo_loss_ref: clipped surrogate (separate low/high clip) + optional KL term + clipped value loss
- gae: generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438)
- group_advantages_ref: critic-free GRPO / RLOO advantages over each prompt's K samples;
  estimate_advantages: the advantages (and critic targets) of --advantage-estimator
- masked_mean / masked_whiten (optionally over all DDP ranks) / explained_variance;
  position_correlation: how much of the advantages is GAE's lambda^(L-1-t) position shape
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

IGNORE_INDEX = -100  # a target equal to this gets log-prob 0, entropy 0, KL 0 and no gradient

# ----------------------------------------------------------------------------------------------
# masked reductions


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask); 0 when the mask is empty (never NaN)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, distributed: bool = False):
    """Mean and population variance (scalars, fp32) of the masked entries of x; with
    `distributed=True` of the union of every rank's entries: one all-reduce of (count, sum x,
    sum x^2), then mean = s1 / n and var = s2 / n - mean^2."""
    m = mask.to(torch.float32)
    xf = x.float()
    stats = torch.stack([m.sum(), (xf * m).sum(), (xf * xf * m).sum()])
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    count, s1, s2 = stats[0].clamp(min=1.0), stats[1], stats[2]
    mean = s1 / count
    return mean, (s2 / count - mean * mean).clamp(min=0.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, distributed: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0.

    With `distributed=True` the mean and variance are those of the union of every rank's
    masked entries (all-reduce of count, sum, sum of squares), so whitening over the global
    batch equals single-process whitening of the concatenated batch. Variance is the biased
    (population) one, as in most PPO implementations.
    """
    m = mask.to(torch.float32)
    xf = x.float()
    mean, var = masked_moments(xf, m, distributed)
    out = (xf - mean) * torch.rsqrt(var + eps)
    return (out * m).to(x.dtype)


def position_correlation(advantages: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """Correlation over the masked tokens of the advantages with lam^(L-1-t), L the response's
    length: the shape GAE gives a sequence score s that no value predicts, A_t = lam^(L-1-t) s.
    Near 1 when the advantages are that artefact (a critic starting at V = 0 under a reward
    averaging s > 0), near 0 when they carry only deviations from what the critic expects."""
    m = mask.to(torch.float32)
    t = torch.arange(m.size(1), device=m.device, dtype=torch.float32)
    shape = lam ** (m.sum(1, keepdim=True) - 1 - t).clamp(min=0)                      # (B, T)
    a_mean, a_var = masked_moments(advantages, m)
    s_mean, s_var = masked_moments(shape, m)
    cov = masked_mean((advantages.float() - a_mean) * (shape - s_mean), m)
    return cov / (a_var * s_var).sqrt().clamp(min=1e-12)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked entries (1 = perfect critic)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1.0 - var_d / var_r.clamp(min=1e-8)


# ----------------------------------------------------------------------------------------------
# token log-probs, entropy, KL


class TokenLogprobs(NamedTuple):
    logprobs: torch.Tensor            # (N,) fp32, <= 0; 0 at ignored targets
    entropy: Optional[torch.Tensor]   # (N,) fp32 or None
    kl: Optional[torch.Tensor]        # (N,) fp32 or None


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    With log r = ref_logprobs - logprobs (http://joschu.net/blog/kl-approx.html):
      k1 = -log r                 unbiased, can be negative, high variance
      k2 = (log r)^2 / 2          biased, low variance, >= 0
      k3 = (r - 1) - log r        unbiased, low variance, >= 0
    Gradients flow into `logprobs` (and `ref_logprobs` if it requires grad).
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r * log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """(B,) KL of each sampled response to the reference: kl_estimate summed over its tokens
    (mask (B, R), 1 = response token); its mean over responses estimates KL(pi || pi_ref)."""
    return (kl_estimate(logprobs, ref_logprobs, kind) * mask).sum(1)


def exact_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of each position's whole next-token distribution, not a sampled estimate:
    sum_v pi(v) (log pi(v) - log pi_ref(v)) over the last dim of two log-distributions (..., V).
    Tokens with pi(v) = 0 contribute 0; >= 0 up to rounding."""
    p = logprobs.exp()
    terms = torch.where(p > 0, p * (logprobs - ref_logprobs), torch.zeros_like(p))
    return terms.sum(-1)


def token_kl(logprobs: torch.Tensor, ref_logprobs: Optional[torch.Tensor], valid: torch.Tensor,
             kind: str = "k3") -> Optional[torch.Tensor]:
    """Per-token kl_estimate(logprobs, ref_logprobs), 0 where `valid` is False; None without a
    reference. The KL output of token_logprobs_ref and of the fused kernels (which compute it after
    their kernel, so autograd folds its gradient into the log-prob's)."""
    if ref_logprobs is None:
        return None
    kl = kl_estimate(logprobs, ref_logprobs.float(), kind)
    return torch.where(valid, kl, torch.zeros_like(kl))


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       ref_logprobs: Optional[torch.Tensor] = None, entropy: bool = False,
                       kl_estimator: str = "k3", ignore_index: int = IGNORE_INDEX) -> TokenLogprobs:
    """Log-prob of each target under softmax(logits / temperature), plus optional entropy and KL.

    logits (N, V) any float dtype (math in fp32), targets (N,) int64, ref_logprobs (N,) or None.
    With z = logits / T, logZ = logsumexp(z), p = softmax(z):
      logprob = z[target] - logZ                      (clamped to <= 0: it is a log-probability)
      entropy = logZ - sum_v p_v z_v                  (= -sum p log p; -inf logits contribute 0)
      kl      = kl_estimate(logprob, ref_logprobs)    (per token; see kl_estimate)
    At targets equal to `ignore_index` all three are 0 and carry no gradient.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs: logits must be (N, V) and targets (N,); got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    z = logits.float() / temperature                                   # (N, V)
    valid = targets != ignore_index                                      # (N,)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_z = torch.logsumexp(z, dim=-1)                                  # (N,)
    logprobs = z.gather(-1, safe_targets[:, None]).squeeze(-1) - log_z  # (N,)
    logprobs = torch.where(valid, logprobs.clamp(max=0.0), torch.zeros_like(logprobs))
    ent = None
    if entropy:
        p = torch.softmax(z, dim=-1)
        z_finite = torch.where(torch.isfinite(z), z, torch.zeros_like(z))  # 0 * -inf would be NaN
        ent = log_z - (p * z_finite).sum(-1)
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return TokenLogprobs(logprobs, ent, token_kl(logprobs, ref_logprobs, valid, kl_estimator))


# ----------------------------------------------------------------------------------------------
# PPO losses


class PPOLoss(NamedTuple):
    loss: torch.Tensor          # scalar: pg_loss + kl_coef * kl_loss + vf_coef * v_loss
    pg_loss: torch.Tensor       # scalar, clipped surrogate (masked token-mean)
    v_loss: torch.Tensor        # scalar, clipped value loss (0 when no values are given)
    kl_loss: torch.Tensor       # scalar, KL-to-reference term (0 when not used)
    clipfrac: torch.Tensor      # fraction of tokens where the clipped branch was active
    approx_kl: torch.Tensor     # k3 estimate of KL(old || new): mean((ratio - 1) - log ratio)
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    vf_clipfrac: torch.Tensor   # fraction of tokens where the clipped value branch was active


def ppo_loss_ref(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                 ref_logprobs: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", values: Optional[torch.Tensor] = None,
                 old_values: Optional[torch.Tensor] = None, returns: Optional[torch.Tensor] = None,
                 value_clip: float = 0.2, vf_coef: float = 0.5) -> PPOLoss:
    """PPO clipped objective over (B, T) tokens (Schulman et al. 2017, arXiv 1707.06347).

      ratio   = exp(logprobs - old_logprobs)
      pg_loss = mean_mask( max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) )
      kl_loss = mean_mask( kl_estimate(logprobs, ref_logprobs) )        (if ref_logprobs given)
      v_clip  = old_values + clip(values - old_values, -value_clip, value_clip)
      v_loss  = 0.5 * mean_mask( max((values - R)^2, (v_clip - R)^2) )  (if values given)
      loss    = pg_loss + kl_coef * kl_loss + vf_coef * v_loss
    Separate low/high clip ("clip-higher", DAPO arXiv 2503.14476) reduces to the symmetric
    case when they are equal. Statistics are detached.
    """
    m = mask.to(torch.float32)
    lp, old_lp, adv = logprobs.float(), old_logprobs.float(), advantages.float()
    log_ratio = lp - old_lp
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), m)
    zero = pg_loss.new_zeros(())
    kl_loss = zero
    if ref_logprobs is not None:
        kl_loss = masked_mean(kl_estimate(lp, ref_logprobs.float(), kl_estimator), m)
    v_loss, vf_clipfrac = zero, zero
    if values is not None:
        v, old_v, ret = values.float(), old_values.float(), returns.float()
        v_clipped = old_v + (v - old_v).clamp(-value_clip, value_clip)
        vl1, vl2 = (v - ret) ** 2, (v_clipped - ret) ** 2
        v_loss = 0.5 * masked_mean(torch.maximum(vl1, vl2), m)
        vf_clipfrac = masked_mean((vl2 > vl1).float(), m).detach()
    loss = pg_loss + kl_coef * kl_loss + vf_coef * v_loss
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), m)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, m)
        ratio_mean = masked_mean(ratio, m)
        ratio_max = torch.where(m > 0, ratio, torch.full_like(ratio, float("-inf"))).max() if m.any() else zero
    return PPOLoss(loss, pg_loss, v_loss, kl_loss, clipfrac, approx_kl, ratio_mean, ratio_max, vf_clipfrac)


# ----------------------------------------------------------------------------------------------
# advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation over (B, T) response tokens.

    mask marks the response tokens (a contiguous run starting at t = 0 per row). With m the mask,
    values beyond a row's last token are treated as 0 (the episode ends there):
      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
      R_t     = A_t + V_t            (the lambda-return; the critic's regression target)
    Returns (advantages, returns), both zero where mask is 0, fp32, no gradient.
    """
    with torch.no_grad():
        m = mask.to(torch.float32)
        r, v = rewards.float() * m, values.float() * m
        B, T = r.shape
        adv = torch.zeros_like(r)
        last = torch.zeros(B, dtype=r.dtype, device=r.device)           # A_{t+1}
        for t in reversed(range(T)):
            m_next = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            v_next = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
            delta = r[:, t] + gamma * v_next * m_next - v[:, t]
            last = delta + gamma * lam * m_next * last
            adv[:, t] = last
        adv = adv * m
        return adv, (adv + v) * m


ESTIMATORS = ("gae", "grpo", "rloo")  # train_ppo.py --advantage-estimator; only gae has a critic


def group_advantages_ref(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, estimator: str = "grpo",
                         eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages (B, T): each row's return against the other samples of its prompt.

    rewards (B, T) per-token rewards (shape_rewards), mask (B, T) the response tokens; the B rows
    are B / K groups of K = group_size adjacent rows, the K samples of one prompt. With
      R_i = sum_t rewards[i, t]       the row's return: with the KL in the reward (--kl-mode reward)
                                      the score minus beta * the summed k1, else the score alone
      grpo: A_i = (R_i - mean_g R) / (std_g R + eps)           (GRPO, arXiv 2402.03300)
      rloo: A_i = R_i - (sum_g R - R_i) / (K - 1)               (RLOO, arXiv 2402.14740)
                = K / (K - 1) * (R_i - mean_g R)
    where g is row i's group and std_g is the sample (Bessel-corrected) std, every token of the
    response gets its row's A_i: A[i, t] = A_i * mask[i, t]. The KL enters as verl's
    compute_grpo_outcome_advantage / compute_rloo_outcome_advantage (the sum of token_level_rewards,
    which hold the score minus beta * KL with algorithm.use_kl_in_reward) and TRL's RLOOTrainer
    (rlhf_reward = scores - kl_coef * kl.sum(1)) have it: a sequence-level return, not per-token
    returns-to-go (the sum is the return-to-go of the first token; later tokens get the same A_i).
    A group whose returns are all equal gets A = 0 (grpo: 0 / eps). Returns fp32, no gradient.
    """
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"unknown critic-free estimator {estimator!r}; choose grpo or rloo")
    B = rewards.size(0)
    if group_size < 2 or B % group_size:
        raise ValueError(f"group_advantages_ref: {B} rows are not groups of K = {group_size} >= 2 samples")
    with torch.no_grad():
        m = mask.to(torch.float32)
        R = (rewards.float() * m).sum(1).view(B // group_size, group_size)                   # (B / K, K)
        if estimator == "grpo":
            adv = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)
        else:
            adv = R - (R.sum(1, keepdim=True) - R) / (group_size - 1)
        return adv.reshape(B, 1) * m                                                           # (B, T)


def estimate_advantages(estimator: str, rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                        group_size: int, gamma: float = 1.0, lam: float = 0.95, value_lam: float = 0.95,
                        distributed: bool = False):
    """(advantages, returns) (B, T) of a step's rollouts for --advantage-estimator:

      gae   GAE with `lam` for the advantages and with `value_lam` for the critic's lambda-return
            targets (the two lambdas may differ), advantages whitened over the batch
      rloo  group_advantages_ref, whitened over the batch like gae's (so only the baseline differs:
            the other samples' mean instead of the critic); returns None (no critic)
      grpo  group_advantages_ref, not whitened: the group std already normalises each prompt's
            advantages (as in verl and TRL, which whiten GAE's but not GRPO's); returns None
    `distributed`: whitening over the union of all ranks' tokens (masked_whiten)."""
    if estimator == "gae":
        advantages, _ = gae(rewards, values, mask, gamma, lam)
        _, returns = gae(rewards, values, mask, gamma, value_lam)
    elif estimator in ("grpo", "rloo"):
        advantages, returns = group_advantages_ref(rewards, mask, group_size, estimator), None
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if estimator != "grpo":
        advantages = masked_whiten(advantages, mask, distributed=distributed)
    return advantages, returns


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, ref_logprobs: Optional[torch.Tensor] = None,
                              entropy: bool = False, kl_estimator: str = "k3",
                              ignore_index: int = IGNORE_INDEX) -> TokenLogprobs:
    """token_logprobs_ref of the LM head's logits: hidden (N, C) @ weight (V, C)^T -> (N, V).

    The spec for kernels/linear_logprob.py, which computes the same without storing the logits.
    """
    logits = hidden.float() @ weight.float().t()                        # (N, V)
    return token_logprobs_ref(logits, targets, temperature, ref_logprobs, entropy, kl_estimator, ignore_index)


# ----------------------------------------------------------------------------------------------
# rewards


def transform_score(win_prob: torch.Tensor, kind: str = "prob", eps: float = 1e-4) -> torch.Tensor:
    """Map a win probability P(y > y*) in [0, 1] to a reward: `prob` (as is), `centered`
    (P - 0.5) or `logit` (log P / (1 - P), clamped to [eps, 1 - eps])."""
    if kind == "prob":
        return win_prob
    if kind == "centered":
        return win_prob - 0.5
    if kind == "logit":
        p = win_prob.clamp(eps, 1.0 - eps)
        return torch.log(p) - torch.log1p(-p)
    raise ValueError(f"unknown reward transform {kind!r}; choose prob, centered or logit")


def normalize_scores(scores: torch.Tensor, norm: Optional[dict], center: bool = True) -> torch.Tensor:
    """(r - mu) / sigma (`center`), or r / sigma: a score in units of the initial policy's spread.

    The KL coefficient, the value clip and the truncation penalty are in the reward's units, and
    those differ by reward model: a BT score's scale is whatever the RM learned (and its offset is
    arbitrary: `center`), a win probability's spread over the initial policy's samples is ~0.1.
    mu and sigma are the mean and std of the score over rollouts of the initial policy, measured
    once (`norm = {"mean": mu, "std": sigma, ...}`; None: raw scores). Afterwards the initial
    policy's rewards have std 1 (and mean 0 with `center`), as in OpenRLHF's normalize_reward / the
    N+ details' reward normalisation.
    """
    if norm is None:
        return scores
    return (scores - norm["mean"] if center else scores) / max(norm["std"], 1e-8)


def shape_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl_t on every response token, plus the sequence score
    (B,) on its last token (InstructGPT-style, arXiv 2203.02155). Zero where mask is 0."""
    m = mask.to(torch.float32)
    rewards = torch.zeros_like(m) if kl is None else -kl_coef * kl.float() * m
    last = (m.sum(1).long() - 1).clamp(min=0)                                          # (B,)
    rows = torch.arange(m.size(0), device=m.device)
    rewards[rows, last] += scores.float() * (m.sum(1) > 0)
    return rewards
