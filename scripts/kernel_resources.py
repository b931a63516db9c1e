"""Registers, spills, shared memory and occupancy of every Triton kernel, compiled on the CPU.

    python scripts/kernel_resources.py                   # the table for sm_80, sm_90, sm_100
    python scripts/kernel_resources.py --write-docs      # and write it into docs/BENCHMARKS.md
    python scripts/kernel_resources.py --json rows.json  # every compiled launch (the compile gate reads it)

No GPU needed: kernels/aot.py compiles each kernel at each CUDA launch configuration the launchers
use, with triton.compile for a GPUTarget and the ptxas / cuobjdump shipped in the triton wheel.
Exit code 1 if any launch fails to compile, spills registers or needs more shared memory than the
target has. TRITON_INTERPRET is switched off here, before triton is imported (compiling needs the
real @triton.jit functions), so this runs the same from a shell or from a test.
"""

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402

from gpu_check import write_section  # noqa: E402  (this script's own directory is on sys.path)
from kernels import aot, launches  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="80,90,100", help="compute capabilities x 10, comma-separated")
    p.add_argument("--jobs", type=int, default=2, help="compile processes in parallel")
    p.add_argument("--mixed", default="all", choices=("all", "heaviest", "none"),
                   help="size classes (kernels/launches.py SIZES: each size argument divisible by 16, not, "
                        "or 1): every combination for every variant (all), for each kernel's heaviest "
                        "variant only (heaviest, what tests/test_compile_gate.py runs), or none (aligned)")
    p.add_argument("--json", default=None, help="write every row (resources, vector-load counts) here")
    p.add_argument("--write-docs", action="store_true", help="replace the table in docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    args.targets = [int(t) for t in args.targets.split(",")]
    unknown = [t for t in args.targets if t not in aot.TARGETS]
    if unknown:
        p.error(f"--targets: unknown {unknown}; known {sorted(aot.TARGETS)}")
    return args


def _check(job):
    launch, cc = job
    return aot.check(launch, cc)


def compile_all(targets, mixed, jobs) -> list:
    """Every distinct launch (launches.launches(mixed), aot.distinct) x target, in `jobs` processes."""
    todo = launches.launches(mixed)
    work = [(launch, cc) for cc in targets for launch in aot.distinct(todo, cc)]
    if jobs <= 1:
        return [_check(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_check, work, chunksize=4))


def table(rows) -> str:
    """Markdown: kernel x dtype x target, worst case over the launch's flag and size variants."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["cc"]), []).append(r)
    lines = ["| kernel | dtype | target | variants | warps | regs/thread | spill B/thread | shared B/block "
             "| warps/SM (of 64) |", "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, dtype, cc), rs in groups.items():
        if any("error" in r for r in rs):
            lines.append(f"| {kernel} | {dtype} | sm_{cc} | {len(rs)} | compile error | | | | |")
            continue
        warps = sorted({r["num_warps"] for r in rs})
        lines.append(f"| {kernel} | {dtype} | sm_{cc} | {len(rs)} | {'/'.join(map(str, warps))} "
                     f"| {max(r['regs'] for r in rs)} | {max(r['stack'] + r['local'] for r in rs)} "
                     f"| {max(r['shared'] for r in rs)} | {min(r['warps_per_sm'] for r in rs)} |")
    return "\n".join(lines)


# Little's law for the streaming log-prob kernels: bytes in flight = bandwidth x latency. H100 SXM:
# 3.35 TB/s, ~700 ns loaded DRAM latency (an estimate; microbenchmarks report 500-800 ns), 132 SMs.
H100_BYTES_PER_S, DRAM_LATENCY_S, H100_SMS = 3.35e12, 700e-9, 132


def in_flight_table(rows) -> str:
    """sm_90 logprob kernels: one BLOCK_V load per resident program per step, against Little's law."""
    need = H100_BYTES_PER_S * DRAM_LATENCY_S / H100_SMS
    lines = [f"Little's law on an H100 SXM: {H100_BYTES_PER_S / 1e12:.2f} TB/s x {DRAM_LATENCY_S * 1e9:.0f} ns "
             f"/ {H100_SMS} SMs = {need / 1024:.1f} KB in flight per SM.", "",
             "| kernel | dtype | BLOCK_V | warps | programs/SM | KB in flight/SM (one step each) | x needed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"].startswith("logprob.") and r["cc"] == 90 and r["aligned"] and "ENTROPY=1" in r["flags"] \
                and "error" not in r:
            block_v = int(r["flags"].split()[0].split("=")[1])
            programs = r["warps_per_sm"] // r["num_warps"]
            kb = programs * block_v * launches.DTYPES[r["dtype"]].itemsize / 1024
            lines.append(f"| {r['kernel']} | {r['dtype']} | {block_v} | {r['num_warps']} | {programs} "
                         f"| {kb:.0f} | {kb * 1024 / need:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args(argv)
    t0 = time.time()
    rows = compile_all(args.targets, args.mixed, args.jobs)
    bad = [(r, p) for r in rows for p in aot.problems(r)]
    for r, p in bad:
        print(f"FAIL {r['kernel']} {r['dtype']} {r['flags']} sm_{r['cc']} sizes: {r['sizes']}: {p}")
    text = table(rows) + ("\n\n" + in_flight_table(rows) if 90 in args.targets else "")
    mixed = [r for r in rows if not r["aligned"]]
    stamp = (f"{len(rows)} compiles for {', '.join(f'sm_{t}' for t in args.targets)} in {time.time() - t0:.0f} s "
             f"({len(mixed)} of them with a size not divisible by 16, worst case: "
             f"{max((r.get('regs', 0) for r in mixed), default=0)} registers, "
             f"{max((r.get('stack', 0) + r.get('local', 0) for r in mixed), default=0)} B spilled); "
             f"triton {triton.__version__}, {time.strftime('%Y-%m-%d')}; "
             f"command: `python scripts/kernel_resources.py{' --write-docs' if args.write_docs else ''}`")
    print(text + "\n\n" + stamp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    if args.write_docs:
        write_section(DOCS, "kernel-resources", text + "\n\n" + re.sub(r" in \d+ s", "", stamp))
    print(f"{len(bad)} problem(s)" if bad else "no compile errors, no spills, shared memory within limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
