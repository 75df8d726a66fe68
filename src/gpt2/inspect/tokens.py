"""Text to token ids for inspection, and tokens shown so that every byte is visible.

A token such as " the" starts with a space that a plot would hide, and a
newline token would break a table row, so labels spell whitespace out:
space as "␣", newline as "↵", tab as "⇥". A token holding part of a multi-byte
character is not valid UTF-8 on its own; its stray bytes are shown as \\xNN.
Characters that show as nothing or as a plain blank (a zero-width space, a no-break
space, a bidi override, a combining mark with nothing to combine with) are
written as \\uNNNN.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from gpt2.errors import GPT2Error

# whitespace spelled out; every other control character (ESC would start a terminal
# escape sequence in a table) as \xNN
_VISIBLE = str.maketrans({
    **{chr(c): f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]},
    " ": "␣", "\n": "↵", "\t": "⇥", "\r": "\\r",
})


@dataclass(frozen=True)
class Piece:
    """One token of a text."""

    id: int
    raw: bytes  # the token's bytes
    label: str  # printable form for plots and tables


def token_label(raw: bytes) -> str:
    """Printable form of a token's bytes.

    >>> token_label(b" the"), token_label(b"\\n"), token_label(b"\\xe2\\x80")
    ('␣the', '↵', '\\\\xe2\\\\x80')
    >>> token_label(b"\\x1b[2J")  # no escape sequence reaches the terminal
    '\\\\x1b[2J'
    >>> token_label("\\u200b".encode()), token_label("a\\u00a0b".encode())  # invisible
    ('\\\\u200b', 'a\\\\u00a0b')
    """
    label = raw.decode("utf-8", errors="backslashreplace").translate(_VISIBLE)
    if label.isascii():
        return label
    return "".join(f"\\u{ord(c):04x}" if _unseen(c, k) else c for k, c in enumerate(label))


def _unseen(c: str, position: int) -> bool:
    """A character a table or plot would show as nothing, or as a blank like a space:
    format characters (zero-width, bidi controls, soft hyphen), spaces other than " ",
    line and paragraph separators, private-use and unassigned code points, and a
    combining mark at the start of a label (nothing to combine with)."""
    category = unicodedata.category(c)
    return category in ("Cf", "Zs", "Zl", "Zp", "Co", "Cn", "Cs") or (
        position == 0 and category in ("Mn", "Me"))


def token_labels(tok, ids: Sequence[int]) -> list[str]:
    """`token_label` of each id, one token at a time (so partial characters stay visible).
    An id past the tokenizer's vocabulary (a model whose embedding is padded, as
    nanoGPT's 50,304 rows) is labelled <id N>.

    >>> from gpt2 import Tokenizer
    >>> token_labels(Tokenizer.from_pretrained(), [15496, 50300])
    ['Hello', '<id 50300>']
    """
    n = tok.n_vocab
    return [token_label(tok.decode_bytes([i])) if i < n else f"<id {i}>" for i in ids]


def token_pieces(tok, text: str) -> list[Piece]:
    """The tokens of `text` with their bytes and labels.

    >>> from gpt2 import Tokenizer
    >>> [p.label for p in token_pieces(Tokenizer.from_pretrained(), "Hello world")]
    ['Hello', '␣world']
    """
    ids = tok.encode(text)
    return [Piece(i, tok.decode_bytes([i]), token_label(tok.decode_bytes([i]))) for i in ids]


def encode_for_model(tok, text: str, *, n_ctx: int, min_tokens: int = 1) -> list[int]:
    """The ids of `text`, or a one-line GPT2Error when the model cannot read them.

    min_tokens: 2 where a loss is computed (a prediction needs a following token).
    """
    if not text:
        raise GPT2Error("the text is empty; give at least one word to look at")
    ids = tok.encode(text)
    if len(ids) < min_tokens:
        raise GPT2Error(
            f"the text is {len(ids)} token(s) but this needs at least {min_tokens} "
            "(a loss compares each token's prediction with the token after it); give more text"
        )
    if len(ids) > n_ctx:
        raise GPT2Error(
            f"the text is {len(ids)} tokens but this model's context is {n_ctx}; "
            "shorten the text"
        )
    return ids
