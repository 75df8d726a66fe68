"""Checkpoint files mapped into memory copy-on-write, and their pages handed back.

Loaders read tensors as views of the mapped file instead of copying them: the
tensors a model keeps as stored (wte, wpe, biases, LayerNorms) stay the page
cache's pages, shared and never copied. A tensor that is converted on the way in
(a projection weight transposed to nn.Linear's (out, in), or a cast) is copied once,
and the file's pages under it are handed back at once, so loading peaks near the
size of the loaded weights rather than the file's plus the copies'. The mapping is
private (copy-on-write): training or editing the model never writes to the file.
A file rewritten in place by someone else while mapped would show through (or,
shrunk, crash the reader with SIGBUS); gpt2 writes every file beside its destination
and renames it into place (gpt2._io), which leaves a mapped old file untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable

import torch

Convert = Callable[[str, torch.Tensor], torch.Tensor]


def map_file(f) -> mmap.mmap:
    """An open, non-empty file mapped copy-on-write (the mapping outlives the file object).

    Mapped in small pages only: where the page cache holds the file in 2 MB folios, a
    fault could map a whole folio at once, taking back in the pages of a neighbouring
    tensor that were just handed back (+2 MB per small tensor read after its weight)."""
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            mapped.madvise(mmap.MADV_NOHUGEPAGE)
    return mapped


def view(mapped: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype,
         shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor stored at [offset, offset + nbytes), those bytes as a uint8 view).

    The tensor is a view of the mapping too, unless its offset is misaligned for its
    dtype (formats need not align their data): then it is a copy."""
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
    tensor = raw.clone() if offset % dtype.itemsize else raw
    return tensor.view(dtype).view(shape), raw


def overlap(spans: Iterable[tuple[str, int, int]]) -> tuple[str, str] | None:
    """The names of two (name, begin, end) byte spans of one file that overlap, or None.
    Tensors read as views of a mapping must not: they would be one memory."""
    reached, last = 0, ""  # the furthest byte a span so far takes, and its name
    for name, begin, end in sorted(spans, key=lambda span: span[1]):
        if begin < reached and end > begin:
            return last, name
        if end > reached:
            reached, last = end, name
    return None


def converted(name: str, tensor: torch.Tensor, source: torch.Tensor,
              convert: Convert | None) -> torch.Tensor:
    """convert(name, tensor), where `source` is the tensor's bytes in a mapped file;
    if the result is a copy, not those bytes, their pages are handed back."""
    result = tensor if convert is None else convert(name, tensor)
    if result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
        hand_back(source.data_ptr(), source.numel() * source.element_size())
    return result


def hand_back(address: int, nbytes: int) -> None:
    """Drop the whole pages inside [address, address + nbytes), part of a file mapped
    copy-on-write that nothing has written to, from this process: they are the file's,
    so nothing is lost (reading them again refetches them). Linux only; elsewhere they
    stay until the file is unmapped."""
    madvise = _madvise()
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if madvise is not None and end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call (handing back is only a saving:
    without it, loading works and peaks higher)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def trim_heap() -> None:
    """Give the C heap's free memory back to the system, after loading (glibc only).

    Packing weights for the CPU kernels (int8, bf16) frees large temporaries; glibc
    keeps what it freed once its dynamic mmap threshold has risen: int8 124M stayed
    at 481 MB resident where the model holds 240 MB (1 load in 2; 246 MB after this,
    which took 0.3-21 ms). Decoding's own allocations grow the heap again as needed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has none)
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim

