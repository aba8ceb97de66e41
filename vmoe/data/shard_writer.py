"""Writing streaming shards: ``write_shards`` (``vmoe make-shards``) turns a folder of class
sub-folders or a Hugging Face dataset split into a shard folder of the format of
``vmoe.data.shard_format``, each image decoded once on the way (and resized with ``max_size``).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

from vmoe.data.datasets import CorruptImageError, load_image
from vmoe.data.shard_format import FORMAT, FORMAT_VERSION, MANIFEST, _vmoe_version

__all__ = ["write_shards", "parse_chunk_bytes"]


def _folder_items(
    source: Path, extensions
) -> tuple[list[str], Iterator[tuple[str, bytes, int]], int]:
    from vmoe.data.imagefolder import IMAGE_EXTENSIONS, list_class_folders, scan_split

    classes = list_class_folders(source)
    paths, labels = scan_split(source, classes, extensions or IMAGE_EXTENSIONS)

    def items():
        for path, label in zip(paths, labels):
            yield str(path.relative_to(source)), path.read_bytes(), int(label)

    return classes, items(), len(paths)


def _hf_items(source: str, split: str, image_column: str, label_column: str):
    import datasets

    from vmoe.data.hf import image_bytes, integer_labels, load_hf_dataset

    tables = load_hf_dataset(source)
    if split not in tables:
        raise ValueError(f"--split {split!r} is not a split of {source!r}: {sorted(tables)}")
    table = tables[split]
    for role, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column not in table.column_names:
            raise ValueError(
                f"{role} {column!r} is not a column of split {split!r} of {source!r}; "
                f"its columns: {table.column_names}"
            )
    feature = table.features[label_column]
    labels = integer_labels(
        table[label_column],
        f"label column {label_column!r} of split {split!r} of {source!r} (--label-column)",
    )
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
    else:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))

    def items():
        for i in range(len(table)):
            where = f"row {i} of split {split!r} of {source!r}"
            label = int(labels[i])
            if not 0 <= label < len(classes):
                raise ValueError(f"{where}: label {label} is not in [0, {len(classes)})")
            name, data = image_bytes(table[i][image_column], where)
            yield f"{split}/{i}", (Path(name).read_bytes() if data is None else data), label

    return classes, items(), len(table)


_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_chunk_bytes(value: Any, option: str = "chunk_bytes") -> int:
    """A chunk size as bytes: an int or a string such as ``64MB``, ``500kb``, ``1000000``
    (k/M/G/T = powers of 1000); a ValueError naming ``option`` and the value unless positive."""
    import re

    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)b?\s*", value.lower())
        if found:
            number = float(found.group(1)) * _SIZE_UNITS[found.group(2)]
    if number is None or not number >= 1:
        raise ValueError(
            f"{option} {value!r} is not a positive size (e.g. 64MB, 500KB or a number of bytes)"
        )
    return int(number)


def _prepared(key: str, data: bytes, max_size: Optional[int]) -> bytes:
    """``data`` decoded once (CorruptImageError naming ``key`` if it does not decode); with
    ``max_size``, an image whose longer side exceeds it is stored resized to that longer side
    (aspect ratio kept, EXIF orientation applied; JPEG quality 90 for JPEG sources, PNG
    otherwise), any other kept as it was."""
    import io

    from PIL import Image

    image = load_image(key, data)  # uint8 [H, W, 3]
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return data
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    if data[:3] == b"\xff\xd8\xff":
        small.save(out, "JPEG", quality=90)
    else:
        small.save(out, "PNG")
    return out.getvalue()


def _checked_items(items, max_size: Optional[int], skip_corrupt: bool, skipped: list, root=""):
    """``items`` decoded (and resized with ``max_size``) on a few threads, in order, at most a
    small window ahead; unreadable images raise naming ``root/key``, or are left out and their
    keys listed in ``skipped``."""
    from collections import deque

    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    window: deque = deque()
    try:
        for key, data, label in items:
            name = f"{root}/{key}" if root else key
            window.append((key, label, pool.submit(_prepared, name, data, max_size)))
            if len(window) >= 32:
                yield from _take(window, skip_corrupt, skipped)
        while window:
            yield from _take(window, skip_corrupt, skipped)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take(window, skip_corrupt: bool, skipped: list):
    key, label, future = window.popleft()
    try:
        yield key, future.result(), label
    except CorruptImageError:
        if not skip_corrupt:
            raise
        skipped.append(key)


def _remove_stale_chunks(out_dir: Path, manifest_index: Path) -> None:
    """After ``--overwrite``: delete the chunk files of ``out_dir`` that its (new) index.json
    does not list, so that no old chunk is left beside the new set."""
    listed = {c["filename"] for c in json.loads(manifest_index.read_text())["chunks"]}
    for file in out_dir.glob("chunk-*.bin"):
        if file.name not in listed:
            file.unlink()


def write_shards(
    source: str,
    out: str,
    overwrite: bool = False,
    chunk_bytes: str = "64MB",
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = True,
    extensions: Optional[list[str]] = None,
    skip_corrupt: bool = False,
    max_size: Optional[int] = None,
) -> dict:
    """Write ``source`` (a folder of class sub-folders ``<dir>/<class>/<image>``, or a Hugging
    Face dataset as ``vmoe.data.HFDataModule`` reads it, its ``split``) as litdata chunks
    into ``out``; returns the manifest. Written into a temporary folder beside ``out`` and moved
    in when complete (a full disk: ``WriteError``, ``out`` unchanged); a non-empty ``out`` is
    refused unless ``overwrite`` (then its old chunks are removed).

    Every image is decoded once while writing: an unreadable one is a ``CorruptImageError``
    naming it (nothing written), or with ``skip_corrupt`` left out and counted in the
    manifest's ``skipped``. ``max_size``: store images whose longer side exceeds it resized to
    it (as FFCV's ``max_resolution``), so that training decodes fewer pixels."""
    from litdata.streaming.writer import BinaryWriter
    from tqdm import tqdm

    from vmoe.models.pretrained import check_target_dir, staged_save_dir

    chunk_bytes = parse_chunk_bytes(chunk_bytes)
    if max_size is not None and (isinstance(max_size, bool) or not int(max_size) >= 1):
        raise ValueError(f"max_size {max_size!r} must be a positive number of pixels")
    out_dir = Path(out)
    check_target_dir(out_dir, overwrite)  # before reading anything
    src = Path(source).expanduser()
    is_folder = (
        src.is_dir()
        and not any((src / f).exists() for f in ("dataset_dict.json", "state.json"))
        and not any(src.glob("*.parquet"))
        and not any(src.glob("**/*.parquet"))
    )
    if is_folder and (src / split).is_dir() and not any(f.is_file() for f in src.iterdir()):
        src_folder = src / split if (src / split).is_dir() else src
    else:
        src_folder = src
    if is_folder:
        classes, items, total = _folder_items(src_folder, extensions)
    else:
        classes, items, total = _hf_items(source, split, image_column, label_column)
    if total == 0:
        raise ValueError(f"{source!r} holds no image to write")
    skipped: list[str] = []
    with staged_save_dir(out_dir, overwrite=overwrite) as tmp:
        writer = BinaryWriter(str(tmp), chunk_bytes=chunk_bytes)
        written = 0
        with tqdm(total=total, desc="make-shards", unit="img", disable=not progress) as bar:
            root = str(src_folder) if is_folder else str(source)
            for key, data, label in _checked_items(items, max_size, skip_corrupt, skipped, root):
                writer.add_item(written, {"image": data, "label": label, "key": key})
                written += 1
                bar.update(1)
        if written == 0:
            raise CorruptImageError(f"no image of {source!r} is readable ({len(skipped)} tried)")
        writer.done()
        writer.merge()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vmoe_version": _vmoe_version(),
            "num_images": written,
            "num_classes": len(classes),
            "classes": classes,
            "source": str(source),
            "item": {"image": "encoded bytes", "label": "int", "key": "str"},
            "max_size": max_size,
            "skipped": skipped,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if overwrite:
        _remove_stale_chunks(out_dir, out_dir / "index.json")
    return manifest
