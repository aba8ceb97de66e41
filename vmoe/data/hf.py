"""Hugging Face ``datasets`` as a data module: a hub name, a local ``save_to_disk`` folder, a
folder of Parquet files or an ``imagefolder`` tree, map-style or streaming.

Images are read undecoded (``datasets.Image(decode=False)``: the encoded bytes or a file path)
and decoded once by ``vmoe.data.load_image`` (grey/RGBA/CMYK/16-bit, EXIF orientation),
then go through the same albumentations pipelines as every vmoe data module. Items are
``(image float32 [C, H, W], label int)``.

Problems name what is at fault: a label column not among the columns (listed), a label out of
``[0, num_classes)`` (the row), an undecodable image (the row; or dropped and counted in one
warning with ``skip_corrupt=True``), and a hub name that is neither cached nor reachable
(one line saying what to download and where ``HF_DATASETS_CACHE`` should point).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import (
    CorruptImageError,
    _TransformDataset,
    load_image,
    stratified_split,
    worker_context,
)

__all__ = [
    "HFDataModule",
    "HFImageDataset",
    "HFIterableImageDataset",
    "load_hf_dataset",
    "image_bytes",
    "stream_length",
]

# the names datasets uses for the three roles, first match wins
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


def _offline_message(path: str, err: BaseException) -> str:
    cache = os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface/datasets"
    why = (
        "offline"
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        else type(err).__name__
    )
    return (
        f"Hugging Face dataset {path!r} is neither a local folder nor in the cache {cache} "
        f"({why}): "
        f"run datasets.load_dataset({path!r}) once online and set HF_DATASETS_CACHE to that cache, "
        "or pass a save_to_disk/Parquet/imagefolder folder"
    )


def load_hf_dataset(path: str, name: Optional[str] = None, streaming: bool = False):
    """``datasets.DatasetDict`` / ``IterableDatasetDict`` for ``path``: a ``save_to_disk``
    folder (``load_from_disk``), a ``.parquet`` file or folder of them, an ``imagefolder`` tree
    or any other folder ``load_dataset`` understands, else a hub name."""
    import datasets

    local = Path(path).expanduser()
    if local.exists():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = _load_from_disk(local)
            if streaming:
                streams = {}
                for k, v in _as_dict(ds).items():
                    streams[k] = v.to_iterable_dataset()
                    streams[k]._vmoe_num_rows = len(v)  # read by stream_length
                return streams
            return _as_dict(ds)
        if local.is_file() and local.suffix == ".parquet":
            return _as_dict(
                datasets.load_dataset(
                    "parquet", data_files={"train": str(local)}, streaming=streaming
                )
            )
        return _as_dict(datasets.load_dataset(str(local), name, streaming=streaming))
    try:
        return _as_dict(datasets.load_dataset(path, name, streaming=streaming))
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise FileNotFoundError(_offline_message(path, err)) from err
    except Exception as err:  # DatasetNotFoundError etc. (not all are OSErrors)
        if type(err).__name__ in (
            "DatasetNotFoundError",
            "HFValidationError",
            "LocalEntryNotFoundError",
            "OfflineModeIsEnabled",
            "EmptyDatasetError",
        ):
            raise FileNotFoundError(_offline_message(path, err)) from err
        raise


def _damaged_file(folder: Path) -> Optional[str]:
    """The first file of a ``save_to_disk`` folder that does not read: a JSON file that does
    not parse, an ``.arrow`` file that is not a whole Arrow stream; None when all read."""
    import json

    import pyarrow as pa

    for file in sorted(folder.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            return f"{file} is not valid JSON ({err})"
    for file in sorted(folder.rglob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as err:
            return f"{file} is not a whole Arrow file ({' '.join(str(err).split())})"
    return None


def _load_from_disk(folder: Path):
    """``datasets.load_from_disk``; a damaged folder is a ValueError naming the file at fault."""
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as err:
        damaged = _damaged_file(folder)
        if damaged is None and not isinstance(err, (ValueError, OSError)):
            raise
        raise ValueError(
            f"{damaged or f'cannot read {folder}: {type(err).__name__}: {err}'}: the "
            f"save_to_disk folder {folder} is damaged; save the dataset again"
        ) from err


def integer_labels(values: Any, where: str) -> np.ndarray:
    """int64 [N] class indices of a label column's ``values``; a ValueError naming ``where``
    and the first bad row for strings, fractional or non-finite floats, or missing values
    (whole-number floats such as 3.0 are accepted)."""
    labels = np.asarray(values)
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if not len(bad):
            return labels.astype(np.int64)
        row, kind = int(bad[0]), "fractional"
    else:
        row, kind = 0, "non-integer"
    raise ValueError(
        f"{where} holds {kind} labels (row {row}: {labels.ravel()[row].item()!r}), not class "
        "indices 0..N-1 (datasets' class_encode_column makes them)"
    )


def _as_dict(ds) -> dict:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dict(ds)
    return {"train": ds}


def image_bytes(value: Any, where: str) -> tuple[str, Optional[bytes]]:
    """(name, encoded bytes or None to read the file) of an undecoded ``datasets.Image`` value
    ``{"bytes": ..., "path": ...}`` (or raw bytes / a path string)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise CorruptImageError(f"{where}: the image is empty (no bytes, no path)")
        return (path or where), data
    if isinstance(value, (bytes, bytearray, memoryview)):
        return where, bytes(value)
    if isinstance(value, str):
        return value, None
    raise CorruptImageError(
        f"{where}: the image column holds a {type(value).__name__}, not an encoded image"
    )


def decode_row(value: Any, where: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of one undecoded image value; CorruptImageError naming ``where``."""
    name, data = image_bytes(value, where)
    try:
        return load_image(name, data)
    except CorruptImageError as err:
        raise CorruptImageError(f"{where}: {err}") from None


def _readable(value: Any) -> bool:
    try:
        decode_row(value, "")
    except CorruptImageError:
        return False
    return True


class HFImageDataset(_TransformDataset):
    """Rows ``indices`` of a map-style ``datasets.Dataset`` whose ``image_column`` is undecoded;
    ``labels`` [len(indices)] int64 (checked by the data module)."""

    def __init__(
        self,
        table,
        indices: np.ndarray,
        labels: np.ndarray,
        image_column: str,
        name: str,
        transform=None,
    ):
        super().__init__(transform)
        self.table, self.image_column, self.name = table, image_column, name
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def where(self, i: int) -> str:
        return f"row {int(self.indices[i])} of {self.name}"

    def __getitem__(self, i: int):
        where = self.where(i)
        value = self.table[int(self.indices[i])][self.image_column]
        try:
            image = self._apply(decode_row(value, where))
        except CorruptImageError:
            raise
        except Exception as err:
            raise CorruptImageError(
                f"{where}: cannot use the image: {type(err).__name__}: {err}"
            ) from err
        return image, int(self.labels[i])


def stream_length(table) -> Optional[int]:
    """The row count of a streamed split when it is known: a ``save_to_disk`` folder read as
    a stream (``load_hf_dataset`` records it) or the split's metadata (``info.splits``)."""
    known = getattr(table, "_vmoe_num_rows", None)
    if known is not None:
        return int(known)
    splits = getattr(getattr(table, "info", None), "splits", None)
    name = str(getattr(table, "split", None) or "")
    try:
        n = splits[name].num_examples if splits and name in splits else None
    except (KeyError, AttributeError, TypeError):
        n = None
    return int(n) if n else None


class HFIterableImageDataset(IterableDataset):
    """A streaming ``datasets.IterableDataset`` split over DDP ranks and loader workers; items
    as the map-style one, ``(image float32 [C, H, W], label)``.

    The order of an epoch is the dataset's (shuffled with a buffer of ``shuffle_buffer`` rows,
    seeded by ``seed`` and the epoch: ``set_epoch`` re-draws it). Row ``i`` of that order goes
    to rank ``i % world_size``; with a known row count ``num_rows`` every rank keeps the same
    number, ``num_rows // world_size`` (the remainder, fewer than ``world_size`` rows, is left
    out that epoch), and ``len()`` is that number. A rank's rows form batches of
    ``batch_size``; loader worker ``w`` of ``W`` makes batches ``w, w + W, ...``, so the loader
    yields the same batches in the same order for any number of workers. Every worker reads the
    whole stream and keeps its part (images are decoded only for its own rows). The
    augmentation is reseeded at each batch from ``(seed, epoch, rank, batch)``: a resumed or
    re-run epoch draws the same augmentations. ``skip_batches`` leaves out the first batches of
    the next pass (a resumed epoch; ``vmoe.train.ResumableStream`` sets it). With
    ``skip_corrupt`` an unreadable image is yielded as None, which ``collate_skipping`` drops
    (the batch boundaries stay where they were)."""

    def __init__(
        self,
        table,
        image_column: str,
        label_column: str,
        num_classes: int,
        name: str,
        transform=None,
        skip_corrupt: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 0,
        num_rows: Optional[int] = None,
        batch_size: int = 1,
    ):
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.num_classes, self.name, self.transform = num_classes, name, transform
        self.skip_corrupt, self.seed, self.shuffle_buffer = skip_corrupt, seed, shuffle_buffer
        self.num_rows, self.batch_size = num_rows, batch_size
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.skip_batches = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Rows of this rank in an epoch (TypeError when the stream's length is unknown)."""
        if self.num_rows is None:
            raise TypeError(f"the stream {self.name} has no known length")
        return self.num_rows // self.world_size

    def _rows(self) -> Iterator[tuple[int, dict]]:
        """(index in the epoch's order, row): the whole stream, also inside a loader worker
        (``datasets`` would give a worker only some of its shards)."""
        table = self.table
        if self.shuffle_buffer:
            table = table.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            table.set_epoch(self.epoch)
        n = 0
        for batch in table.iter(batch_size=64):
            columns = list(batch)
            for k in range(len(batch[columns[0]]) if columns else 0):
                yield n, {c: batch[c][k] for c in columns}
                n += 1

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_rank = None if self.num_rows is None else len(self)
        skip, self.skip_batches = self.skip_batches, 0
        batch_size, world = self.batch_size, self.world_size
        for i, row in self._rows():
            if i % world != self.rank:
                continue
            j = i // world  # index among this rank's rows
            if per_rank is not None and j >= per_rank:
                break
            block = j // batch_size
            if block < skip or block % workers != worker:
                continue
            if j % batch_size == 0 and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(
                    (self.seed + 7919 * self.epoch + 1_000_003 * self.rank + 104_729 * block)
                    % 2**32
                )
            yield self._item(row, f"streamed row {i} (rank {self.rank}) of {self.name}")

    def _item(self, row: dict, where: str):
        label = row[self.label_column]
        if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < self.num_classes:
            raise ValueError(
                f"{where}: label {label!r} is not in [0, {self.num_classes}) "
                f"(column {self.label_column!r})"
            )
        try:
            image = decode_row(row[self.image_column], where)
            if self.transform is not None:
                image = self.transform(image=image)["image"]
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            warnings.warn(
                f"HFDataModule skipped an unreadable image (skip_corrupt=True, "
                f"{self.skipped} so far in this process): {err}",
                stacklevel=2,
            )
            return None
        return image, int(label)


class HFDataModule(VisionDataModule):
    """A Hugging Face dataset. ``vmoe fit --data vmoe.data.HFDataModule --data.path DIR_OR_NAME``.

    Args (besides those of ``VisionDataModule``):
        path: a ``save_to_disk`` folder, a ``.parquet`` file or folder of them, an
            ``imagefolder`` tree, or a hub name (``user/dataset``; needs the cache offline).
        name: the hub configuration name, if any.
        image_column, label_column: the columns with the images and the integer labels.
        train_split, val_split, test_split: the dataset's split names for the three roles;
            None -> the usual names (``validation``/``val``/``valid``/``dev`` for val). With
            no validation split, ``val_fraction`` of train is held out (stratified, ``seed``;
            None: 0.1 map-style; a stream cannot hold rows out: None means 0 there, and a
            positive value without a validation split is refused).
        num_classes: default: the label column's ``ClassLabel`` size, else max label + 1.
        streaming: read as ``IterableDataset`` (``HFIterableImageDataset``: no held-out split;
            rows split over ranks, equal counts when the row count is known, and over
            workers by whole batches; reshuffled and reseeded every epoch).
        shuffle_buffer: streaming: shuffle-buffer size (0: no shuffle).
        skip_corrupt: map-style: decode every image once at setup and drop unreadable rows
            with one warning that counts them; streaming: skip them as met, counted.
    """

    def __init__(
        self,
        path: str,
        name: Optional[str] = None,
        image_column: str = "image",
        label_column: str = "label",
        img_size: int = 224,
        train_split: Optional[str] = None,
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: Optional[float] = None,
        num_classes: Optional[int] = None,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        skip_corrupt: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(img_size=img_size, **kwargs)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
        if val_fraction is not None and not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
        if val_fraction is None:
            val_fraction = 0.0 if streaming else 0.1
        self.path, self.name, self.streaming = path, name, streaming
        self.image_column, self.label_column = image_column, label_column
        self.split_args = {"train": train_split, "val": val_split, "test": test_split}
        self.val_fraction, self.seed = val_fraction, seed
        self.shuffle_buffer, self.skip_corrupt = shuffle_buffer, skip_corrupt
        self._num_classes_arg = num_classes
        self._tables: Optional[dict] = None
        self._splits: Optional[dict] = None
        self._num_classes: Optional[int] = None
        self.classes: Optional[list[str]] = None
        self.skipped: list[str] = []

    # --- the dataset, read once ---
    def _load(self) -> None:
        if self._tables is not None:
            return
        import datasets

        tables = load_hf_dataset(self.path, self.name, self.streaming)
        splits: dict[str, Optional[str]] = {}
        for role, given in self.split_args.items():
            if given is not None and given not in tables:
                raise ValueError(
                    f"{role}_split={given!r} is not a split of {self.path!r}: {sorted(tables)}"
                )
            splits[role] = given or next((n for n in SPLIT_NAMES[role] if n in tables), None)
        if splits["train"] is None:
            raise ValueError(
                f"{self.path!r} has no train split (splits: {sorted(tables)}); "
                "name one with train_split"
            )
        if self.streaming and splits["val"] is None and self.val_fraction > 0:
            raise ValueError(
                f"val_fraction={self.val_fraction:g} cannot hold out rows of the streamed "
                f"{self.path!r} (it has no validation split: {sorted(tables)}): name one with "
                "val_split, pass val_fraction 0 (no validation), or streaming false"
            )
        for split in {s for s in splits.values() if s is not None}:
            table = tables[split]
            features = table.features
            columns = list(features) if features is not None else None
            for role, column in (
                ("image_column", self.image_column),
                ("label_column", self.label_column),
            ):
                if columns is not None and column not in columns:
                    raise ValueError(
                        f"{role}={column!r} is not a column of split {split!r} of "
                        f"{self.path!r}; its columns: {columns}"
                    )
            if columns is not None and isinstance(features[self.image_column], datasets.Image):
                tables[split] = table.cast_column(self.image_column, datasets.Image(decode=False))
                if getattr(table, "_vmoe_num_rows", None) is not None:  # a new object: keep it
                    tables[split]._vmoe_num_rows = table._vmoe_num_rows
        train = tables[splits["train"]]
        feature = train.features[self.label_column] if train.features is not None else None
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
            found = feature.num_classes
        elif self.streaming:
            found = None
        else:
            found = int(np.max(self._labels_of(train, splits["train"]))) + 1
        if self._num_classes_arg is not None:
            if (
                feature is not None
                and isinstance(feature, datasets.ClassLabel)
                and found != self._num_classes_arg
            ):
                raise ValueError(
                    f"num_classes={self._num_classes_arg} but the label column "
                    f"{self.label_column!r} of {self.path!r} has {found} classes: {self.classes}"
                )
            found = self._num_classes_arg
        if found is None:
            raise ValueError(
                f"the label column {self.label_column!r} of streamed {self.path!r} is not a "
                "ClassLabel: pass num_classes"
            )
        self._tables, self._splits, self._num_classes = tables, splits, found

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        self._load()
        return self._num_classes

    def _labels_of(self, table, split: str) -> np.ndarray:
        return integer_labels(
            table[self.label_column],
            f"label column {self.label_column!r} of split {split!r} of {self.path!r}",
        )

    def _labels(self, split: str) -> np.ndarray:
        labels = self._labels_of(self._tables[split], split)
        bad = np.flatnonzero((labels < 0) | (labels >= self._num_classes))
        if len(bad):
            raise ValueError(
                f"row {int(bad[0])} of split {split!r} of {self.path!r}: label "
                f"{int(labels[bad[0]])} "
                f"is not in [0, {self._num_classes}) (column {self.label_column!r}; "
                f"{len(bad)} such row(s))"
            )
        return labels.astype(np.int64)

    def _map_sets(self) -> dict[str, Optional[HFImageDataset]]:
        out: dict[str, Optional[HFImageDataset]] = {}
        train_name = self._splits["train"]
        train_labels = self._labels(train_name)
        if self._splits["val"] is None and self.val_fraction > 0:
            tr, va, _ = stratified_split(train_labels, self.val_fraction, 0.0, self.seed)
            parts = {"train": (train_name, tr), "val": (train_name, va)}
            self.val_source = f"held-out {self.val_fraction:.0%} of split {train_name!r}"
        else:
            parts = {"train": (train_name, np.arange(len(train_labels)))}
            if self._splits["val"] is not None:
                parts["val"] = (self._splits["val"], None)
        if self._splits["test"] is not None:
            parts["test"] = (self._splits["test"], None)
        for role in ("train", "val", "test"):
            if role not in parts:
                out[role] = None
                continue
            split, index = parts[role]
            labels = train_labels if split == train_name else self._labels(split)
            index = np.arange(len(labels)) if index is None else index
            transform = (
                self.build_train_transform() if role == "train" else self.build_eval_transform()
            )
            out[role] = HFImageDataset(
                self._tables[split],
                index,
                labels[index],
                self.image_column,
                f"split {split!r} of {self.path!r}",
                transform,
            )
        return out

    def _setup_datasets(self, stage: Optional[str]) -> None:
        if self.train_set is not None or self.test_set is not None:
            return
        self._load()
        if self.streaming:
            trainer = getattr(self, "trainer", None)
            for role in ("train", "val", "test"):
                split = self._splits[role]
                if split is None:
                    continue
                ds = HFIterableImageDataset(
                    self._tables[split],
                    self.image_column,
                    self.label_column,
                    self._num_classes,
                    f"split {split!r} of {self.path!r}",
                    self.build_train_transform()
                    if role == "train"
                    else self.build_eval_transform(),
                    self.skip_corrupt,
                    self.seed,
                    self.shuffle_buffer if role == "train" else 0,
                    num_rows=stream_length(self._tables[split]),
                    batch_size=self.batch_size if role == "train" else self.eval_batch_size,
                )
                if trainer is not None:
                    ds.rank, ds.world_size = int(trainer.global_rank), int(trainer.world_size)
                if ds.world_size > 1 and ds.num_rows is None:
                    raise ValueError(
                        f"streaming {self.path!r} over {ds.world_size} processes needs its row "
                        "count (equal batches on every rank), which the split's metadata does not "
                        "give: use a save_to_disk folder, or streaming=False"
                    )
                setattr(self, f"{role}_set", ds)
            return
        sets = self._map_sets()
        for role, ds in sets.items():
            setattr(self, f"{role}_set", ds)
        if self.skip_corrupt:
            self._drop_unreadable([d for d in sets.values() if d is not None])

    def _drop_unreadable(self, sets: list[HFImageDataset]) -> None:
        """Decode every image once (threads); one warning in total."""
        bad: list[str] = []
        total = sum(len(d) for d in sets)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for d in sets:
                values = (d.table[int(i)][d.image_column] for i in d.indices)
                ok = np.array(list(pool.map(_readable, values)), dtype=bool)
                bad += [d.where(i) for i in np.flatnonzero(~ok)]
                d.indices, d.labels = d.indices[ok], d.labels[ok]
        if bad:
            self.skipped += bad
            shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            warnings.warn(
                f"HFDataModule skipped {len(bad)} unreadable image(s) of {total} "
                f"(skip_corrupt=True): {shown}",
                stacklevel=2,
            )

    def _loader(self, dataset, split: str, train: bool):
        if isinstance(dataset, IterableDataset):
            from torch.utils.data import DataLoader

            from vmoe.data.shards import collate_skipping

            dataset.batch_size = self.batch_size if train else self.eval_batch_size
            loader = DataLoader(
                dataset,
                batch_size=dataset.batch_size,
                drop_last=train and self.drop_last,
                num_workers=self.num_workers,
                pin_memory=self.pins_memory,
                collate_fn=collate_skipping,
                # the workers' base seed: not from the global RNG (the router noise draws there)
                generator=torch.Generator().manual_seed(self.seed),
                multiprocessing_context=worker_context(self.num_workers),
            )
            # Lightning calls set_epoch on a loader's sampler only: without ResumableTraining
            # (which sets the epoch itself, from trainer.current_epoch) the stream still
            # reshuffles every epoch through this one.
            loader.sampler.set_epoch = dataset.set_epoch
            return loader
        return super()._loader(dataset, split, train)

    def val_dataloader(self):
        return [] if self.val_set is None else super().val_dataloader()

    def __repr__(self) -> str:
        if self.streaming:
            return f"HFDataModule(path={self.path!r}, streaming=True, img_size={self.img_size})"
        return super().__repr__()
