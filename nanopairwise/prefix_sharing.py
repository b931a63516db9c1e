"""Prefix-shared scoring: run each shared prefix of a batch of inputs once, through the KV cache.

A judge's inputs share long prefixes (docs/DESIGN.md §1, JudgeTemplate.pair_segments): principle +
prompt is shared by both orders and by all K rollouts of a prompt, and in the anchor-first order
principle + prompt + anchor (+ the second user turn) by all K rollouts. Each input is given as a
tuple of segments; the inputs form a tree (a trie over segments), and every node's tokens are run
once, reading its ancestors' keys and values from the KV cache:

    naive    sum over inputs of len(input)                   tokens through the model
    shared   sum over the tree's nodes of len(node's tokens)  (shared_token_counts)

A node with one child and no input ending at it is merged into the child (a chain costs one
forward, not two), and identical inputs are one node (a round robin's two orders score each
ordered pair once). A batch of sibling nodes runs as one forward with the KV cache of their
parents gathered row by row (`child_cache`); nodes are sorted by length before they are cut into
batches (length-bucketed), so padding stays small. The result is the final-normed hidden state at
each input's last token, as `gather_last(model.trunk(input))` of the naive path gives it: the
same numbers up to floating-point reassociation (tests/test_prefix_sharing.py: |dp| <= 1e-5 in
fp32 on the judge's probabilities, with padding and unequal lengths).
"""

import torch

from nanopairwise.batching import gather_last, pad_batch


class Node:
    """A run of tokens in the tree: `ids`, the inputs that end here (`items`), and the children
    keyed by their segment."""
    __slots__ = ("ids", "items", "children")

    def __init__(self, ids):
        self.ids, self.items, self.children = list(ids), [], {}


def build_tree(segmented) -> list:
    """The trie of `segmented` (one tuple of id lists per input; empty segments are skipped), with
    single-child chains merged. Returns the root nodes."""
    top = {}
    for i, segments in enumerate(segmented):
        segments = [tuple(s) for s in segments if len(s)]
        if not segments:
            raise ValueError(f"prefix sharing: input {i} has no tokens")
        level, node = top, None
        for seg in segments:
            node = level.setdefault(seg, Node(seg))
            level = node.children
        node.items.append(i)
    return [_merge_chains(n) for n in top.values()]


def _merge_chains(node: Node) -> Node:
    while not node.items and len(node.children) == 1:
        (child,) = node.children.values()
        child.ids = node.ids + child.ids
        node = child
    node.children = {k: _merge_chains(c) for k, c in node.children.items()}
    return node


def shared_token_counts(segmented) -> tuple:
    """(naive, shared): tokens the naive path and the prefix-shared path run through the model
    (real tokens, no padding). Their ratio is the ideal speed-up of sharing."""
    naive = sum(len(s) for segments in segmented for s in segments)
    shared, stack = 0, build_tree(segmented)
    while stack:
        node = stack.pop()
        shared += len(node.ids)
        stack.extend(node.children.values())
    return naive, shared


def child_cache(lm, parent, rows: torch.Tensor, new_tokens: int):
    """A KV cache for len(rows) inputs whose history is row `rows[i]` of the cache `parent`,
    with room for `new_tokens` more slots."""
    cache = lm.new_kv_cache(len(rows), parent.length + new_tokens)
    L = parent.length
    for dst, src in ((cache.k, parent.k), (cache.v, parent.v)):
        for layer, buf in enumerate(src):
            dst[layer][:, :, :L] = buf[rows, :, :L]
    cache.key_mask[:, :L] = parent.key_mask[rows, :L]
    cache.next_pos.copy_(parent.next_pos[rows])
    cache.length = L
    return cache


@torch.no_grad()
def last_hidden_states(lm, segmented, pad_id: int, batch_size: int = 64) -> tuple:
    """(h_last, tokens): the final-normed hidden state at the last token of each input, (n, C),
    computed with every shared prefix run once (the module docstring), and the number of (padded)
    tokens the forwards ran on. `lm`: a Transformer (trunk, new_kv_cache)."""
    out = [None] * len(segmented)
    tokens = _run(lm, build_tree(segmented), None, None, out, pad_id, batch_size)
    return torch.stack(out), tokens


def _run(lm, nodes, parent, parent_rows, out, pad_id, batch_size) -> int:
    """Run `nodes` (siblings of cache `parent`, node i continuing row parent_rows[i]) in
    length-sorted batches, then each batch's children on that batch's cache (depth first, so at
    most one cache per tree level is alive). Returns the padded tokens run."""
    device = lm.lm_head_weight.device
    order = sorted(range(len(nodes)), key=lambda i: len(nodes[i].ids))
    tokens = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = [nodes[i] for i in chunk]
        ids, mask = pad_batch([n.ids for n in batch], pad_id, side="right")         # (b, T)
        ids, mask = ids.to(device), mask.to(device)
        tokens += ids.numel()
        if parent is None:
            cache = lm.new_kv_cache(len(batch), ids.size(1))
        else:
            cache = child_cache(lm, parent, parent_rows[chunk], ids.size(1))
        h_last = gather_last(lm.trunk(ids, mask, kv_cache=cache), mask)             # (b, C)
        for node, h in zip(batch, h_last):
            for i in node.items:
                out[i] = h
        children = [(row, c) for row, node in enumerate(batch) for c in node.children.values()]
        if children:
            rows = torch.tensor([row for row, _ in children], device=device)
            tokens += _run(lm, [c for _, c in children], cache, rows, out, pad_id, batch_size)
    return tokens
