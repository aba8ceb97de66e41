"""litdata shards: ``vmoe make-shards`` (refuses a non-empty --out, a full disk leaves nothing),
``vmoe.data.ShardDataModule`` (every image exactly once per epoch over 2 gloo ranks x 2 workers,
mid-epoch resume, ``vmoe fit`` from shards and ``--ckpt_path last`` mid-epoch) and the bad
inputs (corrupt image, empty folder, another format version, a URL that does not answer)."""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litdata")

import lightning as L  # noqa: E402

import vmoe.data.shards as shards  # noqa: E402
from tests.helpers import NO_AUG, fast  # noqa: E402
from vmoe.cli import main  # noqa: E402
from vmoe.data import CorruptImageError, ShardDataModule, write_shards  # noqa: E402
from vmoe.writes import WriteError  # noqa: E402


def make_folder(root: Path, classes=3, per_class=8, size=16, corrupt=None):
    """``root/c<k>/<i>.png``; image value (k * per_class + i) in every pixel."""
    for k in range(classes):
        (root / f"c{k:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), k * per_class + i, np.uint8)).save(
                root / f"c{k:02d}" / f"{i}.png"
            )
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG broken")
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    make_folder(tmp / "src")
    # small chunks: several chunks, so that 2 ranks x 2 workers all get some
    write_shards(str(tmp / "src"), str(tmp / "out"), chunk_bytes="400B", progress=False)
    return tmp / "out"


def _key(item):
    return item["key"]


def keys_of(loader):
    return [k for batch in loader for k in batch]


def _dm(path, **kw):
    kw.setdefault("img_size", 16)
    kw.setdefault("batch_size", 3)
    return ShardDataModule(str(path), **kw)


def _key_loader(path, **kw):
    """The data module's training loader yielding the items' keys instead of images."""
    dm = _dm(path, **kw)
    dm.setup("fit")
    dm.train_set.transform = _key
    return dm.train_dataloader()


ALL_KEYS = sorted(f"c{k:02d}/{i}.png" for k in range(3) for i in range(8))


def test_make_shards_writes_manifest_and_refuses_non_empty_out(tmp_path, capsys):
    src = make_folder(tmp_path / "src", classes=2, per_class=3)
    assert main(["make-shards", "--source", str(src), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "make-shards: 100%" in captured.err and "6/6" in captured.err  # the progress bar
    manifest = json.loads((tmp_path / "out" / shards.MANIFEST).read_text())
    assert manifest["format"] == "vmoe-shards" and manifest["num_images"] == 6
    assert manifest["classes"] == ["c00", "c01"] and manifest["vmoe_version"]
    assert (tmp_path / "out" / "index.json").is_file()
    assert (
        main(["make-shards", "--source", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not empty" in err and "--overwrite" in err
    assert (
        main(
            [
                "make-shards",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "out"),
                "--overwrite",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no staging folder left


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    from litdata.streaming.writer import BinaryWriter

    src = make_folder(tmp_path / "src", classes=2, per_class=3)
    calls = []

    def full(self, index, items):
        calls.append(index)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, index, items)

    original = BinaryWriter.add_item
    monkeypatch.setattr(BinaryWriter, "add_item", full)
    with pytest.raises(WriteError, match=r"could not write .*out: disk full .*nothing was changed"):
        write_shards(str(src), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_reads_pixels_and_labels_from_hf_and_folder_shards(shard_dir, tmp_path):
    dm = _dm(shard_dir, mean=(0, 0, 0), std=(1, 1, 1), val_path=str(shard_dir))
    assert dm.num_classes == 3 and dm.classes == ["c00", "c01", "c02"]
    dm.setup("fit")
    values, labels = [], []
    for x, y in dm.val_dataloader():
        values += (x[:, 0, 8, 8] * 255).round().long().tolist()
        labels += y.tolist()
    assert sorted(values) == list(range(24)) and all(v // 8 == y for v, y in zip(values, labels))
    # from a Hugging Face dataset (tests/data/test_hf.py's layout)
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("imagefolder", data_dir=str(make_folder(tmp_path / "imf", 2, 2)))
    hf.save_to_disk(str(tmp_path / "hf"))
    manifest = write_shards(str(tmp_path / "hf"), str(tmp_path / "hfs"), progress=False)
    assert manifest["num_images"] == 4 and manifest["classes"] == ["c00", "c01"]
    assert sorted(keys_of(_key_loader(tmp_path / "hfs", shuffle=False, batch_size=2))) == [
        f"train/{i}" for i in range(4)
    ]


def test_every_image_exactly_once_per_epoch_over_2_ranks_x_2_workers(shard_dir, monkeypatch):
    # Ranks through litdata's distributed environment (WORLD_SIZE/GLOBAL_RANK, which it reads over
    # torch.distributed's): the same _DistributedEnv that a gloo/NCCL run fills in, with 2 real
    # worker processes per rank. (Real gloo processes via mp.spawn work too, but their forked
    # workers took ~25 s each to start on this shared 2-core machine.)
    result = {}
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        for drop in (False, None):
            loader = _key_loader(shard_dir, num_workers=2, seed=3, stream_drop_last=drop)
            result[rank, drop] = [keys_of(loader), keys_of(loader)]  # two epochs
    for epoch in (0, 1):
        a, b = result[0, False][epoch], result[1, False][epoch]
        assert sorted(a + b) == ALL_KEYS, "drop_last=False: every image exactly once per epoch"
        assert a and b and not set(a) & set(b)
        a, b = (
            result[0, None][epoch],
            result[1, None][epoch],
        )  # the DDP default: equal counts, none twice
        assert len(a) == len(b) and len(set(a + b)) == len(a + b)
        assert len(ALL_KEYS) - len(a + b) < 2 * 2 * 3  # fewer than world x workers x batch dropped
    assert result[0, False][0] != result[0, False][1]  # reshuffled each epoch


def test_mid_epoch_resume_yields_exactly_the_rest_of_the_epoch(shard_dir):
    full = keys_of(_key_loader(shard_dir, num_workers=2, seed=5))
    assert sorted(full) == ALL_KEYS and full != ALL_KEYS  # shuffled
    loader = _key_loader(shard_dir, num_workers=2, seed=5)
    seen = []
    for i, batch in enumerate(loader):
        seen += batch
        if i == 2:
            state = loader.state_dict()
            break
    resumed = _key_loader(shard_dir, num_workers=2, seed=5)
    resumed.load_state_dict(state)
    rest = keys_of(resumed)
    assert seen == full[:9]
    assert seen + rest == full  # the same images, in the same order as the uninterrupted epoch


def test_bad_inputs_named(shard_dir, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="shard folder .*empty' is empty: write shards with"):
        _dm(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(tmp_path / "nowhere")
    old = tmp_path / "old"
    old.mkdir()
    for f in os.listdir(shard_dir):
        (old / f).write_bytes((shard_dir / f).read_bytes())
    manifest = json.loads((old / shards.MANIFEST).read_text())
    (old / shards.MANIFEST).write_text(
        json.dumps(dict(manifest, format_version=99, vmoe_version="9.0"))
    )
    with pytest.raises(
        ValueError, match=r"written by vmoe 9.0 in shard format version 99; .* reads version 1"
    ):
        _dm(old)
    with pytest.raises(ValueError, match="num_classes=5 but the shards"):
        _dm(shard_dir, num_classes=5)

    def hang(url, options, local):
        time.sleep(30)

    monkeypatch.setattr("vmoe.data.shard_format._fetch_remote", hang)
    start = time.monotonic()
    with pytest.raises(
        ConnectionError, match=r"shard URL s3://no-bucket/train did not answer within 0.5 s"
    ):
        _dm("s3://no-bucket/train", timeout_s=0.5)
    assert time.monotonic() - start < 5


def test_corrupt_image_in_a_shard_named_or_skipped(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src", classes=2, per_class=3, corrupt="c01/0bad.png")
    # make-shards refuses it now; shards written by an older vmoe may hold one
    monkeypatch.setattr("vmoe.data.shard_writer._prepared", lambda key, data, max_size: data)
    write_shards(str(src), str(tmp_path / "out"), progress=False)
    dm = _dm(tmp_path / "out", shuffle=False)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"item 'c01/0bad.png'"):
        [b for b in dm.train_dataloader()]
    dm = _dm(tmp_path / "out", shuffle=False, skip_corrupt=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="skipped an unreadable image.*c01/0bad.png"):
        assert sum(len(y) for _, y in dm.train_dataloader()) == 6


class RecordLabels(L.Callback):
    """Appends each training batch's labels to ``path`` (one JSON line per batch)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps(batch[1].tolist()) + "\n")


@pytest.mark.slow
def test_vmoe_fit_from_shards_and_resume_mid_epoch(tmp_path):
    # 24 classes of one image each: the labels name the images
    src = make_folder(tmp_path / "src", classes=24, per_class=1)
    write_shards(str(src), str(tmp_path / "shards"), chunk_bytes="400B", progress=False)

    def fit(root, steps, *extra):
        log = tmp_path / f"{root}-{steps}.jsonl"
        argv = [
            "fit",
            *fast(
                tmp_path / root,
                "--data",
                "vmoe.data.ShardDataModule",
                "--data.path",
                str(tmp_path / "shards"),
                "--data.img_size",
                "16",
                "--data.batch_size",
                "4",
                "--data.seed",
                "1",
                "--data.train_transform",
                NO_AUG,
                "--trainer.max_steps",
                str(steps),
                "--trainer.num_sanity_val_steps",
                "0",
                "--test_after_fit",
                "false",
                "--routing_stats.figures",
                "false",
                "--trainer.callbacks+=tests.data.test_shards.RecordLabels",
                f"--trainer.callbacks.path={log}",
                *extra,
            ),
        ]
        assert main(argv) == 0
        return [json.loads(line) for line in log.read_text().splitlines()]

    whole = fit("whole", 5)
    assert (
        len(whole) == 5 and len({y for b in whole for y in b}) == 20
    )  # 5 of the epoch's 6 batches
    first = fit("cut", 2)
    ckpt = torch.load(
        tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    state = ckpt["ShardDataModule"]["train_loader"]
    assert state["num_samples_yielded"] == 8  # the stream's position is in the checkpoint
    rest = fit("cut", 5, "--ckpt_path", "last")
    assert first + rest == whole  # the resumed run sees what the uninterrupted one saw, in order
