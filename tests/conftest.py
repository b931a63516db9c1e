"""pytest setup shared by all tests.

TRITON_INTERPRET must be set before triton defines any kernel, so it is set here, before any
test module imports kernels/. On a machine with CUDA the kernel tests run compiled instead
(set NANOPAIRWISE_TEST_GPU=1 to keep the interpreter off).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("NANOPAIRWISE_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
