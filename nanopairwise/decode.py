"""The fast decode path of rollout.generate: fused weights, a static KV cache, a compiled step.

    Transformer (HF names, maybe LoRA) --snapshot--> Decoder: per layer wqkv = [q; k; v],
    w_gate_up = [gate; up] (LoRA merged), in the decode dtype --> prefill (eager, one batched
    forward of the left-padded prompts) --> step (compiled): one token for every row.

A batch-1 decode step is a chain of matrix-vector products that stream every weight once, so its
time is set by bytes read: fusing q/k/v and gate/up makes 4 matmuls a layer of 7 (fewer, larger
reads), bf16 weights halve the bytes on CPUs with native bf16 dot products (AVX512-BF16 or AMX;
`cpu_has_bf16`), and torch.compile folds the few dozen small ops a layer (norms, RoPE, softmax,
cache writes) and the sampler into a handful of kernels. The step has fixed shapes (StaticKVCache:
all S_max slots every step, the unfilled ones masked), so one graph serves every step. On CUDA the
whole step is compiled with mode="reduce-overhead" (CUDA graphs: one launch per step); on a CPU,
where a launch is a function call, each layer is (regional compilation: all layers share one
compiled code, so compiling costs about one layer's time, not L). A new batch size or cache
length recompiles once with symbolic sizes (torch.compile's automatic dynamic shapes), which then
serve every later shape: two compiles per run at most (rollout, then evaluation or anchors).

The snapshot is refreshed in place when the model's weights change (parameter versions), so the
compiled graph (and a CUDA graph's addresses) survive PPO updates. Compiling costs tens of seconds
on a CPU; below COMPILE_MIN_PARAMS parameters (the built-in 0.84M model) it cannot pay off and the
same step runs eagerly, in the model's own dtype.
"""

import os
import shutil
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopairwise.kv_cache import LayerKV, StaticKVCache
from nanopairwise.model import apply_rope, attend, rms_norm, rope_cos_sin

COMPILE_MIN_PARAMS = 20_000_000  # compile (and use bf16 on a bf16 CPU) from this size up; see docs/BENCHMARKS.md
SLOT_BUCKET = 64  # cache lengths are rounded up to a multiple of this, so few shapes get compiled


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with native bf16 dot products (AVX512-BF16 or AMX), where bf16 matmuls run
    at ~2x fp32 and stream half the bytes; elsewhere bf16 is emulated and slower than fp32."""
    if torch.backends.cpu.get_cpu_capability().startswith("AMX"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def can_compile(device) -> bool:
    """torch.compile needs a C++ compiler on the CPU (Inductor's C++ backend); CUDA brings Triton."""
    return torch.device(device).type == "cuda" or shutil.which(os.environ.get("CXX", "g++")) is not None


class DecodeLayer(nn.Module):
    """One block's weights, q/k/v and gate/up fused. Buffers: the snapshot is not trained."""

    def __init__(self, cfg, dtype, device):
        super().__init__()
        C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        self.H, self.Hkv, self.D, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, D, cfg.rms_norm_eps
        shapes = dict(norm1=(C,), wqkv=((self.H + 2 * self.Hkv) * D, C), wo=(C, self.H * D), norm2=(C,),
                      w_gate_up=(2 * I, C), w_down=(C, I))
        if cfg.attention_bias:
            shapes["bqkv"] = ((self.H + 2 * self.Hkv) * D,)
        if cfg.attention_out_bias:
            shapes["bo"] = (C,)
        if cfg.qk_norm:
            shapes.update(q_norm=(D,), k_norm=(D,))
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.bqkv, self.bo = getattr(self, "bqkv", None), getattr(self, "bo", None)
        self.kv = None  # LayerKV, from allocate()

    def allocate(self, batch_size: int, max_len: int):
        w = self.wqkv
        self.kv = LayerKV(batch_size, self.Hkv, max_len, self.D, w.dtype, w.device)

    def forward(self, x, cos, sin, mask, slots):
        B, T, _ = x.shape
        qkv = F.linear(rms_norm(x, self.norm1, self.eps), self.wqkv, self.bqkv)  # (B, T, (H + 2 Hkv) D)
        q, k, v = qkv.view(B, T, -1, self.D).split([self.H, self.Hkv, self.Hkv], dim=2)  # (B, T, h, D)
        if hasattr(self, "q_norm"):
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        k, v = self.kv.update(slots, k, v.transpose(1, 2))  # (B, Hkv, S_max, D)
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.H * self.D)
        x = x + F.linear(y, self.wo, self.bo)
        gate, up = F.linear(rms_norm(x, self.norm2, self.eps), self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)


def _weight(linear):
    """The weight a projection computes with: LoRA adapters merged while switched on (lora.py);
    a full tensor under FSDP."""
    w = linear.merged_weight() if getattr(linear, "adapter_on", False) else linear.weight
    return w.full_tensor() if hasattr(w, "full_tensor") else w


class Decoder(nn.Module):
    """A decode-only copy of a Transformer's weights in `dtype` with a static KV cache."""

    def __init__(self, model, dtype, compile: bool):
        super().__init__()
        cfg, device = model.config, model.lm_head_weight.device
        self.cfg, self.dtype, self.compile = cfg, dtype, compile
        self.layers = nn.ModuleList(DecodeLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        V, C = cfg.vocab_size, cfg.hidden_size
        self.register_buffer("embed", torch.empty(V, C, dtype=dtype, device=device), persistent=False)
        self.register_buffer("norm", torch.empty(C, dtype=dtype, device=device), persistent=False)
        head = self.embed if cfg.tie_word_embeddings else torch.empty(V, C, dtype=dtype, device=device)
        self.register_buffer("lm_head", head, persistent=False)
        self.register_buffer("inv_freq", model.inv_freq.to(device), persistent=False)
        self.cache, self.version, self.steps, self.compile_s = None, None, {}, 0.0
        if compile and device.type != "cuda":  # regional compilation (step_fn): the layers' call is compiled
            for layer in self.layers:
                layer.compile(fullgraph=True)

    @torch.no_grad()
    def refresh(self, model):
        """Copy (and fuse) the model's current weights in place, if they changed since the last call
        (by the parameters' version counters; always under FSDP, whose gathers reuse buffers)."""
        modules = list(model.modules())
        version = [(p._version, p.data_ptr()) for p in model.parameters()] + [getattr(m, "adapter_on", None) for m in modules]
        if any(type(m).__name__.startswith("FSDP") for m in modules):
            version = None
        elif version == self.version:
            return
        for layer, block in zip(self.layers, model.model.layers):
            a, m = block.self_attn, block.mlp
            layer.wqkv.copy_(torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)]))
            if layer.bqkv is not None:
                layer.bqkv.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            layer.wo.copy_(_weight(a.o_proj))
            if layer.bo is not None:
                layer.bo.copy_(a.o_proj.bias)
            layer.w_gate_up.copy_(torch.cat([_weight(m.gate_proj), _weight(m.up_proj)]))
            layer.w_down.copy_(_weight(m.down_proj))
            layer.norm1.copy_(block.input_layernorm.weight)
            layer.norm2.copy_(block.post_attention_layernorm.weight)
            if hasattr(layer, "q_norm"):
                layer.q_norm.copy_(a.q_norm.weight)
                layer.k_norm.copy_(a.k_norm.weight)
        self.embed.copy_(model.model.embed_tokens.weight)
        self.norm.copy_(model.model.norm.weight)
        if not self.cfg.tie_word_embeddings:
            self.lm_head.copy_(model.lm_head.weight)
        self.version = version

    def reset(self, batch_size: int, length: int):
        """An empty cache for batch_size rows of up to `length` tokens (reused if the bucket fits)."""
        S = -(-length // SLOT_BUCKET) * SLOT_BUCKET
        sw = self.cfg.sliding_window
        if sw is not None and length > sw:
            raise NotImplementedError(f"sequence of {length} tokens exceeds sliding_window={sw}")
        if self.cache is None or (self.cache.batch_size, self.cache.max_len) != (batch_size, S):
            self.cache = StaticKVCache(batch_size, S, self.embed.device)
            for layer in self.layers:
                layer.allocate(batch_size, S)
        self.cache.reset()

    def hidden(self, ids, slots, real, eager=False):
        """ids (B, T) written at cache `slots` (T,), real (B, T) bool -> the last position's hidden
        state (B, C). eager: call each layer's forward itself, past its compiled wrapper (prefill)."""
        cos, sin = rope_cos_sin(self.inv_freq, self.cache.positions(real), self.dtype)  # (B, T, D)
        mask = self.cache.attention_mask(slots, real)  # (B, 1, T, S_max)
        x = F.embedding(ids, self.embed)  # (B, T, C)
        for layer in self.layers:
            x = (layer.forward if eager else layer)(x, cos, sin, mask, slots)
        return x[:, -1]

    def sample(self, sampling, x, u):
        """Final norm, LM head (fp32 logits) and the sampler on hidden states x (B, C)."""
        logits = F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()  # (B, V)
        return sampling(logits, u)

    def prefill(self, ids, mask, sampling, u):
        """The prompts (B, P), left-padded, in one eager forward: their first tokens and log-probs."""
        slots = torch.arange(ids.size(1), device=ids.device)
        return self.sample(sampling, self.hidden(ids, slots, mask.bool(), eager=True), u)

    def step(self, sampling, tokens, real, slot, u):
        """One token for every row: tokens (B,) fed at `slot` (1,), real (B,) bool -> (tokens, logprobs)."""
        key = (sampling, tokens.size(0), self.cache.max_len)
        if key in self.steps:  # a step this loop has run: the compiled code's guards can only pass
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.compile):
                return self.steps[key](tokens, real, slot, u)
        self.steps[key] = fn = self.step_fn(sampling)
        t0 = time.perf_counter()
        out = fn(tokens, real, slot, u)  # the first call compiles
        self.compile_s += (time.perf_counter() - t0) if self.compile else 0.0
        return out

    def step_fn(self, sampling):
        """The decode step for these sampling settings. Compiled on CUDA as a whole (one CUDA graph);
        on a CPU per layer (every layer runs the same compiled code: ~1/L of the compile time) plus
        the head and sampler, with a few small eager ops between (positions, mask, RoPE angles)."""
        def step(tokens, real, slot, u):
            return self.sample(sampling, self.hidden(tokens[:, None], slot, real[:, None]), u)
        if not self.compile:
            return step
        if self.embed.is_cuda:
            return torch.compile(step, mode="reduce-overhead", fullgraph=True)
        head = torch.compile(lambda x, u: self.sample(sampling, x, u), fullgraph=True)
        return lambda tokens, real, slot, u: head(self.hidden(tokens[:, None], slot, real[:, None]), u)


_decoders = weakref.WeakKeyDictionary()  # model -> {(dtype, compile): Decoder}


def decoder_for(model, dtype=None, compile=None) -> Decoder:
    """The model's Decoder, its weights refreshed. dtype None: bf16 for an fp32 model of at least
    COMPILE_MIN_PARAMS on a bf16 CPU, else the model's dtype; compile None: from that size up."""
    W = model.lm_head_weight
    big = sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS
    if dtype is None:
        dtype = torch.bfloat16 if big and W.dtype == torch.float32 and W.device.type == "cpu" and cpu_has_bf16() else W.dtype
    compile = big and can_compile(W.device) if compile is None else compile
    per_model = _decoders.setdefault(model, {})
    if (dtype, compile) not in per_model:
        per_model[(dtype, compile)] = Decoder(model, dtype, compile)
    decoder = per_model[(dtype, compile)]
    decoder.refresh(model)
    return decoder
