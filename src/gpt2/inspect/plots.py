"""Pictures of what `gpt2.inspect` measures, as matplotlib figures and PNG files.

The figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
pyplot: no window, no global state, safe on a server. Their size in pixels is
figsize x dpi exactly (no "tight" bounding box), so callers and tests know it.
matplotlib is optional (`pip install 'gpt2[plot]'`) and imported only here.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import torch

from gpt2._io import atomic_write_bytes
from gpt2.errors import GPT2Error
from gpt2.inspect.attention import is_int

# Axes show every token up to this many; beyond it, numbered ticks only.
MAX_LABELLED_TOKENS = 64


def _figure(figsize: tuple[float, float], dpi: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GPT2Error(
            "drawing PNG images needs matplotlib: pip install 'gpt2[plot]'"
        ) from None
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _text(label: str) -> str:
    # matplotlib reads $...$ as TeX; a token like "$" must stay a dollar sign
    return label.replace("$", r"\$")


def _token_axes(ax, labels: Sequence[str], *, x: bool = True, y: bool = True) -> None:
    """Tokens as tick labels when there are few enough to read."""
    if len(labels) > MAX_LABELLED_TOKENS:
        return
    ticks = range(len(labels))
    texts = [_text(s) for s in labels]
    if x:
        ax.set_xticks(ticks, texts, rotation=90, fontsize=8)
    if y:
        ax.set_yticks(ticks, texts, fontsize=8)


def _probs(t, name: str, shape: str) -> torch.Tensor:
    """t as a float32 CPU tensor (numpy has no bf16) of the documented shape, e.g.
    "(n_layer, n_head, T, T)", or a GPT2Error naming what was given."""
    dims = shape.strip("()").split(", ")
    if not isinstance(t, torch.Tensor) or t.dim() != len(dims) or \
            (dims[-1] == dims[-2] == "T" and t.size(-1) != t.size(-2)):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise GPT2Error(f"{name} must be a tensor of shape {shape}, got {got}")
    return t.detach().float().cpu()


def _check_labels(labels, n: int, name: str = "labels", per: str = "token") -> None:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != n:
        got = len(labels) if isinstance(labels, Sequence) else type(labels).__name__
        raise GPT2Error(f"{name} must hold one entry per {per} ({n}), got {got}")


def _check_index(name: str, value, count: int) -> None:
    if not is_int(value) or not 0 <= value < count:
        raise GPT2Error(f"{name} {value!r} does not exist: the patterns have {name}s "
                        f"0..{count - 1}")


def _clamp(inches: float, low: float, high: float) -> float:
    return max(low, min(high, inches))


def plot_attention(
    patterns: torch.Tensor,
    labels: Sequence[str],
    *,
    layer: int | None = None,
    head: int | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
):
    """Attention heatmaps: one head, one layer's heads side by side, or every layer x head.

    patterns (n_layer, n_head, T, T) from `attention_patterns`; rows are the
    positions that look (queries), columns the positions looked at (keys).

    >>> import torch
    >>> p = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    >>> plot_attention(p, ["a", "b", "c"], layer=0, head=1).get_size_inches().tolist()
    [5.0, 4.5]
    """
    patterns = _probs(patterns, "patterns", "(n_layer, n_head, T, T)")
    L, H, T, _ = patterns.shape
    if head is not None and layer is None:
        raise GPT2Error("--head needs --layer too (a head is numbered within its layer)")
    if layer is not None:
        _check_index("layer", layer, L)
    if head is not None:
        _check_index("head", head, H)
    if layer is not None and head is not None:
        return plot_head(patterns[layer, head], labels, layer=layer, head=head,
                         figsize=figsize, dpi=dpi)
    if layer is not None:
        return plot_layer(patterns[layer], labels, layer=layer, figsize=figsize, dpi=dpi)
    return plot_all_heads(patterns, figsize=figsize, dpi=dpi)


def plot_head(
    pattern: torch.Tensor, labels: Sequence[str], *, layer: int, head: int,
    figsize: tuple[float, float] | None = None, dpi: int = 100,
):
    """One head's (T, T) attention map with the tokens on both axes."""
    pattern = _probs(pattern, "pattern", "(T, T)")
    T = pattern.size(0)
    _check_labels(labels, T)
    side = _clamp(1.5 + 0.22 * T, 4.5, 24.0)
    fig = _figure(figsize or (side + 0.5, side), dpi)
    ax = fig.add_subplot()
    image = ax.imshow(pattern.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    _token_axes(ax, labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"attention, layer {layer}, head {head}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability")
    return fig


def plot_layer(
    patterns: torch.Tensor, labels: Sequence[str], *, layer: int,
    figsize: tuple[float, float] | None = None, dpi: int = 100,
):
    """One layer's heads (n_head, T, T) as small multiples."""
    patterns = _probs(patterns, "patterns", "(n_head, T, T)")
    H, T, _ = patterns.shape
    _check_labels(labels, T)
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    cell = _clamp(0.12 * T + 1.0, 2.0, 8.0)
    fig = _figure(figsize or (cols * cell + 1.0, rows * cell + 0.6), dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    show_tokens = T <= 24  # small multiples: only short texts leave room for labels
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        image = ax.imshow(patterns[h].numpy(), cmap="Blues", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        bottom, left = h + cols >= H, h % cols == 0  # no panel below / first in its row
        if show_tokens:
            _token_axes(ax, labels, x=bottom, y=left)
        if not (show_tokens and bottom):
            ax.set_xticks([])
        if not (show_tokens and left):
            ax.set_yticks([])
    fig.suptitle(f"attention, layer {layer} (rows: query, columns: key)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="probability")
    return fig


def plot_all_heads(
    patterns: torch.Tensor, *, figsize: tuple[float, float] | None = None, dpi: int = 100
):
    """Every head (n_layer, n_head, T, T) at a glance, as one mosaic image (a single
    imshow stays fast even for 48 x 25 heads)."""
    patterns = _probs(patterns, "patterns", "(n_layer, n_head, T, T)")
    L, H, T, _ = patterns.shape
    gap = max(1, T // 8)
    mosaic = torch.full((L * (T + gap) - gap, H * (T + gap) - gap), float("nan"))
    for layer in range(L):
        for h in range(H):
            r, c = layer * (T + gap), h * (T + gap)
            mosaic[r:r + T, c:c + T] = patterns[layer, h]
    fig = _figure(figsize or (_clamp(0.6 * H + 2.0, 5.0, 24.0), _clamp(0.6 * L + 1.5, 4.0, 30.0)),
                  dpi)
    ax = fig.add_subplot()
    image = ax.imshow(mosaic.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    centre = (T - 1) / 2
    ax.set_xticks([h * (T + gap) + centre for h in range(H)], [str(h) for h in range(H)],
                  fontsize=8)
    ax.set_yticks([i * (T + gap) + centre for i in range(L)], [str(i) for i in range(L)],
                  fontsize=8)
    ax.set_xlabel("head (each square: queries down, keys across)")
    ax.set_ylabel("layer")
    ax.set_title("attention of every head")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability")
    return fig


def plot_logit_lens(
    lens,
    input_labels: Sequence[str],
    top_labels: Sequence[Sequence[str]],
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
):
    """The logit lens as a grid: depth down (embeddings at the top), position across.

    Each cell is the top next-token guess at that depth and position, coloured by
    its probability; input_labels name the columns, top_labels[d][t] the cells.
    """
    top_probs = _probs(getattr(lens, "top_probs", None), "lens.top_probs", "(depths, T)")
    D, T = top_probs.shape
    _check_labels(input_labels, T, "input_labels")
    _check_labels(getattr(lens, "names", None), D, "lens.names", "depth")
    _check_labels(top_labels, D, "top_labels", "depth")
    for row in top_labels:
        _check_labels(row, T, "each row of top_labels")
    width = _clamp(1.8 + 0.8 * T, 5.0, 40.0)
    height = _clamp(1.6 + 0.32 * D, 3.0, 30.0)
    fig = _figure(figsize or (width, height), dpi)
    ax = fig.add_subplot()
    image = ax.imshow(top_probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                      aspect="auto", interpolation="nearest")
    if T <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(T), [_text(s) for s in input_labels], rotation=90, fontsize=8)
    ax.set_yticks(range(D), list(lens.names), fontsize=8)
    if T <= 40 and D <= 60:
        for d in range(D):
            for t in range(T):
                p = float(top_probs[d, t])
                ax.text(t, d, _text(top_labels[d][t][:10]), ha="center", va="center",
                        fontsize=7, color="black" if p > 0.6 else "white")
    ax.set_xlabel("input token (the cell is the guess for the token after it)")
    ax.set_title("logit lens: top next-token guess at each depth")
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top guess")
    return fig


def plot_ablation(
    ablation, *, figsize: tuple[float, float] | None = None, dpi: int = 100
):
    """Loss increase per zeroed head as a layers x heads heatmap (red: the head helped)."""
    deltas = _probs(ablation.deltas, "ablation.deltas", "(n_layer, n_head)")  # (L, H)
    L, H = deltas.shape
    fig = _figure(figsize or (_clamp(0.55 * H + 2.5, 5.0, 24.0), _clamp(0.4 * L + 1.8, 3.5, 24.0)),
                  dpi)
    ax = fig.add_subplot()
    bound = max(float(deltas.abs().max()), 1e-6)
    image = ax.imshow(deltas.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound,
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(H), [str(h) for h in range(H)], fontsize=8)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=8)
    if L * H <= 400:
        for i in range(L):
            for h in range(H):
                d = float(deltas[i, h])
                ax.text(h, i, f"{d:+.3f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(d) > 0.6 * bound else "black")
    ax.set_xlabel(f"head (loss of the intact model: {ablation.base_loss:.3f})")
    ax.set_ylabel("layer")
    ax.set_title("loss increase, one head zeroed")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Δ loss (nats per token)")
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes, figsize x dpi pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def save_png(fig, path: str | os.PathLike) -> None:
    """Write the figure to `path` atomically (all of it or nothing)."""
    data = png_bytes(fig)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise GPT2Error(f"{path}: cannot write the image ({e.strerror})") from None
