"""One PPO step of train_ppo.py, timed phase by phase, on Qwen2.5-0.5B-shaped random models or a real model.

    python scripts/bench_ppo_step.py                        # GPU: 64 prompts x 1 sample x 256 new tokens, bf16
    python scripts/bench_ppo_step.py --fused-head           # the same with the fused LM-head + log-prob kernel
    python scripts/bench_ppo_step.py --prompts 16 --samples-per-prompt 4
    TRITON_INTERPRET=1 python scripts/bench_ppo_step.py --smoke   # tiny models on the CPU (what the test runs)
    python scripts/bench_ppo_step.py --model DIR --lora-rank 16 --prompts 8 --samples-per-prompt 4 \
        --new-tokens 64 --prompt-len 48          # a real model (SmolLM2), LoRA policy and critic

With --model DIR every role starts from that checkpoint (policy; reference; judge; critic trunk,
fresh head) and the text goes through its own tokenizer, with no stop ids, so every row generates
M tokens; prompts and anchors are random ordinary token ids, decoded. --lora-rank R: the policy as
train_ppo --lora-rank R (reference = adapters off), the critic as --critic-lora-rank R (unless
--critic-lora-rank says otherwise). --naive-judge scores every judge input whole (the path before
prefix sharing). A third table gives each phase's matmul FLOPs (nanopairwise/flops.py: counted
from the step's real tokens; the judge's are the tokens its scoring path runs; attention not
counted) as GFLOP/s and as a share of the fp32 and bf16 matmul peaks measured at the end of the
same run.

What is timed is train_ppo's own step, not a copy of it: nanopairwise/ppo.py's make_experience (whose clock()
timers give the rollout, judge and forward rows) and then ppo_update, as train_ppo.main
calls them, with train_ppo's defaults (get_args) for every setting this script has no flag for
(pairwise reward, both orders, pairwise critic, k1 KL in the reward, AdamW betas, clips, ...).

Models, random weights of the Qwen2.5-0.5B shape (QWEN25_05B of scripts/bench_generate.py), as
train_ppo.main builds them: the policy, PolicyLogprobs(--fused-head); the reference, a copy of the
policy's initial weights behind the policy's head path (policy.reference, as in train_ppo); the judge, a
second random model read through PairwiseJudge's " Yes" / " No" logits; the critic, a
ScalarHeadModel on a copy of the judge's weights with a fresh zero head (what
ScalarHeadModel.from_pretrained(judge, new_head=True) gives). Two AdamW optimisers.

Tokenizer (no hub here, and the text itself does not change a timing): a byte-level BPE trained by
train_bpe on a few hundred synthetic lines of the judge template, so the template's words and the
verdicts " Yes" / " No" are single tokens as with a real tokenizer, with Qwen2.5's chatml turns
(the judge and critic inputs close each response with <|im_end|>, one BPE id); then added tokens
"<|t{id}|>" pad it to the model's vocabulary V (151936), so that every id the random policy
samples decodes to a string that encodes back to that id. train_ppo's text path (decode the rollout,
render the judge template, encode; encode the critic's anchor prefix) thus runs unchanged, at the
lengths a real response has. The eos token gets id V, outside the model's vocabulary: it is never
sampled, so every row generates exactly --new-tokens tokens (the stated workload; train_ppo's
truncation penalty then hits every row, which changes no timing). Where this differs from real
text: the ~500 BPE ids are byte-level pieces that may re-encode to another count after decoding
(~0.3% of sampled ids at V = 151936, half of them in --smoke), so a judge input is 2M + template
tokens give or take a few; and the tokenizer's CPU cost is that of this tokenizer, not Qwen's.

Workload: P = --prompts prompts of --prompt-len random tokens, each with an anchor of M random
tokens (an anchor is a response), K = --samples-per-prompt samples of M = --new-tokens tokens.
K is 1 by default, so the batch is the issue's 64 prompts x 256 new tokens = 64 sequences
(train_ppo's own default is K = 4). The judge reads at most 256 tokens of each response
(verdict_probs' default), so --new-tokens above 256 adds rollout, forward and update work only.

Rows of the first table (median over --repeats steps, after one warm-up step where Triton
compiles; a row's median is its own, so rows need not add up to the step's median exactly):
  rollout  generate(): prefill + M decode steps for P*K rows        tok/s = P*K*M / s
  judge    decode the responses, then P(y > y*) in both orders: two judge forwards per response,
           each over principle, prompt, y, prompt, y*, question     tok/s = judge input tokens / s
  forward  old and reference log-probs (two policy forwards) and the critic's values (one
           forward over the anchor-prefixed input)                   tok/s = tokens of the three / s
  update   ppo_update: --ppo-epochs x --minibatches of policy fwd+bwd (with entropy), critic
           fwd+bwd, clipped PPO loss kernel, grad clipping, two AdamW steps
                                                                     tok/s = epochs x (policy + critic tokens) / s
  other    the rest of make_experience: k1 KL, rewards, two GAE passes, whitening, stats
  step     all of the above, one PPO step                            tok/s = P*K*M / s
Tokens are the real tokens (padding excluded) of the last timed step's rollout. The second table
times each forward of the judge and forward rows alone (the same library calls on that rollout),
median of --repeats after one warm-up call (judge: encoding included, as in the step). Not
triton.testing.do_bench: a step lasts seconds and changes the weights, so each is timed once
with common.clock (which synchronises CUDA) and the median taken.

Correctness before timing: the warm-up step must show every row generated M tokens without eos,
old log-probs equal to the reference's (the reference is the policy's copy behind the same head
path and nothing is updated before they are computed; TOL[dtype] allows for GPU nondeterminism),
win probabilities in [0, 1] and a finite PPO loss (ppo_update raises otherwise); exit code 1 if not.
"""

import argparse
import copy
import dataclasses
import datetime
import importlib.metadata
import math
import os
import resource
import statistics
import sys

import torch

import train_ppo  # its flags and defaults (get_args): the one script a script imports (tests/test_imports.py)
from bench_generate import QWEN25_05B, TINY  # this script's own directory is on sys.path
from bench_judge import cpu_name, random_text
from nanopairwise import checkpoint, data, flops, lora, ops
from nanopairwise.common import clock, derive_seed, parse_dtype
from nanopairwise.distributed import tune_cpu_process
from nanopairwise.judge import PairwiseJudge, verdict_probs, verdict_token_ids
from nanopairwise.layouts import JudgeTemplate, Sampling, encode_pair, encode_pair_segments
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.policy import PolicyLogprobs
from nanopairwise.ppo import Models, RunState, make_experience, ppo_update, resolve_lrs
from nanopairwise.prefix_sharing import shared_token_counts
from nanopairwise.reward import RewardConfig
from nanopairwise.rollout import Rollout  # noqa: E402
from nanopairwise.scalar_head import ScalarHeadModel, critic_values
from nanopairwise.tokenizer import Tokenizer, render_chat, train_bpe  # noqa: E402

# max |old_logprobs - ref_logprobs| allowed in the warm-up check. The reference is the policy's copy
# behind the same head path (policy.reference), so both are one computation on the same weights and
# come out equal; the tolerance only leaves room for a nondeterministic GPU library call. The values
# are those the check had when the reference skipped the fused head (bf16 logits rounded: 2^-8).
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
BPE_SIZE = 512       # target size of the synthetic BPE before the filler tokens
PHASES = ("rollout", "judge", "forward", "update", "other", "step")


def get_args(argv=None):
    defaults = train_ppo.get_args([])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # workload
    p.add_argument("--smoke", action="store_true", help="tiny models and batch on the CPU, fp32: proves the path runs")
    p.add_argument("--prompts", type=int, default=None, help="P prompts per step (default 64; smoke 4)")
    p.add_argument("--samples-per-prompt", type=int, default=None, help="K samples per prompt (default 1; smoke 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="M tokens generated per sample (default 256; smoke 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens before the chat template (64; smoke 8)")
    # PPO settings that change the cost (everything else: train_ppo's defaults)
    p.add_argument("--ppo-epochs", type=int, default=defaults.ppo_epochs, help="as train_ppo --ppo-epochs")
    p.add_argument("--minibatches", type=int, default=defaults.minibatches, help="as train_ppo --minibatches")
    p.add_argument("--fused-head", action="store_true", help="policy log-probs through the fused LM-head kernel")
    # a real model (every role from one checkpoint), LoRA, the judge's scoring path
    p.add_argument("--model", default=None, help="HF checkpoint dir with tokenizer.json: policy, reference, judge "
                   "and critic trunk all start from it (default: random Qwen2.5-0.5B-shaped models)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA policy of this rank, reference = adapters off "
                   "(train_ppo --lora-rank; 0 = full fine-tuning)")
    p.add_argument("--critic-lora-rank", type=int, default=None,
                   help="LoRA critic of this rank (train_ppo --critic-lora-rank; default: --lora-rank; 0 = full)")
    p.add_argument("--naive-judge", action="store_true", help="score every judge input whole, not prefix-shared")
    p.add_argument("--forwards-alone", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each forward of the judge and forward phases alone (the second table)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    # runtime
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up step (median reported); "
                   "0: time the checked warm-up step itself (a CPU run where a step takes minutes and nothing compiles)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    args.device = torch.device("cuda" if cuda else "cpu")
    args.dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    for name, full, smoke in (("prompts", 64, 4), ("samples_per_prompt", 1, 2), ("new_tokens", 256, 8),
                              ("prompt_len", 64, 8)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.critic_lora_rank is None:
        args.critic_lora_rank = args.lora_rank
    args.shape = dict(TINY if args.smoke else QWEN25_05B)
    if args.model:
        cfg = checkpoint.read_config(args.model)
        args.shape = dataclasses.asdict(ModelConfig.from_hf(cfg))
    args.cfg = ModelConfig(**args.shape) if args.model else ModelConfig(model_type="qwen2", **args.shape)
    args.rows = args.prompts * args.samples_per_prompt                         # P*K rollouts per step
    assert args.rows % args.minibatches == 0, "P*K must divide into --minibatches (every row trained)"
    assert args.repeats >= 0 and args.new_tokens >= 1 and args.prompt_len >= 1
    # the arguments train_ppo's step functions read
    args.ppo = train_ppo.get_args(["--samples-per-prompt", str(args.samples_per_prompt),
                                   "--prompts-per-step", str(args.prompts), "--max-new-tokens", str(args.new_tokens),
                                   "--ppo-epochs", str(args.ppo_epochs), "--minibatches", str(args.minibatches),
                                   "--seed", str(args.seed)])
    template = JudgeTemplate()                                              # the judge's, also the critic's
    args.run = RunState(policy=None, prompts=None, eval_prompts=None, judge_template=template,
                        reward=RewardConfig("pairwise", template, args.ppo.reward_transform, args.ppo.symmetric,
                                            shared_prefix=not args.naive_judge),
                        sampling=Sampling(args.ppo.max_new_tokens, args.ppo.temperature, args.ppo.top_p))
    return args


# ----------------------------------------------------------------------------------------------
# tokenizer, models, prompts


class FullLengthTokenizer(Tokenizer):
    """Rollouts stop only at eos, which is outside the model, never at <|im_end|> (train_ppo stops
    at every id in stop_token_ids): every row generates M tokens, the workload being timed."""

    @property
    def stop_token_ids(self) -> list:
        return [self.eos_token_id]


class NeverStopTokenizer(Tokenizer):
    """A real tokenizer whose rollouts never stop early (no stop ids): every row generates M tokens."""

    @property
    def stop_token_ids(self) -> list:
        return []


def build_tokenizer(template: JudgeTemplate, V: int, principle: str, model: str = None):
    """(tokenizer, n_bpe): a chatml BPE of n_bpe ids trained on synthetic judge inputs, filler
    tokens "<|t{id}|>" up to V, and eos at id V, outside the model (see the docstring). With
    `model`: its own tokenizer, never stopping, and n_bpe = 0."""
    if model:
        return NeverStopTokenizer.from_pretrained(model), 0
    lines = [f"Principle: {principle}\n" + render_chat(f"question {i}", "chatml") + f"answer {7 * i}<|im_end|>\n"
             f"{template.question}\nAnswer:{template.yes if i % 2 else template.no}" for i in range(300)]
    hf = train_bpe(lines, BPE_SIZE, special_tokens=("<pad>",), chat_template="chatml").tokenizer
    n_bpe = hf.get_vocab_size(with_added_tokens=True)
    assert n_bpe < V, f"the synthetic BPE has {n_bpe} ids, the model only {V}"
    hf.add_tokens([f"<|t{i}|>" for i in range(n_bpe, V)])                    # ids n_bpe .. V-1
    hf.add_special_tokens(["<|endoftext|>"])                                  # id V: never sampled
    tok = FullLengthTokenizer(hf, eos_token="<|endoftext|>", pad_token="<pad>", chat_template="chatml")
    assert tok.eos_token_id == V and tok.token_to_id(f"<|t{V - 1}|>") == V - 1
    assert tok.end_of_turn_id < n_bpe, "the judge and critic inputs must not hold eos: it is outside the model"
    return tok, n_bpe


def build_models(args, tok):
    """(policy, ref, judge, critic) and the two optimisers, as train_ppo.main builds them."""
    torch.manual_seed(args.seed)
    if args.model:
        cfg = None
        random_lm = lambda: Transformer.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    else:
        cfg = ModelConfig(model_type="qwen2", **args.shape)

        def random_lm():
            with torch.device(args.device):                                   # init on the device: fast
                return Transformer(cfg).to(args.dtype)

    policy_lm, judge_lm = random_lm(), random_lm()
    policy = PolicyLogprobs(policy_lm, args.fused_head)
    critic = ScalarHeadModel(copy.deepcopy(judge_lm))                      # fresh zero head
    if args.critic_lora_rank:                                              # as train_ppo --critic-lora-rank
        lora.apply_lora(critic.lm, args.critic_lora_rank, 2.0 * args.critic_lora_rank)
    if args.lora_rank:                                                     # as train_ppo: adapters, reference = off
        lora.apply_lora(policy_lm, args.lora_rank, 2.0 * args.lora_rank)
        ref = lora.AdaptersOff(PolicyLogprobs(policy_lm, args.fused_head))
    else:
        ref = policy.reference(copy.deepcopy(policy_lm))
    judge = PairwiseJudge(judge_lm, *verdict_token_ids(tok, args.run.judge_template))
    judge.eval().requires_grad_(False)
    run = args.run
    run.lr, run.critic_lr = resolve_lrs(args.ppo, policy_lm, critic.lm)
    trainable = lambda m: [w for w in m.parameters() if w.requires_grad]
    optimizers = [torch.optim.AdamW(trainable(policy), lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0),
                  torch.optim.AdamW(trainable(critic), lr=run.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)]
    return Models(policy, ref, critic, rm=judge, judge=judge), optimizers


def bench_prompts(tok, n_bpe, args):
    """P prompts of --prompt-len random filler tokens, each with an anchor of M random filler tokens."""
    g = torch.Generator().manual_seed(args.seed + 1)
    V = args.shape["vocab_size"]
    rand = lambda n: tok.decode(torch.randint(n_bpe, V, (n,), generator=g).tolist())
    if args.model:                                                            # ordinary ids of the real tokenizer
        rand = lambda n: random_text(tok, n, g)
    return [data.RLPrompt(prompt=rand(args.prompt_len), anchor=rand(args.new_tokens),
                          principle=args.ppo.default_principle) for _ in range(args.prompts)]


# ----------------------------------------------------------------------------------------------
# one step, checks, token counts


def ppo_step(prompts, models, optimizers, tok, args, step):
    """One step as in train_ppo.main (one rank): (experience, seconds per phase, stats)."""
    device, a = args.device, args.ppo
    rollout_generator = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "rollout", step))
    minibatch_generator = torch.Generator().manual_seed(derive_seed(args.seed, "minibatches", step))
    t0 = clock(device)
    exp, stats = make_experience(prompts, models, tok, a, args.run, device, rollout_generator)
    t_update = clock(device)
    stats.update(ppo_update(exp, models, optimizers, a, args.run, minibatch_generator))
    t_end = clock(device)
    s = {"rollout": stats["perf/rollout_s"], "judge": stats["perf/score_s"], "forward": stats["perf/forward_s"],
         "update": t_end - t_update, "step": t_end - t0}
    s["other"] = (t_update - t0) - s["rollout"] - s["judge"] - s["forward"]
    return exp, s, stats


def rollout_of(exp, R):
    """The step's rollout back from its experience (prompt | response split of the sequences)."""
    ids, attn = exp.input_ids, exp.attention_mask
    P = ids.size(1) - R
    ended = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    return Rollout(ids[:, :P], attn[:, :P], ids[:, P:], exp.response_mask.long(), exp.old_logprobs, ended)


def judge_items(prompts, exp, tok, args):
    """(principle, prompt, response, anchor) per rollout row, as reward.score_responses builds them."""
    rows = [p for p in prompts for _ in range(args.samples_per_prompt)]
    texts = rollout_of(exp, args.new_tokens).texts(tok)
    return [(p.principle, p.prompt, y, p.anchor) for p, y in zip(rows, texts)]


def check_warmup(exp, stats, args) -> list:
    """Failures of the warm-up step (an empty list: all good); prints what it checked."""
    M, fails = args.new_tokens, []
    m = exp.response_mask.bool()
    full = bool(m.all()) and m.size(1) == M and stats["rollout/eos_rate"] == 0
    print(f"check: every row generated {M} tokens without eos: {'ok' if full else 'FAILED'}")
    if not full:
        fails.append("rollout length")
    diff = (exp.old_logprobs - exp.ref_logprobs)[m].abs().max().item()
    ok = diff <= TOL[args.dtype]
    print(f"check: max |old - ref log-prob| before any update = {diff:.2e} (tol {TOL[args.dtype]:.0e}): "
          f"{'ok' if ok else 'FAILED'}")
    if not ok:
        fails.append("reference log-probs")
    win = stats["rollout/win_rate"]
    ok = 0.0 <= win <= 1.0 and all(math.isfinite(stats[k]) for k in ("reward/score", "loss/pg", "loss/v"))
    print(f"check: judge win rate {win:.3f} in [0, 1], PPO losses finite: {'ok' if ok else 'FAILED'}")
    if not ok:
        fails.append("scores / losses")
    return fails


def token_counts(exp, items, tok, args):
    """Real tokens each phase reads (see the docstring's table)."""
    policy_tokens, critic_tokens = int(exp.attention_mask.sum()), int(exp.critic_mask.sum())
    a = args.ppo
    per_order = sum(len(encode_pair(tok, args.run.reward.template, *it)) for it in items)   # swapping a, b keeps the length
    generated = args.rows * args.new_tokens
    return {"rollout": generated, "judge": per_order * (2 if a.symmetric else 1),
            "forward": 2 * policy_tokens + critic_tokens, "update": a.ppo_epochs * (policy_tokens + critic_tokens),
            "other": None, "step": generated}, per_order, policy_tokens, critic_tokens


def step_flops(exp, items, tok, args) -> dict:
    """Matmul FLOPs of each phase of the step (nanopairwise/flops.py), from its real tokens: the
    judge's are the tokens its scoring path runs (prefix-shared: each shared prefix once)."""
    cfg, a = args.cfg, args.ppo
    prompt_tokens = int(exp.attention_mask.sum() - exp.response_mask.sum())
    response_tokens, critic_tokens = int(exp.response_mask.sum()), int(exp.critic_mask.sum())
    template = args.run.reward.template
    segments = [encode_pair_segments(tok, template, *it) for it in items]
    if a.symmetric:
        segments += [encode_pair_segments(tok, template, pr, q, b, y) for pr, q, y, b in items]
    judge_tokens = shared_token_counts(segments)[0 if args.naive_judge else 1]
    policy_fwd = flops.block_flops(cfg, prompt_tokens + response_tokens) + flops.head_flops(cfg, response_tokens)
    critic_fwd = flops.block_flops(cfg, critic_tokens)
    out = {"rollout": flops.block_flops(cfg, prompt_tokens + response_tokens) + flops.head_flops(cfg, response_tokens),
           "judge": flops.block_flops(cfg, judge_tokens), "forward": 2 * policy_fwd + critic_fwd,
           "update": a.ppo_epochs * (flops.train_flops(policy_fwd, not args.lora_rank)
                                     + flops.train_flops(critic_fwd, not args.critic_lora_rank)),
           "other": None}
    out["step"] = sum(v for v in out.values() if v)
    return out


def print_flops_table(seconds, step_fl, device):
    """Achieved GFLOP/s of each phase against the fp32 and bf16 matmul peaks measured now."""
    n = 2048 if device.type == "cuda" else 1024
    peaks = {dt: flops.matmul_peak(dt, device, n) for dt in (torch.float32, torch.bfloat16)}
    print(f"\nmatmul peak measured now ({n}^3): fp32 {peaks[torch.float32]:,.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16]:,.0f} GFLOP/s")
    print("\n| phase | GFLOP | GFLOP/s | % of fp32 peak | % of bf16 peak |\n|---|---:|---:|---:|---:|")
    for k in PHASES:
        if step_fl[k] is None:
            continue
        rate = step_fl[k] / 1e9 / seconds[k]
        print(f"| {k} | {step_fl[k] / 1e9:,.1f} | {rate:,.1f} | {100 * rate / peaks[torch.float32]:.1f} | "
              f"{100 * rate / peaks[torch.bfloat16]:.1f} |")


@torch.no_grad()
def time_forwards(prompts, exp, models, tok, args):
    """Each forward of the judge and forward phases alone: {name: median seconds}."""
    policy, ref, critic, judge = models[:4]
    a, R, device, template = args.ppo, args.new_tokens, args.device, args.run.reward.template
    items = judge_items(prompts, exp, tok, args)
    swapped = [(pr, q, b, y) for pr, q, y, b in items]
    calls = {
        "judge, order (y, anchor)": lambda: verdict_probs(judge, tok, template, items),
        "judge, order (anchor, y)": lambda: verdict_probs(judge, tok, template, swapped),
        "old log-probs": lambda: policy(exp.input_ids, exp.attention_mask, exp.response_mask, a.temperature),
        "ref log-probs": lambda: ref(exp.input_ids, exp.attention_mask, exp.response_mask, a.temperature),
        "critic values": lambda: critic_values(critic, exp.critic_ids, exp.critic_mask, exp.critic_prefix_len, R),
    }
    policy.eval()                                                             # as in make_experience
    out = {}
    for name, fn in calls.items():
        fn()                                                                  # warm-up
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = clock(device)
            fn()
            times.append(clock(device) - t0)
        out[name] = statistics.median(times)
    policy.train()
    return out


# ----------------------------------------------------------------------------------------------
# main


def header(args, models, n_bpe):
    dev = args.device
    cpu = f"CPU {cpu_name()}"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
    version = importlib.metadata.version
    params = sum(p.numel() for p in models[0].parameters()) / 1e6
    backend = ops.pick_backend(torch.empty(0, device=dev))
    shape = "tiny shape, random weights" if args.smoke else "Qwen2.5-0.5B shape, random weights"
    if args.model:
        shape = f"{args.model} (real weights)"
    rank = lambda r: f"LoRA rank {r}" if r else "full"
    lora_ = f"policy {rank(args.lora_rank)}, critic {rank(args.critic_lora_rank)}"
    threads = "" if dev.type == "cuda" else f" | {torch.get_num_threads()} threads"
    load = " | load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    a = args.ppo
    print(f"# PPO step | {name} | torch {torch.__version__} | triton {version('triton')} | transformers "
          f"{version('transformers')} | {str(args.dtype).removeprefix('torch.')} | kernels {backend}"
          f"{' + fused head' if args.fused_head else ''} | {datetime.date.today()}{threads}{load}")
    print(f"# policy, reference, judge, critic: {shape}, {params:.1f}M params each, {lora_}, judge "
          f"{'naive' if args.naive_judge else 'prefix-shared'}, "
          f"V {args.shape['vocab_size']:,}{'' if args.model else f' ({n_bpe} BPE ids + filler)'} | {args.prompts} prompts x "
          f"{args.samples_per_prompt} samples x {args.new_tokens} new tokens, prompts of {args.prompt_len} "
          f"tokens | ppo {a.ppo_epochs} epochs x {a.minibatches} minibatches | "
          f"{f'median of {args.repeats} steps after 1 warm-up' if args.repeats else 'the warm-up step timed'}",
          flush=True)


def main(argv=None):
    args = get_args(argv)
    tok, n_bpe = build_tokenizer(args.run.judge_template, args.shape["vocab_size"], args.ppo.default_principle,
                                 args.model)
    models, optimizers = build_models(args, tok)
    prompts = bench_prompts(tok, n_bpe, args)
    header(args, models, n_bpe)

    # warm-up step: Triton compiles, and the checks run before anything is timed
    exp, s, stats = ppo_step(prompts, models, optimizers, tok, args, step=0)
    if check_warmup(exp, stats, args):
        print("FAILED: not timing a step that does not do the stated work")
        return 1
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    runs = [] if args.repeats else [s]
    for i in range(args.repeats):
        exp, s, _ = ppo_step(prompts, models, optimizers, tok, args, step=1 + i)
        runs.append(s)
    seconds = {k: statistics.median(r[k] for r in runs) for k in PHASES}
    peak = torch.cuda.max_memory_allocated(args.device) / 2**30 if args.device.type == "cuda" else None
    items = judge_items(prompts, exp, tok, args)                              # the last timed step's
    tokens, per_order, policy_tokens, critic_tokens = token_counts(exp, items, tok, args)

    print("\n| phase | s (p50) | % of step | tokens | tok/s |\n|---|---:|---:|---:|---:|")
    for k in PHASES:
        n = tokens[k]
        cols = ("-", "-") if n is None else (f"{n:,}", f"{n / seconds[k]:,.0f}")
        print(f"| {k} | {seconds[k]:.3f} | {100 * seconds[k] / seconds['step']:.1f} | {cols[0]} | {cols[1]} |")

    print_flops_table(seconds, step_flops(exp, items, tok, args), args.device)
    if args.device.type == "cpu":                             # ru_maxrss is in KiB on Linux
        print(f"\npeak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    if not args.forwards_alone:
        return 0
    alone = time_forwards(prompts, exp, models, tok, args)
    forward_tokens = {"judge, order (y, anchor)": per_order, "judge, order (anchor, y)": per_order,
                      "old log-probs": policy_tokens, "ref log-probs": policy_tokens, "critic values": critic_tokens}
    print("\n| forward alone | s (p50) | tokens | tok/s |\n|---|---:|---:|---:|")
    for k, t in alone.items():
        print(f"| {k} | {t:.3f} | {forward_tokens[k]:,} | {forward_tokens[k] / t:,.0f} |")
    if peak is not None:
        print(f"\npeak GPU memory allocated during the timed steps: {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    tune_cpu_process()   # the process setup of train_*.py (distributed.compute_init)
    sys.exit(main())
