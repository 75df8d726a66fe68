"""GPT-2's hyperparameters: one dataclass, a table of the four released sizes,
and readers for OpenAI's `hparams.json` and Hugging Face's `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from gpt2.errors import GPT2Error


@dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2 network.

    >>> GPT2Config.preset("124M").n_layer
    12
    """

    n_vocab: int = 50257  # BPE vocabulary: 256 bytes + 50,000 merges + <|endoftext|>
    n_ctx: int = 1024  # context length: how many positions `wpe` has
    n_embd: int = 768  # width of the residual stream
    n_head: int = 12  # attention heads per layer (head size = n_embd / n_head)
    n_layer: int = 12  # transformer blocks
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # used only when training

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GPT2Error(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise GPT2Error(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise GPT2Error(f"config: layer_norm_epsilon must be a number in (0, 1) (GPT-2 "
                            f"uses 1e-5), got {eps!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise GPT2Error(f"config: dropout must be a number in [0, 1), got {p!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str) -> GPT2Config:
        """The configuration of a released size: 124M/355M/774M/1558M or gpt2/gpt2-medium/..."""
        key = resolve_size(name)
        if key is None:
            raise GPT2Error(
                f"unknown GPT-2 size {name!r}; choose one of {', '.join(PRESETS)} "
                f"or {', '.join(ALIASES)}"
            )
        return PRESETS[key]

    @classmethod
    def from_hparams(cls, path: str | Path) -> GPT2Config:
        """Read OpenAI's `hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
        d = _read_json(path)
        try:
            return cls(**{k: d[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
        except KeyError as e:
            raise GPT2Error(f"{path}: missing key {e.args[0]!r} in hparams.json") from None
        except GPT2Error as e:
            raise GPT2Error(f"{path}: {str(e).removeprefix('config: ')}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> GPT2Config:
        """Read Hugging Face's `config.json` for GPT2LMHeadModel."""
        d = _read_json(path)
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise GPT2Error(f"{path}: model_type is {model_type!r}, not 'gpt2'")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GPT2Error(f"{path}: activation_function {act!r} is not GPT-2's tanh GELU")
        _check_gpt2_variant(d, path)
        try:
            return cls(
                n_vocab=d["vocab_size"],
                n_ctx=d.get("n_positions", d.get("n_ctx", 1024)),
                n_embd=d["n_embd"],
                n_head=d["n_head"],
                n_layer=d["n_layer"],
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            )
        except KeyError as e:
            raise GPT2Error(f"{path}: missing key {e.args[0]!r} in config.json") from None
        except GPT2Error as e:  # "config: n_layer must be ..." -> "PATH: n_layer must be ..."
            raise GPT2Error(f"{path}: {str(e).removeprefix('config: ')}") from None

    def to_hparams(self) -> dict:
        return {k: getattr(self, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}

    def to_hf_config(self) -> dict:
        """A `config.json` that `transformers.GPT2LMHeadModel` reads as this network."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            # <|endoftext|> when the vocabulary is GPT-2's (custom small ones have none)
            "bos_token_id": 50256 if self.n_vocab > 50256 else None,
            "eos_token_id": 50256 if self.n_vocab > 50256 else None,
        }

    def replace(self, **changes) -> GPT2Config:
        return dataclasses.replace(self, **changes)


# Options of transformers' GPT2Config that make another network than GPT-2's, each with
# GPT-2's value. A config.json that sets one otherwise is refused: loading its weights
# into GPT-2 would compute something else, silently.
_GPT2_VARIANT_KEYS = {
    "scale_attn_weights": True,  # False: attention scores not divided by sqrt(head size)
    "scale_attn_by_inverse_layer_idx": False,  # True: also divided by the layer number
    "add_cross_attention": False,  # True: an encoder-decoder's cross-attention layers
}


def _check_gpt2_variant(d: dict, path) -> None:
    for key, value in _GPT2_VARIANT_KEYS.items():
        if key in d and d[key] != value:
            raise GPT2Error(f"{path}: {key} is {d[key]!r}; this GPT-2 implements only "
                            f"{key} = {json.dumps(value)}, as OpenAI's released models have it")
    inner = d.get("n_inner")
    n_embd = d.get("n_embd")
    if inner is not None and inner != (4 * n_embd if isinstance(n_embd, int) else inner):
        raise GPT2Error(f"{path}: n_inner is {inner!r}; GPT-2's MLP is 4 x n_embd wide "
                        f"({4 * n_embd}), the only width this implementation has")


PRESETS: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
ALIASES: dict[str, str] = {
    "gpt2": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
    # OpenAI's first names for the two smaller sizes
    "117M": "124M",
    "345M": "355M",
}


def check_size(config: GPT2Config, size: str, where, *,
               advice: str = "the download is of another model") -> None:
    """GPT2Error unless `config` has the layers, heads and width of the released `size`."""
    want = PRESETS[resolve_size(size) or size]
    got = (config.n_layer, config.n_head, config.n_embd)
    if got != (want.n_layer, want.n_head, want.n_embd):
        raise GPT2Error(f"{where}: layers/heads/width {got} are not those of {size} "
                        f"{(want.n_layer, want.n_head, want.n_embd)}; {advice}")


def resolve_size(name: str) -> str | None:
    """'gpt2-medium' -> '355M'; '124m' -> '124M'; anything else (not a str too) -> None."""
    if not isinstance(name, str):
        return None
    key = {k.lower(): v for k, v in ALIASES.items()}.get(name.lower(), name.upper())
    return key if key in PRESETS else None


def _read_json(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise GPT2Error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPT2Error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise GPT2Error(f"{path}: expected a JSON object")
    return d
