"""Streaming shards on litdata: written by ``write_shards`` (``vmoe make-shards``), read by
``ShardDataModule`` from a local folder or a URL (``s3://``, ``gs://``, ...).

A shard folder holds litdata chunks (``chunk-*.bin`` + ``index.json``) of items
``{"image": encoded bytes (the source file's, not re-encoded, unless ``max_size`` resized it),
"label": int, "key": str}`` and
``vmoe_shards.json``, the manifest: format name and version, the vmoe version that wrote it,
the class names and the image count. The manifest is written last, so a folder without one is
not a complete shard set; a folder of another format version is refused.

Reading: litdata's ``StreamingDataset`` divides the items over every DDP rank (all ranks of a
data- or expert-parallel run are data-parallel workers) and over the loader workers of each
rank, by chunks, shuffled with ``seed`` (chunk order, then items within chunks; re-drawn every
epoch). That split can be uneven (43 images over 2 ranks: 20 and 23), so under DDP the training
loader yields exactly ``num_images // world_size`` images on every rank: what a rank got beyond
that is left out that epoch, a rank short of it repeats its first images; every rank then runs
the same number of batches and ``len()`` is true (tests/data/test_ranks.py). Images are decoded
once (``vmoe.data.load_image``) and go through the usual albumentations pipelines.

Resume: litdata's ``StreamingDataLoader`` has ``state_dict``/``load_state_dict``, which
the data module's ``state_dict``/``load_state_dict`` put in every Lightning checkpoint and
restore with ``--ckpt_path`` before the loader is made. The saved position counts the batches
*trained* (``vmoe.train.ResumableTraining`` reports each finished step), not those litdata
handed out (Lightning fetches one ahead, and a Ctrl-C lands mid-step); a restored pass ends its
epoch, and the next epoch is litdata's next, as in the uninterrupted run. With the same
shards, seed, world size, ``num_workers`` and ``batch_size`` the resumed run trains on exactly
what the uninterrupted one did, step by step (tests/data/test_shards.py,
tests/train/test_resume_matrix.py); litdata refuses (or re-plans, see
``num_canonical_nodes``) a changed topology.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import CorruptImageError, load_image, worker_context

__all__ = [
    "MANIFEST",
    "FORMAT",
    "FORMAT_VERSION",
    "ShardDataModule",
    "write_shards",
    "read_manifest",
]

MANIFEST = "vmoe_shards.json"
FORMAT = "vmoe-shards"
FORMAT_VERSION = 1


def _vmoe_version() -> str:
    from vmoe import __version__

    return __version__


def _is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


# ----------------------------------------------------------------------------- writing


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


# ----------------------------------------------------------------------------- reading


def _check_manifest(manifest: Any, where: str) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where} is not a vmoe shard manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} was written by vmoe {manifest.get('vmoe_version')} in shard format version "
            f"{manifest.get('format_version')}; this vmoe ({_vmoe_version()}) reads version "
            f"{FORMAT_VERSION}: rewrite the shards with this version's `vmoe make-shards`"
        )
    if not isinstance(manifest.get("num_classes"), int) or manifest["num_classes"] < 1:
        raise ValueError(
            f"{where}: num_classes={manifest.get('num_classes')!r} must be a positive int"
        )
    if not manifest.get("num_images"):
        raise ValueError(
            f"{where}: the shard folder holds no image (num_images={manifest.get('num_images')!r})"
        )
    return manifest


def check_chunks(folder: Path) -> None:
    """A ValueError naming the file at fault when the local shard folder's ``index.json`` does
    not parse or does not list chunks, or a chunk it lists is missing, has another size than
    the index says (truncated, partly copied) or a header that does not match it (its first
    uint32, the item count, and the item offsets that follow). Reads only the headers."""
    import struct

    from litdata.streaming.framed_zstd import is_framed_chunk, parse_framed_header

    index_file = folder / "index.json"
    rewrite = f"; rewrite the shards with `vmoe make-shards --overwrite --out {folder}`"
    try:
        chunks = json.loads(index_file.read_text())["chunks"]
        listed = [(c["filename"], int(c["chunk_size"]), int(c["chunk_bytes"])) for c in chunks]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_file} is not a litdata chunk index ({type(err).__name__}: {err}){rewrite}"
        ) from None
    if not listed:
        raise ValueError(f"{index_file} lists no chunk{rewrite}")
    for name, items, size in listed:
        chunk = folder / name
        if not chunk.is_file():
            raise ValueError(f"shard chunk {chunk} listed in index.json is missing{rewrite}")
        actual = chunk.stat().st_size
        if actual != size:
            raise ValueError(
                f"shard chunk {chunk} is {actual} bytes, index.json says {size}: truncated or "
                f"partly copied{rewrite}"
            )
        with open(chunk, "rb") as f:
            head = f.read(min(size, 4 * (items + 2)))
        problem = None
        if is_framed_chunk(head):
            try:
                with open(chunk, "rb") as f:
                    found = parse_framed_header(f.read()).num_items
            except Exception as err:  # litdata's own RuntimeError on a bad directory
                problem = f"its header does not parse ({err})"
            else:
                problem = None if found == items else f"its header says {found} items"
        elif len(head) < 4 * (items + 2):
            problem = "it is shorter than its header"
        else:
            found = struct.unpack_from("<I", head)[0]
            offsets = struct.unpack_from(f"<{items + 1}I", head, 4)
            if found != items:
                problem = f"its header says {found} items"
            elif any(a > b for a, b in zip(offsets, offsets[1:])) or offsets[-1] > size:
                problem = "its header's item offsets are out of order or past its end"
        if problem:
            raise ValueError(
                f"shard chunk {chunk} is damaged: {problem}, index.json says {items}{rewrite}"
            )


def _fetch_remote(url: str, storage_options: Optional[dict], local: str) -> None:
    from litdata.streaming.downloader import get_downloader

    get_downloader(url, os.path.dirname(local), [], storage_options).download_file(
        url.rstrip("/") + "/" + MANIFEST, local
    )


def read_manifest(
    path: str, storage_options: Optional[dict] = None, timeout_s: float = 30.0
) -> dict:
    """The checked manifest of a shard folder or URL; a URL that does not answer within
    ``timeout_s`` is a ConnectionError naming it."""
    if not _is_url(path):
        folder = Path(str(path).removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"shard folder '{folder}' does not exist or is not a directory")
        file = folder / MANIFEST
        if not file.is_file():
            if not any(folder.iterdir()):
                raise ValueError(
                    f"shard folder '{folder}' is empty: write shards with `vmoe make-shards "
                    f"--source DIR --out {folder}`"
                )
            raise ValueError(
                f"shard folder '{folder}' has no {MANIFEST}: not written by `vmoe make-shards`, "
                "or its writing did not finish"
            )
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err})") from None
        if not (folder / "index.json").is_file():
            raise ValueError(f"shard folder '{folder}' has no index.json (litdata's chunk index)")
        manifest = _check_manifest(manifest, str(file))
        check_chunks(folder)
        return manifest
    import tempfile

    local = os.path.join(tempfile.mkdtemp(prefix="vmoe-shards-"), MANIFEST)
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(_fetch_remote, path, storage_options, local)
    try:
        future.result(timeout=timeout_s)
    except FutureTimeout:
        raise ConnectionError(
            f"shard URL {path} did not answer within {timeout_s:g} s (reading "
            f"{MANIFEST}); check the URL, the network and the credentials"
        ) from None
    except Exception as err:
        raise ConnectionError(
            f"cannot read {path.rstrip('/')}/{MANIFEST}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from err
    finally:
        pool.shutdown(wait=False)
    with open(local) as f:
        return _check_manifest(json.load(f), f"{path.rstrip('/')}/{MANIFEST}")


class DecodeItem:
    """litdata ``transform``: a stored item -> ``(image float32 [C, H, W], label)``; None for an
    unreadable image with ``skip_corrupt`` (the collate drops it and counts it). The pipeline is
    reseeded once per worker process from ``seed``, the rank and the worker id."""

    def __init__(
        self, pipeline, where: str, num_classes: int, skip_corrupt: bool, seed: int, rank: int = 0
    ):
        self.pipeline, self.where, self.num_classes = pipeline, where, num_classes
        self.skip_corrupt, self.seed, self.rank = skip_corrupt, seed, rank
        self._seeded_pid: Optional[int] = None

    def __call__(self, item: dict):
        if self._seeded_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            if hasattr(self.pipeline, "set_random_seed"):
                self.pipeline.set_random_seed(
                    (self.seed + 1_000_003 * self.rank + 7919 * (info.id + 1 if info else 0))
                    % 2**32
                )
            self._seeded_pid = os.getpid()
        key = f"{self.where} item {item.get('key')!r}"
        label = int(item["label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{key}: label {label} is not in [0, {self.num_classes})")
        try:
            image = self.pipeline(image=load_image(key, bytes(item["image"])))["image"]
        except CorruptImageError as err:
            if self.skip_corrupt:
                warnings.warn(
                    f"ShardDataModule skipped an unreadable image (skip_corrupt=True): {err}",
                    stacklevel=2,
                )
                return None
            raise
        return image, label


def collate_skipping(batch: list):
    """Default collate over the items that are not None (unreadable, skipped)."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        raise CorruptImageError(
            f"every image of a batch of {len(batch)} was unreadable (skip_corrupt=True)"
        )
    return default_collate(kept)


def shard_identity(manifest: dict) -> dict:
    """What a checkpoint's stream position depends on: the training shards' image and class
    counts (saved with the position, compared on resume by ``check_resume_shards``)."""
    return {"num_images": int(manifest["num_images"]), "num_classes": int(manifest["num_classes"])}


def check_resume_shards(saved: Optional[dict], manifest: dict, path: str) -> None:
    """A ValueError when a checkpoint's stream position was saved on shards other than those
    at ``path`` now (another image or class count: rewritten since); ``saved`` None (a
    checkpoint from before this check) is accepted."""
    if not saved:
        return
    now = shard_identity(manifest)
    if saved != now:
        raise ValueError(
            f"the checkpoint's position in the training stream is for shards of "
            f"{saved.get('num_images')} images / {saved.get('num_classes')} classes, but "
            f"{path} now holds {now['num_images']} / {now['num_classes']} (rewritten since?): "
            "resume on the shards it was trained on, or start a new run without --ckpt_path"
        )


class ShardDataModule(VisionDataModule):
    """Shards written by ``vmoe make-shards``: ``vmoe fit --data vmoe.data.ShardDataModule
    --data.path DIR_OR_URL``.

    Args (besides those of ``VisionDataModule``):
        path: the training shard folder or URL (``s3://bucket/train``, ``gs://...``).
        val_path, test_path: shard folders/URLs of the validation and test splits (optional).
        num_classes: must equal the manifest's, if given.
        shuffle, seed: litdata's shuffle of the training shards (chunks, then items), by epoch.
        skip_corrupt: drop unreadable images as they are met (a warning each) instead of raising.
        cache_dir: where litdata caches remote chunks (default: its own).
        storage_options: passed to litdata (credentials, endpoint_url, ...).
        timeout_s: the longest wait for a URL's manifest.
        stream_drop_last: litdata's ``drop_last`` (None: its default, True under DDP). Under DDP
            the training loader also evens the ranks out to ``num_images // world_size``
            images each (see the module docstring).
    """

    def __init__(
        self,
        path: str,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        num_classes: Optional[int] = None,
        img_size: int = 224,
        shuffle: bool = True,
        seed: int = 0,
        skip_corrupt: bool = False,
        cache_dir: Optional[str] = None,
        storage_options: Optional[dict] = None,
        timeout_s: float = 30.0,
        stream_drop_last: Optional[bool] = None,
        **kwargs,
    ):
        super().__init__(img_size=img_size, **kwargs)
        self.paths = {"train": path, "val": val_path, "test": test_path}
        self.shuffle, self.seed, self.skip_corrupt = shuffle, seed, skip_corrupt
        self.cache_dir, self.storage_options, self.timeout_s = cache_dir, storage_options, timeout_s
        self.stream_drop_last = stream_drop_last
        self.manifest = read_manifest(path, storage_options, timeout_s)
        if num_classes is not None and num_classes != self.manifest["num_classes"]:
            raise ValueError(
                f"num_classes={num_classes} but the shards at {path} have "
                f"{self.manifest['num_classes']} classes"
            )
        self.classes = self.manifest.get("classes")
        self._loaders: dict[str, Any] = {}
        self._pending_state: Optional[dict] = None

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return int(self.manifest["num_classes"])

    def _dataset(self, role: str):
        from litdata import StreamingDataset

        path = self.paths[role]
        if role != "train":
            other = read_manifest(path, self.storage_options, self.timeout_s)
            if other["num_classes"] != self.num_classes:
                raise ValueError(
                    f"{role} shards {path} have {other['num_classes']} classes, the train "
                    f"shards {self.paths['train']} have {self.num_classes}"
                )
        train = role == "train"
        pipeline = self.build_train_transform() if train else self.build_eval_transform()
        kwargs = {} if self.cache_dir is None else {"cache_dir": self.cache_dir}
        return StreamingDataset(
            str(path),
            shuffle=self.shuffle and train,
            seed=self.seed,
            drop_last=self.stream_drop_last if train else False,
            storage_options=self.storage_options,
            transform=DecodeItem(
                pipeline,
                f"shards {path}",
                self.num_classes,
                self.skip_corrupt,
                self.seed,
                self._rank(),
            ),
            **kwargs,
        )

    def _setup_datasets(self, stage: Optional[str]) -> None:
        for role in ("train", "val", "test"):
            if self.paths[role] is not None and getattr(self, f"{role}_set") is None:
                setattr(self, f"{role}_set", self._dataset(role))

    def _loader(self, dataset, split: str, train: bool):
        if dataset is None:
            return super()._loader(dataset, split, train)
        if split in self._loaders:  # one loader per split: its state_dict is the epoch's progress
            return self._loaders[split]
        loader = _shard_loader_class()(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pins_memory,
            collate_fn=collate_skipping,
            drop_last=train and self.drop_last,
            persistent_workers=False,
            # the workers' base seed: not from the global RNG (the router noise draws there)
            generator=torch.Generator().manual_seed(self.seed),
            multiprocessing_context=worker_context(self.num_workers),
        )
        if train:
            world = int(dataset.distributed_env.world_size)
            if world > 1:  # every rank the same number of images, so the same number of batches
                loader.images_per_rank = int(self.manifest["num_images"]) // world
        if train and self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._loaders[split] = loader
        return loader

    def val_dataloader(self):
        return [] if self.val_set is None else super().val_dataloader()

    # Lightning saves these with every checkpoint and restores them (``--ckpt_path``) before it
    # asks for the loaders: the training stream's position in its epoch. (Lightning's fit loop
    # also stores the loader's state_dict, but reloads it only in some restarts.)
    def state_dict(self) -> dict:
        loader = self._loaders.get("train")
        if loader is None:
            return {}
        return {"train_loader": loader.state_dict(), "shards": shard_identity(self.manifest)}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        check_resume_shards(state_dict.get("shards"), self.manifest, self.paths["train"])
        if "train" in self._loaders:
            self._loaders["train"].load_state_dict(state)
        else:
            self._pending_state = state

    def __repr__(self) -> str:
        return (
            f"ShardDataModule(path={self.paths['train']!r}, num_classes={self.num_classes}, "
            f"num_images={self.manifest['num_images']}, img_size={self.img_size})"
        )


_SHARD_LOADER = None


def _collated(batch) -> bool:
    return isinstance(batch, (tuple, list)) and bool(batch) and isinstance(batch[0], torch.Tensor)


def _size(batch) -> int:
    """Samples in a batch: collated ``[images [B, ...], labels [B]]`` or a list of samples."""
    return len(batch[0]) if _collated(batch) else len(batch)


def _head(batch, n: int):
    """The first ``n`` samples of a batch."""
    return type(batch)(part[:n] for part in batch) if _collated(batch) else batch[:n]


def _cat(batches: list):
    if _collated(batches[0]):
        return type(batches[0])(torch.cat(parts) for parts in zip(*batches))
    return [sample for b in batches for sample in b]


def _shard_loader_class():
    """``TrainedPositionLoader``, made on first use (litdata is imported lazily)."""
    global _SHARD_LOADER
    if _SHARD_LOADER is not None:
        return _SHARD_LOADER
    from litdata import StreamingDataLoader, StreamingDataset

    class TrainedPositionLoader(StreamingDataLoader):
        """litdata's loader whose ``state_dict`` counts the batches *trained* this epoch once
        ``batch_trained`` is called after each step (``vmoe.train.ResumableTraining`` does):
        litdata counts those it has handed out, and Lightning fetches one batch ahead, so a
        checkpoint written on an exception mid-step would skip the batch in flight."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained, self._counting, self._restored_pass = 0, False, False
            self.images_per_rank: Optional[int] = None  # set under DDP (training)

        def _epoch_images(self) -> Optional[int]:
            n = self.images_per_rank
            if n is None:
                return None
            return n - n % int(self.batch_size) if self.drop_last else n

        def __len__(self) -> int:
            n = self._epoch_images()
            return super().__len__() if n is None else -(-n // int(self.batch_size))

        def __iter__(self):
            # litdata clears ``restore`` only when a restored pass runs to its StopIteration;
            # Lightning ends an epoch by its batch count, so the next epoch would replay the
            # restored position (an empty epoch, or the same order again): a second pass is a
            # new epoch.
            if self.restore and self._restored_pass:
                self.restore = False
            self._restored_pass = self.restore
            if not self.restore:  # a new epoch (a restored one keeps its count)
                self.trained = 0
            total = self._epoch_images()
            if total is None:
                yield from super().__iter__()
                return
            # litdata splits by chunks: ranks may get unequal counts. Each yields exactly
            # ``total``: the images beyond it are left out, a rank short of it repeats its
            # first ones (at most batch_size of them).
            remaining, first = total - self.trained * int(self.batch_size), []
            for batch in super().__iter__():
                if remaining <= 0:
                    break
                n = _size(batch)
                if n > remaining:
                    batch, n = _head(batch, remaining), remaining
                if sum(_size(b) for b in first) < int(self.batch_size):
                    first.append(batch)
                remaining -= n
                yield batch
            while remaining > 0 and first:
                pad = _head(_cat(first), min(remaining, int(self.batch_size)))
                remaining -= _size(pad)
                yield pad

        def batch_trained(self) -> None:
            self._counting = True
            self.trained += 1

        def state_dict(self) -> dict:
            state = super().state_dict()
            if self._counting and isinstance(self.dataset, StreamingDataset):
                n = self.trained * int(self.batch_size)
                state["num_samples_yielded"] = n
                state["latest_worker_idx"] = max(0, self.trained - 1) % max(1, self.num_workers)
                state["dataset"] = self.dataset.state_dict(n, self.num_workers, self.batch_size)
            return state

        def load_state_dict(self, obj: dict) -> None:
            super().load_state_dict(obj)
            self.trained = int(obj.get("num_samples_yielded", 0)) // int(self.batch_size)
            self._counting, self._restored_pass = True, False

    _SHARD_LOADER = TrainedPositionLoader
    return _SHARD_LOADER


def iter_keys(loader: Iterable) -> list:
    """Helper for tests and benchmarks: every label in a loader's batches, in order."""
    return [int(y) for _, ys in loader for y in ys]
