"""The common base of the image-classification data modules: loaders, transforms, checks.

A subclass sets ``num_classes`` (an attribute or property, readable right after construction so
that LightningCLI can link it to the model) and implements ``_setup_datasets(stage)``, which
fills ``train_set`` / ``val_set`` / ``test_set`` using ``build_train_transform()`` and
``build_eval_transform()``. ``predict`` uses ``predict_set`` when a subclass sets it (e.g.
unlabeled images), else the test set.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import albumentations as A
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vmoe.data.datasets import seed_worker, worker_context
from vmoe.data.transforms import (
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    EvalTransformConfig,
    TrainTransformConfig,
    build_eval_transform,
    build_train_transform,
    normalize_uint8,
)

DEFAULT_MEAN = (0.5, 0.5, 0.5)  # inception-style [-1, 1] inputs, as V-MoE and timm's augreg ViTs
DEFAULT_STD = (0.5, 0.5, 0.5)


class VisionDataModule(L.LightningDataModule):
    """Base class. Args common to all data modules:

    Args:
        img_size: side of the square images the model sees.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test/predict batch size (default: batch_size).
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin host memory (speeds up host->GPU copies).
        drop_last: drop the last incomplete training batch.
        mean: per-channel normalization mean on the [0, 1] scale (default 0.5: inputs in [-1, 1]).
        std: per-channel normalization std (default 0.5).
        train_transform: training augmentation (None: the data module's default).
        eval_transform: evaluation preprocessing (None: the data module's default).
        normalize_on_device: training batches leave the loader workers as uint8
            [B, C, H, W] (4x fewer bytes between processes, no float work per image in the
            workers) and are normalized with ``mean``/``std`` after the transfer to the device,
            in this data module's ``on_after_batch_transfer`` (so only under a Trainer given
            this data module). Same float batches at the training step, within 1e-6. Evaluation
            batches stay float32.
    """

    num_classes: int

    def __init__(
        self,
        img_size: int,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        train_transform: Optional[TrainTransformConfig] = None,
        eval_transform: Optional[EvalTransformConfig] = None,
        normalize_on_device: bool = False,
    ):
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if eval_batch_size is not None and (
            not isinstance(eval_batch_size, int) or eval_batch_size < 1
        ):
            raise ValueError(f"eval_batch_size={eval_batch_size!r} must be a positive int or None")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0")
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        if not isinstance(normalize_on_device, bool):
            raise TypeError(f"normalize_on_device={normalize_on_device!r} must be a bool")
        self.normalize_on_device = normalize_on_device
        self.mean = tuple(DEFAULT_MEAN if mean is None else mean)
        self.std = tuple(DEFAULT_STD if std is None else std)
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean={self.mean} and std={self.std} must have the same length (channels)"
            )
        for name, value, kind in (
            ("train_transform", train_transform, TrainTransformConfig),
            ("eval_transform", eval_transform, EvalTransformConfig),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"{name} must be a {kind.__name__} or None, got {type(value).__name__}"
                )
        # Resolved configs (no None left): the user's fields over this data module's defaults
        # over the generic ones, so a partial YAML keeps e.g. the digits' "no flip".
        self.train_transform = (train_transform or TrainTransformConfig()).merged_over(
            self.default_train_transform().merged_over(DEFAULT_TRAIN)
        )
        self.eval_transform = (eval_transform or EvalTransformConfig()).merged_over(
            self.default_eval_transform().merged_over(DEFAULT_EVAL)
        )
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.predict_set: Optional[Dataset] = None

    # --- defaults a subclass may override ---
    def default_train_transform(self) -> TrainTransformConfig:
        """This data module's augmentation defaults (None fields: ``DEFAULT_TRAIN``)."""
        return TrainTransformConfig()

    def default_eval_transform(self) -> EvalTransformConfig:
        """This data module's eval defaults (None fields: ``DEFAULT_EVAL``)."""
        return EvalTransformConfig()

    @property
    def channels(self) -> int:
        return len(self.mean)

    # --- pipelines ---
    def build_train_transform(self, seed: Optional[int] = None) -> A.Compose:
        """Training pipeline; by default seeded from torch's RNG so ``seed_everything`` fixes it."""
        if seed is None:
            seed = (int(torch.randint(0, 2**31 - 1, ()).item()) + 1_000_003 * self._rank()) % 2**32
        return build_train_transform(
            self.img_size,
            self.train_transform,
            self.mean,
            self.std,
            seed=seed,
            normalize=not self.normalize_on_device,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning hook, on the device: uint8 images (``normalize_on_device``) -> float32
        [B, C, H, W] normalized with ``mean``/``std``; float batches pass unchanged."""
        if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
            if batch[0].dtype == torch.uint8:
                return type(batch)([normalize_uint8(batch[0], self.mean, self.std), *batch[1:]])
        elif torch.is_tensor(batch) and batch.dtype == torch.uint8:
            return normalize_uint8(batch, self.mean, self.std)
        return batch

    def _rank(self) -> int:
        """Global rank under a Trainer (0 otherwise): DDP processes share the seed but should
        not draw the same augmentations."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def build_eval_transform(self) -> A.Compose:
        return build_eval_transform(self.img_size, self.eval_transform, self.mean, self.std)

    # --- Lightning hooks ---
    def setup(self, stage: Optional[str] = None) -> None:
        self._setup_datasets(stage)

    def _setup_datasets(self, stage: Optional[str]) -> None:
        raise NotImplementedError

    @property
    def pins_memory(self) -> bool:
        """``pin_memory`` where it takes effect: with an accelerator (torch ignores it, with a
        warning, on a machine without one)."""
        available = getattr(torch, "accelerator", None)
        found = available.is_available() if available else torch.cuda.is_available()
        return bool(self.pin_memory and found)

    def _loader(self, dataset: Optional[Dataset], split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}: no {split} set; call setup() with the right stage first "
                "(Lightning's Trainer does this)"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pins_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=partial(seed_worker, rank=self._rank())
            if self.num_workers > 0
            else None,
            multiprocessing_context=worker_context(self.num_workers),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        # an empty validation split (val_fraction 0): no loaders, so Lightning skips validation
        empty = (
            self.val_set is not None and hasattr(self.val_set, "__len__") and not len(self.val_set)
        )
        return [] if empty else self._loader(self.val_set, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is not None:
            return self._loader(self.predict_set, "predict", train=False)
        return self._loader(self.test_set, "test (used for predict)", train=False)

    def __repr__(self) -> str:
        sizes = {
            k: (len(v) if v is not None else None)
            for k, v in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))
        }
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, img_size={self.img_size}, "
            f"batch_size={self.batch_size}, sizes={sizes})"
        )
