"""One PPO step of train_ppo.py, per rank on its share of the global batch (B = prompts x K rows, P
prompt and R response tokens, the letters of docs/DESIGN.md §6): make_experience (steps 1-4),
then ppo_update (step 5); check_lengths, the inputs' lengths checked before any model loads;
build_critic, the critic's start.

  1. sample K responses for each prompt of the step with the KV-cache rollout engine (layouts.sample)
  2. score them (reward.score_responses), minus --truncation-penalty for a response without EOS
  3. old and reference log-probs of the sampled tokens and the critic's values (a forward each)
  4. per-token reward -kl_coef * k1 on every token plus the score on the last token; GAE;
     advantages whitened over the global batch (all ranks); --advantage-estimator grpo | rloo:
     no critic, the prompt's other K - 1 samples are the baseline (losses.estimate_advantages).
     Then times min(pi_old / pi_rollout, ROLLOUT_IS_CAP) per token: truncated importance sampling
     (verl's TIS) for the rollout engine, whose arithmetic (bf16 snapshot, compiled kernels:
     decode.py) differs from the training forward's; PPO's clipped objective is linear in the
     advantage, so this weights each token's policy-gradient term. The gap is logged
     (rollout/logprob_gap, _max)
  5. --ppo-epochs passes of --minibatches minibatches: clipped surrogate + clipped value loss
     through the fused PPO-loss kernel (ops.ppo_loss), one backward, a finite check, the steps

The step reads train_ppo.py's flags (`args`) and what the run fixed at its start (RunState).
"""

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from nanopairwise import batching, checkpoint, lora, losses, ops, ppo_checkpoint
from nanopairwise.common import clock
from nanopairwise.distributed import clip_grad_norm, unwrap
from nanopairwise.guards import check_finite_over_ranks, check_length
from nanopairwise.layouts import (JudgeTemplate, Sampling, critic_inputs, encode_pair, encode_prompt, encode_single,
                                  sample)
from nanopairwise.reward import RewardConfig, initial_mean_score, score_responses
from nanopairwise.scalar_head import ScalarHeadModel, critic_values

ROLLOUT_IS_CAP = 2.0  # truncated importance sampling (step 4), verl's default cap


@dataclass
class RunState:
    """What the run works out after parsing; `args` stays the command line (and get_args' defaults)."""
    policy: str                          # the initial policy's directory (--policy, or the task's SFT policy)
    prompts: str                         # RL prompts JSONL (--prompts, or the task's)
    eval_prompts: str                    # held-out prompts JSONL (--eval-prompts, or the task's), or None
    sampling: Sampling                   # --max-new-tokens, --temperature, --top-p
    policy_dir: str = None               # where the policy's weights load from (the checkpoint's on --resume)
    rm_dir: str = None                   # the reward model's directory (--judge, or --bt-rm)
    has_judge: bool = None               # a judge at --judge (optional for --reward bt, bt-anchor)
    judge_template: JudgeTemplate = None  # the judge's text layout (its rm_config.json)
    reward: RewardConfig = None          # how a response is scored (nanopairwise/reward.py)
    anchor_scores: dict = None           # bt-anchor: r(x, y*) per anchor, scored once for the run
    lr: float = None                     # --lr, or the default of the policy's regime
    critic_lr: float = None              # --critic-lr, or the default of the critic's regime


def resolve_lrs(args, policy_lm, critic_lm):
    """(policy lr, critic lr): --lr / --critic-lr, else lora.DEFAULT_LR of each model's regime (tiny/full/lora);
    the critic's is None without a critic (critic_lm None)."""
    lr = args.lr if args.lr is not None else lora.DEFAULT_LR[lora.regime(policy_lm)]["policy"]
    critic_lr = (None if critic_lm is None else args.critic_lr if args.critic_lr is not None
                 else lora.DEFAULT_LR[lora.regime(critic_lm)]["critic"])
    return lr, critic_lr


def build_critic(args, run, state: dict, dtype, device):
    """The critic: from --resume, else the reward model's trunk with a fresh head whose bias is the
    initial policy's mean score (--critic-bias init-mean; zero: V = 0, which puts a position term
    lambda^(L-1-t) * score in the first advantages), or with --no-critic-fresh-head the BT model's
    own head rescaled to the reward's units (InstructGPT, OpenRLHF). With --critic-lora-rank the
    trunk is frozen under rank-R adapters (alpha 2R) and only they and the head train; on --resume
    both come back from the trainer state (the base is the reward model again). None for grpo / rloo."""
    if args.critic == "none":
        return None
    ckpt = os.path.join(args.out_dir, "checkpoint")
    if args.resume and not args.critic_lora_rank:
        return ScalarHeadModel.from_pretrained(os.path.join(ckpt, "critic"), dtype, device)
    rm_head = args.reward == "bt" and args.critic == "standard" and not args.critic_fresh_head
    critic = ScalarHeadModel.from_pretrained(run.rm_dir, dtype, device, new_head=not rm_head)
    if rm_head and run.reward.norm:
        critic.normalize_head_(run.reward.norm["mean"], run.reward.norm["std"])   # V in the reward's units
    elif not rm_head and args.critic_bias == "init-mean":
        critic.set_bias_(initial_mean_score(state["reward_norm"], run.reward, args.truncation_penalty))
    if args.critic_lora_rank:
        lora.apply_lora(critic.lm, args.critic_lora_rank, 2.0 * args.critic_lora_rank)
        if args.resume:
            lora.load_trainable_state_dict(critic, state["critic_trainable"],
                                           os.path.join(ckpt, ppo_checkpoint.TRAINER_STATE))
    return critic


class Models(NamedTuple):
    policy: nn.Module   # PolicyLogprobs, trained (DDP-wrapped or FSDP-sharded under torchrun)
    ref: nn.Module      # the frozen reference policy of the KL term
    critic: nn.Module   # ScalarHeadModel, trained (wrapped like the policy); None with grpo / rloo
    rm: nn.Module       # the frozen reward model: the judge (pairwise) or the BT model
    judge: nn.Module = None   # the judge, for anchors and held-out win rates (the rm for pairwise; None if absent)


@dataclass
class Experience:
    """One rank's rollouts of a step with everything the update reads: B = prompts x K rows."""
    input_ids: torch.Tensor        # (B, P + R) prompt (left-padded) then response
    attention_mask: torch.Tensor   # (B, P + R)
    response_mask: torch.Tensor    # (B, R) float, 1 = sampled token (EOS included)
    old_logprobs: torch.Tensor     # (B, R) of the policy that sampled, 0 where masked
    ref_logprobs: torch.Tensor     # (B, R) of the reference policy
    old_values: torch.Tensor       # (B, R) the critic's values at sampling time; None: no critic
    advantages: torch.Tensor       # (B, R) GAE, whitened over the global batch (or grpo / rloo's)
    returns: torch.Tensor          # (B, R) lambda-returns, the critic's targets; None: no critic
    critic_ids: torch.Tensor       # (B, P' + R) the critic's prefix (left-padded to P') then response
    critic_mask: torch.Tensor      # (B, P' + R)
    critic_prefix_len: int         # P': the value of response token t is read at P' - 1 + t

    def select(self, rows: torch.Tensor) -> "Experience":
        """The experience of `rows` (a minibatch)."""
        return Experience(**{k: v[rows] if torch.is_tensor(v) else v for k, v in vars(self).items()})


def check_lengths(prompts, tok, args, run):
    """Every sequence a model will read fits its max_position_embeddings, counting --max-new-tokens
    for the response (twice when a best-of-N anchor is still to be sampled). Prompts are never cut:
    one too long is refused by file:line before any model is loaded (else: out of memory)."""
    limit = lambda path: checkpoint.read_config(path)["max_position_embeddings"]
    policy_max, rm_max = limit(run.policy_dir), limit(run.rm_dir)
    judge_max = limit(args.judge) if run.has_judge else None
    hint = "shorten the prompt / anchor / principle or lower --max-new-tokens"
    R = args.max_new_tokens
    for p in prompts:
        anchor, anchor_len = p.anchor or "", 0 if p.anchor else R
        check_length(len(encode_prompt(tok, p.prompt)) + R, policy_max, p.source, "prompt + response", hint)
        pair = encode_pair(tok, run.judge_template, p.principle, p.prompt, anchor, "")
        if judge_max:
            check_length(len(pair) + anchor_len + R, judge_max, p.source, "the judge's input", hint)
        if judge_max and args.reward == "pairwise-group":              # two rollouts in one judge input
            two = len(encode_pair(tok, run.judge_template, p.principle, p.prompt, "", "")) + 2 * R
            check_length(two, judge_max, p.source, "the judge's input (two rollouts)", hint)
        template = run.reward.template
        critic = (template.pair_ids(tok, p.principle, p.prompt, tok.encode(anchor)) if args.critic == "pairwise"
                  else template.prefix_ids(tok, p.principle, p.prompt))   # as critic_inputs builds it
        if args.critic != "none":
            check_length(len(critic) + anchor_len + R, rm_max, p.source, "the critic's input", hint)
        if not args.reward.startswith("pairwise"):  # the BT model scores prefix + response + end of turn, anchor
            single = lambda y: len(encode_single(tok, template, p.principle, p.prompt, y))
            check_length(single("") + R, rm_max, p.source, "the reward model's input", hint)
            if args.reward == "bt-anchor" and p.anchor:
                check_length(single(p.anchor), rm_max, p.source, "the reward model's input (anchor)", hint)


# ----------------------------------------------------------------------------------------------
# one PPO step: make_experience (steps 1-4 of the docstring), then ppo_update (step 5)


@torch.no_grad()
def make_experience(step_prompts, models, tok, args, run, device, generator):
    """Steps 1-4 for this rank's prompts (K samples each): (Experience, stats)."""
    policy, ref, critic, rm = (m and unwrap(m) for m in models[:4])  # no DDP wrapper needed without grads
    policy.eval()
    K = args.samples_per_prompt
    prompts = [p for p in step_prompts for _ in range(K)]          # one per row: B = len(step_prompts) * K
    # 1. sample K responses per prompt (the KV-cache rollout engine)
    t0 = clock(device)
    rollout = sample(policy, tok, [p.prompt for p in prompts], run.sampling, generator)
    t1 = clock(device)
    # 2. score them (B,); a response cut off at --max-new-tokens without EOS loses --truncation-penalty
    scores, win, judge_cost = score_responses(prompts, rollout.texts(tok), rm, tok, run.reward,
                                              anchor_scores=run.anchor_scores)
    scores = scores.to(device) - args.truncation_penalty * (~rollout.ended).float()
    t2 = clock(device)
    # 3. old and reference log-probs, and the critic's values: a forward each, (B, R). The rollout's
    #    own log-probs are not reused: the old log-probs come from the same code path (kernel, head,
    #    batch layout) as the new ones of step 5, so the ratio is exactly 1 before the first update
    input_ids, attention_mask = rollout.sequences()                 # (B, P + R)
    response_mask = rollout.response_mask.float()                   # (B, R)
    old_logprobs = policy(input_ids, attention_mask, response_mask, args.temperature).logprobs
    ref_logprobs = ref(input_ids, attention_mask, response_mask, args.temperature).logprobs
    critic_ids = critic_mask = old_values = None                     # grpo / rloo: no critic
    critic_prefix_len = 0
    if critic is not None:
        critic_ids, critic_mask, critic_prefix_len = critic_inputs(
            tok, run.reward.template, prompts, rollout.response_ids, rollout.response_mask, args.critic == "pairwise")
        old_values = critic_values(critic, critic_ids, critic_mask, critic_prefix_len, response_mask.size(1))
        old_values = old_values * response_mask
    t3 = clock(device)
    # 4. per-token rewards (B, R): -kl_coef * k1 on every token, the score on the last; then GAE (advantages
    #    with --lam, the critic's targets with --value-lam) or grpo / rloo; whitening over all ranks' tokens
    kl = losses.kl_estimate(old_logprobs, ref_logprobs, "k1") * response_mask
    rewards = losses.shape_rewards(scores, response_mask, kl if args.kl_mode == "reward" else None, args.kl_coef)
    advantages, returns = losses.estimate_advantages(args.advantage_estimator, rewards, old_values, response_mask, K,
                                                     args.gamma, args.lam, args.value_lam, distributed=True)
    # how much of the advantages is GAE's position shape lambda^(L-1-t) (a critic that misses the mean score)
    position_corr = losses.position_correlation(advantages, response_mask, args.lam)
    # the tokens came from the rollout engine's pi, not pi_old (bf16 snapshot, compiled kernels): truncated IS
    advantages = advantages * (old_logprobs - rollout.logprobs).exp().clamp(max=ROLLOUT_IS_CAP)
    policy.train()
    experience = Experience(input_ids, attention_mask, response_mask, old_logprobs, ref_logprobs, old_values,
                            advantages, returns, critic_ids, critic_mask, critic_prefix_len)
    # the sampler's arithmetic (bf16 snapshot, compiled kernels: rollout.py) against the training forward's
    gap = (rollout.logprobs - old_logprobs).abs() * response_mask
    score_var = losses.masked_moments(scores, torch.ones_like(scores), distributed=True)[1]   # over all ranks' rows
    means = {"reward/score": scores.mean(), "reward/score_std": score_var.sqrt(),
             "rollout/kl": kl.sum(1).mean(), "rollout/length": response_mask.sum(1).mean(),
             "rollout/logprob_gap": gap.sum() / response_mask.sum().clamp(min=1), "rollout/logprob_gap_max": gap.max(),
             "rollout/eos_rate": rollout.ended.float().mean(), "tokens": response_mask.sum()}
    if win is not None:
        means["rollout/win_rate"] = win.mean().to(device)
    if critic is not None:
        means["critic/adv_position_corr"] = position_corr
    stats = dict(zip(means, torch.stack([v.float() for v in means.values()]).tolist()))   # one host sync
    stats.update({"tokens": int(stats["tokens"]), "perf/rollout_s": t1 - t0, "perf/score_s": t2 - t1,
                  "perf/forward_s": t3 - t2, "perf/rollout_compile_s": rollout.compile_s, **judge_cost})
    return experience, stats


def ppo_update(experience, models, optimizers, args, run, generator, step=0, last_saved=None, warmup=False):
    """Step 5: --ppo-epochs passes of --minibatches shuffled minibatches over this rank's experience.
    Before each optimizer step: loss and both gradient norms finite (one host sync), else stop.
    With `warmup` (--critic-warmup-steps) only the critic learns: the policy's forward builds no
    graph and its optimizer does not step, so its weights do not change."""
    policy, critic = models.policy, models.critic
    B, R = experience.response_mask.shape
    per_minibatch = {}                                                 # key -> one 0-d tensor per minibatch
    for _ in range(args.ppo_epochs):
        for rows in batching.iterate_minibatches(B, B // args.minibatches, generator):   # equal sizes: train_ppo.main checks
            minibatch = experience.select(rows.to(experience.input_ids.device))
            response_mask = minibatch.response_mask                                   # (b, R)
            # 5a. new log-probs (and entropy) of the sampled tokens, new values: (b, R)
            with torch.set_grad_enabled(not warmup):
                new = policy(minibatch.input_ids, minibatch.attention_mask, response_mask, args.temperature,
                             entropy=True)
            values = None if critic is None else critic_values(critic, minibatch.critic_ids, minibatch.critic_mask,
                                                                experience.critic_prefix_len, R)
            # 5b. clipped surrogate + clipped value loss (+ k3 KL with --kl-mode loss), one fused op
            ref_logprobs = minibatch.ref_logprobs if args.kl_mode == "loss" else None
            terms = ops.ppo_loss(new.logprobs, minibatch.old_logprobs, minibatch.advantages, response_mask,
                                 clip_low=args.clip_low, clip_high=args.clip_high, ref_logprobs=ref_logprobs,
                                 kl_coef=args.kl_coef if ref_logprobs is not None else 0.0, values=values,
                                 old_values=minibatch.old_values, returns=minibatch.returns, value_clip=args.value_clip,
                                 vf_coef=args.vf_coef)
            # 5c. one backward of pg + vf_coef * v through both models, clip, check (means over ranks, so
            #     every rank stops alike; the norms are global already), step
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            norms = [clip_grad_norm(m, args.grad_clip, terms.loss.device) for m in (policy, critic) if m is not None]
            check_finite_over_ranks(step + 1, dict(zip(("policy loss (pg)", "critic loss (v)", "policy grad norm",
                                                        "critic grad norm"), (terms.pg_loss, terms.v_loss, *norms))),
                                    f"--lr {run.lr:g} (policy), --critic-lr {run.critic_lr or 0:g} and --vf-coef "
                                    "(critic), "
                                    "--grad-clip, --dtype", last_saved)
            for opt in optimizers[1:] if warmup else optimizers:    # [policy, critic]
                opt.step()
            row = {"loss/pg": terms.pg_loss, "loss/v": terms.v_loss, "loss/kl": terms.kl_loss,
                   "ppo/clipfrac": terms.clipfrac, "ppo/approx_kl": terms.approx_kl, "ppo/ratio_max": terms.ratio_max,
                   "policy/entropy": losses.masked_mean(new.entropy.detach(), response_mask),
                   "ppo/ratio_mean": terms.ratio_mean, "ppo/vf_clipfrac": terms.vf_clipfrac}
            if values is not None:
                row["critic/explained_var"] = losses.explained_variance(values.detach(), minibatch.returns,
                                                                        response_mask)
            for k, v in row.items():
                per_minibatch.setdefault(k, []).append(v.detach().float())     # no host sync per minibatch
    # the largest ratio of the update (the divergence guard reads it), the mean of everything else; one host sync
    reduced = [torch.stack(v).max() if k == "ppo/ratio_max" else torch.stack(v).mean() for k, v in per_minibatch.items()]
    return dict(zip(per_minibatch, torch.stack(reduced).tolist()))


