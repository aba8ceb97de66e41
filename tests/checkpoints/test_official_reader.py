"""The official V-MoE checkpoint reader/writer against checkpoints written by Google's code."""

import os
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from tests.helpers import VMOE_REFERENCE as FIX
from vmoe.checkpoints import official_format
from vmoe.checkpoints.official_reader import (
    CheckpointFormatError,
    iter_checkpoint_arrays,
    read_checkpoint,
    read_checkpoint_index,
)

from . import official_writer
from .official_writer import write_checkpoint

CASES = [
    ("vmoe_tiny_a", "model_a_params"),
    ("vmoe_tiny_a_3shards", "model_a_params"),
    ("vmoe_tiny_a_repr", "model_a_repr_params"),
    ("vmoe_tiny_a_perturbed", "model_a_perturbed_params"),
]


def _copy(tmp_path, name="vmoe_tiny_a_3shards"):
    for f in FIX.glob(name + ".*"):
        shutil.copy(f, tmp_path / f.name)
        os.chmod(tmp_path / f.name, 0o644)
    return str(tmp_path / name)


def _patch(path, old: bytes, new: bytes):
    data = Path(path).read_bytes()
    assert len(old) == len(new) and old in data
    Path(path).write_bytes(data.replace(old, new, 1))


# ------------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("ckpt,npz", CASES)
def test_fixture_checkpoints_equal_the_official_params(ckpt, npz):
    ref = np.load(FIX / f"{npz}.npz")
    got = read_checkpoint(FIX / ckpt)
    assert set(got) == set(ref.files)
    for k in ref.files:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # leaf order = depth-first with sorted keys (first/last leaves given in the README)
    names = list(got)
    assert names[0] == "Encoder/encoder_norm/bias"
    assert names[-1] == ("pre_logits/kernel" if "repr" in ckpt else "head/kernel")
    assert names == sorted(names, key=lambda n: n.split("/"))


def test_index_describes_the_3shard_chunking():
    idx = read_checkpoint_index(FIX / "vmoe_tiny_a_3shards")
    ref = np.load(FIX / "model_a_params.npz")
    assert {k: v.shape for k, v in idx.items()} == {k: ref[k].shape for k in ref.files}
    assert [i.leaf for i in idx.values()] == list(range(len(idx)))
    moe = idx["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"]
    assert moe.dtype == "float32" and moe.shape == (4, 32, 64)
    assert [c.shape for c in moe.chunks] == [(1, 16, 64)] * 8
    assert [c.shard for c in moe.chunks] == [0, 1, 2, 0, 1, 2, 0, 1]
    emb = idx["embedding/kernel"]  # split along its third axis: non-contiguous chunks
    assert [c.region for c in emb.chunks] == [
        ((0, 4), (0, 4), (i, i + 1), (0, 32)) for i in range(3)
    ]


def test_names_subset_streams_in_leaf_order():
    prefix = FIX / "vmoe_tiny_a_3shards"
    want = ["head/kernel", "embedding/kernel", "cls"]
    got = list(iter_checkpoint_arrays(prefix, names=want))
    assert [n for n, _ in got] == ["cls", "embedding/kernel", "head/kernel"]
    ref = np.load(FIX / "model_a_params.npz")
    for n, a in got:
        np.testing.assert_array_equal(a, ref[n])
    with pytest.raises(ValueError, match="head/kernal"):
        list(iter_checkpoint_arrays(prefix, names=["head/kernal"]))


# --------------------------------------------------------------------------------- writer


def test_writer_is_byte_identical_to_vmoe_for_one_shard(tmp_path):
    params = dict(np.load(FIX / "model_a_params.npz"))
    write_checkpoint(tmp_path / "a", params)
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (FIX / f"vmoe_tiny_a{suffix}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.data-00000-of-00001", "a.index"]  # no temp left


def test_round_trip_many_shards_small_chunks_all_dtypes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    params = {
        "blk/k": rng.standard_normal((5, 7, 3)).astype(np.float32),
        "blk/b": rng.integers(-9, 9, (13,)).astype(np.int32),
        "blk/mask": rng.random((4, 6)) > 0.5,
        "blk/d": rng.standard_normal((3, 11)),
        "h": rng.standard_normal((2, 9)).astype(np.float16),
        "c": (rng.standard_normal(6) + 1j).astype(np.complex64),
        "u": rng.integers(0, 255, (40,)).astype(np.uint8),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    monkeypatch.setattr(official_writer, "MAX_PIECE_BYTES", 16)  # several pieces per chunk
    write_checkpoint(tmp_path / "r", params, num_shards=3, max_chunk_bytes=40)
    idx = read_checkpoint_index(tmp_path / "r")
    assert max(len(i.chunks) for i in idx.values()) > 5
    assert {c.shard for i in idx.values() for c in i.chunks} == {0, 1, 2}
    for info in idx.values():
        itemsize = np.dtype(info.dtype).itemsize
        assert all(c.size * itemsize <= 40 for c in info.chunks), info.name
    got = read_checkpoint(tmp_path / "r")
    assert list(got) == ["blk/b", "blk/d", "blk/k", "blk/mask", "c", "empty", "h", "scalar", "u"]
    for k, v in params.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_round_trip_bfloat16_rounds_to_nearest_even(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 50)).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, np.nan, 3.0e38]
    exact = torch.from_numpy(x[1:]).to(torch.bfloat16).float().numpy()  # bf16-representable
    params = {"w": x, "exact": exact, "i": np.arange(5, dtype=np.int32)}
    write_checkpoint(tmp_path / "b", params, num_shards=2, max_chunk_bytes=64, bfloat16=True)
    idx = read_checkpoint_index(tmp_path / "b")
    assert idx["w"].dtype == "bfloat16" and idx["i"].dtype == "int32"
    assert idx["w"].stored_nbytes == x.size * 2
    got = read_checkpoint(tmp_path / "b")
    assert got["w"].dtype == np.float32 and got["i"].dtype == np.int32
    np.testing.assert_array_equal(got["exact"], exact)
    oracle = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # torch rounds RNE
    np.testing.assert_array_equal(got["w"], oracle)
    assert not np.array_equal(got["w"][1:], x[1:])  # it really was stored in 16 bits


def test_leaf_order_is_the_tree_order_not_a_string_sort(tmp_path):
    params = {
        "a-c": np.ones(2, np.float32),
        "a/b": np.zeros(2, np.float32),
        "B": np.full(1, 2, np.int64),
    }
    write_checkpoint(tmp_path / "o", params)
    assert list(read_checkpoint_index(tmp_path / "o")) == ["B", "a/b", "a-c"]


@pytest.mark.parametrize(
    "params,kwargs,match",
    [
        ({"a": np.zeros(2), "a/b": np.zeros(2)}, {}, "'a/b' nests under the array 'a'"),
        ({"a/b": np.zeros(2), "a": np.zeros(2)}, {}, "'a' is both an array and a sub-tree"),
        ({"a//b": np.zeros(2)}, {}, "invalid name"),
        ({"a": np.array(["x"])}, {}, "unknown dtype"),
        ({"a": np.zeros(2)}, {"num_shards": 0}, "num_shards"),
        ({"a": np.zeros(2)}, {"max_chunk_bytes": 4}, "max_chunk_bytes"),
        ({"a": np.zeros(2, np.int32)}, {"bfloat16": ["a"]}, "only floats"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_checkpoint(tmp_path / "x", params, **kwargs)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ bad input


def test_wrong_prefix_lists_what_is_there(tmp_path):
    prefix = _copy(tmp_path)
    with pytest.raises(
        CheckpointFormatError,
        match=r"vmoe_tiny_b\.index does not exist.*"
        r"vmoe_tiny_a_3shards\.index",
    ):
        read_checkpoint(str(tmp_path / "vmoe_tiny_b"))
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nowhere" / "ckpt"))
    assert len(read_checkpoint(prefix + ".index")) == 74  # a trailing .index is tolerated


def test_missing_shard(tmp_path):
    prefix = _copy(tmp_path)
    os.remove(prefix + ".data-00001-of-00003")
    with pytest.raises(
        CheckpointFormatError,
        match=r"missing data shard.*data-00001-of-00003.*"
        r"shard_count=3",
    ):
        read_checkpoint(prefix)


@pytest.mark.parametrize("keep", [5, 40_000, -7])
def test_truncated_shard(tmp_path, keep):
    prefix = _copy(tmp_path)
    path = prefix + ".data-00002-of-00003"
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])
    with pytest.raises(CheckpointFormatError, match=r"data-00002-of-00003: file is truncated"):
        read_checkpoint(prefix)


def test_a_payload_cut_short_is_named_with_its_size_and_offset(tmp_path):
    """The shard ends inside a piece's bytes: the scan's skip over that payload says so, with
    the payload's size and offset (not just the next read's "needed 1 more bytes")."""
    from vmoe.checkpoints.official_reader import scan_shard

    prefix = _copy(tmp_path, "vmoe_tiny_a")
    shard = prefix + ".data-00000-of-00001"
    infos = read_checkpoint_index(prefix)
    info = infos["head/kernel"]
    ((offset, nbytes),) = scan_shard(shard, len(infos), {info.leaf})[info.leaf][0].pieces
    end = offset + nbytes - 3
    os.truncate(shard, end)
    with pytest.raises(
        CheckpointFormatError,
        match=rf"data-00000-of-00001: file is truncated: a {nbytes}-byte "
        rf"payload at byte {offset} needs bytes {offset}\.\."
        rf"{offset + nbytes}, but the file ends at byte {end}",
    ):
        scan_shard(shard, len(infos), {info.leaf})


def test_truncated_or_corrupted_index(tmp_path):
    prefix = _copy(tmp_path)
    data = Path(prefix + ".index").read_bytes()
    Path(prefix + ".index").write_bytes(data[:-30])
    with pytest.raises(CheckpointFormatError, match=r"\.index: not valid MessagePack.*truncated"):
        read_checkpoint_index(prefix)
    Path(prefix + ".index").write_bytes(b"\xc1" + data[1:])
    with pytest.raises(CheckpointFormatError, match=r"\.index: not valid MessagePack.*corrupted"):
        read_checkpoint_index(prefix)
    Path(prefix + ".index").write_bytes(data.replace(b"\xc7", b"\xc9", 1)[:-3] + b"xyz")
    with pytest.raises(CheckpointFormatError, match=r"\.index"):
        read_checkpoint_index(prefix)


def test_corrupted_shard_structure(tmp_path):
    prefix = _copy(tmp_path)
    path = prefix + ".data-00000-of-00003"
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:3] + b"\xc1" + data[4:])  # first key's header byte
    with pytest.raises(
        CheckpointFormatError,
        match=r"data-00000-of-00003: byte 0xc1 is not a "
        r"valid MessagePack type",
    ):
        read_checkpoint(prefix)
    Path(path).write_bytes(data + b"\x00")
    with pytest.raises(CheckpointFormatError, match="1 unexpected bytes after"):
        read_checkpoint(prefix)
    Path(path).write_bytes(data.replace(official_format.MARKER_KEY.encode(), b"x" * 30))
    with pytest.raises(CheckpointFormatError, match="unexpected key 'xxxx"):
        read_checkpoint(prefix)


def test_unknown_ext_type_and_dtype(tmp_path):
    prefix = _copy(tmp_path, "vmoe_tiny_a")
    shard = prefix + ".data-00000-of-00001"
    original = Path(shard).read_bytes()
    region = msgpack.packb(msgpack.ExtType(6, msgpack.packb([msgpack.packb([0, 32, None])])))
    _patch(shard, region, region[:2] + b"\x09" + region[3:])  # SliceNd ext 6 -> ext 9
    with pytest.raises(
        CheckpointFormatError,
        match=r"expected ext type 6 .*found ext type 9 "
        r"\(unknown\)",
    ):
        read_checkpoint(prefix)
    Path(shard).write_bytes(original)
    _patch(shard, b"\xa7float32", b"\xa7object_")
    with pytest.raises(CheckpointFormatError, match=r"leaf 0: unknown dtype 'object_'"):
        read_checkpoint(prefix)
    _patch(prefix + ".index", b"\xa7float32", b"\xa7floaty2")
    with pytest.raises(
        CheckpointFormatError,
        match=r"\.index: 'Encoder/encoder_norm/bias': "
        r"unknown dtype 'floaty2'",
    ):
        read_checkpoint_index(prefix)
    shutil.copy(FIX / "vmoe_tiny_a.index", prefix + ".index")
    _patch(prefix + ".index", b"bias\xc7\x1c\x08", b"bias\xc7\x1c\x07")
    with pytest.raises(CheckpointFormatError, match=r"ext type 7 \(SliceNdArray\)"):
        read_checkpoint_index(prefix)


def _index(tmp_path, shape, regions):
    """An index for one float32 array 'w' with the given chunk regions (all in shard 0)."""
    slices = [msgpack.packb([msgpack.packb([a, b, None]) for a, b in r]) for r in regions]
    info = msgpack.packb(
        [msgpack.packb([list(shape), "float32", False, {}]), slices, [0] * len(regions)]
    )
    Path(tmp_path / "w.index").write_bytes(
        msgpack.packb(
            {"shard_count": 1, "index": {"w": msgpack.ExtType(8, info)}, "version": "20220622"}
        )
    )
    return str(tmp_path / "w")


@pytest.mark.parametrize(
    "regions,match",
    [
        ([((0, 2), (0, 5))], r"chunk \[\(0, 2\), \(0, 5\)\] of 'w' does not fit its array"),
        ([((0, 1), (0, 4))], r"cover 4 of its 8 elements"),
        ([((0, 2), (0, 4)), ((1, 2), (0, 4))], "overlap"),
        ([((0, 2),)], "does not fit its array"),
    ],
)
def test_index_chunks_must_tile_the_array(tmp_path, regions, match):
    with pytest.raises(CheckpointFormatError, match=match):
        read_checkpoint_index(_index(tmp_path, (2, 4), regions))


def test_data_chunk_must_fit_its_region(tmp_path):
    write_checkpoint(tmp_path / "w", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    write_checkpoint(tmp_path / "v", {"w": np.zeros((2, 4), np.float32)})
    shutil.copy(tmp_path / "v.index", tmp_path / "w.index")  # says (2, 4); data holds (2, 3)
    with pytest.raises(CheckpointFormatError, match=r"has no chunk \[\(0, 2\), \(0, 4\)\]"):
        read_checkpoint(tmp_path / "w")
    reg = [
        msgpack.packb([msgpack.packb([0, 2, None]), msgpack.packb([0, n, None])]) for n in (3, 4)
    ]
    _patch(tmp_path / "w.data-00000-of-00001", reg[0], reg[1])
    with pytest.raises(
        CheckpointFormatError,
        match=r"holds 24 bytes, which does not fit its "
        r"region of 8 float32",
    ):
        read_checkpoint(tmp_path / "w")
    _index(tmp_path, (2, 4), [((0, 2), (0, 2)), ((0, 2), (2, 4))])
    with pytest.raises(CheckpointFormatError, match=r"has no chunk \[\(0, 2\), \(0, 2\)\]"):
        read_checkpoint(tmp_path / "w")


def test_random_corruption_never_escapes_as_another_error(tmp_path):
    """Flipping any byte must give a CheckpointFormatError or a successful read, never a crash
    (IndexError, MemoryError, ...) from a corrupted length or shape."""
    prefix = _copy(tmp_path)
    files = [prefix + ".index"] + [prefix + f".data-0000{i}-of-00003" for i in range(3)]
    originals = {f: Path(f).read_bytes() for f in files}
    rng = np.random.default_rng(0)
    errors = 0
    for trial in range(300):
        f = files[trial % 4]
        data = bytearray(originals[f])
        # the structure lives in the index and the first bytes of each chunk; aim there
        pos = int(rng.integers(0, len(data) if trial % 4 == 0 else min(len(data), 3000)))
        data[pos] ^= 1 << int(rng.integers(0, 8))
        Path(f).write_bytes(bytes(data))
        try:
            read_checkpoint(prefix)
        except CheckpointFormatError as e:
            errors += 1
            assert os.path.basename(prefix) in str(e)
        Path(f).write_bytes(originals[f])
    assert errors > 50


def test_many_chunks_are_checked_in_n_log_n(tmp_path):
    """20,000 chunks (a 300 KB index): each is no longer compared with every other one."""
    n = 20_000
    rows = [((i, i + 1), (0, 4)) for i in range(n)]
    assert len(read_checkpoint_index(_index(tmp_path, (n, 4), rows))["w"].chunks) == n
    grid = [((i, i + 1), (j, j + 1)) for i in range(100) for j in range(200)]
    assert len(read_checkpoint_index(_index(tmp_path, (100, 200), grid))["w"].chunks) == n
    cases = [
        (
            rows[:-1] + [((0, 1), (0, 4))],
            r"chunks \[\(0, 1\), \(0, 4\)\] and \[\(0, 1\), \(0, 4\)\] of 'w' overlap",
        ),
        (
            rows[:-2]
            + [((n - 2, n), (0, 3)), ((n - 2, n), (2, 3))],  # sizes add up: a gap and an overlap
            rf"chunks \[\({n - 2}, {n}\), \(0, 3\)\] and "
            rf"\[\({n - 2}, {n}\), \(2, 3\)\] of 'w' overlap",
        ),
        (rows[:7] + rows[8:], rf"the chunks of 'w' cover {4 * n - 4} of its {4 * n} elements"),
    ]
    for regions, match in cases:
        with pytest.raises(CheckpointFormatError, match=match):
            read_checkpoint_index(_index(tmp_path, (n, 4), regions))
    with pytest.raises(
        CheckpointFormatError,
        match=r"chunks \[\(57, 58\), \(0, 1\)\] and \[\(57, 58\), "
        r"\(0, 2\)\] of 'w' overlap",
    ):
        read_checkpoint_index(
            _index(
                tmp_path,
                (100, 200),
                grid[: 57 * 200 + 1] + [((57, 58), (0, 2))] + grid[57 * 200 + 2 :],
            )
        )


def test_chunk_tiling_check_agrees_with_counting_every_element():
    """The corner-sum test and the sweep against a brute-force count, on random chunk sets
    (including a 'pinwheel' tiling that no straight cut separates)."""
    from vmoe.checkpoints.official_format import Chunk
    from vmoe.checkpoints.official_reader import check_chunk_tiling

    shape = (4, 3, 3)
    pinwheel = [
        ((0, 2), (0, 1)),
        ((2, 3), (0, 2)),
        ((1, 3), (2, 3)),
        ((0, 1), (1, 3)),
        ((1, 2), (1, 2)),
    ]
    check_chunk_tiling("w", (3, 3), tuple(Chunk(r, 0) for r in pinwheel), "x")
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(400):
        regions = []
        for _ in range(int(rng.integers(1, 6))):
            region = []
            for n in shape:
                a, b = sorted(int(v) for v in rng.integers(0, n + 1, 2))
                region.append((a, b))
            regions.append(tuple(region))
        if rng.random() < 0.3:  # often a real tiling: split along axis 0
            cut = int(rng.integers(0, 5))
            regions = [((0, cut), (0, 3), (0, 3)), ((cut, 4), (0, 3), (0, 3))]
        counts = np.zeros(shape, int)
        for r in regions:
            counts[tuple(slice(a, b) for a, b in r)] += 1
        chunks = tuple(Chunk(r, 0) for r in regions)
        if counts.max() > 1:
            with pytest.raises(CheckpointFormatError, match="overlap"):
                check_chunk_tiling("w", shape, chunks, "x")
            outcomes.add("overlap")
        elif counts.min() == 0:
            with pytest.raises(CheckpointFormatError, match=f"cover {counts.sum()} of its 36"):
                check_chunk_tiling("w", shape, chunks, "x")
            outcomes.add("gap")
        else:
            check_chunk_tiling("w", shape, chunks, "x")
            outcomes.add("tiling")
    assert outcomes == {"overlap", "gap", "tiling"}


@pytest.mark.parametrize("cut_from", ["inside", "before"])
def test_a_shard_that_shrinks_after_the_scan_is_an_error(tmp_path, cut_from):
    """The shard is checked when iteration is set up; if it is cut afterwards, the read that
    comes up short names the shard, the array, its byte range and where the file now ends."""
    from vmoe.checkpoints.official_reader import scan_shard

    prefix = _copy(tmp_path, "vmoe_tiny_a")
    shard = prefix + ".data-00000-of-00001"
    infos = read_checkpoint_index(prefix)
    info = infos["head/kernel"]
    ((offset, nbytes),) = scan_shard(shard, len(infos), {info.leaf})[info.leaf][0].pieces
    assert nbytes == info.stored_nbytes > 100
    end = offset + 100 if cut_from == "inside" else offset - 5
    arrays = iter_checkpoint_arrays(prefix, names=["Encoder/encoder_norm/bias", "head/kernel"])
    os.truncate(shard, end)
    name, first = next(arrays)  # stored before the cut: complete
    assert name == "Encoder/encoder_norm/bias"
    np.testing.assert_array_equal(first, read_checkpoint(FIX / "vmoe_tiny_a", [name])[name])
    missing = offset + nbytes - end if cut_from == "inside" else nbytes
    match = (
        rf"data-00000-of-00001: file is truncated \(it changed after it was checked\?\): chunk "
        rf"\[\(0, 32\), \(0, {info.shape[1]}\)\] of 'head/kernel' "
        rf"needs bytes {offset}..{offset + nbytes}"
        rf" of it, but the file ends at byte {end}: {missing} bytes missing"
    )
    with pytest.raises(CheckpointFormatError, match=match):
        next(arrays)
