"""FLOP counts of the model's matmuls, and the machine's matmul peak, for achieved-GFLOP/s figures.

Counted (the usual 2 FLOPs per multiply-add, per real token; padding is not credited):

    forward  2 x (projection weights of every block) per token              block_flops
             + 2 x C x V per token that goes through the LM head             head_flops
    backward 2x the forward where the weights train (dX and dW), 1x where they are frozen
             (LoRA: only dX flows back; the adapters' r (in + out) per projection are left out)

Attention's QK^T and AV (4 x layers x heads x head_dim x context per token: ~4% of a SmolLM2
token at 270 tokens of context), norms and element-wise ops are not counted, so achieved figures
are slight underestimates. `matmul_peak` times a square matmul of the given dtype on the device:
the ceiling the achieved figure is compared against, measured in the same run.
"""

import statistics
import time

import torch


def block_matmul_params(cfg) -> int:
    """Weights of the q/k/v/o and gate/up/down projections over all layers (a ModelConfig)."""
    C, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = C * cfg.num_attention_heads * D * 2 + C * cfg.num_key_value_heads * D * 2   # q, o; k, v
    return cfg.num_hidden_layers * (attn + 3 * C * I)


def block_flops(cfg, tokens: int) -> float:
    """Forward FLOPs of the transformer blocks' projections over `tokens` tokens."""
    return 2.0 * block_matmul_params(cfg) * tokens


def head_flops(cfg, tokens: int) -> float:
    """Forward FLOPs of the full-vocabulary LM head over `tokens` positions."""
    return 2.0 * cfg.hidden_size * cfg.vocab_size * tokens


def train_flops(forward: float, trained: bool) -> float:
    """Forward + backward FLOPs of a forward of `forward` FLOPs: x3 when its weights train, x2 when
    they are frozen (gradients flow through to earlier trainable parameters: LoRA adapters)."""
    return forward * (3.0 if trained else 2.0)


def matmul_peak(dtype, device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an (n, n) x (n, n) matmul in `dtype` on `device`: median of `repeats` after a warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9
