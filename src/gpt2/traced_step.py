"""A CPU decode step replayed by TorchScript instead of Python.

On a CPU a 124M decode step spends 3-4 ms per token outside its matrix products
(bench/CPU_NOTES.md): some 100 ATen calls per layer issued one by one from
Python, plus module calls. That is a third of an int8 step. TorchScript's
tracer (what `torch.jit.trace` runs) records the step once -- every operation
`gpt2.fast_decode.decode_step` runs for one new token per row -- and replays
the recording from C++: the same kernels on the same weights, without the
Python around them (one row ~1.5x the tokens per second of the plain loop,
eight ~1.35x, int8 124M). The weights are passed to the recorded graph at each
call rather than held in it, so the memory goes with the model (`_as_function`).

The recording is made once a model has decoded `RECORD_AFTER_STEPS` (128)
steps at a batch size, counting the steps a call plans (so a long generation
records at once, short ones after a few calls, a one-off 50-token run never:
recording 124M takes ~0.5 s, which ~170 faster steps repay). It is checked
against the plain step it replaces and kept for later calls while the model's
modules and weights stay the same ones; any replaced module or tensor, or a
weight changed in place, drops it and starts the count again. It serves every
cache length: the step reads k and v as views that end at the new token's
slot, so no shape in the recording depends on the length.

Used by `gpt2.generate` on CPUs for unpadded batches, when no hooks are set (ours
or PyTorch's own forward hooks), attention is the fused kind, dropout is off and
autocast is not on; everything else takes the plain path. TorchScript is deprecated in favour of
`torch.compile`, which on a CPU does not help here (it adds a guard check per
call and cannot trace FBGEMM's packed int8 weights: bench/CPU_NOTES.md); where
tracing is missing or fails, decoding falls back to the plain step. Set
`TRACE_CPU_STEP = False` to turn it off.

    >>> from gpt2.config import GPT2Config
    >>> from gpt2.model import GPT2
    >>> model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8)).eval()
    >>> cache = model.new_cache(1, max_len=4)
    >>> with torch.inference_mode():
    ...     _ = model(torch.tensor([[1, 2]]), cache=cache)
    ...     step = cpu_step(model, cache, planned_steps=RECORD_AFTER_STEPS)
    ...     step(torch.tensor([3])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from gpt2.kv_cache import KVCache

__all__ = ["RECORD_AFTER_STEPS", "TRACE_CPU_STEP", "cpu_step"]

TRACE_CPU_STEP = True
# Recording 124M takes ~0.5 s (1558M ~3 s) and saves ~3 ms (~12 ms) per step: it pays
# for itself after ~170 steps. It is made once a model has decoded this many steps at
# one batch size, counting the steps the current call plans.
RECORD_AFTER_STEPS = 128

# model -> {batch size: (signature of the model when recorded, the recording or None)};
# an entry goes with its model. None marks a recording that failed: not tried again.
_RECORDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> {batch size: decode steps planned so far}
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_step(
    model: nn.Module, cache: KVCache, *, planned_steps: int = 0
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A step function token (B,) -> next-token logits (B, V) over `cache`, or None
    where the recorded step does not apply or is not worth making yet.

    Each call feeds one token per row at position `cache.length`, writes its keys
    and values there and advances the cache, like `model(token[:, None],
    cache=cache, last_only=True)[:, -1]`. planned_steps: how many steps the caller
    expects to run; a recording is made once this model has run (or is about to
    run) `RECORD_AFTER_STEPS` steps at this batch size, so a short one-off
    generation does not pay for it.
    """
    if not _applies(model, cache):
        return None
    B = cache.k.size(1)
    kept = _RECORDINGS.setdefault(model, {})
    steps = _STEPS.setdefault(model, {})
    signature = _signature(model)  # once per call: the model cannot change mid-generation
    entry = kept.get(B)
    if entry is not None and entry[0] != signature:
        # the model changed (a training step, new weights): count its steps afresh, so a
        # trainer's short samples between steps do not pay for a recording each time
        del kept[B]
        entry, steps[B] = None, 0
    steps[B] = steps.get(B, 0) + planned_steps
    recorded = None
    if entry is not None:
        if entry[1] is None:
            return None  # recording failed for this model and batch size: the plain path
        recorded = entry[1]
    elif steps[B] < RECORD_AFTER_STEPS:
        return None  # not worth recording yet
    pos = torch.zeros(1, dtype=torch.long)  # (1,) the new token's position

    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal recorded
        p = cache.length
        pos.fill_(p)
        k = cache.k.narrow(3, 0, p + 1)  # (n_layer, B, nh, p + 1, hs): up to this slot
        v = cache.v.narrow(3, 0, p + 1)
        if recorded is not None:
            logits = recorded(token, pos, k, v)  # (B, V)
        else:  # the first step: run it plainly (also warms lazy caches), then record
            plain = _Step(model)
            logits = plain(token, pos, k, v)
            recorded = _record(plain, logits, (token, pos, k, v))
            kept[B] = (signature, recorded)
            if recorded is None:
                recorded = plain  # failed: this call goes on with the plain step
        cache.advance(1)
        return logits

    return step


def _applies(model: nn.Module, cache: KVCache) -> bool:
    return (
        TRACE_CPU_STEP
        and hasattr(torch.jit, "_get_trace_graph")
        and hasattr(torch._C, "_create_function_from_graph")
        and cache.k.device.type == "cpu"
        and not _cpu_autocast()  # a recording would keep autocast's casts
        and getattr(model, "_taps", None) is None  # hooks read the normal forward's names
        and not _torch_hooks(model)  # (a recording would run without them)
        and all(getattr(block.attn, "impl", None) == "sdpa" for block in model.h)
        and not (model.training and model.config.dropout > 0)
    )


def _torch_hooks(model: nn.Module) -> bool:
    """Forward hooks of PyTorch's own on the model's modules (register_forward_hook,
    register_forward_pre_hook) or on every module (register_module_forward_hook)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4 takes no device here
        return torch.is_autocast_cpu_enabled()


class _Step(nn.Module):
    """What gets recorded: `decode_step` over caches that end at the new slot."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token, pos, k, v):
        from gpt2.fast_decode import decode_step

        return decode_step(self.model, k, v, token, pos, attend_all=True)  # (B, V)


def _record(plain: _Step, expected: torch.Tensor, inputs: tuple):
    """Trace the step and check one replay against the plain step's logits; None if
    either fails. Replaying writes the same keys and values into the same slot again."""
    try:
        with warnings.catch_warnings():
            # deprecation notices, and the tracer's notes on shapes read as Python values
            # (batch size and widths: fixed for a recording)
            warnings.simplefilter("ignore")
            # the bare graph: the module's parameters and buffers are its last inputs
            graph, _ = torch.jit._get_trace_graph(plain, inputs)
        state = tuple(torch.jit._unique_state_dict(plain, keep_vars=True).values())
        replay_fn = _as_function(graph, state)
        replay = replay_fn(*inputs)
    except Exception:  # noqa: BLE001 -- any failure only means the plain step is used
        return None
    if replay.shape != expected.shape or not torch.allclose(replay, expected, rtol=1e-4,
                                                            atol=1e-4):  # fmt: skip
        return None
    return replay_fn


def _as_function(graph, state: tuple) -> Callable[..., torch.Tensor]:
    """The traced graph as a function (token, pos, k, v) -> logits; the graph holds no
    tensor, the function passes them in.

    `torch.jit.trace` would put the graph into PyTorch's global compilation unit, which
    keeps it for the life of the process, and with it every tensor the graph holds: a
    model that had recorded a step was never freed after `del` (124M: +490 MB a model
    in fp32, +167 int8). So the bare graph is made a function in a compilation unit of
    its own, freed with it, and the tensors it held as constants (the kernels' copies
    of weights, which are neither parameters nor buffers) become inputs too: the
    recording holds them, and goes with its model (`bench/memory_cycles.py`).
    """
    lifted = []
    for node in list(graph.findAllNodes("prim::Constant")):
        if node.hasAttribute("value") and node.kindOf("value") == "t":
            value = graph.addInput()
            value.setType(node.output().type())
            node.output().replaceAllUsesWith(value)
            lifted.append(node.t("value"))
            node.destroy()
    fn = torch._C._create_function_from_graph("gpt2_traced_decode_step", graph)
    tensors = (*state, *lifted)

    def replay(token, pos, k, v):
        return fn(token, pos, k, v, *tensors)

    return replay


def _signature(model: nn.Module) -> tuple:
    """Which modules and tensors the model holds, and how often each was written to:
    a recording holds the ones it was made with."""
    parts: list = [id(m) for m in model.modules()]
    for t in itertools.chain(model.parameters(), model.buffers()):
        try:
            version = t._version
        except RuntimeError:  # an inference-mode tensor counts no writes
            version = -1
        parts.append((id(t), version))
    return tuple(parts)
