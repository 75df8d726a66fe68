"""The TensorFlow checkpoint reader and the OpenAI loader against checkpoints TensorFlow wrote.

The oracle for every value is tests/fixtures/tf/*/reference.npz and reference.json:
what TensorFlow itself read back from the checkpoints it saved
(tests/fixtures/make_tf_checkpoint.py). Corruptions are made on copies in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch

from gpt2.config import PRESETS, GPT2Config
from gpt2.errors import GPT2Error
from gpt2.weights.names import (
    check_state_dict,
    expected_shapes,
    hf_to_ours,
    is_transposed,
    openai_to_ours,
    ours_to_hf,
)
from gpt2.weights.openai import load_openai, resolve_openai_folder
from gpt2.weights.tf_checkpoint import TFCheckpoint

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
GPT2_FIXTURES = ["tiny", "vocab", "deep", "sharded"]
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip


def reference(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / name / "reference.json").read_text())
    with np.load(FIXTURES / name / "reference.npz") as npz:
        return meta, {k: npz[k] for k in npz.files}


def copy_fixture(tmp_path: Path, name: str, dest: str | None = None) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / (dest or name)))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # the reference keeps bfloat16 as its bit pattern
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def first_data_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of the first data block, decoded by hand from the table's footer:
    the index block's first entry holds a varint block handle. TensorFlow writes all
    entries of small tables into one block at offset 0, so its size is what we need."""
    footer = index[-48:]
    assert footer[-8:] == struct.pack("<Q", 0xDB4775248B80FB57)
    # skip the metaindex handle (two varints), then read the index handle
    pos, values = 0, []
    while len(values) < 4:
        value = shift = 0
        while True:
            b = footer[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        values.append(value)
    meta_offset = values[0]
    return 0, meta_offset - 5  # the data block and its 5-byte trailer come first


# --- the reader against TensorFlow ----------------------------------------------------


@pytest.mark.parametrize("fixture", GPT2_FIXTURES + ["dtypes"])
def test_reader_matches_tensorflow(fixture):
    meta, values = reference(fixture)
    ckpt = TFCheckpoint(FIXTURES / fixture / "model.ckpt")
    assert sorted(ckpt.names()) == sorted(meta)
    for name, info in meta.items():
        assert ckpt.shape(name) == tuple(info["shape"]), name
        if info["dtype"] == "string" or name == "partitioned":
            continue  # refused, see test_unsupported_tensors
        assert ckpt.dtype(name) == TORCH_DTYPES[info["dtype"]], name
        tensor = ckpt.read(name)
        assert tensor.dtype == TORCH_DTYPES[info["dtype"]]
        assert tuple(tensor.shape) == tuple(info["shape"])
        got, want = as_numpy(tensor), values[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name  # bit-exact, NaNs and -0.0 included


def test_each_read_is_a_tensor_of_its_own():
    """The data is mapped, but read() without a conversion copies: editing what one
    read gave changes neither another read nor the next one (nor its crc32c check)."""
    ckpt = TFCheckpoint(FIXTURES / "tiny" / "model.ckpt")
    a, b = ckpt.read("model/wte"), ckpt.read("model/wte")
    want = b.clone()
    a.fill_(7.0)
    assert torch.equal(b, want) and torch.equal(ckpt.read("model/wte"), want)


def test_names_are_in_tensorflow_key_order():
    meta, _ = reference("deep")
    ckpt = TFCheckpoint(FIXTURES / "deep" / "model.ckpt")
    assert ckpt.names() == sorted(meta, key=lambda n: n.encode())
    # h1/, h10/, h11/, h2/: keys that share long prefixes across restart points
    assert ckpt.names().index("model/h10/attn/c_attn/b") < ckpt.names().index("model/h2/ln_1/b")


def test_deep_fixture_spans_many_restart_points():
    """Guards the meaning of the test above: LevelDB restarts every 16 keys."""
    index = (FIXTURES / "deep" / "model.ckpt.index").read_bytes()
    offset, size = first_data_block(index)
    (num_restarts,) = struct.unpack("<I", index[offset + size - 4 : offset + size])
    assert num_restarts >= 9


def test_unsupported_tensors():
    ckpt = TFCheckpoint(FIXTURES / "dtypes" / "model.ckpt")
    with pytest.raises(GPT2Error, match=r"'string' has dtype string.*not support"):
        ckpt.read("string")
    with pytest.raises(GPT2Error, match=r"'partitioned' is partitioned into slices"):
        ckpt.read("partitioned")
    with pytest.raises(GPT2Error, match=r"no tensor named 'nope'"):
        ckpt.read("nope")


def test_sharded_checkpoint_reads_from_both_shards():
    ckpt = TFCheckpoint(FIXTURES / "sharded" / "model.ckpt")
    assert [p.name for p in ckpt.shard_paths] == [
        "model.ckpt.data-00000-of-00002",
        "model.ckpt.data-00001-of-00002",
    ]
    shard_sizes = [p.stat().st_size for p in ckpt.shard_paths]
    assert all(shard_sizes)  # TensorFlow put tensors in both, and the values test reads them all


# --- load_openai: our names and nn.Linear orientation -----------------------------------


def openai_to_ours_by_hand(n_layer: int) -> dict[str, tuple[str, bool]]:
    """OpenAI name -> (our name, whether it is a [1, in, out] weight to squeeze and transpose)."""
    table = {
        "model/wte": ("wte.weight", False),
        "model/wpe": ("wpe.weight", False),
        "model/ln_f/g": ("ln_f.weight", False),
        "model/ln_f/b": ("ln_f.bias", False),
    }
    for i in range(n_layer):
        for tf_sub, ours in [("ln_1", "ln_1"), ("ln_2", "ln_2")]:
            table[f"model/h{i}/{tf_sub}/g"] = (f"h.{i}.{ours}.weight", False)
            table[f"model/h{i}/{tf_sub}/b"] = (f"h.{i}.{ours}.bias", False)
        for tf_sub, ours in [
            ("attn/c_attn", "attn.c_attn"), ("attn/c_proj", "attn.c_proj"),
            ("mlp/c_fc", "mlp.c_fc"), ("mlp/c_proj", "mlp.c_proj"),
        ]:  # fmt: skip
            table[f"model/h{i}/{tf_sub}/w"] = (f"h.{i}.{ours}.weight", True)
            table[f"model/h{i}/{tf_sub}/b"] = (f"h.{i}.{ours}.bias", False)
    return table


@pytest.mark.parametrize("fixture", GPT2_FIXTURES)
def test_load_openai_gives_our_names_and_orientation(fixture):
    hparams = json.loads((FIXTURES / fixture / "hparams.json").read_text())
    _, values = reference(fixture)
    config, state = load_openai(FIXTURES / fixture)
    assert config == GPT2Config(**hparams)
    table = openai_to_ours_by_hand(hparams["n_layer"])
    assert sorted(state) == sorted(ours for ours, _ in table.values())
    for tf_name, (ours, transposed) in table.items():
        want = values[tf_name][0].T if transposed else values[tf_name]
        got = state[ours]
        assert got.dtype == torch.float32 and got.is_contiguous(), ours
        assert np.array_equal(got.numpy(), want), ours
    c = hparams["n_embd"]
    assert state["h.0.mlp.c_fc.weight"].shape == (4 * c, c)  # nn.Linear: (out, in)


def test_openai_state_dict_loads_into_transformers_gpt2():
    """An independent check of the names and the transpose: HF's GPT-2 (Conv1D layers,
    [in, out]) built from our state dict agrees with TensorFlow's values."""
    import transformers
    config, state = load_openai(FIXTURES / "tiny")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_config()))
    hf_state = {ours_to_hf(k): (v.t() if is_transposed(k) else v) for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected
    assert all(k == "lm_head.weight" or k.endswith((".attn.bias", ".masked_bias")) for k in missing)
    _, values = reference("tiny")
    w = hf.transformer.h[1].mlp.c_proj.weight.detach().numpy()
    assert np.array_equal(w, values["model/h1/mlp/c_proj/w"][0])


# --- the Kaggle layout ----------------------------------------------------------------


def released_hparams(folder: Path, size: str) -> None:
    """Give a fixture the hparams.json of a released size (its tensors stay tiny: for
    tests that resolve folders without loading them)."""
    p = PRESETS[size]
    (folder / "hparams.json").write_text(json.dumps(
        {"n_vocab": p.n_vocab, "n_ctx": p.n_ctx, "n_embd": p.n_embd, "n_head": p.n_head,
         "n_layer": p.n_layer}))


def test_kaggle_top_folder(tmp_path):
    top = tmp_path / "gpt2"
    top.mkdir()
    released_hparams(copy_fixture(top, "tiny", "124M"), "124M")
    released_hparams(copy_fixture(top, "deep", "355M"), "355M")
    (top / "README.txt").write_text("not a size\n")
    assert resolve_openai_folder(top, size="124M") == top / "124M"
    assert resolve_openai_folder(top, size="gpt2-medium") == top / "355M"
    assert resolve_openai_folder(top / "355M") == top / "355M"
    with pytest.raises(GPT2Error, match=r"several sizes \(124M, 355M\).*--size"):
        resolve_openai_folder(top)
    with pytest.raises(GPT2Error, match=r"no 774M folder; it holds 124M, 355M"):
        resolve_openai_folder(top, size="774M")
    with pytest.raises(GPT2Error, match=r"unknown GPT-2 size '9B'"):
        resolve_openai_folder(top, size="9B")
    shutil.rmtree(top / "355M")
    assert resolve_openai_folder(top) == top / "124M"  # one size: no need to choose
    # a size folder holding another geometry than its name says is refused, as a
    # folder given directly with --size is (the tiny fixture under the name 355M loaded)
    copy_fixture(top, "deep", "355M")
    with pytest.raises(GPT2Error, match=r"355M: layers/heads/width \(12, .*are not those of "
                       r"355M \(24, 16, 1024\); the folder's name and its hparams.json disagree"):
        load_openai(top, size="355M")
    config, state = load_openai(top / "355M")
    assert config.n_layer == 12 and len(state) == len(expected_shapes(config))


# --- broken downloads -----------------------------------------------------------------


def test_truncated_shard(tmp_path):
    folder = copy_fixture(tmp_path, "tiny")
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-10])
    message = r"data-00000-of-00001: tensor '.*' ends at byte .* past the end .*truncated download"
    with pytest.raises(GPT2Error, match=message):
        load_openai(folder)


def test_flipped_byte_in_tensor_data(tmp_path):
    folder = copy_fixture(tmp_path, "tiny", "124M")
    data = folder / "model.ckpt.data-00000-of-00001"
    flip_byte(data, data.stat().st_size // 2)
    message = r"data-00000-of-00001: tensor 'model/.*' fails its crc32c check; corrupted download"
    with pytest.raises(GPT2Error, match=message + r"\? re-download with `gpt2 download 124M`"):
        load_openai(folder)


def test_flipped_byte_in_index(tmp_path):
    folder = copy_fixture(tmp_path, "tiny")
    flip_byte(folder / "model.ckpt.index", 40)  # inside the data block's keys and values
    message = r"model.ckpt.index: index block at byte 0 fails its crc32c check; corrupted"
    with pytest.raises(GPT2Error, match=message):
        TFCheckpoint(folder / "model.ckpt")


def test_bad_magic(tmp_path):
    folder = copy_fixture(tmp_path, "tiny")
    index = folder / "model.ckpt.index"
    flip_byte(index, index.stat().st_size - 1)
    with pytest.raises(GPT2Error, match=r"model.ckpt.index: bad magic number"):
        TFCheckpoint(folder / "model.ckpt")
    index.write_bytes(b"\0" * 10)
    with pytest.raises(GPT2Error, match=r"too short"):
        TFCheckpoint(folder / "model.ckpt")


def test_compressed_index_block_is_refused(tmp_path):
    folder = copy_fixture(tmp_path, "tiny")
    index = folder / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    offset, size = first_data_block(bytes(data))
    data[offset + size] = 1  # snappy; the block crc covers the type byte, so fix it up
    crc = masked_crc(bytes(data[offset : offset + size + 1]))
    data[offset + size + 1 : offset + size + 5] = struct.pack("<I", crc)
    index.write_bytes(bytes(data))
    with pytest.raises(GPT2Error, match=r"is compressed \(type 1\); only uncompressed"):
        TFCheckpoint(folder / "model.ckpt")


def test_missing_files(tmp_path):
    folder = copy_fixture(tmp_path, "sharded")
    (folder / "model.ckpt.data-00001-of-00002").unlink()
    with pytest.raises(GPT2Error, match=r"data-00001-of-00002: data shard not found .*2 shard"):
        load_openai(folder)
    (folder / "model.ckpt.index").unlink()
    with pytest.raises(GPT2Error, match=r"model.ckpt.index not found beside hparams.json"):
        load_openai(folder)
    with pytest.raises(GPT2Error, match=r"model.ckpt.index: file not found"):
        TFCheckpoint(folder / "model.ckpt")


def test_folder_that_is_not_gpt2(tmp_path):
    with pytest.raises(GPT2Error, match=r"not an OpenAI GPT-2 folder: expected hparams.json"):
        load_openai(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GPT2Error, match=r"Hugging Face"):
        load_openai(tmp_path)
    with pytest.raises(GPT2Error, match=r"no such folder"):
        load_openai(tmp_path / "absent")


def test_hparams_that_do_not_match_the_weights(tmp_path):
    folder = copy_fixture(tmp_path, "tiny")
    hp = json.loads((folder / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps(hp | {"n_layer": 3}))
    with pytest.raises(GPT2Error, match=r"index: missing tensor 'h.2.ln_1.weight' and 11 more"):
        load_openai(folder)
    (folder / "hparams.json").write_text(json.dumps(hp | {"n_layer": 1}))
    with pytest.raises(GPT2Error, match=r"unexpected tensor 'h\.1\.[^']+' \(12 in all\)"):
        load_openai(folder)
    (folder / "hparams.json").write_text(json.dumps(hp | {"n_ctx": 32}))
    with pytest.raises(GPT2Error, match=r"tensor 'wpe.weight' has shape \[64, 64\], expected "
                       r"\[32, 64\]"):  # fmt: skip
        load_openai(folder)


# --- the name map ---------------------------------------------------------------------


def test_expected_shapes_count_124m_parameters():
    shapes = expected_shapes(GPT2Config.preset("124M"))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808


def test_names_match_transformers_gpt2():
    """HF's own GPT2LMHeadModel is the oracle for the HF names and the Conv1D orientation."""
    import transformers
    config = GPT2Config(n_vocab=97, n_ctx=16, n_embd=12, n_head=3, n_layer=3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_config()))
    ours = expected_shapes(config)
    seen = {}
    for hf_name, tensor in hf.state_dict().items():
        name = hf_to_ours(hf_name)
        if name is None:
            assert hf_name == "lm_head.weight" or ".attn." in hf_name
            continue
        assert ours_to_hf(name) == hf_name
        shape = tuple(tensor.shape)
        seen[name] = shape[::-1] if is_transposed(name) else shape
    assert seen == ours
    assert hf_to_ours("h.0.attn.masked_bias") is None and hf_to_ours("wte.weight") == "wte.weight"


def test_unknown_names_are_refused():
    for bad in ["model/h0/ln_1/w", "model/h0/attn/c_attn/g", "model/foo", "model/h0/mlp/c_x/w"]:
        with pytest.raises(GPT2Error, match="not a GPT-2 parameter"):
            openai_to_ours(bad)
    with pytest.raises(GPT2Error, match="not a GPT-2 parameter"):
        hf_to_ours("transformer.h.0.attn.c_attn.scale")
    with pytest.raises(GPT2Error, match="not a GPT-2 parameter"):
        ours_to_hf("lm_head.weight")


def test_check_state_dict():
    config = GPT2Config(n_vocab=10, n_ctx=4, n_embd=8, n_head=2, n_layer=1)
    state = {k: torch.zeros(s) for k, s in expected_shapes(config).items()}
    check_state_dict(state, config, "here.bin")
    missing = {k: v for k, v in state.items() if k != "h.0.ln_2.bias"}
    with pytest.raises(GPT2Error, match=r"here.bin: missing tensor 'h.0.ln_2.bias' \(expected "
                       r"shape \[8\]"):  # fmt: skip
        check_state_dict(missing, config, "here.bin")
    wrong = state | {"h.0.mlp.c_fc.weight": torch.zeros(8, 32)}
    with pytest.raises(GPT2Error, match=r"here.bin: tensor 'h.0.mlp.c_fc.weight' has shape "
                       r"\[8, 32\], expected \[32, 8\]"):  # fmt: skip
        check_state_dict(wrong, config, "here.bin")
    extra = state | {"h.1.ln_1.weight": torch.zeros(8)}
    with pytest.raises(GPT2Error, match=r"unexpected tensor 'h.1.ln_1.weight'"):
        check_state_dict(extra, config, "here.bin")


# --- memory ---------------------------------------------------------------------------


def write_zero_bundle(prefix: Path, shapes: dict[str, tuple[int, ...]], *,
                      overlap: bool = False) -> int:
    """A float32 bundle of zeros, written from the LevelDB and tensor_bundle specs. The
    memory and overlap tests use it: the format itself is checked against TensorFlow's
    own files above. overlap: every tensor's bytes start at offset 0."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    def field(number: int, payload: bytes) -> bytes:  # length-delimited
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    zeros = bytes(1 << 20)
    entries, offset = [(b"", varint(1 << 3) + varint(1) + field(3, varint(1 << 3) + varint(1)))], 0
    length = 0
    for name in sorted(shapes, key=str.encode):
        size = 4 * int(np.prod(shapes[name]))
        crc = 0
        for start in range(0, size, len(zeros)):
            crc = google_crc32c.extend(crc, zeros[: min(len(zeros), size - start)])
        masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        dims = b"".join(field(2, varint(1 << 3) + varint(d)) for d in shapes[name])
        entry = varint(1 << 3) + varint(1) + field(2, dims)  # dtype float32, shape
        entry += varint(4 << 3) + varint(offset) + varint(5 << 3) + varint(size)
        entry += bytes([6 << 3 | 5]) + struct.pack("<I", masked)
        entries.append((name.encode(), entry))
        length = max(length, offset + size)
        offset = 0 if overlap else offset + size

    def block(items: list[tuple[bytes, bytes]]) -> bytes:
        body, restarts = bytearray(), []
        for i, (key, value) in enumerate(items):
            if i % 16 == 0:
                restarts.append(len(body))
            body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
        restarts = restarts or [0]  # an empty block still has one restart point
        body += struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))
        return bytes(body) + b"\0" + struct.pack("<I", masked_crc(bytes(body) + b"\0"))

    data_block = block(entries)
    meta_block = block([])
    index_block = block([(entries[-1][0], varint(0) + varint(len(data_block) - 5))])
    handles = varint(len(data_block)) + varint(len(meta_block) - 5)
    handles += varint(len(data_block) + len(meta_block)) + varint(len(index_block) - 5)
    footer = handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(data_block + meta_block + index_block + footer)
    with open(f"{prefix}.data-00000-of-00001", "wb") as f:
        # zeros written out, not a sparse file: a mapped hole is not what a download is
        # (reading one cost 0.13x the weights more resident memory)
        for start in range(0, length, 1 << 24):
            f.write(bytes(min(1 << 24, length - start)))
    return length


def test_tensors_that_overlap_in_the_data_are_refused(tmp_path):
    """Two entries over the same bytes: mapped, they would be one memory."""
    write_zero_bundle(tmp_path / "model.ckpt", {"model/a": (4, 8), "model/b": (8,)},
                      overlap=True)
    with pytest.raises(GPT2Error, match="'model/a' and 'model/b' overlap in .*data-00000"):
        TFCheckpoint(tmp_path / "model.ckpt")


@pytest.mark.slow
def test_loading_124m_grows_memory_by_the_weights_and_no_more(tmp_path):
    """The data file is mapped: every page is read once for its crc32c, the tensors kept
    as stored stay the file's pages, and those under each transposed weight are handed
    back once it is copied (reading into memory first grew it by 1.26x the weights)."""
    config = GPT2Config.preset("124M")
    ours = expected_shapes(config)
    openai_shapes = {}
    for tf_name, (name, transposed) in openai_to_ours_by_hand(config.n_layer).items():
        out_features, *rest = ours[name]
        openai_shapes[tf_name] = (1, rest[0], out_features) if transposed else ours[name]
    weight_bytes = write_zero_bundle(tmp_path / "model.ckpt", openai_shapes)
    assert weight_bytes == 124_439_808 * 4
    (tmp_path / "hparams.json").write_text(json.dumps(config.to_hparams()))
    script = (
        "import resource, sys\n"
        "from gpt2.weights.openai import load_openai\n"
        "page = resource.getpagesize()\n"
        "before = int(open('/proc/self/statm').read().split()[1]) * page\n"
        "config, state = load_openai(sys.argv[1])\n"
        # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report pytest's own size
        "peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status')\n"
        "        if l.startswith('VmHWM:')][0]\n"
        "print(before, peak, sum(t.numel() * t.element_size() for t in state.values()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    before, peak, loaded = map(int, out.split())
    assert loaded == weight_bytes
    assert peak - before < 1.1 * weight_bytes, f"grew {(peak - before) / weight_bytes:.2f}x"
