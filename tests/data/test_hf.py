"""vmoe.data.HFDataModule on Hugging Face datasets built in a temp folder (save_to_disk, Parquet,
imagefolder, streaming): labels, held-out val split, image modes and EXIF, the bad inputs, a hub
name offline, and ``vmoe fit`` training from it. Never touches the network."""

import io
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported (the fixture patches it too)
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

datasets = pytest.importorskip("datasets")

from tests.helpers import fast  # noqa: E402
from vmoe.cli import main  # noqa: E402
from vmoe.data import DATAMODULES, CorruptImageError, HFDataModule, load_image  # noqa: E402
from vmoe.data.hf import HFImageDataset  # noqa: E402

NAMES = ["red", "green", "blue"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def encode(arr, fmt="PNG", mode=None, **save):
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def colour(label, size=(16, 16)):
    arr = np.full((*size, 3), 30, np.uint8)
    arr[..., label] = 220
    return arr


def rows(n=30, corrupt=(), labels=None):
    labels = [i % 3 for i in range(n)] if labels is None else labels
    images = []
    for i, y in enumerate(labels):
        data = b"not an image" if i in corrupt else encode(colour(y % 3))
        images.append({"bytes": data, "path": None})
    return {"image": images, "label": labels}


def table(n=30, class_label=True, **kw):
    label = datasets.ClassLabel(names=NAMES) if class_label else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    return datasets.Dataset.from_dict(rows(n, **kw), features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict({"train": table(30), "test": table(6)}).save_to_disk(str(path))
    return path


def _dm(path, **kw):
    kw.setdefault("img_size", 16)
    kw.setdefault("batch_size", 4)
    return HFDataModule(str(path), **kw)


def test_registered_and_save_to_disk_with_held_out_val(saved):
    assert DATAMODULES["hf"] is HFDataModule
    dm = _dm(saved, val_fraction=0.2)
    assert dm.num_classes == 3 and dm.classes == NAMES
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 6)
    assert sorted(dm.val_set.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)  # carved out of train
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    # eval at native size keeps the pixels: the bright channel is the label
    assert torch.equal(x[:, :, 8, 8].argmax(1), y)


def test_parquet_file_folder_and_imagefolder(tmp_path):
    (tmp_path / "pq").mkdir()
    table(12).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for path in (tmp_path / "pq", tmp_path / "pq" / "train.parquet"):
        dm = _dm(path, val_fraction=0.25)
        dm.setup("fit")
        assert dm.num_classes == 3 and (len(dm.train_set), len(dm.val_set)) == (9, 3)
    for split, n in (("train", 4), ("validation", 2)):
        for c, name in enumerate(("c0", "c1", "c2")):
            (tmp_path / "imf" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(colour(c)).save(tmp_path / "imf" / split / name / f"{i}.png")
    dm = _dm(tmp_path / "imf")
    dm.setup("fit")
    assert dm.classes == ["c0", "c1", "c2"] and (len(dm.train_set), len(dm.val_set)) == (
        12,
        6,
    )  # its own val split
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x[:, :, 8, 8].argmax(1), y)


def test_image_modes_and_exif_orientation_decode_once():
    rgb = colour(0, size=(8, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    cases = {
        "grey": encode(rgb, mode="L"),
        "rgba": encode(rgb, mode="RGBA"),
        "cmyk": encode(rgb, "JPEG", mode="CMYK", quality=95),
        "exif": encode(rgb, "JPEG", quality=95, exif=exif),
    }
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": v, "path": None} for v in cases.values()], "label": [0] * 4}
    ).cast_column("image", datasets.Image(decode=False))
    ds = HFImageDataset(table, np.arange(4), np.zeros(4), "image", "t")
    out = dict(zip(cases, (ds[i][0] for i in range(4))))
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in out.values())
    assert out["grey"].shape == (8, 12, 3) and np.ptp(out["grey"], axis=2).max() == 0
    assert np.array_equal(out["rgba"], rgb)
    assert np.abs(out["cmyk"].astype(int) - rgb).max() <= 8
    assert out["exif"].shape == (12, 8, 3)  # turned upright
    assert np.array_equal(out["exif"], load_image("x.jpg", cases["exif"]))


def test_streaming_every_row_once_over_two_ranks(saved):
    seen = []
    for rank in (0, 1):
        dm = _dm(saved, streaming=True, shuffle_buffer=8, eval_transform=None)
        dm.setup("fit")
        dm.train_set.rank, dm.train_set.world_size = rank, 2
        dm.train_set.transform = None
        seen += [int(y) for _, y in dm.train_set]
    assert len(seen) == 30 and sorted(seen) == sorted([i % 3 for i in range(30)])
    dm = _dm(saved, streaming=True)
    dm.setup("fit")
    assert dm.val_set is None and dm.val_dataloader() == []
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_missing_label_column_lists_the_columns(saved):
    with pytest.raises(
        ValueError, match=r"label_column='fine_label' is not a column .*\['image', 'label'\]"
    ):
        _ = _dm(saved, label_column="fine_label").num_classes
    with pytest.raises(
        ValueError, match=r"train_split='nope' is not a split .*\['test', 'train'\]"
    ):
        _ = _dm(saved, train_split="nope").num_classes


def test_labels_out_of_range_name_the_row(tmp_path):
    t = table(9, class_label=False, labels=[0, 1, 2, 0, 1, 2, 0, -1, 2])
    t.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"row 7 of split 'train' .*label -1 is not in \[0, 3\)"):
        _dm(tmp_path / "d").setup("fit")
    with pytest.raises(ValueError, match=r"row 2 .*label 2 is not in \[0, 2\)"):
        _dm(tmp_path / "d", num_classes=2).setup("fit")


def test_corrupt_row_named_or_skipped_and_counted(tmp_path):
    table(12, corrupt=(5,)).save_to_disk(str(tmp_path / "d"))
    dm = _dm(tmp_path / "d", val_fraction=0)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match="row 5 of split 'train'"):
        [dm.train_set[i] for i in range(len(dm.train_set))]
    dm = _dm(tmp_path / "d", val_fraction=0, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 12 .*row 5 of"):
        dm.setup("fit")
    assert len(dm.train_set) == 11 and 5 not in dm.train_set.indices
    dm = _dm(tmp_path / "d", streaming=True, skip_corrupt=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="streamed row"):
        assert len([item for item in dm.train_set if item is not None]) == 11


def test_hub_name_offline_is_one_clear_line(tmp_path, capsys):
    code = main(
        [
            "make-shards",
            "--source",
            "nobody/no-such-dataset",
            "--out",
            str(tmp_path / "s"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'nobody/no-such-dataset'" in err and "HF_DATASETS_CACHE" in err and "offline" in err
    with pytest.raises(
        FileNotFoundError, match="load_dataset\\('nobody/no-such-dataset'\\) once online"
    ):
        _ = _dm("nobody/no-such-dataset").num_classes


@pytest.mark.slow
def test_vmoe_fit_trains_from_a_hf_dataset(saved, tmp_path):
    code = main(
        [
            "fit",
            *fast(
                tmp_path,
                "--data",
                "vmoe.data.HFDataModule",
                "--data.path",
                str(saved),
                "--data.img_size",
                "16",
                "--data.batch_size",
                "8",
                "--trainer.max_steps",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.limit_test_batches",
                "1",
                "--routing_stats.figures",
                "false",
            ),
        ]
    )
    assert code == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
