"""`gpt2 tokenize`: ids, JSON, the explain view, --decode, and one-line errors on bad input.

Expected ids come from tiktoken (conftest's `tiktoken_gpt2`), not from our tokenizer.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2 import tokenizer as tokenizer_module

TEXT = "Machine learning is amazing: DON'T panic, it’s 42 😀\n"


class FakeStdin:
    """Stands in for sys.stdin: bytes on .buffer, never a terminal."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def ids_line(ids: list[int]) -> str:
    return " ".join(map(str, ids)) + "\n"


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code != 0
    assert result.out == ""
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("gpt2 tokenize: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- encoding


def test_ids(run_cli, tiktoken_gpt2):
    r = run_cli("tokenize", "hello world")
    assert (r.code, r.out, r.err) == (0, "31373 995\n", "")
    r = run_cli("tokenize", "hello", "world")  # arguments are joined with spaces
    assert r.out == "31373 995\n"
    r = run_cli("tokenize", TEXT)
    assert r.out == ids_line(tiktoken_gpt2.encode_ordinary(TEXT))


def test_json(run_cli, tiktoken_gpt2):
    r = run_cli("tokenize", "--json", TEXT)
    data = json.loads(r.out)
    ids = tiktoken_gpt2.encode_ordinary(TEXT)
    assert data["ids"] == ids
    assert data["tokens"] == [tiktoken_gpt2.decode([i]) for i in ids]
    assert data["tokens"][:2] == ["Machine", " learning"]


def test_stdin_and_file(run_cli, tiktoken_gpt2, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", FakeStdin(TEXT.encode()))
    r = run_cli("tokenize", "-")
    assert r.out == ids_line(tiktoken_gpt2.encode_ordinary(TEXT))  # the final newline counts
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"hello world"))
    assert run_cli("tokenize").out == "31373 995\n"  # no TEXT: stdin too

    path = tmp_path / "t.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    r = run_cli("tokenize", "--file", path)
    assert r.out == ids_line(tiktoken_gpt2.encode_ordinary(TEXT * 3))


def test_special_tokens(run_cli, tiktoken_gpt2):
    text = "a<|endoftext|>b"
    assert run_cli("tokenize", text).out == ids_line(tiktoken_gpt2.encode_ordinary(text))
    r = run_cli("tokenize", "--allow-special", text)
    assert r.out == ids_line(tiktoken_gpt2.encode(text, allowed_special="all"))
    assert "50256" in r.out


def test_show(run_cli):
    r = run_cli("tokenize", "--show", "Machine learning")
    assert r.code == 0
    assert "word 2 ' learning'" in r.out
    assert "merge  i + n" in r.out and "rank     3" in r.out  # "i n" is line 5 of vocab.bpe
    assert "Ġlearning=4673" in r.out
    r = run_cli("tokenize", "--show", "--json", "Machine learning")
    data = json.loads(r.out)
    assert data["ids"] == [37573, 4673]
    assert [w["text"] for w in data["words"]] == ["Machine", " learning"]
    assert data["words"][1]["steps"][0] == {
        "left": "i", "right": "n", "rank": 3, "pieces": ["Ġ", "l", "e", "a", "r", "n", "in", "g"]}


def test_vocab_folder(run_cli, tiktoken_gpt2, gpt2_vocab_dir, tmp_path):
    r = run_cli("tokenize", "--vocab", gpt2_vocab_dir, TEXT)
    assert r.out == ids_line(tiktoken_gpt2.encode_ordinary(TEXT))
    # the Hugging Face layout: vocab.json + merges.txt
    hf = tmp_path / "hf"
    hf.mkdir()
    encoder = json.loads((gpt2_vocab_dir / "encoder.json").read_text("utf-8"))
    (hf / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), "utf-8")
    shutil.copy(gpt2_vocab_dir / "vocab.bpe", hf / "merges.txt")
    assert run_cli("tokenize", "--vocab", hf, TEXT).out == r.out


# --------------------------------------------------------------------------- decoding


def test_decode(run_cli, tiktoken_gpt2, monkeypatch):
    ids = tiktoken_gpt2.encode_ordinary(TEXT)
    r = run_cli("tokenize", "--decode", *map(str, ids))
    assert (r.code, r.out) == (0, TEXT)  # the text exactly: no newline added when piped
    assert run_cli("tokenize", "--decode", "31373,", "995").out == "hello world"
    monkeypatch.setattr(sys, "stdin", FakeStdin(json.dumps(ids).encode()))  # a JSON list
    assert run_cli("tokenize", "--decode").out == TEXT
    r = run_cli("tokenize", "--decode", "--json", "31373", "995")
    assert json.loads(r.out) == {"ids": [31373, 995], "text": "hello world"}
    # a piece of a character decodes to U+FFFD, as tiktoken does
    piece = tiktoken_gpt2.encode_ordinary("😀")[:1]
    assert run_cli("tokenize", "--decode", str(piece[0])).out == tiktoken_gpt2.decode(piece)
    for nothing in ("", "  "):  # no ids: no text (it was an IndexError)
        assert (run_cli("tokenize", "--decode", nothing).code,
                run_cli("tokenize", "--decode", nothing).out) == (0, "")


# --------------------------------------------------------------------------- bad input


def test_bad_decode_input(run_cli):
    assert_one_line_error(run_cli("tokenize", "--decode", "31373", "hello"), "'hello'",
                          "not a token id")
    assert_one_line_error(run_cli("tokenize", "--decode", "50257"), "50257", "out of range")
    # every id of a space-separated list, not only the last
    assert_one_line_error(run_cli("tokenize", "--decode", "1 99999 2"), "99999", "out of range")
    assert_one_line_error(run_cli("tokenize", "--decode", "--", "-1"), "-1", "out of range")
    assert_one_line_error(run_cli("tokenize", "--decode", "1.5"), "not a token id")
    # an id left out between commas is not a separator; int() would take these three
    assert_one_line_error(run_cli("tokenize", "--decode", "31373,,995"), "item 2",
                          "empty")
    for word in ("1_0", "+5", "\u0663"):
        assert_one_line_error(run_cli("tokenize", "--decode", word), "not a token id")


def test_bad_files(run_cli, tmp_path):
    assert_one_line_error(run_cli("tokenize", "--file", tmp_path / "missing.txt"),
                          "missing.txt", "No such file")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert_one_line_error(run_cli("tokenize", "--file", bad), "latin1.txt",
                          "not UTF-8", "offset 3")
    assert_one_line_error(run_cli("tokenize", "--file", tmp_path), "cannot read")
    assert_one_line_error(run_cli("tokenize", "--file", bad, "text"), "not both")


def test_non_utf8_stdin(run_cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"ok \xff"))
    assert_one_line_error(run_cli("tokenize", "-"), "stdin", "not UTF-8")


def test_bad_vocabularies(run_cli, gpt2_vocab_dir, tmp_path, monkeypatch):
    assert_one_line_error(run_cli("tokenize", "--vocab", tmp_path, "hi"), "no vocabulary in")
    assert_one_line_error(run_cli("tokenize", "--vocab", tmp_path / "nope", "hi"),
                          "does not exist")
    folder = tmp_path / "v"
    folder.mkdir()
    shutil.copy(gpt2_vocab_dir / "encoder.json", folder / "encoder.json")
    assert_one_line_error(run_cli("tokenize", "--vocab", folder, "hi"), "no vocab.bpe")
    lines = (gpt2_vocab_dir / "vocab.bpe").read_text("utf-8").split("\n")
    lines[10] = "Ġ t h"
    (folder / "vocab.bpe").write_text("\n".join(lines), "utf-8")
    assert_one_line_error(run_cli("tokenize", "--vocab", folder, "hi"), "vocab.bpe:11",
                          "malformed merge")

    # the standard vocabulary with a wrong hash
    damaged = tmp_path / "data"
    damaged.mkdir()
    shutil.copy(gpt2_vocab_dir / "vocab.bpe", damaged / "vocab.bpe")
    encoder = (gpt2_vocab_dir / "encoder.json").read_bytes()
    (damaged / "encoder.json").write_bytes(encoder.replace(b'"!": 0', b'"!":0'))
    monkeypatch.setattr(tokenizer_module, "_standard_vocab_dir", lambda: damaged)
    assert_one_line_error(run_cli("tokenize", "hi"), "encoder.json has sha256", "reinstall")


def test_flag_conflicts(run_cli):
    assert_one_line_error(run_cli("tokenize", "--decode", "--show", "1"), "--decode")


# --------------------------------------------------------------------------- a real process


def run_process(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2", "tokenize", *args], input=stdin,
                          capture_output=True, timeout=120, cwd=Path(__file__).parent)


def test_process_round_trip_and_error(tiktoken_gpt2):
    text = TEXT + "  trailing spaces  \n\n"
    encoded = run_process("-", stdin=text.encode())
    assert encoded.returncode == 0, encoded.stderr
    assert encoded.stdout.decode() == ids_line(tiktoken_gpt2.encode_ordinary(text))
    decoded = run_process("--decode", stdin=encoded.stdout)
    assert decoded.stdout == text.encode()  # byte for byte

    failed = run_process("--decode", "12", "x")
    assert failed.returncode == 1
    assert failed.stdout == b""
    err = failed.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gpt2 tokenize: error: --decode: 'x' is not a token id")


def test_help(capsys):
    from gpt2.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--decode", "--json", "--show", "--vocab", "--allow-special", "--file"):
        assert option in out
