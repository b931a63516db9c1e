"""Pairwise PPO (Pairwise-RL, arXiv 2504.04950) and the Bradley-Terry PPO baseline.

    torchrun --standalone --nproc_per_node=2 train_ppo.py      # the main job: the whole built-in pipeline
    python train_ppo.py                                         # the same in one process
    python train_ppo.py --reward bt                             # baseline: BT scalar reward, standard critic
    python train_ppo.py --reward bt-anchor                      # BT model's win probability against the anchor
    python train_ppo.py --policy DIR --judge DIR --prompts rl.jsonl --eval-prompts rl_heldout.jsonl

On the built-in task the main job bootstraps the task if missing (tokenizer, SFT policy, pairs, RL
prompts), trains the judge / BT reward model with train_rm.py if missing, runs PPO, and prints the
held-out metrics before and after (oracle score, oracle and judge win rate against the anchor, KL).

One PPO step (per rank, on its share of the global batch):
  1. sample K responses for each prompt of the step with the KV-cache rollout engine
  2. score them: pairwise -> P(y > y*) from the judge in both orders against the prompt's anchor
     y*, then --reward-transform; bt -> the BT reward (r(x, y) - mu) / sigma; bt-anchor ->
     sigmoid(r(x, y) - r(x, y*)), then --reward-transform
  3. old and reference log-probs of the sampled tokens and the critic's values (a forward each)
  4. per-token reward -kl_coef * k1 on every token plus the score on the last token; GAE;
     advantages whitened over the global batch (all ranks)
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
exceeds --max-kl (default 10 nats; the built-in main job ends near 0.3), or a token's ratio
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

import torch
import torch.distributed as dist

import train_rm
from nanopairwise import bootstrap, checkpoint, data, judge as J, lora, losses, ops, tasks, tracking
from nanopairwise.common import (DTYPES, MetricsLogger, Progress, atomic_dir_all_ranks, atomic_torch_save,
                                 atomic_write_text, clock, dumps_json, parse_dtype, set_seed)
from nanopairwise.distributed import (all_reduce_sum, barrier, compute_cleanup, compute_init, full_state_dict, gathered,
                                      get_rank, get_world_size, mean_over_ranks, print0, shard_model, unwrap,
                                      wrap_data_parallel)
from nanopairwise.guards import (UserError, check_divides, check_finite, check_flag, check_input_file,
                                 check_length, check_model_dir, check_out_dir, check_rows, claim_out_dir, cli_main)
from nanopairwise.model import Block, Transformer
from nanopairwise.policy import PolicyLogprobs, encode_prompt
from nanopairwise.rollout import generate
from nanopairwise.tokenizer import Tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # runs and data
    p.add_argument("--run-dir", default="runs", help="where the built-in pipeline keeps task, RMs and PPO runs")
    p.add_argument("--reward", choices=["pairwise", "bt", "bt-anchor"], default="pairwise",
                   help="Pairwise-RL, BT baseline, or the BT model's win probability against the anchor")
    p.add_argument("--policy", default=None, help="initial policy HF dir (default: the task's SFT policy)")
    p.add_argument("--judge", default=None, help="pairwise judge dir (default: RUN_DIR/judge/checkpoint)")
    p.add_argument("--bt-rm", default=None, help="BT reward model dir (default: RUN_DIR/bt/checkpoint)")
    p.add_argument("--prompts", default=None, help="RL prompts JSONL (default: the task's train prompts)")
    p.add_argument("--eval-prompts", default=None, help="held-out RL prompts JSONL (default: the task's)")
    p.add_argument("--out-dir", default=None, help="run directory (default: RUN_DIR/ppo_<reward>)")
    p.add_argument("--default-principle", default="Prefer the response that follows the instruction best.")
    # reward and critic (our reading, see the docstring)
    p.add_argument("--reward-transform", choices=["prob", "centered", "logit"], default="prob")
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
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch")
    p.add_argument("--lr", type=float, default=None, help="policy AdamW learning rate (default by regime, "
                   "lora.DEFAULT_LR: 5e-5 for a tiny model as the built-in one, 1e-6 full fine-tuning, 1e-5 LoRA)")
    p.add_argument("--critic-lr", type=float, default=None,
                   help="critic AdamW learning rate (default: 5e-4 for a tiny model, else 1e-5)")
    p.add_argument("--clip-low", type=float, default=0.2)
    p.add_argument("--clip-high", type=float, default=0.2)
    p.add_argument("--value-clip", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--kl-coef", type=float, default=0.05, help="beta of the KL penalty to the reference")
    p.add_argument("--kl-mode", choices=["reward", "loss"], default="reward", help="k1 in reward, or k3 loss term")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda of the advantages")
    p.add_argument("--value-lam", type=float, default=0.95, help="lambda of the critic's return targets")
    p.add_argument("--grad-clip", type=float, default=1.0)
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
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    # divergence guard: stop (before saving) when the policy runs away from the reference
    p.add_argument("--max-kl", type=float, default=10.0,
                   help="stop when the rollouts' mean sequence KL to the reference exceeds this (0 = off); "
                        "the built-in main job stays near 0.3, the BT baseline near 1")
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


def check_lengths(prompts, tok, args, policy_dir, rm_dir):
    """Every sequence a model will read fits its max_position_embeddings, counting --max-new-tokens
    for the response (twice when a best-of-N anchor is still to be sampled). Prompts are never cut:
    one too long is refused by file:line before any model is loaded (else: out of memory)."""
    limit = lambda path: checkpoint.read_config(path)["max_position_embeddings"]
    policy_max, rm_max = limit(policy_dir), limit(rm_dir)
    judge_max = limit(args.judge) if os.path.exists(os.path.join(args.judge, "config.json")) else None
    hint = "shorten the prompt / anchor / principle or lower --max-new-tokens"
    for p in prompts:
        R = args.max_new_tokens
        anchor, anchor_len = p.anchor or "", 0 if p.anchor else R
        check_length(len(encode_prompt(tok, p.prompt)) + R, policy_max, p.source, "prompt + response", hint)
        pair = J.encode_pair(tok, args.judge_template, p.principle, p.prompt, anchor, "")
        if judge_max:
            check_length(len(pair) + anchor_len + R, judge_max, p.source, "the judge's input", hint)
        critic = (args.rm_template.pair_ids(tok, p.principle, p.prompt, tok.encode(anchor)) if args.critic == "pairwise"
                  else args.rm_template.prefix_ids(tok, p.principle, p.prompt))   # as J.critic_inputs builds it
        check_length(len(critic) + anchor_len + R, rm_max, p.source, "the critic's input", hint)


# ----------------------------------------------------------------------------------------------
# setup: pipeline pieces that may be missing, learning rates that fit the models


def resolve_lrs(args, policy_lm, critic_lm):
    """--lr / --critic-lr left unset take lora.DEFAULT_LR of each model's regime (tiny/full/lora)."""
    args.lr = args.lr if args.lr is not None else lora.DEFAULT_LR[lora.regime(policy_lm)]["policy"]
    if args.critic_lr is None:
        args.critic_lr = lora.DEFAULT_LR[lora.regime(critic_lm)]["critic"]


def ensure_reward_models(args, ddp, rank):
    """Built-in pipeline: bootstrap the task, then train whichever reward model is missing."""
    builtin = args.prompts is None
    if builtin:
        if rank == 0:
            bootstrap.ensure_bootstrap(args.task_dir, seed=args.seed)
        if ddp:
            dist.barrier()
        paths = bootstrap.task_paths(args.task_dir)
        args.prompts, args.eval_prompts = paths["rl_train"], args.eval_prompts or paths["rl_test"]
        args.policy = args.policy or paths["policy"]
    for objective, path in (("pairwise", args.judge), ("bt", args.bt_rm)):
        needed = objective == args.reward.split("-")[0] or (objective == "pairwise" and builtin)  # the judge also evaluates
        if needed and not os.path.exists(os.path.join(path, "config.json")):
            if not builtin:
                raise UserError(f"no reward model at {path}; train one with train_rm.py --objective {objective}")
            print0(f"== training the {objective} reward model (missing at {path}) ==")
            train_rm.main(["--objective", objective, "--task-dir", args.task_dir, "--seed", str(args.seed),
                           "--out-dir", os.path.dirname(path), "--device", args.device])


def load_prompts(path, args):
    prompts = data.load_rl_prompts(path)
    for p in prompts:
        p.principle = p.principle or args.default_principle
    return prompts


@torch.no_grad()
def fill_anchors(prompts, policy, judge, tok, args, device):
    """Best-of-N anchors for prompts without one: N initial-policy samples, each scored by its mean
    symmetric win probability against the other N-1 (round robin), the best kept."""
    missing = [p for p in prompts if not p.anchor]
    if not missing:
        return
    if judge is None:
        raise UserError("prompts without an anchor need a judge (--judge) to pick best-of-N anchors")
    n = args.anchor_samples
    gen = torch.Generator(device=device).manual_seed(args.seed + 17)
    with gathered(policy), gathered(judge):                          # every rank does the same work
        for p in missing:
            ro = generate(policy.lm, [encode_prompt(tok, p.prompt)] * n, args.max_new_tokens, tok.stop_token_ids,
                          tok.pad_token_id, temperature=args.temperature, generator=gen)
            texts = ro.texts(tok)
            items = [(p.principle, p.prompt, texts[i], texts[j]) for i in range(n) for j in range(n) if i != j]
            win = J.judge_win_probs(judge, tok, args.judge_template, items)[0].view(n, n - 1).mean(1)
            p.anchor = texts[int(win.argmax())]


# ----------------------------------------------------------------------------------------------
# scoring and evaluation


@torch.no_grad()
def score_responses(prompts, texts, rm, tok, args):
    """Sequence scores (B,) and the raw win probability against the anchor (B,) (None for bt):
    pairwise -> the judge's; bt-anchor -> the BT model's sigmoid(r(x, y) - r(x, y*)), with
    r(x, y*) cached on the reward model; bt -> r(x, y) normalised by args.reward_norm."""
    if args.reward != "bt":
        items = [(p.principle, p.prompt, y, p.anchor) for p, y in zip(prompts, texts)]
        with gathered(rm):                      # verdict logits bypass forward(); per-rank anchor cache misses
            win = (J.judge_win_probs(rm, tok, args.rm_template, items, symmetric=args.symmetric)[0]
                   if args.reward == "pairwise" else J.bt_anchor_win_probs(rm, tok, args.rm_template, items, rm.anchor_r))
        return losses.transform_score(win, args.reward_transform), win
    items = [(p.principle, p.prompt, y) for p, y in zip(prompts, texts)]
    return losses.normalize_scores(J.scalar_scores(rm, tok, args.rm_template, items), args.reward_norm), None


@torch.no_grad()
def measure_reward_norm(initial_lm, rm, tok, args, device):
    """Mean and std of the BT score r(x, y) over K rollouts of the initial policy (the frozen
    reference) on --reward-norm-prompts training prompts (a seeded draw, split over the ranks;
    moments all-reduced). 64 prompts x K=4 = 256 scores put the std within ~5% (relative standard
    error 1/sqrt(2n)) for the cost of two steps' rollouts. Measured once, kept in the checkpoint."""
    prompts = load_prompts(args.prompts, args)
    n = min(args.reward_norm_prompts, len(prompts)) // get_world_size() * get_world_size()
    if n == 0:
        raise UserError(f"--reward-norm-prompts {args.reward_norm_prompts}: fewer than one prompt per rank "
                        f"({get_world_size()}); raise it, or pass 0 for raw BT scores")
    pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + 29))[:n]
    mine = [prompts[i] for i in data.shard_for_rank(pick.tolist(), get_rank(), get_world_size())
            for _ in range(args.samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(args.seed + 31 + get_rank())
    ro = generate(initial_lm, [encode_prompt(tok, p.prompt) for p in mine], args.max_new_tokens, tok.stop_token_ids,
                  tok.pad_token_id, temperature=args.temperature, top_p=args.top_p, generator=gen)
    r = J.scalar_scores(rm, tok, args.rm_template, [(p.principle, p.prompt, y) for p, y in zip(mine, ro.texts(tok))])
    mean, var = losses.masked_moments(r.to(device), torch.ones_like(r, device=device), distributed=True)
    if not var.sqrt().item() > 1e-6:
        raise UserError(f"the BT reward model gives every one of {n * args.samples_per_prompt} initial-policy rollouts "
                        f"the same score ({mean.item():.4g}), so it cannot be normalised; check --bt-rm {args.bt_rm} "
                        "(trained?) or pass --reward-norm-prompts 0")
    return {"mean": mean.item(), "std": var.sqrt().item(), "n": n * args.samples_per_prompt}


@torch.no_grad()
def evaluate(policy, ref, judge, prompts, tok, args, device):
    """Held-out metrics of the current policy, each rank on its share of `prompts` (all ranks
    call this: FSDP forwards are collective): one sample per prompt at the training temperature
    with a fixed seed per rank, then sums all-reduced. Oracle metrics where the prompts carry the
    task's oracle fields. The oracle win rate counts a tie with the anchor as half a win, like
    the judge's symmetric probability (a gold anchor can only be tied)."""
    policy.eval()
    mine = data.shard_for_rank(prompts, get_rank(), get_world_size())
    gen = torch.Generator(device=device).manual_seed(args.seed + 12345 + get_rank())
    with gathered(policy):                                           # generation bypasses forward()
        ro = generate(policy.lm, [encode_prompt(tok, p.prompt) for p in mine], args.max_new_tokens,
                      tok.stop_token_ids, tok.pad_token_id, temperature=args.temperature, top_p=args.top_p, generator=gen)
    texts = ro.texts(tok)
    ids, attn = ro.sequences()
    lp = policy(ids, attn, ro.response_mask, args.temperature).logprobs
    ref_lp = ref(ids, attn, ro.response_mask, args.temperature).logprobs
    m = ro.response_mask.float()
    sums = {"kl": ((lp - ref_lp) * m).sum(1), "length": m.sum(1), "eos_rate": ro.ended.float()}
    if judge is not None:
        items = [(p.principle, p.prompt, y, p.anchor) for p, y in zip(mine, texts)]
        with gathered(judge):
            sums["judge_win_rate"] = J.judge_win_probs(judge, tok, args.judge_template, items)[0]
    if all("principle_name" in p.meta for p in prompts):
        q = torch.tensor([tasks.oracle_score(p.meta["principle_name"], p.meta["numbers"], y) for p, y in zip(mine, texts)])
        q_anchor = torch.tensor([tasks.oracle_score(p.meta["principle_name"], p.meta["numbers"], p.anchor) for p in mine])
        sums.update(oracle_score=q, oracle_win_rate=(q > q_anchor).float() + 0.5 * (q == q_anchor).float())
    totals = all_reduce_sum(torch.stack([v.float().sum().to(device) for v in sums.values()]))
    policy.train()
    return {k: (t / len(prompts)).item() for k, t in zip(sums, totals)}


# ----------------------------------------------------------------------------------------------
# one PPO step


@torch.no_grad()
def make_experience(step_prompts, models, tok, args, device, gen):
    """Rollout + scores + old/ref log-probs + values + GAE for this rank's prompts (K samples each)."""
    policy, ref, critic, rm = (unwrap(m) for m in models)          # no DDP wrapper needed without grads
    policy.eval()
    K = args.samples_per_prompt
    prompts = [p for p in step_prompts for _ in range(K)]
    t0 = clock(device)
    with gathered(policy):                                           # generation bypasses forward()
        ro = generate(policy.lm, [encode_prompt(tok, p.prompt) for p in prompts], args.max_new_tokens,
                      tok.stop_token_ids, tok.pad_token_id, temperature=args.temperature, top_p=args.top_p,
                      generator=gen)
    t1 = clock(device)
    texts = ro.texts(tok)
    scores, win = score_responses(prompts, texts, rm, tok, args)
    scores = scores.to(device) - args.truncation_penalty * (~ro.ended).float()
    t2 = clock(device)
    ids, attn = ro.sequences()
    mask = ro.response_mask.float()
    old = policy(ids, attn, ro.response_mask, args.temperature).logprobs
    ref_lp = ref(ids, attn, ro.response_mask, args.temperature).logprobs
    c_ids, c_mask, c_pre = J.critic_inputs(tok, args.rm_template, prompts, ro.response_ids, ro.response_mask,
                                           pairwise=args.critic == "pairwise")
    values = J.critic_values(critic, c_ids, c_mask, c_pre, mask.size(1)) * mask
    t3 = clock(device)
    kl = losses.kl_estimate(old, ref_lp, "k1") * mask
    rewards = losses.shape_rewards(scores, mask, kl if args.kl_mode == "reward" else None, args.kl_coef)
    adv, _ = losses.gae_ref(rewards, values, mask, args.gamma, args.lam)
    _, returns = losses.gae_ref(rewards, values, mask, args.gamma, args.value_lam)
    adv = losses.masked_whiten(adv, mask, distributed=True)
    policy.train()
    exp = dict(ids=ids, attn=attn, response_mask=ro.response_mask, old_logprobs=old, ref_logprobs=ref_lp,
               values=values, advantages=adv, returns=returns, c_ids=c_ids, c_mask=c_mask)
    stats = {"reward/score": scores.mean().item(), "rollout/kl": kl.sum(1).mean().item(),
             "rollout/length": mask.sum(1).mean().item(), "rollout/eos_rate": ro.ended.float().mean().item(),
             "perf/rollout_s": t1 - t0, "perf/score_s": t2 - t1, "perf/forward_s": t3 - t2,
             "tokens": int(mask.sum().item())}
    if win is not None:
        stats["rollout/win_rate"] = win.mean().item()
    return exp, c_pre, stats


def ppo_update(exp, c_pre, models, optimizers, args, gen, step=0, last_saved=None, warmup=False):
    """--ppo-epochs passes of --minibatches shuffled minibatches over this rank's experience.
    Before each optimizer step: loss and both gradient norms finite (one host sync), else stop.
    With `warmup` (--critic-warmup-steps) only the critic learns: the policy's forward builds no
    graph and its optimizer does not step, so its weights do not change."""
    policy, _, critic, _ = models
    B, R = exp["response_mask"].shape
    mb = max(1, B // args.minibatches)
    sums = {}
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for i in range(0, B - B % mb if B >= mb else B, mb):
            idx = order[i:i + mb].to(exp["ids"].device)
            e = {k: v[idx] for k, v in exp.items()}
            kl_ref = e["ref_logprobs"] if args.kl_mode == "loss" else None
            with torch.set_grad_enabled(not warmup):
                out = policy(e["ids"], e["attn"], e["response_mask"], args.temperature, entropy=True)
            values = J.critic_values(critic, e["c_ids"], e["c_mask"], c_pre, R)
            m = e["response_mask"].float()
            loss = ops.ppo_loss(out.logprobs, e["old_logprobs"], e["advantages"], m,
                                    clip_low=args.clip_low, clip_high=args.clip_high, ref_logprobs=kl_ref,
                                    kl_coef=args.kl_coef if kl_ref is not None else 0.0, values=values,
                                    old_values=e["values"], returns=e["returns"], value_clip=args.value_clip,
                                    vf_coef=args.vf_coef)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.loss.backward()
            norms = [torch.nn.utils.clip_grad_norm_(mod.parameters(), args.grad_clip or float("inf"))
                     for mod in (policy, critic)]
            # FSDP2 returns a DTensor; a model without gradients (critic warm-up) a CPU zero
            norms = [(n.full_tensor() if hasattr(n, "full_tensor") else n).to(loss.loss.device) for n in norms]
            # means over ranks (the norms are global already), so every rank stops alike
            checked = all_reduce_sum(torch.stack([loss.pg_loss.detach(), loss.v_loss.detach(), *norms]).float())
            checked /= get_world_size()
            check_finite(step + 1, dict(zip(("policy loss (pg)", "critic loss (v)", "policy grad norm",
                                             "critic grad norm"), checked.unbind())),
                         f"--lr {args.lr:g} (policy), --critic-lr {args.critic_lr:g} and --vf-coef (critic), "
                         "--grad-clip, --dtype", last_saved)
            for opt in optimizers[1:] if warmup else optimizers:    # [policy, critic]
                opt.step()
            row = {"loss/pg": loss.pg_loss, "loss/v": loss.v_loss, "loss/kl": loss.kl_loss,
                   "ppo/clipfrac": loss.clipfrac, "ppo/approx_kl": loss.approx_kl, "ppo/ratio_max": loss.ratio_max,
                   "policy/entropy": losses.masked_mean(out.entropy.detach(), m),
                   "critic/explained_var": losses.explained_variance(values.detach(), e["returns"], m)}
            for k, v in row.items():
                sums.setdefault(k, []).append(v.detach().float())     # no host sync per minibatch
    # the largest ratio of the update (the divergence guard reads it), the mean of everything else
    return {k: (torch.stack(v).max() if k == "ppo/ratio_max" else torch.stack(v).mean()).item() for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# checkpoints: policy and critic in HF format, optimizer and trainer state beside them


def save_checkpoint(path, policy, critic, optimizers, tok, state, args):
    """Written atomically by all ranks: weights gathered to rank 0 (collective under FSDP), the
    optimizers' state from rank 0 (DDP: replicated) or from every rank (FSDP: its shards)."""
    policy_state, critic_state = full_state_dict(policy.lm), full_state_dict(critic)
    rank = get_rank()
    with atomic_dir_all_ranks(path) as tmp:
        if rank == 0:
            policy.lm.save_pretrained(os.path.join(tmp, "policy"), state=policy_state)
            tok.save_pretrained(os.path.join(tmp, "policy"))
            critic.save_pretrained(os.path.join(tmp, "critic"), state=critic_state)
            atomic_torch_save(state, os.path.join(tmp, "trainer_state.pt"))
        if rank == 0 or args.fsdp:
            atomic_torch_save([o.state_dict() for o in optimizers], os.path.join(tmp, optimizer_file(args, rank)))


def check_divergence(step, what, value, flag, args, last_saved, device):
    """The divergence guard: a policy far from the reference (or from the rollout policy within an
    update) has run away, whatever its reward says; stop before it is saved. 0 turns it off."""
    limit = getattr(args, flag[2:].replace("-", "_"))
    if get_world_size() > 1:                                         # every rank decides alike
        value = torch.tensor(value, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        value = value.item()
    if limit and not value <= limit:
        saved = f"the last checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written"
        raise UserError(f"step {step}: {what} is {value:.4g}, above {flag} {limit:g}: the policy diverged; stopped "
                        f"before saving, {saved}. Look at --lr {args.lr:g}, --kl-coef, --clip-low/--clip-high "
                        f"({flag} 0 turns this guard off)")


def optimizer_file(args, rank):
    return f"optimizers.rank{rank}.pt" if args.fsdp else "optimizers.pt"


# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    t_start = time.time()
    args = get_args(argv)
    validate_args(args)
    owns_pg = not (dist.is_available() and dist.is_initialized())
    ddp, rank, _, world_size, device = compute_init(args.device)
    check_divides(args.prompts_per_step, "--prompts-per-step", world_size)
    check_out_dir(args.out_dir)
    with claim_out_dir(args.out_dir):                               # one run per --out-dir
        return train(args, ddp, rank, world_size, device, owns_pg, t_start)


def train(args, ddp, rank, world_size, device, owns_pg, t_start):
    dtype = parse_dtype(args.dtype)
    set_seed(args.seed)
    ensure_reward_models(args, ddp, rank)
    # ---- inputs checked before any model is loaded -------------------------------------------
    ckpt = os.path.join(args.out_dir, "checkpoint")
    state = {"step": 0, "anchors": None, "reward_norm": None}
    if args.resume:
        if not os.path.exists(os.path.join(ckpt, "trainer_state.pt")):
            raise UserError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        if bool(state.get("policy_trainable")) != bool(args.lora_rank):
            raise UserError(f"--resume: the checkpoint at {ckpt} was written {'with' if args.lora_rank == 0 else 'without'} "
                            "--lora-rank; resume with the same --lora-* flags")
        if args.fsdp and state["world_size"] != world_size:
            raise UserError(f"--resume --fsdp: the checkpoint holds optimizer shards of {state['world_size']} "
                            f"ranks; run on {state['world_size']} ranks")
    # with LoRA the base weights are re-read from --policy and the adapters from the trainer state
    policy_dir = os.path.join(ckpt, "policy") if args.resume and not args.lora_rank else args.policy
    rm_dir = args.judge if args.reward == "pairwise" else args.bt_rm
    has_judge = args.reward == "pairwise" or os.path.exists(os.path.join(args.judge, "config.json"))
    for path, flag in ((args.policy, "--policy"), (policy_dir, "--resume"),
                       (rm_dir, "--judge" if args.reward == "pairwise" else "--bt-rm")):
        check_model_dir(path, flag)
    check_input_file(args.prompts, "--prompts")
    if args.eval_prompts:
        check_input_file(args.eval_prompts, "--eval-prompts")
    tok = Tokenizer.from_pretrained(policy_dir)
    _, args.judge_template = J.load_rm_config(args.judge)     # each reward model's own text layout
    _, args.rm_template = J.load_rm_config(rm_dir)
    for path in {args.judge, rm_dir} if has_judge else {rm_dir}:  # same strings -> same ids, not just same size
        if Tokenizer.from_pretrained(path).fingerprint() != tok.fingerprint():
            raise UserError(f"the tokenizer of {path} maps text to ids differently from the policy's ({policy_dir}); "
                            "the judge and critic read the policy's tokens, so they must share its tokenizer")
    train_prompts = load_prompts(args.prompts, args)
    check_rows(train_prompts, args.prompts_per_step, "--prompts", args.prompts, "prompts (after dropping bad lines)",
               "--prompts-per-step")
    eval_prompts = load_prompts(args.eval_prompts, args)[:args.eval_size] if args.eval_prompts else []
    if args.eval_prompts and len(eval_prompts) < world_size:
        raise UserError(f"--eval-prompts {args.eval_prompts}: {len(eval_prompts)} usable prompts, fewer than one "
                        f"per rank ({world_size}); fix the file or leave out --eval-prompts")
    if not args.eval_prompts:
        print0("note: no --eval-prompts, so no held-out evaluation and no eval.json")
    eval_prompts = eval_prompts[:len(eval_prompts) - len(eval_prompts) % world_size]   # equal shares
    check_lengths(train_prompts + eval_prompts, tok, args, policy_dir, rm_dir)

    # ---- models: policy (trained), reference (frozen), reward model (frozen), critic (trained)
    load = lambda path: Transformer.from_pretrained(path, dtype=dtype, device=device)
    policy = PolicyLogprobs(lora.lora_from_args(load(policy_dir), args), args.fused_head)
    if args.lora_rank:  # the reference is the policy with its adapters off: no second copy
        ref = lora.AdaptersOff(PolicyLogprobs(policy.lm, args.fused_head))  # same head path as the policy
        if args.resume:
            lora.load_trainable_state_dict(policy, state["policy_trainable"], os.path.join(ckpt, "trainer_state.pt"))
    else:
        ref = policy.reference(load(args.policy))              # same head path (--fused-head) as policy
    judge = None
    if os.path.exists(os.path.join(args.judge, "config.json")):
        judge = J.PairwiseJudge(load(args.judge), *J.verdict_token_ids(tok, args.judge_template))
        judge.eval().requires_grad_(False)
    rm = judge if args.reward == "pairwise" else J.ScalarHeadModel.from_pretrained(rm_dir, dtype, device).eval()
    rm.requires_grad_(False)
    rm.anchor_r = {}                                                  # bt-anchor: r(x, y*) per anchor, scored once
    # the BT critic starts as the RM, head included (InstructGPT, N+ details, OpenRLHF); the judge has no
    # scalar head, and bt-anchor's probability is not affine in r, so those critics get a fresh zero head
    rm_head = args.reward == "bt" and args.critic == "standard" and not args.critic_fresh_head
    critic = (J.ScalarHeadModel.from_pretrained(os.path.join(ckpt, "critic"), dtype, device) if args.resume
              else J.ScalarHeadModel.from_pretrained(rm_dir, dtype, device, new_head=not rm_head))
    if args.reward == "bt" and args.reward_norm_prompts and state.get("reward_norm") is None:
        with lora.adapters_disabled(policy.lm):                     # LoRA: the base weights are the reference
            initial_lm = policy.lm if args.lora_rank else ref.lm
            state["reward_norm"] = measure_reward_norm(initial_lm, rm, tok, args, device)
        print0(f"BT reward normalisation over {state['reward_norm']['n']} initial-policy rollouts: "
               f"mean {state['reward_norm']['mean']:.4f}, std {state['reward_norm']['std']:.4f}")
    args.reward_norm = state.get("reward_norm") if args.reward == "bt" else None
    if rm_head and args.reward_norm and not args.resume:
        critic.normalize_head_(args.reward_norm["mean"], args.reward_norm["std"])   # V in the reward's units
    # under torchrun: trained models DDP-wrapped or FSDP2-sharded, frozen ones sharded too with FSDP
    policy_dp = wrap_data_parallel(policy, args.fsdp, Block, device)
    critic_dp = wrap_data_parallel(critic, args.fsdp, Block, device)
    if args.fsdp and world_size > 1:
        for frozen in {id(m): m for m in (ref, rm, judge) if m is not None}.values():
            shard_model(frozen, Block)
    resolve_lrs(args, policy.lm, critic.lm)
    optimizers = [torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0),
                  torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)]
    if args.resume:
        saved = torch.load(os.path.join(ckpt, optimizer_file(args, rank)), weights_only=False)
        for opt, sd in zip(optimizers, saved):
            opt.load_state_dict(sd)

    # ---- anchors (fixed for the run; stored in the checkpoint) --------------------------------
    step = state["step"]
    for p, a in zip(train_prompts + eval_prompts, state["anchors"] or []):   # best-of-N ones too
        p.anchor = a
    fill_anchors(train_prompts + eval_prompts, policy, judge, tok, args, device)
    models = (policy_dp, ref, critic_dp, rm)
    print0(f"PPO | reward {args.reward} ({args.reward_transform}, symmetric={args.symmetric}) | critic {args.critic} | "
           f"{len(train_prompts):,} prompts | {args.prompts_per_step}x{args.samples_per_prompt} samples/step | "
           f"{args.steps} steps | lr {args.lr:g}, critic {args.critic_lr:g} | {world_size} rank(s) on {device}"
           f"{' (FSDP2)' if args.fsdp else ''} | out {args.out_dir}")
    logger = MetricsLogger(args.out_dir, report_to=args.report_to, config=vars(args))
    if args.resume:
        logger.truncate(step)                                        # the crashed run's later rows go
    history = dict(state.get("history", {}))                         # a resumed run keeps "before"
    last_saved = step or None

    def run_eval(tag):
        if eval_prompts:
            history[tag] = evaluate(policy, ref, judge, eval_prompts, tok, args, device)
            logger.log(step, {f"eval/{k}": v for k, v in history[tag].items()}, total=args.steps)

    if step == 0:
        run_eval("before")
    per_rank = args.prompts_per_step // world_size
    progress = Progress(args.steps - step, "ppo", every=max(1, args.steps // 10))
    while step < args.steps:
        t0 = time.time()
        # the same prompt order on every rank, a function of (seed, epoch): resume is exact
        per_epoch = len(train_prompts) // args.prompts_per_step
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        start = pos * args.prompts_per_step + rank * per_rank
        step_prompts = [train_prompts[i] for i in order[start:start + per_rank].tolist()]
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step * world_size + rank)
        cpu_gen = torch.Generator().manual_seed(args.seed * 7919 + step * world_size + rank)
        exp, c_pre, stats = make_experience(step_prompts, models, tok, args, device, gen)
        check_divergence(step + 1, "rollout KL to the reference", stats["rollout/kl"], "--max-kl", args, last_saved,
                         device)
        t_update = clock(device)
        stats.update(ppo_update(exp, c_pre, models, optimizers, args, cpu_gen, step, last_saved,
                                warmup=step < args.critic_warmup_steps))
        step += 1
        stats["perf/update_s"] = clock(device) - t_update
        dt = time.time() - t0
        ratio_max = stats["ppo/ratio_max"]                            # the guard takes the max over ranks
        stats = mean_over_ranks(stats, device, sum_keys=("tokens",))  # every rank's batch, one collective
        tokens = stats.pop("tokens")
        stats.update({"perf/ms": 1000 * dt, "perf/tok_per_s": tokens / dt})
        logger.log(step, stats, total=args.steps,
                   console_keys=["reward/score", "rollout/win_rate", "rollout/kl", "ppo/clipfrac",
                                 "loss/v", "rollout/length", "perf/ms", "perf/tok_per_s"])
        check_divergence(step, "PPO ratio pi/pi_old", ratio_max, "--max-ratio", args, last_saved, device)
        progress.update(step - state["step"])
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            run_eval(f"step{step}")
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            if args.max_kl:                          # the updated policy, before it is saved: on this step's rollouts
                with torch.no_grad():
                    lp = policy(exp["ids"], exp["attn"], exp["response_mask"], args.temperature).logprobs
                kl = (losses.kl_estimate(lp, exp["ref_logprobs"], "k2") * exp["response_mask"]).sum(1).mean().item()
                check_divergence(step, "the updated policy's KL to the reference (k2 on this step's rollouts)", kl,
                                 "--max-kl", args, last_saved, device)
            trainer_state = {"step": step, "anchors": [p.anchor for p in train_prompts + eval_prompts],
                             "world_size": world_size, "history": history, "reward_norm": state.get("reward_norm"),
                             "policy_trainable": lora.trainable_state_dict(policy) if args.lora_rank else None}
            save_checkpoint(ckpt, policy, critic, optimizers, tok, trainer_state, args)
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
