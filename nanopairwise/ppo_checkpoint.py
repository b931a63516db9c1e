"""The checkpoint of a train_ppo.py run, OUT_DIR/checkpoint/: what --resume continues from exactly.

    policy/               the policy in HF format with its tokenizer (loads as a causal LM)
    critic/               the critic: HF trunk + score_head.safetensors (scalar_head.ScalarHeadModel);
                          none with --advantage-estimator grpo / rloo
    trainer_state.pt      step, anchors, BT reward normalisation, held-out history, world size, the
                          advantage estimator, with --lora-rank the adapters (the base weights are
                          re-read from --policy), with --critic-lora-rank the critic's adapters and
                          head (its base: the reward model)
    optimizers.pt         AdamW states of [policy, critic] ([policy] without a critic); DDP: replicated,
                          written by rank 0
    optimizers.rankR.pt   with --fsdp: rank R's shards instead (resume on the same number of ranks)

The directory is swapped into place atomically (common.atomic_dir_all_ranks): a crash mid-save
leaves the previous checkpoint whole.
"""

import os

import torch

from nanopairwise.checkpoint import load_trainer_state
from nanopairwise.common import atomic_dir_all_ranks, atomic_torch_save
from nanopairwise.distributed import full_state_dict, get_rank
from nanopairwise.guards import UserError

TRAINER_STATE = "trainer_state.pt"


def optimizer_file(fsdp: bool, rank: int) -> str:
    return f"optimizers.rank{rank}.pt" if fsdp else "optimizers.pt"


def save(path: str, policy, critic, optimizers, tok, state: dict, fsdp: bool):
    """Written by all ranks: weights gathered to rank 0 (collective under FSDP), the optimizers'
    state from rank 0 (DDP: replicated) or from every rank (FSDP: its shards). critic None: none saved."""
    policy_state, critic_state = full_state_dict(policy.lm), critic and full_state_dict(critic)
    rank = get_rank()
    with atomic_dir_all_ranks(path) as tmp:
        if rank == 0:
            policy.lm.save_pretrained(os.path.join(tmp, "policy"), state=policy_state)
            tok.save_pretrained(os.path.join(tmp, "policy"))
            if critic is not None:
                critic.save_pretrained(os.path.join(tmp, "critic"), state=critic_state)
            atomic_torch_save(state, os.path.join(tmp, TRAINER_STATE))
        if rank == 0 or fsdp:
            atomic_torch_save([o.state_dict() for o in optimizers], os.path.join(tmp, optimizer_file(fsdp, rank)))


def load_state(path: str, lora_rank: int, fsdp: bool, world_size: int, advantage_estimator: str = "gae",
               critic_lora_rank: int = 0) -> dict:
    """The trainer state of the checkpoint at `path`, checked against this run's flags."""
    state = load_trainer_state(path, TRAINER_STATE, lora_rank, "policy_trainable")
    saved = state.get("advantage_estimator", "gae")
    if saved != advantage_estimator:                    # a critic (and its optimizer) is saved with gae only
        raise UserError(f"--resume: the checkpoint at {path} was written with --advantage-estimator {saved}; "
                        "resume with the same estimator")
    if bool(state.get("critic_trainable")) != bool(critic_lora_rank):
        raise UserError(f"--resume: the checkpoint at {path} was written "
                        f"{'with' if critic_lora_rank == 0 else 'without'} --critic-lora-rank; resume with the same flag")
    if fsdp and state["world_size"] != world_size:
        raise UserError(f"--resume --fsdp: the checkpoint holds optimizer shards of {state['world_size']} "
                        f"ranks; run on {state['world_size']} ranks")
    return state


def load_optimizers(path: str, optimizers, fsdp: bool, rank: int):
    """Each optimizer's state back from the checkpoint at `path` (this rank's file)."""
    saved = torch.load(os.path.join(path, optimizer_file(fsdp, rank)), weights_only=False)
    for opt, state_dict in zip(optimizers, saved):
        opt.load_state_dict(state_dict)
