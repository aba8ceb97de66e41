"""vmoe.data: LightningDataModules and albumentations pipelines for image classification.

LightningCLI instantiates the classes directly, e.g.
``data: {class_path: vmoe.data.DigitsDataModule, init_args: {img_size: 16}}``;
``build_datamodule("digits", img_size=16)`` does the same from code.
"""

from __future__ import annotations

from typing import Any

from vmoe.data.base import VisionDataModule
from vmoe.data.cifar import CIFAR10DataModule, CIFAR100DataModule, read_cifar_binary
from vmoe.data.datasets import (
    ArrayDataset,
    CorruptImageError,
    ImageFileDataset,
    load_image,
    stratified_split,
)
from vmoe.data.digits import DigitsDataModule, load_digits_uint8
from vmoe.data.hf import HFDataModule
from vmoe.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataModule
from vmoe.data.randaugment import DEFAULT_OPS, GEOMETRIC_OPS, OPS, RandAugment
from vmoe.data.shards import ShardDataModule, write_shards
from vmoe.data.transforms import (
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    EvalTransformConfig,
    TrainTransformConfig,
    build_eval_transform,
    build_train_transform,
    normalize_uint8,
)

DATAMODULES: dict[str, type[VisionDataModule]] = {
    "digits": DigitsDataModule,
    "imagefolder": ImageFolderDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "hf": HFDataModule,
    "shards": ShardDataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> VisionDataModule:
    """``DATAMODULES[name](**kwargs)``; ``train_transform``/``eval_transform`` may be dicts."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown data module name={name!r}; choose one of {sorted(DATAMODULES)}")
    if isinstance(kwargs.get("train_transform"), dict):
        kwargs["train_transform"] = TrainTransformConfig(**kwargs["train_transform"])
    if isinstance(kwargs.get("eval_transform"), dict):
        kwargs["eval_transform"] = EvalTransformConfig(**kwargs["eval_transform"])
    return DATAMODULES[name](**kwargs)


__all__ = [
    "ArrayDataset",
    "CIFAR10DataModule",
    "DEFAULT_EVAL",
    "DEFAULT_TRAIN",
    "CIFAR100DataModule",
    "CorruptImageError",
    "DATAMODULES",
    "DEFAULT_OPS",
    "DigitsDataModule",
    "EvalTransformConfig",
    "GEOMETRIC_OPS",
    "HFDataModule",
    "IMAGE_EXTENSIONS",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "OPS",
    "RandAugment",
    "ShardDataModule",
    "TrainTransformConfig",
    "VisionDataModule",
    "build_datamodule",
    "build_eval_transform",
    "build_train_transform",
    "normalize_uint8",
    "load_digits_uint8",
    "load_image",
    "read_cifar_binary",
    "stratified_split",
    "write_shards",
]
