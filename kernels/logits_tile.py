"""One tile of LM-head logits on a GPU: the tl.dot loop both fused-head kernels share, its tiles,
and the sizes it needs to vectorise (kernels/linear_logprob.py is the op; this is its GEMM).

The tile. z = hidden[rows] @ weight[cols]^T / T, a (BLOCK_N, BLOCK_V) fp32 accumulator, built in
BLOCK_C-wide steps over the width C: each step loads a (BLOCK_N, BLOCK_C) slice of hidden and a
(BLOCK_C, BLOCK_V) slice of weight and multiplies them on the tensor cores (16-bit operands) or
with FMAs (fp32, DOT_PRECISION "ieee": no TF32, as torch's default matmul).

Sizes. Triton's binder specialises each integer argument on whether it is divisible by 16, and
the loads of a slice become 128-bit vector loads (and cp.async copies into the pipeline's shared
memory) only when it can prove every row starts 16-element aligned: a contiguous operand whose
row stride C is divisible by 16. With C = 72 or 900 the slices load element by element, each
with its own 64-bit address and mask, and the 16-bit forward and backward needed 255 registers
and spilled 8-16 B per thread on sm_80 (kernels/aot.py compiled every size class). So the
kernels take contiguous operands, rows C apart (no stride arguments), and C divisible by 16: the
launcher pads hidden and weight with zero columns to kernel_width(C) otherwise, which adds
nothing to either product, at the cost of padded copies of both (V·C·e more bytes held until the
backward; no real model pays it: widths are multiples of 64). The other size
arguments (tokens, vocabulary, splits) only mask rows or columns that are not the loads'
contiguous dimension, so the kernels do not specialise on them (do_not_specialize): fewer
variants to compile on a GPU, and every one of them compiled by the gate.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, rows, n_rows, cols, v_end, C, inv_temperature,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """z = hidden[rows] @ weight[cols]^T / T as a (BLOCK_N, BLOCK_V) fp32 tile; both operands are
    contiguous, rows C apart. Rows >= n_rows and cols >= v_end read zeros; callers mask them.
    rows, cols are int64 (V·C passes 2^31 for big heads)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        h = tl.load(hidden_ptr + rows[:, None] * C + c[None, :],
                    mask=(rows[:, None] < n_rows) & (c[None, :] < C), other=0.0)       # (BN, BC)
        w_t = tl.load(weight_ptr + cols[None, :] * C + c[:, None],
                      mask=(cols[None, :] < v_end) & (c[:, None] < C), other=0.0)      # (BC, BV)
        acc = tl.dot(h, w_t, acc, input_precision=DOT_PRECISION)                       # fp32 acc
    return acc * inv_temperature


def kernel_width(C: int) -> int:
    """The width the kernels see: C rounded up to a multiple of 16 (see Sizes above)."""
    return triton.cdiv(C, 16) * 16


def tiles(device, dtype) -> dict:
    """Tiles, warps, pipeline stages and dot precision; the interpreter's tiles are small (BLOCK_C
    32, so a padded width of 48 still leaves a partial step), so CPU tests cover many (partial)
    tiles. On CUDA, chosen by ptxas's
    resource report (no GPU has timed them yet; kernels/aot.py compiles them for sm_80/90/100 at
    every size class and the compile gate test fails on any spill). The numbers, for 8 warps =
    256 threads and a (BLOCK_N, BLOCK_V) fp32 logits tile, C divisible by 16:
      registers   the tile is BN·BV / 256 floats per thread: 64 at 128 x 128, and the forward's
                  online softmax keeps ~3 tile-sized temporaries (z masked, e, e·(z - m)) live
                  with it, so 128 x 128 needed 255 registers and spilled 144-1320 B per thread
                  (fwd and bwd, every dtype). At 64 x 128 the tile is 32 floats; the forward uses
                  ~180 registers, the backward ~80-130, no spills.
      shared      a pipeline stage holds one (BN, BC) slice of hidden and one (BC, BV) slice of
                  weight: (64 + 128) · 64 · 2 B = 24 KB for 16-bit operands, 72 KB for 3 stages,
                  well inside 163 KB (sm_80) and 227 KB (sm_90).
      occupancy   ~180 registers x 256 threads leave room for one forward program per SM (8 warps
                  of 64): latency is hidden by the 3-stage pipeline of loads, not by warps, as in
                  GEMMs (the Triton matmul tutorial's first H100 config, 128 x 256 x 64, 3 stages,
                  8 warps, holds a 128-float accumulator per thread but nothing else tile-sized).
      bytes/FLOP  a C-step loads (BN + BV)·BC·e bytes for 2·BN·BV·BC FLOPs: 2·BN·BV / ((BN + BV)·e)
                  = 43 FLOP/B at 64 x 128 in bf16 (64 at 128 x 128), from L2/shared memory; the
                  programs of one wave share the weight tiles through L2.
    fp32 operands run tl.dot as FMAs ("ieee", no tensor cores): their operand slices live in
    registers, so they get a smaller tile, 32 x 128 x 32 with 8 warps (no spills; with 4 warps the
    forward spilled for odd C, 64 x 128 spilled on sm_80). DOT_PRECISION is moot for 16-bit.
    """
    precision = dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_C=32, num_warps=4, num_stages=1, **precision)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_C=32, num_warps=8, num_stages=3, **precision)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_C=64, num_warps=8, num_stages=3, **precision)
