"""Attention patterns: how much each position reads from each earlier one."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from gpt2.errors import GPT2Error
from gpt2.generate import check_finite
from gpt2.model import check_model, eval_mode


def is_int(value) -> bool:
    """An integer, not a bool (True would silently mean layer 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value, *, low: int = 1) -> None:
    """GPT2Error unless value is an integer >= low; name is the argument's flag."""
    if not is_int(value) or value < low:
        raise GPT2Error(f"{name} must be an integer >= {low}, got {value!r}")


def check_layer_head(config, *, layer: int | None = None, head: int | None = None) -> None:
    """GPT2Error unless the layer and head exist in a model of this config."""
    if layer is not None and not (is_int(layer) and 0 <= layer < config.n_layer):
        raise GPT2Error(
            f"layer {layer!r} does not exist: this model has layers 0..{config.n_layer - 1}"
        )
    if head is not None and not (is_int(head) and 0 <= head < config.n_head):
        raise GPT2Error(
            f"head {head!r} does not exist: this model has heads 0..{config.n_head - 1} per layer"
        )


def as_batch(ids: Sequence[int] | torch.Tensor, model) -> torch.Tensor:
    """One text's ids -> (1, T) LongTensor on the model's device, checked against its
    vocabulary and context (a float or bool id would otherwise be truncated silently)."""
    check_model(model)
    config = model.config
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids) if ids.dtype.kind in "iufcb" else ids
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise GPT2Error(f"ids must be integers, got a tensor of dtype {ids.dtype}")
        idx = ids.detach().to(torch.long)
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        bad = next((i for i in ids if not is_int(i)), None)
        if bad is not None:
            raise GPT2Error(f"ids must be a list of integer token ids, found {bad!r}")
        idx = torch.tensor([int(i) for i in ids], dtype=torch.long)
    else:
        raise GPT2Error(f"ids must be a list of integer token ids or an integer tensor, got "
                        f"{type(ids).__name__} (encode a text first: encode_for_model)")
    if idx.dim() != 1 or idx.numel() == 0:
        raise GPT2Error(f"expected the ids of one text (a non-empty list), got shape "
                        f"{tuple(idx.shape)}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= config.n_vocab:
        raise GPT2Error(f"token ids must be in [0, {config.n_vocab}) for this model, "
                        f"found {lo}..{hi}")
    if idx.numel() > config.n_ctx:
        raise GPT2Error(f"the text is {idx.numel()} tokens but this model's context is "
                        f"{config.n_ctx}; shorten the text")
    return idx.to(model.wte.weight.device).unsqueeze(0)  # (1, T)


@torch.no_grad()
def attention_patterns(
    model, ids: Sequence[int] | torch.Tensor, *, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """Attention probabilities of every head -> (n_layers, n_head, T, T), float32 on the CPU.

    Row t of a head's (T, T) map is where position t looks: it sums to 1 and is
    zero right of the diagonal (a position never sees the future).

    >>> from gpt2 import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_vocab=10, n_ctx=8))
    >>> attention_patterns(model, [1, 2, 3]).shape
    torch.Size([2, 2, 3, 3])
    """
    check_model(model)
    if layers is None:
        layers = list(range(model.config.n_layer))
    elif isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers) > 0:
        layers = list(layers)
    else:
        raise GPT2Error(f"layers must be a non-empty list of layer numbers (or None for all), "
                        f"got {layers!r}")
    for layer in layers:
        check_layer_head(model.config, layer=layer)
    names = [f"blocks.{i}.attn.pattern" for i in layers]
    idx = as_batch(ids, model)  # (1, T)
    with eval_mode(model):
        _, cache = model.run_with_cache(idx, names=names)
    patterns = torch.stack([cache[n][0].float().cpu() for n in names])  # (L, nh, T, T)
    check_finite(patterns, "attention patterns")
    return patterns
