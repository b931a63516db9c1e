"""The checkpoint of a train_rm.py run, OUT_DIR/checkpoint/: a reward model that loads anywhere, and
what --resume continues from exactly.

    config.json, model*.safetensors   the trunk in HF format (LoRA adapters merged: a plain causal LM)
    score_head.safetensors            the BT model's scalar head (scalar_head.ScalarHeadModel)
    tokenizer.json, ...               the tokenizer
    rm_config.json                    the objective and the judge's template (layouts.JudgeTemplate):
                                      train_ppo.py reads each reward model's own layout from here
    trainer_state.pt                  step, optimizer (DDP: replicated), every rank's RNG state, the
                                      resolved flags, with --lora-rank the adapters (and a BT head)
    optimizer.rankR.pt                with --fsdp: rank R's optimizer shards instead

The directory is swapped into place atomically (common.atomic_dir_all_ranks): a crash mid-save
leaves the previous checkpoint whole.
"""

import json
import os
from dataclasses import asdict

from nanopairwise.checkpoint import load_trainer_state
from nanopairwise.common import atomic_dir_all_ranks, atomic_torch_save, atomic_write_text, get_rng_state
from nanopairwise.distributed import all_gather_object, barrier, full_state_dict, get_rank
from nanopairwise.layouts import JudgeTemplate

RM_CONFIG = "rm_config.json"  # beside a reward model's weights: its objective and template
TRAINER_STATE = "trainer_state.pt"


def save_rm_config(path: str, objective: str, template: JudgeTemplate):
    """Write RM_CONFIG into checkpoint directory `path` (the template travels with the weights)."""
    atomic_write_text(os.path.join(path, RM_CONFIG), json.dumps({"objective": objective, **asdict(template)}, indent=2))


def load_rm_config(path: str):
    """(objective, JudgeTemplate) of the reward model in `path`; ("pairwise", default) if it has none."""
    file = os.path.join(path, RM_CONFIG)
    if not os.path.isfile(file):
        return "pairwise", JudgeTemplate()
    with open(file, encoding="utf-8") as f:
        cfg = json.load(f)
    known = {k: cfg[k] for k in ("question", "yes", "no") if k in cfg}
    return cfg.get("objective", "pairwise"), JudgeTemplate(**known)


def optimizer_file(rank: int) -> str:
    return f"optimizer.rank{rank}.pt"


def save(path: str, model, tok, objective: str, template: JudgeTemplate, optimizer, state: dict, fsdp: bool):
    """Written by all ranks (collective): the weights gathered to rank 0, every rank's RNG state;
    the optimizer's state from rank 0 inside the trainer state (DDP: replicated) or, with FSDP,
    each rank's shards in its own file. `model` is the judge (its LM is saved) or the BT model."""
    weights = model.lm if objective == "pairwise" else model
    model_state, rngs = full_state_dict(weights), all_gather_object(get_rng_state())
    optimizer_state = optimizer.state_dict()
    rank = get_rank()
    with atomic_dir_all_ranks(path) as tmp:
        if rank == 0:                     # first: the HF save swaps a whole new directory in at `tmp`
            weights.save_pretrained(tmp, state=model_state)
            tok.save_pretrained(tmp)
            save_rm_config(tmp, objective, template)
            atomic_torch_save({"optimizer": None if fsdp else optimizer_state, **state, "rng": rngs},
                              os.path.join(tmp, TRAINER_STATE))
        if fsdp:
            barrier()
            atomic_torch_save(optimizer_state, os.path.join(tmp, optimizer_file(rank)))


def load_state(path: str, lora_rank: int) -> dict:
    """The trainer state of the checkpoint at `path`, checked against this run's --lora-rank."""
    return load_trainer_state(path, TRAINER_STATE, lora_rank, "trainable")


def load_optimizer(path: str, optimizer, state: dict, fsdp: bool, rank: int):
    """The optimizer's state back: from the trainer state, or with FSDP from this rank's file."""
    import torch
    saved = (torch.load(os.path.join(path, optimizer_file(rank)), weights_only=False) if fsdp
             else state["optimizer"])
    optimizer.load_state_dict(saved)
