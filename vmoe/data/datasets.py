"""Map-style datasets that apply an albumentations pipeline, and the image-file reader.

Each item is ``(image, label)``: image a float32 tensor [C, H, W] after the transform (or the
raw uint8 array [H, W, C] without one), label a Python int; the default collate makes batches
``x [B, C, H, W]`` float32 and ``y [B]`` int64.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

Transform = Optional[Callable[..., dict]]


class CorruptImageError(ValueError):
    """An image file that neither PIL nor OpenCV can decode; the message names the file."""


def load_image(
    path: str | os.PathLike, data: Optional[bytes] = None, draft: Optional[int] = None
) -> np.ndarray:
    """Read an image file (or its encoded bytes ``data``, ``path`` then only names it) as
    uint8 RGB [H, W, 3]: grey, RGBA, CMYK, palette and 16-bit images converted, the EXIF
    orientation applied.

    ``draft``: a JPEG is decoded at the largest DCT reduction (1/2, 1/4 or 1/8, PIL's
    ``Image.draft``) that keeps both sides >= ``draft`` pixels, which costs about the
    reduction's fraction of the full decode; other formats, and JPEGs smaller than twice
    ``draft``, are decoded at full size.

    PIL first; OpenCV only when PIL does not recognise the format (so a truncated JPEG, which
    OpenCV would half-decode with a warning, is still reported as corrupt).
    Raises CorruptImageError naming ``path``.
    """
    path = Path(path) if data is None else path
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            if im.mode in ("I;16", "I;16B", "I;16L"):
                # 16-bit greyscale: keep the high byte instead of PIL's clipping to 255
                arr = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
                arr = np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
            else:
                arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
            return arr
    except UnidentifiedImageError as err:
        pil_error: Exception = err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(
            f"cannot read image file '{path}': {type(err).__name__}: {err}"
        ) from err
    if data is None:
        arr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    else:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise CorruptImageError(
            f"cannot read image file '{path}': neither PIL ({pil_error}) nor OpenCV can decode it"
        )
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


class _TransformDataset(Dataset):
    def __init__(self, transform: Transform):
        self.transform = transform

    def reseed(self, seed: int) -> None:
        """Give the (albumentations) transform its own random stream, e.g. per worker."""
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)

    def _apply(self, image: np.ndarray):
        return image if self.transform is None else self.transform(image=image)["image"]


class ArrayDataset(_TransformDataset):
    """In-memory images uint8 [N, H, W, C] with integer labels [N]."""

    def __init__(
        self, images: np.ndarray, labels: Sequence[int] | np.ndarray, transform: Transform = None
    ):
        super().__init__(transform)
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self._apply(self.images[index]), int(self.labels[index])


class ImageFileDataset(_TransformDataset):
    """Images read from files at access time, with integer labels (items ``(image, label)``) or
    without (``labels=None``: items are the image alone, e.g. a folder to predict on).

    Any failure to read or transform an image raises CorruptImageError (a ValueError) whose
    message starts with the file's path, so that it survives a DataLoader worker's re-raise."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Optional[Sequence[int]] = None,
        transform: Transform = None,
        draft: Optional[int] = None,
    ):
        super().__init__(transform)
        self.draft = draft  # load_image's reduced-scale JPEG decode (None: full size)
        if labels is not None and len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = self._apply(load_image(path, draft=self.draft))
        except CorruptImageError:
            raise
        except Exception as err:  # e.g. a transform failing on an odd image
            raise CorruptImageError(
                f"cannot use image file '{path}': {type(err).__name__}: {err}"
            ) from err
        return image if self.labels is None else (image, int(self.labels[index]))


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: without it every worker would inherit (by fork) the same
    albumentations random state and repeat the same augmentations. torch gives each worker a
    seed derived from the main process's RNG, so runs under ``seed_everything`` stay repeatable;
    ``rank`` (bind it with functools.partial) keeps DDP processes, seeded alike, apart.
    """
    info = torch.utils.data.get_worker_info()
    seed = (info.seed + 1_000_003 * rank) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, _TransformDataset):
        dataset.reseed(seed)


def _check_split_sizes(
    labels: np.ndarray, n_out: int, option: str, fraction: float, n: Optional[int] = None
) -> None:
    """A stratified split needs at least one image of every class on each side: a ValueError
    naming ``option`` when ``n_out`` held-out images (or the ``n - n_out`` kept) are fewer than
    the classes."""
    n = len(labels) if n is None else n
    classes = len(np.unique(labels))
    if n_out == 0 or (classes <= n_out and classes <= n - n_out):
        return
    side = f"holds out {n_out}" if n_out < classes else f"keeps {n - n_out}"
    raise ValueError(
        f"{option}={fraction:g} {side} of {n} images, fewer than the {classes} classes (a "
        f"stratified split needs one of each): use a {option} between {classes / n:.3g} and "
        f"{1 - classes / n:.3g}, or give the split as its own folder/split"
    )


def worker_context(num_workers: int):
    """The ``multiprocessing_context`` of a loader's workers: ``"fork"`` on Linux when this
    process's default start method is ``spawn`` (a rank started by ``torch.multiprocessing.spawn``
    or Lightning's ``ddp_spawn`` inherits it), else None (the default). Spawned workers each
    re-import torch, Lightning and vmoe before their first item: 20-30 s on a busy 2-core
    machine, measured, against under 1 s for forked ones. Forked workers are what the ranks of
    ``vmoe fit --trainer.strategy ddp`` (separate processes, fork by default) already use."""
    import multiprocessing
    import sys

    if num_workers > 0 and sys.platform.startswith("linux"):
        if multiprocessing.get_start_method(allow_none=True) == "spawn":
            return "fork"
    return None


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test), each sorted, with class proportions kept in every part."""
    n = len(labels)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    _check_split_sizes(labels, n_test, "test_fraction", test_fraction)
    _check_split_sizes(labels, n_val, "val_fraction", val_fraction, n - n_test)
    index = np.arange(n)
    rest, test = (
        (index, index[:0])
        if n_test == 0
        else train_test_split(index, test_size=n_test, stratify=labels, random_state=seed)
    )
    train, val = (
        (rest, rest[:0])
        if n_val == 0
        else train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed + 1)
    )
    return np.sort(train), np.sort(val), np.sort(test)
