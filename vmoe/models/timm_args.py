"""timm's factory arguments for vmoe's registered models: the checks and resolutions every vmoe
factory shares (``in_chans``, ``features_only``/``feature_cls``/``out_indices``, ``num_classes``
from the pretrained cfg, the input channels of the pretrained cfg), and the feature wrapper of
``vmoe_moeified`` (which builds its model outside ``build_model_with_cfg``)."""

from __future__ import annotations

import inspect
from typing import Optional

import torch.nn as nn
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import (
    FeatureDictNet,
    FeatureGetterNet,
    FeatureHookNet,
    FeatureListNet,
    feature_take_indices,
)
from timm.models._features_fx import FeatureGraphNet
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "FEATURE_CLASSES",
    "check_factory_args",
    "source_num_classes",
    "source_in_chans",
    "input_cfg",
    "wrap_features",
    "VIT_DEFAULT_DEPTH",
]

# timm's names for its feature extractors (build_model_with_cfg's feature_cls).
FEATURE_CLASSES = {
    "getter": FeatureGetterNet,
    "fx": FeatureGraphNet,
    "hook": FeatureHookNet,
    "list": FeatureListNet,
    "dict": FeatureDictNet,
}
VIT_DEFAULT_DEPTH = inspect.signature(VisionTransformer).parameters["depth"].default


def _feature_class(name: str, feature_cls):
    if isinstance(feature_cls, type) and issubclass(feature_cls, nn.Module):
        return feature_cls
    key = feature_cls.lower() if isinstance(feature_cls, str) else None
    if key is not None and "hook" in key:  # timm accepts any name containing 'hook'
        key = "hook"
    if key not in FEATURE_CLASSES:
        raise ValueError(
            f"{name}: feature_cls={feature_cls!r} is not a timm feature extractor; use "
            f"one of {sorted(FEATURE_CLASSES)} (default 'getter')"
        )
    return FEATURE_CLASSES[key]


def check_factory_args(name: str, options: dict, depth: Optional[int]) -> None:
    """ValueError naming the argument: ``in_chans`` not an int >= 1; with ``features_only``, a
    ``feature_cls`` timm does not have or (unless ``depth`` is None: not known yet)
    ``out_indices`` outside the model's ``depth`` blocks (an int n: the last n blocks,
    1 <= n <= depth; a list: indices in [-depth, depth))."""
    in_chans = options.get("in_chans", 3)
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(
            f"{name}: in_chans={in_chans!r} must be an int >= 1 (channels of the input images)"
        )
    if not options.get("features_only"):
        return
    _feature_class(name, options.get("feature_cls", "getter"))
    if depth is None:
        return
    out_indices = options.get("out_indices", 3)
    try:
        feature_take_indices(depth, out_indices)
    except (AssertionError, TypeError) as err:
        raise ValueError(
            f"{name}: out_indices={out_indices!r} does not fit a model of {depth} blocks "
            f"({err}); give n (the last n blocks, 1..{depth}) or block indices "
            f"in [-{depth}, {depth - 1}]"
        ) from None


def _cfg_value(cfg, key: str):
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)  # a timm PretrainedCfg


def source_num_classes(pretrained_cfg, overlay: Optional[dict], default: int = 1000) -> int:
    """The classes of the weights' head as the cfgs say (the overlay first, then the pretrained
    cfg: timm's ``local-dir:``/``hf-hub:`` loaders put the top-level ``num_classes`` of
    ``config.json`` there), else ``default``: what a model built without ``num_classes`` gets,
    as timm's own factories do."""
    for cfg in (overlay, pretrained_cfg):
        value = _cfg_value(cfg, "num_classes")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


def source_in_chans(pretrained_cfg, overlay: Optional[dict]) -> int:
    """The input channels the pretrained weights were made for (the cfg's ``input_size[0]``; 3
    when no cfg says): timm adapts the first conv from these to the model's ``in_chans``."""
    for cfg in (overlay, pretrained_cfg):
        size = _cfg_value(cfg, "input_size")
        if size:
            return int(size[0])
    return 3


def input_cfg(in_chans: int, img_size, mean, std) -> dict:
    """The pretrained-cfg entries that describe the model's own input: ``input_size`` ``(C, H, W)``
    and ``mean``/``std`` of C values (uniform statistics, as V-MoE's 0.5, are repeated; others
    are kept as they are)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    out = dict(input_size=(in_chans, *size))
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(set(value)) == 1 and len(value) != in_chans:
            out[key] = tuple(value[:1]) * in_chans
    return out


def wrap_features(model: nn.Module, name: str, feature_cls="getter", out_indices=3) -> nn.Module:
    """``model`` wrapped as ``build_model_with_cfg(features_only=True)`` wraps it (after
    ``check_factory_args``), for factories that build their model themselves."""
    cls = _feature_class(name, feature_cls)
    kwargs = dict(out_indices=out_indices)
    output_fmt = getattr(model, "output_fmt", None)
    if output_fmt is not None and not issubclass(cls, FeatureGetterNet):
        kwargs["output_fmt"] = output_fmt
    cfg = getattr(model, "pretrained_cfg", None) or {}
    wrapped = cls(model, **kwargs)
    wrapped.pretrained_cfg = wrapped.default_cfg = pretrained_cfg_for_features(cfg)
    return wrapped
