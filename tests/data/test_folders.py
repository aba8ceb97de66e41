"""vmoe.data on files: image folders (formats, labels, corrupt files, clear errors) and CIFAR."""

import dataclasses
import urllib.error
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import vmoe.data.cifar as cifar
from vmoe.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CorruptImageError,
    ImageFolderDataModule,
    load_image,
    read_cifar_binary,
)

COLORS = {
    "cat": (220, 30, 30),
    "dog": (30, 220, 30),
    "eel": (30, 30, 220),
}  # label = argmax channel


def _write(path, rgb, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.empty((20, 24, 3), np.uint8)
    img[:] = rgb
    img[::4] = 0  # some structure, so the image is not flat
    if fmt == "gray":
        Image.fromarray(img.mean(axis=2).astype(np.uint8), mode="L").save(path.with_suffix(".png"))
    elif fmt == "rgba":
        Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), mode="RGBA").save(
            path.with_suffix(".png")
        )
    else:
        Image.fromarray(img).save(path.with_suffix("." + fmt))


def _make_folder(root, per_split=None, fmts=("png", "jpg", "bmp")):
    per_split = per_split or {"train": 3, "val": 2, "test": 2}
    for split, n in per_split.items():
        for name, rgb in COLORS.items():
            for i in range(n):
                _write(root / split / name / f"img{i}", rgb, fmts[i % len(fmts)])
    return root


def _dm(root, **kw):
    kw.setdefault("img_size", 16)
    kw.setdefault("batch_size", 4)
    return ImageFolderDataModule(str(root), **kw)


def test_image_folder_loads_with_correct_labels(tmp_path):
    dm = _dm(_make_folder(tmp_path), num_classes=3)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]  # readable before setup
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 6, 6)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        xs, ys = zip(*loader)
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(
            x.mean(dim=(2, 3)).argmax(dim=1), y
        )  # red->cat(0), green->dog(1), blue->eel(2)
        assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_image_formats_grey_rgba_16bit_and_opencv_only(tmp_path):
    _write(tmp_path / "g", COLORS["cat"], "gray")
    _write(tmp_path / "a", COLORS["cat"], "rgba")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "d.png")
    assert load_image(tmp_path / "g.png").shape == (20, 24, 3)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png")[1, 0], COLORS["cat"])
    assert load_image(tmp_path / "d.png")[0, 0].tolist() == [40000 >> 8] * 3
    # Radiance HDR: PIL cannot identify it, OpenCV reads it (stored BGR -> returned RGB)
    hdr = np.zeros((6, 7, 3), np.float32)
    hdr[..., 0] = 0.8
    assert cv2.imwrite(str(tmp_path / "h.hdr"), hdr)
    out = load_image(tmp_path / "h.hdr")
    assert out.shape == (6, 7, 3) and out[..., 2].min() > 100 and out[..., :2].max() == 0


def _corrupt(root):
    bad_png = root / "train" / "dog" / "broken.png"
    bad_png.write_bytes(b"this is not a png")
    good = (root / "train" / "cat" / "img1.jpg").read_bytes()
    truncated = root / "train" / "cat" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    return bad_png, truncated


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _make_folder(tmp_path)
    bad_png, truncated = _corrupt(root)
    dm = _dm(root, batch_size=64)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match="broken.png|truncated.jpg") as err:
        next(iter(dm.train_dataloader()))
    assert str(bad_png) in str(err.value) or str(truncated) in str(err.value)
    for path in (bad_png, truncated):
        with pytest.raises(CorruptImageError, match=str(path)):
            load_image(path)


def test_skip_corrupt_counts_in_one_warning(tmp_path):
    root = _make_folder(tmp_path)
    bad = _corrupt(root)
    dm = _dm(root, skip_corrupt=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    ours = [w for w in caught if "unreadable" in str(w.message)]
    assert len(ours) == 1
    assert "skipped 2 unreadable image(s) of 17" in str(ours[0].message)  # 11 train + 6 val files
    assert sorted(dm.skipped) == sorted(bad)
    assert len(dm.train_set) == 9 and all(p not in dm.train_set.paths for p in bad)
    assert sum(1 for _ in dm.train_dataloader()) == 3  # every remaining image loads


def test_skip_corrupt_that_empties_a_class_is_an_error(tmp_path):
    root = _make_folder(tmp_path, per_split={"train": 1})
    (root / "train" / "dog" / "img0.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="dog"):
        _dm(root, skip_corrupt=True, val_split=None, test_split=None).setup("fit")


def test_empty_class_folder_is_named(tmp_path):
    root = _make_folder(tmp_path)
    empty = root / "train" / "fox"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"without any image file.*{empty}"):
        _dm(root).setup("fit")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        _ = _dm(tmp_path / "nowhere").num_classes
    root = _make_folder(tmp_path / "d", per_split={"train": 1})
    dm = _dm(root)  # no val folder
    with pytest.raises(FileNotFoundError, match=str(root / "val")):
        dm.setup("fit")
    with pytest.raises(ValueError, match="no class sub-folders"):
        (root / "empty_split").mkdir()
        _ = _dm(root, train_split="empty_split").num_classes


def test_num_classes_mismatch(tmp_path):
    root = _make_folder(tmp_path, per_split={"train": 1})
    with pytest.raises(
        ValueError, match=r"num_classes=5 .* 3 class folder\(s\): \['cat', 'dog', 'eel'\]"
    ):
        _ = _dm(root, num_classes=5).num_classes


def test_val_class_unknown_to_train_and_no_val_split(tmp_path):
    root = _make_folder(tmp_path, per_split={"train": 1, "val": 1})
    _write(root / "val" / "yak" / "img0", (1, 2, 3), "png")
    with pytest.raises(ValueError, match="yak"):
        _dm(root).setup("fit")
    dm = _dm(root, val_split=None)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and len(dm.train_set) == 3


# ---------------------------------------------------------------- CIFAR
@pytest.mark.parametrize(
    "cls, folder, url",
    [
        (
            CIFAR10DataModule,
            "cifar-10-batches-bin",
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        ),
        (
            CIFAR100DataModule,
            "cifar-100-binary",
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        ),
    ],
)
def test_cifar_absent_offline_says_where_to_put_files(tmp_path, cls, folder, url):
    dm = cls(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # download=False: nothing to do
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert folder in msg and url in msg and str(tmp_path) in msg and "download=True" in msg


def test_cifar_download_failure_is_explained(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    (tmp_path / "cifar-10-batches-py").mkdir()  # the pickled version is present but not read
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "download failed" in msg and "name resolution" in msg
    assert "cifar-10-batches-bin" in msg and "cifar-10-binary.tar.gz" in msg and "pickled" in msg


def _cifar_records(labels, label_bytes):
    n = len(labels)
    pixels = np.zeros((n, 3, 32, 32), np.uint8)
    pixels[:, 0] = np.asarray(labels)[:, None, None]  # red plane = label
    pixels[:, 2, 0, 1] = 200  # blue, row 0, column 1
    head = np.stack([np.asarray(labels) // 2] * (label_bytes - 1) + [np.asarray(labels)], 1)
    return np.concatenate([head.astype(np.uint8), pixels.reshape(n, -1)], 1).tobytes()


def test_read_cifar_binary_layout(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(_cifar_records([3, 7, 99], label_bytes=2))
    images, labels = read_cifar_binary(path, label_bytes=2, label_index=1)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [3, 7, 99] and images[:, 5, 5, 0].tolist() == [3, 7, 99]
    assert images[0, 0, 1, 2] == 200 and images[0, 1, 0, 2] == 0
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a CIFAR binary file"):
        read_cifar_binary(path, 1, 0)


def test_cifar_datamodule_on_small_binary_files(tmp_path):
    class TinyCIFAR10(CIFAR10DataModule):
        spec = dataclasses.replace(
            cifar.CIFAR10_SPEC, records_per_train_file=20, records_per_test_file=10
        )

    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in TinyCIFAR10.spec.train_files:
        (folder / name).write_bytes(_cifar_records(np.arange(20) % 10, 1))
    (folder / "test_batch.bin").write_bytes(_cifar_records(np.arange(10), 1))
    (folder / "batches.meta.txt").write_text(
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
    )
    dm = TinyCIFAR10(
        data_dir=str(tmp_path), download=False, val_fraction=0.1, img_size=32, batch_size=10
    )
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.classes[3] == "cat"
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 10)
    assert sorted(dm.val_set.labels.tolist()) == list(range(10))  # stratified: one per class
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    red = (y.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[:, 0, 5, 5], red)  # eval at native size keeps pixels
    (folder / "test_batch.bin").write_bytes(_cifar_records(np.arange(5), 1))
    with pytest.raises(ValueError, match="holds 5 images, expected 10"):
        TinyCIFAR10(data_dir=str(tmp_path), download=False).setup("test")
