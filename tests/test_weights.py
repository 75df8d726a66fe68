"""Every checkpoint layout `GPT2.from_pretrained` reads, against `transformers` on the same weights.

Hugging Face layouts are written by transformers itself (save_pretrained, or
torch.save of its state dict); the OpenAI layout by TensorFlow (the committed
fixtures, whose reference.npz is the oracle). Broken checkpoints must give one
clear GPT2Error, and `gpt2 validate` must turn it into one line on stderr.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2.config import PRESETS
from gpt2.errors import GPT2Error
from gpt2.model import GPT2

ATOL = 1e-4
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=3)


def assert_same_logits(model: GPT2, hf, n_vocab: int, T: int = 12) -> None:
    idx = torch.randint(0, n_vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff}"


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    return hf_checkpoint(**TINY)


# -- the layouts -----------------------------------------------------------------------


def test_hf_safetensors_folder(tiny):
    model = GPT2.from_pretrained(tiny.folder)
    assert model.source.layout == "huggingface"
    assert_same_logits(model, tiny.model, 128)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_changing_a_loaded_model_leaves_its_file_alone(weights, tiny, tmp_path):
    """The weights are views of the mapped file, mapped copy-on-write: training or
    editing the model in memory must never write through to the checkpoint."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny.folder / "config.json", folder)
    if weights.endswith(".bin"):
        torch.save(tiny.model.state_dict(), folder / weights)
    else:
        shutil.copy(tiny.folder / weights, folder)
    before = (folder / weights).read_bytes()
    import mmap

    # torch.load maps shared (writing through) where the process's default says so,
    # which another library may have set: ours must map privately regardless
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        model = GPT2.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert (folder / weights).read_bytes() == before
    assert_same_logits(GPT2.from_pretrained(folder), tiny.model, 128)


def test_a_loaded_model_saved_over_its_own_folder_stays_whole(tiny, tmp_path):
    """Writers put a new file in place by renaming, so the model still mapping the old
    one (its wte, biases, LayerNorms are views of it) keeps its weights."""
    from gpt2.weights.huggingface import save_huggingface

    folder = tmp_path / "m"
    shutil.copytree(tiny.folder, folder)
    model = GPT2.from_pretrained(folder)
    doubled = {name: t * 2 for name, t in model.state_dict().items()}
    save_huggingface(doubled, model.config, folder, overwrite=True)
    assert_same_logits(model, tiny.model, 128)  # the loaded model: unchanged
    again = GPT2.from_pretrained(folder)
    assert torch.equal(again.wte.weight, 2 * model.wte.weight)  # the folder: the new one


def test_safetensors_whose_tensors_are_not_aligned_load(tiny, tmp_path):
    """A header whose length is not a multiple of 4 leaves float32 data misaligned for
    its type (safetensors' own writer pads it; others need not): read by copying."""
    raw = load_file(str(tiny.folder / "model.safetensors"))
    offsets, blobs, at = {}, [], 0
    for name, t in raw.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        offsets[name] = {"dtype": "F32", "shape": list(t.shape),
                         "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    header = json.dumps(offsets).encode()
    header += b" " * ((4 - len(header) % 4) % 4 + 1)  # 8 + len(header) is 1 mod 4
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny.folder / "config.json", folder)
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"".join(blobs))
    assert_same_logits(GPT2.from_pretrained(folder), tiny.model, 128)


def test_hf_pytorch_model_bin(tiny, tmp_path):
    shutil.copy(tiny.folder / "config.json", tmp_path)
    state = tiny.model.state_dict()  # includes the tied lm_head.weight, as old files do
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(GPT2.from_pretrained(tmp_path), tiny.model, 128)


def test_hf_pytorch_model_bin_in_the_format_before_zip(tiny, tmp_path):
    """torch.save's format before PyTorch 1.6 cannot be mapped: it is read into memory.
    Told apart by its first bytes: a zip's end signature (PK 05 06) inside its tensor
    data made zipfile.is_zipfile say zip, and the file was refused."""
    shutil.copy(tiny.folder / "config.json", tmp_path)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    end_record = b"PK\x05\x06" + bytes(18)  # an empty zip's whole end-of-directory record
    for t in state.values():  # (the old format writes tensors in no fixed order)
        t.view(-1).view(torch.uint8)[-22:] = torch.tensor(list(end_record), dtype=torch.uint8)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    import zipfile

    assert zipfile.is_zipfile(tmp_path / "pytorch_model.bin")  # what fooled the loader
    model = GPT2.from_pretrained(tmp_path)
    assert torch.equal(model.h[1].mlp.c_proj.bias, state["transformer.h.1.mlp.c_proj.bias"])
    assert torch.equal(model.wte.weight, state["transformer.wte.weight"])


def test_hf_sharded_safetensors(hf_checkpoint):
    ckpt = hf_checkpoint(**TINY, max_shard_size="200KB")
    shards = sorted(ckpt.folder.glob("model-*.safetensors"))
    assert (ckpt.folder / "model.safetensors.index.json").is_file() and len(shards) > 1
    assert_same_logits(GPT2.from_pretrained(ckpt.folder), ckpt.model, 128)


def test_hf_without_transformer_prefix(tiny, tmp_path):
    """The hub's own gpt2 files name tensors `h.0...`, not `transformer.h.0...`."""
    state = load_file(tiny.folder / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()},
              tmp_path / "model.safetensors")
    shutil.copy(tiny.folder / "config.json", tmp_path)
    assert_same_logits(GPT2.from_pretrained(tmp_path), tiny.model, 128)


def test_bare_safetensors_file_of_a_released_width(hf_checkpoint, tmp_path):
    # 124M's width and heads; no config.json, so the heads come from the width
    ckpt = hf_checkpoint(n_layer=1, n_embd=768, n_head=12, n_vocab=128, n_ctx=16, seed=4)
    bare = tmp_path / "weights.safetensors"
    shutil.copy(ckpt.folder / "model.safetensors", bare)
    model = GPT2.from_pretrained(bare)
    assert (model.config.n_layer, model.config.n_head, model.config.n_ctx) == (1, 12, 16)
    assert_same_logits(model, ckpt.model, 128, T=8)


def test_bare_safetensors_of_an_unknown_width_asks_for_config(tiny, tmp_path):
    bare = tmp_path / "weights.safetensors"
    shutil.copy(tiny.folder / "model.safetensors", bare)
    with pytest.raises(GPT2Error, match="width 64 is not a released size.*config.json"):
        GPT2.from_pretrained(bare)


@pytest.mark.parametrize("name", ["tiny", "vocab", "deep", "sharded"])
def test_openai_tf_layout(name, tf_fixture, tf_reference_model):
    model = GPT2.from_pretrained(tf_fixture(name))
    assert model.source.layout == "openai"
    hf = tf_reference_model(name)
    assert_same_logits(model, hf, model.config.n_vocab, T=min(12, model.config.n_ctx))


def test_kaggle_top_folder_with_size_folders(tf_fixture, tf_reference_model, tmp_path, run_cli,
                                             monkeypatch):
    top = tmp_path / "kaggle"
    for size, fixture in (("124M", "tiny"), ("355M", "sharded")):
        shutil.copytree(tf_fixture(fixture), top / size)
    # the fixtures are tiny: a size folder holding another shape than its name is refused
    with pytest.raises(GPT2Error, match=r"124M: layers/heads/width .* are not those of 124M"):
        GPT2.from_pretrained(top, size="124M")
    assert run_cli("validate", top, "--size", "355M").code == 1
    # ...so, to follow size= into the folders, the shape check is let through from here
    import gpt2.weights.openai

    monkeypatch.setattr(gpt2.weights.openai, "check_size", lambda *args, **kwargs: None)
    model = GPT2.from_pretrained(top, size="124M")
    assert model.source.path == top / "124M"
    assert_same_logits(model, tf_reference_model("tiny"), 512)
    assert_same_logits(GPT2.from_pretrained(top, size="gpt2-medium"),
                       tf_reference_model("sharded"), 128)
    with pytest.raises(GPT2Error, match=r"several sizes \(124M, 355M\).*size"):
        GPT2.from_pretrained(top)
    with pytest.raises(GPT2Error, match="no 774M folder; it holds 124M, 355M"):
        GPT2.from_pretrained(top, size="774M")
    assert run_cli("validate", top, "--size", "355M").code == 0


# -- broken checkpoints ------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_config(tiny, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    shutil.copy(tiny.folder / "config.json", folder)
    return folder


def _edited_safetensors(tiny, folder: Path, edit) -> Path:
    state = load_file(tiny.folder / "model.safetensors")
    edit(state)
    save_file(state, _with_config(tiny, folder) / "model.safetensors")
    return folder


def truncated(tiny, tmp_path):
    folder = _with_config(tiny, tmp_path / "truncated")
    data = (tiny.folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder, r"model.safetensors: truncated: the file has \d[\d,]* bytes"


def header_garbage(tiny, tmp_path):
    folder = _with_config(tiny, tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return folder, "not a valid safetensors file .header is not JSON"


def overlapping_tensors(tiny, tmp_path):
    """Two tensors over the same bytes (safetensors forbids it): mapped, they would be
    one memory, and training one would change the other."""
    folder = _with_config(tiny, tmp_path / "overlap")
    data = bytearray((tiny.folder / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__" and header[k]["shape"] == [64]]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    (folder / "model.safetensors").write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    return folder, "not a valid safetensors file .tensors .* overlap in the file"


def missing_tensor(tiny, tmp_path):
    folder = _edited_safetensors(
        tiny, tmp_path / "missing", lambda s: s.pop("transformer.h.1.ln_2.bias"))
    return folder, r"missing tensor 'h\.1\.ln_2\.bias' \(expected shape \[64\]"


def wrong_shape(tiny, tmp_path):
    def edit(s):
        s["transformer.h.0.mlp.c_fc.bias"] = torch.zeros(255)

    folder = _edited_safetensors(tiny, tmp_path / "shape", edit)
    return folder, r"tensor 'h\.0\.mlp\.c_fc\.bias' has shape \[255\], expected \[256\]"


def wrong_weight_shape(tiny, tmp_path):
    def edit(s):  # HF stores (in, out) = (64, 192); ours is (out, in) = (192, 64)
        s["transformer.h.1.attn.c_attn.weight"] = torch.zeros(64, 190)

    folder = _edited_safetensors(tiny, tmp_path / "wshape", edit)
    return folder, r"'h\.1\.attn\.c_attn\.weight' has shape \[190, 64\], expected \[192, 64\]"


def untied_lm_head(tiny, tmp_path):
    def edit(s):
        s["lm_head.weight"] = s["transformer.wte.weight"] + 1.0

    folder = _edited_safetensors(tiny, tmp_path / "untied", edit)
    return folder, "lm_head.weight differs from wte.weight.*untied LM head is not supported"


def unknown_tensor(tiny, tmp_path):
    def edit(s):
        s["transformer.h.0.attn.rotary.weight"] = torch.zeros(4)

    folder = _edited_safetensors(tiny, tmp_path / "extra", edit)
    return folder, "'transformer.h.0.attn.rotary.weight' is not a GPT-2 parameter"


def not_gpt2_folder(tiny, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("hello")
    return folder, "not a GPT-2 checkpoint: expected hparams.json"


def other_model_type(tiny, tmp_path):
    folder = _edited_safetensors(tiny, tmp_path / "llama", lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    return folder, "model_type is 'llama', not 'gpt2'"


def no_such_path(tiny, tmp_path):
    return tmp_path / "nowhere", "neither an existing file or folder nor a GPT-2 size"


def int_weights(tiny, tmp_path):
    def edit(s):
        s["transformer.wpe.weight"] = s["transformer.wpe.weight"].to(torch.int32)

    folder = _edited_safetensors(tiny, tmp_path / "ints", edit)
    return folder, r"'transformer\.wpe\.weight' is torch\.int32, not a float"


def _edited_config(tiny, folder: Path, changes: dict) -> Path:
    folder = _edited_safetensors(tiny, folder, lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


def epsilon_text(tiny, tmp_path):
    folder = _edited_config(tiny, tmp_path / "eps", {"layer_norm_epsilon": "x"})
    return folder, r"config\.json: layer_norm_epsilon must be a number in \(0, 1\)"


def epsilon_negative(tiny, tmp_path):
    folder = _edited_config(tiny, tmp_path / "eps", {"layer_norm_epsilon": -1})
    return folder, r"layer_norm_epsilon must be a number in \(0, 1\).*got -1"


def attention_unscaled(tiny, tmp_path):
    """transformers would skip the 1/sqrt(head size); loading it as GPT-2 would not."""
    folder = _edited_config(tiny, tmp_path / "unscaled", {"scale_attn_weights": False})
    return folder, "scale_attn_weights is False; this GPT-2 implements only scale_attn_weights"


def attention_scaled_by_layer(tiny, tmp_path):
    folder = _edited_config(tiny, tmp_path / "bylayer", {"scale_attn_by_inverse_layer_idx": True})
    return folder, "scale_attn_by_inverse_layer_idx is True"


def other_mlp_width(tiny, tmp_path):
    folder = _edited_config(tiny, tmp_path / "inner", {"n_inner": 100})
    return folder, r"n_inner is 100; GPT-2's MLP is 4 x n_embd wide \(256\)"


BROKEN = [
    truncated, header_garbage, overlapping_tensors, missing_tensor, wrong_shape,
    wrong_weight_shape, untied_lm_head,
    unknown_tensor, not_gpt2_folder, other_model_type, no_such_path, int_weights,
    epsilon_text, epsilon_negative, attention_unscaled, attention_scaled_by_layer,
    other_mlp_width,
]


@pytest.mark.parametrize("device, message", [("tpu", "unknown device 'tpu'"),
                                             ("cuda:0", "no CUDA GPU is available here"),
                                             (None, "device must be a name .* got None")])
def test_a_device_that_is_not_there_is_refused_before_loading(tiny, device, message,
                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GPT2Error, match=message):
        GPT2.from_pretrained(tiny.folder, device=device)
    # "auto", TrainConfig's default, is the GPU where there is one: here the CPU
    assert GPT2.from_pretrained(tiny.folder, device="auto").wte.weight.device.type == "cpu"


@pytest.mark.parametrize("shape", [(1, 5), (64, 64), (65, 130), (768, 2304), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transpose_is_the_transpose(shape, dtype):
    """The loaders' blocked transpose: equal to t.t(), contiguous, a new tensor."""
    from gpt2.weights.names import transpose

    t = torch.randn(shape).to(dtype)
    got = transpose(t)
    assert got.is_contiguous() and got.data_ptr() != t.data_ptr()
    assert torch.equal(got, t.t())


def test_size_that_is_not_the_models_is_refused(tiny, tf_fixture):
    """--size picks a folder inside a Kaggle download; given with one model, it must name
    that model's size, not be ignored."""
    for path in (tiny.folder, tf_fixture("tiny")):
        with pytest.raises(GPT2Error, match=r"are not those of 355M.*--size picks"):
            GPT2.from_pretrained(path, size="355M")


def test_configs_that_transformers_writes_for_gpt2_load(tiny, tmp_path):
    """GPT-2's own values of the variant options (and n_inner = 4 x n_embd) are fine."""
    folder = _edited_config(tiny, tmp_path / "ok", {
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "n_inner": 256,
        "add_cross_attention": False, "reorder_and_upcast_attn": False})
    assert GPT2.from_pretrained(folder).config == tiny.config


@pytest.mark.parametrize("make", BROKEN, ids=lambda f: f.__name__)
def test_broken_checkpoint_is_one_clear_error(make, tiny, tmp_path, run_cli):
    path, message = make(tiny, tmp_path)
    with pytest.raises(GPT2Error, match=message):
        GPT2.from_pretrained(path)
    result = run_cli("validate", path)
    assert result.code == 1 and result.out == ""
    assert result.err.startswith("gpt2 validate: error: ") and result.err.count("\n") == 1
    assert "Traceback" not in result.err


def _malicious_bin(path: Path, marker: Path, *, zip_format: bool) -> None:
    state = {"transformer.wte.weight": RunsCode(marker)}
    if zip_format:
        torch.save(state, path)  # torch's zip container, the pickle inside runs the code
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # a bare pickle, as torch < 1.6 wrote


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(zip_format, tiny, tmp_path, run_cli):
    # The payload is real: loading it the unsafe way does run the command.
    proof = tmp_path / "proof"
    _malicious_bin(tmp_path / "proof.bin", proof, zip_format=zip_format)
    if zip_format:
        torch.load(tmp_path / "proof.bin", weights_only=False)
    else:
        pickle.loads((tmp_path / "proof.bin").read_bytes())
    assert proof.exists()

    marker = tmp_path / "pwned"
    folder = _with_config(tiny, tmp_path / "evil")
    _malicious_bin(folder / "pytorch_model.bin", marker, zip_format=zip_format)
    with pytest.raises(GPT2Error, match="refused to load.*weights_only=True"):
        GPT2.from_pretrained(folder)
    with pytest.raises(GPT2Error, match="refused to load"):
        GPT2.from_pretrained(folder / "pytorch_model.bin")
    result = run_cli("validate", folder)
    assert result.code == 1 and "refused to load" in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 8, b""],
                         ids=["text", "bytes", "empty"])
def test_a_file_that_is_no_pickle_is_a_one_line_error(content, tiny, tmp_path, run_cli):
    """Whatever torch.load raises for bytes that are not a checkpoint (KeyError for a text
    file, UnpicklingError, EOFError): one line that says so, not a claim of code."""
    folder = _with_config(tiny, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(content)
    for path in (folder, folder / "pytorch_model.bin"):
        result = run_cli("validate", path)
        assert result.code == 1 and "not a readable PyTorch checkpoint" in result.err, result.err
        assert result.err.count("\n") == 1 and "Traceback" not in result.err


# -- full size: gpt2 validate, and memory ------------------------------------------------


@pytest.fixture(scope="module")
def hf_124m(tmp_path_factory):
    """A random 124M checkpoint written by transformers (~500 MB), freed after this module."""
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("hf-124M")
    hf = make_hf_model(PRESETS["124M"], seed=5)
    hf.save_pretrained(folder)
    pickled = folder / "bin"  # the same weights as pytorch_model.bin (tied lm_head included)
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    probe = {  # values the loaded model must hold, taken from HF's tensors
        "wte": hf.transformer.wte.weight.double().sum().item(),
        "c_attn_11": hf.transformer.h[11].attn.c_attn.weight.double().sum().item(),
        "c_fc_0_col": hf.transformer.h[0].mlp.c_fc.weight[:, 7].double().sum().item(),
    }
    del hf
    yield folder, probe
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_validate_124m_prints_parameter_count(hf_124m, run_cli):
    folder, _ = hf_124m
    result = run_cli("validate", folder)
    assert result.code == 0, result.err
    assert "124,439,808" in result.out
    assert "h.11.mlp.c_proj.weight" in result.out and "layout:     huggingface" in result.out
    assert "768x2304" not in result.out and "2304x768" in result.out  # shapes as nn.Linear's


def test_validate_json(tiny, tf_fixture, tf_reference_model, tiktoken_gpt2, run_cli):
    data = json.loads(run_cli("validate", tiny.folder, "--json").out)
    assert data["layout"] == "huggingface" and data["parameters"] == 110_336
    assert data["config"] == {"n_vocab": 128, "n_ctx": 32, "n_embd": 64, "n_head": 4,
                              "n_layer": 2}
    assert len(data["tensors"]) == 2 + 12 * 2 + 2
    assert data["tensors"][2] == {"name": "h.0.ln_1.weight", "shape": [64], "dtype": "float32"}
    # 128 tokens is not GPT-2's vocabulary, so the forward pass runs on plain ids
    assert data["sample"]["input"].startswith("ids") and data["sample"]["tokens"] == 32

    # GPT-2's vocabulary: the sample text, with the loss the HF model gives it
    from gpt2.commands.validate import SAMPLE_TEXT

    data = json.loads(run_cli("validate", tf_fixture("vocab"), "--json").out)
    assert data["sample"]["input"] == "text" and data["layout"] == "openai"
    ids = torch.tensor([tiktoken_gpt2.encode(SAMPLE_TEXT)])
    with torch.no_grad():
        hf_loss = tf_reference_model("vocab")(ids, labels=ids).loss.item()
    assert data["sample"]["tokens"] == ids.size(1)
    assert data["sample"]["loss"] == pytest.approx(hf_loss, abs=1e-5)


def test_validate_int8_checkpoint(tiny, tmp_path, run_cli):
    """An int8 checkpoint reports the float model's parameter count, its own (int8) bytes,
    and its tensors under the names the file uses (the int8 head is stored as wte)."""
    assert run_cli("convert", tiny.folder, tmp_path / "int8", "--quantize", "int8").code == 0
    float_report = json.loads(run_cli("validate", tiny.folder, "--json").out)
    data = json.loads(run_cli("validate", tmp_path / "int8", "--json").out)
    assert data["layout"] == "huggingface-int8"
    assert data["parameters"] == float_report["parameters"] == 110_336
    names = {t["name"]: t["dtype"] for t in data["tensors"]}
    assert names["wte.weight"] == "int8" and "lm_head.weight" not in names
    assert names["h.1.mlp.c_fc.weight"] == "int8"
    assert names["h.1.mlp.c_fc.weight_scale"] == "bfloat16"
    # 1 byte per weight plus scales: well under half of the float checkpoint
    assert data["bytes"] < 0.45 * float_report["bytes"]


def test_nan_weights_are_found_by_validate_and_stop_generation(tiny, tmp_path, run_cli):
    """NaN in a row that a short forward pass never reads (a late position): validate
    checks every tensor, and generation stops with the error when it reaches it, rather
    than printing tokens picked from NaN logits."""
    from gpt2.generate import stream

    bad = tmp_path / "bad"
    shutil.copytree(tiny.folder, bad)
    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.endswith("wpe.weight"))
    state[key][20] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("validate", bad)
    assert r.code == 1 and "wpe.weight hold NaN or infinite values" in r.err, r.err
    model = GPT2.from_pretrained(bad)
    tokens = []
    with pytest.raises(GPT2Error, match="logits are NaN or infinite"):
        for token in stream(model, torch.tensor([[1, 2, 3]]), max_new_tokens=25,
                            temperature=0.0):
            tokens.append(token)
    assert len(tokens) == 18  # positions 3..20 fed; the logits after position 20 are NaN


def test_write_safetensors_is_read_back_by_safetensors(tmp_path):
    """Our streaming writer against the safetensors library as the reader: every dtype
    a checkpoint holds, scalars, empty and non-contiguous tensors, transposes, a cast."""
    gen = torch.Generator().manual_seed(0)
    from gpt2.weights.huggingface import write_safetensors

    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(4, 2, generator=gen).bfloat16(),
        "f16": torch.randn(7, generator=gen).half(),
        "i8": torch.randint(-128, 128, (6, 3), generator=gen, dtype=torch.int8),
        "i32": torch.randint(-9, 9, (2, 2), generator=gen, dtype=torch.int32),
        "i64": torch.tensor(5),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 8, generator=gen)[::2, 1::3],
    }
    write_safetensors(tmp_path / "a.safetensors", tensors, transposed={"f32", "i8"},
                      metadata={"format": "pt"})
    back = load_file(tmp_path / "a.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        want = t.t() if name in ("f32", "i8") else t
        assert back[name].dtype == want.dtype and torch.equal(back[name], want), name
    from safetensors import safe_open

    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    write_safetensors(tmp_path / "b.safetensors", floats, dtype=torch.bfloat16)
    back = load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(back[k], v.bfloat16()) for k, v in floats.items())


def test_save_huggingface_refuses_what_would_not_load(tmp_path):
    from gpt2.config import GPT2Config
    from gpt2.weights.huggingface import save_huggingface

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_vocab=64, n_ctx=16)
    state = GPT2(config).state_dict()
    for args, kwargs, message in [
        (({}, config), {}, "the state dict is empty"),
        ((state, GPT2Config()), {}, r"wte.weight has shape \(64, 32\) but the config gives"),
        ((state, config), {"dtype": torch.int8}, "dtype must be a float torch.dtype"),
        ((state, config), {"dtype": "bf16"}, "dtype must be a float torch.dtype"),
    ]:
        with pytest.raises(GPT2Error, match=message):
            save_huggingface(*args, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    for size in (None, 124):
        with pytest.raises(GPT2Error, match="unknown GPT-2 size"):
            GPT2Config.preset(size)


def float_tensors_alive(shape) -> int:
    """How many fp32 tensors of this shape this process still holds."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and o.dtype == torch.float32
               and tuple(o.shape) == shape)


@pytest.mark.parametrize("how", [{"dtype": "bf16"}, {"quantize": "int8"}])
def test_a_cast_or_quantized_load_keeps_no_float_weights(hf_checkpoint, how):
    """Casting or quantizing on load replaces the float tensors; nothing may keep them
    (the model's record of its source held the whole float state dict)."""
    ckpt = hf_checkpoint(n_embd=96, n_vocab=136)  # shapes no other test's tensors have
    shapes = [(136, 96), (3 * 96, 96), (4 * 96, 96)]  # wte, c_attn, c_fc (out, in)
    before = [float_tensors_alive(shape) for shape in shapes]  # (the fixture's own)
    model = GPT2.from_pretrained(ckpt.folder, **how)
    assert model.h[0].attn.c_attn.weight.dtype != torch.float32
    assert [float_tensors_alive(shape) for shape in shapes] == before
    assert model.source.path == ckpt.folder and model.source.layout == "huggingface"


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    import torch
    from gpt2.model import GPT2
    before = status("VmRSS")
    model = GPT2.from_pretrained(sys.argv[1])
    print(json.dumps({
        "before": before, "peak": status("VmHWM"),
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "wte": model.wte.weight.double().sum().item(),
        "c_attn_11": model.h[11].attn.c_attn.weight.double().sum().item(),
        "c_fc_0_col": model.h[0].mlp.c_fc.weight[7].double().sum().item(),
    }))
""")


INT8_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    # a large block allocated and freed: glibc then serves blocks up to its size from
    # the heap, and keeps what is freed there (the state a busy process is in)
    x = torch.ones(32 << 20, dtype=torch.uint8)
    del x
    from gpt2.model import GPT2
    before = rss()
    model = GPT2.from_pretrained(sys.argv[1])
    held, seen = 0, set()
    for m in model.modules():
        kernel = getattr(m, "_native", None)
        tensors = [*m._parameters.values(), *m._buffers.values(),
                   *(a for a in (kernel.args if kernel else ()) if isinstance(a, torch.Tensor))]
        for t in tensors:  # (a meta placeholder holds nothing: its weight is in tiles)
            if t is not None and not t.is_meta and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                held += t.untyped_storage().nbytes()
    print(json.dumps({"growth": rss() - before, "held": held}))
""")


CAST_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    from gpt2.model import GPT2
    before = rss()
    model = GPT2.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
    held = {}  # storage -> bytes: the tensors, and the copies our kernels hold
    for m in model.modules():
        kernel = getattr(m, "_native", None)
        for t in [*m._parameters.values(), *m._buffers.values(),
                  *(a for a in (kernel.args if kernel else ()) if isinstance(a, torch.Tensor))]:
            if t is not None and not t.is_meta:  # (a placeholder: the weight is in tiles)
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    print(json.dumps({"growth": rss() - before, "held": sum(held.values())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", [{"dtype": "bf16"}, {"quantize": "int8"},
                                 {"quantize": "int8-weight-only"}])
def test_a_bf16_or_int8_model_from_fp32_holds_no_float_weights(hf_124m, how):
    """Loading fp32 124M as bf16 or int8 leaves the process holding what the model holds
    and no more: not the float weights (the model's record of its source kept the float
    state dict: int8 755 MB resident for ~250 MB held), nor the file's pages of the
    dropped float embedding (154 MB)."""
    from gpt2 import cpu_kernels

    if not cpu_kernels.amx_available():
        pytest.skip("counts only on AMX: elsewhere oneDNN's and FBGEMM's copies, of "
                    "sizes we cannot read, are part of what a layer holds")
    folder, _ = hf_124m
    out = subprocess.run([sys.executable, "-c", CAST_MEMORY_PROBE, str(folder), json.dumps(how)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    m = json.loads(out)
    assert m["growth"] <= 1.1 * m["held"] + 8e6, (m["growth"] / 1e6, m["held"] / 1e6)


@pytest.mark.slow
def test_an_int8_model_keeps_no_more_memory_than_it_holds(hf_124m, tmp_path):
    """Packing the int8 kernels' weights frees large temporaries, which glibc kept
    (386 MB resident for 240 MB of tensors, int8 124M): loading hands them back."""
    from gpt2.quantize import quantize_model, save_quantized

    folder, _ = hf_124m
    save_quantized(quantize_model(GPT2.from_pretrained(folder), "int8"), tmp_path / "int8")
    out = subprocess.run([sys.executable, "-c", INT8_MEMORY_PROBE, str(tmp_path / "int8")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    m = json.loads(out)
    assert m["growth"] <= 1.1 * m["held"], (m["growth"] / 2**20, m["held"] / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_loading_124m_copies_only_what_it_transposes(layout, hf_124m):
    """The file is mapped (safetensors, and torch.save's zip format): the tensors kept as
    they are (wte, wpe, biases, LayerNorms) are the file's own pages, not copies, and the
    pages under each projection weight are handed back once it is transposed. So loading
    grows the process by the transposed weights and a little more, no further (reading
    every tensor into memory grew it by 1.03x the weights; mapping without handing back,
    by 1.37x). The OpenAI layout: bench/load.py."""
    folder, probe = hf_124m
    folder = folder / "bin" if layout == "bin" else folder
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    m = json.loads(out)
    assert m["bytes"] == 124_439_808 * 4
    c = PRESETS["124M"].n_embd
    transposed = PRESETS["124M"].n_layer * (3 * c * c + c * c + 4 * c * c + 4 * c * c) * 4
    growth = m["peak"] - m["before"]
    # measured: the transposed weights + 17 MB (a tensor in flight, the model's objects)
    assert growth <= transposed + 0.1 * m["bytes"], (
        f"peak RSS grew by {growth / 1e6:.0f} MB; the transposed weights are "
        f"{transposed / 1e6:.0f} MB")
    for key, value in probe.items():  # and it loaded the right numbers
        assert m[key] == pytest.approx(value, rel=1e-9), key

