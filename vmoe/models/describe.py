"""One-line descriptions of a model, for the messages of ``vmoe convert`` and of fine-tuning
from ``model.pretrained_dir``: which variant, E experts, K selected (or Soft MoE slots), which
blocks are MoE, how many parameters; and what loading a ``save_pretrained`` directory did."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..moe import moe_layers

__all__ = ["describe_model", "describe_saved", "describe_loading"]

# (embed dim, depth) -> the paper's size name
_SIZES = {(192, 12): "Ti", (384, 12): "S", (512, 8): "S", (768, 12): "B", (1024, 24): "L"}
_SIZES[(1280, 32)] = "H"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _router_text(layer) -> str:
    router = getattr(getattr(layer, "config", None), "router", None)
    name = getattr(router, "name", None)
    if name == "soft":
        slots = getattr(layer, "num_slots", None) or getattr(router, "num_slots", None)
        return f"{slots} slot{'' if slots == 1 else 's'} per expert" if slots else "soft routing"
    if name == "expert_choice":
        return f"expert choice (capacity factor {router.capacity_factor:g})"
    k = getattr(router, "num_selected", None)
    return f"K={k}" + (" with BPR" if getattr(router, "batch_priority", False) else "")


def _variant(model: nn.Module, moe: Mapping[str, nn.Module]) -> str:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    depth = len(getattr(model, "blocks", ()))
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    soft = any(
        getattr(getattr(getattr(m, "config", None), "router", None), "name", None) == "soft"
        for m in moe.values()
    )
    family = "Soft MoE" if soft else ("V-MoE" if moe else "ViT")
    size = _SIZES.get((dim, depth))
    if size and patch:
        return f"{family}-{size}/{patch}"
    return f"{family} (d={dim}, {depth} blocks" + (f", patch {patch})" if patch else ")")


def describe_model(model: nn.Module, num_parameters: Optional[int] = None) -> str:
    """E.g. ``V-MoE-S/32: E=8 experts, K=2, MoE blocks 5, 7 of 8, 36.5 M parameters``.
    ``num_parameters`` (default: counted on ``model``) lets a meta-device build be described."""
    moe = moe_layers(model)
    depth = len(getattr(model, "blocks", ()))
    if num_parameters is None:
        num_parameters = sum(p.numel() for p in model.parameters())
    parts = [_variant(model, moe)]
    if moe:
        experts = sorted({m.config.num_experts for m in moe.values() if hasattr(m, "config")})
        routers = sorted({_router_text(m) for m in moe.values()})
        blocks = [name.split(".")[1] for name in moe if name.startswith("blocks.")]
        where = f"MoE blocks {', '.join(blocks)}" + (f" of {depth}" if depth else "")
        parts[0] += f": E={'/'.join(map(str, experts))} experts, {'; '.join(routers)}, {where}"
    return f"{parts[0]}, {_count(num_parameters)} parameters"


def _header_parameters(weights: Path) -> int:
    from vmoe.checkpoints import read_safetensors_header

    return sum(math.prod(entry.shape) for entry in read_safetensors_header(weights).values())


def describe_saved(directory: Union[str, os.PathLike]) -> str:
    """``describe_model`` of a ``save_pretrained`` directory without reading its weights (a
    meta-device build of config.json; the parameters counted from the safetensors header), plus
    its classes and input size."""
    from .pretrained import CONFIG_NAME, WEIGHTS_NAME, _build_on_meta

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    args = dict(config.get("model_args") or {})
    if "num_classes" not in args and isinstance(config.get("num_classes"), int):
        args["num_classes"] = config["num_classes"]
    total = _header_parameters(directory / WEIGHTS_NAME)
    model = _build_on_meta(config, args, directory / CONFIG_NAME)
    text = describe_model(model, total) if model is not None else f"{_count(total)} parameters"
    size = args.get("img_size")
    size = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) else size
    classes = args.get("num_classes")
    extra = [f"{classes} classes" if classes else None, f"{size} images" if size else None]
    return "; ".join([text, *[e for e in extra if e]])


def describe_loading(
    model: nn.Module,
    file_shapes: Mapping[str, Sequence[int]],
    source: Union[str, os.PathLike],
    reinitialised: Iterable[str] = (),
    resampled: Iterable[str] = (),
) -> str:
    """What loading ``source`` into ``model`` did: ``loaded N of M tensors from SOURCE;
    re-initialised head.weight, head.bias (a new head: 3 classes)``."""
    reinitialised, resampled = list(reinitialised), list(resampled)
    own: Dict[str, Tuple[int, ...]] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    taken = [k for k in file_shapes if k in own and k not in reinitialised]
    text = f"loaded {len(taken)} of {len(own)} tensors from {source}"
    if reinitialised:
        classes = own.get("head.bias", (None,))[0]
        why = (
            f" (a new head: {classes} classes)"
            if classes and "head.weight" in reinitialised
            else ""
        )
        text += f"; re-initialised {', '.join(reinitialised)}{why}"
    if resampled:
        text += f"; resampled {', '.join(resampled)} to the new image size"
    return text
