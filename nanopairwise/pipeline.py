"""The built-in pipeline, task -> reward models -> PPO, as train_ppo.py (its own inputs),
scripts/compare.py (every arm, per seed) and scripts/real_model.py (its reward models and arms) run it.

    RUN_DIR/task/            the built-in task (nanopairwise/bootstrap.py)
    RUN_DIR/judge/, bt/      train_rm.py --objective pairwise | bt      (REWARD_MODELS)
    RUN_DIR/ppo_<reward>/    train_ppo.py --reward <reward>             (REWARDS: the three arms)
    RUN_DIR/kl<C>/ppo_<arm>/ the same at --kl-coef C (scripts/compare.py --kl-coefs: the KL frontier)

`run_stage` skips a stage whose eval.json is there, so an interrupted pipeline continues. The
training scripts run as programs, each in a child process (`run_script`): the library never
imports a script, and every run owns its process group. Under torchrun, rank 0 starts the child
alone, as torchrun with this node's ranks (the same data parallelism as the parent), while the
other ranks wait.
"""

import json
import multiprocessing
import os
import shlex
import subprocess
import sys

import torch

from nanopairwise.bootstrap import BootstrapConfig, bootstrap, ensure_task, task_paths
from nanopairwise.distributed import barrier, get_world_size, print0
from nanopairwise.guards import UserError, on_rank0

REWARDS = ("pairwise", "bt", "bt-anchor")          # train_ppo.py --reward: one PPO run (arm) each
REWARD_MODELS = {"pairwise": "judge", "bt": "bt"}  # train_rm.py --objective -> its directory in RUN_DIR
# train_rm.py and train_ppo.py: the repository root, or site-packages for an installed package
# (pyproject.toml installs them as top-level modules beside nanopairwise/)
SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_script(script: str, argv: list):
    """Run `script` (train_rm.py or train_ppo.py) with `argv` in a child process and wait for it; a
    failure is a UserError naming the command (the child printed its own error first). Under
    torchrun the child is started by rank 0 with this node's number of ranks, the others waiting."""
    on_rank0(_run_child, script, argv)
    barrier()


def _run_child(script: str, argv: list):
    world = get_world_size()
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
    command = launcher + [os.path.join(SCRIPTS_DIR, script), *argv]
    status = subprocess.run(command, env=env).returncode
    if status:
        raise UserError(f"{script} failed with exit status {status} (its message is above): {shlex.join(command)}")


def run_stage(script: str, out_dir: str, argv: list) -> dict:
    """OUT_DIR/eval.json of `script` run with `argv` and --out-dir OUT_DIR, which runs first unless
    that file is there (a finished stage)."""
    done = os.path.join(out_dir, "eval.json")
    if not os.path.exists(done):
        run_script(script, [*argv, "--out-dir", out_dir])
    with open(done, encoding="utf-8") as f:
        return json.load(f)


def run_seed(run_dir: str, seed: int, smoke: bool = False, rm_args=(), ppo_args=(), arms=()) -> dict:
    """Every stage of one seed in RUN_DIR: prepare_seed, then one PPO run per arm: each of REWARDS,
    then each (NAME, train_ppo.py flags) of `arms` in ppo_NAME.
    Returns {"judge": eval, "bt": eval, "ppo_<reward or NAME>": history}."""
    out = prepare_seed(run_dir, seed, smoke, rm_args)
    for name, flags in default_arms() + list(arms):
        out[f"ppo_{name}"] = run_arm(run_dir, seed, name, [*ppo_args, *flags])
    return out


def default_arms() -> list:
    """[(NAME, train_ppo.py flags)] of the three arms every comparison runs: one per reward of REWARDS."""
    return [(reward, ["--reward", reward]) for reward in REWARDS]


def prepare_seed(run_dir: str, seed: int, smoke: bool = False, rm_args=()) -> dict:
    """The seed's task (BootstrapConfig.smoke() with `smoke`) and both reward models on it, each
    skipped if finished: {"judge": eval, "bt": eval}."""
    task = os.path.join(run_dir, "task")
    if not os.path.exists(task_paths(task)["info"]):
        bootstrap(task, seed, BootstrapConfig.smoke() if smoke else BootstrapConfig())
    return {name: run_stage("train_rm.py", os.path.join(run_dir, name),
                            ["--objective", objective, "--task-dir", task, "--seed", str(seed), *rm_args])
            for objective, name in REWARD_MODELS.items()}


def run_arm(run_dir: str, seed: int, name: str, flags, sub: str = "") -> dict:
    """One PPO run of the seed (after prepare_seed) in RUN_DIR/SUB/ppo_NAME with train_ppo.py `flags`
    (SUB: e.g. kl0.05 for one point of a KL sweep; the seed's task and reward models are shared)."""
    return run_stage("train_ppo.py", os.path.join(run_dir, sub, f"ppo_{name}"),
                     ["--run-dir", run_dir, "--seed", str(seed), *flags])


def _worker_threads(threads: int):
    """Pool initializer: this worker's torch (and every train_*.py it runs) uses `threads` threads."""
    os.environ["NANOPAIRWISE_NUM_THREADS"] = str(threads)  # what compute_init() in the train_*.py children then sets
    torch.set_num_threads(threads)


def pool_map(fn, arglist: list, jobs: int) -> list:
    """[fn(*a) for a in arglist], in a pool of `jobs` spawned processes (cores / jobs threads each):
    independent stages (seeds, PPO runs) side by side. `fn` must be importable (a module-level function)."""
    if jobs == 1 or len(arglist) == 1:
        return [fn(*a) for a in arglist]
    jobs = min(jobs, len(arglist))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with multiprocessing.get_context("spawn").Pool(jobs, _worker_threads, (threads,)) as pool:
        return pool.starmap(fn, arglist, chunksize=1)


def has_model(path: str) -> bool:
    """Is there a model (an HF config.json) at `path` (the judge is optional for --reward bt)."""
    return os.path.exists(os.path.join(path, "config.json"))


def ppo_inputs(args) -> tuple:
    """(initial policy dir, RL prompts, held-out prompts) of a train_ppo.py run. The built-in
    pipeline (no --prompts): the task bootstrapped if missing, then whichever reward model is
    missing trained with train_rm.py (the judge always: it also evaluates)."""
    policy, prompts, eval_prompts = args.policy, args.prompts, args.eval_prompts
    builtin = args.prompts is None
    if builtin:
        paths = ensure_task(args.task_dir, seed=args.seed)
        prompts, eval_prompts = paths["rl_train"], args.eval_prompts or paths["rl_test"]
        policy = args.policy or paths["policy"]
    for objective, path in (("pairwise", args.judge), ("bt", args.bt_rm)):
        needed = objective == args.reward.split("-")[0] or (objective == "pairwise" and builtin)
        if needed and not has_model(path):
            if not builtin:
                raise UserError(f"no reward model at {path}; train one with train_rm.py --objective {objective}")
            print0(f"== training the {objective} reward model (missing at {path}) ==")
            run_script("train_rm.py", ["--objective", objective, "--task-dir", args.task_dir, "--seed", str(args.seed),
                                       "--out-dir", os.path.dirname(path), "--device", args.device])
    return policy, prompts, eval_prompts
