"""Read Google's official V-MoE checkpoints with numpy + msgpack only.

A checkpoint with prefix ``P`` is ``P.index`` plus data shards ``P.data-00000-of-0000N``,
each one MessagePack document (format of ``vmoe.checkpoints.partitioned``, version
``20220622``; described in ``tests/fixtures/vmoe_reference/README.md``, section C):

* the index maps the parameter tree to ``IndexInfo`` leaves: global shape, dtype, and the list
  of chunks (global ``[start, stop)`` region per dim, shard number);
* a data shard maps the leaf number (depth-first, keys sorted) to that leaf's chunks stored in
  it; each chunk's bytes are 1-D pieces in C order.

Streaming: the reader first *scans* the shards it needs, reading only MessagePack headers and
seeking over the array bytes (it records their file offsets), then builds one array at a time
by ``readinto`` straight from the file into the output array. Peak memory is about one output
array (plus one chunk when a chunk is not a contiguous block of its array, or is bfloat16).
Nothing from a file is ever executed or unpickled; dtypes are limited to plain numeric ones.

Names are the ``/``-joined paths, e.g. ``Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import os
from typing import Iterable, Iterator

import msgpack
import numpy as np

from vmoe.checkpoints.official_format import (
    EXT_INDEX_INFO,
    EXT_NDARRAY,
    EXT_SLICE_ND,
    KNOWN_EXT_CODES,
    MARKER_KEY,
    VERSION,
    ArrayInfo,
    CheckpointFormatError,
    Chunk,
    MsgpackStream,
    shard_path,
    storage_dtype,
)

__all__ = [
    "CheckpointFormatError",
    "ArrayInfo",
    "Chunk",
    "read_checkpoint_index",
    "iter_checkpoint_arrays",
    "read_checkpoint",
]


# ----------------------------------------------------------------------------------- index


def _unpack(raw: bytes, where: str, ext_hook=None):
    """msgpack.unpackb with every msgpack failure turned into a CheckpointFormatError."""
    try:
        if ext_hook is None:
            return msgpack.unpackb(raw, raw=False)
        return msgpack.unpackb(raw, raw=False, ext_hook=ext_hook)
    except CheckpointFormatError:
        raise
    except msgpack.ExtraData:
        raise CheckpointFormatError(
            f"{where}: unexpected bytes after the MessagePack document (corrupted file?)"
        ) from None
    except Exception as e:  # OutOfData, FormatError, StackError, ValueError, TypeError ...
        short = isinstance(e, msgpack.OutOfData) or "incomplete input" in str(e)
        kind = "truncated" if short else "corrupted"
        raise CheckpointFormatError(
            f"{where}: not valid MessagePack, the file is {kind} ({type(e).__name__}: {e})"
        ) from None


def _decode_region(raw, where: str) -> tuple[tuple[int, int], ...]:
    """SliceNd payload (msgpack array of bin, each a msgpack [start, stop, step]) -> region."""
    dims = _unpack(raw, where) if isinstance(raw, (bytes, bytearray)) else raw
    if not isinstance(dims, list):
        raise CheckpointFormatError(f"{where}: a SliceNd must be a list of slices, got {dims!r}")
    region = []
    for d in dims:
        s = _unpack(d, where) if isinstance(d, (bytes, bytearray)) else d
        ok = isinstance(s, list) and len(s) == 3 and all(type(v) is int for v in s[:2])
        if not ok or s[2] not in (None, 1):
            raise CheckpointFormatError(
                f"{where}: expected a slice [start, stop, step] with "
                f"int start/stop and step nil or 1, got {s!r}"
            )
        region.append((s[0], s[1]))
    return tuple(region)


def _tiles_exactly(shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> bool | None:
    """Whether chunks that lie inside the array cover each of its elements exactly once, from
    their corners: the signed sum over all chunks of their 2^d corner indicators (+1 at a
    start, -1 at a stop, multiplied over the dims) equals the array's own iff the sum of the
    chunks' indicator functions is the array's (the corner sum is that function's mixed
    difference, which determines it). O(n 2^d log n), d = the dims that some chunk splits;
    ``None`` when d is too large for that to be cheap."""
    dims = [k for k, n in enumerate(shape) if any(c.region[k] != (0, n) for c in chunks)]
    if not dims:
        return len(chunks) == 1
    if len(dims) > 6 or max(shape) >= 2**62:
        return None
    # Row 0 is the array itself, with weight -1: the signed corner sums must all cancel.
    starts = np.array(
        [[0] * len(dims)] + [[c.region[k][0] for k in dims] for c in chunks], np.int64
    )
    stops = np.array(
        [[shape[k] for k in dims]] + [[c.region[k][1] for k in dims] for c in chunks], np.int64
    )
    weight = np.ones(len(starts))
    weight[0] = -1
    corners, signs = [], []
    for pick in itertools.product((False, True), repeat=len(dims)):
        corners.append(np.where(pick, stops, starts))
        signs.append(weight * (-1) ** sum(pick))
    _, inverse = np.unique(np.concatenate(corners), axis=0, return_inverse=True)
    return not np.bincount(inverse.reshape(-1), weights=np.concatenate(signs)).any()


def _find_overlap(chunks: tuple[Chunk, ...]) -> tuple[Chunk, Chunk] | None:
    """Two chunks that share an element, or None: a sweep along the dim with the most distinct
    chunk starts, comparing each chunk only with the chunks still open at its start."""
    boxes = [c for c in chunks if c.size]  # an empty chunk overlaps nothing
    if len(boxes) < 2:
        return None
    axis = max(range(len(boxes[0].region)), key=lambda k: len({c.region[k][0] for c in boxes}))
    open_: list[tuple[int, int]] = []  # heap of (stop along axis, index in boxes)
    for i in sorted(range(len(boxes)), key=lambda i: boxes[i].region[axis][0]):
        c = boxes[i]
        while open_ and open_[0][0] <= c.region[axis][0]:
            heapq.heappop(open_)
        for _, j in open_:
            if all(
                max(a0, a1) < min(b0, b1) for (a0, b0), (a1, b1) in zip(c.region, boxes[j].region)
            ):
                return (boxes[j], c) if j < i else (c, boxes[j])
        heapq.heappush(open_, (c.region[axis][1], i))
    return None


def check_chunk_tiling(name: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...], where: str):
    """Every chunk lies inside the array, and together they cover it exactly once."""
    for c in chunks:
        if len(c.region) != len(shape) or any(
            not 0 <= a <= b <= n for (a, b), n in zip(c.region, shape)
        ):
            raise CheckpointFormatError(
                f"{where}: chunk {list(c.region)} of '{name}' does not "
                f"fit its array of shape {list(shape)}"
            )
    covered = sum(c.size for c in chunks)
    if covered == math.prod(shape) and _tiles_exactly(shape, chunks):
        return  # the usual case, in O(n): no pairwise comparison needed
    pair = _find_overlap(chunks)
    if pair is not None:
        raise CheckpointFormatError(
            f"{where}: chunks {list(pair[0].region)} and {list(pair[1].region)} of '{name}' overlap"
        )
    if covered != math.prod(shape):
        raise CheckpointFormatError(
            f"{where}: the chunks of '{name}' cover {covered} of its "
            f"{math.prod(shape)} elements (shape {list(shape)})"
        )


def _parse_index_info(name: str, leaf: int, payload: bytes, num_shards: int, where: str):
    where = f"{where}: '{name}'"
    info = _unpack(payload, where)
    if not (isinstance(info, list) and len(info) == 3):
        raise CheckpointFormatError(
            f"{where}: an IndexInfo must be [shaped_array, slices, "
            f"shards], got {type(info).__name__}"
        )
    aval, slices, shards = info
    aval = _unpack(aval, where) if isinstance(aval, (bytes, bytearray)) else aval
    if not (
        isinstance(aval, list)
        and len(aval) >= 2
        and isinstance(aval[0], list)
        and all(type(n) is int and n >= 0 for n in aval[0])
    ):
        raise CheckpointFormatError(
            f"{where}: expected a ShapedArray [shape, dtype, ...], got {aval!r}"
        )
    shape, dtype = tuple(aval[0]), aval[1]
    storage_dtype(dtype, where)
    if not (isinstance(slices, list) and isinstance(shards, list) and len(slices) == len(shards)):
        raise CheckpointFormatError(
            f"{where}: expected parallel lists of chunk slices and "
            f"shards, got {slices!r} and {shards!r}"
        )
    chunks = []
    for s, shard in zip(slices, shards):
        if type(shard) is not int or not 0 <= shard < num_shards:
            raise CheckpointFormatError(
                f"{where}: shard number {shard!r} is not in "
                f"0..{num_shards - 1} (shard_count={num_shards})"
            )
        chunks.append(Chunk(_decode_region(s, where), shard))
    chunks = tuple(chunks)
    check_chunk_tiling(name, shape, chunks, where)
    return ArrayInfo(name=name, leaf=leaf, shape=shape, dtype=dtype, chunks=chunks)


def _missing_prefix(prefix: str) -> CheckpointFormatError:
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        return CheckpointFormatError(
            f"no checkpoint at prefix {prefix!r}: folder {folder!r} does not exist"
        )
    found = sorted(f for f in os.listdir(folder) if f.endswith(".index") or ".data-" in f)
    hint = (
        f"checkpoint-like files there: {found[:20]}"
        if found
        else "no checkpoint-like files (*.index, *.data-*) there"
    )
    return CheckpointFormatError(
        f"no checkpoint at prefix {prefix!r}: {prefix}.index does not "
        f"exist ({hint}; the prefix is the path without '.index')"
    )


def _load_index(prefix: str) -> tuple[dict[str, ArrayInfo], int]:
    prefix = os.fspath(prefix)
    if prefix.endswith(".index"):
        prefix = prefix[: -len(".index")]
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise _missing_prefix(prefix)
    with open(path, "rb") as f:
        raw = f.read()

    def ext_hook(code: int, data: bytes):
        if code == EXT_INDEX_INFO:
            return msgpack.ExtType(code, data)
        name = KNOWN_EXT_CODES.get(code, "unknown")
        raise CheckpointFormatError(
            f"{path}: unexpected MessagePack ext type {code} ({name}); "
            "index leaves must be IndexInfo (ext type 8)"
        )

    top = _unpack(raw, path, ext_hook)
    if not isinstance(top, dict) or "index" not in top or "shard_count" not in top:
        keys = list(top) if isinstance(top, dict) else type(top).__name__
        raise CheckpointFormatError(
            f"{path}: expected a map with keys 'shard_count', 'index' (and 'version'), found {keys}"
        )
    num_shards, version = top["shard_count"], top.get("version", VERSION)
    if type(num_shards) is not int or num_shards < 1:
        raise CheckpointFormatError(f"{path}: shard_count must be an int >= 1, got {num_shards!r}")
    if version != VERSION:
        raise CheckpointFormatError(
            f"{path}: unsupported checkpoint version {version!r} "
            f"(this reader knows {VERSION!r} and unversioned ones)"
        )
    infos: dict[str, ArrayInfo] = {}

    def walk(node, path_parts):  # depth-first, keys sorted: vmoe's (JAX's) leaf numbering
        if isinstance(node, msgpack.ExtType):
            name = "/".join(path_parts)
            infos[name] = _parse_index_info(name, len(infos), node.data, num_shards, path)
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                if not isinstance(key, str) or not key or "/" in key:
                    raise CheckpointFormatError(
                        f"{path}: invalid parameter name {key!r} under '{'/'.join(path_parts)}'"
                    )
                walk(node[key], path_parts + [key])
        else:
            raise CheckpointFormatError(
                f"{path}: expected a nested map with IndexInfo leaves, found "
                f"{type(node).__name__} at '{'/'.join(path_parts)}'"
            )

    walk(top["index"], [])
    return infos, num_shards


def read_checkpoint_index(prefix: str) -> dict[str, ArrayInfo]:
    """Reads ``prefix.index``: name -> ``ArrayInfo`` (shape, dtype, chunks), in leaf order."""
    return _load_index(prefix)[0]


# ----------------------------------------------------------------------------- data shards


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where a chunk's bytes are in a shard file: (offset, nbytes) of each 1-D piece."""

    region: tuple[tuple[int, int], ...]
    dtype: str
    pieces: tuple[tuple[int, int], ...]


def _scan_chunk(s: MsgpackStream, what: str) -> _Stored:
    start = s.f.tell()
    if s.expect("array", f"{what}: a chunk [pieces, region]") != 2:
        raise s.fail(f"{what}: a chunk must be a 2-element array [pieces, region]", start)
    pieces, dtype = [], None
    for _ in range(s.expect("array", f"{what}: the list of pieces of a chunk")):
        code, length = s.expect("ext", f"{what}: an ndarray piece (ext type 1)")
        if code != EXT_NDARRAY:
            raise s.fail(
                f"{what}: expected ext type 1 (ndarray), found ext type {code} "
                f"({KNOWN_EXT_CODES.get(code, 'unknown')})"
            )
        begin = s.f.tell()
        if s.expect("array", f"{what}: ndarray [shape, dtype, data]") != 3:
            raise s.fail(f"{what}: an ndarray must be [shape, dtype, data]")
        if s.expect("array", f"{what}: the shape of a piece") != 1:
            raise s.fail(f"{what}: chunk pieces must be 1-D")
        count = s.read_int(f"{what}: the length of a piece")
        piece_dtype = s.read_str(f"{what}: the dtype of a piece")
        itemsize = storage_dtype(piece_dtype, f"{s.path}: {what}").itemsize
        nbytes = s.expect("bin", f"{what}: the bytes of a piece")
        if nbytes != count * itemsize or s.f.tell() - begin + nbytes != length:
            raise s.fail(
                f"{what}: a piece of {count} {piece_dtype} holds {nbytes} bytes in a "
                f"{length}-byte ext (sizes do not agree)"
            )
        if dtype not in (None, piece_dtype):
            raise s.fail(f"{what}: pieces of one chunk have dtypes {dtype} and {piece_dtype}")
        dtype = piece_dtype
        pieces.append((s.f.tell(), nbytes))
        s.skip(nbytes)
    code, length = s.expect("ext", f"{what}: the chunk's region (ext type 6, SliceNd)")
    if code != EXT_SLICE_ND:
        raise s.fail(
            f"{what}: expected ext type 6 (SliceNd), found ext type {code} "
            f"({KNOWN_EXT_CODES.get(code, 'unknown')})"
        )
    region = _decode_region(s.read(length), f"{s.path}: {what}")
    return _Stored(region, dtype or "", tuple(pieces))


def scan_shard(path: str, num_leaves: int, wanted: set[int]) -> dict[int, list[_Stored]]:
    """Reads a data shard's headers only: leaf -> its chunks stored there (for wanted leaves)."""
    size = os.path.getsize(path)
    found: dict[int, list[_Stored]] = {}
    seen, marker = set(), False
    with open(path, "rb", buffering=1 << 16) as f:
        s = MsgpackStream(f, path, size)
        for _ in range(s.expect("map", "the top-level map of a data shard")):
            key = s.read_str("a key of the top-level map")
            if key == MARKER_KEY:
                if s.header() != ("bool", True):
                    raise s.fail(f"the marker key {MARKER_KEY!r} must map to true")
                marker = True
                continue
            if not (key.isascii() and key.isdigit() and int(key) < num_leaves) or key in seen:
                raise s.fail(
                    f"unexpected key {key!r}: expected a (new) leaf number in "
                    f"0..{num_leaves - 1} as a string"
                )
            seen.add(key)
            leaf = int(key)
            chunks = [
                _scan_chunk(s, f"leaf {leaf}")
                for _ in range(s.expect("array", f"the chunk list of leaf {leaf}"))
            ]
            if leaf in wanted:
                found[leaf] = chunks
        if not marker:
            raise s.fail(f"marker key {MARKER_KEY!r} = true is missing: not a vmoe data shard")
        if f.tell() != size:
            raise s.fail(
                f"{size - f.tell()} unexpected bytes after the MessagePack map (corrupted file?)"
            )
    return found


def _locate(
    info: ArrayInfo, scans: dict[int, dict[int, list[_Stored]]], paths: dict[int, str]
) -> list[tuple[Chunk, _Stored]]:
    """Pairs every chunk the index lists with the chunk found in its shard, and checks them."""
    pairs, itemsize = [], storage_dtype(info.dtype, info.name).itemsize
    for c in info.chunks:
        path = paths[c.shard]
        match = [x for x in scans[c.shard].get(info.leaf, []) if x.region == c.region]
        if not match:
            raise CheckpointFormatError(
                f"{path}: has no chunk {list(c.region)} of '{info.name}' (leaf {info.leaf}), "
                "which the .index lists there (wrong or mismatched shard file?)"
            )
        x = match[0]
        if x.dtype != info.dtype:
            raise CheckpointFormatError(
                f"{path}: chunk {list(c.region)} of '{info.name}' is "
                f"{x.dtype}, the index says {info.dtype}"
            )
        nbytes = sum(n for _, n in x.pieces)
        if nbytes != c.size * itemsize:
            raise CheckpointFormatError(
                f"{path}: chunk {list(c.region)} of '{info.name}' holds {nbytes} bytes, which "
                f"does not fit its region of {c.size} {info.dtype} ({c.size * itemsize} bytes)"
            )
        pairs.append((c, x))
    listed = {(c.shard, c.region) for c in info.chunks}
    for shard, scan in scans.items():
        for x in scan.get(info.leaf, []):
            if (shard, x.region) not in listed:
                raise CheckpointFormatError(
                    f"{paths[shard]}: holds chunk {list(x.region)} of "
                    f"'{info.name}' that the .index does not list"
                )
    return pairs


def _readinto(f, offset: int, buf: memoryview, path: str, what: str) -> None:
    """Fills ``buf`` from byte ``offset`` of ``f``; a short read (the file shrank after it
    was scanned) is a CheckpointFormatError, never a partly uninitialized array."""
    f.seek(offset)
    pos = 0
    while pos < len(buf):  # a single read() may return less (e.g. > 2 GiB on Linux)
        n = f.readinto(buf[pos:])
        if not n:
            end = min(os.fstat(f.fileno()).st_size, offset + pos)
            raise CheckpointFormatError(
                f"{path}: file is truncated (it changed after it was checked?): {what} needs "
                f"bytes {offset}..{offset + len(buf)} of it, but the file ends at byte {end}: "
                f"{len(buf) - pos} bytes missing"
            )
        pos += n


def _assemble(info: ArrayInfo, pairs, files: dict[int, object], paths: dict[int, str]):
    """Builds one array from its chunks; bytes go from the file straight into the output."""
    stored_dt = storage_dtype(info.dtype, info.name)
    out = np.empty(info.shape, dtype=info.numpy_dtype)
    for c, x in pairs:
        f = files.get(c.shard)
        if f is None:
            f = files[c.shard] = open(paths[c.shard], "rb", buffering=0)
        target = out[c.slices + (Ellipsis,)]  # the Ellipsis keeps 0-d results views
        direct = target.dtype == stored_dt and target.flags.c_contiguous
        buf = target if direct else np.empty(c.shape, dtype=stored_dt)
        flat = memoryview(buf.reshape(-1).view(np.uint8))
        pos = 0
        for offset, nbytes in x.pieces:
            _readinto(
                f,
                offset,
                flat[pos : pos + nbytes],
                paths[c.shard],
                f"chunk {list(c.region)} of '{info.name}'",
            )
            pos += nbytes
        if info.dtype == "bfloat16":  # bits -> float32, in place in the output (no temp)
            bits = target.view(np.uint32)
            bits[...] = buf
            bits <<= 16
        elif not direct:
            target[...] = buf
    return out


def _check_shard_sizes(infos: dict[str, ArrayInfo], paths: dict[int, str], prefix: str) -> None:
    """Each shard file holds at least the array bytes the index places in it: a cheap bound,
    before any shard is scanned or any array allocated."""
    declared = dict.fromkeys(paths, 0)
    for info in infos.values():
        itemsize = storage_dtype(info.dtype, info.name).itemsize
        for c in info.chunks:
            if c.shard in declared:
                declared[c.shard] += c.size * itemsize
    for shard, path in paths.items():
        size = os.path.getsize(path)
        if size < declared[shard]:
            raise CheckpointFormatError(
                f"{path}: file is truncated, or {prefix}.index does not belong to it: the index "
                f"places {declared[shard]} bytes of array data in this shard, which has {size} "
                "bytes"
            )


def iter_checkpoint_arrays(
    prefix: str, names: Iterable[str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` one array at a time, in leaf order (all, or only ``names``).

    Every shard needed is checked (size against what the index declares, structure, chunk
    regions, sizes) when this function is called, before it returns the iterator and before
    anything is allocated, so a broken checkpoint fails early. Memory: about one array at a
    time, as long as the caller does not keep them. bfloat16 arrays are returned as float32.
    """
    infos, num_shards = _load_index(prefix)
    prefix = os.fspath(prefix).removesuffix(".index")
    if names is None:
        selected = list(infos.values())
    else:
        names = set([names] if isinstance(names, str) else names)
        unknown = sorted(names - set(infos))
        if unknown:
            raise ValueError(
                f"names: {unknown[:5]} are not in {prefix}.index (it has "
                f"{len(infos)} arrays, e.g. {list(infos)[:3]})"
            )
        selected = [i for i in infos.values() if i.name in names]
    shards = sorted({c.shard for i in selected for c in i.chunks})
    paths = {s: shard_path(prefix, s, num_shards) for s in shards}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        folder = os.path.dirname(prefix) or "."
        base = os.path.basename(prefix)
        present = sorted(f for f in os.listdir(folder) if f.startswith(base + ".data-"))
        raise CheckpointFormatError(
            f"missing data shard(s) {missing}: {prefix}.index has "
            f"shard_count={num_shards}; present: {present}"
        )
    _check_shard_sizes(infos, paths, prefix)
    wanted = {i.leaf for i in selected}
    scans = {s: scan_shard(paths[s], len(infos), wanted) for s in shards}
    located = [(info, _locate(info, scans, paths)) for info in selected]
    return _stream(located, paths)


def _stream(located, paths: dict[int, str]) -> Iterator[tuple[str, np.ndarray]]:
    files: dict[int, object] = {}
    try:
        for info, pairs in located:
            yield info.name, _assemble(info, pairs, files, paths)
    finally:
        for f in files.values():
            f.close()


def read_checkpoint(prefix: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads the whole checkpoint (or ``names``) into ``{name: array}`` in leaf order."""
    return dict(iter_checkpoint_arrays(prefix, names))
