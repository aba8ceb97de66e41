"""The V-MoE paper's model variants, registered in timm's model registry.

Names: ``vmoe_{s32,b32,b16,l32,l16,h14}_e{8,32}_k{1,2}_{every2,last2}``, plus
``vmoe_tiny_e4_k2`` (a CPU-sized model for 16x16 inputs) and ``vmoe_vit`` (every argument
explicit; used to rebuild imported or saved models). Soft MoE (Puigcerver et al. 2023):
``soft_moe_{s16,b16,l16}_e128``, ``soft_moe_h14_e256`` and ``soft_moe_tiny_e8`` (16x16 inputs).
``import vmoe.models`` registers them, then
``timm.create_model("vmoe_s32_e8_k2_last2", num_classes=1000)`` works. Every factory goes
through timm's ``build_model_with_cfg`` with the ``default_cfgs`` below, so ``pretrained=True``
(a file, ``local-dir:``, ``hf-hub:``), ``features_only=True`` and timm's data config work.

Paper defaults (official configs): group of 8 images per routing group, capacity factor 1.05
(training), router noise std 1/E, importance and load loss weights 0.005, vanilla priority (no
BPR) in training, all experts with the same initialization, a tanh representation layer of the
hidden size, head bias -log(num_classes).
"""

from __future__ import annotations

import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model

from ..moe import moe_layers, restore_routing
from .catalogue import CATALOGUE, entry_for_tag, timm_pretrained_cfg
from .catalogue import fetch_pretrained as _fetch_pretrained
from .config_checks import shape_mismatches
from .moeify import (
    MOEIFIED_ARCHITECTURE,
    merge_moe_options,
    moe_block_indices,
    recipe_layer,
)
from .moeify import (
    moeify as apply_moeify,
)
from .pretrained import adapt_for_fine_tuning, check_saved_dir
from .timm_args import (
    VIT_DEFAULT_DEPTH,
    check_factory_args,
    input_cfg,
    source_in_chans,
    source_num_classes,
    wrap_features,
)
from .vit_moe import VisionTransformerMoe

__all__ = [
    "VARIANTS",
    "PAPER_MOE_DEFAULTS",
    "SOFT_VARIANTS",
    "SOFT_MOE_PAPER_DEFAULTS",
    "checkpoint_filter_fn",
    "vmoe_vit",
    "vmoe_tiny_e4_k2",
    "soft_moe_tiny_e8",
    "vmoe_moeified",
]

# name -> (patch, hidden, depth, mlp, heads), from the official configs.
VARIANTS = {
    "s32": (32, 512, 8, 2048, 8),
    "b32": (32, 768, 12, 3072, 12),
    "b16": (16, 768, 12, 3072, 12),
    "l32": (32, 1024, 24, 4096, 16),
    "l16": (16, 1024, 24, 4096, 16),
    "h14": (14, 1280, 32, 5120, 16),
}

PAPER_MOE_DEFAULTS = dict(
    capacity_factor=1.05,
    group_size_images=8,
    noise_std=1.0,
    importance_weight=0.005,
    load_weight=0.005,
    batch_priority=False,
    same_init=True,
)

_PAPER = dict(
    paper_ids="arXiv:2106.05974", paper_name="Scaling Vision with Sparse Mixture of Experts"
)
_SOFT_PAPER = dict(
    paper_ids="arXiv:2308.00951", paper_name="From Sparse to Soft Mixtures of Experts"
)

# Soft MoE variants: name -> (patch, hidden, depth, mlp, heads, experts). The standard ViT sizes
# of the Soft MoE paper (its S/16 is ViT-S: hidden 384, not the V-MoE paper's S/32 of 512).
SOFT_VARIANTS = {
    "s16": (16, 384, 12, 1536, 6, 128),
    "b16": (16, 768, 12, 3072, 12, 128),
    "l16": (16, 1024, 24, 4096, 16, 128),
    "h14": (14, 1280, 32, 5120, 16, 256),
}
# Official Soft MoE configs: one slot per expert, one image per group, no router noise, global
# average pooling (no class token; final LayerNorm on the tokens, then the mean), qk-LayerNorm.
SOFT_MOE_PAPER_DEFAULTS = dict(
    router="soft", num_slots=1, group_size_images=1, noise_std=0.0, same_init=True
)
_SOFT_ARCH = dict(
    class_token=False,
    global_pool="avg",
    fc_norm=False,
    qk_norm=True,
    qk_norm_bias=False,
    head_bias_init="paper",
)


def _default_cfg(img_size: int = 224, paper: Optional[dict] = None) -> dict:
    """timm's pretrained_cfg of a vmoe model: V-MoE/inception inputs (mean = std = 0.5), no hub
    weights (load a file, a ``local-dir:`` or ``hf-hub:`` name; see ``vmoe convert``)."""
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, img_size, img_size),
        pool_size=None,
        crop_pct=0.875,
        interpolation="bicubic",
        fixed_input_size=True,
        mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        **(paper or _PAPER),
    )


def _with_catalogue_tags(cfgs: dict) -> dict:
    """``cfgs`` plus the pretrained tags of the released checkpoints (``vmoe.models.catalogue``),
    each after its model's untagged entry."""
    out = dict(cfgs)
    for entry in CATALOGUE.values():
        if entry.timm_name:
            out[entry.timm_name] = timm_pretrained_cfg(entry)
    return out


def _untagged_first(cfgs):
    """timm makes the first tag with weights an architecture's default: keep the untagged
    entry the default, so that ``vmoe_s32_e8_k2_last2`` stays the paper's model and only
    ``vmoe_s32_e8_k2_last2.TAG`` means a released checkpoint."""
    for default in cfgs.values():
        if "" in default.tags:
            default.tags.remove("")
            default.tags.appendleft("")
    return cfgs


_NAMES = [
    f"vmoe_{size}_e{e}_k{k}_{place}"
    for size in VARIANTS
    for e in (8, 32)
    for k in (1, 2)
    for place in ("every2", "last2")
] + ["vmoe_vit"]
_SOFT_NAMES = [f"soft_moe_{size}_e{SOFT_VARIANTS[size][-1]}" for size in SOFT_VARIANTS]
default_cfgs = _untagged_first(
    generate_default_cfgs(
        _with_catalogue_tags(
            {
                **{name: _default_cfg() for name in _NAMES},
                "vmoe_tiny_e4_k2": _default_cfg(img_size=16),
                **{name: _default_cfg(paper=_SOFT_PAPER) for name in _SOFT_NAMES},
                "soft_moe_tiny_e8": _default_cfg(img_size=16, paper=_SOFT_PAPER),
            }
        )
    )
)

_WEIGHT_SOURCES = ("file", "state_dict", "hf_hub_id", "url")
_HEAD = ("head.weight", "head.bias")
_FIRST_CONV = "patch_embed.proj.weight"


def _fits_after_adaptation(
    model: VisionTransformerMoe, own: Dict[str, tuple], found: Dict[str, tuple], new_head: bool
) -> set:
    """The entries whose shapes may differ because loading adapts them: the head (with
    ``new_head``), the first conv's input channels (timm's ``adapt_input_conv`` runs after this
    filter), and position embeddings of the same width on a square grid (resampled)."""
    may_differ = set(_HEAD) if new_head else set()
    a, b = own.get(_FIRST_CONV), found.get(_FIRST_CONV)
    if a and b and len(a) == len(b) == 4 and (a[0], *a[2:]) == (b[0], *b[2:]):
        may_differ.add(_FIRST_CONV)
    a, b = own.get("pos_embed"), found.get("pos_embed")
    prefix = (
        0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    )
    if (
        a
        and b
        and len(a) == len(b) == 3
        and a[::2] == b[::2]
        and b[1] > prefix
        and math.isqrt(b[1] - prefix) ** 2 == b[1] - prefix
    ):
        may_differ.add("pos_embed")
    return may_differ


def checkpoint_filter_fn(
    state: Dict[str, torch.Tensor], model: VisionTransformerMoe, new_head: bool = True
) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for vmoe models. First every shape is checked: ValueError
    listing what does not fit when the weights are another model's (missing or unexpected keys,
    wrong shapes), before anything is resampled. Then, with ``new_head``, a fresh head where the
    checkpoint's does not fit (another ``num_classes``; the factories pass ``new_head=False``
    unless ``num_classes`` was given, so a trained head is never dropped silently), and position
    embeddings resampled to the model's grid (another ``img_size``). The first conv keeps the
    checkpoint's input channels: timm adapts it to ``in_chans`` after this filter."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = shape_mismatches(
        own,
        found,
        expected_as="model",
        found_as="weights",
        may_differ=_fits_after_adaptation(model, own, found, new_head),
    )
    if problems:
        name = (getattr(model, "pretrained_cfg", None) or {}).get(
            "architecture", type(model).__name__
        )
        hint = ""
        if (
            not new_head
            and "head.weight" in own
            and "head.weight" in found
            and own["head.weight"] != found["head.weight"]
        ):
            hint = (
                f". The weights' head has {found['head.weight'][0]} classes: pass "
                f"num_classes={found['head.weight'][0]} to keep it, or another num_classes "
                "for a new head"
            )
        raise ValueError(f"the pretrained weights do not fit {name}: {problems}{hint}")
    return adapt_for_fine_tuning(model, state, new_head=new_head, new_size=True)


def _check_weight_source(name: str, cfg: Optional[dict], overlay: Optional[dict]) -> None:
    merged = {**(cfg if isinstance(cfg, dict) else {}), **(overlay or {})}
    if not any(merged.get(key) for key in _WEIGHT_SOURCES):
        raise ValueError(
            f"{name}: no weights for this name. Name a released checkpoint's tag "
            "(timm.list_pretrained('vmoe*'), `vmoe list-pretrained`), pass a weights file "
            "(pretrained_cfg_overlay=dict(file='.../model.safetensors')), load a saved "
            "directory with timm.create_model('local-dir:DIR', pretrained=True) or "
            "vmoe.models.from_pretrained(DIR), or import Google's released checkpoints "
            "with `vmoe convert` / vmoe.models.from_vmoe_checkpoint"
        )
    file = merged.get("file")
    if (
        file
        and merged.get("source") != "hf-hub"
        and not merged.get("state_dict")
        and not Path(file).exists()
    ):
        what = "directory" if merged.get("source") == "local-dir" else "weights file"
        raise FileNotFoundError(
            f"{name}: pretrained {what} {file} not found "
            "(pretrained_cfg_overlay / pretrained_cfg 'file')"
        )


def _local_dir(cfg) -> Optional[Path]:
    """The directory timm's ``local-dir:`` loader reads the weights from (None otherwise)."""
    if isinstance(cfg, dict) and cfg.get("source") == "local-dir" and cfg.get("file"):
        return Path(cfg["file"])
    return None


def _new_head(options: dict, kwargs: dict) -> bool:
    """Whether the weights' head may be replaced: ``num_classes`` was given and differs from the
    saved model's (``local-dir:`` passes the saved ``model_args``), or the model is a backbone."""
    given = options.get("num_classes")
    source = (kwargs.get("pretrained_model_args") or {}).get("num_classes")
    return bool(options.get("features_only")) or (given is not None and given != source)


def _tag_arguments(entry, moe: dict, kwargs: dict, pretrained: bool) -> tuple:
    """The variant's MoE options and the factory's arguments for a released checkpoint's tag:
    the checkpoint's architecture and routing under the user's arguments, and with
    ``pretrained`` its converted weights as the file to load: fetched and cached on first use
    (``vmoe.models.catalogue.fetch_pretrained``), or the user's
    ``pretrained_cfg_overlay=dict(file=...)``: a weights file, or an official checkpoint
    fetched by hand (``DIR/NAME.index``, converted into the cache)."""
    from .catalogue import convert_local_checkpoint

    kwargs = dict(kwargs)
    given = entry.model_kwargs()
    moe = merge_moe_options(moe, given.pop("moe"))
    for key, value in given.items():
        kwargs.setdefault(key, value)
    if pretrained:
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        file = overlay.get("file")
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(".index"):
            overlay["file"] = str(convert_local_checkpoint(entry, file) / "model.safetensors")
        elif not (file or overlay.get("state_dict")):
            overlay["file"] = str(_fetch_pretrained(entry) / "model.safetensors")
        kwargs["pretrained_cfg_overlay"] = overlay
    return moe, kwargs


def _build(name: str, pretrained: bool, arch: dict, moe: dict, kwargs: dict):
    """The model through timm's ``build_model_with_cfg`` (pretrained weights, features_only).
    ``routing=`` (``{layer: settings}``, as ``config.json`` stores it) is applied after building.
    A ``local-dir:`` source is checked as ``from_pretrained`` checks it, before building."""
    entry = entry_for_tag(name, kwargs.get("pretrained_cfg"))
    if entry is not None:  # a released checkpoint's tag: its model, its weights
        moe, kwargs = _tag_arguments(entry, moe, kwargs, pretrained)
    if pretrained:
        _check_weight_source(
            name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        )
    routing = kwargs.pop("routing", None)
    # the user's MoE options over the variant's (flat or nested; nested from here on)
    moe = merge_moe_options(moe, kwargs.pop("moe", None) or {})
    options = {**arch, **kwargs}
    check_factory_args(name, options, options.get("depth", VIT_DEFAULT_DEPTH))
    cfg, overlay = kwargs.get("pretrained_cfg"), options.pop("pretrained_cfg_overlay", None) or {}
    new_head = _new_head(options, kwargs)
    num_classes = options.setdefault("num_classes", source_num_classes(cfg, overlay))
    if pretrained and _local_dir(cfg) is not None:
        check_saved_dir(
            _local_dir(cfg),
            {
                **{k: v for k, v in options.items() if k != "pretrained_cfg"},
                "moe": moe,
                "routing": routing,
            },
        )
    if options.get("head_bias_init", 0.0) == "paper":
        options["head_bias_init"] = -math.log(max(num_classes, 1))
    # The filter fits the head by shape: keep timm from dropping a head of the same size. The
    # data config follows the model's input (timm's data helpers read input_size, mean, std);
    # while loading, input_size[0] stays the weights' channels, so that timm adapts the first
    # conv to in_chans.
    in_chans = options.get("in_chans", 3)
    default = default_cfgs[name].default.to_dict()
    size = options.get("img_size", default["input_size"][1:])
    source = {**default, **(cfg if isinstance(cfg, dict) else {}), **overlay}
    own_input = input_cfg(in_chans, size, source.get("mean"), source.get("std"))
    overlay = {**overlay, "num_classes": num_classes, **own_input}
    if pretrained:
        overlay["input_size"] = (
            source_in_chans(cfg, kwargs.get("pretrained_cfg_overlay")),
            *own_input["input_size"][1:],
        )
    model = build_model_with_cfg(
        VisionTransformerMoe,
        name,
        pretrained,
        moe=moe or None,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=partial(checkpoint_filter_fn, new_head=new_head),
        feature_cfg=dict(out_indices=options.pop("out_indices", 3), feature_cls="getter"),
        **options,
    )
    model.pretrained_cfg.update(own_input)  # the weights now take in_chans channels
    if routing:
        restore_routing(moe_layers(getattr(model, "model", model)), routing)
    return model


def _register(name: str, arch: dict, moe: dict, doc: str) -> None:
    """Register the timm factory ``name(pretrained=False, **kwargs)`` (building through
    ``_build``) and make it an attribute of this module."""

    def factory(pretrained: bool = False, **kwargs):
        return _build(name, pretrained, arch, moe, kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = __name__
    factory.__doc__ = doc
    setattr(sys.modules[__name__], name, register_model(factory))


def _paper_variant(size: str, num_experts: int, k: int, placement: str) -> None:
    patch, hidden, depth, mlp, heads = VARIANTS[size]
    arch = dict(
        img_size=224,
        patch_size=patch,
        embed_dim=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp / hidden,
        representation_size=hidden,
        head_bias_init="paper",
    )
    place = {"every2": dict(every=2), "last2": dict(last=2)}[placement]
    moe = dict(place, num_experts=num_experts, num_selected=k, **PAPER_MOE_DEFAULTS)
    _register(
        f"vmoe_{size}_e{num_experts}_k{k}_{placement}",
        arch,
        moe,
        f"V-MoE {size[0].upper()}/{size[1:]} ({depth} blocks, hidden {hidden}), E={num_experts}, "
        f"K={k}, MoE placement '{placement}'.",
    )


for _size in VARIANTS:
    for _e in (8, 32):
        for _k in (1, 2):
            for _place in ("every2", "last2"):
                _paper_variant(_size, _e, _k, _place)


@register_model
def vmoe_tiny_e4_k2(pretrained: bool = False, **kwargs):
    """Tiny V-MoE for 16x16 images (patch 4, 16 patches + cls): hidden 64, 4 blocks, 4 heads,
    MLP 128; blocks 1 and 3 are MoE with E=4, K=2. Trains in seconds on a CPU."""
    arch = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    moe = dict(every=2, num_experts=4, num_selected=2, **PAPER_MOE_DEFAULTS)
    return _build("vmoe_tiny_e4_k2", pretrained, arch, moe, kwargs)


def _soft_variant(size: str) -> None:
    patch, hidden, depth, mlp, heads, experts = SOFT_VARIANTS[size]
    arch = dict(
        img_size=224,
        patch_size=patch,
        embed_dim=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp / hidden,
        **_SOFT_ARCH,
    )
    moe = dict(
        blocks=list(range(depth // 2, depth)), num_experts=experts, **SOFT_MOE_PAPER_DEFAULTS
    )
    _register(
        f"soft_moe_{size}_e{experts}",
        arch,
        moe,
        f"Soft MoE {size[0].upper()}/{size[1:]} ({depth} blocks, hidden {hidden}), "
        f"E={experts}, one slot per expert, MoE in the last {depth - depth // 2} blocks.",
    )


for _size in SOFT_VARIANTS:
    _soft_variant(_size)


@register_model
def soft_moe_tiny_e8(pretrained: bool = False, **kwargs):
    """Tiny Soft MoE for 16x16 images (patch 4, 16 patches, no class token): hidden 64, 4 blocks,
    4 heads, MLP 128; blocks 2 and 3 are Soft MoE with E=8, one slot per expert (8 slots for
    16 tokens per image). Trains in seconds on a CPU."""
    arch = dict(
        img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, **_SOFT_ARCH
    )
    moe = dict(blocks=[2, 3], num_experts=8, **SOFT_MOE_PAPER_DEFAULTS)
    return _build("soft_moe_tiny_e8", pretrained, arch, moe, kwargs)


@register_model
def vmoe_vit(pretrained: bool = False, **kwargs):
    """A V-MoE with every architecture argument given explicitly (``moe=`` dict included)."""
    return _build("vmoe_vit", pretrained, {}, {}, kwargs)


# vmoe_moeified without arguments: V-MoE "Last 2" (E=8, K=2) on timm's ViT-Ti/16.
MOEIFIED_DEFAULT_BASE = "vit_tiny_patch16_224"
MOEIFIED_DEFAULT_MOE = dict(num_experts=8, num_selected=2)


@register_model
def vmoe_moeified(
    pretrained: bool = False,
    *,
    base_architecture: str = MOEIFIED_DEFAULT_BASE,
    moeify: Optional[dict] = None,
    routing: Optional[dict] = None,
    pretrained_cfg=None,
    pretrained_cfg_overlay=None,
    pretrained_model_args: Optional[dict] = None,
    cache_dir=None,
    features_only: bool = False,
    feature_cls="getter",
    out_indices=3,
    **base_args,
):
    """A timm model made MoE by ``vmoe.models.moeify`` (or ``upcycle``), rebuilt: the dense
    ``base_architecture`` with ``base_args``, then the ``moeify`` recipe (``{"blocks": [...],
    "layer": {...}}``, or config.json version 1's ``{"blocks": [...], "moe_kwargs": {...}}``), then
    ``routing`` (``{layer: settings}``), then, with ``pretrained``, the weights named by
    ``pretrained_cfg`` (a file, ``local-dir:``, ``hf-hub:``; through ``checkpoint_filter_fn``, so
    another ``num_classes``/``img_size`` gets a new head and resampled position embeddings).
    ``save_pretrained`` names this architecture for moeified models, which is how
    ``timm.create_model("local-dir:DIR", pretrained=True)`` loads them. The model keeps the base
    model's ``pretrained_cfg`` (input size, normalization).

    Without arguments: ``vit_tiny_patch16_224`` with the paper's "Last 2" placement (the last
    two odd blocks), E=8, K=2. ``features_only`` wraps the MoE model as timm wraps a ViT."""
    name = MOEIFIED_ARCHITECTURE
    if (
        not isinstance(base_architecture, str)
        or not timm.is_model(base_architecture)
        or base_architecture == MOEIFIED_ARCHITECTURE
    ):
        raise ValueError(
            f"{name}: base_architecture={base_architecture!r} is not a registered dense timm model"
        )
    check_factory_args(
        name,
        dict(
            base_args, features_only=features_only, feature_cls=feature_cls, out_indices=out_indices
        ),
        depth=None,
    )
    if pretrained:
        _check_weight_source(name, pretrained_cfg, pretrained_cfg_overlay)
        if _local_dir(pretrained_cfg) is not None:
            check_saved_dir(
                _local_dir(pretrained_cfg),
                {**base_args, "routing": routing, "base_architecture": base_architecture},
            )
    model = timm.create_model(
        base_architecture,
        pretrained=False,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        **base_args,
    )
    if moeify is None:
        depth = len(getattr(model, "blocks", ()))
        moeify = dict(
            blocks=moe_block_indices(depth, last=min(2, depth // 2)) if depth > 1 else [0],
            layer=dict(MOEIFIED_DEFAULT_MOE),
        )
    blocks, layer, drop = recipe_layer(moeify, where=f"{name}: moeify")
    apply_moeify(model, blocks=blocks, config=layer, drop=drop)
    if routing:
        restore_routing(moe_layers(model), routing)
    if pretrained:
        new_head = features_only or (
            "num_classes" in base_args
            and base_args["num_classes"] != (pretrained_model_args or {}).get("num_classes")
        )
        # the filter fits the head by shape: keep timm from dropping one of the same size
        cfg = {**model.pretrained_cfg, "num_classes": model.num_classes}
        load_pretrained(
            model,
            pretrained_cfg=cfg,
            num_classes=model.num_classes,
            in_chans=base_args.get("in_chans", 3),
            filter_fn=partial(checkpoint_filter_fn, new_head=new_head),
        )
        if routing:  # the weights do not carry routing settings; keep the recipe's
            restore_routing(moe_layers(model), routing)
    if features_only:
        check_factory_args(
            name, dict(features_only=True, out_indices=out_indices), depth=len(model.blocks)
        )
        model = wrap_features(model, name, feature_cls, out_indices)
    return model
