"""Bootstrap of the built-in task: a tokenizer, an imperfect tiny SFT policy, pairs and RL prompts.

    python -m nanopairwise.bootstrap --out runs/task --seed 0
    python -m nanopairwise.bootstrap --task principles --model DIR --out runs/principles   # the text task

(`--task principles` is nanopairwise/principles_task.py: the same directory layout, pairs from the
samples of --model, an existing chat model.)

train_rm.py and train_ppo.py call `ensure_task` when the task directory is missing, so a user
never has to run this by hand (about 2 minutes on a 2-core CPU: README). Writes one directory,
atomically (it appears complete or not at all):

    policy/             HF checkpoint of the SFT policy (config.json, model.safetensors) + tokenizer
    pairs_train.jsonl   preference pairs (policy samples and gold/corrupted answers) labelled by
    pairs_test.jsonl    the noisy labeller, with the oracle's scores and p_true kept for evaluation
    rl_train.jsonl      RL prompts with their gold answer as anchor, and the oracle fields
    rl_test.jsonl
    task.json           sizes, seed, model config and the SFT policy's held-out oracle score

The policy is trained on imperfect demonstrations (tasks.make_demonstration: more corrupted for
longer inputs), so it is decent but far from the oracle, and RL has room to improve it.
"""

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from nanopairwise import data, tasks
from nanopairwise.common import Progress, atomic_dir, atomic_write_text
from nanopairwise.distributed import barrier, get_rank, print0
from nanopairwise.judge import verdict_token_ids
from nanopairwise.layouts import JudgeTemplate, Sampling, encode_prompt, pack_prompt_response, sample
from nanopairwise.losses import masked_mean
from nanopairwise.model import ModelConfig, Transformer
from nanopairwise.policy import PolicyLogprobs
from nanopairwise.tokenizer import train_bpe

# the tiny Llama-shaped policy of the built-in task (~0.9M parameters)
TINY_POLICY = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False)


@dataclass
class BootstrapConfig:
    vocab_size: int = 512          # byte-level BPE: 256 bytes + specials + merges
    sft_prompts: int = 6000        # demonstrations (imperfect; see tasks.make_demonstration)
    sft_steps: int = 800
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    pair_prompts_train: int = 1500  # each gives one pair of policy samples and one synthetic pair
    pair_prompts_test: int = 300
    rl_prompts_train: int = 1024
    rl_prompts_test: int = 256
    max_new_tokens: int = 24

    @classmethod
    def smoke(cls) -> "BootstrapConfig":
        """A tiny task (a handful of SFT steps and records, ~5 s on a 2-core CPU) on the same code
        path: the tests' task and scripts' --smoke, which check plumbing, not results."""
        return cls(sft_steps=20, sft_prompts=500, pair_prompts_train=48, pair_prompts_test=16,
                   rl_prompts_train=32, rl_prompts_test=8, max_new_tokens=12)


def task_paths(task_dir: str) -> dict:
    names = dict(policy="policy", pairs_train="pairs_train.jsonl", pairs_test="pairs_test.jsonl",
                 rl_train="rl_train.jsonl", rl_test="rl_test.jsonl", info="task.json")
    return {k: os.path.join(task_dir, v) for k, v in names.items()}


def ensure_bootstrap(task_dir: str, seed: int = 0, config: BootstrapConfig = None):
    """Bootstrap the task into `task_dir` unless a complete one is already there."""
    if os.path.exists(task_paths(task_dir)["info"]):
        return
    print0(f"== bootstrapping the built-in task into {task_dir} (seed {seed}) ==")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # under torchrun the other ranks wait at a barrier meanwhile
    try:
        bootstrap(task_dir, seed, config or BootstrapConfig())
    finally:
        torch.set_num_threads(threads)


def ensure_task(task_dir: str, seed: int = 0) -> dict:
    """task_paths of the built-in task, bootstrapped first if missing: by rank 0 alone under torchrun,
    the other ranks waiting at a barrier (train_rm.py and train_ppo.py start this way)."""
    if get_rank() == 0:
        ensure_bootstrap(task_dir, seed=seed)
    barrier()
    return task_paths(task_dir)


def sft(model, tok, examples, cfg: BootstrapConfig, seed: int):
    """Supervised fine-tuning on (prompt_ids, response_ids) pairs: mean NLL of response tokens."""
    policy = PolicyLogprobs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    progress = Progress(cfg.sft_steps, "bootstrap sft")
    for step in range(cfg.sft_steps):
        lr = cfg.sft_lr * min(1.0, (step + 1) / 20) * (1 - step / cfg.sft_steps) + 1e-5
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()
        ids, attn, resp_mask = pack_prompt_response([examples[i][0] for i in idx], [examples[i][1] for i in idx],
                                                    tok.pad_token_id)
        loss = -masked_mean(policy(ids, attn, resp_mask).logprobs, resp_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.update(step + 1, f"loss {loss.item():.3f}")


def demonstrations(tok, rng, n: int) -> list:
    """n SFT examples (prompt ids, response ids) of the built-in task: imperfect demonstrations
    (tasks.make_demonstration), each closed by the end-of-turn id the policy is to emit."""
    examples = []
    for _ in range(n):
        t = tasks.make_prompt(rng)
        examples.append((encode_prompt(tok, t.prompt_text),
                         tok.encode(tasks.make_demonstration(rng, t)) + [tok.end_of_turn_id]))
    return examples


@torch.no_grad()
def sample_texts(model, tok, prompt_texts, k, cfg, seed, batch_size=256, desc=None):
    """k sampled responses (temperature 1, stopping at the end of turn) per prompt text, decoded;
    with `desc`, a progress line with an ETA after each batch."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    flat = [t for t in prompt_texts for _ in range(k)]
    texts = []
    progress = Progress(len(flat), desc, every=1) if desc else None
    for i in range(0, len(flat), batch_size):
        rollout = sample(model, tok, flat[i:i + batch_size], Sampling(cfg.max_new_tokens), g)
        texts += rollout.texts(tok)
        if progress:
            progress.update(len(texts), f"{int(rollout.response_mask.sum())} tokens")
    model.train()
    return [texts[i * k:(i + 1) * k] for i in range(len(prompt_texts))]


def bootstrap(task_dir: str, seed: int = 0, cfg: BootstrapConfig = BootstrapConfig()):
    t0 = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    template = JudgeTemplate()
    # ---- tokenizer: trained on what the policy and the judge will read -------------------------
    judge_texts = [f"Principle: {p.description}" for p in tasks.PRINCIPLES]
    judge_texts += [f"{template.question}\nAnswer:{v}" for v in (template.yes, template.no)]
    tok = train_bpe(tasks.tokenizer_corpus(rng, extra_texts=judge_texts), cfg.vocab_size,
                    special_tokens=("<|endoftext|>",), chat_template="plain")
    verdict_token_ids(tok, template)  # fail here, not in train_rm.py, if a verdict is not one token
    # ---- SFT policy on imperfect demonstrations -----------------------------------------------
    config = ModelConfig.from_hf({**TINY_POLICY, "vocab_size": tok.vocab_size,
                                  "bos_token_id": None, "eos_token_id": tok.eos_token_id})
    model = Transformer(config)
    demos = demonstrations(tok, rng, cfg.sft_prompts)
    print0(f"bootstrap | tokenizer {tok.vocab_size} tokens | policy "
           f"{sum(p.numel() for p in model.parameters()):,} params | {len(demos):,} demonstrations")
    sft(model, tok, demos, cfg, seed)
    # ---- preference pairs: pairs of policy samples + gold/corrupted pairs ---------------------
    splits = {}
    for split, n in (("train", cfg.pair_prompts_train), ("test", cfg.pair_prompts_test)):
        prompts = [tasks.make_prompt(rng) for _ in range(n)]
        samples = sample_texts(model, tok, [p.prompt_text for p in prompts], 2, cfg, seed + len(split))
        splits[split] = tasks.make_pairs(rng, prompts, responses=samples, synthetic_per_prompt=1)
    rl = {split: tasks.make_rl_prompts(rng, n) for split, n in (("train", cfg.rl_prompts_train),
                                                                 ("test", cfg.rl_prompts_test))}
    # ---- the SFT policy's held-out quality, for the record ------------------------------------
    test_samples = sample_texts(model, tok, [r["prompt"] for r in rl["test"]], 1, cfg, seed + 99)
    sft_score = sum(tasks.oracle_score(r["principle_name"], r["numbers"], s[0])
                    for r, s in zip(rl["test"], test_samples)) / len(rl["test"])
    info = {"seed": seed, "config": asdict(cfg), "policy": TINY_POLICY, "sft_oracle_score": sft_score,
            "pairs": {k: len(v) for k, v in splits.items()}, "seconds": round(time.time() - t0, 1)}
    # ---- write everything, atomically ---------------------------------------------------------
    with atomic_dir(task_dir) as tmp:
        paths = task_paths(tmp)
        model.save_pretrained(paths["policy"])
        tok.save_pretrained(paths["policy"])
        for split in ("train", "test"):
            data.write_jsonl(paths[f"pairs_{split}"], splits[split])
            data.write_jsonl(paths[f"rl_{split}"], rl[split])
        atomic_write_text(paths["info"], json.dumps(info, indent=2))
    print0(f"bootstrap done in {time.time() - t0:.0f} s | SFT policy held-out oracle score {sft_score:.3f} | "
           f"{info['pairs']['train']:,} train / {info['pairs']['test']:,} test pairs")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description="bootstrap a built-in task")
    ap.add_argument("--task", choices=["digits", "principles"], default="digits",
                    help="digits: the tiny-model task (its own SFT policy); principles: principle-following "
                         "on everyday questions (nanopairwise/principles_task.py), pairs from --model's samples")
    ap.add_argument("--out", default="runs/task", help="task directory to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of everything the task draws")
    ap.add_argument("--model", default=None, help="principles: HF directory of the initial policy (e.g. "
                    "SmolLM2-135M-Instruct); default: a tiny random model (tests, plumbing)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the same code path (plumbing only)")
    a = ap.parse_args(argv)
    if a.task == "digits":
        if a.model:
            ap.error("--model: the digits task trains its own tiny policy; leave --model out")
        return bootstrap(a.out, a.seed, BootstrapConfig.smoke() if a.smoke else BootstrapConfig())
    from nanopairwise import principles_task  # (it imports this module)
    cfg = principles_task.PrinciplesConfig.smoke() if a.smoke else principles_task.PrinciplesConfig()
    return principles_task.bootstrap(a.out, a.model, a.seed, cfg)


if __name__ == "__main__":
    main()
