"""KV caches for incremental decoding: the growing one of `Transformer.trunk`, and the static one of
the compiled decode step (decode.py).

Both hold per-layer K/V buffers (B, Hkv, S_max, D) allocated once and a key mask (B, S_max),
1 = the slot holds a real token. Prompts are left-padded to one length, so every row writes its
t-th token to the same slot and all rows share one slot counter; finished rows keep feeding pads
(key mask 0). The two differ in what a step reads:

  KVCache        the filled prefix [0, length): shapes grow by one slot per step (eager only);
  StaticKVCache  all S_max slots, the unfilled ones masked: every step has the same shapes, so one
  + LayerKV      compiled graph (and on CUDA one CUDA graph) serves every step. Slots are written
                 at a slot tensor, so no step reads a position back to the host.
"""

import torch
import torch.nn as nn


class KVCache:
    """The cache `Transformer.trunk(..., kv_cache=)` appends to; a host-side `length` counts the
    slots filled. next_pos (B,): the position id the next real token of each row gets."""

    def __init__(self, cfg, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length, self.max_len = 0, max_len

    def update(self, layer_idx: int, k, v):
        """Write k, v (B, Hkv, T, D) into the slots after `length`; return the filled prefix."""
        end = self.length + k.size(2)
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


class LayerKV(nn.Module):
    """One layer's fixed-shape K/V buffers (B, Hkv, S_max, D), owned by that layer (decode.py), so
    the compiled layer code is the same for every layer. Buffers (not plain tensors) so that
    torch.compile treats them as state with fixed addresses, which CUDA graphs need."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """Write k, v (B, Hkv, T, D) at `slots` (T,) (an in-place index_put, also when compiled);
        return all S_max slots."""
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        return self.k, self.v


class StaticKVCache(nn.Module):
    """What the layers share: which slots hold real tokens and the rows' next positions.
    key_mask (B, S_max) bool; next_pos (B,) long. The K/V buffers are the layers' (LayerKV)."""

    def __init__(self, batch_size: int, max_len: int, device):
        super().__init__()
        self.register_buffer("key_mask", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)
        self.register_buffer("next_pos", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("k_slot", torch.arange(max_len, device=device), persistent=False)  # (S_max,)
        self.batch_size, self.max_len = batch_size, max_len

    def reset(self):
        """Empty every slot (K/V need no clearing: a slot is read only after it was written)."""
        self.key_mask.zero_()
        self.next_pos.zero_()

    def positions(self, real):
        """real (B, T) bool, the tokens about to be written -> their position ids (B, T) (the count
        of real tokens before each; pads get the last real position, clamped at 0). Advances next_pos."""
        pos = (self.next_pos[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
        self.next_pos += real.sum(1)
        return pos

    def attention_mask(self, slots, real):
        """Mark `slots` (T,) as holding `real` (B, T) and return the mask (B, 1, T, S_max) of the T
        queries: a query attends the real keys at or before its slot, and always itself."""
        self.key_mask[:, slots] = real
        q_slot, k_slot = slots[:, None], self.k_slot[None, :]  # (T, 1), (1, S_max)
        mask = ((k_slot <= q_slot) & self.key_mask[:, None, :]) | (k_slot == q_slot)  # (B, T, S_max)
        return mask[:, None]
