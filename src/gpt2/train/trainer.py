"""The training loop: from scratch or from pretrained weights, on one process or many.

One optimizer step:

    for each of grad_accum micro-batches (m):           gradient accumulation
        x, y = window of the train tokens                 seeded by (seed, step, m * world + rank)
        loss = cross_entropy(model(x), y) / grad_accum    autocast in bf16/fp16 when asked
        loss.backward()                                   DDP averages grads on the last m only
    clip the gradient norm, AdamW step at lr(step)        cosine schedule with linear warmup

Determinism: the batch of every micro-step and the dropout masks of every step
come from seeds derived from (seed, step, rank), not from a generator that runs
through the whole run, so a resumed run draws exactly what an uninterrupted one
would and, on CPU, reproduces its losses.

    >>> cfg = TrainConfig(data="data/book", out="runs/book", max_steps=200)
    >>> summary = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import gpt2.model
from gpt2 import gpu_kernels
from gpt2._io import exclusive
from gpt2.errors import GPT2Error
from gpt2.train import distributed, flops
from gpt2.train._tidy import undone_on_error
from gpt2.train.checkpoint import (
    damaged,
    latest_checkpoint,
    load_training_state,
    restore_optimizer,
    save_best,
    save_checkpoint,
)
from gpt2.train.config import PER_INVOCATION, RESUMABLE_CHANGES, TrainConfig
from gpt2.train.data import TokenData, batch_seed, open_tokens, sample_batch

VOCAB_DIR = ".vocab"  # the run's vocabulary files, linked into every checkpoint
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# devices whose steps run behind Python: the loop queues PIPELINE_DEPTH more steps
# before it waits for a step's loss (CPU steps are done when queued)
PIPELINED_DEVICES = ("cuda",)
PIPELINE_DEPTH = 1
# what a run writes into OUT before its first checkpoint or best/ (removed if it fails then)
RUN_FILES = (VOCAB_DIR, "log.jsonl", "loss.png", "samples.txt", ".write-test",
             ".ckpt-*.partial")  # the first checkpoint, cut short by Ctrl-C
# What marks a folder as holding a model (any layout gpt2 loads): a fresh run will not
# use such a folder as its --out, where its own model files would replace these.
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "hparams.json",
                "model.ckpt.index", "best")


def _last_step(cfg) -> int:
    """The step a run with these settings stops after: --stop-at, at most --max-steps."""
    return cfg.max_steps if cfg.stop_at is None else min(cfg.stop_at, cfg.max_steps)


def _same_place(a: os.PathLike | str, b: os.PathLike | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class TrainSummary:
    step: int
    last_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    out: Path


# --- pure pieces -----------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    >>> lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    0.1
    >>> lr_at(100, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    0.1
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the Linear weight matrices only.

    Biases and LayerNorm gains are not decayed (shrinking them towards zero is
    not a regulariser, it just fights the normalisation), and neither are the
    embeddings wte/wpe, following GPT-2-era practice (OpenAI's GPT and BERT
    exempt them too): wte is also the output layer, and rows of rare tokens get
    few gradient updates, so decay would erase them between visits.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and name not in ("wte.weight", "wpe.weight")
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    # fused AdamW: one kernel for every parameter on CUDA
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             eps=1e-8, fused=fused)


# Training on a GPU takes its loss through gpt2.gpu_kernels.cross_entropy (one read of
# the logits forward, one read and one write back) instead of the compiled
# F.cross_entropy: 1.54 ms against 2.32 a step, and the `gpt2 train --compile` loop
# 493-495K tokens/s against 482K (H200, 124M, 16 x 1024: bench/GPU_NOTES.md).
FUSED_LOSS_ON_GPU = True


# Gradient clipping folded into the fused AdamW: the optimizer divides each gradient by
# its `grad_scale` (the attribute torch.amp.GradScaler sets on fused optimizers) as it
# reads it, which saves the clip's own read and write of every gradient. The same
# updates as clip_grad_norm_ to float32 rounding (tests). The `gpt2 train --compile`
# loop: 505,901-506,105 tokens/s against 503,731-504,065 with clip_grad_norm_, runs
# alternated in one process (H200, 124M, 16 x 1024: bench/GPU_NOTES.md).
CLIP_IN_FUSED_ADAMW = True


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T)."""
    V = logits.size(-1)
    return F.cross_entropy(_at_least_fp32(logits).reshape(-1, V), targets.reshape(-1))


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in float32 for the softmax; float64 ones as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ModelLoss(torch.nn.Module):
    """The model and its loss as one module, (x, y) -> mean next-token loss: what the
    trainer compiles and wraps in DistributedDataParallel.

    full_width: take the loss over the logits of `gpt2.model.full_width_head` (the
    vocabulary padded to a multiple of 64, the pad at -inf): the same loss and
    gradients, faster on a GPU. None (the default): when training on a GPU, where
    `gpt2.model.PAD_HEAD_FOR_GPU_TRAINING` is set and the model's head is wte itself.
    That loss is `gpt2.gpu_kernels.cross_entropy` where FUSED_LOSS_ON_GPU is set and
    its kernels run (`gpt2.gpu_kernels.runs_on`), else F.cross_entropy.
    """

    def __init__(self, model: torch.nn.Module, *, full_width: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.full_width = full_width

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.model
        full = self.full_width
        if full is None:
            full = (gpt2.model.PAD_HEAD_FOR_GPU_TRAINING and x.is_cuda
                    and torch.is_grad_enabled() and model.lm_head is None)
        if not full:
            return lm_loss(model(x), y)
        logits = gpt2.model.full_width_head(model.features(x), model.wte.weight)
        if FUSED_LOSS_ON_GPU and gpu_kernels.runs_on(logits) and logits.dtype != torch.float64:
            return gpu_kernels.cross_entropy(logits.flatten(0, 1), y.flatten()).mean()
        return F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), y.flatten())


def dropout_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of the dropout masks of one micro-batch, by its index in the step across
    processes (m * world_size + rank, as its data's): the same masks however many
    processes share the step, so a run resumed on another number of them goes on
    exactly, with dropout too."""
    return batch_seed(seed, step, 1_000_000 + micro_batch)


def eval_seed(seed: int, index: int) -> int:
    """The seed of validation micro-batch `index`: the same at every evaluation, so
    successive val losses are measured on the same windows."""
    return batch_seed(seed, 0, 2_000_000 + index)


# --- the run ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, explicit: Collection[str] | None = None) -> TrainSummary:
    """Train (or fine-tune, or resume) as `cfg` says; checkpoints and logs go to cfg.out.

    explicit: the settings the caller chose (the CLI passes the flags on its command
    line; None: those that differ from TrainConfig's defaults). On resume, one of them
    that differs from the run's own is an error rather than silently ignored.

    A run that fails before it has saved a model (a checkpoint or best/) takes away what
    it wrote into cfg.out (RUN_FILES, and the folder if it made it and it is empty then),
    so a failed first try leaves no litter; nothing that was there before is touched.
    """
    from gpt2.commands._common import resolve_device

    cfg = _typed(cfg)  # before cfg.device and cfg.out are used
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    info = distributed.setup(resolve_device(cfg.device))
    out = Path(cfg.out)
    had_best = (out / "best").is_dir()

    def saved_a_model() -> bool:
        return latest_checkpoint(out) is not None or (not had_best and (out / "best").is_dir())

    try:
        with undone_on_error(out, names=RUN_FILES, keep=saved_a_model, enabled=info.is_main), \
                _one_run_in(out, enabled=info.is_main):
            result = _Run(cfg, info, explicit=explicit).run()
        # Every rank leaves together: a rank that tore its process group down while
        # rank 0 was still writing the last checkpoint aborted in gloo (3 runs in 20 on CPU).
        distributed.barrier(info)
        return result
    finally:
        distributed.teardown(info)


@contextlib.contextmanager
def _one_run_in(out: Path, *, enabled: bool) -> Iterator[None]:
    """Hold OUT/.lock while the run goes on: a second `gpt2 train` on the same --out
    (a fresh run or a --resume) stops at once, before it reads or writes anything
    there; two runs saving into one folder would mix their logs and checkpoints."""
    if not enabled:
        yield
        return
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2Error(f"--out {out}: cannot write here ({e.strerror}); "
                        "choose another folder") from None
    with exclusive(out / ".lock", f"--out {out}: another `gpt2 train` is writing a run "
                   "there now; wait for it to end, or choose another --out",
                   where=f"--out {out}"):
        yield


class _StepTimer:
    """How long a step took on its device: from its start, or from the end of the step
    queued before it if that had not ended yet, to the end of its work. On a GPU the
    times are events in its stream; elsewhere a step's work is done when the Python
    that queued it returns."""

    def __init__(self, device: torch.device, after: _StepTimer | None) -> None:
        self.events = None
        if device.type == "cuda":
            self.events = [torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True)]
            if after is not None and after.events is not None:
                self.events[0] = after.events[1]
            else:
                self.events[0].record()
        self.started = time.perf_counter() if after is None else after.ended
        self.ended = self.started

    def stop(self) -> None:
        if self.events is not None:
            self.events[1].record()
        self.ended = time.perf_counter()

    def wait(self) -> None:
        """Until the device has done the step's work (on a CPU it has)."""
        if self.events is not None:
            self.events[1].synchronize()

    def seconds(self) -> float:
        if self.events is not None:
            self.wait()
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        return self.ended - self.started


@dataclass
class _Launched:
    """A queued optimizer step: its number (counted from 1), its loss (on a GPU, the
    pinned host tensor the loss is being copied into), its lr and its timer."""

    step: int
    loss: torch.Tensor
    lr: float
    timer: _StepTimer


class _Run:
    """One training run: set up, loop, log, save. State lives here, not in globals."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, *,
                 explicit: Collection[str] | None = None) -> None:
        self.info = info
        self.device = info.device
        self.out = Path(cfg.out)
        # everything that can be checked is checked before the first file is written
        self.resume_from = resume_from = self._find_checkpoint(cfg)
        self.state = load_training_state(resume_from) if resume_from else None
        data_given = cfg.data is not None
        if self.state is not None:
            # the run's settings as this number of processes takes them (grad_accum), then
            # the flags given on this command line over them
            saved = _same_batches(self.state.info.get("args", {}),
                                  self.state.info.get("world_size", 1), info.world_size,
                                  folder=resume_from)
            cfg = _merge_resumed(cfg, saved, explicit=explicit, folder=resume_from)
        cfg = validated(cfg)
        if self.state is not None:
            last = _last_step(cfg)
            if last < self.state.step:
                flag = "--stop-at" if last == cfg.stop_at else "--max-steps"
                raise GPT2Error(f"--resume: the run is at step {self.state.step} already, past "
                                f"{flag} {last}; to train on, give --max-steps above "
                                f"{self.state.step}")
        self.data = self._open_data(cfg, given=data_given)
        if self.out.resolve() == self.data.folder.resolve():
            raise GPT2Error(f"--out {cfg.out} is the --data folder; the run would write its "
                            "checkpoints beside train.bin: choose another --out")
        # the run records where its data is, wherever it is resumed from
        self.cfg = cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
        self.amp_dtype = AMP_DTYPES[cfg.dtype]
        if self.amp_dtype is torch.bfloat16 and self.device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            raise GPT2Error("--dtype bf16: this GPU has no bfloat16; use --dtype fp16")
        tokenizer = self.data.tokenizer()
        self.model = build_model(cfg, self.data, init=str(resume_from or cfg.init),
                                 device=self.device)
        self._make_out()
        # a log or samples already in OUT on a fresh run are a run's that never saved a
        # checkpoint: replaced by this run's own at its first line, not continued (and
        # left as they are if this run fails before writing one)
        self._appended = set() if self.state is None else {"log.jsonl", "samples.txt"}
        self.tokenizer = self._save_vocab(tokenizer)
        self.optimizer = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        if self.device.type == "cuda":
            # fp32 matmuls (the parts autocast leaves in fp32, or --dtype fp32) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # MFU is shown where the GPU's peak is known (gpt2.train.flops.PEAK_BF16)
        self.peak_flops = flops.peak_flops(self.device)
        self.flops_per_token = flops.training_flops_per_token(
            self.model.config, self.model.num_parameters(), cfg.block_size)
        self.step = 0
        self.best_val = math.inf
        self.records: list[dict] = []
        if self.state is not None:
            self._restore(self.state)
        # what the training forward pass runs: (x, y) -> loss. The loss belongs inside
        # the compiled function: compiled apart from it, the model left the softmax over
        # 50,257 logits per token to eager kernels (H100, 124M, 16 x 1024: 336K -> 435K
        # tokens/s with the loss inside; bench/gpu_profile.py)
        self.net = ModelLoss(self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.net = distributed.wrap(self.net, info)
        from gpt2.train.progress import StatusLine

        self.bar = StatusLine("train", enabled=cfg.progress and info.is_main)

    # -- set-up --------------------------------------------------------------------------------

    def _find_checkpoint(self, cfg: TrainConfig) -> Path | None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise GPT2Error(f"--out {out}: exists and is not a folder")
        found = latest_checkpoint(out) if out.is_dir() else None
        if cfg.resume and found is None:
            raise GPT2Error(f"--resume: no checkpoint in {out} (looked for {out}/latest); "
                            "start without --resume")
        if not cfg.resume and found is not None:
            raise GPT2Error(f"{out} already holds a training run (at {found.name}); "
                            "continue it with --resume or choose another --out")
        if found is None and out.is_dir():
            # a run writes its model into OUT: never over weights it did not make
            held = [n for n in _MODEL_FILES if (out / n).exists()]
            if held == ["best"] and (out / "log.jsonl").is_file():
                raise GPT2Error(f"--out {out} holds the best model of a run that saved no "
                                "checkpoint, so --resume cannot continue it; move its best/ "
                                "away (it loads with --model) or choose a new --out folder")
            if held:
                what = ("is the model --init loads" if cfg.init != "scratch"
                        and _same_place(out, cfg.init) else "holds a model")
                raise GPT2Error(f"--out {out} {what} ({', '.join(held)}), not a training "
                                "run; the run would write over it: choose a new --out folder")
        return found

    def _open_data(self, cfg: TrainConfig, *, given: bool) -> TokenData:
        """The prepared data; on resume, --data may move it but not change it."""
        if cfg.data is None:
            raise GPT2Error("--data DIR is required: a folder made by `gpt2 prepare` (a run "
                            "resumed with --resume uses its own when --data is left out)")
        if self.state is not None and not given and not Path(cfg.data).is_dir():
            raise GPT2Error(f"--resume: the run's data folder {cfg.data} is not there; pass "
                            "--data DIR naming the same prepared data where it is now")
        data = open_tokens(cfg.data)
        expected = self.state.info.get("data_fingerprint") if self.state is not None else None
        if isinstance(expected, dict) and data.fingerprint() != expected:
            differ = ", ".join(f"{k} {data.fingerprint().get(k)} (the run's: {expected.get(k)})"
                               for k in expected if data.fingerprint().get(k) != expected[k])
            raise GPT2Error(f"--data {cfg.data}: not the data the run in {self.out} was trained "
                            f"on ({differ}); resume with that data, or start a new run with "
                            "another --out")
        if len(data.train) < cfg.block_size + 1:
            raise GPT2Error(f"--data {cfg.data}: the train split has {len(data.train)} tokens, "
                            f"fewer than --block-size + 1 ({cfg.block_size + 1}); use a smaller "
                            "--block-size or more text")
        return data

    def _make_out(self) -> None:
        if not self.info.is_main:
            return
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / ".write-test", "w"):
                pass
            os.unlink(out / ".write-test")
        except OSError as e:
            raise GPT2Error(f"--out {out}: cannot write here ({e.strerror}); "
                            "choose another folder") from None

    def _save_vocab(self, tok):
        if tok is not None and self.info.is_main:
            # written once: every checkpoint links these files instead of re-serialising them
            tok.save_pretrained(self.out / VOCAB_DIR)
        return tok

    def _restore(self, state) -> None:
        folder = self.resume_from
        restore_optimizer(self.optimizer, state.optimizer, folder)
        self.step = state.step
        best = state.info.get("best_val_loss")
        self.best_val = math.inf if best is None else best
        if state.info.get("scaler"):
            try:
                self.scaler.load_state_dict(state.info["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise damaged(folder, "train_state.json", f"bad GradScaler state: {e}") from None
        torch.set_rng_state(state.rng["torch_cpu"])
        if "torch_cuda" in state.rng and self.device.type == "cuda":
            cuda = state.rng["torch_cuda"]
            if cuda.size(0) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(list(cuda))
        if self.info.is_main:
            self.records = _read_log(self.out / "log.jsonl", upto=self.step)
            _write_log(self.out / "log.jsonl", self.records)  # drop steps after the checkpoint
            _cut_samples(self.out / "samples.txt", upto=self.step)  # (they come again)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        cfg = self.cfg
        last = _last_step(cfg)
        self._say(f"training {self.model.num_parameters():,} parameters on {self.device}"
                  f"{f' x {self.info.world_size} processes' if self.info.enabled else ''}, "
                  f"steps {self.step}..{last}, {self._tokens_per_step():,} tokens per step")
        if cfg.warmup_steps > cfg.max_steps:
            peak = lr_at(cfg.max_steps - 1, lr=cfg.lr, min_lr=cfg.min_lr,
                         warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
            self._say(f"note: --warmup-steps {cfg.warmup_steps} is more than --max-steps "
                      f"{cfg.max_steps}: the learning rate rises all run and peaks at {peak:.2e}, "
                      f"not --lr {cfg.lr:g}")
        if self.state is not None and self.state.info.get("args", {}).get(
                "grad_accum", cfg.grad_accum) != cfg.grad_accum:
            self._say(f"note: the run was saved by {self.state.info.get('world_size', 1)} "
                      f"process(es) and goes on with {self.info.world_size}: --grad-accum "
                      f"{cfg.grad_accum} keeps its {self._tokens_per_step():,} tokens a step")
        loss = val = None
        saved_at = self.step if self.state is not None else None
        # On a GPU the loss of a step is read (a wait for the GPU) once the next step is
        # queued, so the GPU never idles while Python starts a step; a step that
        # evaluates, samples or saves is read before it does.
        queued: collections.deque[_Launched] = collections.deque()  # loss not read yet
        depth = PIPELINE_DEPTH if self.device.type in PIPELINED_DEVICES else 0
        while self.step < last:
            queued.append(self._launch_step(queued[-1] if queued else None))
            s = self.step
            evaluate = bool(cfg.eval_interval and s % cfg.eval_interval == 0 or s == last)
            sample = bool(cfg.sample_interval and s % cfg.sample_interval == 0)
            save = bool(cfg.save_interval and s % cfg.save_interval == 0 or s == last)
            keep = 0 if evaluate or sample or save else depth
            while len(queued) > keep:
                loss = self._finish_step(queued.popleft())
            if evaluate:
                val = self._evaluate()
            if sample:
                self._sample()
            if save:
                self._save()
                saved_at = s
        while queued:
            loss = self._finish_step(queued.popleft())
        if saved_at != self.step:
            self._save()
        self.bar.close()
        best = None if math.isinf(self.best_val) else self.best_val
        return TrainSummary(self.step, loss, val, best, self.out)

    def _tokens_per_step(self) -> int:
        c = self.cfg
        return c.batch_size * c.block_size * c.grad_accum * self.info.world_size

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _launch_step(self, after: _Launched | None) -> _Launched:
        """Queue one optimizer step (on a GPU it runs while Python goes on) behind
        `after`, the step queued before it if its loss is unread; _finish_step reads
        the step's loss."""
        cfg, info, step = self.cfg, self.info, self.step
        timer = _StepTimer(self.device, after.timer if after is not None else None)
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   max_steps=cfg.max_steps)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a compiled optimizer's: kept in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            index = m * info.world_size + info.rank  # the micro-batch's index in the step
            x, y = self._batch(self.data.train, batch_seed(cfg.seed, step, index))
            torch.manual_seed(dropout_seed(cfg.seed, step, index))  # its dropout masks
            with distributed.no_sync(self.net, last_micro_step=m == cfg.grad_accum - 1):
                with self._autocast():
                    loss = self.net(x, y) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step + 1
        loss = distributed.mean_over_ranks(total, info)
        if self.device.type == "cuda":
            # copied to the host here, in the step's own place in the stream: a .item()
            # once the next step is queued would copy behind that step and wait for it
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            loss = host.copy_(loss, non_blocking=True)
        timer.stop()  # (after the copy: waiting for the timer's end waits for it too)
        return _Launched(self.step, loss, lr, timer)

    def _optimizer_step(self) -> None:
        """Clip the gradients' norm, then AdamW (through the scaler, which unscales
        fp16's gradients first). With CLIP_IN_FUSED_ADAMW, a fused AdamW and no fp16
        scaler, the clipping is a divisor the optimizer applies as it reads each
        gradient, instead of a pass of its own over them."""
        optimizer, clip = self.optimizer, self.cfg.grad_clip
        if (clip > 0 and CLIP_IN_FUSED_ADAMW and optimizer.defaults.get("fused")
                and not self.scaler.is_enabled()):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            # clip_grad_norm_ multiplies by min(1, clip / (norm + 1e-6)); this divides
            optimizer.grad_scale = torch.clamp((norm + 1e-6) / clip, min=1.0)
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale
            return
        if clip > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def _finish_step(self, launched: _Launched) -> float:
        """Wait for a queued step's loss; check, log and show it."""
        cfg = self.cfg
        launched.timer.wait()  # for the device to finish the step (and its loss's copy)
        loss_value = launched.loss.item()
        if not math.isfinite(loss_value):
            raise GPT2Error(f"the loss became {loss_value} at step {launched.step}; lower --lr, "
                            "raise --warmup-steps or use --dtype bf16/fp32")
        tokens_per_s = self._tokens_per_step() / launched.timer.seconds()
        record = {"step": launched.step, "loss": loss_value, "lr": launched.lr,
                  "tokens_per_s": round(tokens_per_s, 1)}
        shown = f"step {launched.step}/{cfg.max_steps} loss {loss_value:.4f} " \
                f"lr {launched.lr:.2e} {tokens_per_s:,.0f} tok/s"
        if self.peak_flops:
            record["mfu"] = round(flops.mfu(self.flops_per_token, tokens_per_s, self.peak_flops,
                                      self.info.world_size), 4)
            shown += f" MFU {record['mfu']:.1%}"
        self._log(record)
        self.bar.show(shown)
        return loss_value

    def _batch(self, tokens, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample_batch(tokens, block_size=self.cfg.block_size,
                            batch_size=self.cfg.batch_size, seed=seed,
                            n_vocab=self.model.config.n_vocab)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), \
                y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        """Mean validation loss over eval_steps micro-batches, the same ones every time."""
        cfg, info = self.cfg, self.info
        if len(self.data.val) < cfg.block_size + 1:
            if not getattr(self, "_val_noted", False):
                self._say(f"note: val split has {len(self.data.val)} tokens, too few for "
                          f"block size {cfg.block_size}; no validation (raise --val-fraction)")
                self._val_noted = True
            self._plot()  # the train loss alone
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        # rank r takes batches r, r + world, ...: the same eval_steps batches at any world size
        for i in range(info.rank, cfg.eval_steps, info.world_size):
            x, y = self._batch(self.data.val, eval_seed(cfg.seed, i))
            with self._autocast():
                total += lm_loss(self.model(x), y)
        self.model.train()
        total = distributed.mean_over_ranks(total, info) * info.world_size  # the sum
        val = (total / cfg.eval_steps).item()
        self._log({"step": self.step, "val_loss": val})
        self._say(f"step {self.step}: val loss {val:.4f}")
        self._plot()
        if self.info.is_main and val < self.best_val:
            self.best_val = val
            save_best(self.out, model_state=self.model.state_dict(),
                      config=self.model.config, vocab_dir=self._vocab_dir(),
                      step=self.step, val_loss=val)
        self.best_val = min(self.best_val, val)
        return val

    def _plot(self) -> None:
        """loss.png from the log so far (where matplotlib is installed)."""
        if self.info.is_main:
            from gpt2.train.plot import plot_losses

            plot_losses(self.records, self.out / "loss.png", note=self._say)

    def _sample(self) -> None:
        if not self.info.is_main or self.tokenizer is None:
            return
        try:
            from gpt2.generate import generate, sampling_vocab
        except ImportError:
            self._say("note: gpt2.generate is not available; no samples")
            self.cfg = dataclasses.replace(self.cfg, sample_interval=0)
            return
        self.model.eval()
        prompt = torch.tensor([[self.tokenizer.eot_token]], device=self.device)
        with self._autocast():
            # a model with more logits than the tokenizer has tokens samples only its ids;
            # samples longer than its context slide (generate's sliding_window)
            ids = generate(self.model, prompt, max_new_tokens=self.cfg.sample_tokens,
                           temperature=0.8, top_k=200, seed=self.cfg.seed,
                           vocab_size=sampling_vocab(self.model, self.tokenizer),
                           sliding_window=True)
        self.model.train()
        text = self.tokenizer.decode(ids[0, 1:].tolist())
        self._say(f"--- sample at step {self.step} ---\n{text}\n---")
        with self._open_for_appending("samples.txt") as f:
            f.write(f"=== step {self.step} ===\n{text}\n")

    def _save(self) -> None:
        if not self.info.is_main:
            return
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        info = {
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "data_position": {"seed": self.cfg.seed, "next_step": self.step,
                              "rule": "micro-batch m of step s on rank r is seeded by "
                                      "(seed, s, m * world_size + r)"},
            "data_fingerprint": self.data.fingerprint(),
            "world_size": self.info.world_size,
            "tokens_seen": self.step * self._tokens_per_step(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "args": dataclasses.asdict(self.cfg),
        }
        save_checkpoint(self.out, step=self.step, model_state=self.model.state_dict(),
                        config=self.model.config, vocab_dir=self._vocab_dir(),
                        optimizer_state=self.optimizer.state_dict(), info=info, rng=rng)

    def _vocab_dir(self) -> Path | None:
        return self.out / VOCAB_DIR if self.tokenizer is not None else None

    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        self.records.append(record)
        with self._open_for_appending("log.jsonl") as f:
            f.write(json.dumps(record) + "\n")

    def _open_for_appending(self, name: str):
        """OUT/name to append to; on a fresh run, emptied first the first time."""
        mode = "a" if name in self._appended else "w"
        self._appended.add(name)
        return open(self.out / name, mode, encoding="utf-8")

    def _say(self, text: str) -> None:
        if self.info.is_main and self.cfg.progress:
            self.bar.note(text)


# --- building the model ----------------------------------------------------------------------


def build_model(cfg: TrainConfig, data: TokenData, *, init: str, device: torch.device):
    """A new model (init="scratch") or pretrained weights, with cfg's dropout, on device."""
    from gpt2.config import GPT2Config
    from gpt2.model import GPT2

    n_vocab = data.n_vocab
    if init == "scratch":
        if n_vocab is None:
            raise GPT2Error(f"{data.folder / 'meta.json'}: no n_vocab, the vocabulary size a "
                            "model trained from scratch needs; prepare the data again")
        torch.manual_seed(cfg.seed)  # every process starts from the same weights
        config = GPT2Config(n_vocab=n_vocab, n_ctx=cfg.block_size, n_embd=cfg.n_embd,
                            n_head=cfg.n_head, n_layer=cfg.n_layer, dropout=cfg.dropout)
        model = GPT2(config)
    else:
        loaded = GPT2.from_pretrained(init)
        if getattr(loaded, "quantization", None):
            raise GPT2Error(f"--init {init}: the model is quantized "
                            f"({loaded.quantization['method']}), which cannot be trained; "
                            "fine-tune the fp32 or bf16 model it was made from")
        config = loaded.config.replace(dropout=cfg.dropout)
        with torch.device("meta"):
            model = GPT2(config)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.source = loaded.source
        model = model.float()  # train in fp32 weights; --dtype is the autocast precision
        # (else the first step's loss is NaN, and its message blames the learning rate)
        damaged = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if damaged:
            raise GPT2Error(f"{init}: {damaged[0]} holds NaN or infinite values: the weights "
                            f"are damaged (gpt2 validate {init} checks every tensor)")
        if cfg.block_size > config.n_ctx:
            raise GPT2Error(f"--block-size {cfg.block_size} is longer than the context of "
                            f"{init} ({config.n_ctx} positions); use --block-size "
                            f"{config.n_ctx} or less")
        if not cfg.resume:  # (a resumed run's data was checked when it started)
            from gpt2.commands._common import load_tokenizer_for

            data.check_vocab_of(load_tokenizer_for(loaded.source.path), init)
        if (n_vocab or 0) > config.n_vocab:
            raise GPT2Error(f"{data.folder} was tokenized with {n_vocab} token ids but {init} "
                            f"has {config.n_vocab}; token ids would be out of range: prepare "
                            "the data with the model's vocabulary (--vocab)")
    return model.to(device).train()


def validated(cfg: TrainConfig) -> TrainConfig:
    """cfg with its types and ranges checked (a GPT2Error naming the flag) and min_lr
    filled in."""
    cfg = _typed(cfg)
    for name in ("out", "data", "init"):
        if getattr(cfg, name) is not None and not getattr(cfg, name).strip():
            raise GPT2Error(f"--{name} is empty; give a folder (. for this one)")
    positive = ("block_size", "batch_size", "grad_accum", "max_steps", "eval_steps",
                "sample_tokens")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise GPT2Error(f"--{name.replace('_', '-')} must be at least 1, "
                            f"got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_interval", "save_interval", "sample_interval",
                 "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise GPT2Error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 < cfg.lr < math.inf:
        raise GPT2Error(f"--lr must be positive, got {cfg.lr}")
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if not 0 <= min_lr <= cfg.lr:
        raise GPT2Error(f"--min-lr must be between 0 and --lr ({cfg.lr:g}), got {min_lr:g}: "
                        "the cosine schedule falls from --lr to --min-lr")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or \
            not 0 <= cfg.seed < 2**64:
        raise GPT2Error(f"--seed must be an integer from 0 to 2**64 - 1, got {cfg.seed!r}")
    if cfg.stop_at is not None and cfg.stop_at < 1:
        raise GPT2Error(f"--stop-at must be at least 1 (the step after which to save and stop; "
                        f"leave it out to train to --max-steps), got {cfg.stop_at}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise GPT2Error(f"--dropout must be at least 0 and below 1, got {cfg.dropout}")
    if cfg.dtype not in AMP_DTYPES:
        raise GPT2Error(f"--dtype must be fp32, bf16 or fp16, got {cfg.dtype!r}")
    if cfg.init == "scratch":
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(cfg, name) < 1:
                raise GPT2Error(f"--{name.replace('_', '-')} must be at least 1, "
                                f"got {getattr(cfg, name)}")
        if cfg.n_embd % cfg.n_head:
            raise GPT2Error(f"--n-embd {cfg.n_embd} must be a multiple of --n-head "
                            f"{cfg.n_head} (each head gets n-embd / n-head dimensions)")
    return dataclasses.replace(cfg, min_lr=min_lr)


def _typed(cfg: TrainConfig) -> TrainConfig:
    """cfg with paths as str, or a GPT2Error naming the first flag whose value is not of its
    type: an int that is 2.5 or "16", a float that is NaN or infinite (it would pass every
    range check below and poison the run silently), None where a value is needed."""
    if not isinstance(cfg, TrainConfig):
        raise GPT2Error(f"train takes a TrainConfig, not {type(cfg).__name__}"
                        + ("; use TrainConfig(**settings)" if isinstance(cfg, dict) else ""))
    paths = {n: os.fspath(getattr(cfg, n)) for n in ("data", "out", "init")
             if isinstance(getattr(cfg, n), os.PathLike)}
    cfg = dataclasses.replace(cfg, **paths)
    for f in dataclasses.fields(TrainConfig):
        value, flag = getattr(cfg, f.name), f"--{f.name.replace('_', '-')}"
        kinds = f.type.split(" | ")
        if not _is_kind(value, f.type):
            wanted = {"int": "an integer", "float": "a number", "str": "a string",
                      "bool": "True or False", "None": "None"}
            raise GPT2Error(f"{flag} must be {' or '.join(wanted[k] for k in kinds)}, "
                            f"got {value!r}")
        if "float" in kinds and value is not None and not math.isfinite(value):
            raise GPT2Error(f"{flag} must be a finite number, got {value!r}")
    return cfg


def _merge_resumed(cfg: TrainConfig, saved: dict, *, explicit: Collection[str] | None,
                   folder: Path) -> TrainConfig:
    """The saved run's settings, with those a resumed run may change taken from cfg.

    Settings chosen for the resumed run (`explicit`, see train) are applied where
    RESUMABLE_CHANGES allows; one that differs from the run's own elsewhere is an error:
    silently dropped, the user would get a run they did not ask for. Repeating the run's
    own values (the same command line plus --resume) is fine, and a setting left out is
    the run's own, --max-steps included (not the flag's default).
    """
    merged, conflicts = {}, []
    for f in dataclasses.fields(TrainConfig):
        name, mine = f.name, getattr(cfg, f.name)
        chosen = name in explicit if explicit is not None else mine != f.default
        if name not in saved or name in PER_INVOCATION:
            merged[name] = mine
            continue
        theirs = saved[name]
        if not _is_kind(theirs, f.type):
            raise damaged(folder, "train_state.json", f"setting {name} is {theirs!r}")
        if name == "data":  # the same data may have moved: _Run._open_data checks it
            merged[name] = theirs if mine is None else mine
        elif name in RESUMABLE_CHANGES:
            merged[name] = mine if chosen else theirs
        else:
            merged[name] = theirs
            if chosen and mine != theirs:
                flag = f"--{name.replace('_', '-')} {mine}"
                if name in _SHAPE and saved.get("init", "scratch") != "scratch":
                    conflicts.append(f"{flag} (the run's model came from --init "
                                     f"{saved['init']}, whose shape it keeps)")
                else:
                    conflicts.append(f"{flag} (the run's: {theirs})")
    if conflicts:
        out = cfg.out
        raise GPT2Error(f"--resume goes on with the run's own settings, but {', '.join(conflicts)} "
                        f"differ; leave them out to resume, or start a new run with another --out "
                        f"(--init {out} starts from this run's model)")
    return TrainConfig(**merged)


_SHAPE = ("n_layer", "n_head", "n_embd")  # the network's shape: from scratch only


def _same_batches(saved: dict, saved_world: object, world: int, *, folder: Path) -> dict:
    """A run's saved settings for resuming on `world` processes: the same micro-batches
    per step.

    A step is world_size x grad_accum micro-batches, and micro-batch m of rank r is
    seeded by its global index m * world_size + r, so N processes accumulating A draw
    exactly what M processes accumulating N * A / M draw: grad_accum is rescaled to
    keep the product, and the run goes on with the same data and dropout masks (the
    same updates up to summation order). Done before the command line's flags are
    compared with the run's, so the run's own command line plus --resume matches on
    any number of processes. GPT2Error where M does not divide N * A.
    """
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
        raise damaged(folder, "train_state.json", f"world_size is {saved_world!r}")
    if not isinstance(saved, dict):
        raise damaged(folder, "train_state.json", f"its settings are {saved!r}")
    accum = saved.get("grad_accum", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise damaged(folder, "train_state.json", f"setting grad_accum is {accum!r}")
    if saved_world == world:
        return saved
    per_step = saved_world * accum
    if per_step % world:
        raise GPT2Error(f"--resume: the run took {per_step} micro-batch(es) a step ({saved_world} "
                        f"process(es) x --grad-accum {accum}), which {world} processes "
                        "cannot share evenly; resume on a number of processes that divides "
                        f"{per_step}")
    return {**saved, "grad_accum": per_step // world}


def _is_kind(value: object, annotation: str) -> bool:
    """Whether a value read from JSON fits a TrainConfig annotation such as 'int | None'."""
    kinds = {"None": type(None), "bool": bool, "int": int, "float": (int, float), "str": str}
    return any(isinstance(value, kinds[t]) and (t == "bool" or not isinstance(value, bool))
               for t in annotation.split(" | "))


def _read_log(path: Path, *, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    # (errors="replace": a damaged byte spoils its line, which is then dropped, not the log)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        step = r.get("step") if isinstance(r, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step <= upto:
            records.append(r)  # (a line without a step number is not one of ours)
    return records


def _cut_samples(path: Path, *, upto: int) -> None:
    """Drop the samples after step `upto` from samples.txt (each begins with a line
    "=== step N ===", as _sample writes it): the resumed run samples those steps again."""
    from gpt2._io import atomic_write_bytes

    if not path.is_file():
        return
    data = path.read_bytes()
    for m in re.finditer(rb"^=== step (\d+) ===$", data, re.M):
        if int(m.group(1)) > upto:
            atomic_write_bytes(path, data[:m.start()])
            return


def _write_log(path: Path, records: list[dict]) -> None:
    from gpt2._io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
