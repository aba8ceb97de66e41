"""RandAugment (Cubuk et al. 2020) as an albumentations 2.x transform.

Each call picks ``num_ops`` distinct operations from a list and applies them in the picked
order, each at a strength given by one global ``magnitude`` in [0, 10] (the paper's scale; the
V-MoE ImageNet recipe uses RandAugment(2, 10)). The magnitude-to-strength mapping follows the
"increasing" variants used by timm and big_vision: magnitude 0 leaves the image unchanged for
every op that has a strength, magnitude 10 is the strongest. Ops with a sign (rotate, shear,
translate, the enhancement factors) flip it at random with probability 1/2.

All ops work on uint8 images [H, W] or [H, W, C] (C = 1 or 3) with OpenCV/numpy, so they need
no PIL round trip. Randomness comes only from the transform's own ``py_random``, which
``A.Compose(seed=...)`` or ``set_random_seed`` seeds: the same seed gives the same ops.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import albumentations as A
import cv2
import numpy as np

MAX_MAGNITUDE = 10.0

# The strongest strength of each op, reached at magnitude 10 (values of timm's rand_augment).
_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE_FRAC = 0.45
_MAX_ENHANCE = 0.9  # enhancement factor 1 +- 0.9
_MAX_POSTERIZE_BITS_REMOVED = 4
_MAX_SOLARIZE_ADD = 110


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def _blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance semantics: factor 0 -> degenerate, 1 -> img, >1 extrapolates."""
    base = degenerate.astype(np.float32)
    out = img.astype(np.float32)  # the same float32 steps as base + factor * (img - base),
    out -= base  # in place (no temporaries)
    out *= np.float32(factor)
    out += base
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    """[H, W] luminance (ITU-R 601, as PIL's "L" mode)."""
    if _channels(img) == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return img.reshape(img.shape[:2])


def _warp(img: np.ndarray, matrix: np.ndarray, fill: int) -> np.ndarray:
    """Affine warp with ``matrix`` mapping output pixel coords to input coords."""
    h, w = img.shape[:2]
    out = cv2.warpAffine(
        img,
        matrix.astype(np.float64),
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill,) * 4,
    )
    return out.reshape(img.shape)  # OpenCV drops a trailing channel axis of size 1


_LEVELS = np.arange(256, dtype=np.float32)  # every uint8 value, for the per-value ops' tables


def _lookup(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[img]`` for a uint8 table [256] (every channel) or [256, C] (one per channel):
    the per-value ops computed once per value instead of once per pixel (same results)."""
    table = np.ascontiguousarray(table, dtype=np.uint8)
    if table.ndim == 2 and table.shape[1] > 1:
        table = table.reshape(256, 1, table.shape[1])
    else:
        table = table.reshape(256)
    return cv2.LUT(img, table).reshape(img.shape)


def _blend_value(value: int, img: np.ndarray, factor: float) -> np.ndarray:
    """``_blend`` with a degenerate image of one value everywhere, as a table."""
    degenerate = np.float32(value)
    return _lookup(img, np.clip(np.rint(degenerate + factor * (_LEVELS - degenerate)), 0, 255))


def identity(img: np.ndarray, arg: float, fill: int) -> np.ndarray:
    return img


def auto_contrast(img: np.ndarray, arg: float, fill: int) -> np.ndarray:
    """Stretch each channel's [min, max] to [0, 255]."""
    x = img.reshape(img.shape[0], img.shape[1], -1)
    channels = [x[..., c] for c in range(x.shape[2])]
    lo = np.array([c.min() for c in channels], np.float32)
    hi = np.array([c.max() for c in channels], np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-6), 1.0)
    offset = np.where(hi > lo, lo, 0.0)
    table = np.clip(np.rint((_LEVELS[:, None] - offset) * scale), 0, 255)  # [256, C]
    return _lookup(img, table)


def equalize(img: np.ndarray, arg: float, fill: int) -> np.ndarray:
    x = img.reshape(img.shape[0], img.shape[1], -1)
    out = np.stack(
        [cv2.equalizeHist(np.ascontiguousarray(x[..., c])) for c in range(x.shape[2])], -1
    )
    return out.reshape(img.shape)


def invert(img: np.ndarray, arg: float, fill: int) -> np.ndarray:
    return 255 - img


def rotate(img: np.ndarray, degrees: float, fill: int) -> np.ndarray:
    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    return _warp(img, cv2.invertAffineTransform(matrix), fill)


def posterize(img: np.ndarray, bits: float, fill: int) -> np.ndarray:
    """Keep the ``bits`` most significant bits of each pixel."""
    mask = np.uint8((0xFF << (8 - int(bits))) & 0xFF)
    return img & mask


def solarize(img: np.ndarray, threshold: float, fill: int) -> np.ndarray:
    """Invert pixels >= threshold (threshold 256 -> identity)."""
    return _lookup(img, np.where(_LEVELS >= threshold, 255 - _LEVELS, _LEVELS))


def solarize_add(img: np.ndarray, add: float, fill: int) -> np.ndarray:
    """Add ``add`` to pixels below 128."""
    added = np.clip(_LEVELS + int(round(add)), 0, 255)
    return _lookup(img, np.where(_LEVELS < 128, added, _LEVELS))


def color(img: np.ndarray, factor: float, fill: int) -> np.ndarray:
    """Saturation; a no-op for single-channel images."""
    if _channels(img) != 3:
        return img
    return _blend(np.repeat(_gray(img)[..., None], 3, axis=2), img, factor)


def contrast(img: np.ndarray, factor: float, fill: int) -> np.ndarray:
    mean = float(_gray(img).mean())
    return _blend_value(int(round(mean)), img, factor)


def brightness(img: np.ndarray, factor: float, fill: int) -> np.ndarray:
    return _blend_value(0, img, factor)


def sharpness(img: np.ndarray, factor: float, fill: int) -> np.ndarray:
    """Blend with PIL's SMOOTH-filtered image; the 1-pixel border keeps the original."""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE).reshape(img.shape)
    degenerate = img.copy()
    degenerate[1:-1, 1:-1] = smooth[1:-1, 1:-1]
    return _blend(degenerate, img, factor)


def shear_x(img: np.ndarray, shear: float, fill: int) -> np.ndarray:
    cy = (img.shape[0] - 1) / 2  # shear about the centre so the content stays in view
    return _warp(img, np.array([[1.0, shear, -shear * cy], [0.0, 1.0, 0.0]]), fill)


def shear_y(img: np.ndarray, shear: float, fill: int) -> np.ndarray:
    cx = (img.shape[1] - 1) / 2
    return _warp(img, np.array([[1.0, 0.0, 0.0], [shear, 1.0, -shear * cx]]), fill)


def translate_x(img: np.ndarray, frac: float, fill: int) -> np.ndarray:
    return _warp(img, np.array([[1.0, 0.0, -frac * img.shape[1]], [0.0, 1.0, 0.0]]), fill)


def translate_y(img: np.ndarray, frac: float, fill: int) -> np.ndarray:
    return _warp(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -frac * img.shape[0]]]), fill)


# name -> (op(img, strength, fill), strength(level in [0, 1]), whether the strength has a sign)
_Op = tuple[Callable[[np.ndarray, float, int], np.ndarray], Callable[[float], float], bool]
OPS: dict[str, _Op] = {
    "Identity": (identity, lambda lv: 0.0, False),
    "AutoContrast": (auto_contrast, lambda lv: 0.0, False),
    "Equalize": (equalize, lambda lv: 0.0, False),
    "Invert": (invert, lambda lv: 0.0, False),
    "Rotate": (rotate, lambda lv: lv * _MAX_ROTATE_DEG, True),
    "Posterize": (posterize, lambda lv: 8 - int(lv * _MAX_POSTERIZE_BITS_REMOVED), False),
    "Solarize": (solarize, lambda lv: 256.0 - lv * 256.0, False),
    "SolarizeAdd": (solarize_add, lambda lv: lv * _MAX_SOLARIZE_ADD, False),
    "Color": (color, lambda lv: lv * _MAX_ENHANCE, True),
    "Contrast": (contrast, lambda lv: lv * _MAX_ENHANCE, True),
    "Brightness": (brightness, lambda lv: lv * _MAX_ENHANCE, True),
    "Sharpness": (sharpness, lambda lv: lv * _MAX_ENHANCE, True),
    "ShearX": (shear_x, lambda lv: lv * _MAX_SHEAR, True),
    "ShearY": (shear_y, lambda lv: lv * _MAX_SHEAR, True),
    "TranslateX": (translate_x, lambda lv: lv * _MAX_TRANSLATE_FRAC, True),
    "TranslateY": (translate_y, lambda lv: lv * _MAX_TRANSLATE_FRAC, True),
}
_ENHANCE_OPS = frozenset({"Color", "Contrast", "Brightness", "Sharpness"})  # strength is 1 +- x

# The list of the original RandAugment (TF EfficientNet autoaugment.py) without Cutout.
DEFAULT_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
# Ops that keep a digit a digit: no inversion/solarization, which change the ink/paper contrast.
GEOMETRIC_OPS: tuple[str, ...] = (
    "Identity",
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)


class RandAugment(A.ImageOnlyTransform):
    """Apply ``num_ops`` distinct ops, drawn from ``ops``, each at strength ``magnitude``.

    Args:
        num_ops: how many ops per image (0 disables; at most ``len(ops)``).
        magnitude: global strength in [0, 10]; 0 leaves every op with a strength a no-op.
        ops: op names from ``OPS`` (default: ``DEFAULT_OPS``).
        fill: pixel value for areas uncovered by rotate/shear/translate.
        p: probability of applying the transform at all.
    Input/output: uint8 image [H, W] or [H, W, C], same shape.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        ops: Sequence[str] | None = None,
        fill: int = 128,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        ops = tuple(DEFAULT_OPS if ops is None else ops)
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(
                f"RandAugment ops={list(ops)}: unknown op(s) {unknown}; known: {sorted(OPS)}"
            )
        if len(set(ops)) != len(ops) or not ops:
            raise ValueError(
                f"RandAugment ops={list(ops)} must be a non-empty list without repeats"
            )
        if not isinstance(num_ops, int) or not 0 <= num_ops <= len(ops):
            raise ValueError(
                f"RandAugment num_ops={num_ops!r} must be an int in [0, {len(ops)}] (len(ops))"
            )
        if not 0.0 <= float(magnitude) <= MAX_MAGNITUDE:
            raise ValueError(
                f"RandAugment magnitude={magnitude!r} must be in [0, {MAX_MAGNITUDE:g}]"
            )
        if not 0 <= int(fill) <= 255:
            raise ValueError(f"RandAugment fill={fill!r} must be in [0, 255]")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.ops = ops
        self.fill = int(fill)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("num_ops", "magnitude", "ops", "fill")

    def get_params(self) -> dict[str, Any]:
        """Draw the ops and their signed strengths: {"ops": [(name, strength), ...]}."""
        level = self.magnitude / MAX_MAGNITUDE
        chosen = []
        for name in self.py_random.sample(self.ops, k=self.num_ops):
            _, strength_of, signed = OPS[name]
            strength = strength_of(level)
            if signed and self.py_random.random() < 0.5:
                strength = -strength
            if name in _ENHANCE_OPS:
                strength = 1.0 + strength
            chosen.append((name, strength))
        return {"ops": chosen}

    def apply(
        self, img: np.ndarray, ops: Sequence[tuple[str, float]] = (), **params: Any
    ) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(
                f"RandAugment expects a uint8 image, got dtype {img.dtype}; put it before Normalize"
            )
        for name, strength in ops:
            img = OPS[name][0](img, strength, self.fill)
        return img
