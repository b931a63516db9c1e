"""The device a kernel benchmark runs on (kernels/bench.py): CUDA, or the CPU under --smoke (the
Triton interpreter), its copy bandwidth measured in the same run (the GB/s roofline of the tables),
and the two header lines that name device, versions, peers and date.
This module imports triton, so kernels/bench.py sets TRITON_INTERPRET before importing it.
"""

import datetime
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import NamedTuple

import torch
import triton
import triton.testing


class Env(NamedTuple):
    device: str
    cuda: bool
    copy_gbps: float      # measured device-to-device copy bandwidth, GB/s (read + write)
    smoke: bool


def copy_bandwidth(device, cuda) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), the roofline here."""
    n = 2 ** 28 if cuda else 2 ** 24                     # 1 GiB on a GPU, 64 MiB on the CPU
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    if cuda:
        ms = triton.testing.do_bench(lambda: y.copy_(x), quantiles=[0.5])
    else:
        y.copy_(x)
        t0 = time.perf_counter()
        y.copy_(x)
        ms = (time.perf_counter() - t0) * 1e3
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def make_env(smoke) -> Env:
    """The GPU unless smoke (then the CPU, with TRITON_INTERPRET set by the caller)."""
    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    return Env(device, cuda, copy_bandwidth(device, cuda), smoke)


def print_header(env, dtype_name):
    """Two lines: device and versions (peers: their installed distributions); date, copy bandwidth,
    dtype, quantiles."""
    name = torch.cuda.get_device_name() if env.cuda else f"CPU {platform.machine()} (Triton interpreter)"
    peers = []
    for label, dist in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        try:
            peers.append(f"{label} {version(dist)}")
        except PackageNotFoundError:
            peers.append(f"{label} not installed")
    print(f"device {name} | torch {torch.__version__} | triton {triton.__version__} | {' | '.join(peers)}")
    print(f"{datetime.date.today()} | copy bandwidth {env.copy_gbps:.0f} GB/s | dtype {dtype_name}"
          f" | quantiles p50 [p20-p80] | smoke {env.smoke}")
