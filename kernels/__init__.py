"""Triton kernels, one op per file, each paired with its PyTorch reference in nanopairwise/losses.py:

    kernels/logprob.py         token_logprobs          <-> losses.token_logprobs_ref
    kernels/linear_logprob.py  linear_token_logprobs   <-> losses.linear_token_logprobs_ref
    kernels/ppo_loss.py        ppo_loss                <-> losses.ppo_loss_ref

The reference is the spec: each kernel must match it forward and backward (tests/). The kernels
import only nanopairwise/losses.py (the references and their return types); the choice between
kernel and reference at run time (the dispatch) lives in the library, nanopairwise/ops.py, which
is the one module of nanopairwise/ that imports this package. Also here: inputs.py (the launchers'
input checks), logits_tile.py (the LM-head logits tile linear_logprob.py's kernels share:
tl.dot loop, tiles, padded width), aot.py + launches.py (ahead-of-time compilation and resource checks for
sm_80 / sm_90 at every size specialisation),
bench.py with bench_harness.py, bench_device.py and bench_linear_logprob.py (benchmark tables against
eager and torch.compile).
"""
