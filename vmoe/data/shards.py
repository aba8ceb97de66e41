"""Reading streaming shards on litdata: ``ShardDataModule`` reads a shard folder (written by
``write_shards``, ``vmoe make-shards``; format in ``vmoe.data.shard_format``) from a local
folder or a URL (``s3://``, ``gs://``, ...). The writer's and the format's public names are
re-exported here.

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

import os
import warnings
from typing import Any, Iterable, Optional

import torch

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import CorruptImageError, load_image, worker_context
from vmoe.data.shard_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    check_chunks,
    check_resume_shards,
    read_manifest,
    shard_identity,
)
from vmoe.data.shard_writer import parse_chunk_bytes, write_shards

__all__ = [
    "MANIFEST",
    "FORMAT",
    "FORMAT_VERSION",
    "ShardDataModule",
    "write_shards",
    "read_manifest",
    "parse_chunk_bytes",
    "check_chunks",
    "shard_identity",
    "check_resume_shards",
]


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
