"""Training: the loop learns, resumes exactly, survives kill -9, fine-tunes any layout.

Oracles: closed-form schedules, transformers' GPT2LMHeadModel reading the
checkpoints we write (and its loss on the same windows), and uninterrupted runs
compared with interrupted ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.model import GPT2
from gpt2.train.checkpoint import latest_checkpoint, load_training_state
from gpt2.train.data import prepare
from gpt2.train.trainer import TrainConfig, lr_at, param_groups, train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: a second intra-op thread only adds synchronisation, and on a
    # busy machine a descheduled thread stalls every op
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tokens(folder: Path, train_ids, val_ids, *, n_vocab: int) -> Path:
    """Token files in the documented format, written by hand (no tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train_ids, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val_ids, dtype=np.uint16).tofile(folder / "val.bin")
    meta = {"dtype": "uint16", "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "n_vocab": n_vocab}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def synthetic(folder: Path, *, n: int = 4000, n_vocab: int = 64, seed: int = 0) -> Path:
    # a noisy periodic sequence: learnable, not trivial
    rng = np.random.default_rng(seed)
    base = np.tile(rng.integers(0, n_vocab, 37), n // 37 + 1)[:n]
    noise = rng.random(n) < 0.1
    ids = np.where(noise, rng.integers(0, n_vocab, n), base)
    return write_tokens(folder, ids[: n * 9 // 10], ids[n * 9 // 10:], n_vocab=n_vocab)


def with_gpt2_vocab(folder: Path) -> Path:
    """Mark hand-written token files as made with GPT-2's vocabulary: a run on them writes
    OUT/.vocab, as on files made by `gpt2 prepare`."""
    from gpt2.tokenizer import Tokenizer

    meta = json.loads((folder / "meta.json").read_text())
    meta["vocab_sha256"] = Tokenizer.from_pretrained().sha256()
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


@pytest.fixture(scope="module")
def topics_data(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("topics")
    text = folder / "topics.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    prepare([text], out=folder / "data", val_fraction=0.05, progress=False)
    return folder / "data"


# --- pure pieces ----------------------------------------------------------------------


def test_lr_schedule_is_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [lr_at(s, **kw) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way: mean of lr and min_lr
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_weight_decay_on_matrices_only():
    from gpt2.config import GPT2Config

    model = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_vocab=32, n_ctx=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(f"h.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_padded_head_gives_the_loss_and_gradients_of_the_plain_head():
    """The GPU training head (wte padded to a multiple of 64 rows, extra logits sliced off) against
    the plain x @ wte.T: same loss, same gradients for x and wte, through lm_loss."""
    from gpt2.model import _padded_head
    from gpt2.train.trainer import lm_loss

    gen = torch.Generator().manual_seed(0)
    wte = torch.randn(50, 16, generator=gen)  # 50 rows: padded with 14 to 64
    x = torch.randn(2, 5, 16, generator=gen)
    y = torch.randint(0, 50, (2, 5), generator=gen)
    grads = []
    for head in (lambda x, w: x @ w.T, lambda x, w: _padded_head(x, w, 64)):
        w, h = wte.clone().requires_grad_(), x.clone().requires_grad_()
        logits = head(h, w)
        assert logits.shape == (2, 5, 50)
        loss = lm_loss(logits, y)  # a strided view must work here (fp32 runs: no copy)
        loss.backward()
        grads.append((loss.detach(), w.grad, h.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_full_width_loss_gives_the_loss_and_gradients_of_the_plain_head(request, monkeypatch,
                                                                        fused):
    """ModelLoss over the padded head's logits (pad at -inf, what GPU training runs) against
    the plain loss over x @ wte.T: same loss, same gradient for every parameter; through
    F.cross_entropy, and through gpt2.gpu_kernels.cross_entropy (the GPU's loss; on a
    GPU where there is one, else through Triton's interpreter)."""
    import gpt2.train.trainer
    from gpt2 import gpu_kernels
    from gpt2.model import full_width_head
    from gpt2.train.trainer import ModelLoss

    monkeypatch.setattr(gpt2.train.trainer, "FUSED_LOSS_ON_GPU", fused)
    used = []  # calls of the fused loss
    device = "cpu"
    if fused:
        device = request.getfixturevalue("triton_device")  # skips without Triton
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(gpu_kernels, "cross_entropy",
                            lambda *a, real=gpu_kernels.cross_entropy: used.append(1) or real(*a))

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_vocab=1000, n_ctx=64))
    model = model.train().to(device)
    model.drop.p = 0.0  # the two passes must see the same network
    x = torch.randint(0, 1000, (3, 33), device=device)
    logits = full_width_head(torch.randn(2, 64, device=device), model.wte.weight)
    assert logits.shape == (2, 1024) and torch.isinf(logits[:, 1000:]).all()  # 24 pad columns
    results = []
    for full in (False, True):
        model.zero_grad()
        loss = ModelLoss(model, full_width=full)(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (full, full_grads) = results
    assert torch.isfinite(full) and len(used) == int(fused)
    torch.testing.assert_close(full, plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(full_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_model_loss_of_a_float64_model_is_taken_in_float64():
    """A float64 model's loss (plain or full-width head) is computed in float64, as
    F.cross_entropy gives it on the float64 logits (it was rounded to float32, and the
    full-width head raised a dtype error)."""
    from gpt2.train.trainer import ModelLoss

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_vocab=100, n_ctx=16)).double()
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1),
                                                 x[:, 1:].flatten())
    for full in (False, True):
        loss = ModelLoss(model, full_width=full)(x[:, :-1], x[:, 1:])
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss.detach(), want, atol=1e-12, rtol=0)


def test_model_loss_takes_the_plain_head_on_a_cpu():
    """The full-width loss is for GPU training only: on a CPU the loss is over model(x)."""
    from gpt2.train.trainer import ModelLoss

    model = GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_vocab=100, n_ctx=16))
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = counting
    x = torch.randint(0, 100, (2, 9))
    ModelLoss(model)(x[:, :-1], x[:, 1:])
    assert calls == [1]


# --- learning -------------------------------------------------------------------------


def test_overfits_one_batch(tmp_path):
    # block_size + 1 tokens: every sampled window is this one window
    ids = np.random.default_rng(1).integers(0, 64, 17)
    data = write_tokens(tmp_path / "d", ids, ids, n_vocab=64)
    s = train(TrainConfig(data=str(data), out=str(tmp_path / "o"), **TINY, max_steps=150,
                          lr=1e-2, warmup_steps=10, weight_decay=0.0, eval_interval=0,
                          device="cpu"))
    first = losses(tmp_path / "o")[1]
    assert first > 3.5  # about ln(64) = 4.16 at the start
    assert s.last_loss < 0.05 and s.val_loss < 0.05


def test_short_run_on_real_text_lowers_val_loss(tmp_path, topics_data):
    out = tmp_path / "run"
    s = train(TrainConfig(data=str(topics_data), out=str(out), n_layer=2, n_head=2, n_embd=32,
                          block_size=32, batch_size=8, max_steps=80, lr=1e-2, warmup_steps=5,
                          eval_interval=40, eval_steps=4, device="cpu", progress=False))
    vals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(vals) == 2
    assert s.val_loss < math.log(50257) - 3.5, vals  # from 10.8 to below 7.3
    assert (out / "loss.png").is_file()
    # OUT is a Hugging Face folder: transformers reads it and agrees with our model
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    ours = GPT2.from_pretrained(out)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["val_loss"] == pytest.approx(min(vals))
    GPT2.from_pretrained(out / "best")
    # files are published by atomic renames, each saved twice here: no temporary names
    assert [p.name for p in out.rglob(".*") if p.name != ".vocab"] == []


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_reproduces_uninterrupted_losses(tmp_path, dropout):
    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=8, lr=3e-3, warmup_steps=2, grad_accum=2,
              dropout=dropout, eval_interval=4, eval_steps=2, device="cpu")
    whole = tmp_path / "whole"
    train(TrainConfig(out=str(whole), **kw))
    parts = tmp_path / "parts"
    train(TrainConfig(out=str(parts), stop_at=4, **kw))
    assert sorted(losses(parts)) == [1, 2, 3, 4]
    train(TrainConfig(out=str(parts), resume=True, **kw))
    a, b = losses(whole), losses(parts)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0), step
    assert a[8] < a[1]
    state = load_training_state(latest_checkpoint(parts))
    assert state.step == 8 and state.info["tokens_seen"] == 8 * 2 * 4 * 16


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    data = synthetic(tmp_path / "d")
    out = tmp_path / "o"
    kw = dict(data=str(data), out=str(out), **TINY, max_steps=6, save_interval=2,
              eval_interval=0, device="cpu")
    train(TrainConfig(stop_at=2, **kw))
    before = {p.name: p.read_bytes() for p in (out / "ckpt-0000002").iterdir()}
    root_weights = (out / "model.safetensors").read_bytes()

    import gpt2.weights.huggingface as hf_module

    real = hf_module.write_safetensors

    def dies_on_optimizer(path, tensors, **kwargs):
        if path.name == "optimizer.safetensors":
            real(path.with_name("optimizer.part"), tensors)  # half-way through the checkpoint
            raise KeyboardInterrupt
        return real(path, tensors, **kwargs)

    monkeypatch.setattr(hf_module, "write_safetensors", dies_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(resume=True, **kw))
    assert latest_checkpoint(out).name == "ckpt-0000002"
    # and the checkpoint it was writing is gone, not left for a later run (1.4 GB for 124M)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    after = {p.name: p.read_bytes() for p in (out / "ckpt-0000002").iterdir()}
    assert after == before
    assert (out / "model.safetensors").read_bytes() == root_weights
    GPT2.from_pretrained(out)
    monkeypatch.setattr(hf_module, "write_safetensors", real)
    # what a run killed (SIGKILL) while saving leaves: the next save removes it
    for left in (out / "..ckpt-0000002.partial.x1y2z3", out / ".ckpt-0000004.partial",
                 out / "..best.partial.a1b2c3"):
        left.mkdir()
        (left / "model.safetensors").write_bytes(b"half")
    s = train(TrainConfig(resume=True, **kw))  # and the run goes on from step 2
    assert s.step == 6 and latest_checkpoint(out).name == "ckpt-0000006"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


_SAVE_LOOP = """
import sys, torch
from pathlib import Path
from gpt2.config import GPT2Config
from gpt2.config import GPT2Config
from gpt2.model import GPT2
from gpt2.train.checkpoint import save_checkpoint
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
model = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_vocab=2000, n_ctx=64))
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long)).sum().backward(); opt.step()
print("ready", flush=True)
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.wte.weight.fill_(float(step))
    save_checkpoint(out, step=step, model_state=model.state_dict(), config=model.config,
                    vocab_dir=None, optimizer_state=opt.state_dict(),
                    info={"args": {}}, rng={"torch_cpu": torch.get_rng_state()})
    if step == 1:
        print("saved", flush=True)  # one whole checkpoint exists; the kill may come now
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "o"
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(out)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        # wait for a first whole checkpoint (a loaded machine may take seconds), then kill
        # at a random moment of the saving loop
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(rng.random() * 1.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None
        state = load_training_state(ckpt)
        model = GPT2.from_pretrained(ckpt)
        assert float(model.wte.weight[0, 0].detach()) == state.step  # weights belong to that step
        root = GPT2.from_pretrained(out)  # the top-level copy is whole, maybe one step behind
        assert float(root.wte.weight[0, 0].detach()) in (state.step, state.step - 1)


# --- fine-tuning ----------------------------------------------------------------------


def test_init_weights_holding_nan_are_named_not_blamed_on_the_learning_rate(
        tmp_path, hf_checkpoint, topics_data):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(hf_checkpoint(n_layer=2, n_embd=32, n_head=2, n_vocab=50257,
                                  n_ctx=64).folder, folder)
    state = load_file(folder / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.bias"][3] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GPT2Error, match=r"nan: h\.1\.mlp\.c_fc\.bias holds NaN or infinite "
                                        r"values: the weights are damaged"):
        train(TrainConfig(data=str(topics_data), out=str(tmp_path / "o"), init=str(folder),
                          block_size=32, batch_size=2, max_steps=2, device="cpu",
                          progress=False))
    assert not (tmp_path / "o").exists()


def test_finetune_hf_checkpoint_then_generate(tmp_path, hf_checkpoint, topics_data, run_cli):
    ckpt = hf_checkpoint(n_layer=2, n_embd=32, n_head=2, n_vocab=50257, n_ctx=64)
    out = tmp_path / "ft"
    s = train(TrainConfig(data=str(topics_data), out=str(out), init=str(ckpt.folder),
                          block_size=32, batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3,
                          eval_interval=0, eval_steps=4, device="cpu", progress=False))
    log = losses(out)
    assert np.mean([log[s] for s in (28, 29, 30)]) < np.mean([log[s] for s in (1, 2, 3)]) - 1
    model = GPT2.from_pretrained(out)
    assert model.config.n_ctx == 64 and model.config.n_layer == 2  # the pretrained shape
    # the fine-tuned weights moved away from the pretrained ones
    assert not torch.equal(model.wte.weight, ckpt.model.transformer.wte.weight)
    r = run_cli("generate", "--model", out, "--max-new-tokens", "5", "--seed", "0", "Hello")
    assert r.code == 0, r.err
    assert r.out.startswith("Hello")
    assert s.val_loss is not None
    # its shape came from --init: a shape flag on --resume says so, not "the run's: 6"
    r = run_cli("train", "--out", out, "--resume", "--n-layer", "9", "-q")
    assert r.code == 1 and f"came from --init {ckpt.folder}, whose shape it keeps" in r.err


def test_samples_of_a_model_with_more_logits_than_tokens(tmp_path, topics_data):
    """A model whose embedding is padded past the tokenizer (nanoGPT's 50,304 rows) samples
    only ids the tokenizer has: its 47 extra rows are scaled up here so that, without the
    limit, the first sample would hold one, and decoding it failed the run."""
    from conftest import make_hf_model

    model = make_hf_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_vocab=50304, n_ctx=64),
                          std=0.3)
    with torch.no_grad():
        model.transformer.wte.weight[50257:] *= 8
    model.save_pretrained(tmp_path / "init")
    out = tmp_path / "ft"
    train(TrainConfig(data=str(topics_data), out=str(out), init=str(tmp_path / "init"),
                      block_size=32, batch_size=2, max_steps=2, lr=1e-5, warmup_steps=1,
                      eval_interval=0, eval_steps=1, sample_interval=1, sample_tokens=24,
                      device="cpu", progress=False))
    samples = (out / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and len(samples) > 60


def test_samples_longer_than_the_context_are_as_long_as_asked(tmp_path, topics_data):
    """--sample-tokens past the model's context (block size 8 here) slides the window
    rather than cutting the sample to 7 tokens without a word."""
    from gpt2.tokenizer import Tokenizer

    out = tmp_path / "o"
    train(TrainConfig(data=str(topics_data), out=str(out), n_layer=1, n_head=2, n_embd=16,
                      block_size=8, batch_size=2, max_steps=1, eval_interval=0, eval_steps=1,
                      sample_interval=1, sample_tokens=30, device="cpu", progress=False))
    text = (out / "samples.txt").read_text().split("===\n", 1)[1].removesuffix("\n")
    n = len(Tokenizer.from_pretrained().encode(text, allowed_special="all"))
    assert n >= 25, (n, text)  # 30 tokens (decoded and encoded again: merges may differ)


def test_finetune_openai_layout(tmp_path, tf_fixture, topics_data, run_cli):
    out = tmp_path / "ft"
    train(TrainConfig(data=str(topics_data), out=str(out), init=str(tf_fixture("vocab")),
                      block_size=32, batch_size=8, max_steps=25, lr=1e-2, warmup_steps=3,
                      eval_interval=0, eval_steps=2, device="cpu", progress=False))
    log = losses(out)
    assert np.mean([log[s] for s in (23, 24, 25)]) < np.mean([log[s] for s in (1, 2, 3)]) - 0.5
    r = run_cli("generate", "--model", out, "--max-new-tokens", "4", "--seed", "0", "Hi")
    assert r.code == 0, r.err


def test_eval_command_matches_transformers(tmp_path, hf_checkpoint, topics_data, run_cli):
    ckpt = hf_checkpoint(n_layer=2, n_embd=32, n_head=2, n_vocab=50257, n_ctx=64)
    r = run_cli("eval", "--model", ckpt.folder, "--data", topics_data, "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)
    val = np.fromfile(topics_data / "val.bin", dtype=np.uint16).astype(np.int64)
    # oracle: windows of 64 inputs predicting the next 64 tokens, HF computing the loss
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(val) - 1, 64):
            x = torch.from_numpy(val[b: b + 64])
            y = torch.from_numpy(val[b + 1: b + 65])
            logits = ckpt.model(x[None, : len(y)]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    assert got["tokens"] == n == len(val) - 1
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


# --- bad input ------------------------------------------------------------------------


def _args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "8", "--batch-size", "2", "--max-steps", "2",
            "--eval-interval", "0", "--device", "cpu", "-q", *extra]


@pytest.fixture(scope="module")
def vocab_data(tmp_path_factory) -> Path:
    return with_gpt2_vocab(synthetic(tmp_path_factory.mktemp("vocab") / "d", n_vocab=50257))


_SEED_RANGE = "--seed must be an integer from 0 to 2**64 - 1"
_MIN_LR_RANGE = "--min-lr must be between 0 and --lr"
# name -> (the flags after _args(DATA, OUT) or the whole argument list, the message); in
# the lists, DATA, OUT, TEXT (a text file), NOPE (no such path), INIT (a TF checkpoint
# with GPT-2's vocabulary, context 128) and TINY (one with a 16-token vocabulary)
BAD_INPUTS = {
    "missing data": (["--data", "NOPE"], "no such data folder"),
    "empty data": (["--data", "EMPTY"], "no meta.json"),
    "unwritable out": (["--out", "BLOCKED"], "cannot write here"),
    "block above context": (["--init", "INIT", "--block-size", "256"], "longer than the context"),
    "ids out of range": (["--init", "TINY"], "out of range"),
    "resume nothing": (["--resume"], "no checkpoint"),
    "negative seed": (["--seed", "-1"], _SEED_RANGE),
    "huge seed": (["--seed", str(10**23)], _SEED_RANGE),
    "negative min lr": (["--min-lr", "-1"], _MIN_LR_RANGE),
    "min lr above lr": (["--lr", "1e-3", "--min-lr", "1e-2"], _MIN_LR_RANGE),
    "stop at 0": (["--stop-at", "0"], "--stop-at must be at least 1"),
    "stop at -1": (["--stop-at", "-1"], "--stop-at must be at least 1"),
    "no sample tokens": (["--sample-tokens", "0", "--sample-interval", "1"],
                         "--sample-tokens must be at least 1"),
    "data is a file": (["--data", "TEXT"], "TEXT: is a file, not a data folder; make one from "
                       "it with `gpt2 prepare TEXT --out DIR`, then pass --data DIR"),
    "eval data is a file": (["eval", "--model", "124M", "--data", "TEXT"],
                            "TEXT: is a file, not a data folder"),
    "heads do not divide": (["--n-head", "3"], "--n-embd 16 must be a multiple of --n-head 3"),
    "no such init": (["--init", "NOPE"], "neither an existing file"),
    "shape with init": (["--init", "INIT", "--n-layer", "1", "--n-embd", "32"],
                        "--n-layer: the shape of a model trained from scratch; --init"),
    "block above data": (["--block-size", "100000"], "fewer than --block-size + 1"),
    "empty out": (["--out", ""], "--out is empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_errors(tmp_path, run_cli, tf_fixture, vocab_data, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "t.txt").write_text("some text\n")
    out = tmp_path / "out"
    names = {"DATA": vocab_data, "OUT": out, "TEXT": tmp_path / "t.txt",
             "NOPE": tmp_path / "nope", "EMPTY": tmp_path / "empty",
             "BLOCKED": tmp_path / "file" / "sub",  # inside a file: cannot exist, even for root
             "INIT": tf_fixture("vocab"), "TINY": tf_fixture("tiny")}
    flags, expect = BAD_INPUTS[case]
    flags = [str(names.get(f, f)) for f in flags]
    base = _args(vocab_data, out)
    if "--init" in flags and "--n-layer" not in flags:  # (the shape flags are for scratch)
        for flag in ("--n-layer", "--n-head", "--n-embd"):
            i = base.index(flag)
            del base[i:i + 2]
    args = flags if flags[0] == "eval" else [*base, *flags]
    for name, value in names.items():
        expect = expect.replace(name, str(value))
    r = run_cli(*args)
    assert r.code == 1 and expect in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    # a failed run leaves no folder behind (nor OUT/.vocab, log.jsonl)
    assert not out.exists(), [p.name for p in out.iterdir()]


def test_a_failed_run_leaves_out_as_it_found_it(tmp_path, monkeypatch):
    """A run that fails before it saved a model takes away what it wrote, and only that;
    once it has saved a checkpoint, the run stays, to be resumed."""
    import gpt2.train.trainer as trainer

    data = with_gpt2_vocab(synthetic(tmp_path / "d", n_vocab=50257))
    real, calls, meanwhile = trainer.sample_batch, [], []

    def fails_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            for path in meanwhile:  # someone else's file, written while the run ran
                path.write_text("theirs")
            raise GPT2Error("bad batch")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "sample_batch", fails_at_step_3)
    kw = dict(data=str(data), n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2,
              max_steps=5, eval_interval=0, device="cpu", progress=False)
    with pytest.raises(GPT2Error, match="bad batch"):
        train(TrainConfig(out=str(tmp_path / "new" / "run"), **kw))
    assert not (tmp_path / "new").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(GPT2Error, match="bad batch"):
        train(TrainConfig(out=str(used), **kw))
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    calls.clear()
    meanwhile.append(tmp_path / "busy" / "theirs.txt")
    with pytest.raises(GPT2Error, match="bad batch"):
        train(TrainConfig(out=str(tmp_path / "busy"), **kw))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["theirs.txt"]
    meanwhile.clear()
    calls.clear()
    with pytest.raises(GPT2Error, match="bad batch"):
        train(TrainConfig(out=str(tmp_path / "saved"), save_interval=1, **kw))
    assert latest_checkpoint(tmp_path / "saved").name == "ckpt-0000002"
    assert (tmp_path / "saved" / ".vocab").is_dir() and len(losses(tmp_path / "saved")) == 2


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """OUT of a run stopped at step 2 of 4 (its data folder beside it)."""
    root = tmp_path_factory.mktemp("stopped")
    data = synthetic(root / "d")
    train(TrainConfig(data=str(data), out=str(root / "o"), **TINY, max_steps=4, stop_at=2,
                      eval_interval=0, device="cpu"))
    return root / "o"


def _edit_json(**changes):
    def edit(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _wrong_moment_shape(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["state.0.exp_avg"] = torch.zeros(3)
    save_file(tensors, str(path))


def _rng_with_other_keys(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(3, dtype=torch.uint8)}, str(path))


DAMAGE = {
    "state is {}": ("train_state.json", lambda p: p.write_text("{}")),
    "state not JSON": ("train_state.json", lambda p: p.write_text('{"step": ')),
    "step is text": ("train_state.json", _edit_json(step="five")),
    "setting of the wrong kind": ("train_state.json",
                                  _edit_json(args={"n_layer": "two", "data": "d"})),
    "scaler not an object": ("train_state.json", _edit_json(scaler=[1])),
    "optimizer truncated": ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-50])),
    "optimizer moments misshaped": ("optimizer.safetensors", _wrong_moment_shape),
    "optimizer.json is []": ("optimizer.json", lambda p: p.write_text("[]")),
    "optimizer groups renumbered": (
        "optimizer.json",
        lambda p: p.write_text(p.read_text().replace('"params": [\n', '"params": [\n   7,\n', 1))),
    "betas not a pair": ("optimizer.json", lambda p: p.write_text(
        p.read_text().replace('"betas": [', '"betas": [0.5, ', 1))),
    "rng empty": ("rng.safetensors", lambda p: p.write_bytes(b"")),
    "rng other keys": ("rng.safetensors", _rng_with_other_keys),
    "rng missing": ("rng.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, run_cli, stopped_run, case):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(stopped_run, out)
    name, damage = DAMAGE[case]
    damage(out / "ckpt-0000002" / name)
    r = run_cli("train", "--out", out, "--resume", "--device", "cpu", "-q")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert f"{out / 'ckpt-0000002' / name}: damaged (" in r.err, r.err
    assert "start it over with another --out" in r.err and f"--init {out}" in r.err, r.err


def test_resume_finds_its_data_and_refuses_other_settings(tmp_path, run_cli, monkeypatch):
    synthetic(tmp_path / "d")
    synthetic(tmp_path / "other", n=3000)
    out = tmp_path / "o"
    monkeypatch.chdir(tmp_path)
    first = _args("d", out, "--max-steps", "4")
    assert run_cli(*first, "--stop-at", "2").code == 0
    # the same command line with --resume goes on (given flags equal to the run's are fine)
    assert run_cli(*first, "--stop-at", "3", "--resume").code == 0
    monkeypatch.chdir(tmp_path / "other")  # elsewhere: the relative "d" means nothing here
    resume = ["train", "--out", out, "--resume", "--device", "cpu", "-q"]
    # a setting other than the run's is refused, by name (6 is the --n-layer default)
    r = run_cli(*resume, "--n-layer", "6", "--lr", "0.1")
    assert r.code == 1 and "--n-layer 6 (the run's: 1), --lr 0.1 (the run's: 0.0006)" in r.err
    r = run_cli(*resume, "--data", tmp_path / "other")
    assert r.code == 1 and "not the data the run" in r.err and "train_tokens 2700" in r.err
    # no --data: the run's own folder, by its absolute path; no --max-steps: the run's own
    # (4), not the flag's default
    r = run_cli(*resume)
    assert r.code == 0 and latest_checkpoint(out).name == "ckpt-0000004", r.err
    assert sorted(losses(out)) == [1, 2, 3, 4]
    (tmp_path / "d").rename(tmp_path / "moved")
    r = run_cli(*resume, "--max-steps", "5")
    assert r.code == 1 and "the run's data folder" in r.err and "pass --data" in r.err, r.err
    r = run_cli(*resume, "--max-steps", "5", "--data", tmp_path / "moved")  # moved, and longer
    assert r.code == 0 and latest_checkpoint(out).name == "ckpt-0000005", r.err


def test_warmup_longer_than_the_run_is_allowed_and_said(tmp_path, run_cli, capsys):
    data = synthetic(tmp_path / "d")
    r = run_cli(*[a for a in _args(data, tmp_path / "o", "--warmup-steps", "10") if a != "-q"])
    assert r.code == 0, r.err
    assert "--warmup-steps 10 is more than --max-steps 2: the learning rate rises all run" in r.err
    from gpt2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "more than --max-steps is allowed" in " ".join(capsys.readouterr().out.split())


def test_ids_beyond_the_vocabulary_found_in_a_batch(tmp_path, run_cli):
    # meta claims a small vocabulary but the file holds a larger id
    data = write_tokens(tmp_path / "d", [1, 2, 3, 99] * 10, [1, 2, 3] * 5, n_vocab=16)
    r = run_cli(*_args(data, tmp_path / "o"))
    assert r.code == 1 and "token id 99 is out of range" in r.err, r.err
    assert not (tmp_path / "o").exists()  # found after set-up: what the run made is gone


def test_existing_run_is_left_untouched(tmp_path, run_cli):
    data = synthetic(tmp_path / "d")
    out = tmp_path / "o"
    assert run_cli(*_args(data, out)).code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run_cli(*_args(data, out))
    assert r.code == 1 and "already holds a training run" in r.err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(GPT2Error):
        train(TrainConfig(data=str(data), out=str(out), device="cpu", progress=False))


def test_a_full_disk_at_the_first_checkpoint_says_so_and_what_to_do(tmp_path, monkeypatch):
    """best/ was saved, the first checkpoint was not: the message claims no earlier
    checkpoint, and the folder, which --resume cannot continue, is explained."""
    import errno

    import gpt2.weights.huggingface as hf

    data, out = synthetic(tmp_path / "d"), tmp_path / "o"
    kw = dict(data=str(data), out=str(out), device="cpu", **TINY, max_steps=2,
              eval_interval=1, eval_steps=1, save_interval=1)
    real = hf.write_safetensors

    def full_disk(path, *args, **kwargs):
        if "optimizer" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hf, "write_safetensors", full_disk)
    with pytest.raises(GPT2Error, match=r"saving the checkpoint failed \(No space left on "
                                        r"device\); the run has none to resume from"):
        train(TrainConfig(**kw))
    assert (out / "best").is_dir() and not list(out.glob("*ckpt*"))
    monkeypatch.setattr(hf, "write_safetensors", real)
    with pytest.raises(GPT2Error, match="holds the best model of a run that saved no "
                                        "checkpoint, so --resume cannot continue it"):
        train(TrainConfig(**kw))


def test_the_closing_hint_is_a_command_a_shell_runs(tmp_path, run_cli):
    """A folder with a space in its name is quoted in the `gpt2 generate` the run prints."""
    import shlex

    out = tmp_path / "run é x"
    r = run_cli(*_args(synthetic(tmp_path / "d"), out))
    assert r.code == 0, r.err
    command = r.out.strip().split("`")[1]
    assert shlex.split(command) == ["gpt2", "generate", "--model", str(out)]


def test_a_model_folder_is_never_used_as_out(tmp_path, run_cli, hf_checkpoint):
    """A folder holding a model that is not a training run (a download, a conversion,
    the model --init loads) is refused as --out: the run's model would replace it."""
    data = with_gpt2_vocab(synthetic(tmp_path / "d", n_vocab=50257))
    model = tmp_path / "m"
    shutil.copytree(hf_checkpoint().folder, model)
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    r = run_cli(*_args(data, model))
    assert r.code == 1 and f"--out {model} holds a model (config.json" in r.err, r.err
    fine_tune = _args(data, model)
    for flag in ("--n-layer", "--n-head", "--n-embd"):  # (the shape flags are for scratch)
        i = fine_tune.index(flag)
        del fine_tune[i:i + 2]
    r = run_cli(*fine_tune, "--init", str(model))
    assert r.code == 1 and "is the model --init loads" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_data_of_another_vocabulary_is_refused(tmp_path, run_cli, hf_checkpoint):
    """Ids made with one vocabulary mean other tokens to a model of another: eval and
    fine-tuning refuse them (the model here has GPT-2's vocabulary, the data one of 257
    tokens: the 256 byte tokens and <|endoftext|>)."""
    from gpt2.tokenizer import Tokenizer

    vocab = tmp_path / "bytes"
    vocab.mkdir()
    encoder = {t: i for t, i in Tokenizer.from_pretrained()._encoder.items() if i < 256}
    encoder["<|endoftext|>"] = 256
    (vocab / "encoder.json").write_text(json.dumps(encoder))
    (vocab / "vocab.bpe").write_text("#version: 0.2\n")
    (tmp_path / "t.txt").write_text("some text to tokenize, byte by byte. " * 40)
    data = tmp_path / "d"
    assert run_cli("prepare", tmp_path / "t.txt", "--out", data, "--vocab", vocab,
                   "-q").code == 0
    model = hf_checkpoint(n_vocab=50257).folder
    r = run_cli("eval", "--model", model, "--data", data)
    assert r.code == 1 and "prepared with another vocabulary than" in r.err, r.err
    out = tmp_path / "ft"
    r = run_cli("train", "--data", data, "--out", out, "--init", model, "--block-size", "8",
                "--max-steps", "1", "--device", "cpu", "-q")
    assert r.code == 1 and "prepared with another vocabulary than" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("n_vocab", [None, "abc", 2.5, 0, 70000, True])
def test_a_bad_n_vocab_in_meta_is_one_line(tmp_path, run_cli, n_vocab):
    data = synthetic(tmp_path / "d")
    meta = json.loads((data / "meta.json").read_text())
    meta["n_vocab"] = n_vocab
    (data / "meta.json").write_text(json.dumps(meta))
    r = run_cli(*_args(data, tmp_path / "o"))
    assert r.code == 1 and "meta.json: n_vocab must be the vocabulary's size" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_a_quantized_model_cannot_be_fine_tuned(tmp_path, run_cli, hf_checkpoint):
    int8 = tmp_path / "int8"
    assert run_cli("convert", hf_checkpoint(n_vocab=50257).folder, int8, "--quantize",
                   "int8").code == 0
    data = with_gpt2_vocab(synthetic(tmp_path / "d", n_vocab=50257))
    args = _args(data, tmp_path / "o", "--init", str(int8))
    for flag in ("--n-layer", "--n-head", "--n-embd"):
        i = args.index(flag)
        del args[i:i + 2]
    r = run_cli(*args)
    assert r.code == 1 and f"--init {int8}: the model is quantized (int8" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_resume_past_the_step_asked_for_is_refused_and_no_val_still_plots(tmp_path, run_cli):
    """A run at step 3 resumed with --stop-at 2 (or --max-steps 2) did nothing and said
    it trained "steps 3..2". And a run without a val split draws its train loss."""
    pytest.importorskip("matplotlib")
    data = synthetic(tmp_path / "d")
    meta = json.loads((data / "meta.json").read_text())
    meta["train_tokens"] += meta["val_tokens"]
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()
                                     + (data / "val.bin").read_bytes())
    (data / "val.bin").write_bytes(b"")
    meta["val_tokens"] = 0
    (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "o"
    assert run_cli(*_args(data, out, "--max-steps", "3")).code == 0
    assert (out / "loss.png").is_file()
    for flags, said in ((["--stop-at", "2"], "past --stop-at 2"),
                        (["--max-steps", "2"], "past --max-steps 2")):
        r = run_cli("train", "--out", out, "--resume", "-q", *flags)
        assert r.code == 1 and f"the run is at step 3 already, {said}" in r.err, r.err


def test_resume_skips_damaged_log_lines(tmp_path):
    """On resume a log line whose step is not a number is dropped like a line cut short,
    and a byte that is not UTF-8 is read as U+FFFD: the run goes on."""
    data = synthetic(tmp_path / "d")
    out = tmp_path / "o"
    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, eval_interval=0,
               device="cpu", progress=False)
    train(TrainConfig(data=str(data), out=str(out), max_steps=3, stop_at=2, **cfg))
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": "x"}\n{"step": 1, "note": "\xff"}\n[1, 2]\n')
    train(TrainConfig(data=None, out=str(out), resume=True, device="cpu", progress=False))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]


def test_a_new_run_starts_its_own_log(tmp_path, monkeypatch):
    """The log and samples of a run that never saved a checkpoint (killed, say) are not
    continued by the next run in that folder: they were appended to. A run that fails
    before its first step leaves them as they were."""
    import gpt2.train.trainer as trainer

    data = synthetic(tmp_path / "d")
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 7, "loss": 9.0}\n')
    (out / "samples.txt").write_text("an old sample\n")
    with monkeypatch.context() as m:
        m.setattr(trainer, "sample_batch", lambda *a, **k: (_ for _ in ()).throw(
            GPT2Error("no batch")))
        with pytest.raises(GPT2Error, match="no batch"):
            train(TrainConfig(data=str(data), out=str(out), **TINY, max_steps=3,
                              device="cpu"))
    assert (out / "log.jsonl").read_text() == '{"step": 7, "loss": 9.0}\n'
    assert (out / "samples.txt").read_text() == "an old sample\n"
    train(TrainConfig(data=str(data), out=str(out), **TINY, max_steps=3, eval_interval=3,
                      device="cpu"))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
    # this run wrote no samples (no vocabulary): the old ones are still there, as a file
    # the run did not write is (its log replaced the old one at its first line)
    assert (out / "samples.txt").read_text() == "an old sample\n"


def test_demo_checks_the_device_before_preparing(tmp_path, run_cli):
    r = run_cli("demo", "--out", tmp_path / "demo", "--device", "bogus")
    assert r.code == 1 and "unknown device 'bogus'" in r.err, r.err
    assert not (tmp_path / "demo" / "data").exists()


def test_demo_leaves_a_folder_it_did_not_make_alone(tmp_path, run_cli):
    out = tmp_path / "proj"
    (out / "run").mkdir(parents=True)
    (out / "run" / "notes.txt").write_text("precious")
    r = run_cli("demo", "--out", out, "--steps", "1", "--device", "cpu")
    assert r.code == 1 and "holds files the demo did not make" in r.err, r.err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "run"]


def test_demo_prepares_trains_and_generates_offline(tmp_path, run_cli):
    """`gpt2 demo`, the README's quick start, shortened: loss falls, a loadable model results."""
    import json as _json

    from gpt2.model import GPT2

    # (an empty prompt starts a new document, as in generate: it failed after training)
    result = run_cli("demo", "--out", tmp_path / "demo", "--steps", "12", "--device", "cpu",
                     "--prompt", "")
    assert result.code == 0, result.err
    assert "a sample:" in result.out and "Traceback" not in result.err
    text = (tmp_path / "demo" / "pydoc_topics.txt").read_text(encoding="utf-8")
    assert "statement" in text and "::=" not in text  # the prose, without the grammar rules
    assert "| Option" not in text and "+-----" not in text  # nor the tables
    log = [_json.loads(line) for line in
           (tmp_path / "demo" / "run" / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < min(val[0], math.log(50257))  # below a uniform guess over the vocabulary
    model = GPT2.from_pretrained(tmp_path / "demo" / "run")
    assert model.config.n_layer == 4
    assert (tmp_path / "demo" / ".gpt2-demo").is_file()  # its own: a later demo may replace it


# --- MFU ------------------------------------------------------------------------------


def test_training_flops_per_token_counts_weights_and_attention():
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from gpt2.config import PRESETS
    from gpt2.train.flops import mfu, training_flops_per_token

    with torch.device("meta"):
        n = GPT2LMHeadModel(HFConfig()).num_parameters()  # the oracle's count, 124M
    per_token = training_flops_per_token(PRESETS["124M"], n, 1024)
    assert per_token == 6 * 124_439_808 + 12 * 12 * 768 * 1024  # written out
    # 400K tokens/s of 124M on one H100 (989 TFLOP/s bf16) would be 35% MFU
    assert mfu(per_token, 400_000, 989e12) == pytest.approx(0.3478, abs=1e-4)


def test_mfu_is_logged_where_the_peak_is_known(tmp_path, monkeypatch):
    import gpt2.train.flops as flops

    ids = np.random.default_rng(1).integers(0, 64, 400)
    data = write_tokens(tmp_path / "d", ids, ids, n_vocab=64)
    cfg = dict(data=str(data), **TINY, max_steps=2, eval_interval=0, device="cpu")
    train(TrainConfig(out=str(tmp_path / "cpu"), **cfg))
    assert all("mfu" not in r for r in read_log(tmp_path / "cpu"))  # a CPU: no known peak
    monkeypatch.setattr(flops, "peak_flops", lambda device: 1e12)
    train(TrainConfig(out=str(tmp_path / "fake"), **cfg))
    records = [r for r in read_log(tmp_path / "fake") if "tokens_per_s" in r]
    model = GPT2.from_pretrained(str(tmp_path / "fake"))
    per_token = flops.training_flops_per_token(model.config, model.num_parameters(),
                                               TINY["block_size"])  # fmt: skip
    for r in records:
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-2, abs=1e-4)


def test_compiled_training_runs_the_model_and_loss_as_one_graph(tmp_path, monkeypatch):
    """--compile traces the model and its loss together (the loss outside the compiled
    graph cost a quarter of a GPU step) and trains to the same losses as eager.
    aot_eager: dynamo's graph and autograd without inductor's C++ compiler."""
    import torch._dynamo

    compiled = []

    def fake_compile(fn, **kw):
        compiled.append(fn)
        return torch_compile(fn, backend="aot_eager", fullgraph=True, **kw)

    torch_compile = torch.compile
    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=3, eval_interval=0, device="cpu")
    train(TrainConfig(out=str(tmp_path / "eager"), **kw))
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", fake_compile)
    train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **kw))
    from gpt2.train.trainer import ModelLoss

    assert len(compiled) == 1 and isinstance(compiled[0], ModelLoss)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5, rel=0), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_pipelined_gpu_loop_logs_the_losses_a_cpu_run_logs(tmp_path):
    """On a GPU each step's loss is copied to the host at the end of its own step and
    read once the next step is queued: the log must hold each step's own loss, as a
    CPU run logs it (fp32; the GPU's TF32 products stay within 1e-3 here, where
    consecutive steps' losses differ by 3e-3 or more), and step times > 0. (A GPU's
    step records add MFU, where its peak is known.)"""
    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=9, lr=3e-3, warmup_steps=2, grad_accum=2,
              eval_interval=4, eval_steps=2, save_interval=5, dtype="fp32")
    train(TrainConfig(out=str(tmp_path / "cpu"), device="cpu", **kw))
    train(TrainConfig(out=str(tmp_path / "gpu"), device="cuda", **kw))
    a, b = read_log(tmp_path / "cpu"), read_log(tmp_path / "gpu")
    assert [sorted(r.keys() - {'mfu'}) for r in b] == [sorted(r) for r in a]
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"]
        key = "loss" if "loss" in x else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-3), (x, y)
        assert y.get("tokens_per_s", 1) > 0


def test_an_optimizer_with_a_tensor_lr_follows_the_schedule(tmp_path, monkeypatch):
    """A compiled optimizer keeps its lr as a tensor (a new float would recompile it):
    the loop sets the schedule's lr into that tensor, and the updates match a float lr's."""
    import gpt2.train.trainer as trainer

    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=5, lr=3e-3, min_lr=3e-4, warmup_steps=2,
              eval_interval=0, save_interval=0, device="cpu")
    train(TrainConfig(out=str(tmp_path / "float"), **kw))
    made = []

    def tensor_lr(model, *, lr, weight_decay, device):
        made.append(torch.optim.AdamW(trainer.param_groups(model, weight_decay),
                                      lr=torch.tensor(lr), betas=(0.9, 0.95), eps=1e-8))
        return made[-1]

    monkeypatch.setattr(trainer, "make_optimizer", tensor_lr)
    monkeypatch.setattr(trainer._Run, "_save", lambda run: None)  # lr tensors: not for JSON
    train(TrainConfig(out=str(tmp_path / "tensor"), **kw))
    a, b = ([r for r in read_log(tmp_path / run) if "loss" in r] for run in ("float", "tensor"))
    assert [r["lr"] for r in b] == [r["lr"] for r in a] == [
        lr_at(s, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=5) for s in range(5)]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    for group in made[0].param_groups:
        assert isinstance(group["lr"], torch.Tensor)
        assert group["lr"].item() == pytest.approx(a[-1]["lr"], rel=1e-6)  # float32


def test_clipping_folded_into_fused_adamw_matches_clip_grad_norm(tmp_path, monkeypatch):
    """CLIP_IN_FUSED_ADAMW: the clip as the fused AdamW's grad_scale gives the losses of
    clip_grad_norm_ then the step (fused AdamW on the CPU here), where the clip bites:
    without it the losses differ."""
    import gpt2.train.trainer as trainer

    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=6, lr=3e-3, warmup_steps=1, eval_interval=0,
              save_interval=0, device="cpu")

    def fused(model, *, lr, weight_decay, device):
        return torch.optim.AdamW(trainer.param_groups(model, weight_decay), lr=lr,
                                 betas=(0.9, 0.95), eps=1e-8, fused=True)

    monkeypatch.setattr(trainer, "make_optimizer", fused)
    runs = {}
    for name, clip, folded in (("none", 0.0, False), ("plain", 0.05, False),
                               ("folded", 0.05, True)):
        monkeypatch.setattr(trainer, "CLIP_IN_FUSED_ADAMW", folded)
        train(TrainConfig(out=str(tmp_path / name), grad_clip=clip, **kw))
        runs[name] = [r["loss"] for r in read_log(tmp_path / name) if "loss" in r]
    assert len(runs["folded"]) == 6
    assert runs["folded"] == pytest.approx(runs["plain"], rel=1e-6)
    assert abs(runs["none"][-1] - runs["plain"][-1]) > 1e-3  # the clip changed the run


@pytest.mark.parametrize("depth, order", [
    (1, [(1, 2), (2, 3), (3, 3), (4, 5), (5, 5), (6, 6), (7, 7)]),
    (2, [(1, 3), (2, 3), (3, 3), (4, 5), (5, 5), (6, 6), (7, 7)]),
])
def test_pipelined_steps_log_and_save_what_one_at_a_time_does(tmp_path, monkeypatch, depth,
                                                              order):
    """On a GPU the loop queues step k + 1 before it reads step k's loss. Run that way on
    a CPU it must log, evaluate, save and fail exactly as the step-at-a-time loop does,
    reading each loss `depth` steps late except where a step evaluates, samples or saves."""
    import gpt2.train.trainer as trainer

    data = synthetic(tmp_path / "d")
    kw = dict(data=str(data), **TINY, max_steps=7, lr=3e-3, warmup_steps=2, grad_accum=2,
              dropout=0.1, eval_interval=3, eval_steps=2, save_interval=5, device="cpu")
    train(TrainConfig(out=str(tmp_path / "plain"), **kw))
    finished = []  # (the step whose loss is read, the last step queued then)
    finish = trainer._Run._finish_step

    def spy(run, launched):
        finished.append((launched.step, run.step))
        return finish(run, launched)

    monkeypatch.setattr(trainer._Run, "_finish_step", spy)
    monkeypatch.setattr(trainer, "PIPELINED_DEVICES", ("cpu",))
    monkeypatch.setattr(trainer, "PIPELINE_DEPTH", depth)
    train(TrainConfig(out=str(tmp_path / "piped"), **kw))
    # steps 3 (eval), 5 (save), 6 (eval) and 7 (the last) are read before going on
    assert finished == order
    plain, piped = read_log(tmp_path / "plain"), read_log(tmp_path / "piped")
    assert [sorted(r) for r in piped] == [sorted(r) for r in plain]
    for a, b in zip(plain, piped, strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == \
            {k: v for k, v in b.items() if k != "tokens_per_s"}
        assert b.get("tokens_per_s", 1) > 0
    a, b = (load_training_state(latest_checkpoint(tmp_path / run)) for run in ("plain", "piped"))
    assert (b.step, b.info["tokens_seen"]) == (a.step, a.info["tokens_seen"]) == (7, 7 * 128)
    a = GPT2.from_pretrained(tmp_path / "plain").state_dict()
    b = GPT2.from_pretrained(tmp_path / "piped").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    # a loss that is not finite is reported at its own step, though the next is queued
    finished.clear()
    real_step = trainer._Run._launch_step

    def nan_at_2(run, after):
        launched = real_step(run, after)
        if launched.step == 2:
            launched.loss = launched.loss * math.nan
        return launched

    monkeypatch.setattr(trainer._Run, "_launch_step", nan_at_2)
    with pytest.raises(GPT2Error, match="the loss became nan at step 2;"):
        train(TrainConfig(out=str(tmp_path / "nan"), **kw))
    assert finished[-1] == (2, 3)


@pytest.mark.parametrize("field, value, message", [
    ("grad_clip", math.nan, "--grad-clip must be a finite number, got nan"),
    ("weight_decay", math.inf, "--weight-decay must be a finite number, got inf"),
    ("lr", math.nan, "--lr must be a finite number, got nan"),
    ("min_lr", math.nan, "--min-lr must be a finite number, got nan"),
    ("warmup_steps", math.nan, "--warmup-steps must be an integer, got nan"),
    ("max_steps", 2.5, "--max-steps must be an integer, got 2.5"),
    ("batch_size", 2.0, "--batch-size must be an integer, got 2.0"),
    ("block_size", "16", "--block-size must be an integer, got '16'"),
    ("stop_at", True, "--stop-at must be an integer or None, got True"),
    ("dropout", "0.1", "--dropout must be a number, got '0.1'"),
    ("compile", 1, "--compile must be True or False, got 1"),
    ("device", None, "--device must be a string, got None"),
    ("out", None, "--out must be a string, got None"),
])
def test_config_types_are_checked_up_front(tmp_path, field, value, message):
    data = synthetic(tmp_path / "d", n=200)
    kw = {"data": str(data), "out": str(tmp_path / "o"), **TINY, "max_steps": 2, field: value}
    cfg = TrainConfig(**kw)
    with pytest.raises(GPT2Error, match="^" + re.escape(message) + "$"):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_config_takes_paths(tmp_path):
    data = synthetic(tmp_path / "d", n=2000)
    s = train(TrainConfig(data=data, out=tmp_path / "o", **{**TINY, "max_steps": 1},
                          device="cpu"))
    assert s.step == 1 and (tmp_path / "o" / "log.jsonl").is_file()


def test_train_takes_a_train_config():
    with pytest.raises(GPT2Error, match="train takes a TrainConfig, not dict; use "
                                        r"TrainConfig\(\*\*settings\)"):
        train({"data": "d", "out": "o"})


def test_out_may_not_be_the_data_folder(tmp_path):
    data = synthetic(tmp_path / "d")
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(GPT2Error, match="is the --data folder; the run would write"):
        train(TrainConfig(data=str(data), out=str(data), device="cpu", **TINY, max_steps=1))
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_second_run_on_the_same_out_stops_and_touches_nothing(tmp_path, run_cli):
    """Two `gpt2 train` on one --out would mix their logs and checkpoints (and one's
    save removed the other's half-saved checkpoint). While a run holds OUT/.lock (here
    this test holds it, as the first run does), a second one stops at once in one line,
    and the first run's files stay; after it, the folder is free again."""
    from gpt2._io import exclusive

    data = synthetic(tmp_path / "d")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 4.0}\n')  # the first run's
    args = ["train", "--data", str(data), "--out", str(out), "--n-layer", "1", "--n-head",
            "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2", "--max-steps",
            "2", "--eval-interval", "0", "--device", "cpu", "-q"]
    with exclusive(out / ".lock", "busy"):
        r = run_cli(*args)
        assert r.code == 1 and r.err.count("\n") == 1, r.err
        assert "another `gpt2 train` is writing a run there now" in r.err
        assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 4.0}\n'
        with pytest.raises(GPT2Error, match="another `gpt2 train`"):
            train(TrainConfig(data=str(data), out=str(out), resume=True, device="cpu"))
    r = run_cli(*args)
    assert r.code == 0, r.err
    assert [rec["step"] for rec in read_log(out) if "loss" in rec] == [1, 2]
    assert not (out / ".lock").exists()


def test_resume_drops_the_samples_made_after_its_checkpoint(tmp_path, topics_data):
    """A run killed after its last checkpoint had sampled later steps; resumed, it
    samples them again. samples.txt kept the old ones too (steps 10 20 30 40 30 40 ...);
    like log.jsonl it is cut back to the checkpoint's step."""
    kw = dict(data=str(topics_data), out=str(tmp_path / "o"), n_layer=1, n_head=2, n_embd=16,
              block_size=8, batch_size=2, max_steps=3, eval_interval=0, eval_steps=1,
              sample_interval=1, sample_tokens=4, device="cpu", progress=False)
    train(TrainConfig(stop_at=2, **kw))
    samples = tmp_path / "o" / "samples.txt"
    kept = samples.read_text()
    assert kept.count("=== step") == 2
    samples.write_text(kept + "=== step 3 ===\nlost\n=== step 4 ===\nlost too\n")
    train(TrainConfig(resume=True, **{**kw, "data": None}))
    text = samples.read_text()
    assert text.startswith(kept) and "lost" not in text
    assert re.findall(r"^=== step (\d+) ===$", text, re.M) == ["1", "2", "3"]


def test_sigterm_stops_a_single_process_run_like_ctrl_c(tmp_path, topics_data):
    """`kill` of a `gpt2 train` that is not under torchrun: exit 143 with one line, and a
    run that saved nothing takes its files (log, vocabulary, lock) away, as after Ctrl-C
    (SIGTERM killed it outright, leaving them)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt2", "train", "--data", str(topics_data), "--out",
           str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size",
           "8", "--batch-size", "2", "--max-steps", "100000", "--eval-interval", "0",
           "--save-interval", "0", "--device", "cpu", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "gpt2 train: terminated"
    assert not out.exists()  # nothing saved: nothing left
