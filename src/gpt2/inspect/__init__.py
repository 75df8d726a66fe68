"""Look inside GPT-2: attention maps, the logit lens, head ablation, an HTML report.

The functions here return numbers (tensors and small dataclasses); `plots`
turns them into PNG figures and `report` into one self-contained HTML page.
They all read the model through its named activations (`GPT2.run_with_cache`,
`GPT2.hooks`; see `gpt2.model.ACTIVATIONS`).

    >>> from gpt2 import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_vocab=10, n_ctx=8))
    >>> ids = [1, 2, 3, 4]
    >>> attention_patterns(model, ids).shape        # (n_layer, n_head, T, T)
    torch.Size([2, 2, 4, 4])
    >>> logit_lens(model, ids).top_ids.shape        # (embed + n_layer, T)
    torch.Size([3, 4])
    >>> ablate_heads(model, ids).deltas.shape       # (n_layer, n_head)
    torch.Size([2, 2])
"""

from gpt2.inspect.ablate import HeadAblation, ablate_heads, next_token_loss, zero_heads
from gpt2.inspect.attention import attention_patterns, check_layer_head
from gpt2.inspect.lens import LogitLens, Prediction, logit_lens, next_tokens
from gpt2.inspect.report import render_report, report_data, write_report
from gpt2.inspect.tokens import Piece, encode_for_model, token_label, token_labels, token_pieces

__all__ = [
    "HeadAblation",
    "LogitLens",
    "Piece",
    "Prediction",
    "ablate_heads",
    "attention_patterns",
    "check_layer_head",
    "encode_for_model",
    "logit_lens",
    "next_token_loss",
    "next_tokens",
    "render_report",
    "report_data",
    "token_label",
    "token_labels",
    "token_pieces",
    "write_report",
    "zero_heads",
]
