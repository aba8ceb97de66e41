"""Write a ``.safetensors`` file one tensor at a time (``safetensors.torch.save_file`` needs
every tensor in memory at once; a checkpoint converter should hold one).

The format is simple: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces so the data starts 8-byte aligned), then the raw little-endian bytes of all
tensors back to back. Since the header only needs names, dtypes and shapes, it is written
first from a spec; each tensor's bytes then go straight to their offset, in any order.

Example::

    specs = {name: (torch.float32, shape) for name, shape in shapes.items()}
    with SafetensorsStreamWriter("model.safetensors", specs) as w:
        for name, array in iter_checkpoint_arrays(prefix):
            w.write(name, torch.from_numpy(array))
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["SafetensorsStreamWriter", "TensorEntry", "read_safetensors_header"]

_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}


_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class TensorEntry(NamedTuple):
    """One tensor as a safetensors header describes it: dtype name (``"F32"``...), shape, and
    ``[begin, end)`` byte offsets relative to the start of the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Reads and checks only the header of a ``.safetensors`` file (no tensor data).

    Every entry must have a known dtype, a shape of non-negative ints and byte offsets that
    agree with dtype x shape and lie inside the file, so what the header declares is what the
    file on disk holds. Raises FileNotFoundError or ValueError naming the file and the entry.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    size = os.path.getsize(path)

    def bad(what: str) -> ValueError:
        return ValueError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): {what}"
        )

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"the file has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:  # checked before reading: a corrupted length must not allocate
            raise bad(f"the header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - n
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(spec, dict)
            and spec.get("dtype") in _ITEMSIZE
            and isinstance(spec.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in spec["shape"])
            and isinstance(spec.get("data_offsets"), list)
            and len(spec["data_offsets"]) == 2
            and all(type(o) is int for o in spec["data_offsets"])
        )
        if not ok:
            raise bad(
                f"entry {name!r} is not {{dtype, shape, data_offsets}} with a known dtype "
                f"and int sizes: {str(spec)[:200]}"
            )
        begin, end = spec["data_offsets"]
        nbytes = math.prod(spec["shape"]) * _ITEMSIZE[spec["dtype"]]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise bad(
                f"tensor {name!r} ({spec['dtype']} {spec['shape']}, {nbytes} bytes) has "
                f"byte offsets {[begin, end]}, which do not fit the {data_size} bytes of "
                "data in the file"
            )
        entries[name] = TensorEntry(spec["dtype"], tuple(spec["shape"]), begin, end)
    return entries


class SafetensorsStreamWriter:
    """Writes ``path`` from ``specs`` = {name: (torch dtype, shape)}; call ``write`` once per
    name (any order), then ``close`` (or use ``with``). The file appears at ``path`` only
    when every tensor was written (it is built under ``path + ".tmp"``); on an error or an
    incomplete set the temporary file is removed."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = os.fspath(path)
        header: dict = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError(f"metadata must map str to str, got {dict(metadata)!r}")
            header["__metadata__"] = dict(metadata)
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            if name == "__metadata__" or not isinstance(name, str):
                raise ValueError(f"specs: invalid tensor name {name!r}")
            if dtype not in _DTYPES:
                raise TypeError(
                    f"specs[{name!r}]: dtype {dtype} is not supported by "
                    f"safetensors here; use one of {sorted(map(str, _DTYPES))}"
                )
            shape = tuple(int(n) for n in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (dtype, shape, offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, like safetensors' writer
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._tmp = self.path + ".tmp"
        self._f = open(self._tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._f.truncate(self._data_start + offset)  # full size now: writes may come in any order

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """Writes one tensor (must match its spec's dtype and shape) to its place in the file."""
        if name not in self._layout:
            raise KeyError(f"{name!r} is not in the specs given to SafetensorsStreamWriter")
        if name in self._written:
            raise ValueError(f"{name!r} was already written")
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(tensor)  # shares memory: no copy
        dtype, shape, offset, nbytes = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name!r}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        # Raw bytes without a copy when the tensor is already contiguous on the CPU (bytes are
        # little-endian on every platform torch supports).
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._f.seek(self._data_start + offset)
        self._f.write(memoryview(flat.numpy()))
        self._written.add(name)

    def close(self) -> None:
        """Finishes the file: renames it into place if every tensor was written."""
        if self._f.closed:
            return
        try:
            self._f.close()  # flushes: a full disk may only show here
        except BaseException:
            os.remove(self._tmp)
            raise
        missing = [n for n in self._layout if n not in self._written]
        if missing:
            os.remove(self._tmp)
            raise ValueError(
                f"{self.path}: {len(missing)} tensors were never written, e.g. "
                f"{missing[:3]}; no file was created"
            )
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drops the partial file."""
        if not self._f.closed:
            self._f.close()
            os.remove(self._tmp)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
