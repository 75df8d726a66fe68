"""The loss curves of a run as a PNG (matplotlib, optional).

matplotlib is imported only here and only when a plot is drawn; without it the
trainer prints one note and carries on.
"""

from __future__ import annotations

import os
from pathlib import Path

_missing_noted = False


def plot_losses(records: list[dict], path: str | os.PathLike, *, note=print) -> bool:
    """Draw train loss (per step) and val loss (per evaluation) against step into `path`.

    Returns False (after one note per process) when matplotlib is not installed.
    """
    global _missing_noted
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, works on servers
        import matplotlib.pyplot as plt
    except ImportError:
        if not _missing_noted:
            note("note: matplotlib is not installed, so no loss.png "
                 "(pip install 'gpt2[plot]' to get one)")
            _missing_noted = True
        return False
    from gpt2._io import atomic_open

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
