"""Image folders: ``data_dir/{train,val,test}/<class name>/**/<image>``.

Classes are the sub-folders of the train split, sorted by name (label = position). Any format
that PIL or OpenCV reads is accepted. Problems are reported with the path at fault: a missing
folder, a class folder without images, a val/test class unknown to train, ``num_classes`` not
matching the folders, or an unreadable image (at load time, or skipped and counted once in a
warning at setup when ``skip_corrupt=True``).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import CorruptImageError, ImageFileDataset, load_image

# Extensions that PIL or OpenCV decode.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".dib",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".pfm",
    ".jp2",
    ".j2k",
    ".tga",
    ".ico",
    ".sr",
    ".ras",
    ".hdr",
    ".pic",
    ".exr",
    ".avif",
)


def list_class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir`` (hidden ones ignored)."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder '{split_dir}' does not exist or is not a directory")
    classes = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        raise ValueError(
            f"image folder '{split_dir}' has no class sub-folders (expected "
            f"{split_dir}/<class>/<image>)"
        )
    return classes


def scan_split(
    split_dir: Path, classes: Sequence[str], extensions: Sequence[str]
) -> tuple[list[Path], list[int]]:
    """Image paths (sorted within each class) and labels; ``classes`` gives the label order.

    Every class folder of the split must be one of ``classes`` and hold at least one image.
    """
    present = list_class_folders(split_dir)
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise ValueError(
            f"'{split_dir}' has class folder(s) {unknown} that the train split does not have: "
            f"{list(classes)}"
        )
    exts = {e.lower() for e in extensions}
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for name in present:
        found = sorted(
            Path(root) / f
            for root, dirs, files in os.walk(split_dir / name, followlinks=True)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
        )
        if not found:
            empty.append(str(split_dir / name))
        paths += found
        labels += [classes.index(name)] * len(found)
    if empty:
        raise ValueError(
            f"class folder(s) without any image file ({', '.join(sorted(exts))}): "
            f"{', '.join(empty)}"
        )
    return paths, labels


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted; hidden files ignored)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist or is not a directory")
    exts = {e.lower() for e in extensions}
    found = sorted(
        Path(root) / f
        for root, dirs, files in os.walk(folder, followlinks=True)
        for f in files
        if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
    )
    if not found:
        raise ValueError(f"image folder '{folder}' holds no image file ({', '.join(sorted(exts))})")
    return found


def _is_readable(path: Path) -> bool:
    try:
        load_image(path)
    except CorruptImageError:
        return False
    return True


class ImageFolderDataModule(VisionDataModule):
    """Train/val/test directories of class sub-folders.

    Args (besides those of ``VisionDataModule``, passed on as ``**kwargs``):
        data_dir: the folder holding the split folders.
        num_classes: if given, must equal the number of train class folders.
        train_split, val_split, test_split: split folder names under ``data_dir``; None -> no
            such split (e.g. ``val_split: null`` trains without validation).
        skip_corrupt: decode every image once at setup and drop unreadable ones, with a single
            warning that counts them; otherwise an unreadable image raises CorruptImageError
            naming the file when it is loaded.
        extensions: accepted file extensions (default: ``IMAGE_EXTENSIONS``).
        predict_dir: a folder of images without labels (any layout) that ``predict`` uses
            instead of the test split; the classes still come from the train split.
        decode_size: training images only: decode JPEGs at the largest 1/2, 1/4 or 1/8 scale
            whose sides stay >= ``decode_size`` pixels (PIL's ``draft``, before the crop);
            ``img_size`` never decodes below the training size and speeds up images at least
            twice as large; a smaller value trades detail of large crops for speed. None: full.
    """

    def __init__(
        self,
        data_dir: str,
        num_classes: Optional[int] = None,
        img_size: int = 224,
        train_split: Optional[str] = "train",
        val_split: Optional[str] = "val",
        test_split: Optional[str] = "test",
        skip_corrupt: bool = False,
        extensions: Optional[list[str]] = None,
        predict_dir: Optional[str] = None,
        decode_size: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(img_size=img_size, **kwargs)
        if decode_size is not None and (
            isinstance(decode_size, bool) or not isinstance(decode_size, int) or decode_size < 1
        ):
            raise ValueError(f"decode_size={decode_size!r} must be a positive int or None")
        self.decode_size = decode_size
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
        if train_split is None:
            raise ValueError("train_split must name the folder that defines the classes")
        self.data_dir = Path(data_dir).expanduser()
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.skip_corrupt = skip_corrupt
        self.extensions = tuple(IMAGE_EXTENSIONS if extensions is None else extensions)
        self._num_classes_arg = num_classes
        self.predict_dir = None if predict_dir is None else Path(predict_dir).expanduser()
        self._classes: Optional[list[str]] = None
        self.skipped: list[Path] = []  # unreadable images dropped by skip_corrupt

    def _split_dir(self, split: str) -> Path:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule data_dir '{self.data_dir}' does not exist"
            )
        return self.data_dir / self.splits[split]

    @property
    def classes(self) -> list[str]:
        """Class names (train split's folder names, sorted); checked against ``num_classes``."""
        if self._classes is None:
            classes = list_class_folders(self._split_dir("train"))
            if self._num_classes_arg is not None and self._num_classes_arg != len(classes):
                raise ValueError(
                    f"num_classes={self._num_classes_arg} but '{self._split_dir('train')}' has "
                    f"{len(classes)} class folder(s): {classes}"
                )
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def val_dataloader(self):
        # val_split=None: no validation; Lightning skips it for an empty list of loaders
        return [] if self.splits["val"] is None else super().val_dataloader()

    def _dataset(self, split: str, transform) -> Optional[ImageFileDataset]:
        if self.splits[split] is None:
            return None
        paths, labels = scan_split(self._split_dir(split), self.classes, self.extensions)
        draft = self.decode_size if split == "train" else None
        return ImageFileDataset(paths, labels, transform, draft=draft)

    def _setup_datasets(self, stage: Optional[str]) -> None:
        if stage == "predict" and self.predict_dir is not None:
            if self.predict_set is None:
                self.predict_set = ImageFileDataset(
                    list_images(self.predict_dir, self.extensions),
                    None,
                    self.build_eval_transform(),
                )
            if self.skip_corrupt:
                self._drop_unreadable([self.predict_set])
            return
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }
        splits = wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test")
        for split in splits:
            if self.splits[split] is None and split in ("train", "test") and stage is not None:
                raise ValueError(
                    f"stage '{stage}' needs the {split} split but {split}_split is None"
                )
            if getattr(self, f"{split}_set") is not None:
                continue
            transform = (
                self.build_train_transform() if split == "train" else self.build_eval_transform()
            )
            setattr(self, f"{split}_set", self._dataset(split, transform))
        if self.skip_corrupt:
            self._drop_unreadable([getattr(self, f"{s}_set") for s in splits])

    def _drop_unreadable(self, datasets: list[Optional[ImageFileDataset]]) -> None:
        """Decode every image once (threads: decoding releases the GIL); one warning in total."""
        datasets = [d for d in datasets if d is not None and not getattr(d, "checked", False)]
        total = sum(len(d) for d in datasets)
        bad: list[Path] = []
        with ThreadPoolExecutor(
            max_workers=max(1, self.num_workers, min(8, os.cpu_count() or 1))
        ) as pool:
            for d in datasets:
                ok = list(pool.map(_is_readable, d.paths))
                bad += [p for p, good in zip(d.paths, ok) if not good]
                d.paths = [p for p, good in zip(d.paths, ok) if good]
                d.checked = True
                if d.labels is None:  # unlabeled (predict_dir)
                    continue
                before = set(d.labels.tolist())
                d.labels = d.labels[[i for i, good in enumerate(ok) if good]]
                emptied = sorted(self.classes[i] for i in before - set(d.labels.tolist()))
                if emptied:
                    raise ValueError(
                        f"class folder(s) {emptied} under '{self.data_dir}' have no readable image "
                        f"left after skipping {len(bad)} unreadable file(s): "
                        f"{', '.join(map(str, bad[:5]))}"
                    )
        if bad:
            self.skipped += bad
            shown = ", ".join(str(p) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
            warnings.warn(
                f"ImageFolderDataModule skipped {len(bad)} unreadable image(s) of {total} under "
                f"'{self.data_dir}' (skip_corrupt=True): {shown}",
                stacklevel=2,
            )
