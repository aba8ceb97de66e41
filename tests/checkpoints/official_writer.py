"""Writer of the official V-MoE checkpoint format, for tests and benchmarks (the reader is
``vmoe.checkpoints.official_reader``; vmoe itself never writes this format).

Produces what ``vmoe.checkpoints.partitioned.save_checkpoint`` produces for a params tree:
``P.index`` and ``P.data-{i:05d}-of-{N:05d}``. Arrays are split into chunks of at most
``max_chunk_bytes`` (contiguous C-order blocks along the leading axes, a valid choice: the
format allows any split), each chunk goes to the shard that holds the fewest bytes so far
(like vmoe), and chunk bytes are split into 1-D pieces of at most 2^30 bytes.

Streaming: all shard files are open at once and written leaf by leaf, so each array is turned
into a numpy array exactly once and only one array (plus one chunk copy when needed) is held.
``params`` may therefore be a lazy mapping whose values only expose ``shape``/``dtype`` until
``np.asarray`` is called on them. Files are written under ``.tmp.<name>`` and renamed at the
end, the index last, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Iterable, Mapping

import msgpack
import numpy as np

from vmoe.checkpoints import official_format as fmt

__all__ = ["write_checkpoint", "float32_to_bfloat16_bits"]

# vmoe splits every chunk into 1-D pieces of at most this many bytes.
MAX_PIECE_BYTES = 2**30


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even like JAX/XLA."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a (quiet) NaN: rounding could carry it into +-inf
        bits[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return bits


def leaf_order(names: Iterable[str]) -> list[str]:
    """Depth-first order of the nested tree with sorted keys (not a plain sort of the names:
    ``a/b`` comes before ``a-c`` because the key ``a`` sorts before ``a-c``)."""
    tree: dict = {}
    for name in names:
        if not isinstance(name, str) or any(not p for p in name.split("/")):
            raise ValueError(f"params: invalid name {name!r} (expected non-empty '/'-joined keys)")
        node = tree
        *parents, last = name.split("/")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(
                    f"params: {name!r} nests under the array {'/'.join(parents[: i + 1])!r}"
                )
        if last in node:
            raise ValueError(f"params: {name!r} is both an array and a sub-tree")
        node[last] = name

    def walk(node):
        for key in sorted(node):
            yield from (walk(node[key]) if isinstance(node[key], dict) else [node[key]])

    return list(walk(tree))


def _split(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> list[tuple]:
    """Regions (sorted) of contiguous blocks of at most ``max_bytes``: fix the leading axes
    before axis ``j`` and take runs of rows along ``j``, where one row fits ``max_bytes``."""
    if math.prod(shape) * itemsize <= max_bytes or not shape or 0 in shape:
        return [tuple((0, n) for n in shape)]
    j = next(j for j in range(len(shape)) if math.prod(shape[j + 1 :]) * itemsize <= max_bytes)
    rows = max_bytes // (math.prod(shape[j + 1 :]) * itemsize)
    regions = []
    for lead in itertools.product(*(range(n) for n in shape[:j])):
        for a in range(0, shape[j], rows):
            regions.append(
                tuple((i, i + 1) for i in lead)
                + ((a, min(a + rows, shape[j])),)
                + tuple((0, n) for n in shape[j + 1 :])
            )
    return regions


def _ext_header(code: int, length: int) -> bytes:
    if length in (1, 2, 4, 8, 16):
        return bytes([0xD4 + (1, 2, 4, 8, 16).index(length), code])
    for tag, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        if length < 256**width:
            return bytes([tag]) + length.to_bytes(width, "big") + bytes([code])
    raise ValueError(f"ext payload of {length} bytes is too large for MessagePack")


def _bin_header(length: int) -> bytes:
    for tag, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        if length < 256**width:
            return bytes([tag]) + length.to_bytes(width, "big")
    raise ValueError(f"bin of {length} bytes is too large for MessagePack")


def _pack_region(region) -> bytes:
    payload = msgpack.packb([msgpack.packb([a, b, None]) for a, b in region])
    return msgpack.packb(msgpack.ExtType(fmt.EXT_SLICE_ND, payload))


def _write_piece(f, data: memoryview, count: int, dtype: str) -> None:
    """One ext-1 ndarray [shape=[count], dtype, bin]; the bytes are written without copies."""
    head = b"\x93" + msgpack.packb([count]) + msgpack.packb(dtype) + _bin_header(len(data))
    f.write(_ext_header(fmt.EXT_NDARRAY, len(head) + len(data)))
    f.write(head)
    f.write(data)


def plan_chunks(params: Mapping, names: list[str], bf16: set[str], num_shards: int, max_bytes: int):
    """name -> (shape, stored dtype name, [(region, shard)]), balancing bytes over shards."""
    load = [0] * num_shards
    plan = {}
    for name in names:
        value = params[name]
        shape = tuple(int(n) for n in np.shape(value))
        dtype = getattr(value, "dtype", None)
        dtype = np.dtype(np.asarray(value).dtype if dtype is None else dtype)
        if name in bf16:
            if dtype.kind != "f":
                raise ValueError(
                    f"bfloat16: {name!r} is {dtype}, only floats can be stored as bfloat16"
                )
            stored = "bfloat16"
        else:
            stored = dtype.name
            fmt.storage_dtype(stored, f"params[{name!r}]")
        itemsize = fmt.storage_dtype(stored, name).itemsize
        chunks = []
        for region in _split(shape, itemsize, max_bytes):
            shard = load.index(min(load))  # fewest bytes so far, lowest number on ties
            load[shard] += math.prod(b - a for a, b in region) * itemsize
            chunks.append((region, shard))
        plan[name] = (shape, stored, chunks)
    return plan


def index_bytes(plan: dict, num_shards: int) -> bytes:
    tree: dict = {}
    for name, (shape, dtype, chunks) in plan.items():  # plan is in leaf order: keys sorted
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        aval = msgpack.packb([list(shape), dtype, False, {}])
        slices = [
            msgpack.packb([msgpack.packb([a, b, None]) for a, b in region]) for region, _ in chunks
        ]
        node[last] = msgpack.ExtType(
            fmt.EXT_INDEX_INFO, msgpack.packb([aval, slices, [shard for _, shard in chunks]])
        )
    return msgpack.packb({"shard_count": num_shards, "index": tree, "version": fmt.VERSION})


def write_checkpoint(
    prefix: str,
    params: Mapping[str, np.ndarray],
    num_shards: int = 1,
    max_chunk_bytes: int = 256 * 2**20,
    bfloat16: Iterable[str] | bool = (),
) -> None:
    """Writes ``params`` ({'/'-joined name: array}) as an official V-MoE checkpoint at ``prefix``.

    Args:
      prefix: path without suffix; creates ``prefix.index`` and ``prefix.data-*-of-*``.
      params: name -> array-like (numeric dtypes only), e.g. ``Encoder/encoder_norm/scale``.
      num_shards: number of data files N (>= 1).
      max_chunk_bytes: chunks hold at most this many stored bytes (>= 16).
      bfloat16: names of float arrays to store as bfloat16 (round to nearest even), or True
        for every float array.
    """
    if type(num_shards) is not int or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if type(max_chunk_bytes) is not int or max_chunk_bytes < 16:
        raise ValueError(f"max_chunk_bytes must be an int >= 16, got {max_chunk_bytes!r}")
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params must be a non-empty mapping name -> array, got {type(params)}")
    names = leaf_order(params)
    if bfloat16 is True:
        bf16 = {n for n in names if np.dtype(getattr(params[n], "dtype", "O")).kind == "f"}
    else:
        bf16 = {bfloat16} if isinstance(bfloat16, str) else set(bfloat16 or ())
        if bf16 - set(names):
            raise ValueError(f"bfloat16: {sorted(bf16 - set(names))} are not in params")
    plan = plan_chunks(params, names, bf16, num_shards, max_chunk_bytes)

    prefix = os.fspath(prefix)
    folder, base = os.path.split(prefix)
    os.makedirs(folder or ".", exist_ok=True)
    finals = [fmt.shard_path(prefix, i, num_shards) for i in range(num_shards)] + [
        prefix + ".index"
    ]
    temps = [os.path.join(folder, ".tmp." + os.path.basename(p)) for p in finals]
    files = []
    try:
        files = [open(t, "wb") for t in temps[:-1]]
        for i, f in enumerate(files):
            leaves = sum(any(s == i for _, s in chunks) for _, _, chunks in plan.values())
            f.write(msgpack.Packer().pack_map_header(leaves + 1))
            f.write(msgpack.packb(fmt.MARKER_KEY) + msgpack.packb(True))
        for leaf, name in enumerate(names):
            shape, dtype, chunks = plan[name]
            arr = np.asarray(params[name])
            if arr.shape != shape:
                raise ValueError(f"params[{name!r}] changed shape: {shape} then {arr.shape}")
            arr = (
                float32_to_bfloat16_bits(arr)
                if dtype == "bfloat16"
                else np.ascontiguousarray(arr, dtype=fmt.storage_dtype(dtype, name))
            )
            per_piece = MAX_PIECE_BYTES // arr.itemsize
            for shard, f in enumerate(files):
                mine = [region for region, s in chunks if s == shard]
                if not mine:
                    continue
                f.write(msgpack.packb(str(leaf)) + msgpack.Packer().pack_array_header(len(mine)))
                for region in mine:
                    block = np.ascontiguousarray(arr[tuple(slice(a, b) for a, b in region)])
                    flat = block.reshape(-1)
                    starts = range(0, max(flat.size, 1), per_piece)
                    f.write(b"\x92" + msgpack.Packer().pack_array_header(len(starts)))
                    for a in starts:
                        piece = flat[a : a + per_piece]
                        _write_piece(f, memoryview(piece.view(np.uint8)), piece.size, dtype)
                    f.write(_pack_region(region))
            del arr
        for f in files:
            f.close()
        with open(temps[-1], "wb") as f:
            f.write(index_bytes(plan, num_shards))
        for t, p in zip(temps, finals):  # index last: it names the shards
            os.replace(t, p)
    except BaseException:
        for f in files:
            f.close()
        for t in temps:
            if os.path.exists(t):
                os.remove(t)
        raise
