"""The Hugging Face layout, read and written.

A Hugging Face GPT-2 folder holds `config.json` and the weights as
`model.safetensors`, as shards listed in `model.safetensors.index.json`, or as
the older `pytorch_model.bin`. Tensor names are ours with a `transformer.`
prefix (some files, such as the hub's own gpt2, omit it); the Linear weights are
stored (in, out) because HF's GPT-2 uses a `Conv1D` layer, so they are transposed
on the way in and out (`gpt2.weights.names.is_transposed`). A `.bin` file is a
pickle: it is loaded with `weights_only=True`, which refuses anything but tensors,
so a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import sys
from pathlib import Path

import torch

from gpt2._io import atomic_folder, atomic_write_text
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.weights import mapping
from gpt2.weights.names import (
    check_state_dict,
    hf_to_ours,
    is_transposed,
    ours_to_hf,
    transpose,
)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "model-int8.safetensors")  # (gpt2's int8 checkpoints: gpt2.quantize)


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)


def load_huggingface(
    path: Path, *, dtype: torch.dtype | None = None
) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """A Hugging Face folder or weights file -> (config, state dict in our names/orientation)."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise GPT2Error(f"{path}: no {', '.join(WEIGHT_FILES)} in this folder")
    else:
        weights = path
    from gpt2.quantize import quantization_info

    if quantization_info(path) is not None:
        raise GPT2Error(f"{folder}: an int8 checkpoint (written by gpt2 convert --quantize); "
                        "it loads as it is (--model, GPT2.from_pretrained) but is no source "
                        "for float weights: convert the model it was made from instead")
    raw = _read_tensors(weights, _in_our_orientation(weights, dtype))
    config_file = folder / "config.json"
    config = (
        GPT2Config.from_hf_config(config_file)
        if config_file.is_file()
        else _config_from_shapes(raw, weights)
    )
    lm_head = raw.pop("lm_head.weight", None)
    if lm_head is not None:
        _check_tied(lm_head, raw.get("transformer.wte.weight", raw.get("wte.weight")), weights)
    state = {}
    for hf_name, tensor in raw.items():
        name = hf_to_ours(hf_name)  # checked by the conversion already
        if name is not None:  # not old checkpoints' causal-mask buffers (attn.bias, ...)
            state[name] = tensor
    check_state_dict(state, config, str(weights))
    return config, state


def _check_tied(lm_head: torch.Tensor, wte: torch.Tensor | None, source: Path) -> None:
    """GPT-2's LM head is wte; a file that stores a different one is another model."""
    same_memory = wte is not None and wte.data_ptr() == lm_head.data_ptr() and \
        wte.stride() == lm_head.stride() and wte.dtype == lm_head.dtype
    tied = wte is None or (wte.shape == lm_head.shape and (  # (a tied .bin: same memory)
        same_memory or torch.equal(wte.to(lm_head), lm_head)))
    if not tied:
        raise GPT2Error(
            f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them, "
            "and an untied LM head is not supported"
        )


def _in_our_orientation(weights: Path, dtype: torch.dtype | None):
    """The conversion of each tensor as it is read: projection weights transposed from
    (in, out) to (out, in), as nn.Linear keeps them, and everything cast to dtype."""

    def convert(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        try:
            name = hf_to_ours(hf_name)
        except GPT2Error as e:
            raise GPT2Error(f"{weights}: {e}") from None
        if name is None:  # the tied lm_head (compared with wte later); causal-mask buffers
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        if not tensor.is_floating_point():
            raise GPT2Error(f"{weights}: tensor {hf_name!r} is {tensor.dtype}, not a float")
        if is_transposed(name):
            tensor = transpose(tensor)
        return tensor.to(dtype) if dtype is not None else tensor

    return convert


def _read_tensors(weights: Path, convert) -> dict[str, torch.Tensor]:
    name = weights.name
    if name.endswith(".safetensors"):
        return read_safetensors(weights, convert)
    if name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GPT2Error(f"{weights}: not a safetensors index ({e})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(weights.parent / shard, convert))
        return tensors
    if name.endswith((".bin", ".pt", ".pth")):
        state, mapped = _read_pickle(weights)
        for key in list(state):  # one extra tensor alive at a time
            tensor = state.pop(key)
            state[key] = mapping.converted(key, tensor, tensor, convert) if mapped and \
                tensor.is_contiguous() else convert(key, tensor)
        return state
    raise GPT2Error(
        f"{weights}: unknown weights format; expected .safetensors, "
        ".safetensors.index.json or pytorch_model.bin"
    )


# safetensors' dtype names -> torch dtypes (the ones a GPT-2 file can hold)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # the header of a real file is a few kB; refuse absurd lengths


def read_safetensors(
    path: Path, convert: mapping.Convert | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, as views of the file mapped into memory.

    The format is an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes. The file
    is mapped copy-on-write, so reading it copies nothing: a tensor's pages are the
    page cache's until something writes to them (that page then becomes private).
    Tensors are little-endian, as on every platform PyTorch ships for.

    convert(name, tensor), when given, is applied to each tensor in file order; where
    it returns a copy (a transpose, another dtype) the view's pages are handed back at
    once, so loading peaks near the size of the result, not the file's plus the copies'.
    """
    if not path.is_file():
        raise GPT2Error(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, data_start = _safetensors_header(f, size, path)
            mapped = mapping.map_file(f) if header else None
    except OSError as e:
        raise GPT2Error(f"{path}: cannot read ({e.strerror or e})") from None
    tensors = {}
    for name, (dtype, shape, begin, end) in header.items():
        offset, nbytes = data_start + begin, end - begin
        if nbytes == 0:
            empty = torch.empty(shape, dtype=dtype)
            tensors[name] = empty if convert is None else convert(name, empty)
            continue
        tensor, raw = mapping.view(mapped, offset, nbytes, dtype, shape)
        tensors[name] = mapping.converted(name, tensor, raw, convert)
    return tensors


def safetensors_header(path: Path) -> dict[str, tuple]:
    """{name: (dtype, shape, begin, end)} of a .safetensors file, checked as a read
    would check it (a valid header, no tensor past the end of the file), no data read."""
    try:
        with open(path, "rb") as f:
            return _safetensors_header(f, os.fstat(f.fileno()).st_size, path)[0]
    except OSError as e:
        raise GPT2Error(f"{path}: cannot read ({e.strerror or e})") from None


def _safetensors_header(f, size: int, path: Path) -> tuple[dict, int]:
    """{name: (dtype, shape, begin, end)} sorted by offset, and where the data starts."""

    def corrupt(why: str) -> GPT2Error:
        return GPT2Error(f"{path}: not a valid safetensors file ({why}); is it complete?")

    prefix = f.read(8)
    if len(prefix) < 8:
        raise corrupt(f"only {size} bytes")
    n = int.from_bytes(prefix, "little")
    if n > min(_MAX_HEADER, size - 8):
        raise corrupt(f"header length {n:,} but the file has {size:,} bytes")
    try:
        raw = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise corrupt("header is not a JSON object")
    header = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}: {str(info)[:80]}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise corrupt(f"tensor {name!r} has shape {list(shape)} but {end - begin} bytes")
        header[name] = (dtype, shape, begin, end)
    data_start = 8 + n
    needed = max((e for *_, e in header.values()), default=0)
    if data_start + needed > size:
        raise GPT2Error(
            f"{path}: truncated: the file has {size:,} bytes but its tensors need "
            f"{data_start + needed:,}; download or convert it again"
        )
    both = mapping.overlap((name, begin, end) for name, (*_, begin, end) in header.items())
    if both is not None:  # the format forbids it
        raise corrupt(f"tensors {both[0]!r} and {both[1]!r} overlap in the file")
    return dict(sorted(header.items(), key=lambda kv: kv[1][2])), data_start


def _read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(the state dict, whether its tensors are views of the file mapped copy-on-write:
    so are those of torch.save's zip format; the older format is read into memory)."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # a zip's first local header, as torch tests
    mapped = zipped and hasattr(mmap, "MAP_PRIVATE")
    # MAP_PRIVATE whatever the process's default is: the model must never write the file
    private = torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE) if mapped \
        else contextlib.nullcontext()
    try:
        # weights_only: the unpickler accepts tensors and plain containers, nothing that runs
        with private:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except MemoryError:
        raise
    except Exception as e:  # arbitrary bytes fail in many ways (KeyError for a text file)
        raise _unsafe_or_corrupt(path, e) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GPT2Error(f"{path}: expected a dict of tensors (a state dict)")
    return state, mapped


def _unsafe_or_corrupt(path: Path, e: Exception) -> GPT2Error:
    """A one-line error for a pickle torch.load(weights_only=True) refused: one that names
    a function or class outside its allow-list (code: refused), or anything else that is
    not a checkpoint (corrupt, or another kind of file)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    code = next((line for line in lines if "unsupported global" in line.lower()), None)
    if code is not None:
        return GPT2Error(
            f"{path}: refused to load: this pickle contains code or objects other than "
            f"tensors, and checkpoints are loaded with weights_only=True ({code[:120]})"
        )
    why = next((line for line in lines if "Unsupported operand" in line), None) or \
        f"{type(e).__name__}: {lines[0] if lines else ''}"
    return GPT2Error(f"{path}: not a readable PyTorch checkpoint (corrupt, or another kind "
                     f"of file: {why[:120]})")


def _config_from_shapes(raw: dict[str, torch.Tensor], source: Path) -> GPT2Config:
    """Config for a bare weights file with no config.json beside it."""
    from gpt2.config import PRESETS

    def get(name):
        return raw.get(f"transformer.{name}", raw.get(name))

    wte, wpe = get("wte.weight"), get("wpe.weight")
    if wte is None or wpe is None:
        raise GPT2Error(f"{source}: no wte.weight/wpe.weight: this is not a GPT-2 checkpoint")
    n_layer = 1 + max(
        (int(k.split("h.")[1].split(".")[0]) for k in raw if ".h." in f".{k}"), default=-1
    )
    heads = {c.n_embd: c.n_head for c in PRESETS.values()}
    n_embd = wte.shape[1]
    if n_embd not in heads:
        raise GPT2Error(
            f"{source}: no config.json beside it, and width {n_embd} is not a released size, "
            "so the number of heads is unknown; put a config.json next to the weights"
        )
    return GPT2Config(
        n_vocab=wte.shape[0], n_ctx=wpe.shape[0], n_embd=n_embd,
        n_head=heads[n_embd], n_layer=n_layer,
    )


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    transposed: frozenset[str] | set[str] = frozenset(),
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as a .safetensors file, one tensor at a time.

    Each tensor is moved to the CPU, cast to `dtype` (if given) and, if its name is in
    `transposed`, transposed, just before its bytes are written: the file's header
    needs only shapes and dtypes. (safetensors' own `save_file` wants every tensor
    ready at once and then copies each into a bytes object: converting 124M took 1.8x
    the model's memory.) The header is JSON, padded with spaces to 8 bytes, then the
    tensors' little-endian bytes in the header's order.
    """
    if sys.byteorder != "little":  # (torch writes native order; safetensors swaps)
        from safetensors.torch import save_file

        save_file({name: (t.t() if name in transposed else t).to("cpu", dtype or t.dtype)
                   .contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)
        return
    names = {d: n for n, d in _ST_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        shape = list(t.shape)[::-1] if name in transposed else list(t.shape)
        stored = dtype or t.dtype
        nbytes = t.numel() * stored.itemsize
        header[name] = {"dtype": names[stored], "shape": shape,
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, t in tensors.items():
            if t.numel() == 0:
                continue
            t = t.detach().to("cpu", dtype or t.dtype)
            t = (t.t() if name in transposed else t).contiguous()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_huggingface(
    state: dict[str, torch.Tensor],
    config: GPT2Config,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write our state dict as a Hugging Face folder that `GPT2LMHeadModel` loads.

    The folder is assembled beside its destination and renamed into place at the
    end, so an interrupted conversion never leaves a half-written model behind.
    """
    _check_saveable(state, config, dtype)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors",
                          {ours_to_hf(name): t for name, t in state.items()},
                          transposed={ours_to_hf(name) for name in state if is_transposed(name)},
                          dtype=dtype, metadata={"format": "pt"})  # fmt: skip
        hf_config = config.to_hf_config()
        hf_config["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).split(".")[-1]
        atomic_write_text(tmp / "config.json", json.dumps(hf_config, indent=2) + "\n")
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id")}
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def _check_saveable(state: dict, config: GPT2Config, dtype) -> None:
    """A one-line GPT2Error for what would write a folder that does not load: no tensors,
    a dtype that is not a float dtype, tensors of another shape than `config` gives."""
    from gpt2.model import GPT2

    if not state:
        raise GPT2Error("save_huggingface: the state dict is empty; pass model.state_dict()")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GPT2Error(f"save_huggingface: dtype must be a float torch.dtype such as "
                        f"torch.bfloat16 (or None: as stored), got {dtype!r}")
    with torch.device("meta"):
        expected = GPT2(config).state_dict()
    for name, t in state.items():
        want = expected.get(name)
        if want is not None and tuple(t.shape) != tuple(want.shape):
            raise GPT2Error(f"save_huggingface: {name} has shape {tuple(t.shape)} but the "
                            f"config gives {tuple(want.shape)}; pass the model's own config")
