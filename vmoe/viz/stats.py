"""Dataset-level routing plots: expert load per layer, and the class x expert matrix.

Counts are read from the recorded plans (``expert_index``, ``slot``, ``valid``); padding tokens
are never counted.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from vmoe.moe import ExpertChoiceRouter, RoutingPlan, SoftRoutingPlan

from .record import RoutingRecord
from .style import DROPPED_HATCH, expert_colors

__all__ = [
    "expert_load",
    "expert_load_counts",
    "expert_load_chart",
    "class_expert_matrix",
    "mutual_information",
]


def _names(record: RoutingRecord, layers: Optional[Sequence[str]]) -> List[str]:
    record.check_nonempty()
    names = list(record.layer_names if layers is None else layers)
    if not names:
        raise ValueError("layers must name at least one recorded layer, got an empty list")
    return [record.check_layer(n) for n in names]


def _panel_grid(count: int, max_cols: int = 4, panel=(3.4, 3.0), extra=(0.0, 0.9)):
    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel[0] * cols + extra[0], panel[1] * rows + extra[1]),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


@torch.no_grad()
def expert_load_counts(
    plan: RoutingPlan, router: nn.Module
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Assignment counts of one forward's plan, padding tokens excluded.

    Args:
        plan: a layer's RoutingPlan ([G, S, K] fields).
        router: that layer's router; an expert-choice router counts only the tokens each expert
            picked (K = 1 below, routed = kept: nothing is "dropped").
    Returns:
        (routed, kept, capacity): ``routed`` [K, E] and ``kept`` [K, E] int64 assignments sent
        to / processed by each expert per choice, on the plan's device (no host sync);
        ``capacity`` the buffer slots per expert summed over the G groups.
    """
    if isinstance(plan, SoftRoutingPlan):
        raise ValueError(
            "expert_load_counts: a Soft MoE plan (SoftRoutingPlan) routes every token to "
            "every slot and drops nothing, there are no assignments to count; "
            "see vmoe.moe.soft_routing_statistics for its importance"
        )
    G, S, K = plan.expert_index.shape
    E = plan.num_experts
    valid = (
        (
            torch.ones(G, S, dtype=torch.bool, device=plan.slot.device)
            if plan.valid is None
            else plan.valid
        )
        .unsqueeze(-1)
        .expand(G, S, K)
    )
    kept = plan.kept & valid
    if isinstance(router, ExpertChoiceRouter):
        picked = (
            torch.zeros(E, dtype=torch.long, device=kept.device)
            .scatter_add_(0, plan.expert_index.reshape(-1), kept.reshape(-1).long())
            .view(1, E)
        )
        return picked, picked.clone(), plan.num_groups * plan.capacity
    # One bin per (choice, expert): row k of the [K, E] tables.
    bins = (plan.expert_index + torch.arange(K, device=kept.device) * E).reshape(-1)
    counts = torch.zeros(2, K * E, dtype=torch.long, device=kept.device)
    counts[0].scatter_add_(0, bins, valid.reshape(-1).long())
    counts[1].scatter_add_(0, bins, kept.reshape(-1).long())
    return counts[0].view(K, E), counts[1].view(K, E), plan.num_groups * plan.capacity


def expert_load(record: RoutingRecord, layers: Optional[Sequence[str]] = None):
    """Tokens routed to each expert vs its capacity, per layer, over every recorded forward.

    Counts of ``expert_load_counts`` summed over the forwards, drawn by ``expert_load_chart``.
    Returns ``expert_load_chart``'s (figure, numbers).
    """
    names = _names(record, layers)
    for name in names:
        record.check_sparse(name, "the expert load (tokens routed vs capacity)")
    totals = []
    for name in names:
        counts = [
            expert_load_counts(plan, record.layers[name].router) for plan in record.plans(name)
        ]
        totals.append(
            (sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts))
        )
    shapes = {tuple(routed.shape[::-1]) for routed, _, _ in totals}
    if len(shapes) > 1:
        raise ValueError(
            f"layers differ in (experts, choices) {sorted(shapes)}: plot them separately"
        )
    return expert_load_chart(
        names,
        np.stack([t[0].numpy() for t in totals]),
        np.stack([t[1].numpy() for t in totals]),
        np.array([t[2] for t in totals]),
        f"Expert load over {record.num_images} images (bar colors: experts)",
    )


def expert_load_chart(
    layers: Sequence[str],
    routed: np.ndarray,
    kept: np.ndarray,
    capacity: np.ndarray,
    title: str = "Expert load (bar colors: experts)",
):
    """Bars per expert and layer, stacked: kept 1st-choice assignments, kept later choices,
    dropped ones (hatched). The dashed line is the capacity.

    Args:
        layers: [L] layer names (panel titles).
        routed: [L, K, E] assignment counts per choice and expert (``expert_load_counts``
            summed over forwards).
        kept: [L, K, E] the counts of those that fit in the buffers.
        capacity: [L] buffer slots per expert summed over the counted groups.
    Returns:
        (figure, numbers) with numbers: ``layers``; ``routed`` [L, K, E] and ``kept`` [L, K, E];
        ``capacity`` [L]; ``dropped_fraction`` [L], dropped / routed assignments.
    """
    names = list(layers)
    routed, kept = np.asarray(routed, dtype=np.int64), np.asarray(kept, dtype=np.int64)
    capacity = np.asarray(capacity, dtype=np.int64)
    _, K, E = routed.shape
    dropped_fraction = 1.0 - kept.sum((1, 2)) / np.maximum(routed.sum((1, 2)), 1)

    fig, axes = _panel_grid(len(names))
    colors = expert_colors(E)
    x = np.arange(E)
    for i, (ax, name) in enumerate(zip(axes, names)):
        bottom = np.zeros(E)
        for k in range(K):
            ax.bar(
                x,
                kept[i, k],
                bottom=bottom,
                color=colors,
                alpha=1.0 if k == 0 else 0.45,
                edgecolor="black",
                linewidth=0.5,
                hatch=None if k == 0 else "///",
            )
            bottom += kept[i, k]
        drop = (routed[i] - kept[i]).sum(0)
        ax.bar(
            x,
            drop,
            bottom=bottom,
            color="white",
            edgecolor="black",
            linewidth=0.5,
            hatch=DROPPED_HATCH,
        )
        ax.axhline(capacity[i], color="black", linestyle="--", linewidth=1)
        ax.set_xticks(x, [str(e) for e in x], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("token assignments", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylim(0, max(capacity[i], routed[i].sum(0).max()) * 1.12)
        ax.set_title(f"{name}\n{dropped_fraction[i]:.1%} of assignments dropped", fontsize=9)
    handles = [Patch(facecolor="#808080", edgecolor="black", label="kept, 1st choice")]
    if K > 1:
        handles.append(
            Patch(
                facecolor="#808080",
                alpha=0.45,
                edgecolor="black",
                hatch="///",
                label="kept, 2nd choice" if K == 2 else "kept, later choices",
            )
        )
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch=DROPPED_HATCH, label="dropped"),
        Line2D([], [], color="black", linestyle="--", label="capacity (all groups)"),
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False
    )
    fig.suptitle(title, fontsize=11)
    return fig, {
        "layers": names,
        "routed": routed,
        "kept": kept,
        "capacity": capacity,
        "dropped_fraction": dropped_fraction,
    }


def mutual_information(counts: np.ndarray) -> float:
    """I(class; expert) in bits from a [C, E] count table (plug-in estimate: the empirical joint
    distribution of (image class, token's expert); biased upward when counts are few)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("mutual_information needs a count table with a positive total")
    joint = counts / total
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / outer[nz])).sum())


def class_expert_matrix(
    record: RoutingRecord,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    layers: Optional[Sequence[str]] = None,
    choice: Optional[int] = 0,
    kept_only: bool = False,
    include_prefix: bool = False,
    class_names: Optional[Sequence[str]] = None,
):
    """How each class's patches spread over the experts, per layer, over the recorded images.

    Args:
        record: from ``record_routing`` over a dataset.
        labels: [num_images] int class of each recorded image, in recording order.
        choice: count the experts of this choice (0: first choice), or None for every kept
            assignment (the only option for expert-choice layers). A Soft MoE layer counts, for
            every token, its combine weights summed over each expert's slots (the share of the
            token's output each expert makes); ``choice`` and ``kept_only`` do not apply to it.
        kept_only: count only assignments that got a buffer place (default: the router's choice).
        include_prefix: count the prefix tokens (class token) too (default: patches only).
        class_names: names of the class ids, for the tick labels.
    Returns:
        (figure, numbers) with numbers: ``layers``; ``classes`` [C] class ids present;
        ``counts`` [L, C, E] (float: combine mass, for Soft MoE layers); ``matrix`` [L, C, E]
        rows normalized to sum to 1 (class and expert ids in increasing order); ``class_order``
        [L, C] and ``expert_order`` [L, E] the display order (experts by total load, classes
        grouped by their most used expert, strongest first); ``mutual_information_bits`` [L],
        I(class; expert) in bits.
    """
    names = _names(record, layers)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if (
        labels.ndim != 1
        or len(labels) != record.num_images
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise ValueError(
            f"labels must be {record.num_images} ints (one per recorded image), got "
            f"shape {labels.shape} dtype {labels.dtype}"
        )
    classes = np.unique(labels)
    row_of = np.searchsorted(classes, labels)  # [B]
    counts_all = []
    for name in names:
        P = 0 if include_prefix else record.num_prefix_tokens
        if record.is_soft(name):
            # Soft MoE: each token's combine weights summed over each expert's slots [B, N', E];
            # a class's row then sums to its number of tokens, like the sparse counts.
            mass = record.soft_tokens(name).combine[:, P:].sum(-1).astype(np.float64)
            table = np.zeros((len(classes), mass.shape[-1]))
            np.add.at(table, row_of, mass.sum(1))
            counts_all.append(table)
            continue
        view = record.tokens(name)
        E = view.gates.shape[-1]
        expert, kept = view.expert[:, P:], view.kept[:, P:]  # [B, N', K]
        if choice is None:
            mask = kept
        else:
            if not record.is_top_k(name):
                raise ValueError(f"layer {name!r} uses expert-choice routing: pass choice=None")
            if not 0 <= choice < expert.shape[-1]:
                raise ValueError(
                    f"choice must be None or in [0, {expert.shape[-1]}), got choice={choice}"
                )
            expert, kept = expert[..., choice : choice + 1], kept[..., choice : choice + 1]
            mask = kept if kept_only else np.ones_like(kept)
        rows = np.broadcast_to(row_of[:, None, None], expert.shape)
        table = np.zeros((len(classes), E), dtype=np.int64)
        np.add.at(table, (rows[mask], expert[mask]), 1)
        counts_all.append(table)
    counts = np.stack(counts_all)
    totals = counts.sum(-1, keepdims=True)
    if (totals == 0).any():
        raise ValueError("some class has no counted token (all dropped?): use kept_only=False")
    matrix = counts / totals
    expert_order = np.argsort(-counts.sum(1), axis=-1, kind="stable")  # [L, E]
    class_order = []
    for i in range(len(names)):
        rank = np.argsort(expert_order[i])  # expert -> display position
        top = matrix[i].argmax(-1)
        class_order.append(np.lexsort((-matrix[i, np.arange(len(classes)), top], rank[top])))
    class_order = np.stack(class_order)
    mi = np.array([mutual_information(c) for c in counts])

    names_of = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
    fig, axes = _panel_grid(
        len(names), max_cols=3, panel=(3.6, max(2.6, 0.18 * len(classes) + 1.2))
    )
    for i, (ax, name) in enumerate(zip(axes, names)):
        shown = matrix[i][class_order[i]][:, expert_order[i]]
        im = ax.imshow(
            shown, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(np.arange(shown.shape[1]), [str(e) for e in expert_order[i]], fontsize=7)
        if len(classes) <= 40:
            ax.set_yticks(
                np.arange(len(classes)), [names_of[c] for c in class_order[i]], fontsize=7
            )
        else:
            ax.set_yticks([])
        ax.set_xlabel("expert (by load)", fontsize=8)
        ax.set_ylabel("class", fontsize=8)
        ax.set_title(f"{name}\nI(class; expert) = {mi[i]:.3f} bits", fontsize=9)
    fig.colorbar(
        im, ax=list(axes)[: len(names)], fraction=0.04, label="share of the class's tokens"
    )
    what = "first-choice" if choice == 0 else ("kept" if choice is None else f"choice-{choice + 1}")
    if all(record.is_soft(n) for n in names):
        what = "combine-weighted"
    fig.suptitle(
        f"Class x expert: {what} expert of each class's "
        f"{'tokens' if include_prefix else 'patches'}",
        fontsize=11,
    )
    return fig, {
        "layers": names,
        "classes": classes,
        "counts": counts,
        "matrix": matrix,
        "class_order": class_order,
        "expert_order": expert_order,
        "mutual_information_bits": mi,
    }
