"""`gpt2 prepare`: streamed tokenization into train.bin / val.bin / meta.json.

The oracle for the ids is tiktoken's GPT-2 encoding of each whole file: the
chunked, streamed tokenization must give exactly those ids, split by the
documented rule (the last ceil(f * n) tokens of each document go to val).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpt2.errors import GPT2Error
from gpt2.train.data import open_tokens, prepare

EOT = 50256


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def two_docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    text = _topics_text()
    a = folder / "a.txt"
    # odd corners for the chunker: runs of blank lines, spaces before newlines, unicode
    a.write_text(text[:60_000] + "\n\n\n  \n\u00e9t\u00e9 \u2014 caf\u00e9\n\xa0\nend",
                 encoding="utf-8")
    b = folder / "b.txt"
    b.write_text(text[60_000:90_000], encoding="utf-8")
    return a, b


def _expected_split(ids: list[int], fraction: float) -> tuple[list[int], list[int]]:
    n_val = min(max(1, math.ceil(len(ids) * fraction)), len(ids) - 1)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


@pytest.mark.parametrize("append_eot", [False, True])
def test_streamed_ids_and_split_match_tiktoken(two_docs, tmp_path, tiktoken_gpt2, append_eot):
    a, b = two_docs
    # tiny chunks force hundreds of cuts, so a wrong cut would change the ids
    meta = prepare([a, b], out=tmp_path, val_fraction=0.05, append_eot=append_eot,
                   progress=False, chunk_bytes=700)
    ta, va = _expected_split(tiktoken_gpt2.encode_ordinary(a.read_text("utf-8")), 0.05)
    tb, vb = _expected_split(tiktoken_gpt2.encode_ordinary(b.read_text("utf-8")), 0.05)
    if append_eot:
        train, val = ta + [EOT] + tb + [EOT], va + [EOT] + vb + [EOT]
    else:
        train, val = ta + [EOT] + tb, va + [EOT] + vb
    data = open_tokens(tmp_path)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert data.train.tolist() == train
    assert data.val.tolist() == val
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["val_fraction"] == 0.05
    assert [s["bytes"] for s in on_disk["sources"]] == [a.stat().st_size, b.stat().st_size]
    assert on_disk["vocab_sha256"] == on_disk["vocab_sha256"].lower()
    assert len(on_disk["vocab_sha256"]) == 64


def test_vocab_hash_names_the_vocabulary(tmp_path, two_docs, gpt2_vocab_dir):
    # the same vocabulary given as a folder must hash the same as the built-in one
    a, _ = two_docs
    m1 = prepare([a], out=tmp_path / "std", progress=False)
    m2 = prepare([a], out=tmp_path / "dir", vocab=gpt2_vocab_dir, progress=False)
    assert m1["vocab_sha256"] == m2["vocab_sha256"]
    assert (tmp_path / "dir" / "vocab" / "encoder.json").is_file()
    assert open_tokens(tmp_path / "dir").tokenizer().encode("hello world") == [31373, 995]


def test_rerun_replaces_files_atomically(tmp_path, two_docs):
    a, b = two_docs
    prepare([a, b], out=tmp_path, progress=False)
    prepare([b], out=tmp_path, progress=False)
    data = open_tokens(tmp_path)
    assert len(data.meta["sources"]) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_prints_counts(run_cli, tmp_path, two_docs):
    a, _ = two_docs
    r = run_cli("prepare", a, "--out", tmp_path / "d", "--val-fraction", "0.1")
    assert r.code == 0, r.err
    assert "train tokens" in r.out and "MB/s" in r.err


def test_non_utf8_names_file_and_byte(tmp_path, run_cli):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\nworld\n" * 10 + b"caf\xe9\n")
    r = run_cli("prepare", bad, "--out", tmp_path / "out")
    assert r.code == 1
    assert f"{bad}: not UTF-8 text (bad byte at offset 123)" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("encoding, expect", [
    ("utf-16-le", "a NUL byte at offset 1, so not text"),  # no BOM: valid UTF-8 bytes
    ("utf-16", "not UTF-8 text (bad byte at offset 0); convert it to UTF-8 first "
                  "(e.g. iconv -f utf-16"),  # with its byte-order mark
])
def test_utf16_text_is_refused_with_a_hint(tmp_path, run_cli, encoding, expect):
    bad = tmp_path / "windows.txt"
    bad.write_bytes("hello world\n".encode(encoding) * 20)
    r = run_cli("prepare", bad, "--out", tmp_path / "out")
    assert r.code == 1 and expect in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_nul_bytes_are_not_text(tmp_path, run_cli):
    bad = tmp_path / "zeros.txt"
    bad.write_bytes(b"some text\n" * 50 + bytes(1000))
    r = run_cli("prepare", bad, "--out", tmp_path / "out")
    assert r.code == 1 and f"{bad}: a NUL byte at offset 500, so not text" in r.err, r.err


@pytest.mark.parametrize("case", ["missing", "empty", "folder", "unwritable"])
def test_bad_inputs_are_one_line_errors(tmp_path, run_cli, case):
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    out = tmp_path / "out"
    if case == "missing":
        args, expect = [tmp_path / "nope.txt"], "file not found"
    elif case == "empty":
        (tmp_path / "e.txt").write_text("")
        args, expect = [tmp_path / "e.txt"], "no text to train on"
    elif case == "folder":
        args, expect = [tmp_path], "is a folder"
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"  # a folder inside a file: cannot exist, even for root
        args, expect = [text], "cannot write the token files here"
    r = run_cli("prepare", *args, "--out", out)
    assert r.code == 1 and expect in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["not utf-8", "empty", "bad second file"])
def test_a_failed_prepare_leaves_no_folder_behind(tmp_path, run_cli, case):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    files = {"not utf-8": [latin1], "empty": [empty], "bad second file": [good, latin1]}[case]
    r = run_cli("prepare", *files, "--out", tmp_path / "new" / "data", "-q")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "new").exists()  # nor the parent it made for it
    # a folder that was there keeps what it held, and gets nothing new
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert run_cli("prepare", *files, "--out", kept, "-q").code == 1
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


# 1 file of 80 KB of ids: its scratch file fails; 2 files of 40 KB: train.bin fails
@pytest.mark.parametrize(("limit_kb", "files"), [(8, 1), (60, 2)])
def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path, limit_kb, files):
    """Files may not grow past `limit_kb` (RLIMIT_FSIZE: writes fail as on a full disk,
    with EFBIG). A short write to the scratch file once went unseen and ended in a
    traceback (mmap length is greater than file size)."""
    import resource

    paths = []
    for k in range(files):
        paths.append(tmp_path / f"text{k}.txt")
        paths[-1].write_text("The quick brown fox jumps over the lazy dog. " * (4000 // files))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, resource.RLIM_INFINITY))

    out = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "gpt2", "prepare", *map(str, paths), "--out",
                        str(out), "--val-fraction", "0", "-q"], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (f"gpt2 prepare: error: {out}: writing the token files failed "
                                "(File too large); free some space or choose another --out")
    assert not out.exists()


def test_reader_rejects_incomplete_folders(tmp_path, two_docs):
    with pytest.raises(GPT2Error, match="no such data folder"):
        open_tokens(tmp_path / "none")
    with pytest.raises(GPT2Error, match="is a file, not a data folder; make one from it with "
                       "`gpt2 prepare"):
        open_tokens(two_docs[1])
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(GPT2Error, match="no meta.json"):
        open_tokens(tmp_path / "empty")
    prepare([two_docs[1]], out=tmp_path / "d", progress=False)
    with open(tmp_path / "d" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(GPT2Error, match="incomplete"):
        open_tokens(tmp_path / "d")


def test_larger_than_chunk_file_streams_with_flat_memory(tmp_path):
    # ~3 MB read in 128 KB chunks: peak memory must not grow with the file's size
    script = f"""
import resource, sys
from pathlib import Path
line = "The quick brown fox jumps over the lazy dog." * 20 + "\\n"
p = Path({str(tmp_path)!r}) / "big.txt"
with open(p, "w") as f:
    for _ in range(3_000_000 // len(line)):
        f.write(line)
from gpt2.train.data import prepare
small = p.parent / "small.txt"
small.write_text(line * 50)
prepare([small], out=p.parent / "warm", progress=False)  # imports, vocabulary, word cache
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
meta = prepare([p], out=p.parent / "out", progress=False, chunk_bytes=1 << 17)
grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(meta["train_tokens"] + meta["val_tokens"], grew_mb)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    n_tokens, grew_mb = int(out[0]), float(out[1])
    lines = 3_000_000 // 881
    assert n_tokens == lines * _tokens_per_line()  # one document: no separators
    assert grew_mb < 20, f"memory grew {grew_mb:.0f} MB while streaming a 3 MB file"


def _tokens_per_line() -> int:
    return 201


def test_tokens_per_line_of_the_big_file(tiktoken_gpt2):
    line = "The quick brown fox jumps over the lazy dog." * 20 + "\n"
    assert len(line) == 881
    assert len(tiktoken_gpt2.encode_ordinary(line * 3)) == 3 * _tokens_per_line()


def test_a_single_path_is_one_file(tmp_path, two_docs):
    a, _ = two_docs
    one = prepare(str(a), out=tmp_path / "str", progress=False)
    listed = prepare([a], out=tmp_path / "list", progress=False)
    assert one["train_tokens"] == listed["train_tokens"] > 0
    assert prepare(a, out=tmp_path / "pathlike", progress=False)["train_tokens"] == \
        listed["train_tokens"]


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk_bytes": 0}, "chunk_bytes must be an integer >= 1"),
    ({"chunk_bytes": 1.5}, "chunk_bytes must be an integer >= 1"),
    ({"val_fraction": "0.1"}, "--val-fraction must be a number in [0, 1)"),
    ({"val_fraction": math.nan}, "--val-fraction must be a number in [0, 1)"),
    ({"files": None}, "files must be a path or a list of paths"),
    ({"files": [3]}, "files must be a path or a list of paths"),
    ({"out": ""}, "--out must name a folder for the token files, got ''"),  # (it wrote into .)
])
def test_bad_arguments_are_gpt2_errors(tmp_path, two_docs, kwargs, message):
    kwargs = {"files": [two_docs[0]], "out": tmp_path / "out", **kwargs}
    with pytest.raises(GPT2Error, match=re.escape(message)):
        prepare(progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fail_at", ["meta", "vocab", "second_bin"])
def test_an_interrupted_replacement_puts_the_old_set_back(tmp_path, two_docs, monkeypatch,
                                                          gpt2_vocab_dir, fail_at):
    """Ctrl-C (or a full disk) while a new set replaces an old one, after the old
    meta.json and .bin files have gone from their places: the old set comes back, byte
    for byte, with nothing hidden left over."""
    import gpt2.train.data as data_module

    a, b = two_docs
    prepare([a], out=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if fail_at == "meta":
        def fail(path, text):
            raise KeyboardInterrupt
        monkeypatch.setattr(data_module, "atomic_write_text", fail)
    elif fail_at == "vocab":
        def fail(self, folder, **kw):
            raise KeyboardInterrupt
        monkeypatch.setattr("gpt2.tokenizer.Tokenizer.save_pretrained", fail)
    else:
        real, renamed = os.replace, []

        def fail(src, dst):  # the first new .bin goes in, then the second fails
            if str(dst).endswith(".bin"):
                renamed.append(dst)
                if len(renamed) == 2:
                    raise OSError(28, "No space left on device")
            return real(src, dst)
        monkeypatch.setattr(os, "replace", fail)
    vocab = gpt2_vocab_dir if fail_at == "vocab" else None
    with pytest.raises((KeyboardInterrupt, GPT2Error)):
        prepare([a, b], out=tmp_path, progress=False, vocab=vocab)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(after) == sorted(before)
    assert after == before
    assert open_tokens(tmp_path).meta["sources"][0]["path"] == str(a.resolve())


def test_a_second_prepare_into_the_same_folder_stops(tmp_path, two_docs, run_cli):
    from gpt2._io import exclusive

    a, _ = two_docs
    prepare([a], out=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with exclusive(tmp_path / ".lock", "busy"):
        r = run_cli("prepare", str(a), "--out", str(tmp_path), "-q")
        assert r.code == 1 and r.err.count("\n") == 1, r.err
        assert "another `gpt2 prepare` is writing there now" in r.err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
