"""Generation: greedy parity with transformers, the KV cache, padded batches, stops,
the context limit and the sliding window, seeds, and the `gpt2 generate` command.

The oracle is `transformers.GPT2LMHeadModel` holding the same random weights
(saved with save_pretrained and loaded by our `GPT2.from_pretrained`).
"""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from gpt2.errors import GPT2Error
from gpt2.fast_decode import StaticDecoder
from gpt2.generate import TextStream, apply_top_p, generate, generate_batch, stream
from gpt2.model import GPT2

EOT = 50256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(hf_checkpoint):
    """(ours, theirs) for a 2-layer model with a 128-token vocabulary and 48 positions."""
    ckpt = hf_checkpoint(n_ctx=48, std=0.3)
    return GPT2.from_pretrained(ckpt.folder), ckpt.model


@pytest.fixture(scope="module")
def vocab_model(hf_checkpoint):
    """A tiny model over the real 50,257-token vocabulary, for the command line."""
    ckpt = hf_checkpoint(n_vocab=50257, n_embd=32, n_head=2, n_ctx=64, std=0.3)
    return ckpt


def hf_greedy(hf, prompt: list[int], n: int, **kwargs) -> list[int]:
    """The new tokens transformers' generate picks greedily (no early stop unless asked)."""
    idx = torch.tensor([prompt])
    kwargs.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                          min_new_tokens=0, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def no_cache_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# --------------------------------------------------------------------------- parity


def test_greedy_matches_transformers(small):
    ours, hf = small
    prompt = [5, 17, 99, 3, 64, 8]
    out = generate(ours, torch.tensor([prompt]), max_new_tokens=40, temperature=0.0)
    assert out[0, :6].tolist() == prompt
    assert out[0, 6:].tolist() == hf_greedy(hf, prompt, 40)


def test_the_last_new_token_may_be_one_past_the_context(small):
    """The last new token is never fed back, so prompt + new may be n_ctx + 1 (48 + 1
    here), as transformers allows; one more needs --sliding-window."""
    ours, hf = small
    for T in (48, 40):
        prompt = torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(T)).tolist()
        out = generate(ours, torch.tensor([prompt]), max_new_tokens=49 - T, temperature=0.0)
        assert out[0, T:].tolist() == hf_greedy(hf, prompt, 49 - T), T
    with pytest.raises(GPT2Error, match="exceeds the model's context of 48"):
        generate(ours, torch.tensor([prompt]), max_new_tokens=10, temperature=0.0)


def test_numpy_numbers_are_taken_as_numbers(small):
    """np.int64(30) where 30 is wanted (counts computed with NumPy) was refused."""
    import numpy as np

    from gpt2.score import score

    ours, _ = small
    idx = torch.tensor([[5, 17, 99]])
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    want = generate(ours, idx, max_new_tokens=12, **kw)
    got = generate(ours, idx, max_new_tokens=np.int64(12), temperature=np.float32(0.7),
                   top_k=np.int32(20), top_p=np.float64(0.9), seed=np.uint64(3))
    assert torch.equal(got, want)
    ids = list(range(40))
    assert score(ours, ids, max_length=np.int64(16), stride=np.int64(8),
                 batch_size=np.int64(2)) == score(ours, ids, max_length=16, stride=8,
                                                  batch_size=2)
    with pytest.raises(GPT2Error, match="max_new_tokens must be an integer"):
        generate(ours, idx, max_new_tokens=np.float64(2.5))


def test_greedy_with_repetition_penalty_matches_transformers(small):
    ours, hf = small
    prompt = [7, 7, 30, 2]
    out = generate(ours, torch.tensor([prompt]), max_new_tokens=30, temperature=0.0,
                   repetition_penalty=1.8)
    assert out[0, 4:].tolist() == hf_greedy(hf, prompt, 30, repetition_penalty=1.8)


def test_model_generate_delegates(small):
    ours, hf = small
    out = ours.generate(torch.tensor([[1, 2, 3]]), 10, temperature=0.0)
    assert out[0, 3:].tolist() == hf_greedy(hf, [1, 2, 3], 10)


def test_model_generate_takes_every_option_of_generate_with_its_defaults():
    """GPT2.generate spells out gpt2.generate.generate's options (typed, keyword-only):
    the two lists must not drift apart."""
    import inspect

    from gpt2.generate import generate as fn
    from gpt2.model import GPT2

    def options(f, skip):
        return [(p.name, p.default, p.kind) for p in inspect.signature(f).parameters.values()
                if p.name not in skip]

    assert options(GPT2.generate, {"self", "idx", "max_new_tokens"}) == \
        options(fn, {"model", "idx", "max_new_tokens"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_give_non_finite_logits_are_an_error_not_tokens(hf_checkpoint, bad):
    """One NaN (or inf) weight makes every logit NaN; sampling from them would still pick
    tokens (the first, or the stop token) and scoring would print nan: both refuse."""
    from gpt2.score import score

    model = GPT2.from_pretrained(hf_checkpoint(n_ctx=48, std=0.3).folder)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = bad
    idx = torch.tensor([[1, 2, 3]])
    calls = {
        "generate": lambda: model.generate(idx, 3, temperature=0.0),
        "sampling": lambda: model.generate(idx, 3, seed=0),
        "static": lambda: StaticDecoder(model, batch_size=1, max_len=8).generate(
            idx, max_new_tokens=3, temperature=0.0),
        "score": lambda: score(model, [1, 2, 3, 4, 5]),
    }
    for name, call in calls.items():
        with pytest.raises(GPT2Error, match="NaN or infinite") as e:
            call()
        assert "\n" not in str(e.value), name


def test_cache_gives_the_same_tokens_as_recomputing(small):
    ours, _ = small
    prompt = [40, 41, 42, 0, 127]
    cached = generate(ours, torch.tensor([prompt]), max_new_tokens=35, temperature=0.0)
    assert cached[0, 5:].tolist() == no_cache_greedy(ours, prompt, 35)


def test_padded_batch_equals_each_prompt_alone(small):
    ours, hf = small
    prompts = [list(range(1, 31)), [9], [3, 4, 5, 6], [], [100, 50]]
    batch = generate_batch(ours, prompts, max_new_tokens=15, temperature=0.0)
    for prompt, got in zip(prompts, batch, strict=True):
        start = prompt or [0]  # a 128-token vocabulary has no <|endoftext|>: see below
        if prompt:
            assert got == hf_greedy(hf, start, 15), prompt
    # every row also equals its own batch of one (the empty prompt included)
    for prompt, got in zip(prompts, batch, strict=True):
        assert generate_batch(ours, [prompt], max_new_tokens=15, temperature=0.0)[0] == got


def test_batch_tensor_form_with_left_padding_and_mask(small):
    ours, hf = small
    idx = torch.tensor([[0, 0, 0, 11, 12], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    out = generate(ours, idx, max_new_tokens=12, temperature=0.0, attention_mask=mask)
    assert out[0, 5:].tolist() == hf_greedy(hf, [11, 12], 12)
    assert out[1, 5:].tolist() == hf_greedy(hf, [21, 22, 23, 24, 25], 12)


def test_right_padding_is_refused(small):
    ours, _ = small
    with pytest.raises(GPT2Error, match="LEFT"):
        generate(ours, torch.tensor([[1, 2, 0]]), max_new_tokens=2,
                 attention_mask=torch.tensor([[1, 1, 0]]))


# --------------------------------------------------------------------------- seeds and stops


def test_same_seed_same_tokens_different_seed_different(small):
    ours, _ = small
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kw = dict(max_new_tokens=25, temperature=1.3, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = generate(ours, idx, seed=11, **kw)
    assert torch.equal(a, generate(ours, idx, seed=11, **kw))
    assert not torch.equal(a, generate(ours, idx, seed=12, **kw))
    streamed = torch.stack(list(stream(ours, idx, seed=11, **kw)), dim=1)  # (B, new)
    assert torch.equal(streamed, a[:, 3:])


def test_stop_tokens_end_each_row_at_its_stop(small):
    ours, _ = small
    prompts = [[1, 2, 3], [60, 61]]
    free = generate_batch(ours, prompts, max_new_tokens=20, temperature=0.0)
    stops = [free[0][4], free[1][9]]
    lists = generate_batch(ours, prompts, max_new_tokens=20, temperature=0.0, stop_tokens=stops)
    for row, got in zip(free, lists, strict=True):
        end = next(i for i, t in enumerate(row) if t in stops)
        assert got == row[:end + 1]  # ends at (and includes) the stop token
    # the tensor form pads finished rows (id 0 here: this vocabulary has no 50256)
    idx = torch.tensor(prompts[:1])
    out = generate(ours, idx, max_new_tokens=20, temperature=0.0, stop_tokens=[stops[0]])
    assert out[0, 3:].tolist() == lists[0]  # every row stopped: generation ended early


def test_empty_prompt_starts_from_endoftext(vocab_model):
    ours = GPT2.from_pretrained(vocab_model.folder)
    got = generate_batch(ours, [[]], max_new_tokens=8, temperature=0.0)[0]
    assert got == hf_greedy(vocab_model.model, [EOT], 8)
    out = generate(ours, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=8, temperature=0.0)
    assert out[0].tolist() == [EOT] + got


# --------------------------------------------------------------------------- the context


def test_context_overflow_is_a_clear_error(small):
    ours, _ = small
    with pytest.raises(GPT2Error) as e:
        generate(ours, torch.tensor([[1] * 40]), max_new_tokens=10)
    message = str(e.value)
    assert "40" in message and "10" in message and "48" in message
    assert "--sliding-window" in message and "\n" not in message


def sliding_oracle(hf, prompt: list[int], n: int, n_ctx: int) -> list[int]:
    """The documented sliding rule, decoded by transformers without a cache: a new token
    sees the tokens since `start`; when they would exceed n_ctx, start moves so that the
    last n_ctx - n_ctx // 4 remain."""
    seq = list(prompt)
    start = max(0, len(seq) - n_ctx)
    keep = n_ctx - n_ctx // 4
    with torch.no_grad():
        for _ in range(n):
            if len(seq) - start > n_ctx:
                start = len(seq) - keep
            logits = hf(torch.tensor([seq[start:]])).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("prompt_len", [10, 60])
def test_sliding_window_follows_the_documented_rule(small, prompt_len):
    ours, hf = small
    prompt = [(7 * i) % 128 for i in range(prompt_len)]
    out = generate(ours, torch.tensor([prompt]), max_new_tokens=70, temperature=0.0,
                   sliding_window=True)
    assert out.shape == (1, prompt_len + 70)
    assert out[0, prompt_len:].tolist() == sliding_oracle(hf, prompt, 70, n_ctx=48)


def test_bad_arguments_raise(small):
    ours, _ = small
    idx = torch.tensor([[1, 2]])
    for kwargs in ({"max_new_tokens": 0}, {"max_new_tokens": 3, "temperature": -1},
                   {"max_new_tokens": 3, "top_p": 2.0}, {"max_new_tokens": 3, "top_k": 0}):
        with pytest.raises(GPT2Error):
            generate(ours, idx, **kwargs)
    with pytest.raises(GPT2Error, match="token ids"):
        generate(ours, torch.tensor([[500]]), max_new_tokens=2)


# --------------------------------------------------------------------------- streaming text


def test_text_stream_prints_whole_characters_only(tiktoken_gpt2):
    from gpt2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained()
    text = "héllo 🤖🦙 wörld 日本語"
    ids = tiktoken_gpt2.encode(text)
    s = TextStream(tok)
    pieces = [s.push(t) for t in ids] + [s.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(tiktoken_gpt2.encode("héllo  wörld 日本語"))  # emoji span tokens


def test_text_stream_cuts_before_a_stop_string_and_holds_back_its_start(tiktoken_gpt2):
    from gpt2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained()
    ids = tiktoken_gpt2.encode("The end is near. THE END\nmore")
    s = TextStream(tok, stop_strings=["END\n", "zzz"])
    pieces = [s.push(t) for t in ids]
    assert "".join(pieces) == "The end is near. THE "
    assert s.done and s.text == "The end is near. THE "
    # a partial match that does not complete is released at the end
    s = TextStream(tok, stop_strings=["near!"])
    out = "".join(s.push(t) for t in tiktoken_gpt2.encode("it is near")) + s.finish()
    assert out == "it is near"


def test_text_stream_stops_at_a_stop_token(tiktoken_gpt2):
    from gpt2.tokenizer import Tokenizer

    s = TextStream(Tokenizer.from_pretrained(), stop_tokens=[EOT])
    out = "".join(s.push(t) for t in tiktoken_gpt2.encode("ab") + [EOT, 64])
    assert out == "ab" and s.done and s.ids[-1] == EOT


# --------------------------------------------------------------------------- the command


def test_cli_streams_prompt_and_greedy_text_with_speed_on_stderr(run_cli, vocab_model,
                                                                  tiktoken_gpt2):
    prompt = "The quick brown fox"
    r = run_cli("generate", prompt, "--model", vocab_model.folder, "-n", "12", "-t", "0")
    assert r.code == 0, r.err
    ids = hf_greedy(vocab_model.model, tiktoken_gpt2.encode(prompt), 12, eos_token_id=EOT)
    ids = ids[:ids.index(EOT)] if EOT in ids else ids
    assert r.out == prompt + tiktoken_gpt2.decode(ids) + "\n"
    assert "tokens/s" in r.err and "tokens/s" not in r.out


def test_cli_asking_for_more_memory_than_there_is_is_one_line(run_cli, vocab_model):
    """torch's allocator raises a RuntimeError ("tried to allocate ... bytes"), not
    MemoryError: it came out as a traceback."""
    r = run_cli("generate", "hi", "--model", vocab_model.folder, "--num-samples", "4096",
                "-n", "10000000", "--sliding-window")  # a history of 4096 x 10M ids: 328 GB
    assert r.code == 1 and r.err.startswith("gpt2 generate: error: out of memory")
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("shell", ["gpt2 generate hi --model M -n 2 -t 0 > /dev/full",
                                   "gpt2 validate M > /dev/full",
                                   "gpt2 generate hi --model M -n 2 -t 0 >&-",
                                   "gpt2 generate -i --model M -n 2 <&-",
                                   "gpt2 tokenize hi >&-", "gpt2 tokenize - <&-",
                                   "gpt2 generate hi --model M -n 2 -t 0 2>&-"])
def test_cli_with_stdout_full_or_closed_is_one_line(vocab_model, tmp_path, shell):
    """A full device is a one-line error; a closed stdout takes the output away and a
    closed stdin reads as empty, as print() and input() would (all were tracebacks); a
    closed stderr takes away progress and statistics (which went to stdout)."""
    import subprocess
    import sys

    command = shell.replace("gpt2 ", f"{sys.executable} -m gpt2 ").replace(
        " M ", f" {vocab_model.folder} ")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "GPT2_HOME": str(tmp_path)})
    assert "Traceback" not in done.stderr, done.stderr
    if "/dev/full" in shell:  # (the line before may say the CPU kernels are being built)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].endswith(
            "error: No space left on device (writing the output)")
    else:
        assert done.returncode == 0, done.stderr
    if "2>&-" in shell:  # a closed stderr: its lines go nowhere, not into the output
        assert done.stdout.startswith("hi") and "tokens/s" not in done.stdout, done.stdout


def test_cli_json_shape(run_cli, vocab_model, tiktoken_gpt2):
    r = run_cli("generate", "Hello there", "--model", vocab_model.folder, "-n", "6",
                "--num-samples", "3", "--seed", "5", "--top-k", "40", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert set(d) == {"prompt_ids", "samples", "tokens_per_s"}
    assert d["prompt_ids"] == tiktoken_gpt2.encode("Hello there")
    assert len(d["samples"]) == 3 and d["tokens_per_s"] > 0
    for sample in d["samples"]:
        assert set(sample) == {"ids", "text"}
        assert 1 <= len(sample["ids"]) <= 6 and all(isinstance(i, int) for i in sample["ids"])
        kept = [i for i in sample["ids"] if i != EOT]
        assert sample["text"] == tiktoken_gpt2.decode(kept) or "\ufffd" in sample["text"]
    # an empty prompt: the samples continue <|endoftext|>, and prompt_ids says so
    r = run_cli("generate", "", "--model", vocab_model.folder, "-n", "2", "--seed", "5",
                "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["prompt_ids"] == [EOT]
    again = json.loads(run_cli("generate", "Hello there", "--model", vocab_model.folder, "-n",
                               "6", "--num-samples", "3", "--seed", "5", "--top-k", "40",
                               "--json").out)
    assert again["samples"] == d["samples"]


def test_cli_stop_string_is_not_printed(run_cli, vocab_model):
    base = ["generate", "A", "--model", vocab_model.folder, "-n", "15", "-t", "0"]
    full = run_cli(*base).out.removesuffix("\n")
    assert len(full) > 10
    stop = full[5:8]
    r = run_cli(*base, "--stop", stop)
    assert r.code == 0
    assert r.out == full[:full.index(stop)] + "\n"


def test_cli_several_samples_are_separated(run_cli, vocab_model):
    r = run_cli("generate", "Hi", "--model", vocab_model.folder, "-n", "4", "--num-samples", "2",
                "--seed", "1")
    assert r.code == 0
    assert r.out.count("sample 1 of 2") == 1 and r.out.count("sample 2 of 2") == 1


def test_cli_empty_prompt_and_stdin(run_cli, vocab_model, monkeypatch, tiktoken_gpt2):
    r = run_cli("generate", "--model", vocab_model.folder, "-n", "5", "-t", "0")
    assert r.code == 0
    ids = hf_greedy(vocab_model.model, [EOT], 5, eos_token_id=EOT)
    ids = ids[:ids.index(EOT)] if EOT in ids else ids
    assert r.out == tiktoken_gpt2.decode(ids) + "\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Once upon")))
    r = run_cli("generate", "-", "--model", vocab_model.folder, "-n", "3", "-t", "0")
    assert r.code == 0 and r.out.startswith("Once upon")


def test_cli_empty_prompt_without_endoftext_is_an_error(run_cli, hf_checkpoint):
    small = hf_checkpoint()  # 128 tokens: no <|endoftext|> to start from
    r = run_cli("generate", "", "--model", small.folder, "-n", "3")
    assert r.code == 1 and "does not have; give a prompt" in r.err, r.err


def test_cli_interactive_reads_prompts_until_an_empty_line(run_cli, vocab_model, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"First\nSecond\n\nThird\n")))
    r = run_cli("generate", "-i", "--model", vocab_model.folder, "-n", "3", "-t", "0")
    assert r.code == 0
    lines = r.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("First") and lines[1].startswith("Second")


def test_cli_refuses_text_that_is_not_utf8(run_cli, vocab_model, monkeypatch):
    """Bytes that are not UTF-8 would reach the tokenizer as U+FFFD: an argument (which
    Python keeps as lone surrogates) and a line of -i's stdin are refused, as files are."""
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of argv
    r = run_cli("generate", "--model", vocab_model.folder, "-n", "3", latin1)
    assert r.code == 1 and "PROMPT is not UTF-8 text" in r.err and r.out == ""
    r = run_cli("tokenize", latin1)
    assert r.code == 1 and "TEXT is not UTF-8 text" in r.err
    # each argument named as the usage line writes it, in nested subcommands too
    for args, where in ((["prepare", latin1, "--out", "x"], "FILE"),
                        (["inspect", "tokens", latin1], "TEXT"),
                        (["validate", latin1], "MODEL"), (["score", "--model", latin1, "f"],
                                                          "--model")):
        r = run_cli(*args)
        assert r.code == 1 and f"{where} is not UTF-8 text" in r.err, (args, r.err)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"fine\ncaf\xe9\n")))
    r = run_cli("generate", "-i", "--model", vocab_model.folder, "-n", "3", "-t", "0")
    assert r.code == 1 and "stdin line 2: not UTF-8 text" in r.err
    assert r.out.startswith("fine")  # the good line before it was answered


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-k", "0"], "top-k"),
    (["--repetition-penalty", "0"], "repetition penalty"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--max-new-tokens", "70"], "--sliding-window"),
    (["--max-new-tokens", str(10**20), "--sliding-window"], "from 1 to 10,000,000"),
    (["--num-samples", str(10**20)], "--num-samples must be from 1 to 4,096"),
    (["--num-samples", "0"], "--num-samples must be from 1"),
    (["--stop", ""], "stop"),
    (["--cuda-graph", "--device", "cpu"], "CUDA"),  # (a GPU machine would take it)
    (["--cuda-graph", "--device", "cpu", "--repetition-penalty", "1.2"],
     "--cuda-graph does not support"),
    (["--compile"], "add --cuda-graph"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64)"),  # torch: an overflow
])
def test_cli_bad_input_is_one_line_and_exit_1(run_cli, vocab_model, flags, message):
    r = run_cli("generate", "Hello", "--model", vocab_model.folder, *flags)
    assert r.code == 1
    assert r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith("gpt2 generate: error:")
    assert message in r.err and "Traceback" not in r.err


def test_cli_text_for_a_model_without_its_vocabulary(run_cli, hf_checkpoint, tmp_path):
    """A 128-token model whose folder has no vocabulary files: text encoded with GPT-2's
    vocabulary has ids it does not have; the message says where the vocabulary goes."""
    folder = hf_checkpoint().folder
    (tmp_path / "t.txt").write_text("hello world")
    for args in (["generate", "hello"], ["score", str(tmp_path / "t.txt")]):
        r = run_cli(*args, "--model", folder)
        assert r.code == 1 and "holds token id 31373, but" in r.err, r.err
        assert "has no vocabulary files of its own" in r.err and r.err.count("\n") == 1


def test_cli_text_for_a_model_whose_vocabulary_files_are_not_its_own(run_cli, hf_checkpoint,
                                                                        tmp_path):
    """GPT-2's 50,257-token vocabulary beside a 128-token model: the message blames the
    files that are there, not missing ones, and validate, which passes the model alone
    (ids 0..n where a folder has no vocabulary), refuses the pair."""
    import shutil

    from gpt2 import Tokenizer

    folder = tmp_path / "m"
    shutil.copytree(hf_checkpoint().folder, folder)
    Tokenizer.from_pretrained().save_pretrained(folder)
    r = run_cli("generate", "hello", "--model", folder)
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "the vocabulary files in its folder are not the model's" in r.err
    r = run_cli("validate", folder)
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "have 50257 tokens but the model 128: they are not its vocabulary" in r.err
    assert run_cli("validate", hf_checkpoint().folder).code == 0  # no vocabulary: ids 0..n


@pytest.mark.parametrize(("args", "where"), [
    (["convert", "M", ""], "DST"), (["convert", "", "x"], "SRC"),
    (["generate", "hi", "--model", ""], "--model"), (["score", "", "--model", "M"], "FILE"),
    (["prepare", "t.txt", "", "--out", "d"], "FILE"),
    (["tokenize", "--vocab", "", "hi"], "--vocab"),
    (["demo", "--out", "", "--steps", "1"], "--out"), (["eval", "-m", "M", "--data", ""], "--data"),
    (["inspect", "report", "hi", "-m", "M", "--out", ""], "--out"),
    (["download", "124M", "--dir", ""], "--dir"),
])
def test_cli_an_empty_path_is_refused_not_taken_for_here(run_cli, tmp_path, hf_checkpoint,
                                                         monkeypatch, args, where):
    """"" meant "." to the path functions: `convert M ""` wrote into the folder you are in."""
    monkeypatch.chdir(tmp_path)
    model = hf_checkpoint().folder
    r = run_cli(*[str(model) if a == "M" else a for a in args])
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert r.err.split("error: ")[1].startswith(f"{where} is empty; give ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "hi", "-n", "abc"],
     "gpt2 generate: error: argument --max-new-tokens/-n: invalid int value: 'abc' "
     "(see gpt2 generate --help)"),
    (["eval", "-m", "124M"], "gpt2 eval: error: the following arguments are required: --data "
                             "(see gpt2 eval --help)"),
    (["inspect", "attention", "hi", "--layer", "x", "--out", "a.png"],
     "gpt2 inspect attention: error: argument --layer: invalid int value: 'x' "
     "(see gpt2 inspect attention --help)"),
])
def test_cli_argument_errors_are_one_line(capsys, args, message):
    """argparse printed the whole usage block before its error."""
    from gpt2.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_cli_validate_refuses_an_empty_sample_text(run_cli, hf_checkpoint):
    r = run_cli("validate", hf_checkpoint().folder, "--text", "")
    assert r.code == 1 and "--text is empty" in r.err, r.err


def test_cli_missing_model(run_cli, tmp_path):
    r = run_cli("generate", "Hello", "--model", tmp_path / "nowhere")
    assert r.code == 1 and r.err.count("\n") == 1 and "nowhere" in r.err


def test_cli_sliding_window_allows_long_output(run_cli, vocab_model):
    r = run_cli("generate", "Hi", "--model", vocab_model.folder, "-n", "80", "--sliding-window",
                "--seed", "3", "--json")
    assert r.code == 0, r.err
    assert len(json.loads(r.out)["samples"][0]["ids"]) >= 1


# --------------------------------------------------------------------------- Python API input


def _tiny(dropout: float = 0.0) -> GPT2:
    from gpt2.config import GPT2Config

    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8, dropout=dropout))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(torch.tensor([[1.7, 2.2]]), 2), "not token ids"),
    (lambda m: m.generate(torch.tensor([[True, False]]), 2), "not token ids"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), "idx must be token ids"),
    (lambda m: m(torch.tensor([1, 2, 3])), "idx must be token ids"),
    (lambda m: m([[1, 2, 3]]), "idx must be token ids"),
    (lambda m: m(torch.tensor([[1, 2, 3]]), keep_last=0), "keep_last must be an integer >= 1"),
    (lambda m: m(torch.tensor([[1, 2, 3]]), cache=m.new_cache(2)), "the KV cache holds 2 rows"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, stop_tokens=[99]), "99 is not a token id"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, stop_tokens=[-1]), "-1 is not a token id"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, stop_tokens=[1.5]), "1.5 is not a token"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, stop_tokens="5"), "stop_tokens must be"),
    (lambda m: m.generate(torch.tensor([[1, 2, 3]]), 2,
                          attention_mask=torch.tensor([[0.5, 1, 1]])), r"only 0 \(padding\)"),
    (lambda m: m.generate(torch.tensor([[1, 2, 3]]), 2,
                          attention_mask=torch.tensor([[1, 0, 1]])), "a gap inside the prompt"),
    (lambda m: StaticDecoder(m, batch_size=1, max_len=8, dtype="int8"), "unknown dtype"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, temperature="0.5"), "temperature must be"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, top_p="0.5"), "top-p must be a number"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, repetition_penalty=None),
     "repetition penalty must be a number"),
    # a penalty that overflows float32: the logits went NaN and every sample was
    # <|endoftext|> (found by an audit)
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, repetition_penalty=1e-40),
     "from 1e-06 to 1e"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, repetition_penalty=1e300),
     "from 1e-06 to 1e"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), 2, attention_mask=[[1, 1]]),
     "attention_mask must be a tensor"),
    (lambda m: generate_batch(m, ["hello"], max_new_tokens=2), "list of token-id lists"),
    (lambda m: generate_batch(m, [1, 2, 3], max_new_tokens=2), "list of token-id lists"),
    (lambda m: generate_batch(m, torch.tensor([[1, 2]]), max_new_tokens=2), "use generate"),
    (lambda m: generate_batch(m, [[1.5, 2]], max_new_tokens=2), "must hold token ids"),
])
def test_bad_python_api_input_is_a_gpt2error(call, message):
    """Found by an audit: these ran on silently (float ids truncated, stop ids or mask
    values that can never match, all positions for keep_last=0) or failed deep in torch."""
    with pytest.raises(GPT2Error, match=message) as e:
        call(_tiny())
    assert "\n" not in str(e.value)


def test_a_temperature_too_small_for_float32_is_greedy():
    """1e-300 is 0 in float32: dividing by it made the logits NaN, and every sample the
    last id. The limit of a vanishing temperature is the argmax."""
    model = _tiny()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(idx, 5, temperature=0.0)
    for t in (1e-300, 5e-324):
        assert torch.equal(model.generate(idx, 5, temperature=t, seed=0), greedy)


def test_a_top_p_too_small_for_float32_keeps_the_top_token():
    """top_p = 1e-46 is 0 in float32: the nucleus was empty and indexing it failed."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0]])
    for p in (1e-46, 5e-324):
        for adaptive in (True, False):
            kept = apply_top_p(logits, p, adaptive=adaptive)
            assert kept.isfinite().tolist() == [[False, True, False, False]]  # the lower id
    model = _tiny()
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 4, top_p=1e-46, seed=0),
                       model.generate(idx, 4, temperature=0.0))


@pytest.mark.parametrize("hooks, message", [
    ({"blocks.0.attn.z": 3}, "is not a function"),
    ({"blocks.0.attn.z": lambda z: 3}, "returned int; return a float tensor"),
    ({"blocks.0.attn.z": lambda z: z.long()}, "returned Tensor of torch.int64"),
    ({"blocks.0.resid_post": lambda z: z.double()},  # (LayerNorm failed on it)
     "returned a torch.float64 tensor on cpu, but its input was torch.float32"),
    ([("blocks.0.attn.z", None)], "hooks takes a dict"),
])
def test_bad_hooks_are_a_gpt2error(hooks, message):
    model = _tiny()
    with pytest.raises(GPT2Error, match=message), model.hooks(hooks):
        model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(GPT2Error, match="names must be activation names"):
        model.run_with_cache(torch.tensor([[1, 2]]), names=3)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.new_cache(-1), "batch_size must be an integer >= 1"),
    (lambda m: m.new_cache(1, max_len=0), "max_len must be an integer >= 1"),
    (lambda m: m.new_cache(1).crop(-3), "crop takes a length >= 0"),
    (lambda m: __import__("gpt2.quantize").quantize.quantize_model(torch.nn.Linear(4, 4)),
     "quantize_model takes a GPT2 model"),
])
def test_bad_cache_and_quantize_arguments_are_a_gpt2error(call, message):
    with pytest.raises(GPT2Error, match=message):
        call(_tiny())


def test_kv_cache_past_its_length_is_a_gpt2error():
    model = _tiny()
    cache = model.new_cache(1, max_len=4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(GPT2Error, match="KV cache is full: 5 positions > max_len 4"):
        model(torch.tensor([[4, 5]]), cache=cache)


def test_generate_on_a_training_model_runs_without_dropout_and_keeps_its_mode():
    """Dropout made greedy decoding differ between calls; the model is put in eval mode
    for the call and back in training mode after it."""
    model = _tiny(dropout=0.5).train()
    idx = torch.tensor([[1, 2, 3]])
    runs = [model.generate(idx, 5, temperature=0.0) for _ in range(4)]
    assert model.training
    model.eval()
    assert all(torch.equal(r, model.generate(idx, 5, temperature=0.0)) for r in runs)


def test_an_int8_model_refuses_negative_ids_and_bf16():
    """Its embedding indexed weight[idx], where -1 read the last row."""
    from gpt2.config import GPT2Config
    from gpt2.quantize import prepare_bf16, quantize_model

    model = quantize_model(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96)), "int8")
    with pytest.raises(IndexError):  # as nn.Embedding does for the float model
        model.wte(torch.tensor([[-1]]))
    with pytest.raises(GPT2Error, match="token id -1 is out of range"):  # the model, first
        model(torch.tensor([[-1]]))
    with pytest.raises(GPT2Error, match="this model is quantized"):
        prepare_bf16(model)


@pytest.mark.parametrize("call", [
    lambda m: generate(m, torch.tensor([[1]]), max_new_tokens=1),
    lambda m: generate_batch(m, [[1]], max_new_tokens=1),
    lambda m: __import__("gpt2").score(m, [1, 2, 3]),
    lambda m: __import__("gpt2.inspect").inspect.attention_patterns(m, [1, 2]),
    lambda m: __import__("gpt2.inspect").inspect.logit_lens(m, [1, 2]),
    lambda m: __import__("gpt2.inspect").inspect.ablate_heads(m, [1, 2]),
    lambda m: StaticDecoder(m, batch_size=1),
], ids=["generate", "generate_batch", "score", "attention", "lens", "ablate", "static"])
def test_a_module_that_is_not_gpt2_is_one_clear_error(call):
    """Found by an audit: another module failed with an AttributeError from inside."""
    with pytest.raises(GPT2Error, match="expected a gpt2.GPT2 model .* got Linear"):
        call(torch.nn.Linear(4, 4))


def test_sliding_window_takes_a_bool():
    with pytest.raises(GPT2Error, match="sliding_window must be True or False, got 'no'"):
        generate(_tiny(), torch.tensor([[1]]), max_new_tokens=1, sliding_window="no")


# --------------------------------------------------------------------------- padded vocabularies


@pytest.fixture(scope="module")
def padded_pair():
    """(a model with 64 logits, the same model cut to its first 50 ids). The 14 extra
    embedding rows are scaled up, so without a limit their ids win most steps."""
    from gpt2.config import GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_vocab=64, n_ctx=32)
    big = GPT2(config).eval()
    with torch.no_grad():
        big.wte.weight[50:] *= 6
    small = GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_vocab=50, n_ctx=32)).eval()
    state = big.state_dict()
    state["wte.weight"] = state["wte.weight"][:50].clone()
    small.load_state_dict(state)
    return big, small


SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.3), dict(temperature=0.9, top_k=7),
             dict(temperature=1.0, top_p=0.8), dict(temperature=0.0, repetition_penalty=1.5),
             dict(temperature=1.2, repetition_penalty=1.3, top_k=20)]


def test_padded_vocabulary_would_emit_its_extra_ids(padded_pair):
    big, _ = padded_pair
    out = generate(big, torch.tensor([[1, 2, 3]]), max_new_tokens=16, temperature=1.0, seed=0)
    assert (out[0, 3:] >= 50).any()  # what vocab_size is for


@pytest.mark.parametrize("options", SAMPLINGS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_vocab_size_samples_as_the_model_cut_to_it(padded_pair, options):
    """vocab_size=50 on the 64-logit model gives the tokens of the model whose
    embedding holds only the first 50 rows: same seed, same tokens."""
    big, small = padded_pair
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for seed in range(3):
        ours = generate(big, prompt, max_new_tokens=12, seed=seed, vocab_size=50, **options)
        cut = generate(small, prompt, max_new_tokens=12, seed=seed, **options)
        assert ours.tolist() == cut.tolist()
    rows = generate_batch(big, [[1, 2], [3]], max_new_tokens=8, seed=1, vocab_size=50,
                          **options)
    assert rows == generate_batch(small, [[1, 2], [3]], max_new_tokens=8, seed=1, **options)


def test_vocab_size_in_the_static_decoder(padded_pair):
    """Greedy: the cut model's tokens. Sampled: its noise is drawn for all 64 logits, so
    the draws differ from the cut model's; no id past 50 (most rows had one without)."""
    big, small = padded_pair
    prompt = torch.tensor([[1, 2, 3]] * 4)
    decoder = StaticDecoder(big, batch_size=4, max_len=20)
    ours = decoder.generate(prompt, max_new_tokens=10, temperature=0.0, vocab_size=50)
    cut = StaticDecoder(small, batch_size=4, max_len=20).generate(
        prompt, max_new_tokens=10, temperature=0.0)
    assert ours.tolist() == cut.tolist()
    free = decoder.generate(prompt, max_new_tokens=16, temperature=1.1, seed=3)
    assert (free[:, 3:] >= 50).any(dim=1).sum() >= 2
    for seed in range(5):
        limited = decoder.generate(prompt, max_new_tokens=16, temperature=1.1, top_k=30,
                                   seed=seed, vocab_size=50)
        assert int(limited.max()) < 50


@pytest.mark.parametrize("bad", [0, -1, 65, True, 2.5, "50"])
def test_vocab_size_is_checked(padded_pair, bad):
    big, _ = padded_pair
    with pytest.raises(GPT2Error, match="vocab_size"):
        generate(big, torch.tensor([[1]]), max_new_tokens=2, vocab_size=bad)
    with pytest.raises(GPT2Error, match="vocab_size"):
        StaticDecoder(big, batch_size=1, max_len=8).generate(
            torch.tensor([[1]]), max_new_tokens=2, vocab_size=bad)


@pytest.fixture(scope="module")
def nanogpt_shaped(tmp_path_factory):
    """A transformers model over GPT-2's vocabulary with its embedding padded to 50,304
    rows, as nanoGPT trains it; the 47 extra rows scaled up so their ids would win."""
    from conftest import make_hf_model
    from gpt2.config import GPT2Config

    model = make_hf_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_vocab=50304, n_ctx=64),
                          std=0.3)
    with torch.no_grad():
        model.transformer.wte.weight[50257:] *= 8
    folder = tmp_path_factory.mktemp("nanogpt-shaped")
    model.save_pretrained(folder)
    return folder, model


def test_cli_samples_only_ids_the_tokenizer_has(run_cli, nanogpt_shaped, tiktoken_gpt2):
    """Oracle: transformers' generate with the 47 extra ids suppressed."""
    folder, hf = nanogpt_shaped
    prompt = "The quick brown fox"
    with torch.no_grad():
        logits = hf(torch.tensor([tiktoken_gpt2.encode(prompt)])).logits[0, -1]
    assert int(logits.argmax()) >= 50257  # unrestricted, greedy would pick an extra id
    r = run_cli("generate", prompt, "--model", folder, "-n", "12", "-t", "0")
    assert r.code == 0, r.err
    ids = hf_greedy(hf, tiktoken_gpt2.encode(prompt), 12, eos_token_id=EOT,
                    suppress_tokens=list(range(50257, 50304)))
    ids = ids[:ids.index(EOT)] if EOT in ids else ids
    assert r.out == prompt + tiktoken_gpt2.decode(ids) + "\n"
    r = run_cli("generate", prompt, "--model", folder, "-n", "40", "-t", "1.5", "--seed", "1",
                "--json")
    assert r.code == 0, r.err
    assert all(i < 50257 for i in json.loads(r.out)["samples"][0]["ids"])


def test_cli_inspect_labels_ids_past_the_tokenizer(run_cli, nanogpt_shaped, tiktoken_gpt2):
    """inspect shows what the model predicts, extra ids included, as <id N>."""
    folder, hf = nanogpt_shaped
    text = "The quick brown fox"
    with torch.no_grad():
        top = hf(torch.tensor([tiktoken_gpt2.encode(text)])).logits[0, -1].topk(3).indices
    r = run_cli("inspect", "next", text, "-m", folder, "--top", "3", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [row["id"] for row in rows] == top.tolist()
    assert [row["token"] for row in rows] == [f"<id {i}>" for i in top.tolist()]
    r = run_cli("inspect", "next", text, "-m", folder, "--top", "3")
    assert r.code == 0, r.err
    assert f"<id {int(top[0])}>" in r.out


def test_cli_interactive_goes_on_after_a_line_that_fails(run_cli, vocab_model, monkeypatch):
    """A prompt longer than the context is reported and the next line answered; the exit
    status says one failed."""
    long_line = " ".join(["word"] * 80).encode()  # 80 tokens: the context is 64
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        b"First\n" + long_line + b"\ncaf\xe9\nSecond\n\n")))
    r = run_cli("generate", "-i", "--model", vocab_model.folder, "-n", "3", "-t", "0")
    assert r.code == 1
    lines = r.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("First") and lines[1].startswith("Second")
    errors = [e for e in r.err.splitlines() if "error" in e]
    assert len(errors) == 2
    assert errors[0].startswith("gpt2 generate: error: stdin line 2: prompt (80 tokens)")
    assert "stdin line 3: not UTF-8 text" in errors[1]


def test_text_stream_takes_lists_not_one_string():
    """A str of stop strings was taken letter by letter: "\\n\\n" stopped at one newline."""
    from gpt2 import Tokenizer
    from gpt2.generate import TextStream

    tok = Tokenizer.from_pretrained()
    for kwargs, message in [({"stop_strings": "\n\n"}, "wrap one in a list"),
                            ({"stop_strings": None}, "stop_strings takes a list of strings"),
                            ({"stop_strings": [1]}, "stop_strings takes a list of strings"),
                            ({"stop_tokens": 5}, "stop_tokens takes a list of token ids")]:
        with pytest.raises(GPT2Error, match=message):
            TextStream(tok, **kwargs)
    stream = TextStream(tok, stop_strings=(s for s in ["\n\n"]))  # any iterable
    for i in tok.encode("Hi\nthere\n\nbye"):
        stream.push(i)
    stream.finish()
    assert stream.text == "Hi\nthere"


def test_stop_tokens_take_numpy_and_tensor_ids_as_a_list():
    """numpy ids were refused as "not a token id" (top_k, seed and others take them)."""
    import numpy as np

    from gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_ctx=32, n_vocab=16)).eval()
    idx = torch.tensor([[1, 2, 3]])
    free = model.generate(idx, max_new_tokens=8, temperature=0.0)[0, 3:].tolist()
    stop = free[2]
    expected = model.generate(idx, max_new_tokens=8, temperature=0.0, stop_tokens=[stop])
    assert expected.size(1) == 3 + free.index(stop) + 1  # it does stop early
    for ids in (np.array([stop]), np.int64(stop), torch.tensor([[stop]]), [np.int32(stop)]):
        assert torch.equal(model.generate(idx, max_new_tokens=8, temperature=0.0,
                                          stop_tokens=ids), expected)


def test_stream_leaves_the_callers_modes_alone_between_tokens(small):
    """The caller's code between two tokens of `stream` runs in its own modes: grad on,
    no inference mode, a training model in training mode (stream held them on across
    its yields: tensors made there were inference tensors, and two streams advanced in
    turn failed). Two streams in turn give the tokens each gives alone (oracle:
    transformers' greedy tokens)."""
    model, hf = small
    model.train()
    try:
        a = stream(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, temperature=0.0)
        b = stream(model, torch.tensor([[4, 5]]), max_new_tokens=7, temperature=0.0)
        got: dict = {"a": [], "b": []}
        for i in range(7):
            for name, it in (("a", a), ("b", b)):
                if name == "a" and i >= 3:
                    continue
                got[name].append(next(it).item())
                assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                assert model.training and not torch.zeros(1).is_inference()
        for it in (a, b):
            with pytest.raises(StopIteration):
                next(it)
    finally:
        model.eval()
    assert got == {"a": hf_greedy(hf, [1, 2, 3], 3), "b": hf_greedy(hf, [4, 5], 7)}
