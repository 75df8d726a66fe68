"""Head ablation: how much worse the model predicts a text with one head switched off.

Zeroing head h of layer l means zeroing its output z[:, h] (B, nh, T, hs) before
c_proj mixes the heads: the residual stream then gets c_proj's bias and the
other heads only. The loss increase says how much the text's predictions lean
on that head (a first look: a head can matter through what it suppresses, and
heads can stand in for each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2.errors import GPT2Error
from gpt2.generate import check_finite
from gpt2.inspect.attention import as_batch, check_count
from gpt2.model import eval_mode


@dataclass(frozen=True)
class HeadAblation:
    base_loss: float  # mean next-token cross-entropy of the intact model (nats)
    losses: torch.Tensor  # (n_layer, n_head) the same with that one head zeroed

    @property
    def deltas(self) -> torch.Tensor:
        """(n_layer, n_head) loss increase per head: positive means the head helped."""
        return self.losses - self.base_loss


def next_token_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting idx[:, 1:] from logits[:, :-1] -> (B,)."""
    B, T, V = logits.shape
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), idx[:, 1:].reshape(-1), reduction="none"
    )  # (B * (T - 1),)
    return loss.view(B, T - 1).mean(dim=1)


def zero_heads(heads: torch.Tensor):
    """A hook for `blocks.{i}.attn.z` that zeroes head heads[b] in batch row b."""

    def hook(z: torch.Tensor) -> torch.Tensor:  # z (B, nh, T, hs)
        z = z.clone()
        z[torch.arange(z.size(0), device=z.device), heads] = 0.0
        return z

    return hook


@torch.no_grad()
def ablate_heads(
    model, ids: Sequence[int] | torch.Tensor, *, batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HeadAblation:
    """The text's loss with each attention head zeroed in turn.

    The ablated copies of the text run as one batch per layer (row b zeroes
    head b), `batch_size` rows at a time (default: as many as keep the logits
    under about 1 GiB), from the residual stream entering that layer (the layers
    below are the same for every copy, so they run once). `progress(done, total)`
    is called after each batch with the heads done so far.

    >>> from gpt2 import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_vocab=10, n_ctx=8))
    >>> ablate_heads(model, [1, 2, 3]).deltas.shape
    torch.Size([2, 2])
    """
    idx = as_batch(ids, model)  # (1, T)
    T = idx.size(1)
    if T < 2:
        raise GPT2Error("ablation needs a text of at least 2 tokens (a loss needs a next token)")
    if batch_size is None:
        batch_size = max(1, (1 << 28) // (T * model.config.n_vocab))  # 2^28 fp32 = 1 GiB
    check_count("batch_size", batch_size)
    if progress is not None and not callable(progress):
        raise GPT2Error(f"progress must be a function (done, total), got {progress!r}")
    with eval_mode(model):
        return _ablate(model, idx, batch_size, progress)


def _ablate(model, idx: torch.Tensor, batch_size: int, progress) -> HeadAblation:
    T = idx.size(1)
    n_layer, n_head = model.config.n_layer, model.config.n_head
    entering = [f"blocks.{layer}.resid_pre" for layer in range(n_layer)]
    logits, resid = model.run_with_cache(idx, names=entering)  # resid: (1, T, C) each
    check_finite(logits)
    base = float(next_token_loss(logits, idx)[0])
    del logits
    losses = torch.empty(n_layer, n_head)
    for layer in range(n_layer):
        for start in range(0, n_head, batch_size):
            heads = torch.arange(start, min(start + batch_size, n_head), device=idx.device)
            x = resid[f"blocks.{layer}.resid_pre"].expand(len(heads), T, -1)  # (B, T, C)
            with model.hooks({f"blocks.{layer}.attn.z": zero_heads(heads)}):
                logits = model._logits_from_block(x, layer)  # (B, T, V)
            losses[layer, start:start + len(heads)] = next_token_loss(
                logits, idx.expand(len(heads), T)).cpu()  # fmt: skip
            del logits
            bad = (~torch.isfinite(losses[layer, start:start + len(heads)])).nonzero()
            if len(bad):
                head = start + int(bad[0])
                raise GPT2Error(f"with head {head} of layer {layer} zeroed, the loss is "
                                f"{float(losses[layer, head])}: the model overflows without "
                                "that head (try fp32), so the ablation has no numbers")
            if progress is not None:
                progress(layer * n_head + start + len(heads), n_layer * n_head)
    return HeadAblation(base_loss=base, losses=losses)
