"""scripts/bench_ppo_step.py: the --smoke run times a whole PPO step and prints every row; its
warm-up checks fail on a step that does not do the stated work; the synthetic tokenizer and the
models are built as the docstring says.

The smoke run is a subprocess with TRITON_INTERPRET=1, so the step goes through the Triton
kernels (log-prob, PPO loss) under the interpreter, the same dispatch a GPU run takes, rather
than NANOPAIRWISE_KERNELS=ref, which would only prove the eager path. OMP_NUM_THREADS=1: the
tensors are tiny, and on a 2-core machine shared with other jobs a second OpenMP thread only
adds spin-waiting (the run is ~6x slower with 2 threads there). About 15 s.
"""

import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_ppo_step as bench  # noqa: E402
from nanopairwise.judge import verdict_token_ids
from nanopairwise.layouts import encode_pair

PHASES = ("rollout", "judge", "forward", "update", "other", "step")
FORWARDS = ("judge, order (y, anchor)", "judge, order (anchor, y)", "old log-probs", "ref log-probs", "critic values")
NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"


def test_smoke_run_prints_header_checks_and_every_phase():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # no pip install -e needed
    env.pop("NANOPAIRWISE_KERNELS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_ppo_step.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    head = out.splitlines()[0]
    for part in ("# PPO step | CPU", f"torch {torch.__version__}", "triton ", "transformers ", "float32",
                 "kernels triton"):
        assert part in head, (part, head)
    assert "4 prompts x 2 samples x 8 new tokens, prompts of 8 tokens" in out
    assert "ppo 2 epochs x 2 minibatches | median of 3 steps after 1 warm-up" in out
    assert out.count(": ok\n") == 3 and "FAILED" not in out
    assert "max |old - ref log-prob| before any update = 0.00e+00" in out   # same path, same weights
    rows = {}
    for k in PHASES:
        m = re.search(rf"^\| {k} \| {NUM} \| {NUM} \| (-|{NUM}) \| (-|{NUM}) \|$", out, re.M)
        assert m, f"no row for phase {k}:\n{out}"
        rows[k] = float(m.group(1)), float(m.group(2)), m.group(3)
    assert rows["step"][1] == 100.0
    assert rows["rollout"][2] == rows["step"][2] == "64"                        # 4 x 2 x 8 generated tokens
    assert rows["other"][2] == "-"
    for k in ("rollout", "judge", "forward", "update"):
        assert 0 < rows[k][0] < rows["step"][0], (k, rows)
    for k in FORWARDS:
        assert re.search(rf"^\| {re.escape(k)} \| {NUM} \| {NUM} \| {NUM} \|$", out, re.M), k


def _tiny_args(*extra):
    return bench.get_args(["--smoke", *extra])


def test_tokenizer_round_trips_filler_and_keeps_eos_outside_the_model():
    args = _tiny_args()
    V = args.shape["vocab_size"]
    tok, n_bpe = bench.build_tokenizer(args.run.judge_template, V, args.ppo.default_principle)
    assert tok.eos_token_id == V and tok.pad_token_id < n_bpe < V
    yes, no = verdict_token_ids(tok, args.run.judge_template)        # raises unless single tokens
    assert max(yes, no) < n_bpe
    ids = list(range(n_bpe, V, 7))
    assert tok.encode(tok.decode(ids)) == ids                                 # filler ids survive decode/encode
    prompts = bench.bench_prompts(tok, n_bpe, args)
    p = prompts[0]
    assert len(prompts) == 4 and len(tok.encode(p.prompt)) == 8 and len(tok.encode(p.anchor)) == 8
    assert max(encode_pair(tok, args.run.judge_template, p.principle, p.prompt, "x", p.anchor)) < V  # no eos


def test_models_as_train_ppo_builds_them():
    args = _tiny_args("--fused-head")
    tok, _ = bench.build_tokenizer(args.run.judge_template, args.shape["vocab_size"], args.ppo.default_principle)
    (policy, ref, critic, judge, _), optimizers = bench.build_models(args, tok)
    assert policy.fused_head and ref.fused_head                               # as in train_ppo.main
    for (name, p), q in zip(policy.lm.state_dict().items(), ref.lm.state_dict().values()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name       # a copy, not the same tensors
    assert not any(p.requires_grad for p in ref.parameters()) and not any(p.requires_grad for p in judge.parameters())
    for p, q in zip(judge.lm.parameters(), critic.lm.parameters()):
        assert torch.equal(p, q) and q.requires_grad
    assert not critic.score_head.weight.any() and not critic.score_head.bias.any()   # fresh zero head
    assert not torch.equal(policy.lm.lm_head_weight, judge.lm.lm_head_weight)         # two random models
    assert [g["lr"] for o in optimizers for g in o.param_groups] == [args.run.lr, args.run.critic_lr]


def _good_step(args):
    B, M = args.rows, args.new_tokens
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, M, generator=g)
    exp = SimpleNamespace(response_mask=torch.ones(B, M, dtype=torch.long), old_logprobs=lp, ref_logprobs=lp.clone())
    stats = {"rollout/eos_rate": 0.0, "rollout/win_rate": 0.4, "reward/score": -0.1, "loss/pg": 0.01, "loss/v": 0.2}
    return exp, stats


def test_warmup_checks_pass_a_good_step_and_fail_each_bad_one(capsys):
    args = _tiny_args()
    exp, stats = _good_step(args)
    assert bench.check_warmup(exp, stats, args) == []
    bad = []
    exp, stats = _good_step(args)
    exp.response_mask[1, -3:] = 0                                          # a row stopped early
    bad.append((exp, stats, "rollout length"))
    exp, stats = _good_step(args)
    exp.response_mask = exp.response_mask[:, :-1]                       # fewer than M tokens
    bad.append((exp, stats, "rollout length"))
    exp, stats = _good_step(args)
    stats["rollout/eos_rate"] = 0.125
    bad.append((exp, stats, "rollout length"))
    exp, stats = _good_step(args)
    exp.ref_logprobs[2, 5] += 10 * bench.TOL[torch.float32]               # reference is not the policy
    bad.append((exp, stats, "reference log-probs"))
    exp, stats = _good_step(args)
    stats["rollout/win_rate"] = 1.5
    bad.append((exp, stats, "scores / losses"))
    exp, stats = _good_step(args)
    stats["loss/v"] = math.nan
    bad.append((exp, stats, "scores / losses"))
    for exp, stats, want in bad:
        if exp.response_mask.size(1) < args.new_tokens:
            exp.old_logprobs, exp.ref_logprobs = (getattr(exp, k)[:, :exp.response_mask.size(1)]
                                                  for k in ("old_logprobs", "ref_logprobs"))
        assert bench.check_warmup(exp, stats, args) == [want]
    assert capsys.readouterr().out.count("FAILED") == len(bad)


def test_lora_smoke_run_prints_the_flop_table():
    """--lora-rank (policy) with a full critic and the naive judge: the configuration of 'today's
    figure'; the FLOP table has every phase, and the matmul peaks are measured in the run."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("NANOPAIRWISE_KERNELS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_ppo_step.py"), "--smoke", "--lora-rank",
                           "2", "--critic-lora-rank", "0", "--naive-judge", "--no-forwards-alone", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "policy LoRA rank 2, critic full, judge naive" in out and out.count(": ok\n") == 3
    assert "max |old - ref log-prob| before any update = 0.00e+00" in out    # adapters start at B = 0
    assert re.search(rf"^matmul peak measured now \(1024\^3\): fp32 {NUM} GFLOP/s, bf16 {NUM} GFLOP/s$", out, re.M)
    gflop = {}
    for k in ("rollout", "judge", "forward", "update", "step"):
        m = re.search(rf"^\| {k} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|$", out, re.M)
        assert m, (k, out)
        gflop[k] = float(m.group(1).replace(",", ""))
    assert gflop["step"] >= gflop["update"] > 0 and gflop["judge"] > 0
    assert "forward alone" not in out


def test_flops_count_the_model_and_lora_halves_the_weight_gradients():
    cfg = bench.ModelConfig(model_type="qwen2", **bench.TINY)
    lm = bench.Transformer(cfg)
    projections = sum(p.numel() for n, p in lm.named_parameters() if n.endswith("proj.weight"))
    assert bench.flops.block_matmul_params(cfg) == projections
    assert bench.flops.block_flops(cfg, 10) == 20 * projections
    assert bench.flops.head_flops(cfg, 3) == 6 * cfg.hidden_size * cfg.vocab_size
    assert bench.flops.train_flops(1.0, trained=True) == 3.0 and bench.flops.train_flops(1.0, trained=False) == 2.0
