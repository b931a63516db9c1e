"""Ahead-of-time compile of every Triton kernel at its CUDA launch configurations, on the CPU.

Why. CI runs the kernels under TRITON_INTERPRET=1, which accepts code the GPU compiler refuses (a
module global that is not tl.constexpr) and says nothing about registers or spills. Triton's own
compiler does not need a GPU: `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32), options)` runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, and
ptxas from the triton wheel to a cubin) for any target. `cuobjdump --dump-resource-usage` from the
same wheel (triton/backends/nvidia/bin) reads the cubin's registers, stack (spills) and static
shared memory; the dynamic shared memory Triton allocates is in the kernel's metadata. What is
compiled (every kernel x launch configuration x dtype x flags x size class) is kernels/launches.py.

Occupancy (the CUDA occupancy calculator's rules, cc 8.0 to 10.0): registers are allocated per
warp in units of 256 (per thread, rounded up to a multiple of 8), 64 K per SM; each block also
reserves 1 KB of shared memory; at most 64 warps and 32 blocks per SM. Warps per SM =
warps per block x min(64 // warps, 65536 // (warps x regs_per_warp), smem_per_SM // block_smem, 32).

Runs in a process with TRITON_INTERPRET unset (under the interpreter @triton.jit returns an
interpreted function that cannot be compiled): scripts/kernel_resources.py is the entry point.
"""

import dataclasses
import os
import re
import subprocess
import tempfile

import triton

from kernels import linear_logprob, logprob, ppo_loss
from kernels.launches import Launch


@dataclasses.dataclass(frozen=True)
class Target:
    cc: int                  # compute capability x 10
    name: str                # a representative part
    smem_per_block: int      # the opt-in maximum of shared memory per block, bytes
    smem_per_sm: int         # shared memory per SM, bytes


TARGETS = {80: Target(80, "A100", 163 * 1024, 164 * 1024),
           90: Target(90, "H100", 227 * 1024, 228 * 1024),
           100: Target(100, "B200", 227 * 1024, 228 * 1024)}


def _jit_function(path):
    module, fn = path.split(".")
    return getattr({"logprob": logprob, "linear_logprob": linear_logprob, "ppo_loss": ppo_loss}[module], fn)


def _bind(launch: Launch, cc: int):
    """What `kernel[grid](*args)` computes before compiling: the backend and the binder's
    (bound args, specialisation, options) for these arguments on target cc."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit_function(launch.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels/aot.py needs TRITON_INTERPRET unset (got an interpreted kernel)")
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs + launch.options)
    return fn, backend, kwargs, binder(*launch.args, **kwargs)


def distinct(launches, cc: int) -> list:
    """The launches that compile to distinct kernels on target cc (the first of each): size cases
    an argument's class does not change, because the kernel does not specialise on it, drop out."""
    seen, out = set(), []
    for launch in launches:
        _, _, kwargs, (_, specialization, _) = _bind(launch, cc)
        key = (launch.kernel, repr(specialization), tuple(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def compile_launch(launch: Launch, cc: int):
    """triton.compile for one launch and target, with the signature, constexprs and attributes the
    runtime would give these arguments. Returns the CompiledKernel (asm: ptx, cubin; metadata)."""
    from triton.compiler import ASTSource
    fn, backend, kwargs, (bound_args, specialization, options) = _bind(launch, cc)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                          options=options.__dict__)


def cuda_bin(tool):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def resource_usage(kernel) -> dict:
    """Registers and stack per thread, static shared per block, from cuobjdump on the cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([cuda_bin("cuobjdump"), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "static_shared": int(fields["SHARED"])}


def occupancy(regs, warps, block_smem, target: Target) -> int:
    """Resident warps per SM (see the module docstring for the rules)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    blocks = min(64 // warps, 65536 // (warps * regs_per_warp), 32,
                 target.smem_per_sm // (block_smem + 1024))
    return blocks * warps


def check(launch: Launch, cc: int) -> dict:
    """Compile one launch for one target and measure it; 'error' holds a compile failure.
    ld_v4 / st_v4 count the 128-bit global loads and stores in the PTX (ld.global.v4.b32 moves
    8 bf16/fp16 or 4 fp32 values)."""
    row = {"kernel": launch.kernel, "dtype": launch.dtype, "flags": launch.flags, "cc": cc,
           "aligned": launch.aligned, "sizes": launch.sizes}
    try:
        kernel = compile_launch(launch, cc)
    except Exception as e:  # noqa: BLE001 -- any compiler failure is a gate failure, reported as such
        return dict(row, error=f"{type(e).__name__}: {e}"[:2000])
    use = resource_usage(kernel)
    shared = use["static_shared"] + kernel.metadata.shared
    warps = kernel.metadata.num_warps
    row.update(use, shared=shared, num_warps=warps, num_stages=kernel.metadata.num_stages,
               warps_per_sm=occupancy(use["regs"], warps, shared, TARGETS[cc]))
    ptx = kernel.asm["ptx"]
    row.update(ld_v4=len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)),
               st_v4=len(re.findall(r"st\.global(\.\w+)*\.v4", ptx)))
    return row


def problems(row) -> list:
    """Why a measured row fails the gate: compile error, spills (stack or local), shared memory."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["stack"] or row["local"]:
        out.append(f"{row['stack']} B stack + {row['local']} B local per thread (register spills)")
    if row["shared"] > TARGETS[row["cc"]].smem_per_block:
        out.append(f"{row['shared']} B shared > {TARGETS[row['cc']].smem_per_block} B")
    return out
