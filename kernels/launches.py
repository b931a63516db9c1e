"""The CUDA launches the compile gate (kernels/aot.py) compiles: every Triton kernel at every
launch configuration, dtype, reachable constexpr flags and size class a GPU run can meet.

What is compiled. `launches()` lists one Launch per (kernel, CUDA launch configuration, dtype,
reachable constexpr flags, size classes). Tiles and warps come from the functions the launchers
call (logprob._launch_config, logits_tile.tiles and kernel_width, ppo_loss.BLOCK), so this list
cannot drift from what runs. Arguments are small CPU tensors standing in for the real ones:
Triton's own runtime binder (the code `kernel[grid](...)` runs) turns them into the signature and
specialisation attributes, so 16-byte aligned pointers and integers divisible by 16 get the
`tt.divisibility` hints a GPU run would give them. Each size argument takes each class it can
take, independently of the others (SIZES): two fixed corners (all divisible by 16; odd tokens
and vocabulary at C = 896) missed that the fused head spilled at any width not divisible by 16,
with an odd vocabulary or chunk in 16-bit and even alone in the fp32 backward. `distinct()`
keeps one launch per compiled kernel, i.e. per distinct binder key.
"""

import dataclasses
import itertools

import torch

from kernels import logits_tile, logprob, ppo_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str              # "module.function" in kernels/
    dtype: str               # the data dtype (fp32 / bf16 / fp16)
    flags: str               # the constexpr flags and tiles, for the table
    args: tuple              # positional arguments: CPU tensors, ints, floats, None
    constexprs: tuple        # (name, value) pairs passed by keyword
    options: tuple           # (name, value): num_warps, num_stages as the launcher passes them
    aligned: bool            # every size argument divisible by 16 (pointers are 16-byte aligned either way)
    sizes: str = "aligned"   # the size classes, e.g. "N=odd V=16k C=odd S=1" (see SIZES)


def _t(dtype):
    """A stand-in tensor: its dtype and the alignment of its data pointer are all the binder reads.
    Always aligned: the launchers pass torch allocations (256-byte aligned) or .contiguous()
    copies; only a caller's offset view could arrive misaligned."""
    return torch.zeros(16, dtype=dtype)


# Triton's binder specialises every integer argument on its value: divisible by 16 (a
# `tt.divisibility` hint that lets loads and stores vectorise), not, or 1 (compiled in as a
# constant), unless the kernel says do_not_specialize. A GPU run compiles one kernel per class
# combination it meets, so the gate compiles every combination the launchers can pass: SIZES gives
# each size argument its reachable classes (a value of each), KERNEL_SIZES which size arguments
# each kernel takes. Not here: V = 1 (no vocabulary), and what the launchers fix: v_per_split and
# v0 (multiples of BLOCK_V: "16k" always), the fused head's width (logits_tile.kernel_width: C
# "odd" reaches it padded), pointers (16-byte aligned, see _t), ignore_index (-100, the default).
SIZES = {
    "N": {"16k": 4096, "odd": 4095, "1": 1},              # tokens: any count, one included
    "V": {"16k": 151936, "odd": 151935},                   # vocabulary: Qwen2.5's; GPT-2's is odd
    "C": {"16k": 896, "odd": 900},                         # width: real models' are multiples of 64
    "stride": {"16k": 151936, "odd": 151937},              # logits row stride >= V (x[:, :V] views)
    "S": {"16k": 16, "odd": 5, "1": 1},                    # vocabulary splits of the fused forward
    "V_c": {"16k": 8192, "odd": 4863, "1": 1},             # fused backward chunk (the last: V mod chunk)
}
KERNEL_SIZES = {"logprob": ("stride", "V"), "linear_logprob_fwd": ("N", "V", "C", "S"),
                "linear_logprob_bwd": ("N", "V_c", "C"), "ppo_loss": ("N",)}


def size_cases(names, mixed=True):
    """(label, {name: value}) for every combination of the classes of the size arguments `names`
    (mixed), or only all of them divisible by 16 (the label 'aligned')."""
    combos = itertools.product(*(SIZES[n] for n in names)) if mixed else [("16k",) * len(names)]
    return [("aligned" if set(c) == {"16k"} else " ".join(f"{n}={k}" for n, k in zip(names, c)),
             {n: SIZES[n][k] for n, k in zip(names, c)}) for c in combos]


def logprob_configs():
    """The distinct (BLOCK_V, num_warps) _launch_config gives over vocabulary sizes 1 .. 2^20."""
    return sorted({logprob._launch_config(v) for k in range(21) for v in (2**k - 1, 2**k, 2**k + 1) if v > 0})


def launches(mixed="all"):
    """Every kernel x CUDA launch configuration x dtype x reachable constexpr flags x size classes.
    mixed: "all" (every size-class combination for every variant), "heaviest" (every combination
    for each kernel's heaviest variant only: the largest logprob BLOCK_V with entropy, the PPO loss
    with all terms; the others aligned), "none" (aligned sizes only)."""
    f32, i64 = _t(torch.float32), _t(torch.int64)
    out = []

    def add(kernel, dtype, flags, sizes, heaviest, build, cx, opt):
        for label, z in size_cases(KERNEL_SIZES[sizes], mixed == "all" or (mixed == "heaviest" and heaviest)):
            out.append(Launch(kernel, dtype, flags, build(z), cx, opt, label == "aligned", label))

    for name, dtype in DTYPES.items():
        x = _t(dtype)
        # 1. kernels/logprob.py: forward and backward, entropy on or off (its outputs None if off)
        for block_v, num_warps in logprob_configs():
            for ent in (False, True):
                flags = f"BLOCK_V={block_v} ENTROPY={int(ent)}"
                cx = (("BLOCK_V", block_v), ("ENTROPY", ent))
                opt = (("num_warps", num_warps),)
                oe = f32 if ent else None
                heavy = ent and (block_v, num_warps) == logprob_configs()[-1]
                add("logprob._logprob_fwd_kernel", name, flags, "logprob", heavy,
                    lambda z: (x, z["stride"], i64, f32, oe, f32, f32, oe, z["V"], 0.7, -100), cx, opt)
                add("logprob._logprob_bwd_kernel", name, flags, "logprob", heavy,
                    lambda z: (x, z["stride"], i64, _t(dtype), f32, oe, f32, f32, oe, z["V"], 0.7, -100),
                    cx, opt)
        # 2. kernels/linear_logprob.py: forward and backward at the CUDA tiles
        tiles = logits_tile.tiles(torch.device("cuda"), dtype)
        cx = tuple((k, v) for k, v in tiles.items() if not k.startswith("num_"))
        opt = tuple((k, v) for k, v in tiles.items() if k.startswith("num_"))
        flags = " ".join(f"{k}={v}" for k, v in cx)
        v_per_split, v0 = 37888, 8192   # multiples of BLOCK_V, as the launcher makes them
        width = logits_tile.kernel_width   # the launcher pads C to this
        add("linear_logprob._linear_logprob_fwd_kernel", name, flags, "linear_logprob_fwd", True,
            lambda z: (x, _t(dtype), i64, f32, f32, f32, z["N"], z["V"], width(z["C"]), v_per_split, z["S"], 0.7),
            cx, opt)
        add("linear_logprob._linear_logprob_bwd_kernel", name, flags, "linear_logprob_bwd", True,
            lambda z: (x, _t(dtype), i64, f32, f32, f32, f32, _t(dtype), z["N"], z["V_c"], width(z["C"]), v0, 0.7),
            cx, opt)
        # 3. kernels/ppo_loss.py: every KL kind x value loss on or off in fp32 (what the log-prob
        #    kernels return); bf16 / fp16 with all terms off and all on. Inputs share one dtype: the
        #    kernels cast each load to fp32, so dtypes change only the load instructions.
        combos = [(k, v) for k in sorted(set(ppo_loss.KL_KINDS.values())) for v in (False, True)]
        for kl_kind, has_value in (combos if name == "fp32" else [combos[0], combos[-1]]):
            flags = f"KL_KIND={kl_kind} HAS_VALUE={int(has_value)} BLOCK={ppo_loss.BLOCK}"
            cx = (("KL_KIND", kl_kind), ("HAS_VALUE", has_value), ("BLOCK", ppo_loss.BLOCK))
            ins, heavy = (x,) * 8, (kl_kind, has_value) == combos[-1]
            add("ppo_loss._ppo_loss_fwd_kernel", name, flags, "ppo_loss", heavy,
                lambda z: (*ins, f32, z["N"], 0.8, 1.2, 0.2), cx, ())
            add("ppo_loss._ppo_loss_bwd_kernel", name, flags, "ppo_loss", heavy,
                lambda z: (*ins, f32, x, x, z["N"], 0.8, 1.2, 0.2), cx, ())
    return out
