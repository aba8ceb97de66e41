"""Soft MoE pictures: which patches each slot mixes, how each patch's output is combined, and
how alike the slots are.

Axis letters: L layers, E experts, P slots per expert (a slot is one (e, p), flat index
``e * P + p``), h x w the patch grid, Q prefix tokens (class token).

Everything is read from the recorded SoftRoutingPlans (``RoutingRecord.soft_tokens`` and
``vmoe.moe.soft_routing_statistics``), never re-derived. The class x expert picture of a Soft
MoE layer is ``class_expert_matrix`` (it counts the combine weights).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from vmoe.moe import soft_routing_statistics

from .record import RoutingRecord
from .style import ImageLike, draw_token_grid, new_figure, to_display_image

__all__ = ["dispatch_map", "combine_entropy_map", "slot_similarity", "soft_layers"]

MAX_SLOTS = 16
SLOTS_PER_ROW = 8


def soft_layers(record: RoutingRecord, layers: Optional[Sequence[str]] = None) -> List[str]:
    """The recorded Soft MoE layers (default: all of them), checked: ValueError for a sparse
    layer, an empty list, no recorded forward or no soft layer at all."""
    record.check_nonempty()
    names = [n for n in record.layer_names if record.is_soft(n)] if layers is None else list(layers)
    if not names:
        raise ValueError(
            "no Soft MoE layer to draw: "
            + (
                "the model's MoE layers "
                f"{record.layer_names} are sparse (use patch_map, expert_load)"
                if layers is None
                else "layers is an empty list"
            )
        )
    for name in names:
        record.check_layer(name)
        if not record.is_soft(name):
            raise ValueError(
                f"layer {name!r} is a sparse MoE layer: its tokens choose experts, there "
                "are no slots to map; use patch_map, priority_map or expert_load"
            )
    return names


def _need_grid(record: RoutingRecord) -> None:
    if record.grid_size is None:
        raise ValueError(
            "the patch grid is unknown: record a forward of a model with `patch_embed` "
            "or pass grid_size to record_routing"
        )


def _slot_label(slot: int, P: int) -> str:
    return f"expert {slot}" if P == 1 else f"expert {slot // P}, slot {slot % P}"


def dispatch_map(
    record: RoutingRecord,
    index: int = 0,
    image: Optional[ImageLike] = None,
    layers: Optional[Sequence[str]] = None,
    slots: Optional[Sequence[int]] = None,
):
    """Which patches each slot mixes: the dispatch weights of recorded image ``index`` as heat
    maps over the image, one panel per slot, one row per Soft MoE layer.

    A slot (e, p) is the dispatch-weighted mix of its group's tokens (the input of expert e);
    bright patches are the ones it takes most from. With one image per routing group (the
    paper's setting) each panel's weights sum to 1 over the image's tokens.

    Args:
        record: from ``record_routing`` over a model with Soft MoE layers.
        index: which recorded image (0-based over all recorded forwards).
        image: drawn under the heat maps (tensor [C,H,W] or array [H,W,C] / [H,W]), or None.
        layers: Soft MoE layer names (default: every recorded Soft MoE layer).
        slots: flat slot indices ``e * P + p`` to draw (default: the first 16).
    Returns:
        (figure, numbers) with numbers: ``layers`` [L]; ``slots`` [n]; ``dispatch`` [L, n, h, w]
        and ``prefix_dispatch`` [L, n, Q] the drawn weights; ``grid_size`` (h, w).
    """
    names = soft_layers(record, layers)
    _need_grid(record)
    num_slots = min(int(np.prod(record.soft_tokens(n).dispatch.shape[2:])) for n in names)
    chosen = list(range(min(num_slots, MAX_SLOTS))) if slots is None else list(slots)
    if not chosen or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < num_slots
        for s in chosen
    ):
        raise ValueError(
            f"slots must be a non-empty list of slot indices in [0, {num_slots}), got {slots!r}"
        )
    background = to_display_image(image, "image", record.image_size)
    maps, prefix = [], []
    for name in names:
        view = record.soft_image(index, name)  # [N, E, P]
        weights = view.dispatch.reshape(view.dispatch.shape[0], -1)[:, chosen].T  # [n, N]
        pre, grid = record.split_tokens(weights)
        maps.append(grid)
        prefix.append(pre)
    maps, prefix = np.stack(maps), np.stack(prefix)
    norm = Normalize(
        0.0, max(float(maps.max()), float(prefix.max()) if prefix.size else 0.0, 1e-12)
    )
    cmap = plt.get_cmap("magma")
    # Up to 8 slots per row of panels; each layer starts a new row.
    cols = min(len(chosen), SLOTS_PER_ROW)
    rows_per_layer = -(-len(chosen) // cols)
    fig, axes = new_figure(len(names) * rows_per_layer, cols, panel=2.2, extra_width=0.8)
    for ax in axes[:, :].flat:
        ax.set_visible(False)
    for row, name in enumerate(names):
        P = record.soft_tokens(name).dispatch.shape[-1]
        for col, slot in enumerate(chosen):
            ax = axes[row * rows_per_layer + col // cols, col % cols]
            ax.set_visible(True)
            draw_token_grid(
                ax,
                background,
                record.grid_size,
                cmap(norm(maps[row, col])),
                cmap(norm(prefix[row, col])),
                prefix_labels=record.prefix_labels,
                alpha=0.75,
                image_size=record.image_size,
            )
            label = _slot_label(slot, P)
            ax.set_title(f"{name}\n{label}" if col % cols == 0 else label, fontsize=8)
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes.ravel().tolist(),
        fraction=0.02,
        shrink=0.8,
        label="dispatch weight (share of the slot)",
    )
    fig.suptitle(f"Which patches each slot mixes (image {index})", fontsize=11)
    return fig, {
        "layers": names,
        "slots": np.array(chosen),
        "dispatch": maps,
        "prefix_dispatch": prefix,
        "grid_size": record.grid_size,
    }


def combine_entropy_map(
    record: RoutingRecord,
    index: int = 0,
    image: Optional[ImageLike] = None,
    layers: Optional[Sequence[str]] = None,
) -> Tuple[Figure, Dict[str, Any]]:
    """How each patch's output is combined: the entropy of its combine weights over the E*P
    slots, as a heat map over recorded image ``index``, one panel per Soft MoE layer.

    0 nats: one slot makes the patch's output (sparse-like); log(E*P): every slot counts equally.
    The color scale runs from the smallest entropy drawn to log(E*P) of the largest layer.

    Returns:
        (figure, numbers) with numbers: ``layers`` [L]; ``entropy`` [L, h, w] and
        ``prefix_entropy`` [L, Q] in nats; ``max_entropy`` [L] = log(E*P); ``grid_size``.
    """
    names = soft_layers(record, layers)
    _need_grid(record)
    background = to_display_image(image, "image", record.image_size)
    grids, prefix, bound = [], [], []
    for name in names:
        view = record.soft_image(index, name)
        pre, grid = record.split_tokens(view.combine_entropy)
        grids.append(grid)
        prefix.append(pre)
        bound.append(math.log(view.combine.shape[-2] * view.combine.shape[-1]))
    # From the smallest entropy drawn up to the largest possible: trained layers often sit close
    # to log(E*P), and a scale from 0 would hide their differences.
    low = min([float(g.min()) for g in grids] + [float(p.min()) for p in prefix if p.size])
    norm = Normalize(min(low, max(bound) - 1e-6), max(max(bound), 1e-12))
    cmap = plt.get_cmap("viridis")
    fig, axes = new_figure(1, len(names), extra_width=0.9)
    for col, name in enumerate(names):
        ax = axes[0, col]
        draw_token_grid(
            ax,
            background,
            record.grid_size,
            cmap(norm(grids[col])),
            cmap(norm(prefix[col])),
            prefix_labels=record.prefix_labels,
            alpha=0.75,
            image_size=record.image_size,
        )
        ax.set_title(f"{name}\nmax log(E*P) = {bound[col]:.2f}", fontsize=9)
        ax.set_xlabel(f"mean {float(grids[col].mean()):.2f} nats", fontsize=8)
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes.ravel().tolist(),
        fraction=0.04,
        label="combine-weight entropy (nats)",
    )
    fig.suptitle(f"How each patch's output is combined from the slots (image {index})", fontsize=11)
    return fig, {
        "layers": names,
        "entropy": np.stack(grids),
        "prefix_entropy": np.stack(prefix),
        "max_entropy": np.array(bound),
        "grid_size": record.grid_size,
    }


def slot_similarity(
    record: RoutingRecord, layers: Optional[Sequence[str]] = None
) -> Tuple[Figure, Dict[str, Any]]:
    """How alike the slots are: cosine similarity of their dispatch weight vectors (over the
    tokens of a group), averaged over every recorded group, one matrix per Soft MoE layer.

    Near 1 off the diagonal: the slots mix the same tokens, so their experts see near-identical
    inputs. Lines separate the experts when P > 1 (a block per expert).

    Returns:
        (figure, numbers) with numbers: ``layers`` [L]; ``similarity`` [L, E*P, E*P] (the
        ``slot_similarity`` of ``soft_routing_statistics`` averaged over groups);
        ``expert_similarity`` [L, E, E] its mean over each expert's P x P block;
        ``mean_off_diagonal`` [L]; ``slots_per_expert`` [L].
    """
    names = soft_layers(record, layers)
    matrices, experts, off, per_expert = [], [], [], []
    for name in names:
        plans = record.plans(name)
        total = sum(
            soft_routing_statistics(p)["slot_similarity"].double() * p.num_groups for p in plans
        )
        sim = (total / sum(p.num_groups for p in plans)).float().numpy()  # [E*P, E*P]
        E, P = plans[0].num_experts, plans[0].slots_per_expert
        matrices.append(sim)
        experts.append(sim.reshape(E, P, E, P).mean((1, 3)))
        off.append(float(sim[~np.eye(E * P, dtype=bool)].mean()) if E * P > 1 else float("nan"))
        per_expert.append(P)
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(3.6 * cols + 0.8, 3.3 * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        im = ax.imshow(matrices[i], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        P = per_expert[i]
        if P > 1:
            for b in range(P, len(matrices[i]), P):
                ax.axhline(b - 0.5, color="white", linewidth=0.6)
                ax.axvline(b - 0.5, color="white", linewidth=0.6)
        ax.set_xlabel("slot (e*P + p)", fontsize=8)
        ax.set_ylabel("slot", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{name}\nmean off-diagonal {off[i]:.3f}", fontsize=9)
    fig.colorbar(
        im, ax=axes.ravel().tolist()[: len(names)], fraction=0.04, label="cosine similarity"
    )
    fig.suptitle(f"Slot similarity (dispatch weights) over {record.num_images} images", fontsize=11)
    return fig, {
        "layers": names,
        "similarity": np.stack(matrices),
        "expert_similarity": np.stack(experts),
        "mean_off_diagonal": np.array(off),
        "slots_per_expert": np.array(per_expert),
    }
