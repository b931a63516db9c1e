"""Pairwise PPO (Pairwise-RL, arXiv 2504.04950) and the Bradley-Terry PPO baseline.

    torchrun --standalone --nproc_per_node=2 train_ppo.py      # the main job: the whole built-in pipeline
    python train_ppo.py                                         # the same in one process
    python train_ppo.py --reward bt                             # baseline: BT scalar reward, standard critic
    python train_ppo.py --reward bt-anchor                      # BT model's win probability against the anchor
    python train_ppo.py --reward pairwise-group --advantage-estimator grpo   # critic-free, judged within the group
    python train_ppo.py --policy DIR --judge DIR --prompts rl.jsonl --eval-prompts rl_heldout.jsonl

On the built-in task the main job bootstraps the task if missing (tokenizer, SFT policy, pairs, RL
prompts), trains the judge / BT reward model with train_rm.py if missing (nanopairwise/pipeline.py),
runs PPO, and prints the held-out metrics before and after (oracle score, win rates against the anchor, KL).

One PPO step (nanopairwise/ppo.py; per rank, on its share of the global batch, B = prompts x K rows):
  1. sample K responses for each prompt of the step with the KV-cache rollout engine
  2. score them (--reward): pairwise -> P(y > y*), the judge in both orders against the prompt's
     anchor y*; pairwise-group -> the mean P(y > y') over the prompt's other samples y'; bt-anchor
     -> sigmoid(r(x, y) - r(x, y*)) from the BT model; bt -> r(x, y) - mu. Then --reward-transform
     (win probabilities) and / sigma (--reward-norm init-std: mu, sigma over the initial policy's
     rollouts, so --kl-coef, --value-clip and --truncation-penalty mean the same for every arm)
  3. old and reference log-probs of the sampled tokens and the critic's values (a forward each)
  4. per-token reward -kl_coef * k1 on every token plus the score on the last token; GAE (or
     --advantage-estimator grpo | rloo: no critic, the prompt's other samples as the baseline);
     advantages whitened over the global batch (all ranks); truncated IS for the rollout engine
  5. --ppo-epochs passes of --minibatches minibatches: clipped surrogate + clipped value loss
     through the fused PPO-loss kernel (reference with NANOPAIRWISE_KERNELS=ref)
This file: the flags, load_inputs (every input checked before a model loads), build_models (the
models, the anchors, the run's reward scale and the critic's start, the optimisers), the loop
(make_experience, ppo_update, logging, held-out evaluation), save_step (the divergence check first).

Our reading of the paper, each choice a flag, is listed in docs/DESIGN.md §1.4: the anchor (gold,
else the best of --anchor-samples by the judge; fixed for the run), the order-symmetrised win
probability (--symmetric, --reward-transform), the pairwise critic (the judge's weights, a fresh
head starting at the initial mean score: --critic, --critic-bias), k1 KL in the reward (--kl-coef,
--kl-mode), GAE (--gamma, --lam, --value-lam), whitening, --truncation-penalty, two AdamW optimisers
with a joint backward (--vf-coef), --critic-warmup-steps. The baseline (--reward bt) is standard
RLHF PPO with a critic from the BT model's trunk (--no-critic-fresh-head: its head too, rescaled,
as in InstructGPT). Divergence guard (--max-kl, --max-ratio; 0 = off): the run stops with a message
when the rollouts' mean sequence KL to the reference, or the updated policy's (k2, before every
checkpoint), exceeds --max-kl, or a token's ratio pi/pi_old exceeds --max-ratio. Bad inputs, NaNs
and faults: docs/FAULTS.md.
"""

import argparse
import os
import time
from dataclasses import replace

import torch

from nanopairwise import batching, common, data, lora, losses, ppo_checkpoint, tracking
from nanopairwise.common import DTYPES, Progress, atomic_write_text, clock, derive_seed, dumps_json, parse_dtype, set_seed
from nanopairwise.distributed import (barrier, compute_cleanup, compute_init, get_rank, get_world_size, mean_over_ranks,
                                      print0, shard_model, unwrap, wrap_data_parallel)
from nanopairwise.evaluation import evaluate_policy
from nanopairwise.guards import (UserError, check_divergence, check_divides, check_flag, check_input_file,
                                 check_model_dir, check_out_dir, check_rows, cli_main)
from nanopairwise.judge import PairwiseJudge, verdict_token_ids
from nanopairwise.layouts import Sampling
from nanopairwise.model import Block, Transformer
from nanopairwise.pipeline import has_model, ppo_inputs
from nanopairwise.policy import PolicyLogprobs
from nanopairwise.ppo import (Models, RunState, build_critic, check_lengths, make_experience, ppo_update,
                              resolve_lrs)
from nanopairwise.reward import RewardConfig, fill_anchors, measure_reward_norm
from nanopairwise.rm_checkpoint import load_rm_config
from nanopairwise.rundir import claim_out_dir
from nanopairwise.scalar_head import ScalarHeadModel
from nanopairwise.tokenizer import Tokenizer
from nanopairwise.tracking import MetricsLogger


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
    add_ppo_arguments(p)
    # evaluation and runtime
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every N steps (0 = start and end only)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out prompts per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (LoRA adapters stay fp32) or bf16-mixed (fp32 weights, bf16 autocast)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of every stream (data order, sampling, minibatches: common.derive_seed)")
    # experiment tracking (nanopairwise/tracking.py)
    tracking.add_arguments(p)
    lora.add_lora_args(p)  # on the policy; its reference is then the base weights with adapters off
    args = p.parse_args(argv)
    tracking.check_arguments(p, args)
    if (args.lora_rank or args.critic_lora_rank) and args.fsdp:
        p.error("--lora-rank / --critic-lora-rank with --fsdp is not supported (LoRA shares the base weights)")
    args.critic = args.critic or ("pairwise" if args.reward == "pairwise" else "standard")
    args.critic = args.critic if args.advantage_estimator == "gae" else "none"     # grpo / rloo: no critic
    args.out_dir = args.out_dir or os.path.join(args.run_dir, f"ppo_{args.reward}")
    args.task_dir = os.path.join(args.run_dir, "task")
    args.judge = args.judge or os.path.join(args.run_dir, "judge", "checkpoint")
    args.bt_rm = args.bt_rm or os.path.join(args.run_dir, "bt", "checkpoint")
    return args


def add_ppo_arguments(p):
    """The flags of the PPO step, of the BT baseline's fairness settings and of the divergence guard."""
    # PPO
    p.add_argument("--steps", type=int, default=40, help="PPO steps (one rollout batch each)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per step over all ranks")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="K responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="response length limit R (tokens, EOS included)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use the same)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each step's rollouts")
    p.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch")
    p.add_argument("--lr", type=float, default=None,
                   help="policy AdamW learning rate (default: lora.DEFAULT_LR of the policy's regime: tiny, full, lora)")
    p.add_argument("--critic-lr", type=float, default=None,
                   help="critic AdamW learning rate (default: lora.DEFAULT_LR of the critic's regime)")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below: 1 - clip_low")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above: 1 + clip_high")
    p.add_argument("--value-clip", type=float, default=0.2, help="clip of the critic's change from its rollout value")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss in the joint loss")
    p.add_argument("--kl-coef", type=float, default=0.5,
                   help="beta of the KL penalty to the reference, in the normalised score's units (--reward-norm)")
    p.add_argument("--kl-mode", choices=["reward", "loss"], default="reward", help="k1 in reward, or k3 loss term")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda of the advantages")
    p.add_argument("--value-lam", type=float, default=0.95, help="lambda of the critic's return targets")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip of policy and critic each (0 = off)")
    p.add_argument("--fused-head", action="store_true", help="LM head + log-prob in one kernel (no logits)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard every model with FSDP2 (else DDP)")
    # baseline fairness and critic warm-up
    p.add_argument("--reward-norm", choices=["none", "init-std"], default="init-std",
                   help="every arm: divide the score (after --reward-transform; bt: minus its mean) by its std over "
                        "rollouts of the initial policy, so --kl-coef, --value-clip and --truncation-penalty are in "
                        "the same units whatever the reward model (none: raw scores)")
    p.add_argument("--reward-norm-prompts", type=int, default=64,
                   help="training prompts (x K rollouts of the initial policy, all ranks) that measure the score's "
                        "mean and std for --reward-norm and --critic-bias, once per run (kept in the checkpoint)")
    p.add_argument("--critic-bias", choices=["zero", "init-mean"], default="init-mean",
                   help="a fresh critic head's bias: 0, or the initial policy's mean score (measured with "
                        "--reward-norm-prompts), so the first advantages carry no position term")
    p.add_argument("--critic-fresh-head", action=argparse.BooleanOptionalAction, default=True,
                   help="--reward bt: a fresh critic head (--critic-bias) like every arm's; --no-critic-fresh-head: "
                        "the reward model's own head, rescaled to the normalised units")
    p.add_argument("--critic-lora-rank", type=int, default=0, help="the critic as rank-R adapters (alpha 2R) on the "
                   "reward model's trunk plus its scalar head, not a fully trained second model (0 = full fine-tuning)")
    p.add_argument("--critic-warmup-steps", type=int, default=0,
                   help="the first N steps train only the critic (the policy's weights do not change)")
    # divergence guard: stop (before saving) when the policy runs away from the reference
    p.add_argument("--max-kl", type=float, default=10.0,
                   help="stop when the rollouts' mean sequence KL to the reference exceeds this (0 = off; "
                        "README's results show the KL the built-in runs end at)")
    p.add_argument("--max-ratio", type=float, default=100.0,
                   help="stop when the PPO ratio pi/pi_old of a token exceeds this in an update (0 = off)")


def validate_args(args):
    """Every flag checked before anything is read or loaded; a UserError names the flag."""
    for name in ("--steps", "--prompts-per-step", "--samples-per-prompt", "--max-new-tokens", "--ppo-epochs",
                 "--minibatches", "--eval-size"):
        check_flag(args, name, lo=1)
    check_flag(args, "--anchor-samples", lo=2)                     # best of one is no ranking
    check_flag(args, "--reward-norm-prompts", lo=1)
    for name in ("--lora-rank", "--critic-lora-rank", "--critic-warmup-steps"):
        check_flag(args, name, lo=0)
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
    for flag, value, what in (("--critic-warmup-steps", args.critic_warmup_steps, "warm up"),
                              ("--critic-lora-rank", args.critic_lora_rank, "adapt")):
        if args.critic == "none" and value:
            raise UserError(f"{flag} {value}: --advantage-estimator {args.advantage_estimator} has no critic to {what}")


# ----------------------------------------------------------------------------------------------
# setup: the inputs (checked before any model loads), the models and optimisers, a checkpoint


def load_inputs(args, world_size: int):
    """(run, tokenizer, train prompts, eval prompts, trainer state): every file and length checked."""
    run = RunState(*ppo_inputs(args), sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p))
    ckpt = os.path.join(args.out_dir, "checkpoint")
    state = (ppo_checkpoint.load_state(ckpt, args.lora_rank, args.fsdp, world_size, args.advantage_estimator,
                                       args.critic_lora_rank) if args.resume else {"step": 0})
    # with LoRA the base weights are re-read from --policy and the adapters from the trainer state
    run.policy_dir = os.path.join(ckpt, "policy") if args.resume and not args.lora_rank else run.policy
    judged = args.reward.startswith("pairwise")                      # the judge is the reward model
    run.rm_dir = args.judge if judged else args.bt_rm
    for path, flag in ((run.policy, "--policy"), (run.policy_dir, "--resume"),
                       (run.rm_dir, "--judge" if judged else "--bt-rm")):
        check_model_dir(path, flag)
    check_input_file(run.prompts, "--prompts")
    if run.eval_prompts:
        check_input_file(run.eval_prompts, "--eval-prompts")
    tok = Tokenizer.from_pretrained(run.policy_dir)
    run.has_judge = has_model(args.judge)                            # optional for --reward bt / bt-anchor
    run.judge_template = load_rm_config(args.judge)[1]              # each reward model's own text layout
    run.reward = RewardConfig(args.reward, load_rm_config(run.rm_dir)[1], args.reward_transform, args.symmetric,
                              args.samples_per_prompt, args.group_anchor)
    run.anchor_scores = {} if args.reward == "bt-anchor" else None
    for path in {args.judge, run.rm_dir} if run.has_judge else {run.rm_dir}:  # same strings -> same ids
        if Tokenizer.from_pretrained(path).fingerprint() != tok.fingerprint():
            raise UserError(f"the tokenizer of {path} maps text to ids differently from the policy's ({run.policy_dir}); "
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
    check_lengths(train_prompts + eval_prompts, tok, args, run)
    return run, tok, train_prompts, eval_prompts, state


def build_models(args, run, tok, train_prompts, eval_prompts, state, device):
    """(Models, [policy AdamW, critic AdamW]): policy (trained), reference (frozen), reward model
    (frozen), critic (trained), judge; wrapped for torchrun; as the checkpoint left them on --resume.
    Fixes the run's anchors and reward (run.reward.norm: measured once, kept in `state`)."""
    load = lambda path: Transformer.from_pretrained(path, dtype=parse_dtype(args.dtype), device=device)
    ckpt = os.path.join(args.out_dir, "checkpoint")
    policy = PolicyLogprobs(lora.lora_from_args(load(run.policy_dir), args), args.fused_head)
    if args.lora_rank:  # the reference is the policy with its adapters off: no second copy
        ref = lora.AdaptersOff(PolicyLogprobs(policy.lm, args.fused_head))  # same head path as the policy
        if args.resume:
            lora.load_trainable_state_dict(policy, state["policy_trainable"],
                                           os.path.join(ckpt, ppo_checkpoint.TRAINER_STATE))
    else:
        ref = policy.reference(load(run.policy))               # same head path (--fused-head) as policy
    judge = None
    if run.has_judge:
        judge = PairwiseJudge(load(args.judge), *verdict_token_ids(tok, run.judge_template))
        judge.eval().requires_grad_(False)
    dtype = parse_dtype(args.dtype)
    judged = args.reward.startswith("pairwise")                      # the judge is the reward model
    rm = judge if judged else ScalarHeadModel.from_pretrained(run.rm_dir, dtype, device).eval()
    rm.requires_grad_(False)
    # anchors: fixed for the run, kept in the checkpoint (best-of-N ones too), before anything scores against them
    for prompt, anchor in zip(train_prompts + eval_prompts, state.get("anchors") or []):
        prompt.anchor = anchor
    fill_anchors(train_prompts + eval_prompts, policy, judge, tok, run.judge_template, args.anchor_samples,
                 run.sampling, args.seed, device)
    run.reward = replace(run.reward, norm=reward_norm(args, run, policy, ref, rm, tok, train_prompts, state, device))
    critic = build_critic(args, run, state, dtype, device)        # None for grpo / rloo
    # under torchrun: trained models DDP-wrapped or FSDP2-sharded, frozen ones sharded too with FSDP
    models = Models(wrap_data_parallel(policy, args.fsdp, Block, device), ref,
                    critic and wrap_data_parallel(critic, args.fsdp, Block, device), rm, judge)
    if args.fsdp and get_world_size() > 1:
        for frozen in {id(m): m for m in (ref, rm, judge) if m is not None}.values():
            shard_model(frozen, Block)
    run.lr, run.critic_lr = resolve_lrs(args, policy.lm, critic and critic.lm)
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    optimizers = [adamw([w for w in policy.parameters() if w.requires_grad], run.lr)]   # [policy, critic]
    if critic is not None:                                           # grpo / rloo: no critic
        optimizers.append(adamw([w for w in critic.parameters() if w.requires_grad], run.critic_lr))
    if args.resume:
        ppo_checkpoint.load_optimizers(ckpt, optimizers, args.fsdp, get_rank())
    return models, optimizers


def reward_norm(args, run, policy, ref, rm, tok, train_prompts, state, device):
    """The initial policy's score statistics (mean, std, truncation rate; reward.measure_reward_norm),
    measured once and kept in `state`. Returns what the scores are divided by: those statistics with
    --reward-norm init-std, else None."""
    needed = args.reward_norm == "init-std" or (args.critic_bias == "init-mean" and args.critic != "none")
    if needed and state.get("reward_norm") is None:
        with lora.adapters_disabled(policy.lm):                     # LoRA: the base weights are the reference
            initial_lm = policy.lm if args.lora_rank else ref.lm
            state["reward_norm"] = stats = measure_reward_norm(
                initial_lm, rm, run.rm_dir, tok, train_prompts, run.reward, args.reward_norm_prompts,
                args.samples_per_prompt, run.sampling, args.seed, device, require_spread=args.reward_norm == "init-std")
        print0(f"initial policy's {args.reward} score over {stats['n']} rollouts: mean {stats['mean']:.4f}, "
               f"std {stats['std']:.4f}, truncated {stats['truncated']:.3f}")
    return state.get("reward_norm") if args.reward_norm == "init-std" else None


def save_step(step, models, optimizers, tok, prompts, history, state, experience, args, run, last_saved):
    """The checkpoint of `step`, after the divergence guard's last look: the updated policy's KL to
    the reference (k2 on this step's rollouts) must stay within --max-kl before it is saved."""
    policy, critic = unwrap(models.policy), models.critic and unwrap(models.critic)
    if args.max_kl:
        with torch.no_grad():
            logprobs = policy(experience.input_ids, experience.attention_mask, experience.response_mask,
                                     args.temperature).logprobs
        kl = losses.sequence_kl(logprobs, experience.ref_logprobs, experience.response_mask, "k2").mean().item()
        check_divergence(step, "the updated policy's KL to the reference (k2 on this step's rollouts)", kl,
                         "--max-kl", args.max_kl, divergence_hint(run), last_saved, experience.input_ids.device)
    trainer_state = {"step": step, "anchors": [p.anchor for p in prompts], "world_size": get_world_size(),
                     "advantage_estimator": args.advantage_estimator, "history": history, "reward_norm": state.get("reward_norm"),
                     "policy_trainable": lora.trainable_state_dict(policy) if args.lora_rank else None,
                     "critic_trainable": lora.trainable_state_dict(critic) if args.critic_lora_rank else None}
    ppo_checkpoint.save(os.path.join(args.out_dir, "checkpoint"), policy, critic, optimizers, tok, trainer_state,
                        args.fsdp)


def divergence_hint(run) -> str:
    return f"--lr {run.lr:g}, --kl-coef, --clip-low/--clip-high"


# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    t_start = time.time()
    args = get_args(argv)
    validate_args(args)
    _, rank, _, world_size, device = compute_init(args.device)
    check_divides(args.prompts_per_step, "--prompts-per-step", world_size)
    if args.prompts_per_step // world_size * args.samples_per_prompt % args.minibatches:
        raise UserError(f"--minibatches {args.minibatches}: each rank's batch of {args.prompts_per_step // world_size} "
                        f"prompts x {args.samples_per_prompt} samples does not split into {args.minibatches} equal "
                        "minibatches; pick a divisor (or change --prompts-per-step / --samples-per-prompt)")
    check_out_dir(args.out_dir)
    with claim_out_dir(args.out_dir), common.compute_precision(args.dtype, device):  # one run per --out-dir
        history = train(args, rank, world_size, device)
    if rank == 0 and "after" in history:
        print0(f"done in {time.time() - t_start:.0f} s (setup included) | {args.out_dir}")
    compute_cleanup()
    return history


def train(args, rank, world_size, device):
    set_seed(args.seed)
    run, tok, train_prompts, eval_prompts, state = load_inputs(args, world_size)
    models, optimizers = build_models(args, run, tok, train_prompts, eval_prompts, state, device)
    print0(f"PPO | reward {args.reward} ({args.reward_transform}, symmetric={args.symmetric}) | critic {args.critic} | "
           f"advantages {args.advantage_estimator} | {len(train_prompts):,} prompts | "
           f"{args.prompts_per_step}x{args.samples_per_prompt} samples/step | {args.steps} steps | "
           f"lr {run.lr:g}, critic {run.critic_lr or 0:g} | {world_size} rank(s) on {device}"
           f"{' (FSDP2)' if args.fsdp else ''} | out {args.out_dir}")
    logger = MetricsLogger(args.out_dir, report_to=args.report_to, config=vars(args) | {"lr": run.lr, "critic_lr": run.critic_lr})
    step = state["step"]
    if args.resume:
        logger.truncate(step)                                        # the crashed run's later rows go
    history = dict(state.get("history", {}))                         # a resumed run keeps "before"
    last_saved = step or None
    evaluate = lambda tag: held_out(tag, step, history, models, eval_prompts, tok, logger, args, run, device)
    if step == 0:
        evaluate("before")
    progress = Progress(args.steps - step, "ppo", every=max(1, args.steps // 10))
    while step < args.steps:
        t0 = time.time()
        # this rank's prompts and random streams: functions of (seed, step, rank), so resume is exact
        step_prompts = [train_prompts[i] for i in batching.rank_batch(len(train_prompts), args.prompts_per_step, step,
                                                                      args.seed, rank, world_size)]
        stream = step * world_size + rank
        rollout_generator = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "rollout", stream))
        minibatch_generator = torch.Generator().manual_seed(derive_seed(args.seed, "minibatches", stream))
        experience, stats = make_experience(step_prompts, models, tok, args, run, device, rollout_generator)
        check_divergence(step + 1, "rollout KL to the reference", stats["rollout/kl"], "--max-kl", args.max_kl,
                         divergence_hint(run), last_saved, device)
        t_update = clock(device)
        stats.update(ppo_update(experience, models, optimizers, args, run, minibatch_generator, step, last_saved,
                                warmup=step < args.critic_warmup_steps))
        step += 1
        stats["perf/update_s"] = clock(device) - t_update
        log_step(logger, step, stats, time.time() - t0, args, run, last_saved, device)
        progress.update(step - state["step"])
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(f"step{step}")
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save_step(step, models, optimizers, tok, train_prompts + eval_prompts, history, state, experience, args, run,
                      last_saved)
            last_saved = step
    evaluate("after")
    logger.close()
    report(history, args)
    barrier()
    return history


def log_step(logger, step, stats, dt, args, run, last_saved, device):
    """One metrics row: every rank's statistics in one collective (means; tokens summed), then the
    divergence guard on the update's largest ratio (maxed over the ranks)."""
    ratio_max = stats["ppo/ratio_max"]
    stats = mean_over_ranks(stats, device, sum_keys=("tokens", "perf/judge_rows", "perf/judge_tokens"))
    tokens = stats.pop("tokens")
    stats.update({"perf/ms": 1000 * dt, "perf/tok_per_s": tokens / dt})
    logger.log(step, stats, total=args.steps,
               console_keys=["reward/score", "rollout/win_rate", "rollout/kl", "ppo/clipfrac",
                             "loss/v", "rollout/length", "perf/ms", "perf/tok_per_s"])
    check_divergence(step, "PPO ratio pi/pi_old", ratio_max, "--max-ratio", args.max_ratio, divergence_hint(run),
                     last_saved, device)


def held_out(tag, step, history, models, eval_prompts, tok, logger, args, run, device):
    """history[tag] = the held-out metrics of the policy now (evaluation.evaluate_policy), logged."""
    if eval_prompts:
        history[tag] = evaluate_policy(unwrap(models.policy), models.ref, models.judge, eval_prompts, tok,
                                       run.judge_template, run.sampling, args.seed, device)
        logger.log(step, {f"eval/{k}": v for k, v in history[tag].items()}, total=args.steps)


def report(history, args):
    """The before / after table on the console and OUT_DIR/eval.json (rank 0)."""
    if get_rank() != 0 or "after" not in history:
        return
    before = history.get("before", {})
    print0("\nheld-out metric        before    after")
    for k, v in history["after"].items():
        print0(f"{k:<20} {before.get(k, float('nan')):>8.4f} {v:>8.4f}")
    atomic_write_text(os.path.join(args.out_dir, "eval.json"), dumps_json(history, indent=2))


if __name__ == "__main__":
    cli_main(main)
