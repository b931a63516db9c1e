"""The compile gate: every Triton kernel compiled ahead of time for real GPUs, on the CPU.

The other kernel tests run under TRITON_INTERPRET=1, which accepts code the GPU compiler refuses
and says nothing about registers. scripts/kernel_resources.py compiles every kernel at every CUDA
launch configuration the launchers use (kernels/launches.py takes them from the launchers' own
functions), each dtype and reachable constexpr flag combination, for sm_80 and sm_90 with the
ptxas in the triton wheel, in a fresh Triton cache (so it really compiles), with the runtime
specialisation Triton's binder gives the arguments: 16-byte aligned pointers, and each size
argument in each class it can take (divisible by 16, not, or 1; kernels/launches.py SIZES), every
combination of them, once per distinct compiled kernel. Every variant is compiled with all sizes
divisible by 16; the size combinations with each kernel's heaviest variant (`--mixed heaviest`).
It fails on a compile error, on register spills (stack or local memory) and on shared memory
above the target's limit. sm_100, and every size combination with every variant, are compiled
by `python scripts/kernel_resources.py` (same checks, exit code 1 on a problem), not here.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

from kernels import aot, launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=ROOT)  # no pip install -e needed
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--targets",
                           "80,90", "--mixed", "heaviest", "--jobs", "2", "--json", str(tmp / "rows.json")],
                          capture_output=True, text=True, timeout=3600, env=env, cwd=ROOT)  # busy CI cores
    assert os.path.exists(tmp / "rows.json"), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp / "rows.json") as f:
        return json.load(f), proc


def test_every_kernel_compiles_without_spills_within_shared_memory(rows):
    rows, proc = rows
    failures = [f"{r['kernel']} {r['dtype']} {r['flags']} sm_{r['cc']} sizes: {r['sizes']}: {p}"
                for r in rows for p in aot.problems(r)]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # coverage: every kernel of kernels/ (a @triton.jit function named *_kernel), both targets, every dtype
    kernels = {f"{m}.{name}" for m in ("logprob", "linear_logprob", "ppo_loss")
               for name in dir(getattr(aot, m)) if name.endswith("_kernel")}
    assert {r["kernel"] for r in rows} == kernels
    assert {(r["cc"], r["dtype"], r["aligned"]) for r in rows} == {(cc, d, a) for cc in (80, 90) for d in launches.DTYPES
                                                                   for a in (True, False)}
    # the logprob kernels at each configuration _launch_config can return, entropy on and off
    configs = {(r["flags"], r["num_warps"]) for r in rows if r["kernel"] == "logprob._logprob_fwd_kernel"}
    assert configs == {(f"BLOCK_V={b} ENTROPY={e}", w) for b, w in launches.logprob_configs() for e in (0, 1)}


def test_logprob_kernels_stream_with_128_bit_vector_accesses(rows):
    """At runtime specialisation (16-byte aligned rows, V divisible by 16) every thread moves its
    BLOCK_V / (32 num_warps) elements of a step as ld.global.v4 (and st.global.v4 for the
    gradient): BLOCK_V e / (16 B x 32 x num_warps) vector instructions, for bf16, fp16 and fp32."""
    rows, _ = rows
    checked = 0
    for r in rows:
        if r["kernel"].startswith("logprob.") and r["aligned"]:
            block_v = int(r["flags"].split()[0].split("=")[1])
            vectors = block_v * launches.DTYPES[r["dtype"]].itemsize // (16 * 32 * r["num_warps"])
            assert vectors >= 1 and r["ld_v4"] == vectors, r
            assert r["st_v4"] == (vectors if "bwd" in r["kernel"] else 0), r
            checked += 1
    assert checked == 2 * 2 * 2 * len(launches.DTYPES) * len(launches.logprob_configs())


def test_size_cases_cover_every_class_combination_of_every_size_argument():
    """The heaviest variant of each kernel meets every combination of its size arguments' classes
    (divisible by 16, not, 1), e.g. the fused head at odd N and V with C divisible by 16."""
    heaviest = launches.launches("heaviest")
    for kernel, sizes in (("logprob._logprob_fwd_kernel", "logprob"), ("ppo_loss._ppo_loss_bwd_kernel", "ppo_loss"),
                          ("linear_logprob._linear_logprob_fwd_kernel", "linear_logprob_fwd"),
                          ("linear_logprob._linear_logprob_bwd_kernel", "linear_logprob_bwd")):
        names = launches.KERNEL_SIZES[sizes]
        want = {label for label, _ in launches.size_cases(names)}
        assert len(want) == len(list(itertools.product(*(launches.SIZES[n] for n in names))))
        got = {launch.sizes for launch in heaviest if launch.kernel == kernel}
        assert got == want, (kernel, want - got)
    assert "N=odd V=odd C=16k S=odd" in {launch.sizes for launch in heaviest}
