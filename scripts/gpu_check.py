"""The first run on a GPU, in one command: compiled parity tests, then every benchmark, tables to docs.

    python scripts/gpu_check.py                          # one CUDA GPU; writes docs/BENCHMARKS.md
    python scripts/gpu_check.py --only parity,ppo_loss   # some steps
    python scripts/gpu_check.py --smoke                  # every step at smoke size on the CPU (~100 s
                                                         # on 2 cores; the test runs one step)
    python scripts/gpu_check.py --list                   # the steps and their commands

Steps, in order (each a subprocess, so a crash or a hang in one is reported and the next runs):
  parity          NANOPAIRWISE_TEST_GPU=1 pytest tests/test_logprob.py tests/test_ppo_loss.py
                  tests/test_linear_logprob.py: the kernels compiled, against the references,
                  bf16 included (under --smoke: collection only, the CPU suite runs them anyway)
  logprob         kernels/bench.py --op logprob --dtype bf16 (the documented shapes)
  ppo_loss        kernels/bench.py --op ppo_loss
  linear_logprob  kernels/bench.py --op linear_logprob --dtype bf16
  generate        scripts/bench_generate.py
  ppo_step        scripts/bench_ppo_step.py --repeats 2
  judge           scripts/bench_judge.py --model random --dtype bf16 (naive vs prefix-shared scoring,
                  K = 1, 4, 8; SmolLM2-135M's shape: the real weights are not on a fresh GPU machine)
  ppo_step_lora   scripts/bench_ppo_step.py --lora-rank 16 --repeats 2 --no-forwards-alone (LoRA policy
                  and critic, prefix-shared judge; the FLOP table against the measured matmul peaks)
Each step's output goes between its markers in docs/BENCHMARKS.md (`<!-- gpu-check-NAME:begin -->`)
with the command, date, device, wall time and exit status; under --smoke nothing is written unless
--docs names a file. The exit code is 1 if any step failed, and the last line names the failed steps.

Time: each step has a time limit (LIMIT_S, 615 s together) so that the whole run ends within
11 minutes on one H100 even if a step hangs; the limits are estimates (no GPU has run this yet):
a step that reaches its limit is reported as failed ("timed out"), with its output so far.
"""

import argparse
import datetime
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "BENCHMARKS.md")
PY = sys.executable
PARITY = ["tests/test_logprob.py", "tests/test_ppo_loss.py", "tests/test_linear_logprob.py"]
# name: (command on the GPU, command under --smoke, time limit on the GPU in s)
STEPS = {
    "parity": ([PY, "-m", "pytest", "-q", "-rs", *PARITY], [PY, "-m", "pytest", "-q", "--collect-only", *PARITY], 75),
    "logprob": ([PY, "kernels/bench.py", "--op", "logprob", "--dtype", "bf16"],
                [PY, "kernels/bench.py", "--smoke", "--op", "logprob"], 120),
    "ppo_loss": ([PY, "kernels/bench.py", "--op", "ppo_loss"], [PY, "kernels/bench.py", "--smoke", "--op", "ppo_loss"], 30),
    "linear_logprob": ([PY, "kernels/bench.py", "--op", "linear_logprob", "--dtype", "bf16"],
                       [PY, "kernels/bench.py", "--smoke", "--op", "linear_logprob"], 90),
    "generate": ([PY, "scripts/bench_generate.py", "--batch-sizes", "1,64", "--new-tokens", "128", "--repeats", "2"],
                 [PY, "scripts/bench_generate.py", "--smoke"], 60),  # two shapes: two compiles of the step
    "ppo_step": ([PY, "scripts/bench_ppo_step.py", "--repeats", "2"],
                 [PY, "scripts/bench_ppo_step.py", "--smoke", "--repeats", "1"], 90),
    "judge": ([PY, "scripts/bench_judge.py", "--model", "random", "--dtype", "bf16"],
              [PY, "scripts/bench_judge.py", "--smoke"], 75),
    "ppo_step_lora": ([PY, "scripts/bench_ppo_step.py", "--lora-rank", "16", "--repeats", "2", "--no-forwards-alone"],
                      [PY, "scripts/bench_ppo_step.py", "--smoke", "--lora-rank", "4", "--repeats", "1",
                       "--no-forwards-alone"], 75),
}
SMOKE_LIMIT_S = 300      # per step on a CPU: the interpreter is slow, and this is no promise of speed
OUTPUT_LINES = 120       # of a step's output kept in the docs (pytest: its summary)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="smoke sizes on the CPU (Triton interpreter)")
    p.add_argument("--only", default=None, help=f"comma-separated steps to run, of {','.join(STEPS)}")
    p.add_argument("--docs", default=None, help="markdown file to write the step outputs into "
                   "(default docs/BENCHMARKS.md on a GPU, none under --smoke)")
    p.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    args = p.parse_args(argv)
    args.steps = list(STEPS) if args.only is None else args.only.split(",")
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"--only: unknown step(s) {unknown}; steps are {list(STEPS)}")
    if args.docs is None and not args.smoke:
        args.docs = DOCS
    return args


def write_section(path, name, body):
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in path, atomically."""
    with open(path) as f:
        text = f.read()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    head, rest = text.split(begin, 1)
    text = head + begin + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run_step(name, cmd, limit_s, smoke):
    """Run one step, echoing its output; returns (status, wall s, output). status "ok" or why not."""
    env = dict(os.environ, PYTHONPATH=ROOT)  # the repo importable without pip install -e
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["NANOPAIRWISE_TEST_GPU"] = "1"
    print(f"\n=== {name}: {' '.join(['python'] + cmd[1:])}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        out, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        status = f"timed out after {limit_s} s"
    wall = time.time() - t0
    print(out, end="" if out.endswith("\n") else "\n")
    print(f"=== {name}: {status} in {wall:.0f} s", flush=True)
    return status, wall, out


def device_name(smoke):
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "CPU (Triton interpreter)"


def main(argv=None) -> int:
    args = get_args(argv)
    if args.list:
        for name, (gpu, smoke, limit) in STEPS.items():
            print(f"{name:15s} {limit:4d} s  {' '.join(gpu[1:])}   | smoke: {' '.join(smoke[1:])}")
        return 0
    device = device_name(args.smoke)
    if not args.smoke and device.startswith("CPU"):
        raise SystemExit("gpu_check.py needs a CUDA GPU; use --smoke on the CPU")
    failed = []
    for name in args.steps:
        gpu_cmd, smoke_cmd, limit = STEPS[name]
        cmd = smoke_cmd if args.smoke else gpu_cmd
        status, wall, out = run_step(name, cmd, SMOKE_LIMIT_S if args.smoke else limit, args.smoke)
        if status != "ok":
            failed.append(f"{name} ({status})")
        if args.docs:
            shown = "\n".join(out.rstrip().splitlines()[-OUTPUT_LINES:])
            body = (f"`{' '.join(['python'] + cmd[1:])}` | {device} | {datetime.date.today()} | "
                    f"{wall:.0f} s | {status}\n\n```\n{shown}\n```")
            write_section(args.docs, f"gpu-check-{name}", body)
    print("\ngpu_check: " + (f"FAILED step(s): {', '.join(failed)}" if failed else f"all {len(args.steps)} step(s) ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
