"""Record the RoutingPlans of a model's MoE layers and view them per image and per token.

Axis letters: B images, N tokens per image (prefix tokens such as the class token first, then
the h*w patches in row-major order), P prefix tokens, K choices per token, E experts,
G routing groups, S tokens per group.

A MoeMlp flattens its input [B, N, d] row-major into B*N tokens, pads the end to a multiple of S
and cuts it into [G, S] groups (a group may span several images, and an image may span two
groups). ``ungroup`` undoes exactly that, so token n of image b is row ``b * N + n`` of the
flattened plan. Nothing here re-derives routing: every view is a reshape of the recorded plan.

A Soft MoE layer records a SoftRoutingPlan ([G, S, E, P] dispatch and combine weights; P slots
per expert): ``soft_tokens`` views it per image. The sparse views (``tokens``, ``reroute``) refuse
such a layer with a message saying so: nothing is dropped and no token chooses an expert.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from vmoe.moe import (
    ExpertChoiceRouter,
    MoeMlp,
    RoutingPlan,
    SoftRoutingPlan,
    require_moe_layers,
    routing_settings,
)

__all__ = [
    "record_routing",
    "image_grid",
    "RoutingRecord",
    "TokenRouting",
    "SoftTokenRouting",
    "ungroup",
    "refuse_soft_layer",
    "SOFT_LAYER_PICTURES",
]

# What to draw instead, named in the message a sparse-only picture gives for a Soft MoE layer.
SOFT_LAYER_PICTURES = "dispatch_map, combine_entropy_map, slot_similarity or class_expert_matrix"


def refuse_soft_layer(name: str, what: str) -> None:
    """The clear error for a sparse-only picture asked of the Soft MoE layer ``name``."""
    raise ValueError(
        f"layer {name!r} is a Soft MoE layer: {what} applies to sparse (top-K or "
        "expert-choice) layers only; a Soft MoE layer mixes every token into every slot, "
        f"drops nothing and has no per-token expert choice. Use {SOFT_LAYER_PICTURES}"
    )


def ungroup(values: torch.Tensor, batch_size: int, tokens_per_image: int) -> torch.Tensor:
    """[G, S, ...] per-group values -> [B, N, ...] per-image values (padding cut off)."""
    G, S = values.shape[:2]
    T = batch_size * tokens_per_image
    if T > G * S:
        raise ValueError(
            f"plan holds {G}x{S} tokens, fewer than B*N = {batch_size}*{tokens_per_image}"
        )
    return values.reshape(G * S, *values.shape[2:])[:T].reshape(
        batch_size, tokens_per_image, *values.shape[2:]
    )


@dataclass
class _Forward:
    """One recorded forward of one layer: its plan (on CPU) and the input's B, N."""

    plan: RoutingPlan
    batch_size: int
    tokens_per_image: int


@dataclass
class TokenRouting:
    """Routing of every token of every recorded image for one layer (numpy arrays).

    Attributes:
        expert: [B, N, K] int64, the chosen experts, best first.
        kept: [B, N, K] bool, the assignment got a buffer place (False: dropped).
        gates: [B, N, E] float32, the router's softmax.
    """

    expert: np.ndarray
    kept: np.ndarray
    gates: np.ndarray

    @property
    def dropped(self) -> np.ndarray:
        """[B, N, K] bool: the assignment was dropped (over capacity)."""
        return ~self.kept

    @property
    def priority(self) -> np.ndarray:
        """[B, N] float32: the largest gate, the score Batch Priority Routing sorts by."""
        return self.gates.max(-1)


@dataclass
class SoftTokenRouting:
    """Soft MoE routing of every token of every recorded image for one layer (numpy arrays).

    Attributes:
        dispatch: [B, N, E, P] float32, the weight of each token in each slot (e, p) of its
            routing group (for every slot, the weights over the group's tokens sum to 1; with one
            image per group, over the image's tokens).
        combine: [B, N, E, P] float32, the weight of each slot in each token's output (sums to 1
            over (E, P) for every token).
    """

    dispatch: np.ndarray
    combine: np.ndarray

    @property
    def combine_entropy(self) -> np.ndarray:
        """[B, N] (or [N] for one image) float32: entropy (nats) of each token's combine weights
        over the E*P slots: 0 when one slot makes the output, log(E*P) when all count equally."""
        c = self.combine.reshape(*self.combine.shape[:-2], -1)
        return -np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0).sum(-1).astype(np.float32)


class RoutingRecord:
    """The plans recorded by ``record_routing``, with per-image views.

    Attributes:
        layer_names: recorded MoE layers, in module order.
        layers: name -> MoeMlp (kept for their routers, e.g. to re-route recorded gates).
        grid_size: (h, w) patch grid of the recorded images, or None before any forward.
        patch_size: (ph, pw) pixels per patch, or None if the model has no ``patch_embed``.
        num_prefix_tokens: P, tokens before the patches (class token, registers).
        prefix_labels: P names ("cls", "reg1", ...).
    """

    def __init__(
        self,
        layers: Dict[str, MoeMlp],
        patch_size: Optional[Tuple[int, int]],
        num_prefix_tokens: int,
        grid_size: Optional[Tuple[int, int]] = None,
    ):
        self.layers = dict(layers)
        self.layer_names: List[str] = list(layers)
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size
        # Names of the prefix tokens, drawn beside the patch grid (timm: class token first).
        self.prefix_labels: List[str] = (
            ["cls"] if num_prefix_tokens == 1 else [f"tok{p}" for p in range(num_prefix_tokens)]
        )
        self.forwards: Dict[str, List[_Forward]] = {name: [] for name in layers}
        self._cache: Dict[str, TokenRouting] = {}

    # --- bookkeeping -----------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Images recorded so far (the same for every layer)."""
        return sum(f.batch_size for f in self.forwards[self.layer_names[0]])

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) in pixels covered by the patch grid, or None if unknown."""
        if self.grid_size is None or self.patch_size is None:
            return None
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    def check_layer(self, layer: str) -> str:
        if layer not in self.forwards:
            raise ValueError(
                f"layer {layer!r} was not recorded; recorded layers: {self.layer_names}"
            )
        return layer

    def check_nonempty(self) -> None:
        if self.num_images == 0:
            raise ValueError(
                "no forward pass was recorded: call the model inside "
                "`with record_routing(model) as record:` (is the dataset empty?)"
            )

    def is_top_k(self, layer: str) -> bool:
        """True for a top-K layer (False for expert-choice and Soft MoE layers)."""
        return not (
            isinstance(self.layers[self.check_layer(layer)].router, ExpertChoiceRouter)
            or self.is_soft(layer)
        )

    def is_soft(self, layer: str) -> bool:
        """True for a Soft MoE layer (its recorded plans are SoftRoutingPlans)."""
        forwards = self.forwards[self.check_layer(layer)]
        if forwards:
            return isinstance(forwards[0].plan, SoftRoutingPlan)
        return self.layers[layer].is_soft

    def check_sparse(self, layer: str, what: str) -> str:
        """``layer``, or the clear ValueError when it is a Soft MoE layer."""
        if self.is_soft(layer):
            refuse_soft_layer(layer, what)
        return layer

    def _add(self, name: str, plan: RoutingPlan, batch_size: int, tokens_per_image: int) -> None:
        self.forwards[name].append(_Forward(plan.detach().to("cpu"), batch_size, tokens_per_image))
        self._cache.pop(name, None)

    # --- views -----------------------------------------------------------------------------
    def plans(self, layer: str) -> List[RoutingPlan]:
        """The layer's recorded plans, one per forward, in order (tensors on CPU)."""
        return [f.plan for f in self.forwards[self.check_layer(layer)]]

    def tokens(self, layer: str) -> TokenRouting:
        """All recorded images' routing for ``layer``: arrays [B, N, ...] over every forward."""
        self.check_nonempty()
        self.check_sparse(layer, "per-token expert choices (patch maps, priority, expert load)")
        if layer not in self._cache:
            parts = self._parts(layer)
            self._cache[layer] = TokenRouting(
                expert=self._cat(parts, lambda p: p.expert_index).numpy(),
                kept=self._cat(parts, lambda p: p.slot >= 0).numpy(),
                gates=self._cat(parts, lambda p: p.gates.float()).numpy(),
            )
        return self._cache[layer]

    def _parts(self, layer: str) -> List[_Forward]:
        parts = self.forwards[self.check_layer(layer)]
        lengths = sorted({f.tokens_per_image for f in parts})
        if len(lengths) > 1:
            raise ValueError(
                f"layer {layer!r} saw images of different token counts {lengths}; "
                "record each image size in its own record_routing block"
            )
        return parts

    def soft_tokens(self, layer: str) -> SoftTokenRouting:
        """All recorded images' Soft MoE routing for ``layer``: arrays [B, N, E, P] over every
        forward. ValueError for a sparse layer (use ``tokens``)."""
        self.check_nonempty()
        if not self.is_soft(layer):
            raise ValueError(
                f"layer {layer!r} is a sparse MoE layer, not a Soft MoE layer: use tokens()"
            )
        if layer not in self._cache:
            parts = self._parts(layer)
            self._cache[layer] = SoftTokenRouting(
                dispatch=self._cat(parts, lambda p: p.dispatch_weight.float()).numpy(),
                combine=self._cat(parts, lambda p: p.combine_weight.float()).numpy(),
            )
        return self._cache[layer]

    def soft_image(self, index: int, layer: str) -> SoftTokenRouting:
        """Soft MoE routing of recorded image ``index``: arrays [N, E, P]."""
        tokens = self.soft_tokens(layer)
        self._check_index(index, len(tokens.dispatch))
        return SoftTokenRouting(tokens.dispatch[index], tokens.combine[index])

    @staticmethod
    def _check_index(index, count: int) -> None:
        if (
            isinstance(index, bool)
            or not isinstance(index, (int, np.integer))
            or not 0 <= index < count
        ):
            raise ValueError(f"image index must be an int in [0, {count}), got index={index!r}")

    @staticmethod
    def _cat(parts: Sequence[_Forward], field) -> torch.Tensor:
        return torch.cat([ungroup(field(f.plan), f.batch_size, f.tokens_per_image) for f in parts])

    def image(self, index: int, layer: str) -> TokenRouting:
        """Routing of recorded image ``index`` (0-based over all forwards): arrays [N, ...]."""
        tokens = self.tokens(layer)
        self._check_index(index, len(tokens.expert))
        return TokenRouting(tokens.expert[index], tokens.kept[index], tokens.gates[index])

    def split_tokens(self, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """[..., N] per-token values -> (prefix [..., P], patches [..., h, w])."""
        if self.grid_size is None:
            raise ValueError(
                "the patch grid is unknown: the model has no `patch_embed` and no "
                "grid_size was given to record_routing"
            )
        h, w = self.grid_size
        P = self.num_prefix_tokens
        if values.shape[-1] != P + h * w:
            raise ValueError(
                f"images have {values.shape[-1]} tokens but the grid {h}x{w} plus "
                f"{P} prefix tokens make {P + h * w}"
            )
        return values[..., :P], values[..., P:].reshape(*values.shape[:-1], h, w)

    def reroute(self, layer: str, capacity_factor: float, batch_priority: bool) -> np.ndarray:
        """[B, N, K] bool: which assignments would be kept if the recorded gates were routed
        again at ``capacity_factor`` with (``batch_priority=True``) or without BPR.

        Uses the layer's own ``router.route`` on the recorded gates [G, S, E] and groups, so
        group membership and priorities are the recorded ones.
        """
        moe = self.layers[
            self.check_sparse(layer, "re-routing at another capacity factor (BPR what-if)")
        ]
        if not self.is_top_k(layer):
            raise ValueError(
                f"layer {layer!r} uses expert-choice routing: it has no per-token "
                "priority, re-routing with BPR does not apply"
            )
        self.check_nonempty()
        kept = []
        with routing_settings(
            {layer: moe}, capacity_factor=capacity_factor, batch_priority=batch_priority
        ):
            for f in self.forwards[layer]:
                plan = moe.router.route(
                    f.plan.gates.to(moe.router.weight.device),
                    None if f.plan.valid is None else f.plan.valid.to(moe.router.weight.device),
                )
                kept.append(ungroup(plan.slot.cpu() >= 0, f.batch_size, f.tokens_per_image))
        return torch.cat(kept).numpy()


def _patch_geometry(model: nn.Module) -> Tuple[Optional[Tuple[int, int]], Optional[nn.Module]]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return None, None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (int(size[0]), int(size[1])), patch_embed


def image_grid(model: nn.Module, images: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(h, w) patch grid the model makes of ``images`` [B, C, H, W]; None without ``patch_embed``.

    Raises ValueError (instead of timm's AssertionError) when the size does not fit the model.
    """
    patch_size, patch_embed = _patch_geometry(model)
    if patch_embed is None:
        return None
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a tensor [B, C, H, W], got {type(images).__name__} "
            f"of shape {tuple(getattr(images, 'shape', ()))}"
        )
    H, W = images.shape[-2:]
    expected = getattr(patch_embed, "img_size", None)
    if (
        expected is not None
        and getattr(patch_embed, "strict_img_size", False)
        and (H, W) != tuple(expected)
    ):
        raise ValueError(
            f"images are {H}x{W} pixels but the model expects {expected[0]}x{expected[1]} "
            "(model.patch_embed.img_size); resize them or build the model for this size"
        )
    ph, pw = patch_size
    if getattr(patch_embed, "dynamic_img_pad", False):
        return (-(-H // ph), -(-W // pw))
    if H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    return (H // ph, W // pw)


@contextlib.contextmanager
def record_routing(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    grid_size: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: Optional[int] = None,
) -> Iterator[RoutingRecord]:
    """Context manager: every forward of ``model`` inside it appends each MoE layer's plan.

    Example::

        with record_routing(model) as record:
            for images, _ in loader:
                model(images)            # images [B, 3, H, W]
        record.image(0, "blocks.3.mlp").expert   # [N, K]

    Args:
        model: a module with MoeMlp layers (a timm ViT: the patch grid and the number of prefix
            tokens are read from ``model.patch_embed`` and ``model.num_prefix_tokens``).
        layers: names of the MoE layers to record (default: all).
        grid_size: (h, w) patch grid, for models without ``patch_embed``.
        num_prefix_tokens: P, default ``model.num_prefix_tokens`` or 0.

    Raises ValueError for a model without MoE layers, an unknown layer name, or images whose
    size does not match the model's (checked before the forward runs).
    """
    all_layers = require_moe_layers(model)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown or not names:
        raise ValueError(
            f"layers must name MoE layers of the model, got {unknown or names}; "
            f"MoE layers: {list(all_layers)}"
        )
    patch_size, patch_embed = _patch_geometry(model)
    prefix = (
        num_prefix_tokens
        if num_prefix_tokens is not None
        else int(getattr(model, "num_prefix_tokens", 0))
    )
    record = RoutingRecord(
        {n: all_layers[n] for n in names},
        patch_size,
        prefix,
        tuple(grid_size) if grid_size is not None else None,
    )
    if getattr(model, "cls_token", None) is not None or prefix > 1:
        has_cls = getattr(model, "cls_token", None) is not None
        record.prefix_labels = (["cls"] if has_cls else []) + [
            f"reg{i + 1}" for i in range(prefix - has_cls)
        ]

    def check_images(module, args):
        images = args[0] if args else None
        if patch_embed is None or not isinstance(images, torch.Tensor) or images.dim() != 4:
            return
        grid = image_grid(model, images)
        if record.grid_size is not None and record.num_images and grid != record.grid_size:
            raise ValueError(
                f"images of grid {grid} after images of grid {record.grid_size}: record "
                "each image size in its own record_routing block"
            )
        record.grid_size = grid

    def make_hook(name: str):
        def hook(module: MoeMlp, args, output):
            B, N = args[0].shape[:2]
            record._add(name, module.last_plan, int(B), int(N))

        return hook

    handles = [model.register_forward_pre_hook(check_images)]
    try:
        handles += [all_layers[n].register_forward_hook(make_hook(n)) for n in names]
        yield record
    finally:
        for handle in handles:
            handle.remove()
