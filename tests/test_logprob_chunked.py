"""Parity of nanopairwise/logprob_chunked.py (the CPU's token log-probs, row chunk by row chunk)
with losses.token_logprobs_ref, forward and backward, on test_logprob.py's cases: -inf logits,
ignored rows, a target that wins by a wide margin, chunk sizes that do not divide N, fp32 and
bf16; and that ops.token_logprobs picks it on the CPU by default."""

import pytest
import torch

from nanopairwise import logprob_chunked, ops
from nanopairwise.losses import IGNORE_INDEX, token_logprobs_ref
from test_logprob import TOL, check_parity, make_case, random_upstream, run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,V,temperature,kl,chunk", [
    (37, 1000, 1.0, "k1", 5),          # 8 chunks, the last of 2 rows
    (37, 32003, 0.7, "k3", 32),        # 2 chunks, odd V
    (5, 7, 0.7, "k2", 64),             # one chunk larger than N, tiny V
    (3, 13, 1.3, "k3", 1),             # one row a chunk
])
def test_chunked_matches_reference(dtype, N, V, temperature, kl, chunk):
    logits, targets, ref_logprobs = make_case(N, V, dtype, "cpu")
    upstream = random_upstream(N, "cpu")
    kw = dict(temperature=temperature, entropy=True, kl_estimator=kl)
    got = run(lambda *a, **k: logprob_chunked.token_logprobs(*a, **k, chunk=chunk), logits, targets, ref_logprobs,
              upstream, **kw)
    want = run(token_logprobs_ref, logits, targets, ref_logprobs, upstream, **kw)
    check_parity(got, want, TOL[dtype])
    ignored = targets == IGNORE_INDEX
    assert (got[1][ignored] == 0).all(), "ignored rows must get an all-zero gradient"


@pytest.mark.parametrize("entropy,used", [(False, ("logprobs",)), (True, ("entropy",)), (True, ("logprobs", "kl"))])
def test_chunked_with_outputs_left_unused(entropy, used):
    """Without entropy, or with only some outputs in the loss (their upstream gradients absent)."""
    logits, targets, ref_logprobs = make_case(23, 301, torch.float32, "cpu")
    upstream = {k: v for k, v in random_upstream(23, "cpu").items() if k in used}
    ref = ref_logprobs if "kl" in used else None
    got = run(lambda *a, **k: logprob_chunked.token_logprobs(*a, **k, chunk=4), logits, targets, ref, upstream,
              entropy=entropy)
    want = run(token_logprobs_ref, logits, targets, ref, upstream, entropy=entropy)
    check_parity(got, want, TOL[torch.float32])


def test_ignored_rows_get_zeros_even_when_all_their_logits_are_minus_inf():
    logits, targets, _ = make_case(9, 50, torch.float32, "cpu")
    logits[4], targets[4] = float("-inf"), IGNORE_INDEX          # e.g. a fully masked padding row
    x = logits.clone().requires_grad_(True)
    out = logprob_chunked.token_logprobs(x, targets, entropy=True, chunk=4)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert out.logprobs[4] == 0 and out.entropy[4] == 0 and (x.grad[4] == 0).all() and torch.isfinite(x.grad).all()


def test_ops_runs_chunked_on_the_cpu_by_default(monkeypatch):
    monkeypatch.delenv("NANOPAIRWISE_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.pick_backend(torch.empty(0)) == "chunked"
    calls = []
    monkeypatch.setattr(logprob_chunked.ChunkedTokenLogprobs, "apply",
                        lambda *a: calls.append(a) or (torch.zeros(3), None))
    ops.token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    assert len(calls) == 1
    monkeypatch.setenv("NANOPAIRWISE_KERNELS", "ref")          # the reference on request
    ops.token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    assert len(calls) == 1
