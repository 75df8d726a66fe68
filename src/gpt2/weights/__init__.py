"""Find a checkpoint, recognise its layout, and read it into our state dict.

Layouts:
  openai       OpenAI's release / the Kaggle mirror: hparams.json + model.ckpt.{index,data-*}
  huggingface  config.json + model.safetensors (or shards, or pytorch_model.bin),
               also what `gpt2 train` and `gpt2 convert` write
Every loader returns tensors under our names, in nn.Linear's (out, in) orientation,
checked against the config's expected shapes (`gpt2.weights.names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32", "bf16", "fp16" -> the torch dtype; a floating torch dtype or None as it is."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = DTYPES.get(dtype.lower()) if isinstance(dtype, str) else None
    if found is None:
        raise GPT2Error(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return found


@dataclass
class Checkpoint:
    config: GPT2Config
    state_dict: dict[str, torch.Tensor]
    layout: str  # "openai" or "huggingface"
    path: Path  # the folder or file the tensors came from


def detect_layout(path: Path) -> str:
    """'openai' or 'huggingface' for a folder or file; GPT2Error for anything else."""
    from gpt2.weights.huggingface import is_hf_folder

    if path.is_file():
        if path.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")):
            return "huggingface"
        if path.name.startswith("model.ckpt"):
            return "openai"
        raise GPT2Error(f"{path}: not a GPT-2 weights file (.safetensors, .bin or model.ckpt.*)")
    if not path.is_dir():
        raise GPT2Error(f"{path}: no such file or folder" if not path.exists() else
                        f"{path}: not a file or folder of weights (a device or pipe?)")
    if (path / "model.ckpt.index").is_file() or (path / "hparams.json").is_file():
        return "openai"
    if is_hf_folder(path):
        return "huggingface"
    sizes = [d.name for d in path.iterdir() if (d / "model.ckpt.index").is_file()]
    if sizes:
        return "openai"  # a Kaggle download: one folder per size
    raise GPT2Error(
        f"{path}: not a GPT-2 checkpoint: expected hparams.json + model.ckpt.* (OpenAI/Kaggle) "
        "or config.json + model.safetensors (Hugging Face)"
    )


def load_checkpoint(
    name_or_path: str | Path,
    *,
    size: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Checkpoint:
    """Resolve a size name or path, detect its layout and read its tensors."""
    from gpt2.weights.hub import resolve_model

    path = resolve_model(str(name_or_path))
    torch_dtype = parse_dtype(dtype)
    layout = detect_layout(path)
    if layout == "openai":
        from gpt2.weights.openai import load_openai, resolve_openai_folder

        folder = resolve_openai_folder(path if path.is_dir() else path.parent, size=size)
        config, state = load_openai(folder, dtype=torch_dtype)
        return Checkpoint(config, state, layout, folder)
    from gpt2.weights.huggingface import load_huggingface

    config, state = load_huggingface(path, dtype=torch_dtype)
    if size is not None:
        from gpt2.weights.openai import check_named_size

        check_named_size(config, size, path)
    return Checkpoint(config, state, layout, path)
