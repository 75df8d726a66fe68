"""Fast CPU inference: fewer bytes of weights per generated token.

Decoding one token reads every weight once and does little arithmetic with
each, so on a CPU its speed is the memory bandwidth divided by the size of the
weights: 498 MB in fp32 for 124M, about 45 tokens/s at 22 GB/s. The only way
past that is fewer bytes per weight, with a matrix-vector kernel that actually
streams them at full speed:

  bf16   `prepare_bf16(model)`: 2 bytes per weight. Every Linear is replaced by
         `PackedBF16Linear`. It runs gpt2's own kernel (`gpt2.cpu_kernels`): on
         Intel AMX tiles for decoding and prompts alike, or AVX512-BF16 up to 8 rows,
         streaming the weights at close to the memory bandwidth; for more rows
         without AMX, oneDNN's matmul on a weight reordered once into its blocked
         layout.
  int8   `quantize_model(model, "int8")`: 1 byte per weight plus one scale per
         output channel. Every Linear becomes `Int8Linear`, an int8 x int8 product:
         each *row* of the input is quantized to 8 bits over its own range on the
         fly, as CTranslate2's int8 does, so a row's precision depends on its own
         values, not on its neighbours'. It runs gpt2's own kernel: on AMX for any
         prompt as well as decoding (each weight is read once per call and reused
         from cache for every block of 16 rows: a 256-token 124M prompt in 68 ms,
         CTranslate2 int8 106), or AVX512-VNNI likewise for any prompt (quantize,
         multiply and rescale in one call, at close to the memory bandwidth for a
         few rows; past 8 rows the weight goes in slices, each through every block
         of rows while in cache), or AVX2 up to 8 rows; for more rows there, or
         without either, FBGEMM's GEMM (`torch.ops.quantized.linear_dynamic`).
         Memory traffic is a quarter of fp32's.
         `quantize_model(model, "int8-weight-only")` keeps the activations in bf16
         instead: each row rounded to bf16 times the int8 weights widened to bf16
         in registers, fp32 sums (gpt2's own kernel: AMX for any prompt, 256 rows
         a call, or AVX512-BF16 up to 64; elsewhere `torch._weight_int8pack_mm`): closer to
         fp32, 65-91% of int8's speed in our runs; it is also the path on CPUs
         without FBGEMM (ARM) and on other devices. Prompts of more rows than the
         kernels take (FBGEMM 64, `_weight_int8pack_mm` 32) widen the int8 weights
         to bf16 (exactly) and run a bf16 matmul where the CPU has native bf16:
         faster there for prefill.

Both keep the model's structure, names and hooks; only the Linear modules (and,
through `model.lm_head`, the tied LM head) change, and with an int8 head the token
embedding becomes an `Int8Embedding` that reads the head's int8 rows.

Saved int8 checkpoints use the Hugging Face layout with three differences: each
quantized weight `<name>.weight` is int8 with a bf16 `<name>.weight_scale`
beside it, config.json says `"quantization": {"method": "int8-weight-only",
...}`, and the weights file is `model-int8.safetensors`, a name transformers
does not look for: it refuses the folder instead of loading the int8 values as
if they were weights (it ignores config.json's entry and the scales).
`save_quantized` writes one, `load_quantized_state` reads it back with no
re-quantization (and reads the `model.safetensors` of earlier versions too).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import cpu_kernels
from gpt2.errors import GPT2Error

METHODS = ("int8", "int8-weight-only")  # the runtime choices; both store the same checkpoint
# The `quantization.method` written to config.json: the file holds int8 weights only
# (activations are never stored), whichever kernel later runs them.
FORMAT = "int8-weight-only"
FORMAT_VERSION = 1
INT8_WEIGHTS = "model-int8.safetensors"

# The int8 kernel reads K (the input width) in blocks of 16; other widths crash it,
# so those layers fall back to dequantize-then-matmul (correct, just slower).
_INT8_KERNEL_K_MULTIPLE = 16
# Above this many rows the weight-only path widens the weight to bf16 and uses a bf16
# matmul instead of `_weight_int8pack_mm`, whose time grows with the rows.
_INT8PACK_MAX_ROWS = 32
# Likewise for FBGEMM (int8 activations), whose 124M prefill measured 38-49 ms at 64
# rows against the widened bf16 matmul's 44-62, and slower from 96 rows (53-66 vs 52).
_FBGEMM_MAX_ROWS = 64
# An int8 model keeps its KV cache in bf16 where the CPU has native bf16: at long
# contexts a batch's keys and values are more bytes per step than the int8 weights
# (batch 8, 300 positions: 141 MB in fp32 against ~125 MB of weights), and bf16 halves
# them. Measured (bench/CPU_NOTES.md): batch 8, 300 new tokens 1.23-1.29x, batch 1,
# 500 tokens 1.08x; on the `gpt2 demo` model the mean KL to fp32 went from 5.44e-5 to
# 5.52e-5 (the int8 products' error dwarfs bf16's). None keeps the activations' dtype.
INT8_KV_CACHE_DTYPE: torch.dtype | None = torch.bfloat16


# -- capability ---------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX512-BF16 or AMX) through oneDNN.

    Elsewhere bf16 is emulated and slower than fp32, so `prepare_bf16` refuses it.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_supports_int8_gemm() -> bool:
    """True where PyTorch has FBGEMM's dynamic int8 GEMM (x86 CPUs with AVX2 or better)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
    )


# -- int8 ---------------------------------------------------------------------------------


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (out, in) -> (q int8 (out, in), scale bf16 (out,)).

    weight ~= q * scale[:, None]. The scale is rounded *up* to a bf16 value, so the
    kernel (which wants bf16 scales) uses exactly the scale the weights were rounded
    with, and |weight / scale| <= 127 never clips.

    >>> q, s = quantize_weight_int8(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    >>> q.tolist(), s.tolist()
    ([[63, -126], [126, 16]], [0.0079345703125, 0.015869140625])
    """
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)  # (out, in)
    scale = torch.empty(w.shape[0], device=w.device)  # (out,)
    for i in range(0, w.shape[0], 1024):  # (the whole matrix at once made two fp32
        block = w[i:i + 1024].float()    # temporaries its size: +310 MB for 124M's head)
        s = _round_up_to_bf16(block.abs().amax(dim=1) / 127.0)
        scale[i:i + 1024] = s.clamp_(min=torch.finfo(torch.bfloat16).tiny)
        q[i:i + 1024] = torch.round(block / scale[i:i + 1024, None]).clamp_(-127, 127)
    return q, scale.to(torch.bfloat16)


def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each (positive, finite) fp32 value, as fp32.

    bf16 is fp32 with the low 16 bits of the mantissa cut off: add 0xFFFF, then cut.
    """
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) and scale (out,) -> fp32 (out, in); exact (an int8 times a bf16 fits fp32)."""
    return q.float() * scale.float()[:, None]


def _repack_after_load(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict hook: the weights changed, so rebuild the kernel's own copy.
    (A module-level function, not a lambda, so that a whole model still pickles.)"""
    module.pack()


def _through_kernel(
    kernel: cpu_kernels.Kernel, x: torch.Tensor, in_features: int, out_features: int
) -> torch.Tensor | None:
    """x (..., in) through one of our CPU kernels, or None where it has too many rows."""
    if x.dim() == 2 and x.size(0) <= kernel.max_rows and x.is_contiguous():
        # a decode step's (B, C) rows: the kernel alone, no reshaping (each reshape is a
        # call of its own, and a decode step makes 49 of these)
        return kernel(x)  # (B, out)
    rows = x.numel() // in_features
    if rows > kernel.max_rows:
        return None
    y = kernel(x.reshape(rows, in_features).contiguous())  # (rows, out)
    return y.view(*x.shape[:-1], out_features)  # (..., out)


class _KernelCopy(nn.Module):
    """A layer that keeps a kernel's private copy of its weight in `_packed`, made by the
    subclass's `pack()`. The copy is remade whenever the weight may have changed: after
    a device or dtype move, after load_state_dict, and after unpickling (it is never
    pickled itself: oneDNN's blocked tensors cannot be).

    Where our AMX kernel takes every product (bf16, int8, int8-weight-only), its
    tiles hold the whole weight, so a block's projection
    can let go of `weight` as stored (`tiles_only`): the buffer becomes a meta tensor of
    its shape, and the weight is rebuilt from the tiles where it is needed -- in
    state_dict, pickling, a move or cast, and products past the kernel's rows. That
    halves what the blocks' projections hold on AMX CPUs. Not for a weight shared with
    another module (the LM head's is wte's).
    """

    def __init__(self) -> None:
        super().__init__()
        self._packed = None
        self._native = None  # what gpt2's own kernel (gpt2.cpu_kernels) needs, if it runs
        self._tiles_only = False  # let go of `weight` where the AMX tiles hold it all
        self.register_load_state_dict_post_hook(_repack_after_load)

    def pack(self) -> None:
        raise NotImplementedError

    # -- the weight as stored, or rebuilt from the tiles --

    def tiles_only(self) -> None:
        """Keep the weight only in the AMX kernel's tiles, where that kernel runs (see
        the class); elsewhere nothing changes. Kept through later packs."""
        self._tiles_only = True
        self._let_go()

    def _let_go(self) -> None:
        w = self._buffers.get("weight")
        native = self._native
        # (getattr: a layer pickled before this attribute existed has none)
        if (getattr(self, "_tiles_only", False) and w is not None and not w.is_meta
                and native is not None and native.name == "AMX"
                and native.max_rows >= cpu_kernels.AMX_BF16_MAX_ROWS):  # every row count
            self._buffers["weight"] = torch.empty(w.shape, dtype=w.dtype, device="meta")

    def _dropped(self) -> bool:
        w = self._buffers.get("weight")
        return w is not None and w.is_meta and self._native is not None

    def plain_weight(self) -> torch.Tensor:
        """`weight` (out, in) as stored: the buffer, or a copy rebuilt from the tiles."""
        if not self._dropped():
            return self.weight
        w = self._buffers["weight"]
        return cpu_kernels.from_amx_layout(self._native.args[0], self._native.amx_group,
                                           *w.shape)

    def _restore(self) -> bool:
        """Put the weight as stored back into the buffer; True if it had been let go."""
        if not self._dropped():
            return False
        self._buffers["weight"] = self.plain_weight()
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._dropped() and not keep_vars and prefix + "weight" in destination:
            destination[prefix + "weight"] = self.plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore()  # copying into a meta buffer would fail
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = {**self.__dict__, "_packed": None, "_native": None}
        if self._dropped():
            state["_buffers"] = {**self._buffers, "weight": self.plain_weight()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.pack()

    def _apply(self, fn, recurse=True):
        restored = self._restore()  # a move or cast needs the values
        before = self._tensors()
        out = super()._apply(fn, recurse)
        if self._tensors() != before:  # moved or cast (`.to(device)` where it is: nothing)
            self.pack()
        elif restored:
            self._let_go()
        return out

    def _tensors(self) -> list[tuple]:
        return [(t.data_ptr(), t.dtype, t.device) for t in self._buffers.values()
                if t is not None] + [(p.data_ptr(), p.dtype, p.device)
                                     for p in self._parameters.values() if p is not None]


class Int8Linear(_KernelCopy):
    """A Linear layer with int8 weights and a bf16 scale per output channel.

    activations="int8" (the default) quantizes each input row to 8 bits on the fly and
    runs FBGEMM's int8 GEMM where `cpu_supports_int8_gemm()`; "bf16" (weight-only)
    casts the input to bf16 and runs `torch._weight_int8pack_mm`. Elsewhere (other
    devices, CPUs without FBGEMM) both run the weight-only path. The output has the
    input's dtype; the bias stays in the activation dtype (it is tiny).

    >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activations: str = "int8",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.bfloat16, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._init_kernel(activations)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, bias_dtype: torch.dtype | None = None, activations: str = "int8"
    ) -> Int8Linear:
        """Quantize an nn.Linear (weight (out, in)) per output channel."""
        return cls.from_weight(
            linear.weight, linear.bias, bias_dtype=bias_dtype, activations=activations
        )

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bias_dtype: torch.dtype | None = None,
        activations: str = "int8",
    ) -> Int8Linear:
        """Quantize a float weight (out, in) and keep the bias (out,) as it is."""
        q, scale = quantize_weight_int8(weight)
        return cls.from_quantized(q, scale, bias, bias_dtype=bias_dtype, activations=activations)

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bias_dtype: torch.dtype | None = None,
        activations: str = "int8",
    ) -> Int8Linear:
        """Wrap already quantized tensors (as read from a checkpoint): nothing is re-rounded."""
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != q.shape[:1]:
            raise GPT2Error(
                f"int8 weight must be int8 (out, in) with a scale (out,); got {q.dtype} "
                f"{tuple(q.shape)} and scale {tuple(scale.shape)}"
            )
        out_features, in_features = q.shape
        layer = cls.__new__(cls)
        _KernelCopy.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.register_buffer("weight", q.detach())
        layer.register_buffer("weight_scale", scale.detach().to(torch.bfloat16))
        if bias is not None:
            layer.register_buffer("bias", bias.detach().to(bias_dtype or bias.dtype))
        else:
            layer.bias = None
        layer._init_kernel(activations)
        return layer

    # -- the FBGEMM copy of the weight --

    def _init_kernel(self, activations: str) -> None:
        if activations not in ("int8", "bf16"):
            raise GPT2Error(f"Int8Linear activations must be 'int8' or 'bf16', not {activations!r}")
        self.activations = activations
        # FBGEMM's int8 kernels without VNNI add pairs of u8 x s8 products in int16, which
        # can saturate; 7-bit activations (reduce_range) keep every pair in range there.
        self._reduce_range = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        self.pack()

    def pack(self) -> None:
        """(Re)build the kernels' copies of the weight (and bias); call after changing
        `weight`, `weight_scale` or `bias` in place (load_state_dict does it itself)."""
        self._restore()
        self._packed = self._native = None
        w = self.weight
        # prompts of more rows than our kernel takes (AVX2 int8, weight-only without AMX)
        # go through a bf16 matmul where the CPU has native bf16: faster than FBGEMM and
        # _weight_int8pack_mm there (256-token 124M prefill: ~2300 tokens/s, FBGEMM
        # ~1600-2200, _weight_int8pack_mm 624), and activations stay bf16
        self._bf16_for_many_rows = w.device.type == "cpu" and cpu_supports_bf16()
        if w.device.type != "cpu" or w.is_meta:
            return
        if self.activations == "bf16":  # decoding: our int8 x bf16 kernel, where it runs
            self._native = cpu_kernels.kernel_for_int8_weight_only(w, self.weight_scale, self.bias)
            self._let_go()
            return
        # decoding: our kernel (gpt2.cpu_kernels) where it runs; FBGEMM for the rows
        # it does not take, unless it takes all that FBGEMM would
        self._native = cpu_kernels.kernel_for_int8(w, self.weight_scale, self.bias)
        if self._native is not None and self._native.max_rows >= _FBGEMM_MAX_ROWS:
            self._let_go()
            return
        if not cpu_supports_int8_gemm():
            return
        zero = torch.zeros(self.out_features, dtype=torch.long)
        bias = None if self.bias is None else self.bias.detach().float()
        try:
            with warnings.catch_warnings():
                # PyTorch marks its quantized tensor types deprecated; this one only
                # carries (int8 values, per-channel scales) into the packing call
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    w, self.weight_scale.double(), zero, 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        except (RuntimeError, AttributeError):  # a build without it: the weight-only path
            self._packed = None

    @property
    def kernel(self) -> str:
        """What runs for a few rows (decoding): "int8" (activations quantized per row:
        gpt2's own kernel on x86 CPUs with AMX, AVX512-VNNI or AVX2, else FBGEMM) or "bf16"
        (weight-only: gpt2's own kernel on CPUs with AVX512-BF16, else PyTorch's). On AMX
        our kernels take prompts too (weight-only 256 rows a call), and so does int8's on
        AVX512-VNNI (from 64 rows around oneDNN's int8 product); past the rows a kernel
        takes (elsewhere FBGEMM's 64 int8, 32 weight-only), a bf16 matmul on CPUs with
        native bf16."""
        int8 = self._packed is not None or self._native is not None
        return "int8" if int8 and self.activations == "int8" else "bf16"

    @property
    def activation_bits(self) -> int | None:
        """Bits each row of activations is quantized to for a few rows: 8, or 7 on x86
        CPUs without VNNI (whose int8 instructions add pairs of products in 16 bits);
        None for the weight-only kernel (bf16 activations)."""
        if self.kernel == "bf16":
            return None
        if self._native is not None:
            return 7 if self._native.name == "AVX2" else 8
        return 7 if self._reduce_range else 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None and x.device.type == "cpu":
            # decoding (and prompts, on AMX): our kernel quantizes each row over its own
            # range (or, weight-only, rounds it to bf16), multiplies and rescales in one call
            x32 = x if x.dtype == torch.float32 else x.float()
            y = _through_kernel(self._native, x32, self.in_features, self.out_features)
            if y is not None:
                return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self._packed is not None and x.dim() == 2 and x.size(0) == 1 \
                and x.dtype == torch.float32 and x.device.type == "cpu":
            # one fp32 row (a decode step): the kernel alone, no reshaping or casting
            # (each of those is a call of its own, and a decode step makes 49 of these)
            return torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)
        lead = x.shape[:-1]
        rows = x.numel() // self.in_features
        most = _INT8PACK_MAX_ROWS if self.kernel == "bf16" else _FBGEMM_MAX_ROWS
        many = rows > most and self._bf16_for_many_rows
        if self._packed is not None and x.device.type == "cpu" and not many:
            x2 = x.reshape(-1, self.in_features).float()  # (M, in)
            if x2.shape[0] == 1:  # one row: the kernel's per-tensor scale is that row's own
                y = torch.ops.quantized.linear_dynamic(x2, self._packed, self._reduce_range)
            else:
                # scale every row to [-1, 1] first, so the kernel's one scale fits each
                # row as if it were alone; undo it on the product (the bias is not scaled)
                # (abs + amax: linalg.vector_norm(inf) measured 6x slower on (8, 3072))
                r = x2.abs().amax(dim=-1, keepdim=True)  # (M, 1)
                r = r.clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero row stays 0
                y = torch.ops.quantized.linear_dynamic(x2 / r, self._packed, self._reduce_range)
                if self.bias is not None:
                    bias = self.bias.float()
                    y = torch.addcmul(bias, y.sub_(bias), r)  # (W x / r) * r + b
                else:
                    y = y.mul_(r)
            return y.view(*lead, self.out_features).to(x.dtype)  # (..., out)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
        # (the scale's .to is a no-op unless someone cast the model with .to(dtype))
        scale = self.weight_scale.to(torch.bfloat16)
        if x2.device.type == "cpu" and self.in_features % _INT8_KERNEL_K_MULTIPLE == 0 \
                and not many:
            y = torch._weight_int8pack_mm(x2, self.plain_weight(), scale)  # (M, out) bf16
        else:
            # many rows (a prompt), or no int8 kernel: widen the weight to bf16 (exact for
            # int8) and run a bf16 matmul, then scale the product as the kernel does;
            # measured 7x faster than the kernel at 256 rows (oneDNN/AMX)
            y = F.linear(x2, self.plain_weight().to(torch.bfloat16)) * scale  # (M, out)
        y = y.view(*lead, self.out_features)
        if self.bias is not None:
            # adding the bias in the input's dtype also casts the output back to it
            return torch.add(self.bias.to(x.dtype), y).to(x.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        kernel = {"int8": "int8 x int8 (FBGEMM)", "bf16": "int8 weights x bf16"}[self.kernel]
        if self._native is not None:
            kernel = (f"{kernel.split(' (')[0]} (gpt2 {self._native.name} kernel up to "
                      f"{self._native.max_rows} rows)")  # fmt: skip
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, per-channel, {kernel}"
        )


class Int8Embedding(nn.Module):
    """The token embedding of a model whose LM head is int8: it looks rows up in the head's
    own int8 weight and scale (the same tensors, so wte costs no memory of its own) and
    dequantizes them to `dtype` (the model's activation dtype). The lookup and the head
    therefore read the same numbers, q * scale, exactly as in a float model's tied head.

    >>> head = Int8Linear.from_weight(torch.randn(10, 4), activations="bf16")
    >>> Int8Embedding(head, torch.float32)(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 4])
    """

    def __init__(self, head: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        # not persistent: a checkpoint stores these once, as wte.weight / wte.weight_scale
        self.register_buffer("weight", head.weight, persistent=False)  # (V, C) int8
        self.register_buffer("weight_scale", head.weight_scale, persistent=False)  # (V,)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # F.embedding, not weight[idx]: a negative id is an error, as in nn.Embedding,
        # instead of a row counted from the end
        rows = F.embedding(idx, self.weight).float()  # (..., C)
        scale = F.embedding(idx, self.weight_scale.unsqueeze(-1)).float()  # (..., 1)
        return (rows * scale).to(self.dtype)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, {self.weight.size(1)}, int8 rows of the LM head"


# -- bf16 ---------------------------------------------------------------------------------


class PackedBF16Linear(_KernelCopy):
    """A bf16 Linear with a private copy of its weight laid out for a fast kernel: our
    AMX kernel's tiles (`gpt2.cpu_kernels`), or oneDNN's blocked layout beside our
    AVX512-BF16 kernel on CPUs without AMX.

    `weight` (out, in) is a plain bf16 buffer, for state_dict and saving; the copy
    is a private attribute, rebuilt on load. A block's projection on AMX keeps the
    weight in the tiles only (see `_KernelCopy.tiles_only`). On a CPU without native
    bf16, or on any other device, it runs plain `F.linear`.

    >>> layer = PackedBF16Linear.from_linear(nn.Linear(64, 32))
    >>> layer(torch.randn(2, 5, 64, dtype=torch.bfloat16)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, persistent: bool = True,
        lazy: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # persistent=False for the LM head, whose weight is wte's (shared, saved once)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16), persistent=persistent)
        if bias is not None:
            self.register_buffer("bias", bias.detach().to(torch.bfloat16))
        else:
            self.bias = None
        # lazy: make oneDNN's copy (CPUs without AMX) at the first product of more rows
        # than our kernel takes, not now. For the LM head: decoding a few rows and
        # prompts (their last position only) never need it, scoring does; until then
        # the head holds no second copy of wte (77 MB for 124M, 161 MB for 1558M).
        self._lazy = lazy
        self.pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedBF16Linear:
        return cls(linear.weight, linear.bias)

    def pack(self) -> None:
        """(Re)build the kernels' copies of the weight; call after changing `weight` in
        place other than through load_state_dict (which does it itself)."""
        self._restore()
        w = self.weight
        self._packed = self._native = None
        self._packed_later = False
        if w.device.type == "cpu" and not w.is_meta and cpu_supports_bf16():
            # decoding: our kernel (gpt2.cpu_kernels) where it runs
            self._native = cpu_kernels.kernel_for_bf16(w, self.bias)
            if self._native is None or self._native.name != "AMX":
                # more rows: oneDNN on its own layout (the batch-size hint 1 tunes it for
                # few rows; any still work). The AMX kernel takes prompts too; past its
                # rows, plain F.linear
                if getattr(self, "_lazy", False):  # (a layer pickled before it: not lazy)
                    self._packed_later = True
                else:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self._let_go()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            y = _through_kernel(self._native, x, self.in_features, self.out_features)
            if y is not None:
                return y
        if self._packed_later and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
            self._packed_later = False
        if self._packed is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            if x.numel() == self.in_features:
                # One row (batch-1 decoding) without our kernel: PyTorch's bf16
                # matrix-vector product. oneDNN's AMX kernel streams as fast only once
                # warm, and runs at half speed for the first second or so after other
                # work (measured: 28 vs 55-60 tokens/s).
                v = x.reshape(self.in_features)
                y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(
                    self.bias, self.weight, v)  # fmt: skip
                return y.view(*x.shape[:-1], self.out_features)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.plain_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        kernels = [f"gpt2 {self._native.name} kernel up to {self._native.max_rows} rows"
                   ] if self._native is not None else []  # fmt: skip
        kernels += ["oneDNN packed"] if self._packed is not None else []
        kernels += ["oneDNN packed at first use"] if self._packed_later else []
        return (f"in_features={self.in_features}, out_features={self.out_features}, bf16"
                + "".join(f", {k}" for k in kernels))  # fmt: skip


# -- whole models -------------------------------------------------------------------------

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _block_linears(model: nn.Module):
    """(parent module, attribute, full name) of every projection in every block."""
    for i, block in enumerate(model.h):
        for path in _LINEARS:
            owner_name, attr = path.split(".")
            yield getattr(block, owner_name), attr, f"h.{i}.{path}"


def _has_lm_head_slot(model: nn.Module) -> bool:
    # GPT2.forward calls `model.lm_head` when it is set; older models tie the head to wte only
    return "lm_head" in vars(model) or "lm_head" in model._modules


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "int8", *, lm_head: bool = True) -> nn.Module:
    """Replace every projection of a float GPT2 with `Int8Linear`, in place; returns the model.

    method: "int8" (activations quantized per row on the fly where the CPU has FBGEMM)
    or "int8-weight-only" (activations stay bf16); the weights are the same either way.

    lm_head: also quantize the (tied) LM head, which is a third of 124M's weights and
    so a third of the bytes read per token. `wte` then becomes an `Int8Embedding`
    reading the head's int8 rows, so the lookup and the head use the same numbers,
    as a reloaded checkpoint does, and the float embedding table is freed.
    Activations, LayerNorms and attention keep the model's dtype; the KV cache is
    `INT8_KV_CACHE_DTYPE` (bf16) on CPUs with native bf16.

    >>> from gpt2.config import GPT2Config
    >>> from gpt2.model import GPT2
    >>> model = quantize_model(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96)))
    >>> type(model.h[0].mlp.c_fc).__name__
    'Int8Linear'
    """
    activations = _activations_for(method)
    if not all(hasattr(model, name) for name in ("config", "wte", "h")):
        raise GPT2Error(f"quantize_model takes a GPT2 model, got {type(model).__name__}")
    if getattr(model, "quantization", None):
        raise GPT2Error("this model is already quantized; load the float checkpoint instead")
    act_dtype = model.wte.weight.dtype
    for owner, attr, _ in _block_linears(model):
        layer = Int8Linear.from_linear(
            getattr(owner, attr), bias_dtype=act_dtype, activations=activations
        )
        layer.tiles_only()  # (the float weight it replaces goes too)
        setattr(owner, attr, layer)
    head = lm_head and _has_lm_head_slot(model)
    if head:
        _attach_int8_head(model, *quantize_weight_int8(model.wte.weight), activations)
    model.quantization = {"method": FORMAT, "bits": 8, "lm_head": head}
    model.kv_cache_dtype = _int8_kv_cache_dtype(model)
    return model


def _int8_kv_cache_dtype(model: nn.Module) -> torch.dtype | None:
    """`INT8_KV_CACHE_DTYPE` for an int8 model on a CPU with native bf16, else None."""
    on_cpu = model.ln_f.weight.device.type in ("cpu", "meta")
    return INT8_KV_CACHE_DTYPE if on_cpu and cpu_supports_bf16() else None


def _activations_for(method: str) -> str:
    """The Int8Linear `activations` for a quantization method name."""
    if method not in METHODS:
        raise GPT2Error(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    return "bf16" if method == "int8-weight-only" else "int8"


def _attach_int8_head(
    model: nn.Module, q: torch.Tensor, scale: torch.Tensor, activations: str
) -> None:
    """Int8 LM head from (q, scale), and wte reading its rows (see `Int8Embedding`)."""
    dtype = model.ln_f.weight.dtype  # the activation dtype
    model.lm_head = Int8Linear.from_quantized(q, scale, activations=activations)
    model.wte = Int8Embedding(model.lm_head, dtype)


def prepare_bf16(model: nn.Module) -> nn.Module:
    """Cast a GPT2 to bf16 and give every projection and the LM head oneDNN-packed weights.

    GPT2Error where the CPU has no native bf16 (AVX512-BF16 or AMX): there bf16 is
    emulated and slower than fp32. On other devices plain `.to(torch.bfloat16)`
    is already the fast path, and this only casts.

    >>> from gpt2.config import GPT2Config
    >>> from gpt2.model import GPT2
    >>> model = prepare_bf16(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96)))
    >>> model.wte.weight.dtype
    torch.bfloat16
    """
    if getattr(model, "quantization", None):
        raise GPT2Error(f"this model is quantized ({model.quantization['method']}); it runs in "
                        "its own precision: load the float model for bf16")
    device = model.wte.weight.device
    if device.type == "cpu" and not cpu_supports_bf16():
        raise GPT2Error(
            "--dtype bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where bf16 "
            "runs slower than fp32; use --dtype fp32, or --quantize int8 for speed"
        )
    model = model.to(torch.bfloat16)
    if device.type != "cpu":
        return model
    with torch.no_grad():
        for owner, attr, _ in _block_linears(model):
            layer = PackedBF16Linear.from_linear(getattr(owner, attr))
            layer.tiles_only()
            setattr(owner, attr, layer)
        if _has_lm_head_slot(model):
            model.lm_head = PackedBF16Linear(model.wte.weight, None, persistent=False, lazy=True)
    return model


# -- int8 checkpoints ---------------------------------------------------------------------
#
# The Hugging Face layout (names `transformer.h.0.attn.c_attn.weight`, projection
# weights stored (in, out)), where every quantized weight is int8 and has a bf16
# `<name>.weight_scale` (out,) beside it. With the LM head quantized, `wte.weight`
# itself is stored int8 + scale: the head and the embedding lookup share it.


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A quantized model's tensors under our names and orientation, as a checkpoint holds them."""
    info = getattr(model, "quantization", None)
    if not info:
        raise GPT2Error("this model is not quantized; call quantize_model(model, 'int8') first")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    if info["lm_head"]:
        state["wte.weight"] = model.lm_head.weight
        state["wte.weight_scale"] = model.lm_head.weight_scale
    return state


def save_quantized(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model as an int8 checkpoint folder, atomically.

    >>> save_quantized(quantize_model(model, "int8"), "gpt2-int8")  # doctest: +SKIP
    """
    from gpt2._io import atomic_folder, atomic_write_text
    from gpt2.weights.huggingface import write_safetensors
    from gpt2.weights.names import is_transposed

    state = quantized_state_dict(model)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_safetensors(tmp / INT8_WEIGHTS,
                          {f"transformer.{name}": t for name, t in state.items()},
                          transposed={f"transformer.{name}" for name in state
                                      if is_transposed(name)},
                          metadata={"format": "pt"})  # fmt: skip
        config = model.config.to_hf_config()
        config["torch_dtype"] = str(model.ln_f.weight.dtype).removeprefix("torch.")
        config["quantization"] = {**model.quantization, "version": FORMAT_VERSION}
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def quantization_info(path: str | os.PathLike) -> dict | None:
    """config.json's "quantization" entry for a checkpoint folder (or a file in one); None if
    the checkpoint is not quantized."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        return None
    try:
        info = json.loads(config_file.read_text(encoding="utf-8")).get("quantization")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None  # the float loader reports a broken config.json
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("method") != FORMAT or info.get("bits") != 8:
        raise GPT2Error(
            f"{config_file}: unknown quantization {info!r}; this version reads {FORMAT!r} "
            "with 8 bits only"
        )
    version = info.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise GPT2Error(f"{config_file}: int8 format version {version!r} is not one this gpt2 "
                        f"reads (up to {FORMAT_VERSION}); upgrade gpt2")
    return info


def load_quantized_state(path: str | os.PathLike):
    """An int8 checkpoint folder -> (config, state dict in our names/orientation, info).

    The int8 tensors come back exactly as saved: nothing is quantized again.
    """
    from gpt2.config import GPT2Config
    from gpt2.weights.huggingface import read_safetensors
    from gpt2.weights.names import is_transposed, transpose

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    info = quantization_info(folder)
    if info is None:
        raise GPT2Error(f"{folder}: config.json has no \"quantization\"; not an int8 checkpoint")
    config = GPT2Config.from_hf_config(folder / "config.json")
    weights = folder / INT8_WEIGHTS
    if not weights.is_file() and (folder / "model.safetensors").is_file():
        weights = folder / "model.safetensors"  # written before the int8 file had its name

    def convert(hf_name: str, t: torch.Tensor) -> torch.Tensor:
        return transpose(t) if is_transposed(hf_name.removeprefix("transformer.")) else t

    raw = read_safetensors(weights, convert)  # GPT2Error: missing, truncated or corrupt
    # not names.hf_to_ours: it knows GPT-2's parameters, not the int8 scales beside them
    state = {hf_name.removeprefix("transformer."): t for hf_name, t in raw.items()}
    _check_quantized_state(state, config, info, str(weights))
    return config, state, info


def _check_quantized_state(state: dict, config, info: dict, source: str) -> None:
    """Every tensor of a GPT-2 present with the right shape and dtype, or GPT2Error."""
    from gpt2.weights.names import expected_shapes

    expected = dict(expected_shapes(config))
    quantized = [n for n, _, _ in _names_of_linears(config)]
    if info.get("lm_head"):
        quantized.append("wte")
    for base in quantized:
        expected[f"{base}.weight_scale"] = expected[f"{base}.weight"][:1]
    for name, shape in expected.items():
        t = state.get(name)
        if t is None:
            raise GPT2Error(f"{source}: missing tensor {name!r}; the int8 checkpoint is incomplete")
        if tuple(t.shape) != shape:
            raise GPT2Error(
                f"{source}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
            )
    for base in quantized:
        if state[f"{base}.weight"].dtype != torch.int8:
            raise GPT2Error(f"{source}: tensor {base + '.weight'!r} should be int8")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise GPT2Error(f"{source}: unexpected tensor {extra[0]!r} in an int8 checkpoint")


def _names_of_linears(config):
    for i in range(config.n_layer):
        for path in _LINEARS:
            yield f"h.{i}.{path}", i, path


def model_from_quantized_state(
    config, state: dict, info: dict, *, method: str = "int8"
) -> nn.Module:
    """Build a GPT2 around already quantized tensors (see `load_quantized_state`); method
    picks the kernel as in `quantize_model`."""
    from gpt2.model import GPT2

    activations = _activations_for(method)

    state = dict(state)
    with torch.device("meta"):
        model = GPT2(config)
    act_dtype = state["ln_f.weight"].dtype
    linears = {name: [state.pop(f"{name}.{key}") for key in ("weight", "weight_scale", "bias")]
               for _, _, name in _block_linears(model)}
    head = bool(info.get("lm_head"))
    if head and not _has_lm_head_slot(model):
        raise GPT2Error("this checkpoint's LM head is int8, but GPT2 has no lm_head slot")
    head_tensors = (state.pop("wte.weight"), state.pop("wte.weight_scale")) if head else None
    # the float tensors before the int8 layers are attached: load_state_dict makes every
    # int8 layer it passes rebuild its kernel's copy of the weight (_repack_after_load)
    model.load_state_dict(state, strict=False, assign=True)
    for owner, attr, name in _block_linears(model):
        q, scale, bias = linears[name]
        layer = Int8Linear.from_quantized(q, scale, bias, bias_dtype=act_dtype,
                                          activations=activations)
        layer.tiles_only()
        setattr(owner, attr, layer)
    if head:
        _attach_int8_head(model, *head_tensors, activations)  # wte reads the head's rows
        model.wte.dtype = act_dtype
    model.quantization = {"method": FORMAT, "bits": 8, "lm_head": head}
    model.kv_cache_dtype = _int8_kv_cache_dtype(model)
    return model.eval()


def load_quantized(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", method: str = "int8"
) -> nn.Module:
    """An int8 checkpoint folder -> a ready GPT2 (what `GPT2.from_pretrained` calls for one);
    method: "int8" or "int8-weight-only", the kernel to run it with."""
    from gpt2.weights import Checkpoint

    config, state, info = load_quantized_state(path)
    model = model_from_quantized_state(config, state, info, method=method)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model.source = Checkpoint(config, {}, "huggingface-int8", folder)  # for `gpt2 validate`
    return model.to(device)
