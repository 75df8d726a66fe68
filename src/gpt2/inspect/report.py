"""One self-contained HTML page showing a text's journey through GPT-2.

Python computes the numbers (`report_data`); the page (`report.html`, package
data) draws them with inline JavaScript from one inline JSON block, so the file
needs no network, no server and no plotting library to open. Attention maps are
stored as bytes (probability x 255, base64): a 12 x 12-head model on 100 tokens
is 1.4 M probabilities, 1.9 MB this way against ~9 MB as JSON numbers; the
page shows them to 0.4 % steps, plenty for a picture.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import os
import unicodedata

import torch

from gpt2._io import atomic_write_bytes
from gpt2.errors import GPT2Error
from gpt2.inspect.ablate import ablate_heads
from gpt2.inspect.attention import attention_patterns
from gpt2.inspect.lens import logit_lens, next_tokens
from gpt2.inspect.tokens import encode_for_model, token_labels
from gpt2.model import check_model

_PLACEHOLDER = "/*REPORT_DATA*/"


def quantize(probs: torch.Tensor) -> str:
    """Probabilities in [0, 1] -> base64 of round(p * 255) bytes, in row-major order."""
    scaled = (probs.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return base64.b64encode(scaled.contiguous().numpy().tobytes()).decode("ascii")


def report_data(
    model, tok, text: str, *, top: int = 10, ablate: bool = True, progress=None
) -> dict:
    """Everything the page shows, as plain JSON-ready values.

    ablate: also zero each head in turn (n_layer batched forward passes; the
    section is left out for a one-token text, which has no loss); progress(done,
    total) is called as heads are done (see `ablate_heads`).
    """
    check_model(model)
    config = model.config
    ids = encode_for_model(tok, text, n_ctx=config.n_ctx)
    labels = token_labels(tok, ids)
    patterns = attention_patterns(model, ids)  # (L, H, T, T)
    lens = logit_lens(model, ids)
    ablation = ablate_heads(model, ids, progress=progress) if ablate and len(ids) >= 2 else None
    source = getattr(model, "source", None)
    return {
        "text": text,
        "model": {
            "source": str(source.path) if source is not None else "in memory",
            **config.to_hparams(),
        },
        "tokens": [{"id": i, "label": s} for i, s in zip(ids, labels, strict=True)],
        "next": [
            {"id": p.id, "label": token_labels(tok, [p.id])[0], "prob": p.prob}
            for p in next_tokens(model, ids, top=top)
        ],
        "attention": {
            "n_layer": patterns.size(0),
            "n_head": patterns.size(1),
            "T": patterns.size(2),
            "bytes": quantize(patterns),
        },
        "lens": {
            "names": lens.names,
            "top_labels": [token_labels(tok, row) for row in lens.top_ids.tolist()],
            "top_ids": lens.top_ids.tolist(),
            "top_probs": _rounded(lens.top_probs),
            "target_probs": _rounded(lens.target_probs),
        },
        "ablation": None if ablation is None else {
            "base_loss": ablation.base_loss,
            "deltas": _rounded(ablation.deltas),
        },
        # why there is none: "off" (not asked for) or "one token" (no loss to compare)
        "ablation_skipped": None if ablation is not None else
        ("off" if not ablate else "one token"),
    }


def _rounded(t: torch.Tensor) -> list:
    return [[round(float(v), 5) for v in row] for row in t.tolist()]


def render_report(data: dict) -> str:
    """The HTML page for `report_data`'s dict."""
    template = (importlib.resources.files("gpt2.inspect") / "report.html").read_text("utf-8")
    # Inside <script> only "</script" or "<!--" can end the block early; escaping every
    # <, > and & as \u003c... keeps any token text (say "</script>") inert and valid JSON.
    # ensure_ascii: every other character as an escape too, so control characters,
    # noncharacters and lone surrogates (which UTF-8 cannot hold) never reach the page.
    try:
        payload = (
            json.dumps(data, ensure_ascii=True, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\x7f", "\\u007f")
        )
    except ValueError:  # NaN or inf: JSON.parse would refuse the page's data
        raise GPT2Error("the report holds NaN or infinite values (the model overflows: try "
                        "fp32)") from None
    title = html.escape("".join(
        " " if c in "\n\t" else c if unicodedata.category(c)[0] != "C" else "\ufffd"
        for c in data["text"][:60]))
    # split first, then join: a text containing a placeholder cannot be substituted twice
    before_title, _, rest = template.partition("{{TITLE}}")
    before_data, _, after_data = rest.partition(_PLACEHOLDER)
    return before_title + title + before_data + payload + after_data


def write_report(
    model, tok, text: str, path: str | os.PathLike, *, top: int = 10, ablate: bool = True,
    progress=None,
) -> dict:
    """Compute the report for `text` and write the page to `path` atomically.

    >>> from gpt2 import GPT2, GPT2Config, Tokenizer  # doctest: +SKIP
    >>> write_report(model, Tokenizer.from_pretrained(), "The cat", "cat.html")  # doctest: +SKIP
    """
    data = report_data(model, tok, text, top=top, ablate=ablate, progress=progress)
    page = render_report(data)
    try:
        atomic_write_bytes(path, page.encode("utf-8"))  # not the locale's encoding
    except OSError as e:
        raise GPT2Error(f"{path}: cannot write the report ({e.strerror})") from None
    return data
