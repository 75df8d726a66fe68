"""Token files for training: `gpt2 prepare` writes them, the trainer samples from them.

A prepared folder holds

    train.bin   the training tokens, uint16, back to back (np.memmap reads them lazily)
    val.bin     the validation tokens, same format
    meta.json   token counts, dtype, the vocabulary's sha256, the sources, the split rule
    vocab/      the vocabulary files, only when a custom one was used (--vocab)

Documents. Every input file is one document. Inside each split, consecutive
documents are separated by <|endoftext|>; with `append_eot` every document also
ends with one (so the last one does too), which is how GPT-2's WebText was laid out.

The validation split is deterministic: the last ceil(val_fraction * n) tokens of
each document of n tokens (at least one token, at most n - 1; none when
val_fraction is 0 or n < 2) go to val.bin, the rest to train.bin. Every document
of two tokens or more is thus represented in both splits, and the same files
always give the same split.

Streaming. A file is read in chunks of a few MB; each chunk is cut just after a
newline that has a non-space on both sides, where GPT-2's pre-tokenizer can
never join the two sides, so chunked tokenization gives exactly the ids of
tokenizing the whole file (a file with no such newline is held in memory until
one comes). A document's ids go to a scratch file, then are copied into the two
splits, so memory stays flat for files of any size.

Writing is atomic: the new files are written under temporary names; then the old
set is moved to hidden names (meta.json first), train.bin/val.bin are renamed
into place, and meta.json (with the byte counts a reader checks) comes last. An
error or a signal Python sees (Ctrl-C, SIGTERM, a full disk) puts the old set
back; only SIGKILL at that moment can leave a folder without meta.json (which
readers report), never a mixture that looks valid. Two `prepare`s into one
folder at once: the second stops (gpt2._io.exclusive).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import torch

from gpt2._io import atomic_open, atomic_write_text, decode_utf8, exclusive
from gpt2.errors import GPT2Error
from gpt2.train._tidy import undone_on_error

DTYPE = np.uint16  # GPT-2's 50257 ids fit; a vocabulary above 65536 would need uint32
FORMAT = "gpt2-tokens"
VERSION = 1
SPLITS = ("train", "val")
FINGERPRINT = ("train_tokens", "val_tokens", "n_vocab", "vocab_sha256")  # meta.json keys

# Just after a newline with a non-space on both sides: the pre-tokenizer makes that
# newline a word of its own and no word crosses it (see gpt2.tokenizer._SAFE_CUT).
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")
_COPY_TOKENS = 1 << 24  # tokens copied per slice from the scratch file into a split


# --- preparing -----------------------------------------------------------------------------


def prepare(
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    out: str | os.PathLike,
    val_fraction: float = 0.005,
    append_eot: bool = False,
    vocab: str | os.PathLike | None = None,
    progress: bool = True,
    chunk_bytes: int = 4 << 20,
) -> dict:
    """Tokenize text files into `out`/train.bin, val.bin and meta.json; return the meta.

    >>> meta = prepare(["book.txt"], out="data/book")  # doctest: +SKIP
    >>> meta["train_tokens"], meta["val_tokens"]  # doctest: +SKIP
    (120931, 612)
    """
    from gpt2.tokenizer import Tokenizer

    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or \
            not 0.0 <= val_fraction < 1.0:  # also False for NaN
        raise GPT2Error(f"--val-fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise GPT2Error(f"chunk_bytes must be an integer >= 1, got {chunk_bytes!r}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise GPT2Error(f"--out must name a folder for the token files, got {out!r}")
    if isinstance(files, (str, os.PathLike)):
        files = [files]  # one file, not a list of its name's characters
    bad = [files] if not isinstance(files, Sequence) else \
        [f for f in files if not isinstance(f, (str, os.PathLike))]
    if bad:
        raise GPT2Error(f"files must be a path or a list of paths to text files, got "
                        f"{bad[0]!r}")
    paths = [_check_input(Path(f)) for f in files]
    if not paths:
        raise GPT2Error("no input files given; name one or more UTF-8 text files")
    tok = Tokenizer.from_pretrained(vocab) if vocab is not None else Tokenizer.from_pretrained()
    if tok.n_vocab > np.iinfo(DTYPE).max + 1:
        raise GPT2Error(f"vocabulary has {tok.n_vocab} tokens; uint16 token files hold 65536")
    out = Path(out)
    # a failure (text that is not UTF-8, empty files, Ctrl-C) takes away what this call
    # added: a folder it made is removed again, one that was there keeps what it held
    with undone_on_error(out, names=[*(f"{s}.bin" for s in SPLITS), "meta.json", "vocab"]):
        _make_out_dir(out)
        with exclusive(out / ".lock", f"--out {out}: another `gpt2 prepare` is writing there "
                       "now; wait for it to end, or choose another --out", where=f"--out {out}"):
            return _write_splits(paths, out, tok, val_fraction=val_fraction,
                                 append_eot=append_eot, vocab=vocab, progress=progress,
                                 chunk_bytes=chunk_bytes)


def _write_splits(paths: list[Path], out: Path, tok, *, val_fraction: float, append_eot: bool,
                  vocab, progress: bool, chunk_bytes: int) -> dict:
    """prepare()'s work once its arguments are checked and `out` exists."""
    from gpt2.train.progress import StatusLine

    total = sum(p.stat().st_size for p in paths)
    bar = StatusLine("prepare", enabled=progress)
    started, done = time.monotonic(), 0
    sources = []
    with contextlib.ExitStack() as stack:
        writers = {s: stack.enter_context(_TokenWriter(out / f"{s}.bin")) for s in SPLITS}
        for path in paths:
            scratch = stack.enter_context(_scratch_file(out))
            n = 0
            for piece, nbytes in _text_pieces(path, chunk_bytes=chunk_bytes):
                ids = np.asarray(tok.encode(piece), dtype=DTYPE)
                with _writing(out):  # (not ndarray.tofile: it missed a short write)
                    scratch.write(ids.tobytes())
                n += ids.size
                done += nbytes
                rate = done / 1e6 / max(time.monotonic() - started, 1e-9)
                bar.show(f"{path.name} {done / 1e6:,.1f}/{total / 1e6:,.1f} MB, {rate:.2f} MB/s")
            with _writing(out):
                scratch.flush()
            n_val = _val_count(n, val_fraction)
            counts = _split_document(scratch, n, n_val, writers, tok.eot_token,
                                     append_eot=append_eot)
            sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size,
                            "tokens": n, "train_tokens": counts[0], "val_tokens": counts[1]})
        if writers["train"].count == 0:
            raise GPT2Error(
                f"no text to train on in {', '.join(str(p) for p in paths)}: the files are empty"
            )
        written = stack.pop_all()  # the new .bin files, whole, not yet in their place
    bar.close()

    vocab_entry = "standard" if vocab is None else "vocab"
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16",
        "train_tokens": writers["train"].count,
        "val_tokens": writers["val"].count,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "vocab": vocab_entry,
        "vocab_sha256": tok.sha256(),
        "val_fraction": val_fraction,
        "append_eot": append_eot,
        "split_rule": "the last ceil(val_fraction * n) tokens of each document of n tokens "
                      "go to val.bin (at most n - 1; none when val_fraction is 0 or n < 2)",
        "sources": sources,
    }
    with written, _old_set_aside(out, ["meta.json", *(f"{s}.bin" for s in SPLITS), "vocab"]):
        written.close()  # the .bin files renamed into place
        if vocab is not None:
            tok.save_pretrained(out / "vocab", layout="openai")
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


@contextlib.contextmanager
def _old_set_aside(out: Path, names: list[str]) -> Iterator[None]:
    """Move the entries `names` of `out` (a set written before) to hidden names while
    the block puts the new ones in place; delete them after it, or put them back if it
    fails (Ctrl-C, a full disk), the first one last."""
    aside: dict[Path, Path] = {}
    try:
        for name in names:
            entry = out / name
            if entry.exists() or entry.is_symlink():
                hidden = out / f".{name}.old-{os.getpid()}"
                os.replace(entry, hidden)
                aside[entry] = hidden
        yield
    except BaseException:
        for entry, hidden in reversed(aside.items()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # (a new vocab/)
            os.replace(hidden, entry)
        raise
    for hidden in aside.values():
        if hidden.is_dir() and not hidden.is_symlink():
            shutil.rmtree(hidden, ignore_errors=True)
        else:
            hidden.unlink(missing_ok=True)


def _check_input(path: Path) -> Path:
    if not path.exists():
        raise GPT2Error(f"{path}: file not found")
    if path.is_dir():
        raise GPT2Error(f"{path}: is a folder; name the text files inside it")
    if not os.access(path, os.R_OK):
        raise GPT2Error(f"{path}: not readable (permission denied)")
    return path


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise GPT2Error(f"{out}: cannot write the token files here ({e.strerror}); "
                        "choose another --out") from None


def _val_count(n: int, fraction: float) -> int:
    if fraction == 0.0 or n < 2:
        return 0
    return min(max(1, math.ceil(n * fraction)), n - 1)


def _text_pieces(path: Path, *, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """(text, bytes read for it) pieces of a UTF-8 file, cut only where tokenization allows."""
    pending = b""  # bytes after the chunk's last newline: maybe half a character
    text = ""  # decoded text after the last safe cut
    offset = 0  # byte offset of `pending`'s start in the file
    nbytes = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            data = pending + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)  # a newline ends a character
            head, pending = data[:cut], data[cut:]
            searched = len(text)  # no safe cut before here, or it would have been yielded
            text += decode_utf8(head, path, offset=offset)
            nul = head.find(b"\0")
            if nul >= 0:  # valid UTF-8, but no text has it: binary, or UTF-16 without a BOM
                raise GPT2Error(f"{path}: a NUL byte at offset {offset + nul}, so not text (a "
                                "binary file, or UTF-16: convert it with iconv -f utf-16 -t "
                                "utf-8)")
            offset += len(head)
            nbytes += len(head)
            if not chunk:
                if text:
                    yield text, nbytes
                return
            safe = _last_safe_cut(text, max(0, searched - 2))
            if safe > 0:
                yield text[:safe], nbytes
                text, nbytes = text[safe:], 0


def _last_safe_cut(text: str, start: int) -> int:
    """The last safe cut at or after `start` (0 for none)."""
    last = 0
    for m in _SAFE_CUT.finditer(text, start):
        last = m.start()
    return last


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OSError while writing the token files (a full disk) as a one-line GPT2Error."""
    try:
        yield
    except OSError as e:
        raise GPT2Error(f"{out}: writing the token files failed ({e.strerror or e}); free "
                        "some space or choose another --out") from None


@contextlib.contextmanager
def _scratch_file(folder: Path):
    with tempfile.TemporaryFile(dir=folder, prefix=".doc-") as f:
        yield f


def _split_document(scratch, n: int, n_val: int, writers: dict, eot: int, *,
                    append_eot: bool) -> tuple[int, int]:
    """Copy a document's ids from the scratch file: the head to train, the tail to val."""
    ids = np.memmap(scratch, dtype=DTYPE, mode="r", shape=(n,)) if n else np.empty(0, DTYPE)
    counts = []
    for split, part in (("train", ids[: n - n_val]), ("val", ids[n - n_val:])):
        w = writers[split]
        before = w.count
        if part.size or append_eot:
            if not append_eot and w.count:
                w.write(np.array([eot], dtype=DTYPE))  # separator between documents
            for s in range(0, part.size, _COPY_TOKENS):
                w.write(np.asarray(part[s: s + _COPY_TOKENS]))
            if append_eot:
                w.write(np.array([eot], dtype=DTYPE))
        counts.append(w.count - before)
    del ids
    return counts[0], counts[1]


class _TokenWriter:
    """Appends ids to `path` through `atomic_open`: the file is renamed into place when
    the `with` block ends without an error, and counts what it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def __enter__(self) -> _TokenWriter:
        self._open = atomic_open(self.path, "wb")
        self.f = self._open.__enter__()
        return self

    def write(self, ids: np.ndarray) -> None:
        with _writing(self.path.parent):
            self.f.write(ids.astype(DTYPE, copy=False).tobytes())
        self.count += ids.size

    def __exit__(self, *exc) -> bool | None:
        return self._open.__exit__(*exc)


# --- reading -------------------------------------------------------------------------------


@dataclass
class TokenData:
    """A prepared folder, opened: the meta and each split as a read-only memmap."""

    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise GPT2Error(f"unknown split {name!r}; use train or val")
        return self.train if name == "train" else self.val

    def fingerprint(self) -> dict:
        """What identifies the data cheaply: token counts and the vocabulary (what a
        resumed run checks a --data folder against)."""
        return {k: self.meta.get(k) for k in FINGERPRINT}

    @property
    def n_vocab(self) -> int | None:
        """meta.json's vocabulary size (checked by open_tokens), or None where it has none."""
        return self.meta.get("n_vocab")

    def tokenizer(self):
        """The vocabulary the ids were made with (checked against meta's sha256 and
        n_vocab), or None for token files that record no vocabulary (written by other
        tools or tests)."""
        from gpt2.tokenizer import Tokenizer

        if "vocab_sha256" not in self.meta:
            return None
        if self.meta.get("vocab") == "vocab":
            tok = Tokenizer.from_pretrained(self.folder / "vocab")
        else:
            tok = Tokenizer.from_pretrained()
        if self.meta["vocab_sha256"] != tok.sha256():
            raise GPT2Error(f"{self.folder}: the vocabulary's sha256 differs from the one "
                            "recorded in meta.json; prepare the data again")
        if self.n_vocab is not None and self.n_vocab != tok.n_vocab:
            raise GPT2Error(f"{self.folder / 'meta.json'}: n_vocab {self.n_vocab}, but its "
                            f"vocabulary has {tok.n_vocab} tokens; prepare the data again")
        return tok

    def check_vocab_of(self, tok, model: str) -> None:
        """GPT2Error unless tok (a model's vocabulary) is the one these ids were made with;
        nothing to check where meta.json records no vocabulary."""
        recorded = self.meta.get("vocab_sha256")
        if recorded is not None and tok is not None and recorded != tok.sha256():
            raise GPT2Error(f"{self.folder}: prepared with another vocabulary than {model}'s "
                            "(meta.json's vocab_sha256 differs), so its ids mean other tokens "
                            "to the model; prepare the text again with the model's vocabulary "
                            "(`gpt2 prepare --vocab DIR`, DIR holding its vocab files; "
                            "without --vocab, GPT-2's)")


def open_tokens(folder: str | os.PathLike) -> TokenData:
    """Open a folder written by `prepare` (or anything with the same three files)."""
    folder = Path(folder)
    if folder.is_file():
        raise GPT2Error(f"{folder}: is a file, not a data folder; make one from it with "
                        f"`gpt2 prepare {folder} --out DIR`, then pass --data DIR")
    if not folder.is_dir():
        raise GPT2Error(f"{folder}: no such data folder; make one with "
                        f"`gpt2 prepare FILES --out {folder}`")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise GPT2Error(f"{folder}: no meta.json, so this is not prepared data (or `gpt2 "
                        f"prepare` was interrupted); run `gpt2 prepare FILES --out {folder}`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise GPT2Error(f"{meta_path}: unreadable ({e}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("dtype") != "uint16":
        raise GPT2Error(f"{meta_path}: not a gpt2 token-file description (dtype uint16 expected)")
    n_vocab = meta.get("n_vocab", 1)
    if isinstance(n_vocab, bool) or not isinstance(n_vocab, int) or not 1 <= n_vocab <= 65536:
        raise GPT2Error(f"{meta_path}: n_vocab must be the vocabulary's size, an integer from 1 "
                        f"to 65536, got {meta.get('n_vocab')!r}; prepare the data again")
    splits = {s: _memmap(folder / f"{s}.bin", meta.get(f"{s}_tokens")) for s in SPLITS}
    return TokenData(folder, meta, splits["train"], splits["val"])


def _memmap(path: Path, expected: object) -> np.ndarray:
    if not isinstance(expected, int) or expected < 0:
        raise GPT2Error(f"{path.parent / 'meta.json'}: no token count for {path.name}")
    if not path.is_file():
        raise GPT2Error(f"{path}: missing; prepare the data again")
    size = path.stat().st_size
    if size != 2 * expected:
        raise GPT2Error(f"{path}: {size} bytes but meta.json says {expected} tokens "
                        f"({2 * expected} bytes); the folder is incomplete, prepare it again")
    if expected == 0:
        return np.empty(0, dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r", shape=(expected,))


# --- sampling ------------------------------------------------------------------------------


def batch_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one micro-batch, mixed from (run seed, step, global micro-batch).

    Deriving it from the step makes the data position part of the state that a
    checkpoint records; deriving it from `index = micro * world_size + rank`
    makes N ranks with accumulation A draw exactly the micro-batches that one
    process draws with accumulation N * A.
    """
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sample_batch(
    tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int,
    n_vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens -> inputs x and next-token targets y (B, T).

    >>> x, y = sample_batch(np.arange(100, dtype=np.uint16), block_size=8, batch_size=2, seed=0)
    >>> bool((x[:, 1:] == y[:, :-1]).all())
    True
    """
    n = len(tokens)
    if n < block_size + 1:
        raise GPT2Error(f"the split has {n} tokens, fewer than block size + 1 "
                        f"({block_size + 1}); use a smaller --block-size or more text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - block_size, (batch_size,), generator=g).tolist()
    rows = np.stack([tokens[s: s + block_size + 1] for s in starts]).astype(np.int64)
    if n_vocab is not None and rows.max() >= n_vocab:
        raise GPT2Error(f"token id {int(rows.max())} is out of range for a model with "
                        f"{n_vocab} tokens; the data was prepared with another vocabulary")
    window = torch.from_numpy(rows)  # (B, T + 1)
    # x (B, T), y (B, T): y is x shifted by one
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
