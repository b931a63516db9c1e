"""Train the generative pairwise judge (default) or the Bradley-Terry baseline (--objective bt).

    python train_rm.py                                  # judge on the built-in task (bootstraps it)
    python train_rm.py --objective bt                   # the BT scalar reward model baseline
    torchrun --standalone --nproc_per_node=2 train_rm.py
    python train_rm.py --model DIR --train-data pairs.jsonl --eval-data heldout.jsonl --out-dir runs/my_judge

The pairwise judge (nanopairwise/judge.py) is a causal LM trained with next-token cross-entropy
on a verdict token; every pair appears in both orders in every batch (--consistency-coef adds a
penalty on the gap between p(a > b) and 1 - p(b > a), the judge's position bias). The BT baseline puts a
scalar head on the same trunk and trains -log sigmoid(r_w - r_l). Both start from the same
generative model (the SFT policy on the built-in task), evaluate on held-out pairs at the end
(accuracy vs labels and vs the oracle, position consistency, ECE, Brier; eval.json also keeps the
reliability diagram's bins, drawn by scripts/plot.py) and write an
HF-format checkpoint to OUT_DIR/checkpoint that `--resume` continues from exactly.

Flags, files, OUT_DIR and input lengths are checked before the model loads (one line, exit 2);
a NaN loss or gradient norm stops the run before the optimizer step, so the last checkpoint
survives; one run per OUT_DIR (OUT_DIR/.lock). docs/FAULTS.md lists what each fault gets.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanopairwise import bootstrap, checkpoint, data, lora, tracking
from nanopairwise.common import (DTYPES, MetricsLogger, Progress, atomic_dir, atomic_torch_save, atomic_write_text,
                                 dumps_json, get_rng_state, parse_dtype, set_rng_state, set_seed)
from nanopairwise.distributed import all_reduce_sum, compute_cleanup, compute_init, print0
from nanopairwise.guards import (UserError, check_divides, check_finite, check_flag, check_input_file,
                                 check_length, check_model_dir, check_out_dir, check_rows, claim_out_dir, cli_main)
from nanopairwise.judge import (JudgeTemplate, PairwiseJudge, encode_both_orders, encode_pair, encode_single, judge_loss,
                                pair_metrics, position_consistency_loss, save_rm_config, verdict_token_ids, win_probs)
from nanopairwise.model import Transformer
from nanopairwise.scalar_head import ScalarHeadModel, bt_loss, bt_win_prob, scalar_scores
from nanopairwise.tokenizer import Tokenizer


# --epochs by (lora.regime, objective), 4 where not listed. Measured on the built-in task (seed 0,
# held-out oracle accuracy, README "Results"): the tiny judge is still learning after 4 epochs
# (0.632 at 4, 0.704 at 12), the tiny BT model is not (0.662 at 4, 0.666 at 12, with Brier 0.131 -> 0.155).
DEFAULT_EPOCHS = {("tiny", "pairwise"): 12.0}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to train
    p.add_argument("--objective", choices=["pairwise", "bt"], default="pairwise",
                   help="pairwise = generative judge; bt = Bradley-Terry scalar RM baseline")
    p.add_argument("--task-dir", default="runs/task", help="built-in task directory (bootstrapped if missing)")
    p.add_argument("--model", default=None, help="HF checkpoint dir to start from (default: the task's SFT policy)")
    p.add_argument("--train-data", default=None,
                   help="preference pairs, JSON lines or Parquet, see --data-format (default: the task's train pairs)")
    p.add_argument("--eval-data", default=None, help="held-out pairs JSONL (default: the task's test pairs)")
    p.add_argument("--out-dir", default=None, help="run directory (default: runs/judge or runs/bt)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    # data formats (nanopairwise/formats.py)
    p.add_argument("--data-format", choices=["auto", "pairs", "trl", "hh", "ultrafeedback"], default="auto",
                   help="format of --train-data / --eval-data (JSON lines or Parquet): pairs = nanopairwise's own, "
                        "trl = TRL conversational, hh = Anthropic HH text, ultrafeedback = UltraFeedback-binarized; "
                        "auto detects it from the fields of the first row and prints what it found")
    p.add_argument("--default-principle", default=data.DEFAULT_PRINCIPLE, help="principle for pairs that carry none")
    # judge format
    p.add_argument("--verdicts", default=" Yes, No", help="the two verdict strings 'yes,no'; each must be one token")
    p.add_argument("--question", default=JudgeTemplate.question, help="the judge's question after the two answers")
    p.add_argument("--max-response-tokens", type=int, default=256, help="responses are cut to this many tokens")
    # optimisation
    p.add_argument("--batch-size", type=int, default=32, help="preference pairs per step, over all ranks")
    p.add_argument("--length-buckets", type=int, default=0,
                   help="length-bucketed batches: sort each run of N global batches by input length, then shuffle "
                        "the batches (less padding; 0 = off, plain shuffled batches)")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the training pairs (default: 12 for the judge of a tiny model, < 20M parameters, "
                        "else 4: DEFAULT_EPOCHS; --resume: the resumed run's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default by regime, lora.DEFAULT_LR: 1e-3 for a tiny model as "
                        "the built-in one, 1e-5 to fully fine-tune a pretrained LM, 2e-4 with --lora-rank)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup, then cosine decay to 10%% (default: 20 for a tiny model, else 10%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    # judge position consistency
    p.add_argument("--consistency-coef", type=float, default=0.0,
                   help="pairwise: add this times (p(a > b) - (1 - p(b > a)))^2 over the two orders of each pair")
    # runtime
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (weights and compute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: the data order, LoRA initialisation and the built-in task (if bootstrapped here)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0 = run all epochs)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="held-out pairs per forward at evaluation")
    # experiment tracking (nanopairwise/tracking.py)
    tracking.add_arguments(p)
    lora.add_lora_args(p)
    args = p.parse_args(argv)
    tracking.check_arguments(p, args)
    args.out_dir = args.out_dir or os.path.join("runs", "judge" if args.objective == "pairwise" else "bt")
    verdicts = args.verdicts.split(",")
    if len(verdicts) != 2:
        p.error(f"--verdicts needs two comma-separated strings, got {args.verdicts!r}")
    args.template = JudgeTemplate(question=args.question, yes=verdicts[0], no=verdicts[1])
    return args


def validate_args(args):
    """Every flag checked before anything is read or loaded; a UserError names the flag."""
    for name in ("--batch-size", "--eval-batch-size", "--max-response-tokens"):
        check_flag(args, name, lo=1)
    for name in ("--warmup-steps", "--weight-decay", "--save-every", "--max-steps", "--length-buckets"):
        check_flag(args, name, lo=0)
    check_flag(args, "--epochs", above=0)
    check_flag(args, "--lr", above=0)
    check_flag(args, "--lora-rank", lo=0)
    check_flag(args, "--consistency-coef", lo=0)
    check_flag(args, "--lora-alpha", above=0)
    check_flag(args, "--grad-clip", above=0, zero_ok=True)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")


def check_lengths(pairs, args, tok, limit):
    """Every input the model reads must fit its max_position_embeddings. Responses are cut to
    --max-response-tokens; prompt and principle are never cut, so a pair too long is refused by
    file:line (an over-long input would otherwise reach the attention mask: out of memory)."""
    for p in pairs:
        if args.objective == "pairwise":
            n = len(encode_pair(tok, args.template, p.principle, p.prompt, p.chosen, p.rejected,
                                  args.max_response_tokens))
        else:
            n = max(len(encode_single(tok, args.template, p.principle, p.prompt, y, args.max_response_tokens))
                    for y in (p.chosen, p.rejected))
        check_length(n, limit, p.source, "the reward model's input", "shorten the prompt or principle, "
                     "or lower --max-response-tokens")


def load_pairs(path, args):
    """Preference pairs of --train-data / --eval-data as the flags ask (format, bad lines, principle)."""
    return data.load_preference_pairs(path, skip_bad=args.skip_bad_lines, data_format=args.data_format,
                                      default_principle=args.default_principle)


def lr_at(step, total, args):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def batch_tensors(batch, args, tok, device):
    """Token tensors of one rank's share of pairs. pairwise: 2 sequences per pair (both orders)
    with verdict labels; bt: chosen rows then rejected rows."""
    if args.objective == "pairwise":
        seqs, labels = encode_both_orders(tok, args.template, batch, args.max_response_tokens)
        ids, mask = data.pad_batch(seqs, tok.pad_token_id, side="right")
        return ids.to(device), mask.to(device), torch.tensor(labels, device=device)
    seqs = [encode_single(tok, args.template, p.principle, p.prompt, y, args.max_response_tokens)
            for y_key in ("chosen", "rejected") for p in batch for y in [getattr(p, y_key)]]
    ids, mask = data.pad_batch(seqs, tok.pad_token_id, side="right")
    return ids.to(device), mask.to(device), None


def loss_fn(model, ids, mask, labels, args, yes_no):
    """Returns (loss, accuracy on this batch) for either objective."""
    if args.objective == "pairwise":
        logits = model(ids, mask)                                                       # (2b, V)
        loss, p_yes = judge_loss(logits, labels, *yes_no)
        if args.consistency_coef:                                                       # rows 2i, 2i + 1: one pair
            loss = loss + args.consistency_coef * position_consistency_loss(logits, *yes_no)
        return loss, ((p_yes > 0.5).long() == labels).float().mean()
    values = model(ids, mask)                                                           # (2b, T)
    r_chosen, r_rejected = data.gather_last(values, mask).chunk(2)                      # (b,) each
    return bt_loss(r_chosen, r_rejected), (r_chosen > r_rejected).float().mean()


def evaluate(raw_model, pairs, args, tok, yes_no):
    """Held-out metrics of P(chosen > rejected); oracle metrics when the pairs carry oracle fields."""
    raw_model.eval()
    items = [(p.principle, p.prompt, p.chosen, p.rejected) for p in pairs]
    kw = dict(batch_size=args.eval_batch_size, max_response_tokens=args.max_response_tokens)
    if args.objective == "pairwise":
        p_chosen, p_ab, p_ba = win_probs(raw_model, tok, args.template, items, **kw)
    else:
        r_c = scalar_scores(raw_model, tok, args.template, [(a, b, c) for a, b, c, _ in items], **kw)
        r_r = scalar_scores(raw_model, tok, args.template, [(a, b, d) for a, b, _, d in items], **kw)
        p_chosen, p_ab, p_ba = bt_win_prob(r_c, r_r), None, None
    meta = lambda k: torch.tensor([float(p.meta[k]) for p in pairs]) if all(k in p.meta for p in pairs) else None
    metrics = pair_metrics(p_chosen, meta("p_true"), meta("chosen_score"), meta("rejected_score"), p_ab, p_ba)
    raw_model.train()
    return metrics


def build_model(args, init_dir, dtype, device, yes_no):
    lm = Transformer.from_pretrained(init_dir, dtype=dtype, device=device)
    if args.objective == "pairwise":
        return PairwiseJudge(lm, *yes_no)
    if os.path.exists(os.path.join(init_dir, ScalarHeadModel.HEAD_FILE)):
        return ScalarHeadModel.from_pretrained(init_dir, dtype=dtype, device=device)
    return ScalarHeadModel(lm)


def save_checkpoint(path, raw_model, tok, state, args):
    """Model (HF format, LoRA adapters merged) + tokenizer + trainer state, swapped into place atomically."""
    with atomic_dir(path) as tmp:
        (raw_model if args.objective == "bt" else raw_model.lm).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_rm_config(tmp, args.objective, args.template)
        atomic_torch_save(state, os.path.join(tmp, "trainer_state.pt"))


def main(argv=None):
    args = get_args(argv)
    validate_args(args)
    owns_pg = not (dist.is_available() and dist.is_initialized())  # False when called from train_ppo.py
    ddp, rank, _, world_size, device = compute_init(args.device)
    check_divides(args.batch_size, "--batch-size", world_size)
    # ---- inputs checked before any model is loaded -----------------------------------------
    if args.train_data is None:
        paths = bootstrap.ensure_task(args.task_dir, seed=args.seed)
        args.train_data = args.train_data or paths["pairs_train"]
        args.eval_data = args.eval_data or paths["pairs_test"]
        args.model = args.model or paths["policy"]
    if args.model is None:
        raise UserError("--model DIR is required with --train-data")
    check_model_dir(args.model, "--model")
    check_input_file(args.train_data, "--train-data")
    if args.eval_data:
        check_input_file(args.eval_data, "--eval-data")
    check_out_dir(args.out_dir)
    ckpt_dir = os.path.join(args.out_dir, "checkpoint")
    with claim_out_dir(args.out_dir):                               # one run per --out-dir
        return train(args, ddp, rank, world_size, device, owns_pg, ckpt_dir)


def train(args, ddp, rank, world_size, device, owns_pg, ckpt_dir):
    dtype = parse_dtype(args.dtype)
    set_seed(args.seed)
    train_pairs = load_pairs(args.train_data, args)
    check_rows(train_pairs, args.batch_size, "--train-data", args.train_data,
               "pairs (after dropping ties and bad lines)", "--batch-size")
    eval_pairs = load_pairs(args.eval_data, args) if args.eval_data else []
    if args.eval_data and not eval_pairs:
        raise UserError(f"--eval-data {args.eval_data}: no usable pairs (after dropping ties and bad lines); "
                        "fix the file or leave out --eval-data")
    if not args.eval_data:
        print0("note: no --eval-data, so no held-out evaluation and no eval.json")
    # with LoRA the base weights are re-read from --model and the adapters from the trainer state
    init_dir = ckpt_dir if args.resume and not args.lora_rank else args.model
    if args.resume and not os.path.exists(os.path.join(ckpt_dir, "trainer_state.pt")):
        raise UserError(f"--resume: no checkpoint at {ckpt_dir}")
    tok = Tokenizer.from_pretrained(init_dir if os.path.exists(os.path.join(init_dir, "tokenizer.json")) else args.model)
    yes_no = verdict_token_ids(tok, args.template)
    check_lengths(train_pairs + eval_pairs, args, tok, checkpoint.read_config(init_dir)["max_position_embeddings"])
    # ---- model ------------------------------------------------------------------------------
    raw_model = build_model(args, init_dir, dtype, device, yes_no)
    lora.lora_from_args(raw_model.lm, args)  # --lora-rank: only adapters (and a BT head) train
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw_model
    optimizer = torch.optim.AdamW([q for q in raw_model.parameters() if q.requires_grad], lr=0.0,  # lr set per step
                                  weight_decay=args.weight_decay, betas=(0.9, 0.95))
    regime = lora.regime(raw_model.lm)
    state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), weights_only=False) if args.resume else {}
    if args.epochs is None:                      # a resumed run keeps the schedule it was started with
        args.epochs = state.get("args", {}).get("epochs") or DEFAULT_EPOCHS.get((regime, args.objective), 4.0)
    steps_per_epoch = len(train_pairs) // args.batch_size
    total_steps = max(1, int(steps_per_epoch * args.epochs))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    args.lr = args.lr if args.lr is not None else lora.DEFAULT_LR[regime]["rm"]
    if args.warmup_steps is None:
        args.warmup_steps = 20 if regime == "tiny" else max(1, total_steps // 10)
    step = 0
    if args.resume:
        if bool(state.get("trainable")) != bool(args.lora_rank):
            raise UserError(f"--resume: the checkpoint at {ckpt_dir} was written {'with' if args.lora_rank == 0 else 'without'} "
                            "--lora-rank; resume with the same --lora-* flags")
        optimizer.load_state_dict(state["optimizer"])
        if args.lora_rank:
            lora.load_trainable_state_dict(raw_model, state["trainable"], os.path.join(ckpt_dir, "trainer_state.pt"))
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step = state["step"]
    print0(f"{args.objective} RM | {len(train_pairs):,} train pairs, {len(eval_pairs):,} eval pairs | "
           f"{sum(p.numel() for p in raw_model.parameters()):,} params "
           f"({sum(p.numel() for p in raw_model.parameters() if p.requires_grad):,} trained) | {world_size} rank(s) on {device} | "
           f"{total_steps} steps of {args.batch_size} pairs | {regime} lr {args.lr:g}, warmup {args.warmup_steps} | "
           f"out {args.out_dir}")
    logger = MetricsLogger(args.out_dir, report_to=args.report_to, config=vars(args) | {"template": None})
    if args.resume:
        logger.truncate(step)                                         # the crashed run's later rows go
    last_saved = step or None

    # ---- training loop --------------------------------------------------------------------
    lengths = None                                            # --length-buckets: each pair's judge-input length
    if args.length_buckets:
        lengths = [len(encode_pair(tok, args.template, p.principle, p.prompt, p.chosen, p.rejected,
                                   args.max_response_tokens)) for p in train_pairs]
    t_last = time.time()
    progress = Progress(total_steps - step, f"{args.objective} RM")
    first_step = step
    while step < total_steps:
        batch = [train_pairs[i] for i in data.rank_batch(len(train_pairs), args.batch_size, step, args.seed, rank,
                                                         world_size, lengths, args.length_buckets)]
        ids, mask, labels = batch_tensors(batch, args, tok, device)
        lr = lr_at(step, total_steps, args)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, acc = loss_fn(model, ids, mask, labels, args, yes_no)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
        # finite or nothing: one host sync; the means over ranks, so every rank stops alike
        mean_loss, grad_norm = (all_reduce_sum(torch.stack([loss.detach().float(), grad_norm.float()]))
                                / world_size).unbind()                   # the grad norm: the same on every rank
        check_finite(step + 1, {f"{args.objective} RM loss": mean_loss, f"{args.objective} RM grad norm": grad_norm},
                     f"--lr {args.lr:g} (this step's: {lr:.3g}), --warmup-steps, --grad-clip, --dtype, and the data",
                     last_saved)
        optimizer.step()
        step += 1
        dt = time.time() - t_last
        t_last = time.time()
        logger.log(step, {"loss/rm": loss.item(), "train/accuracy": acc.item(), "train/grad_norm": grad_norm.item(),
                          "lr": lr, "perf/ms": 1000 * dt}, total=total_steps)
        progress.update(step - first_step)
        if step == total_steps or (args.save_every and step % args.save_every == 0):
            rngs = [None] * world_size
            if ddp:
                dist.all_gather_object(rngs, get_rng_state())
            else:
                rngs = [get_rng_state()]
            if rank == 0:
                save_checkpoint(ckpt_dir, raw_model, tok, {"optimizer": optimizer.state_dict(), "step": step,
                                                           "rng": rngs, "args": vars(args) | {"template": None},
                                                           "trainable": lora.trainable_state_dict(raw_model)
                                                           if args.lora_rank else None}, args)
            last_saved = step
            if ddp:
                dist.barrier()

    # ---- evaluation -----------------------------------------------------------------------
    metrics = {}
    if rank == 0 and eval_pairs:
        metrics = evaluate(raw_model, eval_pairs, args, tok, yes_no)
        atomic_write_text(os.path.join(args.out_dir, "eval.json"), dumps_json(metrics, indent=2))
        scalars = {k: v for k, v in metrics.items() if k != "reliability"}  # eval.json has the diagram's bins too
        print0("eval | " + " | ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        logger.log(step, {f"eval/{k}": v for k, v in scalars.items()}, total=total_steps, console_keys=[])
    logger.close()
    if ddp:
        dist.barrier()
    if owns_pg:
        compute_cleanup()
    return metrics


if __name__ == "__main__":
    cli_main(main)
