"""distributed.tune_cpu_process: the CPU process setup of train_*.py. With it a tensor over glibc's
32 MiB mmap threshold comes from the heap, kept after it is freed (glibc's own counters say where
each allocation lives); with NANOPAIRWISE_KEEP_FREED_MEMORY=0 glibc maps it as usual. Each case runs
in a fresh process, so the setting cannot leak between tests; scripts/bench_policy_update.py's smoke run
times both settings of each comparison, one child process each. Its speed is docs/BENCHMARKS.md's, never a test's."""

import ctypes
import ctypes.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import ctypes, ctypes.util, json, torch
from nanopairwise.distributed import tune_cpu_process
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
tune_cpu_process()
before = libc.mallinfo2()
x = torch.ones(2 ** 25)                                    # 128 MiB
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"mmapped": during.hblkhd - before.hblkhd, "heap_in_use": during.uordblks - before.uordblks,
                  "heap_free_after": after.fordblks - before.fordblks, "flush_denormal": torch.set_flush_denormal(True)}))
"""


def probe(keep: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, NANOPAIRWISE_KEEP_FREED_MEMORY=keep)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallinfo2)")
def test_large_tensors_come_from_the_heap_and_stay_there():
    size = 2 ** 27
    kept, mapped = probe("1"), probe("0")
    assert kept["mmapped"] == 0 and kept["heap_in_use"] >= size       # served from the heap ...
    assert kept["heap_free_after"] >= size                             # ... and kept there once freed
    assert mapped["mmapped"] >= size and mapped["heap_in_use"] < size  # glibc's default: its own mapping


@pytest.mark.parametrize("compare,new,old,extra", [("memory", "kept", "default", []),
                                                   ("kernels", "chunked", "ref", ["--profile"])])
def test_bench_policy_update_smoke_runs_each_setting_in_its_own_process(compare, new, old, extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_policy_update.py"), "--smoke",
                           "--compare", compare, "--steps", "2", "--rounds", "1", "--rows", "2", "--prompt-len", "8",
                           "--new-tokens", "4", "--dtype", "fp32", *extra],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.startswith(f"# {new} vs {old} (") and "| tiny random model | fp32 base, LoRA r=16 |" in out
    for name in (new, old):
        assert re.search(rf"^round 0 {name} *: ms [0-9,]+ / [0-9,]+ \| peak RSS [0-9.]+ GiB$", out, re.M), out
    assert re.search(rf"^ms per call, median of 2: {new} [0-9,]+ \| {old} [0-9,]+ \| {old} / {new} [0-9.]+x", out, re.M)
    assert ("under torch.profiler, top ops by self CPU time" in out) == bool(extra)
