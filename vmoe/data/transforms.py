"""Albumentations 2.x pipelines: train (random resized crop, flip, RandAugment, normalize) and eval
(resize, center crop, normalize).

The knobs live in two dataclasses so that LightningCLI/jsonargparse can fill them from YAML:

    data:
      class_path: vmoe.data.CIFAR10DataModule
      init_args:
        img_size: 224
        train_transform: {scale: [0.08, 1.0], hflip_prob: 0.5,
                          randaugment_num_ops: 2, randaugment_magnitude: 10}
        eval_transform: {crop_pct: 0.875}

Normalization (mean/std) and the output size belong to the data module, since train and eval
must agree on them. Both pipelines take a uint8 image [H, W, C] (any size) and return a float32
tensor [C, img_size, img_size].
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, Sequence

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

from vmoe.data.randaugment import DEFAULT_OPS, MAX_MAGNITUDE, OPS, RandAugment

Interpolation = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]
INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name}={tuple(value)} must be (lo, hi) with {low} <= lo <= hi <= {high}")


def _check_interpolation(value: str) -> None:
    if value not in INTERPOLATIONS:
        raise ValueError(f"interpolation={value!r} must be one of {sorted(INTERPOLATIONS)}")


def _given(config) -> dict:
    return {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if getattr(config, f.name) is not None
    }


@dataclass
class TrainTransformConfig:
    """Training augmentation. A field left None takes the data module's default (e.g. digits:
    no flip, a mild crop), and failing that the ImageNet-style value of ``DEFAULT_TRAIN``, so a
    YAML that sets only ``randaugment_magnitude`` changes nothing else.

    Args:
        scale: RandomResizedCrop area range, as fractions of the image area.
        ratio: RandomResizedCrop aspect-ratio range (w / h).
        hflip_prob: probability of a horizontal flip; 0 disables it (e.g. for digits).
        randaugment_num_ops: ops per image; 0 disables RandAugment.
        randaugment_magnitude: RandAugment strength in [0, 10].
        randaugment_ops: op names (see ``vmoe.data.randaugment.OPS``).
        fill: pixel value (0..255) for areas that rotate/shear/translate uncover.
        interpolation: resampling for the crop resize.
    """

    scale: Optional[tuple[float, float]] = None
    ratio: Optional[tuple[float, float]] = None
    hflip_prob: Optional[float] = None
    randaugment_num_ops: Optional[int] = None
    randaugment_magnitude: Optional[float] = None
    randaugment_ops: Optional[list[str]] = None
    fill: Optional[int] = None
    interpolation: Optional[Interpolation] = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            self.scale = tuple(self.scale)
            _check_range("scale", self.scale, 1e-6, 1.0)
        if self.ratio is not None:
            self.ratio = tuple(self.ratio)
            _check_range("ratio", self.ratio, 1e-6, float("inf"))
        if self.hflip_prob is not None and not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob={self.hflip_prob} must be in [0, 1]")
        if self.randaugment_ops is not None:
            self.randaugment_ops = list(self.randaugment_ops)
            unknown = [op for op in self.randaugment_ops if op not in OPS]
            if unknown:
                raise ValueError(f"randaugment_ops: unknown op(s) {unknown}; known: {sorted(OPS)}")
        if (
            self.randaugment_magnitude is not None
            and not 0.0 <= self.randaugment_magnitude <= MAX_MAGNITUDE
        ):
            raise ValueError(
                f"randaugment_magnitude={self.randaugment_magnitude} must be in [0, 10]"
            )
        if self.randaugment_num_ops is not None and self.randaugment_num_ops < 0:
            raise ValueError(f"randaugment_num_ops={self.randaugment_num_ops} must be >= 0")
        if self.fill is not None and not 0 <= self.fill <= 255:
            raise ValueError(f"fill={self.fill} must be in [0, 255]")
        if self.interpolation is not None:
            _check_interpolation(self.interpolation)

    def merged_over(self, base: "TrainTransformConfig") -> "TrainTransformConfig":
        """``base`` with this config's non-None fields on top."""
        return replace(base, **_given(self))


@dataclass
class EvalTransformConfig:
    """Evaluation preprocessing: resize the short side to ``img_size / crop_pct``, then center
    crop. None fields take the data module's default, then ``DEFAULT_EVAL``'s.

    Args:
        crop_pct: fraction of the resized image kept by the center crop (1.0: resize to img_size).
        interpolation: resampling for the resize.
    """

    crop_pct: Optional[float] = None
    interpolation: Optional[Interpolation] = None

    def __post_init__(self) -> None:
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct={self.crop_pct} must be in (0, 1]")
        if self.interpolation is not None:
            _check_interpolation(self.interpolation)

    def merged_over(self, base: "EvalTransformConfig") -> "EvalTransformConfig":
        return replace(base, **_given(self))


# ImageNet-style defaults (timm/big_vision): Inception crop, flip, RandAugment(2, 9).
DEFAULT_TRAIN = TrainTransformConfig(
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip_prob=0.5,
    randaugment_num_ops=2,
    randaugment_magnitude=9.0,
    randaugment_ops=list(DEFAULT_OPS),
    fill=128,
    interpolation="bilinear",
)
DEFAULT_EVAL = EvalTransformConfig(crop_pct=1.0, interpolation="bilinear")


def _normalize_to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(
            f"mean={tuple(mean)} and std={tuple(std)} must have one entry per channel, std > 0"
        )
    # max_pixel_value=255: mean/std are given on the [0, 1] scale, as timm's configs are.
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def _check_img_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size={img_size!r} must be a positive int")


def normalize_uint8(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The Normalize step of the pipelines, applied to a batch later (e.g. on the device).

    Args:
        images: uint8 [B, C, H, W] (a batch of ``build_train_transform(normalize=False)``).
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel std on the [0, 1] scale.

    Returns:
        float32 [B, C, H, W] = (images / 255 - mean) / std, on ``images``' device; the same
        float32 operations as the pipeline's Normalize step (equal on the CPU).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(mean):
        raise ValueError(
            f"normalize_uint8 needs uint8 [B, {len(mean)}, H, W] images, got "
            f"{images.dtype} {list(images.shape)}"
        )
    # albumentations' own float32 arithmetic (img - mean * 255) * (1 / (std * 255)): bit-equal
    shape = (1, len(mean), 1, 1)
    shift = torch.tensor(mean, dtype=torch.float32) * 255.0
    scale = torch.reciprocal(torch.tensor(std, dtype=torch.float32) * 255.0)
    shift, scale = (t.view(shape).to(images.device) for t in (shift, scale))
    return images.float().sub_(shift).mul_(scale)


def build_train_transform(
    img_size: int,
    config: TrainTransformConfig,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int | None = None,
    normalize: bool = True,
) -> A.Compose:
    """uint8 [H, W, C] -> float32 tensor [C, img_size, img_size]; ``seed`` fixes the draws.
    None fields of ``config`` take ``DEFAULT_TRAIN``'s values. ``normalize=False`` leaves out
    the Normalize step: uint8 tensor [C, img_size, img_size], the same draws (same ``seed``);
    ``normalize_uint8`` of a batch of them gives the float output."""
    _check_img_size(img_size)
    config = config.merged_over(DEFAULT_TRAIN)
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(img_size, img_size),
            scale=config.scale,
            ratio=config.ratio,
            interpolation=INTERPOLATIONS[config.interpolation],
        )
    ]
    if config.hflip_prob > 0:
        steps.append(A.HorizontalFlip(p=config.hflip_prob))
    if config.randaugment_num_ops > 0:
        steps.append(
            RandAugment(
                num_ops=config.randaugment_num_ops,
                magnitude=config.randaugment_magnitude,
                ops=config.randaugment_ops,
                fill=config.fill,
            )
        )
    last = _normalize_to_tensor(mean, std) if normalize else [ToTensorV2()]
    return A.Compose(steps + last, seed=seed)


def build_eval_transform(
    img_size: int,
    config: EvalTransformConfig,
    mean: Sequence[float],
    std: Sequence[float],
) -> A.Compose:
    """uint8 [H, W, C] -> float32 tensor [C, img_size, img_size]; deterministic.
    None fields of ``config`` take ``DEFAULT_EVAL``'s values."""
    _check_img_size(img_size)
    config = config.merged_over(DEFAULT_EVAL)
    resize = max(img_size, int(round(img_size / config.crop_pct)))
    steps = [
        A.SmallestMaxSize(max_size=resize, interpolation=INTERPOLATIONS[config.interpolation]),
        A.CenterCrop(height=img_size, width=img_size),
    ]
    return A.Compose(steps + _normalize_to_tensor(mean, std), seed=0)
