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
    from gpt2.weights.huggingface import save_huggingface, write_safetensors

    name = f"{PREFIX}{step:07d}"
    partial = out / f".{name}.partial"
    final = out / name
    try:
        # what a run killed while saving left: any checkpoint half-written, and the
        # hidden folder its model files were being written in (`..ckpt-N.partial.*`)
        for left in [*out.glob(f".{PREFIX}*.partial"), *out.glob(f"..{PREFIX}*.partial.*")]:
            shutil.rmtree(left, ignore_errors=True)
        save_huggingface(model_state, config, partial)
        if vocab_dir is not None:
            _link_files(vocab_dir, partial, VOCAB_FILES)
        tensors, groups = _flatten_optimizer(optimizer_state)
        write_safetensors(partial / "optimizer.safetensors", tensors)
        atomic_write_text(partial / "optimizer.json", json.dumps(groups, indent=1) + "\n")
        write_safetensors(partial / "rng.safetensors", rng)
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
        kept = latest_checkpoint(out)
        kept = (f"{kept.name} is intact" if kept is not None else
                "the run has none to resume from")
        raise GPT2Error(f"{out}: saving the checkpoint failed ({e.strerror or e}); "
                        f"{kept}") from None
    except BaseException:  # Ctrl-C: the half-written checkpoint goes too (model + optimizer)
        shutil.rmtree(partial, ignore_errors=True)
        raise
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
        for left in [partial, *out.glob("..best.partial.*")]:  # (a run killed while saving)
            shutil.rmtree(left, ignore_errors=True)
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
    """Read a checkpoint's optimizer, RNG and bookkeeping (the weights load via GPT2).

    Every file is checked for what the trainer will use from it, so a damaged one is
    one GPT2Error naming it (see `damaged`), not a KeyError half-way through set-up.
    """
    info = _read_json_file(folder, "train_state.json")
    step = info.get("step") if isinstance(info, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        why = "no step" if step is None else f"step {step!r} is not a count of steps"
        raise damaged(folder, "train_state.json", why)
    if not isinstance(info.get("args", {}), dict) or \
            not isinstance(info.get("scaler") or {}, dict):
        raise damaged(folder, "train_state.json", "'args' or 'scaler' is not a JSON object")
    best = info.get("best_val_loss")
    if best is not None and (isinstance(best, bool) or not isinstance(best, int | float)):
        raise damaged(folder, "train_state.json", f"best_val_loss is {best!r}")
    groups = _read_json_file(folder, "optimizer.json")
    optimizer = _unflatten_optimizer(_read_tensors(folder, "optimizer.safetensors"), groups,
                                     folder)
    rng = _read_tensors(folder, "rng.safetensors")
    cpu = rng.get("torch_cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise damaged(folder, "rng.safetensors", "no torch_cpu generator state of "
                      f"{torch.get_rng_state().numel()} bytes")
    cuda = rng.get("torch_cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 2):
        raise damaged(folder, "rng.safetensors", "the torch_cuda state is not a (GPUs, bytes) "
                      "uint8 tensor")
    return TrainingState(step, info, optimizer, rng)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, folder: Path) -> None:
    """Load a checkpoint's optimizer state into a freshly made `optimizer`, first checking
    that it fits: the same groups and settings, and moments shaped like the parameters
    (torch checks only the group sizes; anything else would fail at the first step)."""
    fresh = optimizer.param_groups
    groups = state["param_groups"]
    if len(groups) != len(fresh) or any(len(g["params"]) != len(f["params"]) or
                                        not _fits(g, f)
                                        for g, f in zip(groups, fresh, strict=False)):
        raise damaged(folder, "optimizer.json", "its param_groups do not fit the run's "
                      "optimizer: their number, sizes or settings differ")
    params = [p for f in fresh for p in f["params"]]
    if [i for g in groups for i in g["params"]] != list(range(len(params))):
        raise damaged(folder, "optimizer.json", "its groups do not number the parameters "
                      f"0..{len(params) - 1}")
    for index, entry in state["state"].items():
        if index >= len(params):
            raise damaged(folder, "optimizer.safetensors", f"state for parameter {index} of "
                          f"{len(params)}")
        shape = params[index].shape
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry.get(key)
            if not isinstance(t, torch.Tensor) or t.shape != shape or not t.is_floating_point():
                raise damaged(folder, "optimizer.safetensors",
                              f"{key} of parameter {index} is not a float tensor of shape "
                              f"{list(shape)}")
        if not isinstance(entry.get("step"), torch.Tensor | int | float):
            raise damaged(folder, "optimizer.safetensors", f"no step of parameter {index}")
    optimizer.load_state_dict(state)


def _fits(loaded: dict, fresh: dict) -> bool:
    """Whether a loaded group's settings can stand for the fresh group's: each one both
    have is of the same kind (a setting only one has is a torch version's difference,
    which torch's load_state_dict fills in)."""
    return all(_same_kind(loaded[k], v) for k, v in fresh.items()
               if k != "params" and k in loaded)


def _same_kind(a, b) -> bool:
    """Whether a loaded JSON value can stand where b stands (numbers for numbers, ...)."""
    if isinstance(b, tuple | list):
        return isinstance(a, tuple | list) and len(a) == len(b) and \
            all(_same_kind(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, bool) or b is None:  # flags such as foreach: None means "the default"
        return a is None or isinstance(a, bool)
    if isinstance(b, int | float):
        return isinstance(a, int | float) and not isinstance(a, bool)
    return type(a) is type(b)


def damaged(folder: Path, name: str, why: str) -> GPT2Error:
    """The error for a checkpoint file that cannot be resumed from. Older checkpoints are
    deleted as newer ones are saved, so the way on is a new run or a fine-tune."""
    out = folder.parent
    return GPT2Error(f"{folder / name}: damaged ({why}); the run cannot resume from it: "
                     f"start it over with another --out, or fine-tune from its model with "
                     f"--init {out}")


def _read_json_file(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged(folder, name, "missing") from None
    except OSError as e:
        raise damaged(folder, name, f"unreadable: {e.strerror or e}") from None
    except ValueError as e:  # not UTF-8, or not JSON
        raise damaged(folder, name, f"not JSON: {e}") from None


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from gpt2.weights.huggingface import read_safetensors

    path = folder / name
    try:
        return read_safetensors(path)
    except GPT2Error as e:  # missing, truncated or not safetensors, said in one line
        why = str(e).removeprefix(f"{path}: ").split(";")[0]
        raise damaged(folder, name, why) from None


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: dict,
                         folder: Path) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        prefix, index, key = (name.split(".", 2) + ["", ""])[:3]
        if prefix != "state" or not index.isdigit() or not key:
            raise damaged(folder, "optimizer.safetensors", f"unexpected tensor {name!r}")
        state.setdefault(int(index), {})[key] = value
    scalars = groups.get("scalars", {}) if isinstance(groups, dict) else None
    param_groups = groups.get("param_groups") if isinstance(groups, dict) else None
    if not isinstance(scalars, dict) or not isinstance(param_groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in param_groups):
        raise damaged(folder, "optimizer.json", "no param_groups with params")
    for index, entry in scalars.items():
        if not index.isdigit() or not isinstance(entry, dict):
            raise damaged(folder, "optimizer.json", f"bad scalars entry {index!r}")
        state.setdefault(int(index), {}).update(entry)
    for g in param_groups:
        if isinstance(g.get("betas"), list):  # JSON has no tuples; restore_optimizer checks it
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": param_groups}
