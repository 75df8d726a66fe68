"""What the model would predict at each depth: the next-token table and the logit lens.

The model's prediction is the last residual stream put through the final
LayerNorm and the unembedding (wte transposed). The logit lens (nostalgebraist,
2020) applies that same read-out to the residual stream after every block, and
to the embeddings before any block, to watch the prediction form layer by layer.
The last row of the lens is therefore exactly the model's own output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2.generate import check_finite
from gpt2.inspect.attention import as_batch, check_count
from gpt2.model import eval_mode


@dataclass(frozen=True)
class Prediction:
    id: int
    prob: float


@dataclass(frozen=True)
class LogitLens:
    """The read-out of each depth: row 0 the embeddings, row i+1 the output of block i."""

    names: list[str]  # "embed", "block 0", ..., one per row
    top_ids: torch.Tensor  # (L + 1, T) the most likely next token at each depth and position
    top_probs: torch.Tensor  # (L + 1, T) its probability
    target_probs: torch.Tensor  # (L + 1, T - 1) probability of the token that really follows


@torch.no_grad()
def next_tokens(model, ids: Sequence[int] | torch.Tensor, *, top: int = 10) -> list[Prediction]:
    """The `top` most likely tokens after `ids`, most likely first.

    >>> from gpt2 import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_vocab=10, n_ctx=8))
    >>> len(next_tokens(model, [1, 2, 3], top=3))
    3
    """
    check_count("top", top)
    idx = as_batch(ids, model)  # (1, T)
    with eval_mode(model):
        logits = model(idx, last_only=True)  # (1, 1, V)
    check_finite(logits)
    probs = F.softmax(logits[0, -1].float(), dim=-1)  # (V,)
    p, i = probs.topk(min(top, probs.numel()))
    return [Prediction(int(a), float(b)) for a, b in zip(i.tolist(), p.tolist(), strict=True)]


@torch.no_grad()
def logit_lens(model, ids: Sequence[int] | torch.Tensor) -> LogitLens:
    """Decode the residual stream at every depth through ln_f and the unembedding.

    >>> from gpt2 import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_vocab=10, n_ctx=8))
    >>> lens = logit_lens(model, [1, 2, 3])
    >>> lens.names, lens.top_ids.shape
    (['embed', 'block 0', 'block 1'], torch.Size([3, 3]))
    """
    idx = as_batch(ids, model)  # (1, T)
    n_layer = model.config.n_layer
    # the stream entering block 0 is embed + pos_embed
    names = ["blocks.0.resid_pre"] + [f"blocks.{i}.resid_post" for i in range(n_layer)]
    with eval_mode(model):
        _, cache = model.run_with_cache(idx, names=names)
    targets = idx[0, 1:]  # (T - 1,)
    top_ids, top_probs, target_probs = [], [], []
    # one depth at a time: all of them at once would be (L + 1, T, n_vocab) floats
    for name in names:
        logits = _unembed(model, model.ln_f(cache.pop(name)))[0]  # (T, V)
        check_finite(logits, f"logits at {name}")
        probs = F.softmax(logits.float(), dim=-1)  # (T, V)
        p, i = probs.max(dim=-1)  # (T,), (T,)
        top_ids.append(i.cpu())
        top_probs.append(p.cpu())
        target_probs.append(probs[:-1].gather(1, targets[:, None])[:, 0].cpu())  # (T - 1,)
    return LogitLens(
        names=["embed"] + [f"block {i}" for i in range(n_layer)],
        top_ids=torch.stack(top_ids),
        top_probs=torch.stack(top_probs),
        target_probs=torch.stack(target_probs),
    )


def _unembed(model, x: torch.Tensor) -> torch.Tensor:
    """x (1, T, C) -> logits (1, T, V) through the model's own head: a quantized model's
    int8 or packed copy of wte where it has one (its wte may hold int8 rows), else wte."""
    if model.lm_head is not None:
        return model.lm_head(x)
    return F.linear(x, model.wte.weight)
