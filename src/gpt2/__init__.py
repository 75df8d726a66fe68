"""GPT-2 written from scratch in PyTorch, running OpenAI's real pretrained weights.

    >>> import gpt2
    >>> tok = gpt2.Tokenizer.from_pretrained()
    >>> tok.encode("hello world")
    [31373, 995]

`GPT2` and `score` are imported on first use: they need PyTorch, whose import
takes ~1.5 s, and the command line's help, its argument errors and `gpt2
tokenize` do not.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from gpt2._lazy import lazy_exports
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gpt2.model import GPT2
    from gpt2.score import score

__all__ = ["GPT2", "GPT2Config", "GPT2Error", "Tokenizer", "score"]
__version__ = "0.1.0"

# imported on first use
__getattr__, __dir__ = lazy_exports(globals(), {"GPT2": "gpt2.model", "score": "gpt2.score"})


class _Package(types.ModuleType):
    """gpt2 keeps `gpt2.score` the function: importing the submodule of that name
    would otherwise set the package's attribute to the module."""

    def __setattr__(self, name: str, value) -> None:
        if name == "score" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
