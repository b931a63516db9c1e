"""A decoder-only transformer for the Llama family, loadable from and savable to HF checkpoints.

One module covers Llama 3.x (incl. "llama3" RoPE scaling), SmolLM2 (a llama), Mistral, Qwen2/2.5
(bias on q/k/v) and Qwen3 (RMSNorm on q and k per head, explicit head_dim): they differ only in
the flags of `ModelConfig`. Block (pre-norm, as in Llama, arXiv 2302.13971):

    h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))    n1, n2 RMSNorm
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))                      (SwiGLU)

Submodule names mirror the HF checkpoint (`model.layers.3.self_attn.q_proj.weight`, ...), so
loading is a 1:1 copy (checkpoint.py). Numerics follow transformers' modeling_llama.py: RMSNorm
in fp32 and cast back before the weight, RoPE angles in fp32, attention through
`F.scaled_dot_product_attention`, so fp32 logits match transformers to ~1e-5.

`trunk()` returns the final-normed hidden states (B, T, C) so a fused LM-head + log-prob kernel
can take (hidden, `lm_head_weight`) without materialising (N, V) logits; `forward()` is
`lm_head(trunk())`. Padding: `attention_mask` (B, T), 1 = real token, left (prompts) or right
(training) padding; no query attends a padded key, and each query always sees itself, so rows
that are all padding stay finite (their outputs are meaningless and must be masked by callers).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopairwise import checkpoint, lora
from nanopairwise.kv_cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, with the names of HF's config.json.

    Family flags left as None take the family's value in __post_init__ (qwen2: bias on q/k/v but
    not on o_proj; qwen3: q/k norm; llama/qwen3: `attention_bias` puts a bias on all four
    projections; mistral: no bias); a value that contradicts the family is an error.
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None -> num_attention_heads (no GQA)
    head_dim: int | None = None              # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # None or {"rope_type": "llama3", "factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None       # bias on q/k/v projections
    attention_out_bias: bool | None = None   # bias on o_proj
    qk_norm: bool | None = None              # RMSNorm over head_dim on q and k before RoPE (qwen3)
    sliding_window: int | None = None        # mistral only; longer sequences are refused
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        mt = self.model_type
        self._family_flag("attention_bias", {"qwen2": True, "mistral": False}.get(mt), False)
        self._family_flag("attention_out_bias", {"qwen2": False, "mistral": False}.get(mt, self.attention_bias), None)
        self._family_flag("qk_norm", mt == "qwen3", None)
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise NotImplementedError(f"rope_scaling {self.rope_scaling} not supported (only rope_type 'llama3')")
        if self.sliding_window is not None and mt != "mistral":
            raise ValueError(f"sliding_window is only supported for mistral, not {mt}")

    def _family_flag(self, name, fixed, default):
        value = getattr(self, name)
        value = (default if fixed is None else fixed) if value is None else value
        if fixed is not None and value != fixed:
            raise ValueError(f"model_type {self.model_type!r} requires {name}={fixed}, got {value}")
        setattr(self, name, value)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """From an HF config.json dict (transformers 4.x or 5.x layout)."""
        return cls(**checkpoint.config_fields_from_hf(d, SUPPORTED_MODEL_TYPES))

    def to_hf(self) -> dict:
        """An HF config.json dict (transformers 5 layout) that transformers loads unchanged."""
        return checkpoint.config_to_hf(asdict(self))


# ----------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2, in fp32; with "llama3" scaling (Llama 3.1) the
    long wavelengths are divided by `factor` and the middle band is interpolated smoothly."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the long end of the band, 1 at the short end
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(in_band, smoothed, scaled)


def rope_cos_sin(inv_freq, position_ids, dtype):
    """position_ids (B, T) -> cos, sin (B, T, D): angles in fp32 (positions reach 1e5), then cast
    to the activation dtype as HF does."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+D/2}) by the angle of their position. x (B, H, T, D), cos/sin (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attend(q, k, v, mask):
    """Softmax attention via SDPA with grouped K/V. q (B, H, T, D); k, v (B, Hkv, S, D);
    mask (B, 1, T, S) bool (True = may attend) or None for plain causal with S == T."""
    B, H, T, D = q.shape
    G = H // k.size(1)  # query heads per K/V head; head h reads K/V head h // G
    if mask is None:  # causal without padding: the flash kernel, which does GQA itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    if T == 1 and G > 1:
        # decoding: fold the G heads of a group into the query axis, so K/V are read once per group
        # and not copied G times; the (B, 1, 1, S) mask broadcasts over them
        y = F.scaled_dot_product_attention(q.view(B, H // G, G, D), k, v, attn_mask=mask)  # (B, Hkv, G, D)
        return y.view(B, H, 1, D)
    if G > 1:  # the kernels that take a mask do not all take GQA: expand K/V
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, qkv_bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.H * self.D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.Hkv * self.D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.Hkv * self.D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, Hkv, S, D): the history and these T tokens
        y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # fp32 on purpose and not a buffer, so `.to(bfloat16)` cannot round the RoPE frequencies
        self.inv_freq = rope_inv_freq(cfg)  # (D/2,)
        self.apply(self._init_weights)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module):
        """As HF: normal(0, 0.02) for Linear and Embedding, zero bias (RMSNorm weights start at 1)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, C) output projection (the embedding matrix when tied)."""
        return self.lm_head.weight

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype or p.dtype, device or p.device)

    def trunk(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        """input_ids (B, T) -> final-normed hidden states (B, T, C).

        attention_mask (B, T), 1 = real token. position_ids default to the count of real tokens
        before each one (`cumsum(mask) - 1`, clamped at 0, plus what the cache holds), so
        left-padded prompts start at position 0. With `kv_cache` the T tokens are appended to it.
        """
        B, T = input_ids.shape
        device = input_ids.device
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KV cache full: holds {start} of {kv_cache.max_len} slots, got {T} more tokens")
        sw = self.config.sliding_window
        if sw is not None and start + T > sw:
            raise NotImplementedError(f"sequence of {start + T} tokens exceeds sliding_window={sw}")
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            offset = 0 if kv_cache is None else kv_cache.next_pos[:, None]
            position_ids = (offset + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        mask = None  # plain causal
        if kv_cache is not None or attention_mask is not None:
            if kv_cache is not None:
                kv_cache.key_mask[:, start:start + T] = real
                real = kv_cache.key_mask[:, :start + T]  # (B, S)
            q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=device)[None, :]  # (1, S)
            mask = ((k_slot <= q_slot) & real[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
            kv_cache.next_pos += real[:, start:].sum(1)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        """Logits (B, T, V): the LM head on `trunk`'s hidden states."""
        return self.lm_head(self.trunk(input_ids, attention_mask, position_ids, kv_cache))

    # ------------------------------------------------------------------------------------------
    # HF checkpoint IO (file handling and validation live in checkpoint.py)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None) -> "Transformer":
        """Load an HF checkpoint directory: config.json + model.safetensors (or sharded with
        model.safetensors.index.json). dtype None keeps the stored dtype. Refuses, naming the
        file and key, on any unknown model_type, missing/unexpected key or shape mismatch."""
        config = ModelConfig.from_hf(checkpoint.read_config(path))
        state = checkpoint.load_safetensors(path)
        with torch.device("meta"):  # no random init of weights about to be overwritten
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model._checkpoint_state().items()}
        state = checkpoint.check_state_dict(state, expected, path, tied=config.tie_word_embeddings)
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        model.to_empty(device=device or "cpu").to(dtype)
        model.tie_weights()  # to_empty() gives the two tied modules separate tensors
        with torch.no_grad():
            for name, p in model._checkpoint_state().items():
                p.copy_(state[name])
        return model

    def save_pretrained(self, path: str, max_shard_size="5GB", state: dict = None):
        """Write config.json + safetensors (sharded with an index above max_shard_size) atomically;
        other files already in `path` (tokenizer.json, ...) are carried over. `state` (HF name ->
        tensor) replaces this module's own weights, e.g. when gathered from FSDP shards."""
        hf_config = self.config.to_hf()
        hf_config["dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        state = lora.merged_state_dict(self, state)  # LoRA adapters, if any, merged: a plain checkpoint
        state = {k: state[k] for k in self._checkpoint_state()}
        checkpoint.save_checkpoint(path, hf_config, state, max_shard_size)

    def _checkpoint_state(self) -> dict:
        """HF name -> parameter, without lm_head.weight when tied (HF omits it too) and without
        LoRA adapters (lora.py)."""
        state = {k: p for k, p in self.named_parameters(remove_duplicate=False) if ".lora_" not in k}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        return state
