"""The faster input paths: ``vmoe make-shards --max-size N`` (images stored resized on write:
the size, the aspect ratio, the labels and keys intact, small images kept byte for byte),
reduced-scale JPEG decoding (``load_image(draft=N)``, ``ImageFolderDataModule(decode_size=N)``:
the decoded size and closeness to the full decode), and the per-value RandAugment ops computed
as tables, the blends in place (the same pixels as the per-pixel formulas)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("litdata")

from tests.helpers import last_stderr_line  # noqa: E402
from vmoe.cli import main  # noqa: E402
from vmoe.data import ImageFolderDataModule, load_image  # noqa: E402


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB [h, w, 3] image (an upsampled random field: JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


SIZES = {
    "wide.jpg": (100, 200),
    "tall.png": (150, 60),
    "small.jpg": (30, 40),
    "square.png": (64, 64),
}


@pytest.fixture()
def source(tmp_path) -> Path:
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        (tmp_path / "src" / f"c{k}").mkdir(parents=True)
        Image.fromarray(smooth(h, w, k)).save(tmp_path / "src" / f"c{k}" / name, quality=95)
    return tmp_path / "src"


def stored(folder: Path) -> dict:
    """key -> (label, encoded image bytes) of every item of a shard folder."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(folder), shuffle=False)
    return {item["key"]: (int(item["label"]), bytes(item["image"])) for item in ds}


def test_max_size_stores_resized_images_with_aspect_ratio_and_labels(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["make-shards", "--source", str(source), "--out", str(out), "--max-size", "64"]) == 0
    )
    assert "wrote 4 images of 4 classes" in capsys.readouterr().out
    assert json.loads((out / "vmoe_shards.json").read_text())["max_size"] == 64
    items = stored(out)
    assert sorted(items) == sorted(f"c{k}/{n}" for k, n in enumerate(SIZES))
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        label, data = items[f"c{k}/{name}"]
        assert label == k  # labels intact
        with Image.open(io.BytesIO(data)) as im:
            sw, sh = im.size
            fmt = im.format
        if max(h, w) <= 64:  # already small enough: the source's bytes, unchanged
            assert data == (source / f"c{k}" / name).read_bytes()
            continue
        assert max(sw, sh) == 64  # the longer side is max_size
        assert abs(sw / sh - w / h) <= 1.0 / min(sw, sh)  # aspect ratio kept (to a pixel)
        assert fmt == ("JPEG" if name.endswith(".jpg") else "PNG")
        # the content is the source's, smaller: close to a plain resize of the original
        original = load_image(name, (source / f"c{k}" / name).read_bytes())
        want = np.asarray(Image.fromarray(original).resize((sw, sh), Image.BICUBIC))
        got = load_image(name, data)
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_max_size_not_positive_is_refused(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["make-shards", "--source", str(source), "--out", str(out), "--max-size", "0"]) == 2
    assert last_stderr_line(capsys).startswith("vmoe make-shards: error: --max-size 0 must be")
    assert not out.exists()


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize(
    "draft, size", [(None, (375, 500)), (224, (375, 500)), (180, (188, 250)), (90, (94, 125))]
)
def test_draft_decode_size_and_closeness_to_the_full_decode(draft, size):
    arr = smooth(375, 500)
    data = jpeg(arr)
    full = load_image("x.jpg", data)
    got = load_image("x.jpg", data, draft=draft)
    assert got.shape == (*size, 3) and got.dtype == np.uint8
    if draft is None or size == full.shape[:2]:
        assert np.array_equal(got, full)  # no reduction possible: the full decode
        return
    # the reduced-scale decode is the full image made smaller: close to a resize of it
    small = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BOX))
    assert np.abs(got.astype(int) - small.astype(int)).mean() < 3


def test_draft_leaves_other_formats_alone():
    arr = smooth(375, 500)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert np.array_equal(load_image("x.png", buf.getvalue(), draft=90), arr)


def test_decode_size_in_the_image_folder_training_set_only(tmp_path):
    for split in ("train", "val"):
        for k in range(2):
            (tmp_path / split / f"c{k}").mkdir(parents=True)
            for i in range(2):
                Image.fromarray(smooth(375, 500, k * 2 + i)).save(
                    tmp_path / split / f"c{k}" / f"{i}.jpg", quality=90
                )
    dm = ImageFolderDataModule(
        str(tmp_path), test_split=None, img_size=32, batch_size=2, decode_size=100
    )
    dm.setup("fit")
    assert dm.train_set.draft == 100 and dm.val_set.draft is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.tolist() in ([0, 0], [0, 1], [1, 0], [1, 1])
    with pytest.raises(ValueError, match="decode_size=0 must be a positive int"):
        ImageFolderDataModule(str(tmp_path), decode_size=0)


def _reference_ops():
    """The per-pixel formulas the table ops replace (main 348d7b1's implementations)."""

    def blend(degenerate, img, factor):
        out = degenerate.astype(np.float32) + factor * (img.astype(np.float32) - degenerate)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def auto_contrast(img, arg):
        x = img.reshape(img.shape[0], img.shape[1], -1).astype(np.float32)
        lo = x.min(axis=(0, 1), keepdims=True)
        hi = x.max(axis=(0, 1), keepdims=True)
        scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-6), 1.0)
        offset = np.where(hi > lo, lo, 0.0)
        return np.clip(np.rint((x - offset) * scale), 0, 255).astype(np.uint8).reshape(img.shape)

    def gray(img):
        import cv2

        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 and img.shape[2] == 3 else img

    return {
        "auto_contrast": auto_contrast,
        "solarize": lambda img, t: np.where(img >= t, 255 - img, img).astype(np.uint8),
        "solarize_add": lambda img, a: np.where(
            img < 128, np.clip(img.astype(np.int16) + int(round(a)), 0, 255).astype(np.uint8), img
        ),
        "contrast": lambda img, f: blend(
            np.full_like(img, int(round(float(gray(img).mean())))), img, f
        ),
        "brightness": lambda img, f: blend(np.zeros_like(img), img, f),
        "color": lambda img, f: (
            img if img.ndim == 2 else blend(np.repeat(gray(img)[..., None], 3, axis=2), img, f)
        ),
    }


def test_table_and_in_place_ops_give_the_per_pixel_formulas_pixels():
    import vmoe.data.randaugment as ra

    rng = np.random.default_rng(0)
    flat = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    flat[..., 1] = 90  # a constant channel: AutoContrast leaves it
    images = [
        rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
        rng.integers(40, 200, (33, 17, 3), dtype=np.uint8),
        rng.integers(0, 256, (20, 30), dtype=np.uint8),
        flat,
    ]
    for name, reference in _reference_ops().items():
        for img in images:
            for arg in (0.0, 0.3, 1.9, -0.8, 30.0, 128.0, 256.0):
                got = getattr(ra, name)(img, arg, 128)
                assert got.dtype == np.uint8 and np.array_equal(got, reference(img, arg)), name
