"""Pairwise PPO (Pairwise-RL, arXiv 2504.04950) and the Bradley-Terry PPO baseline.

    torchrun --standalone --nproc_per_node=2 train_ppo.py      # the main job: the whole built-in pipeline
    python train_ppo.py                                         # the same in one process
    python train_ppo.py --reward bt                             # baseline: BT scalar reward, standard critic
    python train_ppo.py --reward bt-anchor                      # BT model's win probability against the anchor
    python train_ppo.py --reward pairwise-group --advantage-estimator grpo   # critic-free, judged within the group
    python train_ppo.py --policy DIR --judge DIR --prompts rl.jsonl --eval-prompts rl_heldout.jsonl

On the built-in task the main job bootstraps the task if missing (tokenizer, SFT policy, pairs, RL
prompts), trains the judge / BT reward model with train_rm.py if missing, runs PPO, and prints the
held-out metrics before and after (oracle score, oracle and judge win rate against the anchor, KL).

One PPO step (per rank, on its share of the global batch; B = prompts x K rows, P prompt and R response
tokens, the letters of docs/DESIGN.md §6):
  1. sample K responses for each prompt of the step with the KV-cache rollout engine
  2. score them: pairwise -> P(y > y*) from the judge in both orders against the prompt's anchor
     y*, then --reward-transform; bt -> the BT reward (r(x, y) - mu) / sigma; bt-anchor ->
     sigmoid(r(x, y) - r(x, y*)), then --reward-transform
  3. old and reference log-probs of the sampled tokens and the critic's values (a forward each)
  4. per-token reward -kl_coef * k1 on every token plus the score on the last token; GAE;
     advantages whitened over the global batch (all ranks). --advantage-estimator grpo | rloo:
     no critic; each row's return (score - beta * summed k1) against its prompt's other K - 1
     samples (losses.estimate_advantages); --reward pairwise-group: the score is the judge's mean
     win probability against those samples (reward.group_scores)
  5. --ppo-epochs passes of --minibatches minibatches: clipped surrogate + clipped value loss
     through the fused PPO-loss kernel (reference with NANOPAIRWISE_KERNELS=ref)

Our reading of the paper (its public text fixes few details); each is a flag:
  1. Anchor: the prompt's gold answer when the data has one (the built-in task does), else the best
     of --anchor-samples samples of the initial policy ranked by the judge (round robin). Anchors are
     fixed for the run and stored in the checkpoint.
  2. Reward: order-symmetrised win probability (p(y, y*) + 1 - p(y*, y)) / 2 (--no-symmetric: one
     order, half the judge cost), as a probability (--reward-transform prob|centered|logit).
  3. Critic: pairwise, reading (principle, prompt, anchor, partial response), initialised from the
     judge's weights with a fresh zero scalar head (--critic standard: no anchor).
  4. KL: k1 per token inside the reward with fixed beta (--kl-coef); --kl-mode loss instead adds a
     k3 KL term to the policy loss (GRPO-style) and leaves the reward KL-free.
  5. GAE with gamma 1 and lambda 0.95 for the policy; --value-lam sets the critic's lambda-return.
  6. Whitening of advantages over the global batch; no per-prompt reward normalisation.
  7. A response cut off at --max-new-tokens without EOS gets --truncation-penalty subtracted.
  8. Separate AdamW optimisers for policy and critic; a joint backward of pg + vf_coef * v loss.
  9. Judge input: principle, then each response as the policy's own chat turn with its end-of-turn
     token, then the question (nanopairwise/judge.py JudgeTemplate; train_rm.py --question).
  10. --critic-warmup-steps N: the first N steps train only the critic (default 0; the value head
     starts at zero, so the first advantages use V = 0 for the pairwise critic).
Divergence guard (--max-kl, --max-ratio; 0 = off): the run stops with a message when the rollouts'
mean sequence KL to the reference, or the updated policy's (k2, checked before every checkpoint),
exceeds --max-kl (default 10 nats; the built-in main job ends near 0.4), or a token's ratio
pi/pi_old exceeds --max-ratio. Bad inputs, NaNs and faults: docs/FAULTS.md.
The baseline (--reward bt) is standard RLHF PPO: BT scalar reward normalised by its mean mu and std
sigma over rollouts of the initial policy (measured once, kept in the checkpoint; the truncation
penalty is then in those units), standard critic initialised from the reward model with its head
(rescaled to the normalised units; --critic-fresh-head: a zero head), the same KL, GAE, whitening
and losses. --reward bt-anchor separates the judge from the anchor: the BT model's win probability
against the same anchor, bounded and anchor-relative like Pairwise-RL's reward but from a scalar RM,
with the standard critic (trunk of the BT model, fresh head) unless --critic pairwise.
"""

import argparse
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

import train_rm
from nanopairwise import bootstrap, checkpoint, data, lora, losses, ops, ppo_checkpoint, tracking
from nanopairwise.common import (DTYPES, MetricsLogger, Progress, atomic_write_text, clock, derive_seed, dumps_json,
                                 parse_dtype, set_seed)
from nanopairwise.distributed import (all_reduce_sum, barrier, compute_cleanup, compute_init, gathered, get_world_size,
                                      mean_over_ranks, print0, shard_model, unwrap, wrap_data_parallel)
from nanopairwise.evaluation import evaluate_policy
from nanopairwise.guards import (UserError, check_divergence, check_divides, check_finite, check_flag, check_input_file,
                                 check_length, check_model_dir, check_out_dir, check_rows, claim_out_dir, cli_main)
from nanopairwise.judge import (JudgeTemplate, PairwiseJudge, encode_pair, encode_single, load_rm_config,
                                verdict_token_ids)
from nanopairwise.model import Block, Transformer
from nanopairwise.policy import PolicyLogprobs, encode_prompt
from nanopairwise.reward import RewardConfig, fill_anchors, measure_reward_norm, score_responses
from nanopairwise.rollout import generate
from nanopairwise.scalar_head import ScalarHeadModel, critic_inputs, critic_values
from nanopairwise.tokenizer import Tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # runs and data
    p.add_argument("--run-dir", default="runs", help="where the built-in pipeline keeps task, RMs and PPO runs")
    p.add_argument("--reward", choices=["pairwise", "pairwise-group", "bt", "bt-anchor"], default="pairwise",
                   help="Pairwise-RL, the judge's mean win probability against the prompt's other samples, "
                        "BT baseline, or the BT model's win probability against the anchor")
    p.add_argument("--group-anchor", action="store_true", help="--reward pairwise-group: the anchor joins each group")
    p.add_argument("--advantage-estimator", choices=losses.ESTIMATORS, default="gae",
                   help="gae (critic), or critic-free grpo / rloo over each prompt's K samples (docs/DESIGN.md §1.4)")
    p.add_argument("--policy", default=None, help="initial policy HF dir (default: the task's SFT policy)")
    p.add_argument("--judge", default=None, help="pairwise judge dir (default: RUN_DIR/judge/checkpoint)")
    p.add_argument("--bt-rm", default=None, help="BT reward model dir (default: RUN_DIR/bt/checkpoint)")
    p.add_argument("--prompts", default=None, help="RL prompts JSONL (default: the task's train prompts)")
    p.add_argument("--eval-prompts", default=None, help="held-out RL prompts JSONL (default: the task's)")
    p.add_argument("--out-dir", default=None, help="run directory (default: RUN_DIR/ppo_<reward>)")
    p.add_argument("--default-principle", default=data.DEFAULT_PRINCIPLE, help="principle for prompts that carry none")
    # reward and critic (our reading, see the docstring)
    p.add_argument("--reward-transform", choices=["prob", "centered", "logit"], default="prob",
                   help="reward from the win probability p: p, p - 0.5, or log p / (1 - p) (pairwise, bt-anchor)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="score both orders against the anchor (else one order)")
    p.add_argument("--critic", choices=["pairwise", "standard"], default=None,
                   help="critic input (default: pairwise for --reward pairwise, standard for bt and bt-anchor)")
    p.add_argument("--anchor-samples", type=int, default=4, help="best-of-N anchors for prompts without one")
    p.add_argument("--truncation-penalty", type=float, default=0.5,
                   help="subtracted from a score without EOS (for bt: from the normalised score)")
    # PPO
    p.add_argument("--steps", type=int, default=40, help="PPO steps (one rollout batch each)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per step over all ranks")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="K responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="response length limit R (tokens, EOS included)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use the same)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each step's rollouts")
    p.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch")
    p.add_argument("--lr", type=float, default=None, help="policy AdamW learning rate (default by regime, "
                   "lora.DEFAULT_LR: 5e-5 for a tiny model as the built-in one, 1e-6 full fine-tuning, 1e-5 LoRA)")
    p.add_argument("--critic-lr", type=float, default=None,
                   help="critic AdamW learning rate (default: 5e-4 for a tiny model, else 1e-5)")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below: 1 - clip_low")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above: 1 + clip_high")
    p.add_argument("--value-clip", type=float, default=0.2, help="clip of the critic's change from its rollout value")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss in the joint loss")
    p.add_argument("--kl-coef", type=float, default=0.05, help="beta of the KL penalty to the reference")
    p.add_argument("--kl-mode", choices=["reward", "loss"], default="reward", help="k1 in reward, or k3 loss term")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda of the advantages")
    p.add_argument("--value-lam", type=float, default=0.95, help="lambda of the critic's return targets")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip of policy and critic each (0 = off)")
    p.add_argument("--fused-head", action="store_true", help="LM head + log-prob in one kernel (no logits)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard every model with FSDP2 (else DDP)")
    # baseline fairness and critic warm-up
    p.add_argument("--reward-norm-prompts", type=int, default=64,
                   help="--reward bt: normalise r(x, y) by its mean and std over K rollouts of the initial "
                        "policy on this many training prompts (all ranks), measured once (0 = raw scores)")
    p.add_argument("--critic-fresh-head", action="store_true",
                   help="--reward bt: a zero-initialised critic head instead of the reward model's own")
    p.add_argument("--critic-warmup-steps", type=int, default=0,
                   help="the first N steps train only the critic (the policy's weights do not change)")
    # evaluation and runtime
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (0 = start and end only)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out prompts per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (weights and compute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of every stream (data order, sampling, minibatches: common.derive_seed)")
    # divergence guard: stop (before saving) when the policy runs away from the reference
    p.add_argument("--max-kl", type=float, default=10.0,
                   help="stop when the rollouts' mean sequence KL to the reference exceeds this (0 = off); "
                        "the built-in main job ends near 0.4, the BT baseline near 1")
    p.add_argument("--max-ratio", type=float, default=100.0,
                   help="stop when the PPO ratio pi/pi_old of a token exceeds this in an update (0 = off)")
    # experiment tracking (nanopairwise/tracking.py)
    tracking.add_arguments(p)
    lora.add_lora_args(p)  # on the policy; its reference is then the base weights with adapters off
    args = p.parse_args(argv)
    tracking.check_arguments(p, args)
    if args.lora_rank and args.fsdp:
        p.error("--lora-rank with --fsdp is not supported (the reference shares the policy's weights)")
    args.critic = args.critic or ("pairwise" if args.reward == "pairwise" else "standard")
    args.critic = args.critic if args.advantage_estimator == "gae" else "none"     # grpo / rloo: no critic
    args.out_dir = args.out_dir or os.path.join(args.run_dir, f"ppo_{args.reward}")
    args.task_dir = os.path.join(args.run_dir, "task")
    args.judge = args.judge or os.path.join(args.run_dir, "judge", "checkpoint")
    args.bt_rm = args.bt_rm or os.path.join(args.run_dir, "bt", "checkpoint")
    return args


def validate_args(args):
    """Every flag checked before anything is read or loaded; a UserError names the flag."""
    for name in ("--steps", "--prompts-per-step", "--samples-per-prompt", "--max-new-tokens", "--ppo-epochs",
                 "--minibatches", "--eval-size"):
        check_flag(args, name, lo=1)
    check_flag(args, "--anchor-samples", lo=2)                     # best of one is no ranking
    check_flag(args, "--lora-rank", lo=0)
    check_flag(args, "--reward-norm-prompts", lo=0)
    check_flag(args, "--critic-warmup-steps", lo=0)
    check_flag(args, "--lora-alpha", above=0)
    for name in ("--eval-every", "--save-every", "--truncation-penalty", "--kl-coef", "--vf-coef", "--value-clip"):
        check_flag(args, name, lo=0)
    for name in ("--lr", "--critic-lr", "--temperature", "--clip-high"):
        check_flag(args, name, above=0)
    check_flag(args, "--clip-low", above=0, below=1)
    check_flag(args, "--top-p", above=0, hi=1)
    for name in ("--gamma", "--lam", "--value-lam"):
        check_flag(args, name, lo=0, hi=1)
    for name in ("--grad-clip", "--max-kl", "--max-ratio"):
        check_flag(args, name, above=0, zero_ok=True)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")
    grouped = [f for f, on in (("--advantage-estimator " + args.advantage_estimator, args.critic == "none"),
                                ("--reward pairwise-group", args.reward == "pairwise-group")) if on]
    if grouped and args.samples_per_prompt < 2:
        raise UserError(f"--samples-per-prompt {args.samples_per_prompt}: {' and '.join(grouped)} compare each "
                        "sample with the other samples of its prompt; use --samples-per-prompt 2 or more")
    if args.critic == "none" and args.critic_warmup_steps:
        raise UserError(f"--critic-warmup-steps {args.critic_warmup_steps}: --advantage-estimator "
                        f"{args.advantage_estimator} has no critic to warm up")


@dataclass
class RunState:
    """What the run works out after parsing; `args` stays the command line (and get_args' defaults)."""
    policy: str                          # the initial policy's directory (--policy, or the task's SFT policy)
    prompts: str                         # RL prompts JSONL (--prompts, or the task's)
    eval_prompts: str                    # held-out prompts JSONL (--eval-prompts, or the task's), or None
    judge_template: JudgeTemplate = None  # the judge's text layout (its rm_config.json)
    reward: RewardConfig = None          # how a response is scored (nanopairwise/reward.py)
    lr: float = None                     # --lr, or the default of the policy's regime
    critic_lr: float = None              # --critic-lr, or the default of the critic's regime


class Models(NamedTuple):
    policy: nn.Module   # PolicyLogprobs, trained (DDP-wrapped or FSDP-sharded under torchrun)
    ref: nn.Module      # the frozen reference policy of the KL term
    critic: nn.Module   # ScalarHeadModel, trained (wrapped like the policy); None with grpo / rloo
    rm: nn.Module       # the frozen reward model: the judge (pairwise) or the BT model


@dataclass
class Experience:
    """One rank's rollouts of a step with everything the update reads: B = prompts x K rows."""
    input_ids: torch.Tensor        # (B, P + R) prompt (left-padded) then response
    attention_mask: torch.Tensor   # (B, P + R)
    response_mask: torch.Tensor    # (B, R) long, 1 = sampled token (EOS included)
    old_logprobs: torch.Tensor     # (B, R) of the policy that sampled, 0 where masked
    ref_logprobs: torch.Tensor     # (B, R) of the reference policy
    values: torch.Tensor           # (B, R) the critic's values at sampling time (old values); None: no critic
    advantages: torch.Tensor       # (B, R) GAE, whitened over the global batch (or grpo / rloo's)
    returns: torch.Tensor          # (B, R) lambda-returns, the critic's targets; None: no critic
    critic_ids: torch.Tensor       # (B, P' + R) the critic's prefix (left-padded to P') then response
    critic_mask: torch.Tensor      # (B, P' + R)
    critic_prefix_len: int         # P': the value of response token t is read at P' - 1 + t

    def select(self, rows: torch.Tensor) -> "Experience":
        """The experience of `rows` (a minibatch)."""
        return Experience(**{k: v[rows] if torch.is_tensor(v) else v for k, v in vars(self).items()})


def check_lengths(prompts, tok, args, run, policy_dir, rm_dir):
    """Every sequence a model will read fits its max_position_embeddings, counting --max-new-tokens
    for the response (twice when a best-of-N anchor is still to be sampled). Prompts are never cut:
    one too long is refused by file:line before any model is loaded (else: out of memory)."""
    limit = lambda path: checkpoint.read_config(path)["max_position_embeddings"]
    policy_max, rm_max = limit(policy_dir), limit(rm_dir)
    judge_max = limit(args.judge) if os.path.exists(os.path.join(args.judge, "config.json")) else None
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
# setup: pipeline pieces that may be missing, learning rates that fit the models


def resolve_lrs(args, policy_lm, critic_lm):
    """(policy lr, critic lr): --lr / --critic-lr, else lora.DEFAULT_LR of each model's regime (tiny/full/lora);
    the critic's is None without a critic (critic_lm None)."""
    lr = args.lr if args.lr is not None else lora.DEFAULT_LR[lora.regime(policy_lm)]["policy"]
    critic_lr = (None if critic_lm is None else args.critic_lr if args.critic_lr is not None
                 else lora.DEFAULT_LR[lora.regime(critic_lm)]["critic"])
    return lr, critic_lr


def prepare_inputs(args) -> RunState:
    """The run's input paths. Built-in pipeline (no --prompts): bootstrap the task, then train
    whichever reward model is missing (the judge always: it also evaluates)."""
    run = RunState(policy=args.policy, prompts=args.prompts, eval_prompts=args.eval_prompts)
    builtin = args.prompts is None
    if builtin:
        paths = bootstrap.ensure_task(args.task_dir, seed=args.seed)
        run.prompts, run.eval_prompts = paths["rl_train"], args.eval_prompts or paths["rl_test"]
        run.policy = args.policy or paths["policy"]
    for objective, path in (("pairwise", args.judge), ("bt", args.bt_rm)):
        needed = objective == args.reward.split("-")[0] or (objective == "pairwise" and builtin)
        if needed and not os.path.exists(os.path.join(path, "config.json")):
            if not builtin:
                raise UserError(f"no reward model at {path}; train one with train_rm.py --objective {objective}")
            print0(f"== training the {objective} reward model (missing at {path}) ==")
            train_rm.main(["--objective", objective, "--task-dir", args.task_dir, "--seed", str(args.seed),
                           "--out-dir", os.path.dirname(path), "--device", args.device])
    return run


# ----------------------------------------------------------------------------------------------
# one PPO step: make_experience (steps 1-4 of the docstring), then ppo_update (step 5)


@torch.no_grad()
def make_experience(step_prompts, models, tok, args, run, device, generator):
    """Steps 1-4 for this rank's prompts (K samples each): (Experience, stats)."""
    policy, ref, critic, rm = (unwrap(m) for m in models)          # no DDP wrapper needed without grads
    policy.eval()
    K = args.samples_per_prompt
    prompts = [p for p in step_prompts for _ in range(K)]          # one per row: B = len(step_prompts) * K
    # 1. sample K responses per prompt (the KV-cache rollout engine)
    t0 = clock(device)
    with gathered(policy):                                           # generation bypasses forward()
        rollout = generate(policy.lm, [encode_prompt(tok, p.prompt) for p in prompts], args.max_new_tokens,
                           tok.stop_token_ids, tok.pad_token_id, temperature=args.temperature, top_p=args.top_p,
                           generator=generator)
    t1 = clock(device)
    # 2. score them (B,); a response cut off at --max-new-tokens without EOS loses --truncation-penalty
    scores, win, judge_cost = score_responses(prompts, rollout.texts(tok), rm, tok, run.reward)
    scores = scores.to(device) - args.truncation_penalty * (~rollout.ended).float()
    t2 = clock(device)
    # 3. old and reference log-probs, and the critic's values: a forward each, (B, R). The rollout's
    #    own log-probs are not reused: the old log-probs come from the same code path (kernel, head,
    #    batch layout) as the new ones of step 5, so the ratio is exactly 1 before the first update
    input_ids, attention_mask = rollout.sequences()                 # (B, P + R)
    response_mask = rollout.response_mask.float()                   # (B, R)
    old_logprobs = policy(input_ids, attention_mask, rollout.response_mask, args.temperature).logprobs
    ref_logprobs = ref(input_ids, attention_mask, rollout.response_mask, args.temperature).logprobs
    critic_ids = critic_mask = values = None                         # grpo / rloo: no critic
    critic_prefix_len = 0
    if critic is not None:
        critic_ids, critic_mask, critic_prefix_len = critic_inputs(
            tok, run.reward.template, prompts, rollout.response_ids, rollout.response_mask, args.critic == "pairwise")
        values = critic_values(critic, critic_ids, critic_mask, critic_prefix_len, response_mask.size(1))
        values = values * response_mask
    t3 = clock(device)
    # 4. per-token rewards (B, R): -kl_coef * k1 on every token, the score on the last; then GAE (advantages
    #    with --lam, the critic's targets with --value-lam) or grpo / rloo; whitening over all ranks' tokens
    kl = losses.kl_estimate(old_logprobs, ref_logprobs, "k1") * response_mask
    rewards = losses.shape_rewards(scores, response_mask, kl if args.kl_mode == "reward" else None, args.kl_coef)
    advantages, returns = losses.estimate_advantages(args.advantage_estimator, rewards, values, response_mask, K,
                                                     args.gamma, args.lam, args.value_lam, distributed=True)
    policy.train()
    experience = Experience(input_ids, attention_mask, rollout.response_mask, old_logprobs, ref_logprobs, values,
                            advantages, returns, critic_ids, critic_mask, critic_prefix_len)
    means = {"reward/score": scores.mean(), "rollout/kl": kl.sum(1).mean(), "rollout/length": response_mask.sum(1).mean(),
             "rollout/eos_rate": rollout.ended.float().mean(), "tokens": response_mask.sum()}
    if win is not None:
        means["rollout/win_rate"] = win.mean().to(device)
    stats = dict(zip(means, torch.stack([v.float() for v in means.values()]).tolist()))   # one host sync
    stats.update({"tokens": int(stats["tokens"]), "perf/rollout_s": t1 - t0, "perf/score_s": t2 - t1,
                  "perf/forward_s": t3 - t2, **judge_cost})
    return experience, stats


def ppo_update(experience, models, optimizers, args, run, generator, step=0, last_saved=None, warmup=False):
    """Step 5: --ppo-epochs passes of --minibatches shuffled minibatches over this rank's experience.
    Before each optimizer step: loss and both gradient norms finite (one host sync), else stop.
    With `warmup` (--critic-warmup-steps) only the critic learns: the policy's forward builds no
    graph and its optimizer does not step, so its weights do not change."""
    policy, critic = models.policy, models.critic
    B, R = experience.response_mask.shape
    minibatch_size = max(1, B // args.minibatches)
    sums = {}
    for _ in range(args.ppo_epochs):
        for rows in data.iterate_minibatches(B, minibatch_size, generator, drop_last=True):
            minibatch = experience.select(rows.to(experience.input_ids.device))
            response_mask = minibatch.response_mask.float()                             # (b, R)
            # 5a. new log-probs (and entropy) of the sampled tokens, new values: (b, R)
            with torch.set_grad_enabled(not warmup):
                new = policy(minibatch.input_ids, minibatch.attention_mask, minibatch.response_mask, args.temperature,
                             entropy=True)
            values = None if critic is None else critic_values(critic, minibatch.critic_ids, minibatch.critic_mask,
                                                                experience.critic_prefix_len, R)
            # 5b. clipped surrogate + clipped value loss (+ k3 KL with --kl-mode loss), one fused op
            ref_logprobs = minibatch.ref_logprobs if args.kl_mode == "loss" else None
            terms = ops.ppo_loss(new.logprobs, minibatch.old_logprobs, minibatch.advantages, response_mask,
                                 clip_low=args.clip_low, clip_high=args.clip_high, ref_logprobs=ref_logprobs,
                                 kl_coef=args.kl_coef if ref_logprobs is not None else 0.0, values=values,
                                 old_values=minibatch.values, returns=minibatch.returns, value_clip=args.value_clip,
                                 vf_coef=args.vf_coef)
            # 5c. one backward of pg + vf_coef * v through both models, clip, check, step
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            norms = [torch.nn.utils.clip_grad_norm_(mod.parameters(), args.grad_clip or float("inf"))
                     for mod in (policy, critic) if mod is not None]
            # FSDP2 returns a DTensor; a model without gradients (critic warm-up) a CPU zero
            norms = [(n.full_tensor() if hasattr(n, "full_tensor") else n).to(terms.loss.device) for n in norms]
            # means over ranks (the norms are global already), so every rank stops alike
            checked = all_reduce_sum(torch.stack([terms.pg_loss.detach(), terms.v_loss.detach(), *norms]).float())
            checked /= get_world_size()
            check_finite(step + 1, dict(zip(("policy loss (pg)", "critic loss (v)", "policy grad norm",
                                             "critic grad norm"), checked.unbind())),
                         f"--lr {run.lr:g} (policy), --critic-lr {run.critic_lr or 0:g} and --vf-coef (critic), "
                         "--grad-clip, --dtype", last_saved)
            for opt in optimizers[1:] if warmup else optimizers:    # [policy, critic]
                opt.step()
            row = {"loss/pg": terms.pg_loss, "loss/v": terms.v_loss, "loss/kl": terms.kl_loss,
                   "ppo/clipfrac": terms.clipfrac, "ppo/approx_kl": terms.approx_kl, "ppo/ratio_max": terms.ratio_max,
                   "policy/entropy": losses.masked_mean(new.entropy.detach(), response_mask),
                   "ppo/ratio_mean": terms.ratio_mean, "ppo/vf_clipfrac": terms.vf_clipfrac}
            if values is not None:
                row["critic/explained_var"] = losses.explained_variance(values.detach(), minibatch.returns, response_mask)
            for k, v in row.items():
                sums.setdefault(k, []).append(v.detach().float())     # no host sync per minibatch
    # the largest ratio of the update (the divergence guard reads it), the mean of everything else; one host sync
    reduced = [torch.stack(v).max() if k == "ppo/ratio_max" else torch.stack(v).mean() for k, v in sums.items()]
    return dict(zip(sums, torch.stack(reduced).tolist()))


# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    t_start = time.time()
    args = get_args(argv)
    validate_args(args)
    owns_pg = not (dist.is_available() and dist.is_initialized())
    _, rank, _, world_size, device = compute_init(args.device)
    check_divides(args.prompts_per_step, "--prompts-per-step", world_size)
    check_out_dir(args.out_dir)
    with claim_out_dir(args.out_dir):                               # one run per --out-dir
        return train(args, rank, world_size, device, owns_pg, t_start)


def train(args, rank, world_size, device, owns_pg, t_start):
    dtype = parse_dtype(args.dtype)
    set_seed(args.seed)
    run = prepare_inputs(args)
    # ---- inputs checked before any model is loaded -------------------------------------------
    ckpt = os.path.join(args.out_dir, "checkpoint")
    state = {"step": 0, "anchors": None, "reward_norm": None}
    if args.resume:
        state = ppo_checkpoint.load_state(ckpt, args.lora_rank, args.fsdp, world_size, args.advantage_estimator)
    # with LoRA the base weights are re-read from --policy and the adapters from the trainer state
    policy_dir = os.path.join(ckpt, "policy") if args.resume and not args.lora_rank else run.policy
    judged = args.reward.startswith("pairwise")                     # the judge is the reward model
    rm_dir = args.judge if judged else args.bt_rm
    has_judge = judged or os.path.exists(os.path.join(args.judge, "config.json"))
    for path, flag in ((run.policy, "--policy"), (policy_dir, "--resume"),
                       (rm_dir, "--judge" if judged else "--bt-rm")):
        check_model_dir(path, flag)
    check_input_file(run.prompts, "--prompts")
    if run.eval_prompts:
        check_input_file(run.eval_prompts, "--eval-prompts")
    tok = Tokenizer.from_pretrained(policy_dir)
    run.judge_template = load_rm_config(args.judge)[1]              # each reward model's own text layout
    run.reward = RewardConfig(args.reward, load_rm_config(rm_dir)[1], args.reward_transform, args.symmetric,
                              args.samples_per_prompt, args.group_anchor)
    for path in {args.judge, rm_dir} if has_judge else {rm_dir}:  # same strings -> same ids, not just same size
        if Tokenizer.from_pretrained(path).fingerprint() != tok.fingerprint():
            raise UserError(f"the tokenizer of {path} maps text to ids differently from the policy's ({policy_dir}); "
                            "the judge and critic read the policy's tokens, so they must share its tokenizer")
    load_prompts = lambda path: data.load_rl_prompts(path, default_principle=args.default_principle)
    train_prompts = load_prompts(run.prompts)
    check_rows(train_prompts, args.prompts_per_step, "--prompts", run.prompts, "prompts (after dropping bad lines)",
               "--prompts-per-step")
    eval_prompts = load_prompts(run.eval_prompts)[:args.eval_size] if run.eval_prompts else []
    if run.eval_prompts and len(eval_prompts) < world_size:
        raise UserError(f"--eval-prompts {run.eval_prompts}: {len(eval_prompts)} usable prompts, fewer than one "
                        f"per rank ({world_size}); fix the file or leave out --eval-prompts")
    if not run.eval_prompts:
        print0("note: no --eval-prompts, so no held-out evaluation and no eval.json")
    eval_prompts = eval_prompts[:len(eval_prompts) - len(eval_prompts) % world_size]   # equal shares
    check_lengths(train_prompts + eval_prompts, tok, args, run, policy_dir, rm_dir)

    # ---- models: policy (trained), reference (frozen), reward model (frozen), critic (trained)
    load = lambda path: Transformer.from_pretrained(path, dtype=dtype, device=device)
    policy = PolicyLogprobs(lora.lora_from_args(load(policy_dir), args), args.fused_head)
    if args.lora_rank:  # the reference is the policy with its adapters off: no second copy
        ref = lora.AdaptersOff(PolicyLogprobs(policy.lm, args.fused_head))  # same head path as the policy
        if args.resume:
            lora.load_trainable_state_dict(policy, state["policy_trainable"],
                                           os.path.join(ckpt, ppo_checkpoint.TRAINER_STATE))
    else:
        ref = policy.reference(load(run.policy))               # same head path (--fused-head) as policy
    judge = None
    if os.path.exists(os.path.join(args.judge, "config.json")):
        judge = PairwiseJudge(load(args.judge), *verdict_token_ids(tok, run.judge_template))
        judge.eval().requires_grad_(False)
    rm = judge if judged else ScalarHeadModel.from_pretrained(rm_dir, dtype, device).eval()
    rm.requires_grad_(False)
    # the BT critic starts as the RM, head included (InstructGPT, N+ details, OpenRLHF); the judge has no
    # scalar head, and bt-anchor's probability is not affine in r, so those critics get a fresh zero head
    rm_head = args.reward == "bt" and args.critic == "standard" and not args.critic_fresh_head
    critic = (None if args.critic == "none" else      # grpo / rloo: no critic built, trained or saved
              ScalarHeadModel.from_pretrained(os.path.join(ckpt, "critic"), dtype, device) if args.resume
              else ScalarHeadModel.from_pretrained(rm_dir, dtype, device, new_head=not rm_head))
    if args.reward == "bt" and args.reward_norm_prompts and state.get("reward_norm") is None:
        with lora.adapters_disabled(policy.lm):                     # LoRA: the base weights are the reference
            initial_lm = policy.lm if args.lora_rank else ref.lm
            state["reward_norm"] = measure_reward_norm(
                initial_lm, rm, args.bt_rm, tok, train_prompts, run.reward, args.reward_norm_prompts,
                args.samples_per_prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, device)
        print0(f"BT reward normalisation over {state['reward_norm']['n']} initial-policy rollouts: "
               f"mean {state['reward_norm']['mean']:.4f}, std {state['reward_norm']['std']:.4f}")
    run.reward.norm = state.get("reward_norm") if args.reward == "bt" else None
    if critic is not None and rm_head and run.reward.norm and not args.resume:
        critic.normalize_head_(run.reward.norm["mean"], run.reward.norm["std"])   # V in the reward's units
    # under torchrun: trained models DDP-wrapped or FSDP2-sharded, frozen ones sharded too with FSDP
    policy_dp = wrap_data_parallel(policy, args.fsdp, Block, device)
    critic_dp = critic and wrap_data_parallel(critic, args.fsdp, Block, device)
    if args.fsdp and world_size > 1:
        for frozen in {id(m): m for m in (ref, rm, judge) if m is not None}.values():
            shard_model(frozen, Block)
    run.lr, run.critic_lr = resolve_lrs(args, policy.lm, critic and critic.lm)
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    optimizers = [adamw([w for w in policy.parameters() if w.requires_grad], run.lr)]   # [policy, critic]
    if critic is not None:                                           # grpo / rloo: no critic
        optimizers.append(adamw(critic.parameters(), run.critic_lr))
    if args.resume:
        ppo_checkpoint.load_optimizers(ckpt, optimizers, args.fsdp, rank)

    # ---- anchors (fixed for the run; stored in the checkpoint) --------------------------------
    step = state["step"]
    for prompt, anchor in zip(train_prompts + eval_prompts, state["anchors"] or []):   # best-of-N ones too
        prompt.anchor = anchor
    fill_anchors(train_prompts + eval_prompts, policy, judge, tok, run.judge_template, args.anchor_samples,
                 args.max_new_tokens, args.temperature, args.seed, device)
    models = Models(policy_dp, ref, critic_dp, rm)
    print0(f"PPO | reward {args.reward} ({args.reward_transform}, symmetric={args.symmetric}) | critic {args.critic} | "
           f"advantages {args.advantage_estimator} | {len(train_prompts):,} prompts | "
           f"{args.prompts_per_step}x{args.samples_per_prompt} samples/step | {args.steps} steps | "
           f"lr {run.lr:g}, critic {run.critic_lr or 0:g} | {world_size} rank(s) on {device}"
           f"{' (FSDP2)' if args.fsdp else ''} | out {args.out_dir}")
    logger = MetricsLogger(args.out_dir, report_to=args.report_to, config=vars(args) | {"lr": run.lr, "critic_lr": run.critic_lr})
    if args.resume:
        logger.truncate(step)                                        # the crashed run's later rows go
    history = dict(state.get("history", {}))                         # a resumed run keeps "before"
    last_saved = step or None
    divergence_hint = f"--lr {run.lr:g}, --kl-coef, --clip-low/--clip-high"

    def run_eval(tag):
        if eval_prompts:
            history[tag] = evaluate_policy(policy, ref, judge, eval_prompts, tok, run.judge_template,
                                           args.max_new_tokens, args.temperature, args.top_p, args.seed, device)
            logger.log(step, {f"eval/{k}": v for k, v in history[tag].items()}, total=args.steps)

    if step == 0:
        run_eval("before")
    progress = Progress(args.steps - step, "ppo", every=max(1, args.steps // 10))
    while step < args.steps:
        t0 = time.time()
        # this rank's prompts and random streams: functions of (seed, step, rank), so resume is exact
        step_prompts = [train_prompts[i] for i in data.rank_batch(len(train_prompts), args.prompts_per_step, step,
                                                                  args.seed, rank, world_size)]
        stream = step * world_size + rank
        rollout_generator = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "rollout", stream))
        minibatch_generator = torch.Generator().manual_seed(derive_seed(args.seed, "minibatches", stream))
        experience, stats = make_experience(step_prompts, models, tok, args, run, device, rollout_generator)
        check_divergence(step + 1, "rollout KL to the reference", stats["rollout/kl"], "--max-kl", args.max_kl,
                         divergence_hint, last_saved, device)
        t_update = clock(device)
        stats.update(ppo_update(experience, models, optimizers, args, run, minibatch_generator, step, last_saved,
                                warmup=step < args.critic_warmup_steps))
        step += 1
        stats["perf/update_s"] = clock(device) - t_update
        dt = time.time() - t0
        ratio_max = stats["ppo/ratio_max"]                            # the guard takes the max over ranks
        stats = mean_over_ranks(stats, device,                        # every rank's batch and judge cost, one call
                                sum_keys=("tokens", "perf/judge_rows", "perf/judge_tokens"))
        tokens = stats.pop("tokens")
        stats.update({"perf/ms": 1000 * dt, "perf/tok_per_s": tokens / dt})
        logger.log(step, stats, total=args.steps,
                   console_keys=["reward/score", "rollout/win_rate", "rollout/kl", "ppo/clipfrac",
                                 "loss/v", "rollout/length", "perf/ms", "perf/tok_per_s"])
        check_divergence(step, "PPO ratio pi/pi_old", ratio_max, "--max-ratio", args.max_ratio, divergence_hint,
                         last_saved, device)
        progress.update(step - state["step"])
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            run_eval(f"step{step}")
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            if args.max_kl:                          # the updated policy, before it is saved: on this step's rollouts
                with torch.no_grad():
                    logprobs = policy(experience.input_ids, experience.attention_mask, experience.response_mask,
                                      args.temperature).logprobs
                kl = (losses.kl_estimate(logprobs, experience.ref_logprobs, "k2")
                      * experience.response_mask).sum(1).mean().item()
                check_divergence(step, "the updated policy's KL to the reference (k2 on this step's rollouts)", kl,
                                 "--max-kl", args.max_kl, divergence_hint, last_saved, device)
            trainer_state = {"step": step, "anchors": [p.anchor for p in train_prompts + eval_prompts],
                             "advantage_estimator": args.advantage_estimator,
                             "world_size": world_size, "history": history, "reward_norm": state.get("reward_norm"),
                             "policy_trainable": lora.trainable_state_dict(policy) if args.lora_rank else None}
            ppo_checkpoint.save(ckpt, policy, critic, optimizers, tok, trainer_state, args.fsdp)
            last_saved = step
    run_eval("after")
    logger.close()
    if rank == 0 and "after" in history:
        before = history.get("before", {})
        print0("\nheld-out metric        before    after")
        for k, v in history["after"].items():
            print0(f"{k:<20} {before.get(k, float('nan')):>8.4f} {v:>8.4f}")
        atomic_write_text(os.path.join(args.out_dir, "eval.json"), dumps_json(history, indent=2))
        print0(f"done in {time.time() - t_start:.0f} s (setup included) | {args.out_dir}")
    barrier()
    if owns_pg:
        compute_cleanup()
    return history


if __name__ == "__main__":
    cli_main(main)
