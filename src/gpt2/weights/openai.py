"""OpenAI's GPT-2 release (and the Kaggle mirror of it) -> our config and state dict.

A size folder holds `hparams.json` and a TensorFlow checkpoint `model.ckpt.*`
(`checkpoint`, `model.ckpt.meta`, `encoder.json` and `vocab.bpe` sit beside it
but are not needed here). The Kaggle download is a top folder with one such
folder per size: 124M/ 355M/ 774M/ 1558M/.

    >>> config, state = load_openai("models/124M")           # doctest: +SKIP
    >>> config, state = load_openai("kaggle/gpt2", size="355M")  # doctest: +SKIP
    >>> state["h.0.attn.c_attn.weight"].shape                # doctest: +SKIP
    torch.Size([2304, 768])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gpt2.config import PRESETS, GPT2Config, check_size, resolve_size
from gpt2.errors import GPT2Error
from gpt2.weights.names import (
    check_shapes,
    expected_shapes,
    is_transposed,
    openai_to_ours,
    transpose,
)
from gpt2.weights.tf_checkpoint import TFCheckpoint

__all__ = ["load_openai", "resolve_openai_folder"]

_NEEDED = ("hparams.json", "model.ckpt.index")


def load_openai(
    folder: str | os.PathLike, *, size: str | None = None, dtype: torch.dtype | None = None
) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """An OpenAI/Kaggle folder -> (config, state dict under our names, nn.Linear orientation).

    Shapes are checked from the index before any tensor is read; tensors are then
    read one at a time from the mapped data (each checked against its crc32c) and the
    projection weights turned from [1, in, out] into [out, in], so the peak memory is
    the weights plus one tensor (gpt2.weights.mapping). dtype: cast each tensor as it
    is read (default: as stored, float32).
    """
    folder = resolve_openai_folder(folder, size=size)
    config = GPT2Config.from_hparams(folder / "hparams.json")
    ckpt = TFCheckpoint(folder / "model.ckpt")
    source = str(ckpt.index_path)

    tf_names: dict[str, str] = {}  # our name -> TensorFlow name
    shapes: dict[str, tuple[int, ...]] = {}
    for tf_name in ckpt.names():
        if not tf_name.startswith("model/"):
            continue  # training bookkeeping such as global_step, not part of the network
        try:
            name = openai_to_ours(tf_name)
        except GPT2Error as e:
            raise GPT2Error(f"{source}: {e}") from None
        tf_names[name] = tf_name
        shapes[name] = _our_shape(name, tf_name, ckpt.shape(tf_name), source)
    check_shapes(shapes, config, source)

    def ours(tf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise GPT2Error(f"{source}: tensor {tf_name!r} is {tensor.dtype}, not a float")
        if is_transposed(openai_to_ours(tf_name)):
            tensor = transpose(tensor[0])  # [1, in, out] -> [out, in]
        return tensor if dtype is None else tensor.to(dtype)

    state = {name: ckpt.read(tf_names[name], ours) for name in expected_shapes(config)}
    return config, state


def check_named_size(config: GPT2Config, size: str, path: Path) -> None:
    if resolve_size(size) is None:
        raise GPT2Error(f"unknown GPT-2 size {size!r}; choose one of {', '.join(PRESETS)}")
    check_size(config, size, path, advice="--size picks a size folder inside a Kaggle "
               "download; drop it, or give the folder of the size you want")


def resolve_openai_folder(path: str | os.PathLike, *, size: str | None = None) -> Path:
    """The size folder to load: `path` itself, or its `size` sub-folder (Kaggle's layout).

    With no `size`, a top folder holding exactly one size resolves to it; holding
    several is an error that lists them.
    """
    path = Path(path)
    if not path.is_dir():
        raise GPT2Error(f"{path}: no such folder")
    present = [f for f in _NEEDED if (path / f).is_file()]
    if present:
        missing = [f for f in _NEEDED if f not in present]
        if missing:
            raise GPT2Error(
                f"{path}: {missing[0]} not found beside {present[0]}; an OpenAI GPT-2 folder "
                f"holds {' and '.join(_NEEDED)} and model.ckpt.data-*; re-download it"
            )
        if size is not None:  # one model: --size must name it, not pick another
            check_named_size(GPT2Config.from_hparams(path / "hparams.json"), size, path)
        return path

    found = {
        resolve_size(sub.name): sub
        for sub in sorted(path.iterdir())
        if sub.is_dir() and resolve_size(sub.name) and (sub / "model.ckpt.index").is_file()
    }
    if size is not None:
        key = resolve_size(size)
        if key is None:
            raise GPT2Error(f"unknown GPT-2 size {size!r}; choose one of {', '.join(PRESETS)}")
        if key in found:
            sub = resolve_openai_folder(found[key])  # (its files checked)
            check_size(GPT2Config.from_hparams(sub / "hparams.json"), key, sub,
                       advice="the folder's name and its hparams.json disagree: a damaged or "
                       "renamed download")
            return sub
        where = f"it holds {', '.join(found)}" if found else "it holds no size folders"
        raise GPT2Error(f"{path}: no {key} folder; {where}")
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        raise GPT2Error(
            f"{path}: holds several sizes ({', '.join(found)}); choose one with "
            f"size=... (--size on the command line)"
        )
    hint = ""
    if (path / "config.json").is_file():
        hint = " (config.json suggests a Hugging Face folder)"
    raise GPT2Error(
        f"{path}: not an OpenAI GPT-2 folder{hint}: expected hparams.json and model.ckpt.index, "
        f"or sub-folders named {', '.join(PRESETS)} holding them"
    )


def _our_shape(name: str, tf_name: str, shape: tuple[int, ...], source: str) -> tuple[int, ...]:
    """A tensor's shape after conversion, to check against the config before reading it."""
    if not is_transposed(name):
        return shape
    if len(shape) != 3 or shape[0] != 1:
        raise GPT2Error(
            f"{source}: tensor {tf_name!r} has shape {list(shape)}, expected [1, in, out] "
            "as in OpenAI's release"
        )
    return (shape[2], shape[1])
