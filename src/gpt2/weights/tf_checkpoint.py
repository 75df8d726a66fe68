"""Read TensorFlow V2 checkpoints ("tensor bundles") without TensorFlow.

A checkpoint with prefix `model.ckpt` is

- `model.ckpt.index`: a LevelDB-format table (sorted keys, no filter block, no
  compression). Key "" holds a BundleHeaderProto (how many data shards, byte
  order); every other key is a tensor name whose value is a BundleEntryProto
  (dtype, shape, shard, offset, size, masked crc32c of the bytes).
- `model.ckpt.data-00000-of-00001` (one file per shard): the tensors' raw
  little-endian bytes, one after another.

    >>> ckpt = TFCheckpoint("models/124M/model.ckpt")   # doctest: +SKIP
    >>> ckpt.shape("model/wte"), ckpt.dtype("model/wte")  # doctest: +SKIP
    ((50257, 768), torch.float32)
    >>> wte = ckpt.read("model/wte")                      # doctest: +SKIP

Every block of the index and every tensor is checked against its crc32c, so a
truncated or corrupted download fails loudly instead of producing a model that
quietly talks nonsense.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import torch

from gpt2.config import resolve_size
from gpt2.errors import GPT2Error
from gpt2.weights import mapping

__all__ = ["TFCheckpoint"]

# TensorFlow's DataType enum (types.proto) -> torch dtype, for the plain numeric types.
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.int32,
    4: torch.uint8,
    5: torch.int16,
    6: torch.int8,
    9: torch.int64,
    10: torch.bool,
    14: torch.bfloat16,
    19: torch.float16,
}
_DTYPE_NAMES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}

_TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's kTableMagicNumber, the table's last 8 bytes
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the magic
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
# google_crc32c takes only `bytes`, not a view of the mapping: checksum a copy of one
# piece at a time. 1 MiB pieces stay in malloc's heap (bigger ones are mmapped and
# page-faulted afresh each time, which costs more than the copy).
_CRC_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    """One tensor's BundleEntryProto."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    sliced: bool


class TFCheckpoint:
    """A TensorFlow V2 checkpoint: tensor names, shapes, dtypes, and verified reads.

    `prefix` is the path without the `.index` suffix, e.g. `.../124M/model.ckpt`.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        if sys.byteorder != "little":
            raise GPT2Error("reading TensorFlow checkpoints needs a little-endian machine")
        self.prefix = Path(prefix)
        self.index_path = Path(f"{self.prefix}.index")
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            raise GPT2Error(
                f"{self.index_path}: file not found; pass the checkpoint prefix "
                "(the path without .index, e.g. .../124M/model.ckpt)"
            ) from None
        table = _Table(data, self.index_path)
        num_shards = 1
        self._entries: dict[str, _Entry] = {}
        for key, value in table.items():
            if key == b"":
                num_shards = self._parse_header(value)
            elif key[:1] == b"\x00":
                continue  # the pieces of a partitioned tensor, named by an ordered code
            else:
                name = key.decode("utf-8", "replace")
                self._entries[name] = self._parse_entry(value, name)
        self._maps: dict[int, mmap.mmap | None] = {}
        self.shard_paths = [
            Path(f"{self.prefix}.data-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)
        ]
        for path in self.shard_paths:
            if not path.is_file():
                raise GPT2Error(
                    f"{path}: data shard not found (the index names {num_shards} shard(s)); "
                    f"the download is incomplete: {_redownload_hint(self.prefix)}"
                )
        for name, entry in self._entries.items():
            if entry.shard_id >= num_shards:
                raise GPT2Error(
                    f"{self.index_path}: tensor {name!r} is in shard {entry.shard_id}, but "
                    f"the checkpoint has {num_shards}; the index is corrupt"
                )
        self._check_no_overlap()

    def _check_no_overlap(self) -> None:
        """Tensors are read as views of their shard: two over the same bytes would be
        one memory (a bundle never writes that; a corrupt index could say it)."""
        for shard, path in enumerate(self.shard_paths):
            both = mapping.overlap((name, e.offset, e.offset + e.size)
                                   for name, e in self._entries.items() if e.shard_id == shard)
            if both is not None:
                raise GPT2Error(f"{self.index_path}: tensors {both[0]!r} and {both[1]!r} "
                                f"overlap in {path.name}; the index is corrupt")

    def names(self) -> list[str]:
        """Tensor names in the index's (sorted) order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entry(name)
        if entry.dtype not in _DTYPES:
            kind = _DTYPE_NAMES.get(entry.dtype, f"DataType {entry.dtype}")
            raise GPT2Error(
                f"{self.index_path}: tensor {name!r} has dtype {kind}, which this reader "
                "does not support (numeric tensors only)"
            )
        return _DTYPES[entry.dtype]

    def nbytes(self, name: str) -> int:
        return self._entry(name).size

    def read(self, name: str, convert: mapping.Convert | None = None) -> torch.Tensor:
        """The tensor's values, checked against its crc32c, in a tensor of its own; or
        convert(name, view), where view is the tensor's bytes in its shard mapped
        copy-on-write (gpt2.weights.mapping): returning the view keeps those pages
        (another read of the tensor shares them), returning a copy hands them back."""
        entry = self._entry(name)
        if entry.sliced:
            raise GPT2Error(
                f"{self.index_path}: tensor {name!r} is partitioned into slices, which this "
                "reader does not support; re-save it as a single variable"
            )
        dtype = self.dtype(name)
        expected = math.prod(entry.shape) * dtype.itemsize
        if entry.size != expected:
            raise GPT2Error(
                f"{self.index_path}: tensor {name!r} has {entry.size} bytes, but shape "
                f"{list(entry.shape)} of {dtype} needs {expected}; the index is corrupt"
            )
        path = self.shard_paths[entry.shard_id]
        mapped = self._mapped(entry.shard_id)
        file_size = len(mapped) if mapped is not None else 0
        if entry.offset + entry.size > file_size:
            raise GPT2Error(
                f"{path}: tensor {name!r} ends at byte {entry.offset + entry.size}, past "
                f"the end of the {file_size}-byte file; truncated download? "
                f"{_redownload_hint(self.prefix)}"
            )
        if entry.size == 0:
            empty = torch.empty(entry.shape, dtype=dtype)
            return empty if convert is None else convert(name, empty)
        crc = 0
        for start in range(entry.offset, entry.offset + entry.size, _CRC_CHUNK):
            crc = google_crc32c.extend(crc, mapped[start : min(start + _CRC_CHUNK,
                                                              entry.offset + entry.size)])
        if _mask(crc) != entry.crc32c:
            raise GPT2Error(
                f"{path}: tensor {name!r} fails its crc32c check; corrupted download? "
                f"{_redownload_hint(self.prefix)}"
            )
        tensor, raw = mapping.view(mapped, entry.offset, entry.size, dtype, entry.shape)
        return mapping.converted(name, tensor, raw, convert or _own_copy)

    def _mapped(self, shard: int) -> mmap.mmap | None:
        """The shard mapped copy-on-write (None for an empty file), mapped once."""
        if shard not in self._maps:
            path = self.shard_paths[shard]
            try:
                with open(path, "rb") as f:
                    empty = os.fstat(f.fileno()).st_size == 0
                    self._maps[shard] = None if empty else mapping.map_file(f)
            except OSError as e:
                raise GPT2Error(f"{path}: cannot read ({e.strerror or e})") from None
        return self._maps[shard]

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise GPT2Error(
                f"{self.index_path}: no tensor named {name!r} ({len(self._entries)} tensors, "
                f"e.g. {', '.join(repr(n) for n in list(self._entries)[:3])})"
            ) from None

    def _parse_header(self, value: bytes) -> int:
        """BundleHeaderProto: num_shards=1, endianness=2 (0 = little), version=3."""
        fields = _proto_fields(value, self.index_path)
        num_shards = _one(fields, 1, 0)
        if num_shards < 1:
            raise GPT2Error(
                f"{self.index_path}: header says {num_shards} data shards; corrupt index"
            )
        if _one(fields, 2, 0) != 0:
            raise GPT2Error(
                f"{self.index_path}: checkpoint was written big-endian; only little-endian "
                "checkpoints are supported"
            )
        version = _proto_fields(_one(fields, 3, b""), self.index_path)
        if _one(version, 2, 0) > 1:  # min_consumer: TensorFlow's bundle format is version 1
            raise GPT2Error(
                f"{self.index_path}: tensor bundle format version {_one(version, 2, 0)} is "
                "newer than this reader (1)"
            )
        return num_shards

    def _parse_entry(self, value: bytes, name: str) -> _Entry:
        """BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6, slices=7."""
        fields = _proto_fields(value, self.index_path)
        shape_fields = _proto_fields(_one(fields, 2, b""), self.index_path)
        # TensorShapeProto: dim=2 (repeated Dim{size=1}); a Dim of size 0 is an empty message.
        dims = tuple(
            _signed(_one(_proto_fields(d, self.index_path), 1, 0)) for d in shape_fields.get(2, [])
        )
        if _one(shape_fields, 3, 0) or any(d < 0 for d in dims):
            raise GPT2Error(f"{self.index_path}: tensor {name!r} has an unknown shape")
        return _Entry(
            dtype=_one(fields, 1, 0),
            shape=dims,
            shard_id=_one(fields, 3, 0),
            offset=_one(fields, 4, 0),
            size=_one(fields, 5, 0),
            crc32c=_one(fields, 6, 0),
            sliced=bool(fields.get(7)),
        )


def _own_copy(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _mask(crc: int) -> int:
    """TensorFlow/LevelDB's masked crc32c: stored checksums are rotated and offset."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _redownload_hint(prefix: Path) -> str:
    size = resolve_size(prefix.parent.name)
    return f"re-download with `gpt2 download {size or 'SIZE'}`"


# --- LevelDB table --------------------------------------------------------------------


class _Table:
    """The sorted key/value pairs of a LevelDB-format table held in memory."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path = data, path
        if len(data) < _FOOTER_SIZE:
            raise GPT2Error(f"{path}: {len(data)} bytes is too short for a checkpoint index")
        footer = data[-_FOOTER_SIZE:]
        if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
            raise GPT2Error(
                f"{path}: bad magic number; not a TensorFlow V2 checkpoint index "
                "(or a truncated one)"
            )
        _meta_handle, pos = self._handle(footer, 0)  # metaindex: empty without filters
        self.index_handle, _ = self._handle(footer, pos)

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for _key, handle in self._block(*self.index_handle):
            out.extend(self._block(*self._handle(handle, 0)[0]))
        return out

    def _handle(self, buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
        """A BlockHandle: varint offset, varint size."""
        offset, pos = _varint(buf, pos, self.path)
        size, pos = _varint(buf, pos, self.path)
        return (offset, size), pos

    def _block(self, offset: int, size: int) -> list[tuple[bytes, bytes]]:
        """Check a block's trailer, then decode its prefix-compressed entries."""
        end = offset + size
        if end + _BLOCK_TRAILER_SIZE > len(self.data) - _FOOTER_SIZE:
            raise GPT2Error(f"{self.path}: block at byte {offset} runs past the end; corrupt index")
        block = self.data[offset:end]
        kind = self.data[end]
        (stored_crc,) = struct.unpack_from("<I", self.data, end + 1)
        if _mask(google_crc32c.extend(google_crc32c.value(block), bytes([kind]))) != stored_crc:
            raise GPT2Error(
                f"{self.path}: index block at byte {offset} fails its crc32c check; corrupted "
                f"download? {_redownload_hint(Path(str(self.path).removesuffix('.index')))}"
            )
        if kind != 0:
            raise GPT2Error(
                f"{self.path}: index block at byte {offset} is compressed (type {kind}); "
                "only uncompressed tables are supported"
            )
        return _block_entries(block, self.path, offset)


def _block_entries(block: bytes, path: Path, where: int) -> list[tuple[bytes, bytes]]:
    """A block is entries, then uint32 restart offsets, then their uint32 count.

    Each entry is varint shared, varint non_shared, varint value_length, the key's
    last non_shared bytes (the first `shared` come from the previous key) and the
    value. At every restart point the key is stored whole (shared == 0).
    """

    def corrupt(why: str) -> GPT2Error:
        return GPT2Error(f"{path}: index block at byte {where}: {why}; corrupt index")

    if len(block) < 4:
        raise corrupt("too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    if num_restarts < 1 or limit < 0:
        raise corrupt(f"bad restart count {num_restarts}")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    entries, key, pos = [], b"", 0
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos, path)
        non_shared, pos = _varint(block, pos, path)
        value_len, pos = _varint(block, pos, path)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise corrupt(f"bad entry at offset {start}")
        if start in restarts:
            if shared:
                raise corrupt(f"restart point {start} has a shared key prefix")
            restarts.discard(start)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    if restarts and entries:  # (an empty block's one restart point is its end)
        raise corrupt(f"restart points {sorted(restarts)} are not entry boundaries")
    return entries


# --- protobuf wire format -------------------------------------------------------------


def _varint(buf: bytes, pos: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GPT2Error(f"{path}: malformed varint at byte {pos}; corrupt index")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _signed(value: int) -> int:
    """An int64 field as written (negative numbers are 10-byte varints)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _proto_fields(buf: bytes, path: Path) -> dict[int, list]:
    """Decode a protobuf message into {field number: [values]}: ints or raw bytes."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, path)
        number, wire = tag >> 3, tag & 7
        if wire == 0:  # varint
            value, pos = _varint(buf, pos, path)
        elif wire == 1:  # fixed64
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:  # length-delimited: bytes, strings, sub-messages
            n, pos = _varint(buf, pos, path)
            value = buf[pos : pos + n]
            pos += n
        elif wire == 5:  # fixed32
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise GPT2Error(f"{path}: unsupported protobuf wire type {wire}; corrupt index")
        if pos > len(buf):
            raise GPT2Error(f"{path}: truncated protobuf message; corrupt index")
        fields.setdefault(number, []).append(value)
    return fields


def _one(fields: dict[int, list], number: int, default):
    """A singular field: the last value wins, as in protobuf."""
    values = fields.get(number)
    return values[-1] if values else default
