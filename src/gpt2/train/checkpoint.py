"""Training checkpoints that survive `kill -9` at any moment.

Layout of a training folder OUT:

    OUT/config.json, model.safetensors,      the model of the last checkpoint, in the
        generation_config.json, vocab files  Hugging Face layout: GPT2.from_pretrained(OUT)
                                             and `gpt2 generate --model OUT` read it
    OUT/best/                                the same files for the lowest validation loss
                                             so far, plus best.json (step, val_loss)
    OUT/ckpt-0000400/                        the full state at step 400: the HF files above
        optimizer.safetensors                AdamW's moments, one tensor per parameter
        optimizer.json                       AdamW's param groups and step counters
        rng.safetensors                      torch CPU (and CUDA) generator states
        train_state.json                     step, best val loss, data position, GradScaler,
                                             and the arguments of the run
    OUT/latest                               "ckpt-0000400": the checkpoint to resume from
    OUT/log.jsonl, loss.png, samples.txt     the run's log, curves and samples
    OUT/.vocab/                              the vocabulary files, written once per run and
                                             hard-linked into each checkpoint

Nothing is unpickled: tensors are safetensors, everything else JSON.

Why it is crash-safe: a checkpoint folder is assembled under a hidden name and
renamed to ckpt-<step> only when every file in it is written and fsynced; then
`latest` is replaced atomically to name it; only then are older ckpt folders
deleted. The model files at the top of OUT and in best/ are replaced one file
at a time by rename (hard links to the checkpoint's files, so no extra disk),
so each of them is always a complete file. Killed anywhere, OUT holds the
previous checkpoint or the new one, both whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2._io import atomic_write_text, default_mode, fsync_dir
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error

LATEST = "latest"
PREFIX = "ckpt-"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")
VOCAB_FILES = ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt",
               "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TrainingState:
    """Everything `--resume` needs besides the model weights."""

    step: int
    info: dict  # train_state.json: step, best_val_loss, args, scaler, ...
    optimizer: dict  # an optimizer state dict (torch's format)
    rng: dict[str, torch.Tensor]


# --- writing ---------------------------------------------------------------------------------


def save_checkpoint(
    out: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    config: GPT2Config,
    vocab_dir: Path | None,
    optimizer_state: dict,
    info: dict,
    rng: dict[str, torch.Tensor],
) -> Path:
    """Write OUT/ckpt-<step>, point OUT/latest at it, refresh OUT's model files."""
    from safetensors.torch import save_file

    from gpt2.weights.huggingface import save_huggingface

    name = f"{PREFIX}{step:07d}"
    partial = out / f".{name}.partial"
    final = out / name
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        save_huggingface(model_state, config, partial)
        if vocab_dir is not None:
            _link_files(vocab_dir, partial, VOCAB_FILES)
        tensors, groups = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        atomic_write_text(partial / "optimizer.json", json.dumps(groups, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in rng.items()}, str(partial / "rng.safetensors"))
        atomic_write_text(partial / "train_state.json",
                          json.dumps({**info, "step": step}, indent=2) + "\n")
        for f in partial.iterdir():
            os.chmod(f, default_mode())  # safetensors creates 0600
            _fsync_file(f)
        fsync_dir(partial)
        if final.exists():  # renamed into place by a run killed before it updated `latest`
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(out)
        atomic_write_text(out / LATEST, name + "\n")
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise GPT2Error(f"{out}: saving the checkpoint failed ({e.strerror or e}); "
                        "the previous checkpoint is intact") from None
    publish_model(final, out)
    for old in out.glob(f"{PREFIX}*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(out: Path, *, model_state, config, vocab_dir: Path | None,
              step: int, val_loss: float) -> Path:
    """Write the best model so far into OUT/best (Hugging Face layout + best.json)."""
    from gpt2.weights.huggingface import save_huggingface

    best = out / "best"
    partial = out / ".best.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        save_huggingface(model_state, config, partial)
        if vocab_dir is not None:
            _link_files(vocab_dir, partial, VOCAB_FILES)
        publish_model(partial, best)
        atomic_write_text(best / "best.json",
                          json.dumps({"step": step, "val_loss": val_loss}, indent=2) + "\n")
    except OSError as e:
        raise GPT2Error(f"{best}: saving the best model failed ({e.strerror or e})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return best


def publish_model(src: Path, dest: Path) -> None:
    """Make dest's model and vocabulary files those of src, each replaced atomically.

    config.json goes last, so a folder that did not hold a model before becomes
    loadable only once the weights are there.
    """
    dest.mkdir(parents=True, exist_ok=True)
    _link_files(src, dest, (*VOCAB_FILES, "generation_config.json", "model.safetensors",
                            "config.json"))


def _link_files(src: Path, dest: Path, names) -> None:
    """Put src's files `names` (those that exist) into dest, each by an atomic rename.

    A file dest already holds as a link to src's is left alone: renaming another link
    of the same file over it does nothing (POSIX) and would leave the temporary name.
    """
    for n in [n for n in names if (src / n).is_file()]:
        if (dest / n).exists() and os.path.samefile(src / n, dest / n):
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{n}.", dir=dest)
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(src / n, tmp)  # same bytes, no copy: files are replaced, never edited
            except OSError:
                shutil.copyfile(src / n, tmp)
                _fsync_file(Path(tmp))
            os.replace(tmp, dest / n)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    fsync_dir(dest)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- reading ---------------------------------------------------------------------------------


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint folder to resume from, or None when OUT holds none."""
    pointer = out / LATEST
    if pointer.is_file():
        target = out / pointer.read_text(encoding="utf-8").strip()
        if (target / "train_state.json").is_file():
            return target
    # no pointer (or a damaged one): the newest complete folder
    found = sorted(p for p in out.glob(f"{PREFIX}*") if (p / "train_state.json").is_file())
    return found[-1] if found else None


def load_training_state(folder: Path) -> TrainingState:
    """Read a checkpoint's optimizer, RNG and bookkeeping (the weights load via GPT2)."""
    from safetensors.torch import load_file

    try:
        info = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        groups = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise GPT2Error(f"{folder}: cannot read the training state ({e}); "
                        "start again without --resume or restore the folder") from None
    return TrainingState(int(info["step"]), info, _unflatten_optimizer(tensors, groups), rng)


# --- the optimizer state as tensors + JSON ----------------------------------------------------


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimizer state dict -> ({"state.<param>.<key>": tensor}, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in groups.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    param_groups = groups["param_groups"]
    for g in param_groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": param_groups}
