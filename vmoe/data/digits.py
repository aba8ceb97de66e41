"""scikit-learn's handwritten digits (1,797 real 8x8 greyscale images, 10 classes), no download.

The images ship inside scikit-learn. They are kept at 8x8 (uint8, 0..16 scaled to 0..255) and
the pipelines upscale them to ``img_size``. The train/val/test split is stratified and fixed by
``split_seed``, independent of the training seed, so every run evaluates on the same images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from sklearn.datasets import load_digits

from vmoe.data.base import VisionDataModule
from vmoe.data.datasets import ArrayDataset, stratified_split
from vmoe.data.randaugment import GEOMETRIC_OPS
from vmoe.data.transforms import TrainTransformConfig


def load_digits_uint8(channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """All digits: images uint8 [1797, 8, 8, channels], labels int64 [1797]."""
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return np.repeat(images, channels, axis=3), bunch.target.astype(np.int64)


class DigitsDataModule(VisionDataModule):
    """8x8 handwritten digits upscaled to ``img_size``; 80/10/10 stratified split by default.

    Args (besides those of ``VisionDataModule``, passed on as ``**kwargs``):
        channels: 3 (grey replicated to RGB, for models with in_chans=3) or 1.
        val_fraction, test_fraction: fractions of the 1,797 images held out.
        split_seed: fixes the split (not the augmentation).
    The default augmentation suits digits: a mild crop, no flip (a flipped 2 is not a 2) and
    one geometric RandAugment op.
    """

    num_classes = 10

    def __init__(
        self,
        img_size: int = 16,
        channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        **kwargs,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 1 or 3")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves too little "
                "to train on"
            )
        mean = (0.5,) * channels if mean is None else mean
        std = (0.5,) * channels if std is None else std
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean={tuple(mean)} and std={tuple(std)} need {channels} entries "
                f"(channels={channels})"
            )
        super().__init__(img_size=img_size, batch_size=batch_size, mean=mean, std=std, **kwargs)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.classes = [str(d) for d in range(10)]

    def default_train_transform(self) -> TrainTransformConfig:
        return TrainTransformConfig(
            scale=(0.75, 1.0),
            ratio=(0.85, 1.18),
            hflip_prob=0.0,
            randaugment_num_ops=1,
            randaugment_magnitude=5.0,
            randaugment_ops=list(GEOMETRIC_OPS),
            fill=0,
        )

    def split_indices(
        self, labels: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) indices into ``load_digits()``: the split ``setup`` uses."""
        if labels is None:
            _, labels = load_digits_uint8(channels=1)
        return stratified_split(labels, self.val_fraction, self.test_fraction, self.split_seed)

    def _setup_datasets(self, stage: Optional[str]) -> None:
        if self.train_set is not None:  # already set up (setup runs once per stage)
            return
        images, labels = load_digits_uint8(self.channels)
        train, val, test = self.split_indices(labels)
        self.indices = {"train": train, "val": val, "test": test}  # of the sets built here
        eval_tf = self.build_eval_transform()
        self.train_set = ArrayDataset(images[train], labels[train], self.build_train_transform())
        self.val_set = ArrayDataset(images[val], labels[val], eval_tf)
        self.test_set = ArrayDataset(images[test], labels[test], eval_tf)
