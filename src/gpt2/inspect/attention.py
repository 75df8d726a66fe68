"""Attention patterns: how much each position reads from each earlier one."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2.errors import GPT2Error


def check_layer_head(config, *, layer: int | None = None, head: int | None = None) -> None:
    """GPT2Error unless the layer and head exist in a model of this config."""
    if layer is not None and not 0 <= layer < config.n_layer:
        raise GPT2Error(
            f"layer {layer} does not exist: this model has layers 0..{config.n_layer - 1}"
        )
    if head is not None and not 0 <= head < config.n_head:
        raise GPT2Error(
            f"head {head} does not exist: this model has heads 0..{config.n_head - 1} per layer"
        )


def as_batch(ids: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    """One text's ids -> (1, T) LongTensor on `device`."""
    idx = torch.as_tensor(ids, dtype=torch.long, device=device)
    if idx.dim() != 1 or idx.numel() == 0:
        raise GPT2Error(f"expected the ids of one text (a non-empty list), got shape "
                        f"{tuple(idx.shape)}")
    return idx.unsqueeze(0)  # (1, T)


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
    layers = list(range(model.config.n_layer)) if layers is None else list(layers)
    for layer in layers:
        check_layer_head(model.config, layer=layer)
    names = [f"blocks.{i}.attn.pattern" for i in layers]
    _, cache = model.run_with_cache(as_batch(ids, model.wte.weight.device), names=names)
    return torch.stack([cache[n][0].float().cpu() for n in names])  # (L, nh, T, T)
