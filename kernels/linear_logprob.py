"""Fused LM head + token log-probs: log-probs, entropy and KL straight from hidden states.

The spec is nanopairwise.losses.linear_token_logprobs_ref: logits = hidden (N, C) @ weight (V, C)^T,
then token_logprobs_ref. Here the (N, V) logits never exist in memory in the forward (the idea of
Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009), and the backward holds d-logits for
one vocabulary chunk at a time. For a Qwen2.5-0.5B head (C = 896, V = 151936) and N = 16384
tokens the bf16 logits alone are 4.98 GB; this op needs O(N) plus one chunk (<= 512 MiB).
A side effect: the forward's logits are fp32 accumulators never rounded to bf16, as F.linear's are,
so old, new and reference log-probs must all come from this op (PolicyLogprobs.reference).

Math. With z = hidden @ weight^T / T, logZ = logsumexp_v z_v, p = softmax(z):
    lp_raw = z_y - logZ            H = logZ - E_p[z] = -sum_v p_v log p_v
    d lp_raw / d logits_v = (onehot_v - p_v) / T
    d H      / d logits_v = -p_v (log p_v + H) / T
so with upstream gradients g_lp, g_H per row, dL/d logits = [g_lp (onehot - p) - g_H p (log p + H)] / T,
    dL/d hidden = dlogits @ weight (N, C)       dL/d weight = dlogits^T @ hidden (V, C).
The forward keeps, per row, only logZ and H (no E_p[z] needed: log p_v + H = z_v - logZ + H).
Everything the spec adds on top of (lp_raw, H) is O(N) and done by autograd with the spec's own
functions: the clamp lp <= 0 (torch's clamp gradient: passes where lp_raw <= 0), the ignore
mask (0 and no gradient at targets == ignore_index), and KL via losses.kl_estimate (k1/k2/k3).
Fusing those would save a few kernel launches of N floats against 2·N·V·C FLOPs of matmul.

Forward (kernel 1). Grid (row tiles of BLOCK_N tokens) x (S vocabulary splits). A program walks
the vocabulary tiles of its split; each (BLOCK_N, BLOCK_V) logits tile is a tl.dot loop over C in
BLOCK_C steps with fp32 accumulation, consumed at once by an online log-sum-exp (Milakov &
Gimelshein 2018, arXiv 1805.02867): running max m, s = sum e^(z-m), t = sum e^(z-m) (z-m);
when m moves to m' (alpha = e^(m-m')): s' = alpha s, t' = alpha (t + (m-m') s); plus the target
logit when the target falls in the tile. A split writes lse_s = m + log s and the entropy of the
softmax restricted to its columns, H_s = log s - t/s (no cancellation of logZ against E_p[z] at
|z| ~ 20, which would cost ~10 ulp(|z|)). Torch merges the S partials, O(N·S), with the chain
rule of entropy: logZ = logsumexp_s lse_s, w_s = e^(lse_s - logZ), H = sum_s w_s (H_s - log w_s).

Backward (kernel 2 + two cuBLAS GEMMs per vocabulary chunk of V_c columns). Kernel 2 recomputes
the logits tiles of the chunk (grid over (N, V_c) tiles, the natural GEMM tiling), turns them into
d-logits with the formula above and writes them (N, V_c) in the operand dtype; then
grad_weight[chunk] = dlogits^T @ hidden (exclusive rows, no accumulation) and grad_hidden +=
dlogits @ weight[chunk] (fp32 accumulator of N·C, small). Why not the two all-Triton designs:
  (a) one kernel per token tile with tl.atomic_add into dW: (N / BLOCK_N)·V·C fp32 atomics,
      128 · 151936 · 896 · 4 B = 70 GB of read-modify-write for the goal shape: far slower.
  (b) a dh kernel over token tiles and a dW kernel over vocab tiles: each program must hold a
      (BLOCK_N, C) or (BLOCK_V, C) fp32 accumulator, 128 · 896 · 4 B = 458 KB, more than an SM's
      registers; tiling C instead recomputes the logits C / BLOCK_C times.
The chunked design is deterministic (no atomics), recomputes the logits once, and gives the two
gradient products to cuBLAS at full speed. Its price: d-logits for one chunk touch memory.

The logits tiles of both kernels, their sizes and the width (padded to 16): kernels/logits_tile.py.

Cost, with e = bytes per element of hidden/weight (2 for bf16), S splits, V_c chunk columns:
    FLOPs   forward 2·N·V·C     backward 2·N·V·C (recompute) + 4·N·V·C (two GEMMs) = 8·N·V·C total
            (unfused: 6·N·V·C, since it keeps the logits instead of recomputing them)
    HBM     forward N·C·e + V·C·e (+ L2 re-reads of W per row tile) + 8·N·S + 4·N writes
            backward 3·N·V·e (d-logits written once, read by two GEMMs) + (V/V_c)·N·C·(e + 8)
            (unfused: 6·N·V·e: logits written, read by the log-prob forward and backward, d-logits
            written and read by two GEMMs)
    peak    N·V_c·e (d-logits chunk) + N·C·(4 + e) + V·C·e (grad_weight); unfused 2·N·V·e.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.inputs import KernelInputError, check_token_inputs
from kernels.logits_tile import kernel_width, logits_tile, tiles
from nanopairwise import losses

DLOGITS_CHUNK_BYTES = 512 * 2**20  # backward: d-logits of one vocabulary chunk fit in this


@triton.jit(do_not_specialize=["N", "V", "n_splits"])
def _linear_logprob_fwd_kernel(
    hidden_ptr,        # (N, C) fp32 / fp16 / bf16, contiguous
    weight_ptr,        # (V, C) same dtype, contiguous
    targets_ptr,       # (N,) int64 target ids (ignored rows: any value, masked by the caller)
    lse_ptr,           # (N, S) fp32 out: logsumexp of z over this program's vocabulary split
    ent_ptr,           # (N, S) fp32 out: entropy of the softmax restricted to the split
    target_logit_ptr,  # (N,) fp32 out, zero-filled: z[target], written by the split holding it
    N, V, C,           # tokens, vocabulary, width (divisible by 16: logits_tile.kernel_width)
    v_per_split,       # vocabulary columns per split, a multiple of BLOCK_V
    n_splits,          # S, the row stride of lse / ent
    inv_temperature,   # 1 / T
    BLOCK_N: tl.constexpr,        # tokens per program
    BLOCK_V: tl.constexpr,        # vocabulary columns per logits tile
    BLOCK_C: tl.constexpr,        # width of one tl.dot step
    DOT_PRECISION: tl.constexpr,  # "ieee" (no TF32, as torch's default) or "tf32"; moot for 16-bit
):
    # 1. this program's token rows and vocabulary split [v_start, v_end)
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)  # every split holds >= 1 column (launcher)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)                # sum e^(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)                # sum e^(z - m) (z - m)
    z_y = tl.zeros((BLOCK_N,), tl.float32)              # target logit, if in this split
    for v0 in range(v_start, v_end, BLOCK_V):
        # 2. one logits tile, never stored: (BN, BV) fp32, -inf beyond the split
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < v_end
        z = logits_tile(hidden_ptr, weight_ptr, rows, N, cols, v_end, C, inv_temperature,
                        BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # 3. online log-sum-exp; the first tile has a finite max, so alpha = e^-inf = 0 is exact
        #    (s = 0 there too: the where avoids (m - m_new) s = -inf * 0 = NaN)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])                                   # 0 on masked columns
        t = alpha * (t + (tl.where(s > 0, m, m_new) - m_new) * s)
        t += tl.sum(e * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), 1)  # avoid 0 * -inf
        s = s * alpha + tl.sum(e, 1)
        m = m_new
        # 4. gather the target logit (splits are BLOCK_V-aligned: masked columns are >= V > y)
        hit = cols[None, :] == y[:, None]
        z_y += tl.sum(tl.where(hit, z, 0.0), 1)
    # 5. per-split results; the launcher merges the S splits
    tl.store(lse_ptr + rows * n_splits + split, m + tl.log(s), mask=row_ok)
    tl.store(ent_ptr + rows * n_splits + split, tl.log(s) - t / s, mask=row_ok)
    tl.store(target_logit_ptr + rows, z_y, mask=row_ok & (y >= v_start) & (y < v_end))


@triton.jit(do_not_specialize=["N"])
def _linear_logprob_bwd_kernel(
    hidden_ptr,       # (N, C) as in the forward
    weight_ptr,       # (V, C) as in the forward
    targets_ptr,      # (N,) int64
    log_z_ptr,        # (N,) fp32 logsumexp of z over the full vocabulary (forward)
    entropy_ptr,      # (N,) fp32 H (forward)
    g_lp_ptr,         # (N,) fp32 dL/d lp_raw (clamp and ignore mask already applied by autograd)
    g_ent_ptr,        # (N,) fp32 dL/dH
    dlogits_ptr,      # (N, V_c) out, operand dtype: dL/d logits of columns v0 .. v0 + V_c
    N, V_c, C,        # tokens, chunk columns, width (as in the forward)
    v0,               # first vocabulary column of the chunk
    inv_temperature,  # 1 / T
    BLOCK_N: tl.constexpr,        # tokens per program
    BLOCK_V: tl.constexpr,        # chunk columns per program
    BLOCK_C: tl.constexpr,        # width of one tl.dot step
    DOT_PRECISION: tl.constexpr,  # as in the forward
):
    # 1. this program's (BN, BV) tile of the chunk, and the per-row scalars
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # column in chunk
    row_ok = rows < N
    col_ok = local < V_c
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    log_z = tl.load(log_z_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    # 2. recompute the logits tile and the softmax from the saved logZ
    z = logits_tile(hidden_ptr, weight_ptr, rows, N, v0 + local, v0 + V_c, C, inv_temperature,
                    BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION)
    log_p = z - log_z[:, None]
    p = tl.exp(log_p)
    onehot = ((v0 + local)[None, :] == y[:, None]).to(tl.float32)
    # 3. dL/dlogits = [g_lp (onehot - p) - g_H p (log p + H)] / T, stored in the operand dtype
    dz = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (log_p + ent[:, None])
    dz = dz * inv_temperature
    tl.store(dlogits_ptr + rows[:, None] * V_c + local[None, :],
             dz.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class LinearLogprobs(torch.autograd.Function):
    """(hidden (N, C), weight (V, C), targets (N,)) -> (lp_raw, entropy), (N,) fp32, unmasked."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_splits, vocab_chunk):
        (N, C), V = hidden.shape, weight.shape[0]
        t = tiles(hidden.device, hidden.dtype)
        bn, bv = t["BLOCK_N"], t["BLOCK_V"]
        row_tiles, vocab_tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
        # splits: one forward program fits per SM (tiles: registers), so aim at 2 waves of them,
        # 2 x SMs programs: fewer leave SMs idle at small N, more re-read hidden and grow the O(N·S)
        # merge. N = 16384 on an H100 (132 SMs) has 256 row tiles already: 1 split. Interpreter: 2.
        if vocab_splits is None:
            vocab_splits = 2 if not hidden.is_cuda else triton.cdiv(
                2 * torch.cuda.get_device_properties(hidden.device).multi_processor_count, row_tiles)
        v_per_split = triton.cdiv(vocab_tiles, min(max(vocab_splits, 1), vocab_tiles)) * bv
        S = triton.cdiv(V, v_per_split)  # recount so no split is empty
        lse = torch.empty(N, S, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(lse)
        target_logit = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        _linear_logprob_fwd_kernel[(row_tiles, S)](
            hidden, weight, targets, lse, ent, target_logit, N, V, C, v_per_split, S, 1.0 / temperature, **t)
        # merge splits: logZ = logsumexp_s lse_s; H = sum_s w_s (H_s - log w_s), log w_s = lse_s - logZ
        log_z = torch.logsumexp(lse, 1)                                    # (N,)
        log_w = lse - log_z[:, None]                                       # (N, S)
        entropy = (log_w.exp() * (ent - log_w)).sum(1)                     # (N,)
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy)
        ctx.temperature, ctx.vocab_chunk = temperature, vocab_chunk
        return target_logit - log_z, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        (N, C), V = hidden.shape, weight.shape[0]
        t = tiles(hidden.device, hidden.dtype)
        # chunk: the d-logits (N, V_c) fill DLOGITS_CHUNK_BYTES, in whole BLOCK_V tiles: 16384 columns
        # at N = 16384 bf16, so each chunk's GEMMs are 2·N·V_c·C = 0.48 TFLOP (far past launch cost)
        # and the peak stays 512 MiB against the unfused path's 2·N·V·e = 10 GB. (Liger's fused
        # linear cross-entropy chunks tokens instead, sizing a chunk's logits like the hidden states.)
        bv = t["BLOCK_V"]
        chunk = min(ctx.vocab_chunk or max(bv, DLOGITS_CHUNK_BYTES // (N * hidden.element_size()) // bv * bv), V)
        g_lp, g_ent = g_lp.float().contiguous(), g_ent.float().contiguous()
        grad_hidden = torch.zeros(N, C, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        buf = torch.empty(N * chunk, dtype=hidden.dtype, device=hidden.device)  # our own scratch
        for v0 in range(0, V, chunk):
            vc = min(chunk, V - v0)
            dlogits = buf[:N * vc].view(N, vc)                               # (N, V_c)
            _linear_logprob_bwd_kernel[(triton.cdiv(N, t["BLOCK_N"]), triton.cdiv(vc, bv))](
                hidden, weight, targets, log_z, entropy, g_lp, g_ent, dlogits, N, vc, C, v0,
                1.0 / ctx.temperature, **t)
            if need_weight:  # rows v0 .. v0 + V_c of dW are this chunk's alone: one rounding
                torch.mm(dlogits.t(), hidden, out=grad_weight[v0:v0 + vc])  # (V_c, C)
            if need_hidden:  # fp32 sum over chunks of (N, C) partial products (each rounded to e bytes)
                grad_hidden += dlogits @ weight[v0:v0 + vc]
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, ref_logprobs=None, entropy=False,
                          kl_estimator="k3", ignore_index=losses.IGNORE_INDEX, *, vocab_splits=None,
                          vocab_chunk=None) -> losses.TokenLogprobs:
    """losses.linear_token_logprobs_ref without (N, V) logits. vocab_splits (forward parallelism)
    and vocab_chunk (backward d-logits columns) are tuning knobs; None picks them."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise KernelInputError(f"linear_token_logprobs: need hidden (N, C), weight (V, C), targets (N,); got "
                               f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    check_token_inputs("linear_token_logprobs", {"hidden": hidden, "weight": weight}, targets, weight.shape[0],
                       temperature, ref_logprobs, ignore_index)
    if hidden.shape[0] == 0:  # nothing to launch; the reference returns the empty outputs
        return losses.linear_token_logprobs_ref(hidden, weight, targets, temperature, ref_logprobs,
                                                entropy, kl_estimator, ignore_index)
    if hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        hidden, weight = hidden.float(), weight.float()  # exact; bf16 tl.dot is wrong in the interpreter
    pad = kernel_width(hidden.shape[1]) - hidden.shape[1]  # zero columns: exact; autograd slices the grads
    hidden, weight = (F.pad(hidden, (0, pad)), F.pad(weight, (0, pad))) if pad else (hidden, weight)
    lp_raw, ent = LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
                                       float(temperature), vocab_splits, vocab_chunk)
    # the spec's O(N) epilogue, through autograd: clamp to <= 0, zero ignored rows, KL
    valid = targets != ignore_index
    zero = torch.zeros_like(lp_raw)
    logprobs = torch.where(valid, lp_raw.clamp(max=0.0), zero)
    ent = torch.where(valid, ent, zero) if entropy else None
    return losses.TokenLogprobs(logprobs, ent, losses.token_kl(logprobs, ref_logprobs, valid, kl_estimator))
