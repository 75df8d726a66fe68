"""Data parallelism: 2 gloo processes = 1 process with twice the accumulation.

(And a run saved by 2 processes resumes in 1 with the same micro-batches a step.)

Micro-batch m of step s on rank r is seeded by (seed, s, m * world + r), so two
ranks with accumulation A draw exactly the 2A micro-batches of one process with
accumulation 2A; DDP averages the ranks' gradients, which equals the
single-process mean. The losses must agree step for step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2.train.trainer import TrainConfig, train

# (with dropout: a micro-batch's masks are seeded by its index in the step, as its data)
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=2, max_steps=5,
            lr=3e-3, warmup_steps=1, eval_interval=5, eval_steps=2, save_interval=0,
            dropout=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_processes_match_one_with_double_accumulation(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.tile(rng.integers(0, 64, 29), 100).astype(np.uint16)
    data = tmp_path / "d"
    data.mkdir()
    ids[:2500].tofile(data / "train.bin")
    ids[2500:].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps(
        {"dtype": "uint16", "train_tokens": 2500, "val_tokens": len(ids) - 2500, "n_vocab": 64}))

    single = tmp_path / "single"
    train(TrainConfig(data=str(data), out=str(single), grad_accum=4, device="cpu",
                      progress=False, **ARGS))

    # two processes for 3 steps; then the run resumed in one process, which takes the
    # same 4 micro-batches a step (--grad-accum 2 x 2 processes -> 4 x 1)
    ddp = tmp_path / "ddp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "gpt2", "train", "--data", str(data),
           "--out", str(ddp), "--grad-accum", "2", "--device", "cpu", "-q", "--stop-at", "3",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(ddp)) == 3
    train(TrainConfig(data=None, out=str(ddp), resume=True, device="cpu", progress=False))
    state = json.loads((ddp / "ckpt-0000005" / "train_state.json").read_text())
    assert state["world_size"] == 1 and state["args"]["grad_accum"] == 4
    assert state["tokens_seen"] == 5 * 4 * ARGS["batch_size"] * ARGS["block_size"]

    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 5
    assert b == pytest.approx(a, abs=2e-6, rel=0)
    assert a[-1] < a[0]
    val = [[r["val_loss"] for r in map(json.loads, (o / "log.jsonl").read_text().splitlines())
            if "val_loss" in r] for o in (single, ddp)]
    # the same val batches at any world size (the stopped run also evaluated at step 3)
    assert val[1][-1] == pytest.approx(val[0][-1], abs=2e-6)
    # only rank 0 wrote: one log line per step, and the checkpoint (step 3's was replaced)
    assert [p.name for p in ddp.glob("ckpt-*")] == ["ckpt-0000005"]
    from gpt2.model import GPT2

    m1, m2 = GPT2.from_pretrained(single), GPT2.from_pretrained(ddp)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), atol=1e-5,
                                   err_msg=n)


def test_resuming_on_a_process_count_that_cannot_share_the_step_is_refused(tmp_path):
    from gpt2.errors import GPT2Error
    from gpt2.train.trainer import _same_batches

    saved = {"grad_accum": 3, "lr": 0.1}  # a run's settings as saved
    assert _same_batches(saved, 2, 3, folder=tmp_path) == {"grad_accum": 2, "lr": 0.1}
    assert _same_batches(saved, 2, 6, folder=tmp_path)["grad_accum"] == 1  # 2 x 3 = 6 x 1
    assert _same_batches(saved, 2, 2, folder=tmp_path) is saved
    with pytest.raises(GPT2Error, match="took 6 micro-batch\\(es\\) a step .* 4 processes"):
        _same_batches(saved, 2, 4, folder=tmp_path)


def test_a_runs_own_command_line_resumes_it_after_a_change_of_process_count(tmp_path):
    """A run started with --grad-accum 2 in one process, resumed on 2 (which saved it
    as 2 x 1), resumed again in one process with its own --grad-accum 2: the same
    micro-batches a step, so not a changed setting (it was refused: "the run's: 1")."""
    from gpt2.errors import GPT2Error
    from gpt2.train.trainer import _merge_resumed, _same_batches

    saved = {**vars(TrainConfig(data=None, out=str(tmp_path), grad_accum=1))}
    cfg = TrainConfig(data=None, out=str(tmp_path), grad_accum=2, resume=True)
    merged = _merge_resumed(cfg, _same_batches(saved, 2, 1, folder=tmp_path),
                            explicit={"grad_accum", "resume", "out"}, folder=tmp_path)
    assert merged.grad_accum == 2
    with pytest.raises(GPT2Error, match="--grad-accum 3 \\(the run's: 2\\)"):
        _merge_resumed(TrainConfig(data=None, out=str(tmp_path), grad_accum=3, resume=True),
                       _same_batches(saved, 2, 1, folder=tmp_path),
                       explicit={"grad_accum", "resume", "out"}, folder=tmp_path)


@pytest.mark.parametrize("world, one_line", [("2", True), ("1", False)])
def test_a_process_whose_peer_died_says_so_in_one_line(tmp_path, monkeypatch, capsys, world,
                                                       one_line):
    """Under torchrun, when one process of a run fails, the others' next collective
    raises gloo's RuntimeError: that was a full traceback on every survivor. Outside a
    multi-process run such an error is not ours to explain and is raised as it is."""
    import gpt2.train.trainer
    from gpt2.cli import main

    def peer_gone(cfg, explicit=None):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                           "closed by peer [127.0.0.1]:29500")

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(gpt2.train.trainer, "train", peer_gone)
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]
    if not one_line:
        with pytest.raises(RuntimeError, match="closed by peer"):
            main(args)
        return
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another process of this run stopped" in err, err
    assert "Connection closed by peer" in err
