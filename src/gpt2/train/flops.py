"""Model FLOPs utilisation (MFU): the share of the accelerator's peak a training run uses.

A training step does, per token, 6 FLOPs per weight (2 in the forward pass, 4 in the
backward) plus the attention's own arithmetic, 12 x n_layer x n_embd x T for a
sequence of T tokens (scores and mixing, forward and backward). MFU is that work
per second divided by the device's dense bf16 peak, as in the PaLM paper.

>>> from gpt2.config import PRESETS
>>> f"{training_flops_per_token(PRESETS['124M'], 124_439_808, 1024) / 1e9:.3f} GFLOP"
'0.860 GFLOP'
"""

from __future__ import annotations

import torch

from gpt2.config import GPT2Config

# Dense bf16 tensor-core peak in FLOP/s, by a substring of the CUDA device's name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "4090": 165e12, "3090": 71e12}  # fmt: skip


def training_flops_per_token(config: GPT2Config, n_params: int, seq_len: int) -> float:
    """FLOPs of one training token: 6 per parameter + 12 * n_layer * n_embd * seq_len."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not a GPU we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, devices: int = 1) -> float:
    """Achieved FLOP/s over the peak of `devices` such devices.

    >>> round(mfu(1e9, 400_000, 989e12), 3)
    0.404
    """
    return flops_per_token * tokens_per_s / (peak * devices)
