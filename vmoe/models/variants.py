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
import sys
from typing import Dict, Optional

import timm
import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model

from ..moe import moe_layers, restore_routing
from .config_checks import shape_mismatches
from .moeify import MOEIFIED_ARCHITECTURE, moeify as apply_moeify
from .pretrained import adapt_for_fine_tuning
from .vit_moe import VisionTransformerMoe

__all__ = ["VARIANTS", "PAPER_MOE_DEFAULTS", "SOFT_VARIANTS", "SOFT_MOE_PAPER_DEFAULTS",
           "checkpoint_filter_fn", "vmoe_vit", "vmoe_tiny_e4_k2", "soft_moe_tiny_e8",
           "vmoe_moeified"]

# name -> (patch, hidden, depth, mlp, heads), from the official configs.
VARIANTS = {
    "s32": (32, 512, 8, 2048, 8),
    "b32": (32, 768, 12, 3072, 12),
    "b16": (16, 768, 12, 3072, 12),
    "l32": (32, 1024, 24, 4096, 16),
    "l16": (16, 1024, 24, 4096, 16),
    "h14": (14, 1280, 32, 5120, 16),
}

PAPER_MOE_DEFAULTS = dict(capacity_factor=1.05, group_size_images=8, noise_std=1.0,
                          importance_weight=0.005, load_weight=0.005, batch_priority=False,
                          same_init=True)

_PAPER = dict(paper_ids="arXiv:2106.05974", paper_name="Scaling Vision with Sparse Mixture of Experts")
_SOFT_PAPER = dict(paper_ids="arXiv:2308.00951", paper_name="From Sparse to Soft Mixtures of Experts")

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
SOFT_MOE_PAPER_DEFAULTS = dict(router="soft", num_slots=1, group_size_images=1, noise_std=0.0,
                               same_init=True)
_SOFT_ARCH = dict(class_token=False, global_pool="avg", fc_norm=False, qk_norm=True,
                  qk_norm_bias=False, head_bias_init="paper")


def _default_cfg(img_size: int = 224, paper: Optional[dict] = None) -> dict:
    """timm's pretrained_cfg of a vmoe model: V-MoE/inception inputs (mean = std = 0.5), no hub
    weights (load a file, a ``local-dir:`` or ``hf-hub:`` name; see ``vmoe convert``)."""
    return dict(url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=0.875, interpolation="bicubic", fixed_input_size=True,
                mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD,
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                **(paper or _PAPER))


_NAMES = ([f"vmoe_{size}_e{e}_k{k}_{place}" for size in VARIANTS for e in (8, 32) for k in (1, 2)
           for place in ("every2", "last2")] + ["vmoe_vit"])
_SOFT_NAMES = [f"soft_moe_{size}_e{SOFT_VARIANTS[size][-1]}" for size in SOFT_VARIANTS]
default_cfgs = generate_default_cfgs({**{name: _default_cfg() for name in _NAMES},
                                      "vmoe_tiny_e4_k2": _default_cfg(img_size=16),
                                      **{name: _default_cfg(paper=_SOFT_PAPER) for name in _SOFT_NAMES},
                                      "soft_moe_tiny_e8": _default_cfg(img_size=16, paper=_SOFT_PAPER)})

_WEIGHT_SOURCES = ("file", "state_dict", "hf_hub_id", "url")


def checkpoint_filter_fn(state: Dict[str, torch.Tensor], model: VisionTransformerMoe) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for vmoe models: a new head where the checkpoint's head
    does not fit (another ``num_classes``), position embeddings resampled to the model's grid
    (another ``img_size``). ValueError listing what does not fit when the weights are another
    model's (missing or unexpected keys, wrong shapes)."""
    state = adapt_for_fine_tuning(model, state, new_head=True, new_size=True)
    problems = shape_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                {k: tuple(v.shape) for k, v in state.items()},
                                expected_as="model", found_as="weights")
    if problems:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ValueError(f"the pretrained weights do not fit {name}: {problems}")
    return state


def _check_weight_source(name: str, cfg: Optional[dict], overlay: Optional[dict]) -> None:
    merged = {**(cfg if isinstance(cfg, dict) else {}), **(overlay or {})}
    if not any(merged.get(key) for key in _WEIGHT_SOURCES):
        raise ValueError(f"{name}: there are no hub weights for vmoe models. Pass a weights file "
                         "(pretrained_cfg_overlay=dict(file='.../model.safetensors')), load a saved "
                         "directory with timm.create_model('local-dir:DIR', pretrained=True) or "
                         "vmoe.models.from_pretrained(DIR), or import Google's released checkpoints "
                         "with `vmoe convert` / vmoe.models.from_vmoe_checkpoint")


def _build(name: str, pretrained: bool, arch: dict, moe: dict, kwargs: dict):
    """The model through timm's ``build_model_with_cfg`` (pretrained weights, features_only).
    ``routing=`` (``{layer: settings}``, as ``config.json`` stores it) is applied after building."""
    if pretrained:
        _check_weight_source(name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    routing = kwargs.pop("routing", None)
    user_moe = kwargs.pop("moe", None) or {}
    options = {**arch, **kwargs}
    num_classes = options.setdefault("num_classes", 1000)
    if options.get("head_bias_init", 0.0) == "paper":
        options["head_bias_init"] = -math.log(max(num_classes, 1))
    # The filter fits the head by shape: keep timm from dropping a head of the same size. The
    # data config follows the model's input size (timm's data helpers read input_size).
    overlay = {**(options.pop("pretrained_cfg_overlay", None) or {}), "num_classes": num_classes}
    if "img_size" in options:
        size = options["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        overlay["input_size"] = (options.get("in_chans", 3), *size)
    model = build_model_with_cfg(
        VisionTransformerMoe, name, pretrained, moe={**moe, **user_moe},
        pretrained_cfg_overlay=overlay, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=options.pop("out_indices", 3), feature_cls="getter"), **options)
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
    arch = dict(img_size=224, patch_size=patch, embed_dim=hidden, depth=depth, num_heads=heads,
                mlp_ratio=mlp / hidden, representation_size=hidden, head_bias_init="paper")
    place = {"every2": dict(every=2), "last2": dict(last=2)}[placement]
    moe = dict(place, num_experts=num_experts, num_selected=k, **PAPER_MOE_DEFAULTS)
    _register(f"vmoe_{size}_e{num_experts}_k{k}_{placement}", arch, moe,
              f"V-MoE {size[0].upper()}/{size[1:]} ({depth} blocks, hidden {hidden}), E={num_experts}, "
              f"K={k}, MoE placement '{placement}'.")


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
    arch = dict(img_size=224, patch_size=patch, embed_dim=hidden, depth=depth, num_heads=heads,
                mlp_ratio=mlp / hidden, **_SOFT_ARCH)
    moe = dict(blocks=list(range(depth // 2, depth)), num_experts=experts, **SOFT_MOE_PAPER_DEFAULTS)
    _register(f"soft_moe_{size}_e{experts}", arch, moe,
              f"Soft MoE {size[0].upper()}/{size[1:]} ({depth} blocks, hidden {hidden}), "
              f"E={experts}, one slot per expert, MoE in the last {depth - depth // 2} blocks.")


for _size in SOFT_VARIANTS:
    _soft_variant(_size)


@register_model
def soft_moe_tiny_e8(pretrained: bool = False, **kwargs):
    """Tiny Soft MoE for 16x16 images (patch 4, 16 patches, no class token): hidden 64, 4 blocks,
    4 heads, MLP 128; blocks 2 and 3 are Soft MoE with E=8, one slot per expert (8 slots for
    16 tokens per image). Trains in seconds on a CPU."""
    arch = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                **_SOFT_ARCH)
    moe = dict(blocks=[2, 3], num_experts=8, **SOFT_MOE_PAPER_DEFAULTS)
    return _build("soft_moe_tiny_e8", pretrained, arch, moe, kwargs)


@register_model
def vmoe_vit(pretrained: bool = False, **kwargs):
    """A V-MoE with every architecture argument given explicitly (``moe=`` dict included)."""
    return _build("vmoe_vit", pretrained, {}, {}, kwargs)


@register_model
def vmoe_moeified(pretrained: bool = False, *, base_architecture: str, moeify: dict,
                  routing: Optional[dict] = None, pretrained_cfg=None, pretrained_cfg_overlay=None,
                  pretrained_model_args: Optional[dict] = None, cache_dir=None, **base_args):
    """A timm model made MoE by ``vmoe.models.moeify`` (or ``upcycle``), rebuilt: the dense
    ``base_architecture`` with ``base_args``, then the ``moeify`` recipe (``{"blocks": [...],
    "moe_kwargs": {...}}``), then ``routing`` (``{layer: settings}``), then, with ``pretrained``,
    the weights named by ``pretrained_cfg`` (a file, ``local-dir:``, ``hf-hub:``; through
    ``checkpoint_filter_fn``, so another ``num_classes``/``img_size`` gets a new head and resampled
    position embeddings). ``save_pretrained`` names this architecture for moeified models, which
    is how ``timm.create_model("local-dir:DIR", pretrained=True)`` loads them. The model keeps
    the base model's ``pretrained_cfg`` (input size, normalization)."""
    if not isinstance(base_architecture, str) or not timm.is_model(base_architecture) \
            or base_architecture == MOEIFIED_ARCHITECTURE:
        raise ValueError(f"{MOEIFIED_ARCHITECTURE}: base_architecture={base_architecture!r} is not a "
                         "registered dense timm model")
    model = timm.create_model(base_architecture, pretrained=False, pretrained_cfg=pretrained_cfg,
                              pretrained_cfg_overlay=pretrained_cfg_overlay, **base_args)
    blocks = moeify.get("blocks") if isinstance(moeify, dict) else None
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{MOEIFIED_ARCHITECTURE}: moeify={moeify!r:.200} must be "
                         '{"blocks": [block indices], "moe_kwargs": {...}}')
    apply_moeify(model, blocks=blocks, **moeify.get("moe_kwargs", {}))
    if routing:
        restore_routing(moe_layers(model), routing)
    if pretrained:
        _check_weight_source(MOEIFIED_ARCHITECTURE, pretrained_cfg, pretrained_cfg_overlay)
        load_pretrained(model, num_classes=model.num_classes,
                        in_chans=base_args.get("in_chans", 3), filter_fn=checkpoint_filter_fn)
        if routing:  # the weights do not carry routing settings; keep the recipe's
            restore_routing(moe_layers(model), routing)
    return model

