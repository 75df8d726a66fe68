"""GPT-2 written from scratch in PyTorch, running OpenAI's real pretrained weights.

    >>> import gpt2
    >>> tok = gpt2.Tokenizer.from_pretrained()
    >>> tok.encode("hello world")
    [31373, 995]
"""

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.model import GPT2
from gpt2.score import score
from gpt2.tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "GPT2Error", "Tokenizer", "score"]
__version__ = "0.1.0"
