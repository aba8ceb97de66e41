"""Per-image maps: the expert of each patch, and Batch Priority Routing's priority and drops.

Both read a ``RoutingRecord`` (see ``record.py``); the priority map re-routes the recorded gates
with the layer's own ``router.route`` at other capacity factors, never re-implementing routing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .record import RoutingRecord
from .style import (
    DROPPED_HATCH,
    SKIPPED_COLOR,
    ImageLike,
    draw_token_grid,
    expert_colors,
    expert_legend_handles,
    new_figure,
    to_display_image,
)

__all__ = ["patch_map", "priority_map"]

_ORDINAL = ["1st", "2nd", "3rd"]


def _ordinal(k: int) -> str:
    return _ORDINAL[k] if k < len(_ORDINAL) else f"{k + 1}th"


def _layers(
    record: RoutingRecord,
    layers: Optional[Sequence[str]],
    top_k_only: bool,
    what: str = "the patch map",
) -> List[str]:
    record.check_nonempty()
    names = list(record.layer_names if layers is None else layers)
    if not names:
        raise ValueError("layers must name at least one recorded layer, got an empty list")
    for name in names:
        record.check_sparse(name, what)
        if top_k_only and not record.is_top_k(name):
            raise ValueError(
                f"layer {name!r} uses expert-choice routing: tokens have no ranked "
                "choices to map; use expert_load or class_expert_matrix(choice=None)"
            )
    if record.grid_size is None:
        raise ValueError(
            "the patch grid is unknown: record a forward of a model with `patch_embed` "
            "or pass grid_size to record_routing"
        )
    return names


def patch_map(
    record: RoutingRecord,
    index: int = 0,
    image: Optional[ImageLike] = None,
    layers: Optional[Sequence[str]] = None,
    choices: Optional[int] = None,
):
    """Each patch of recorded image ``index`` colored by its k-th choice expert, per layer.

    Rows: layers; columns: 1st choice, 2nd choice, ... (``choices`` panels, default min(K, 2)).
    Dropped assignments (over capacity) are hatched; prefix tokens (class token) are drawn as
    squares left of the grid.

    Args:
        record: from ``record_routing``.
        index: which recorded image (0-based over all recorded forwards).
        image: the image shown under the colors (tensor [C,H,W] or array [H,W,C] / [H,W]) whose
            size must be the model's input size; None draws the colors alone.
        layers: layer names (default: every recorded layer).
    Returns:
        (figure, numbers) with numbers: ``layers`` list [L]; ``expert`` [L, k, h, w] int64 and
        ``dropped`` [L, k, h, w] bool for the patches; ``prefix_expert`` / ``prefix_dropped``
        [L, k, P] for the prefix tokens; ``grid_size`` (h, w).
    """
    names = _layers(record, layers, top_k_only=True)
    K = min(record.tokens(n).expert.shape[-1] for n in names)
    num_choices = min(K, 2) if choices is None else choices
    if (
        isinstance(num_choices, bool)
        or not isinstance(num_choices, int)
        or not 1 <= num_choices <= K
    ):
        raise ValueError(f"choices must be an int in [1, {K}], got choices={choices!r}")
    background = to_display_image(image, "image", record.image_size)
    num_experts = max(record.tokens(n).gates.shape[-1] for n in names)
    colors = expert_colors(num_experts)

    numbers: Dict[str, object] = {"layers": names, "grid_size": record.grid_size}
    experts, dropped, prefix_experts, prefix_dropped = [], [], [], []
    # About 1.6 inches per legend entry, so the legend never runs past the figure's edge; each
    # legend row gets its own height so it cannot push into the titles.
    ncol = max(1, min(num_experts + 1, int(2.8 * num_choices / 1.6)))
    fig, axes = new_figure(
        len(names), num_choices, extra_height=0.25 * -(-(num_experts + 1) // ncol)
    )
    for row, name in enumerate(names):
        view = record.image(index, name)
        # [N, k] -> [k, N] so that split_tokens cuts the token axis.
        pre_e, grid_e = record.split_tokens(view.expert[:, :num_choices].T)
        pre_d, grid_d = record.split_tokens(view.dropped[:, :num_choices].T)
        experts.append(grid_e)
        dropped.append(grid_d)
        prefix_experts.append(pre_e)
        prefix_dropped.append(pre_d)
        for k in range(num_choices):
            ax = axes[row, k]
            draw_token_grid(
                ax,
                background,
                record.grid_size,
                colors[grid_e[k]],
                colors[pre_e[k]],
                grid_d[k],
                pre_d[k],
                record.prefix_labels,
                image_size=record.image_size,
                outline=True,  # experts' colors unshaded by the image
            )
            ax.set_title(f"{name}\n{_ordinal(k)} choice", fontsize=9)
            n_drop = int(grid_d[k].sum() + pre_d[k].sum())
            ax.set_xlabel(f"{n_drop}/{view.expert.shape[0]} tokens dropped", fontsize=8)
    numbers.update(
        expert=np.stack(experts),
        dropped=np.stack(dropped),
        prefix_expert=np.stack(prefix_experts),
        prefix_dropped=np.stack(prefix_dropped),
    )
    fig.suptitle(f"Expert chosen by each patch (image {index})", fontsize=11)
    fig.legend(
        handles=expert_legend_handles(num_experts),
        loc="outside lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )
    return fig, numbers


def priority_map(
    record: RoutingRecord,
    index: int = 0,
    image: Optional[ImageLike] = None,
    layers: Optional[Sequence[str]] = None,
    capacity_factors: Sequence[float] = (0.5,),
    modes: Sequence[str] = ("bpr", "vanilla"),
) -> Tuple[Figure, Dict[Any, Any]]:
    """BPR priority of each patch and which patches lower capacity would leave unprocessed.

    Column 1: each token's priority score, its largest gate (what BPR sorts by). Then, for each
    capacity factor and mode ('bpr': highest priority first; 'vanilla': earlier tokens of the
    group first), the recorded gates are routed again with the layer's ``router.route`` and the
    patches that no expert would process (every choice dropped) are filled and hatched.

    Returns:
        (figure, numbers) with numbers: ``layers``; ``priority`` [L, h, w] and
        ``prefix_priority`` [L, P]; and keyed by ``(mode, capacity_factor)``: ``dropped`` and
        ``prefix_dropped`` ([L, K, h, w] / [L, K, P] bool, per choice) and ``skipped``
        ([L, h, w] bool, no choice kept).
    """
    names = _layers(
        record, layers, top_k_only=True, what="the priority map (Batch Priority Routing)"
    )
    for mode in modes:
        if mode not in ("bpr", "vanilla"):
            raise ValueError(f"modes must hold 'bpr' and/or 'vanilla', got {mode!r}")
    if not len(capacity_factors):
        raise ValueError("capacity_factors must hold at least one value")
    background = to_display_image(image, "image", record.image_size)
    columns: List[Tuple[str, float]] = [(m, float(c)) for c in capacity_factors for m in modes]
    fig, axes = new_figure(len(names), 1 + len(columns), extra_width=0.6)
    numbers: Dict[str, object] = {
        "layers": names,
        "grid_size": record.grid_size,
        "priority": [],
        "prefix_priority": [],
        "dropped": {c: [] for c in columns},
        "prefix_dropped": {c: [] for c in columns},
        "skipped": {c: [] for c in columns},
    }
    # The largest of E gates is at least 1/E: start the color scale there for contrast.
    num_experts = max(record.tokens(n).gates.shape[-1] for n in names)
    norm = Normalize(1.0 / num_experts, 1.0)
    cmap = plt.get_cmap("viridis")
    labels = record.prefix_labels
    for row, name in enumerate(names):
        view = record.image(index, name)
        pre_p, grid_p = record.split_tokens(view.priority)
        numbers["priority"].append(grid_p)
        numbers["prefix_priority"].append(pre_p)
        ax = axes[row, 0]
        draw_token_grid(
            ax,
            None,
            record.grid_size,
            cmap(norm(grid_p)),
            cmap(norm(pre_p)),
            prefix_labels=labels,
            image_size=record.image_size,
        )
        ax.set_title(f"{name}\npriority (top-1 gate)", fontsize=9)
        for col, (mode, cf) in enumerate(columns, start=1):
            kept = record.reroute(name, cf, batch_priority=(mode == "bpr"))[index]  # [N, K]
            pre_d, grid_d = record.split_tokens((~kept).T)
            pre_s, grid_s = pre_d.all(0), grid_d.all(0)
            numbers["dropped"][(mode, cf)].append(grid_d)
            numbers["prefix_dropped"][(mode, cf)].append(pre_d)
            numbers["skipped"][(mode, cf)].append(grid_s)
            shade = np.zeros(grid_s.shape + (4,))
            shade[grid_s] = SKIPPED_COLOR  # skipped patches filled; kept ones left clear
            pre_shade = np.where(pre_s[:, None], SKIPPED_COLOR, (1.0, 1.0, 1.0, 1.0))
            ax = axes[row, col]
            draw_token_grid(
                ax,
                background,
                record.grid_size,
                shade,
                pre_shade,
                grid_s,
                pre_s,
                labels,
                alpha=None,
                image_size=record.image_size,
            )
            title = "BPR" if mode == "bpr" else "vanilla"
            ax.set_title(f"{title}, capacity factor {cf:g}", fontsize=9)
            ax.set_xlabel(f"{int(grid_s.sum())}/{grid_s.size} patches skipped", fontsize=8)
    for key in ("priority", "prefix_priority"):
        numbers[key] = np.stack(numbers[key])
    for key in ("dropped", "prefix_dropped", "skipped"):
        numbers[key] = {c: np.stack(v) for c, v in numbers[key].items()}
    fig.colorbar(
        ScalarMappable(norm, cmap),
        ax=axes[:, 0].tolist(),
        location="left",
        fraction=0.05,
        label="priority (largest gate)",
    )
    fig.suptitle(
        f"Batch Priority Routing: priority and skipped patches (image {index})", fontsize=11
    )
    fig.legend(
        handles=[
            Patch(
                facecolor=SKIPPED_COLOR,
                edgecolor="black",
                hatch=DROPPED_HATCH,
                label="skipped: every choice over capacity (output = residual)",
            )
        ],
        loc="outside lower center",
        fontsize=8,
        frameon=False,
    )
    return fig, numbers


def routing_figure(model, images, index: int = 0):
    """The patch map of ``images[index]`` after one forward of ``images`` ([B, C, H, W]); for a
    model whose MoE layers are all Soft MoE layers, their dispatch map instead.

    The hook the training callback uses for its routing picture (``fn(model, images)``);
    returns only the figure.
    """
    import torch

    from .record import record_routing
    from .soft import dispatch_map

    with record_routing(model) as record, torch.no_grad():
        model(images)
    sparse = [n for n in record.layer_names if not record.is_soft(n)]
    if sparse:
        figure, _ = patch_map(record, index=index, image=images[index], layers=sparse)
    else:
        figure, _ = dispatch_map(record, index=index, image=images[index])
    return figure
