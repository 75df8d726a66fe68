"""A varied text corpus for tokenizer tests and benchmarks, built offline and deterministically.

Nothing is downloaded and nothing is committed: the text comes from the Python
installation (standard-library source for code, docstrings and pydoc topics
for prose, the CJK codec test files when present) plus generated text that
aims at the tokenizer's corners: many scripts, emoji sequences, digits of
several systems, runs of every kind of whitespace, and contractions in odd
cases ("DON'T", "it’s", "'S"). The same Python gives the same corpus.

    >>> text = build_corpus(200_000)
    >>> len(text)
    200000
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import sysconfig
import unicodedata
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Shares of the corpus, in order. Generated parts come last so a small corpus
# still has a bit of each; sections that are short of text are padded by the
# generated ones.
SHARES = {"prose": 0.22, "code": 0.40, "cjk": 0.03, "scripts": 0.20, "corners": 0.15}


def build_corpus(size: int = 6_000_000, *, seed: int = 0) -> str:
    """About `size` characters (exactly `size`) of mixed text, the same for the same Python."""
    parts = {
        "prose": _prose(int(size * SHARES["prose"])),
        "code": _code(int(size * SHARES["code"])),
        "cjk": _cjk(int(size * SHARES["cjk"])),
    }
    rng = random.Random(seed)
    used = sum(len(p) for p in parts.values())
    rest = max(0, size - used)
    share_scripts = SHARES["scripts"] / (SHARES["scripts"] + SHARES["corners"])
    parts["scripts"] = _scripts(int(rest * share_scripts), rng)
    parts["corners"] = _corners(size - used - len(parts["scripts"]), rng)
    return "".join(parts.values())[:size]


@functools.cache
def _stdlib_files() -> list[Path]:
    files = [p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(STDLIB).as_posix())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _code(budget: int) -> str:
    """Standard-library source, spread over the whole library (every k-th file)."""
    files = _stdlib_files()
    out, n = [], 0
    for path in files[::7] + files[3::7]:
        text = _read(path)
        out.append(text)
        n += len(text)
        if n >= budget:
            break
    return "".join(out)[:budget]


def _prose(budget: int) -> str:
    """English prose: pydoc's topic help, then docstrings of the standard library."""
    out, n = [], 0
    try:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            out.append(topics[key])
            n += len(topics[key])
    except ImportError:
        pass
    docstring = re.compile(r'"""(.*?)"""', re.DOTALL)
    for path in _stdlib_files():
        if n >= budget:
            break
        for doc in docstring.findall(_read(path)):
            if len(doc) > 80:  # a sentence or more, not an empty or one-word string
                out.append(doc + "\n\n")
                n += len(doc) + 2
    return "".join(out)[:budget]


def _cjk(budget: int) -> str:
    """Chinese, Japanese and Korean text from CPython's codec tests, when installed."""
    files = sorted((STDLIB / "test" / "cjkencodings").glob("*-utf8.txt"))
    return "".join(_read(p) for p in files)[:budget]


# Code point ranges of some scripts, with the punctuation each uses.
SCRIPTS = {
    "greek": ((0x0391, 0x03C9), "·;,."),
    "cyrillic": ((0x0410, 0x044F), ",.!?«»—"),
    "armenian": ((0x0531, 0x0586), "։,"),
    "hebrew": ((0x05D0, 0x05EA), ",.״"),
    "arabic": ((0x0621, 0x064A), "،؛؟."),
    "devanagari": ((0x0905, 0x0939), "।॥,"),
    "bengali": ((0x0985, 0x09B9), "।,"),
    "thai": ((0x0E01, 0x0E30), " ฯ"),
    "georgian": ((0x10D0, 0x10FA), ",."),
    "ethiopic": ((0x1200, 0x1350), "፡።፣"),
    "hangul": ((0xAC00, 0xD7A3), ",.?"),
    "hiragana": ((0x3041, 0x3096), "、。「」"),
    "katakana": ((0x30A1, 0x30FA), "、。ー"),
    "cjk": ((0x4E00, 0x9FA5), "，。！？"),
    "latin-ext": ((0x00C0, 0x024F), ",.;"),
    "math-alnum": ((0x1D400, 0x1D6A3), "∑∫≠≤"),
}
DIGITS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯", "０１２３４５６７８９",
          "๐๑๒๓๔๕๖๗๘๙", "²³¹¼½¾", "ⅠⅡⅢⅣⅤⅫ", "①②③⑩"]
LEXICON = 3000  # words per made-up language
COMBINING = "\u0300\u0301\u0308\u0327\u0654\u093c\u094d\u0e31\u20dd"


def _letters(lo: int, hi: int) -> list[str]:
    """Assigned letters and marks of a range, by this Python's (older) Unicode tables."""
    return [chr(c) for c in range(lo, hi + 1) if unicodedata.category(chr(c))[0] in "LM"]


def _scripts(budget: int, rng: random.Random) -> str:
    """Sentences in many scripts, with their digits, punctuation and combining marks.

    The words are made up, but like a real language each script has a
    lexicon used with Zipf's law (the k-th commonest word has weight 1/k),
    so some words repeat a lot and many appear once.
    """
    zipf = list(itertools.accumulate(1 / k for k in range(1, LEXICON + 1)))
    languages = []
    for name in sorted(SCRIPTS):
        (lo, hi), punct = SCRIPTS[name]
        letters = _letters(lo, hi)
        lexicon = []
        for _ in range(LEXICON):
            word = "".join(rng.choices(letters, k=rng.randint(1, 9)))
            if rng.random() < 0.1:
                word += rng.choice(COMBINING)
            lexicon.append(word)
        languages.append((lexicon, punct))
    out, n = [], 0
    while n < budget:
        lexicon, punct = rng.choice(languages)
        words = rng.choices(lexicon, cum_weights=zipf, k=rng.randint(3, 14))
        for k in range(len(words)):
            if rng.random() < 0.05:
                words[k] = "".join(rng.choices(rng.choice(DIGITS), k=rng.randint(1, 6)))
            if rng.random() < 0.15:
                words[k] += rng.choice(punct)
        sentence = " ".join(words) + rng.choice(punct) + rng.choice(["\n", " ", "\n\n", "  "])
        out.append(sentence)
        n += len(sentence)
    return "".join(out)


WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x0b", "\x0c",
              "\x85", "\u2028", "\u1680", "\u200b", "\ufeff", "\x1c", "\x1f"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "’s", "’t", "'S", "'T", "'RE",
                "'Ve", "'LL", "'D", "''s", "'s'", "'", "’", "`s"]
WORDS = ["don", "DON", "it", "It", "IT", "we", "they", "I", "you", "she", "o", "rock n",
         "l'amour", "aujourd'hui", "rock'n'roll", "y'all'd've", "Hello", "world", "naïve",
         "café", "Straße", "İstanbul", "ǅemal", "ﬁne", "Ⅻ", "x²", "3D", "v1.2.3", "e.g.",
         "C++", "C#", "a_b", "snake_case", "camelCase", "https://example.com/a?b=c&d=e",
         "user@example.org", "#hashtag", "@mention", "$100", "€5,00", "50%", "¯\\_(ツ)_/¯"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "🇯🇵", "1️⃣", "❤️", "🤖", "🧑🏿‍🚀", "♀︎", "🫠"]
NUMBERS = ["0", "7", "42", "1234567890", "3.14159", "-12", "1e-9", "0x1F", "1,000,000",
           "12:30", "2024-01-31", "٣٤", "१२३", "１２３"]
PUNCT = [".", ",", "!", "?", "...", "—", "–", "-", "--", "(", ")", "[", "]", "{", "}", "\"",
         "“", "”", "«", "»", ";", ":", "!!!", "?!", "<|endoftext|>", "<|", "|>", "::", "->",
         "=>", "**", "\\", "/", "|", "~", "^", "&&", "||", "€", "£", "¥", "©", "®", "™",
         "\u00ad", "\u200d", "\u202e", "\ufffd", "\x00", "\x07", "\x7f", "\ue000"]


def _corners(budget: int, rng: random.Random) -> str:
    """Random strings of the fragments the pre-tokenizer is most likely to get wrong."""
    kinds = [WHITESPACE, CONTRACTIONS, WORDS, WORDS, EMOJI, NUMBERS, PUNCT, PUNCT]
    out, n = [], 0
    while n < budget:
        line = []
        for _ in range(rng.randint(1, 20)):
            piece = rng.choice(rng.choice(kinds))
            if rng.random() < 0.3:
                piece = rng.choice(["", " ", "  ", "\t", " \n"]) + piece
            if rng.random() < 0.1:
                piece = piece.upper() if rng.random() < 0.5 else piece.swapcase()
            line.append(piece)
        text = "".join(line) + rng.choice(["\n", "\n\n", " \n", "\r\n", "   \n", ""])
        out.append(text)
        n += len(text)
    return "".join(out)


if __name__ == "__main__":
    import sys

    sys.stdout.write(build_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 6_000_000))
