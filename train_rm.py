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
reliability diagram's bins, drawn by scripts/plot.py) and write an HF-format checkpoint to
OUT_DIR/checkpoint (nanopairwise/rm_checkpoint.py) that `--resume` continues from exactly.
Under torchrun the model is DDP-wrapped, or FSDP2-sharded with --fsdp, as in train_ppo.py.

Flags, files, OUT_DIR and input lengths are checked before the model loads (one line, exit 2);
a NaN loss or gradient norm stops the run before the optimizer step, so the last checkpoint
survives; one run per OUT_DIR (OUT_DIR/.lock). docs/FAULTS.md lists what each fault gets.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch

from nanopairwise import batching, bootstrap, checkpoint, formats, lora, rm_checkpoint, tracking
from nanopairwise.common import (DTYPES, Progress, compute_precision, atomic_write_text, dumps_json,
                                 parse_dtype, set_rng_state, set_seed)
from nanopairwise.data import DEFAULT_PRINCIPLE
from nanopairwise.distributed import (barrier, clip_grad_norm, compute_cleanup, compute_init, gathered, get_rank, print0,
                                      wrap_data_parallel)
from nanopairwise.evaluation import evaluate_reward_model
from nanopairwise.guards import (UserError, check_divides, check_finite_over_ranks, check_flag, check_input_file,
                                 check_length, check_model_dir, check_out_dir, check_rows, cli_main)
from nanopairwise.judge import PairwiseJudge, judge_loss, position_consistency_loss, verdict_token_ids
from nanopairwise.layouts import JudgeTemplate, encode_pair, encode_rm_batch, encode_single
from nanopairwise.model import Block, Transformer
from nanopairwise.rundir import claim_out_dir
from nanopairwise.scalar_head import ScalarHeadModel, bt_loss
from nanopairwise.tokenizer import Tokenizer
from nanopairwise.tracking import MetricsLogger


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
                   help="format of --train-data / --eval-data (JSON lines or Parquet), nanopairwise/formats.py; "
                        "auto detects it from the fields of the first row and prints what it found")
    p.add_argument("--default-principle", default=DEFAULT_PRINCIPLE, help="principle for pairs that carry none")
    # judge format
    p.add_argument("--verdicts", default=" Yes, No", help="the two verdict strings 'yes,no'; each must be one token")
    p.add_argument("--question", default=JudgeTemplate.question, help="the judge's question after the two answers")
    p.add_argument("--max-response-tokens", type=int, default=256, help="responses are cut to this many tokens")
    # optimisation
    p.add_argument("--batch-size", type=int, default=32, help="preference pairs per step, over all ranks")
    p.add_argument("--length-buckets", type=int, default=0, help="length-bucketed batches: sort each run of N "
                   "global batches by input length, then shuffle the batches (less padding; 0 = off)")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the training pairs (default: lora.DEFAULT_EPOCHS by the model's regime and "
                        "--objective, else 4; --resume: the resumed run's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: lora.DEFAULT_LR of the model's regime: tiny, full, lora)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup, then cosine decay to 10%% (default: 20 for a tiny model, else 10%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    # judge position consistency
    p.add_argument("--consistency-coef", type=float, default=0.0,
                   help="pairwise: add this times (p(a > b) - (1 - p(b > a)))^2 over the two orders of each pair")
    # runtime
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (weights and compute; LoRA adapters stay fp32) "
                   "or bf16-mixed (fp32 weights, bf16 matmuls under autocast)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2 (else DDP)")
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
    for name in ("--warmup-steps", "--weight-decay", "--save-every", "--max-steps", "--lora-rank", "--consistency-coef",
                 "--length-buckets"):
        check_flag(args, name, lo=0)
    for name in ("--epochs", "--lr", "--lora-alpha"):
        check_flag(args, name, above=0)
    check_flag(args, "--grad-clip", above=0, zero_ok=True)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")


def check_lengths(pairs, args, tok, limit):
    """Every input the model reads must fit its max_position_embeddings. Responses are cut to
    --max-response-tokens; prompt and principle are never cut, so a pair too long is refused by
    file:line (an over-long input would otherwise reach the attention mask: out of memory). Returns
    each pair's input length (bt: the longer row), what --length-buckets sorts by."""
    single = lambda p, y: len(encode_single(tok, args.template, p.principle, p.prompt, y, args.max_response_tokens))
    lengths = [len(encode_pair(tok, args.template, p.principle, p.prompt, p.chosen, p.rejected, args.max_response_tokens))
               if args.objective == "pairwise" else max(single(p, p.chosen), single(p, p.rejected)) for p in pairs]
    for p, n in zip(pairs, lengths):
        check_length(n, limit, p.source, "the reward model's input", "shorten the prompt or principle, "
                     "or lower --max-response-tokens")
    return lengths


@dataclass
class RunState:
    """What the run works out after parsing; `args` stays the command line (and get_args' defaults)."""
    model: str                           # the starting model (--model, or the task's SFT policy)
    train_data: str                      # --train-data, or the task's train pairs
    eval_data: str                       # --eval-data, or the task's test pairs, or None
    epochs: float = None                 # --epochs, or DEFAULT_EPOCHS of the model's regime (a resumed run: its own)
    lr: float = None                     # --lr, or lora.DEFAULT_LR of the model's regime
    warmup_steps: int = None             # --warmup-steps, or by regime
    total_steps: int = None              # epochs x batches per epoch, at most --max-steps
    lengths: list = None                 # each train pair's input length (check_lengths): --length-buckets

    def resolved(self) -> dict:
        """The flags as this run resolved them: the W&B config and the checkpoint's "args" take them."""
        return dict(model=self.model, train_data=self.train_data, eval_data=self.eval_data, epochs=self.epochs,
                    lr=self.lr, warmup_steps=self.warmup_steps)


def lr_at(step, run: RunState):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < run.warmup_steps:
        return run.lr * (step + 1) / run.warmup_steps
    frac = (step - run.warmup_steps) / max(1, run.total_steps - run.warmup_steps)
    return run.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def loss_fn(model, ids, mask, labels, args, yes_no):
    """Returns (loss, accuracy on this batch) for either objective."""
    if args.objective == "pairwise":
        logits = model(ids, mask)                                                       # (2b, V)
        loss, p_yes = judge_loss(logits, labels, *yes_no)
        if args.consistency_coef:                                                       # rows 2i, 2i + 1: one pair
            loss = loss + args.consistency_coef * position_consistency_loss(logits, *yes_no)
        return loss, ((p_yes > 0.5).long() == labels).float().mean()
    values = model(ids, mask)                                                           # (2b, T)
    r_chosen, r_rejected = batching.gather_last(values, mask).chunk(2)                      # (b,) each
    return bt_loss(r_chosen, r_rejected), (r_chosen > r_rejected).float().mean()


# ----------------------------------------------------------------------------------------------
# setup: inputs checked before the model loads, then the model, its optimizer and the schedule


def resolve_inputs(args) -> RunState:
    """The run's input paths: the flags', or the built-in task's (bootstrapped if missing)."""
    run = RunState(model=args.model, train_data=args.train_data, eval_data=args.eval_data)
    if args.train_data is None:
        paths = bootstrap.ensure_task(args.task_dir, seed=args.seed)
        run.train_data, run.eval_data = paths["pairs_train"], args.eval_data or paths["pairs_test"]
        run.model = args.model or paths["policy"]
    if run.model is None:
        raise UserError("--model DIR is required with --train-data")
    check_model_dir(run.model, "--model")
    check_input_file(run.train_data, "--train-data")
    if run.eval_data:
        check_input_file(run.eval_data, "--eval-data")
    return run


def load_inputs(args, run: RunState, ckpt_dir: str):
    """(train pairs, eval pairs, tokenizer, the directory the weights load from, trainer state),
    every pair checked to fit the model before it loads."""
    load = lambda path: formats.load_preference_pairs(path, skip_bad=args.skip_bad_lines, data_format=args.data_format,
                                                      default_principle=args.default_principle)
    train_pairs = load(run.train_data)
    check_rows(train_pairs, args.batch_size, "--train-data", run.train_data,
               "pairs (after dropping ties and bad lines)", "--batch-size")
    eval_pairs = load(run.eval_data) if run.eval_data else []
    if run.eval_data and not eval_pairs:
        raise UserError(f"--eval-data {run.eval_data}: no usable pairs (after dropping ties and bad lines); "
                        "fix the file or leave out --eval-data")
    if not run.eval_data:
        print0("note: no --eval-data, so no held-out evaluation and no eval.json")
    state = rm_checkpoint.load_state(ckpt_dir, args.lora_rank) if args.resume else {}
    # with LoRA the base weights are re-read from --model and the adapters from the trainer state
    init_dir = ckpt_dir if args.resume and not args.lora_rank else run.model
    tok = Tokenizer.from_pretrained(init_dir if os.path.exists(os.path.join(init_dir, "tokenizer.json")) else run.model)
    lengths = check_lengths(train_pairs + eval_pairs, args, tok, checkpoint.read_config(init_dir)["max_position_embeddings"])
    run.lengths = lengths[:len(train_pairs)]
    return train_pairs, eval_pairs, tok, init_dir, state


def build_model(args, init_dir, state, yes_no, device):
    """(the model, the same wrapped for data parallelism, its AdamW), as the checkpoint left them on
    --resume. The judge is a causal LM; the BT model a trunk + scalar head (the checkpoint's, else a
    new zero head); with --lora-rank only the adapters (and a BT head) train."""
    lm = Transformer.from_pretrained(init_dir, dtype=parse_dtype(args.dtype), device=device)
    if args.objective == "pairwise":
        raw_model = PairwiseJudge(lm, *yes_no)
    elif os.path.exists(os.path.join(init_dir, ScalarHeadModel.HEAD_FILE)):
        raw_model = ScalarHeadModel.from_pretrained(init_dir, dtype=parse_dtype(args.dtype), device=device)
    else:
        raw_model = ScalarHeadModel(lm)
    lora.lora_from_args(raw_model.lm, args)
    model = wrap_data_parallel(raw_model, args.fsdp, Block, device)
    optimizer = torch.optim.AdamW([q for q in raw_model.parameters() if q.requires_grad], lr=0.0,  # lr set per step
                                  weight_decay=args.weight_decay, betas=(0.9, 0.95))
    if args.resume:
        ckpt_dir = os.path.join(args.out_dir, "checkpoint")
        rm_checkpoint.load_optimizer(ckpt_dir, optimizer, state, args.fsdp, get_rank())
        if args.lora_rank:
            lora.load_trainable_state_dict(raw_model, state["trainable"], os.path.join(ckpt_dir, rm_checkpoint.TRAINER_STATE))
    return raw_model, model, optimizer


def resolve_schedule(args, run: RunState, state: dict, regime: str, n_pairs: int):
    """Epochs, peak lr, warmup and total steps: the flags, else the defaults of the model's regime."""
    # a resumed run keeps the schedule it was started with
    run.epochs = args.epochs or state.get("args", {}).get("epochs") or lora.DEFAULT_EPOCHS.get((regime, args.objective), 4.0)
    run.total_steps = max(1, int(n_pairs // args.batch_size * run.epochs))
    if args.max_steps:
        run.total_steps = min(run.total_steps, args.max_steps)
    run.lr = args.lr if args.lr is not None else lora.DEFAULT_LR[regime]["rm"]
    run.warmup_steps = (args.warmup_steps if args.warmup_steps is not None
                        else 20 if regime == "tiny" else max(1, run.total_steps // 10))


def save_step(ckpt_dir, model, tok, optimizer, step, args, run):
    rm_checkpoint.save(ckpt_dir, model, tok, args.objective, args.template, optimizer,
                       {"step": step, "args": vars(args) | run.resolved() | {"template": None},
                        "trainable": lora.trainable_state_dict(model) if args.lora_rank else None}, args.fsdp)


# ----------------------------------------------------------------------------------------------
# main


def main(argv=None):
    args = get_args(argv)
    validate_args(args)
    _, rank, _, world_size, device = compute_init(args.device)
    check_divides(args.batch_size, "--batch-size", world_size)
    run = resolve_inputs(args)
    check_out_dir(args.out_dir)
    with claim_out_dir(args.out_dir), compute_precision(args.dtype, device):  # one run per --out-dir
        metrics = train(args, run, rank, world_size, device)
    compute_cleanup()
    return metrics


def train(args, run, rank, world_size, device):
    set_seed(args.seed)
    ckpt_dir = os.path.join(args.out_dir, "checkpoint")
    train_pairs, eval_pairs, tok, init_dir, state = load_inputs(args, run, ckpt_dir)
    yes_no = verdict_token_ids(tok, args.template)
    raw_model, model, optimizer = build_model(args, init_dir, state, yes_no, device)
    resolve_schedule(args, run, state, lora.regime(raw_model.lm), len(train_pairs))
    step = state.get("step", 0)
    if args.resume:
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    print0(f"{args.objective} RM | {len(train_pairs):,} train pairs, {len(eval_pairs):,} eval pairs | "
           f"{sum(p.numel() for p in raw_model.parameters()):,} params "
           f"({sum(p.numel() for p in raw_model.parameters() if p.requires_grad):,} trained) | {world_size} rank(s) on {device}"
           f"{' (FSDP2)' if args.fsdp else ''} | {run.total_steps} steps of {args.batch_size} pairs | "
           f"{lora.regime(raw_model.lm)} lr {run.lr:g}, warmup {run.warmup_steps} | out {args.out_dir}")
    logger = MetricsLogger(args.out_dir, report_to=args.report_to, config=vars(args) | run.resolved() | {"template": None})
    if args.resume:
        logger.truncate(step)                                         # the crashed run's later rows go
    last_saved, first_step, t_last = step or None, step, time.time()
    progress = Progress(run.total_steps - step, f"{args.objective} RM")
    while step < run.total_steps:
        batch = [train_pairs[i] for i in batching.rank_batch(len(train_pairs), args.batch_size, step, args.seed, rank,
                                                             world_size, run.lengths, args.length_buckets)]
        stats = train_step(model, raw_model, optimizer, batch, step, args, run, tok, yes_no, device, last_saved)
        step += 1
        stats["perf/ms"], t_last = 1000 * (time.time() - t_last), time.time()
        logger.log(step, stats, total=run.total_steps)
        progress.update(step - first_step)
        if step == run.total_steps or (args.save_every and step % args.save_every == 0):
            save_step(ckpt_dir, raw_model, tok, optimizer, step, args, run)
            last_saved = step
    metrics = evaluate(raw_model, eval_pairs, args, tok, logger, step, run) if eval_pairs else {}
    logger.close()
    barrier()
    return metrics


def train_step(model, raw_model, optimizer, batch, step, args, run, tok, yes_no, device, last_saved) -> dict:
    """One optimizer step on this rank's pairs of global batch `step`; returns the logged stats (means
    over ranks, checked finite before the step: a NaN stops the run, the last checkpoint kept)."""
    ids, mask, labels = (x.to(device) if x is not None else None for x in
                         encode_rm_batch(tok, args.template, batch, args.objective, args.max_response_tokens))
    lr = lr_at(step, run)
    for g in optimizer.param_groups:
        g["lr"] = lr
    loss, acc = loss_fn(model, ids, mask, labels, args, yes_no)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_grad_norm(raw_model, args.grad_clip, loss.device)
    stats = check_finite_over_ranks(      # one all-reduce and the step's one host sync
        step + 1, {f"{args.objective} RM loss": loss, "train accuracy": acc, f"{args.objective} RM grad norm": grad_norm},
        f"--lr {run.lr:g} (this step's: {lr:.3g}), --warmup-steps, --grad-clip, --dtype, and the data", last_saved)
    optimizer.step()
    return dict(zip(("loss/rm", "train/accuracy", "train/grad_norm"), stats.values())) | {"lr": lr}


def evaluate(raw_model, eval_pairs, args, tok, logger, step, run) -> dict:
    """Held-out metrics (every rank computes them: FSDP gathers are collective), eval.json by rank 0."""
    with gathered(raw_model):                                           # verdict logits bypass forward()
        metrics = evaluate_reward_model(raw_model, args.objective, eval_pairs, tok, args.template,
                                        args.eval_batch_size, args.max_response_tokens)
    if get_rank() == 0:
        atomic_write_text(os.path.join(args.out_dir, "eval.json"), dumps_json(metrics, indent=2))
    scalars = {k: v for k, v in metrics.items() if k != "reliability"}  # eval.json has the diagram's bins too
    print0("eval | " + " | ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
    logger.log(step, {f"eval/{k}": v for k, v in scalars.items()}, total=run.total_steps, console_keys=[])
    return metrics


if __name__ == "__main__":
    cli_main(main)
