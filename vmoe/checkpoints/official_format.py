"""Building blocks of Google's V-MoE checkpoint format (``vmoe.checkpoints.partitioned``).

Shared by the reader (``vmoe.checkpoints.official_reader``) and the writer the tests use
(``tests/checkpoints/official_writer.py``): the error type, the array/chunk descriptions, the dtype
whitelist and a tiny *streaming* MessagePack header reader.

Why a hand-written header reader: a data shard is one MessagePack map whose values hold the
raw array bytes (possibly hundreds of MiB per chunk). ``msgpack.Unpacker`` would copy each of
them into its buffer and again into a ``bytes`` object. Reading only the headers lets the
reader record *where* each chunk's bytes are and later ``readinto`` them straight into the
destination array, so nothing but the output array is ever held in memory.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import BinaryIO

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "Chunk",
    "ArrayInfo",
    "shard_path",
    "storage_dtype",
    "output_dtype",
    "MsgpackStream",
]

VERSION = "20220622"
MARKER_KEY = "__msgpack_array_chunk_a87ca2__"
EXT_NDARRAY, EXT_SLICE_ND, EXT_INDEX_INFO = 1, 6, 8
KNOWN_EXT_CODES = {
    1: "ndarray",
    2: "complex",
    3: "numpy scalar",
    4: "ShapedArray",
    5: "Slice",
    6: "SliceNd",
    7: "SliceNdArray",
    8: "IndexInfo",
}

# Only plain numeric dtypes are accepted: never object/str/void (nothing in a file may make
# numpy build Python objects). Stored little-endian ("native" on every machine vmoe ran on).
_NUMERIC = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
_STORAGE = {name: np.dtype(name).newbyteorder("<") for name in _NUMERIC}
_STORAGE["bfloat16"] = np.dtype("<u2")  # upper 16 bits of a float32


class CheckpointFormatError(ValueError):
    """A file of an official V-MoE checkpoint is missing, truncated, corrupted or unexpected."""


def shard_path(prefix: str, shard: int, num_shards: int) -> str:
    """``P.data-00001-of-00003``: the name vmoe gives data shard ``shard`` of ``num_shards``."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def storage_dtype(name: str, where: str) -> np.dtype:
    """The numpy dtype of the stored bytes for a checkpoint dtype name (bfloat16 -> <u2)."""
    if not isinstance(name, str) or name not in _STORAGE:
        raise CheckpointFormatError(
            f"{where}: unknown dtype {name!r}; expected one of {sorted(_STORAGE)}"
        )
    return _STORAGE[name]


def output_dtype(name: str) -> np.dtype:
    """The dtype the reader returns: the stored one, except bfloat16 -> float32."""
    return np.dtype(np.float32) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stored block of an array: its global region ``[start, stop)`` per dim, its shard."""

    region: tuple[tuple[int, int], ...]
    shard: int

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.region)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.region)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """What the ``.index`` file says about one array (leaf ``leaf`` in the data shards).

    ``dtype`` is the stored dtype name (e.g. ``"float32"``, ``"bfloat16"``); arrays are
    returned with ``numpy_dtype`` (bfloat16 becomes float32).
    """

    name: str
    leaf: int
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return output_dtype(self.dtype)

    @property
    def stored_nbytes(self) -> int:
        return math.prod(self.shape) * _STORAGE[self.dtype].itemsize


class MsgpackStream:
    """Reads MessagePack *headers* one at a time from a binary file, without reading payloads.

    Every method raises ``CheckpointFormatError`` naming the file and the offset when the
    bytes are not what the checkpoint format puts there, or when the file ends early.
    """

    def __init__(self, f: BinaryIO, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def fail(self, what: str, offset: int | None = None) -> CheckpointFormatError:
        at = self.f.tell() if offset is None else offset
        return CheckpointFormatError(f"{self.path}: {what} (at byte {at} of {self.size})")

    def read(self, n: int) -> bytes:
        start = self.f.tell()
        if start + n > self.size:  # check first: a corrupted length must not allocate GiBs
            raise self.fail(
                f"file is truncated: needed {n} more bytes, found {self.size - start}", start
            )
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"file is truncated: needed {n} more bytes, found {len(data)}", start)
        return data

    def skip(self, n: int) -> None:
        """Seeks over ``n`` payload bytes (checking that the file is long enough)."""
        start = self.f.tell()
        if start + n > self.size:
            raise self.fail(
                f"file is truncated: a {n}-byte payload at byte {start} needs bytes "
                f"{start}..{start + n}, but the file ends at byte {self.size}",
                start,
            )
        self.f.seek(start + n)

    def _uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "big")

    def header(self) -> tuple[str, object]:
        """Next item's kind and value: ("map"|"array"|"str"|"bin", length), ("ext", (code,
        length)), ("int"|"bool"|"nil"|"float", value). Payloads of str/bin/ext are not read."""
        b = self.read(1)[0]
        if b <= 0x7F:
            return "int", b
        if b >= 0xE0:
            return "int", b - 0x100
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        simple = {0xC0: ("nil", None), 0xC2: ("bool", False), 0xC3: ("bool", True)}
        if b in simple:
            return simple[b]
        sized = {
            0xC4: ("bin", 1),
            0xC5: ("bin", 2),
            0xC6: ("bin", 4),
            0xD9: ("str", 1),
            0xDA: ("str", 2),
            0xDB: ("str", 4),
            0xDC: ("array", 2),
            0xDD: ("array", 4),
            0xDE: ("map", 2),
            0xDF: ("map", 4),
        }
        if b in sized:
            kind, n = sized[b]
            return kind, self._uint(n)
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32: length, then a signed type code
            length = self._uint(1 << (b - 0xC7))
            return "ext", (struct.unpack(">b", self.read(1))[0], length)
        if 0xD4 <= b <= 0xD8:  # fixext 1/2/4/8/16
            return "ext", (struct.unpack(">b", self.read(1))[0], 1 << (b - 0xD4))
        if 0xCC <= b <= 0xCF:
            return "int", self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return "int", int.from_bytes(self.read(n), "big", signed=True)
        if b in (0xCA, 0xCB):
            return "float", struct.unpack(
                ">f" if b == 0xCA else ">d", self.read(4 if b == 0xCA else 8)
            )[0]
        raise self.fail(
            f"byte 0x{b:02x} is not a valid MessagePack type (corrupted file?)", self.f.tell() - 1
        )

    def expect(self, kind: str, what: str) -> object:
        """Reads a header and checks its kind; returns its value (a length for containers)."""
        start = self.f.tell()
        got, value = self.header()
        if got != kind:
            raise self.fail(f"expected {what} (a MessagePack {kind}), found a {got}", start)
        return value

    def read_str(self, what: str) -> str:
        raw = self.read(self.expect("str", what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from None

    def read_int(self, what: str) -> int:
        return self.expect("int", what)
