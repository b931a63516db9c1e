"""Token batching: padding, per-rank shares of a batch, minibatches, last-token reads, batched scoring.

The tensor helpers every phase shares (rollout, the judge and BT scores, train_rm.py's batches,
PPO minibatches); nothing here reads files.
"""

import torch

from nanopairwise.common import derive_seed



def pad_batch(seqs, pad_id: int, side: str = "right"):
    """Pad token lists to one length. Returns (ids (B, T) long, mask (B, T) long, 1 = real token).

    Right padding suits training (positions start at 0); left padding suits batched generation
    (every prompt ends at the last column, so new tokens append in lockstep).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_batch: empty batch")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def score_batches(score, encode, items, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """One number per item, `batch_size` items per forward: (n,) fp32 on the CPU, in the items'
    order. Each item becomes token ids by `encode(item)`; the inputs are sorted by length and cut
    into batches (length-bucketed: little padding); a batch is right-padded and `score(ids (b, T),
    mask (b, T))`, on `device`, returns its (b,) numbers (the judge's verdict probability, the BT
    model's score)."""
    seqs = [encode(it) for it in items]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = pad_batch([seqs[r] for r in rows], pad_id, side="right")
        out[rows] = score(ids.to(device), mask.to(device)).float().cpu()
    return out


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each right-padded row of mask (B, T) (0 for an empty row)."""
    return mask.long().sum(1).clamp(min=1) - 1


def gather_last(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at each right-padded row's last real token: (B, ...). Where a causal model
    has read the whole input: the judge's verdict logits, the BT reward model's score."""
    rows = torch.arange(x.size(0), device=x.device)
    return x[rows, last_index(mask.to(x.device))]


def rank_batch(n: int, batch_size: int, step: int, seed: int, rank: int, world_size: int, lengths=None,
               window: int = 0) -> list:
    """Indices (into n records) of this rank's share of global batch `step`.

    The data order is one permutation of range(n) per epoch, the same on every rank and a function
    of (seed, epoch) only, so a resumed run continues exactly; epoch e holds n // batch_size batches
    (the remainder is not used that epoch), and rank r takes the r-th of world_size equal slices.
    With `lengths` (one per record) and `window` > 0 the order is length-bucketed (bucket_order).
    """
    epoch, pos = divmod(step, n // batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data_order", epoch)))
    if lengths is not None and window > 0:
        generator = torch.Generator().manual_seed(derive_seed(seed, "length_buckets", epoch))
        order = bucket_order(order[:n // batch_size * batch_size], lengths, batch_size, window, generator)
    per_rank = batch_size // world_size
    start = pos * batch_size + rank * per_rank
    return order[start:start + per_rank].tolist()


def bucket_order(order: torch.Tensor, lengths, batch_size: int, window: int, generator) -> torch.Tensor:
    """Length-bucketed batches: each run of `window` batches of `order` (a shuffled index list, a
    multiple of batch_size long) is sorted by length and cut into batches, which are then put in
    random order within the run. Batches hold inputs of similar length (little padding); which
    inputs meet stays random across runs and epochs."""
    out = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start:start + window * batch_size].tolist(), key=lambda i: lengths[i])
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        out += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return torch.tensor(out, dtype=torch.long)


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator = None, shuffle: bool = True,
                        drop_last: bool = False):
    """Yield LongTensor index batches covering range(n) once (a fresh permutation if shuffle)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def shard_for_rank(items, rank: int, world_size: int) -> list:
    """Items rank, rank + world_size, ... (strided, so shard sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]
