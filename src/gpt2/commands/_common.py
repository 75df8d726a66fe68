"""Options and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser, *, dtype: bool = True,
                        model_only: bool = False) -> None:
    """--model, --size, --device, and with dtype --dtype and --quantize; model_only: just
    --model (a command that reads the model's vocabulary and nothing else)."""
    p.add_argument(
        "--model", "-m", default="124M",
        help="size name (124M, 355M, 774M, 1558M, gpt2, ...) fetched by `gpt2 download`, "
        "or a checkpoint folder/file (OpenAI/Kaggle, Hugging Face, or `gpt2 train` output); "
        "default: %(default)s",
    )
    if model_only:
        return
    p.add_argument("--size", help="size folder to use inside a Kaggle download (e.g. 355M)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    if dtype:
        p.add_argument(
            "--dtype", choices=["fp32", "bf16", "fp16"],
            help="weights and activations precision (default: as the checkpoint stores them, "
            "fp32 for OpenAI's and the hub's weights; on a CPU, fp16 weights, and bf16 ones "
            "where the CPU has no native bf16 or with --quantize, run in fp32)",
        )
        p.add_argument(
            "--quantize", choices=["int8", "int8-weight-only"], default=None,
            help="int8 linear layers, ~4x fewer bytes per token than fp32, fastest on a CPU: "
            "int8 also quantizes each activation row on the fly (x86 CPUs); "
            "int8-weight-only keeps activations bf16 (closer to fp32, slower)",
        )


def resolve_device(name: str):
    import torch

    from gpt2.errors import GPT2Error

    if not isinstance(name, (str, torch.device)):
        raise GPT2Error(f"device must be a name (cpu, cuda, cuda:N, mps, auto) or a "
                        f"torch.device, got {name!r}")
    if name == "auto":  # the GPU where there is one
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPT2Error(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPT2Error(f"device {name}: no CUDA GPU is available here; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GPT2Error(f"device {name}: Apple's MPS backend is not available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise GPT2Error(f"unsupported device {name!r}; use cpu, cuda or mps")
    return device


def load_model(args: argparse.Namespace):
    """(model, tokenizer) for --model/--size/--device/--dtype; the tokenizer comes from
    the checkpoint folder when it has vocabulary files, else the standard GPT-2 one."""
    from gpt2.model import GPT2

    device = resolve_device(args.device)
    model = GPT2.from_pretrained(
        args.model, size=getattr(args, "size", None),
        dtype=getattr(args, "dtype", None), device=device,
        quantize=getattr(args, "quantize", None),
    )
    return model, load_tokenizer_for(model.source.path)


def check_ids_fit(ids: list[int], model, what: str) -> None:
    """GPT2Error where text encoded with the tokenizer the CLI found for `model` has ids
    past the model's vocabulary: the model needs its own vocabulary files beside it."""
    from gpt2.errors import GPT2Error

    if ids and max(ids) >= model.config.n_vocab:
        where = f"{what} holds token id {max(ids)}, but {model.source.path} has " \
                f"{model.config.n_vocab} tokens"
        if has_vocab_files(model.source.path):
            raise GPT2Error(f"{where}: the vocabulary files in its folder are not the "
                            "model's (they have more tokens); put the model's own there")
        raise GPT2Error(f"{where}: it was encoded with GPT-2's vocabulary, as that folder has "
                        "no vocabulary files of its own; put the model's (encoder.json + "
                        "vocab.bpe, or vocab.json + merges.txt) beside it")


def load_tokenizer_for(path):
    from gpt2.tokenizer import Tokenizer

    if has_vocab_files(path):
        return Tokenizer.from_pretrained(_folder_of(path))
    return Tokenizer.from_pretrained()


def has_vocab_files(path) -> bool:
    """Whether a checkpoint's folder (or the folder of a checkpoint file) has its own
    vocabulary files."""
    folder = _folder_of(path)
    return (folder / "encoder.json").is_file() or (folder / "vocab.json").is_file()


def _folder_of(path):
    from pathlib import Path

    return Path(path) if Path(path).is_dir() else Path(path).parent


def read_text_arg(value: str, what: str = "text") -> str:
    """TEXT, or stdin when TEXT is '-'."""
    if value == "-":
        from gpt2._io import decode_utf8

        return decode_utf8(sys.stdin.buffer.read(), f"stdin ({what})")
    return value


def read_text_file(path: str) -> str:
    """A UTF-8 text file ('-' for stdin), or a one-line GPT2Error."""
    from gpt2._io import decode_utf8
    from gpt2.errors import GPT2Error

    if path == "-":
        return read_text_arg("-")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise GPT2Error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise GPT2Error(f"{path}: is a folder, expected a text file") from None
    except OSError as e:
        raise GPT2Error(f"{path}: cannot read ({e.strerror})") from None
    return decode_utf8(data, path)
