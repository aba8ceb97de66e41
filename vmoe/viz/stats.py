"""Dataset-level routing plots: expert load per layer, and the class x expert matrix.

Counts are read from the recorded plans (``expert_index``, ``slot``, ``valid``); padding tokens
are never counted.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .record import RoutingRecord
from .style import DROPPED_HATCH, expert_colors

__all__ = ["expert_load", "class_expert_matrix", "mutual_information"]


def _names(record: RoutingRecord, layers: Optional[Sequence[str]]) -> List[str]:
    record.check_nonempty()
    names = list(record.layer_names if layers is None else layers)
    if not names:
        raise ValueError("layers must name at least one recorded layer, got an empty list")
    return [record.check_layer(n) for n in names]


def _panel_grid(count: int, max_cols: int = 4, panel=(3.4, 3.0), extra=(0.0, 0.9)):
    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols + extra[0], panel[1] * rows + extra[1]),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def expert_load(record: RoutingRecord, layers: Optional[Sequence[str]] = None):
    """Tokens routed to each expert vs its capacity, per layer, over every recorded forward.

    Bars per expert, stacked: kept 1st-choice assignments, kept later choices, dropped ones
    (hatched). The dashed line is the capacity: C summed over every recorded group.

    Returns:
        (figure, numbers) with numbers: ``layers``; ``routed`` [L, K, E] and ``kept`` [L, K, E]
        assignment counts per choice and expert (expert-choice layers: K = 1 and
        routed = kept, the tokens each expert picked); ``capacity`` [L], buffer slots per
        expert summed over groups; ``dropped_fraction`` [L], dropped / routed assignments.
    """
    names = _names(record, layers)
    shapes = {(record.plans(n)[0].num_experts, record.plans(n)[0].num_selected if record.is_top_k(n) else 1)
              for n in names}
    if len(shapes) > 1:
        raise ValueError(f"layers differ in (experts, choices) {sorted(shapes)}: plot them separately")
    (E, K), = shapes
    routed = np.zeros((len(names), K, E), dtype=np.int64)
    kept = np.zeros_like(routed)
    capacity = np.zeros(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        for plan in record.plans(name):
            valid = (np.ones(plan.slot.shape[:2], dtype=bool) if plan.valid is None
                     else plan.valid.numpy())[..., None]                        # [G, S, 1]
            expert = plan.expert_index.numpy()                                  # [G, S, K]
            is_kept = plan.kept.numpy() & valid
            if record.is_top_k(name):
                for k in range(K):
                    routed[i, k] += np.bincount(expert[..., k][valid[..., 0]], minlength=E)
                    kept[i, k] += np.bincount(expert[..., k][is_kept[..., k]], minlength=E)
            else:  # expert choice: only the tokens each expert picked count; nothing is "dropped"
                picked = np.bincount(expert[is_kept], minlength=E)
                routed[i, 0] += picked
                kept[i, 0] += picked
            capacity[i] += plan.num_groups * plan.capacity
    dropped_fraction = 1.0 - kept.sum((1, 2)) / np.maximum(routed.sum((1, 2)), 1)

    fig, axes = _panel_grid(len(names))
    colors = expert_colors(E)
    x = np.arange(E)
    for i, (ax, name) in enumerate(zip(axes, names)):
        bottom = np.zeros(E)
        for k in range(K):
            ax.bar(x, kept[i, k], bottom=bottom, color=colors, alpha=1.0 if k == 0 else 0.45,
                   edgecolor="black", linewidth=0.5, hatch=None if k == 0 else "///")
            bottom += kept[i, k]
        drop = (routed[i] - kept[i]).sum(0)
        ax.bar(x, drop, bottom=bottom, color="white", edgecolor="black", linewidth=0.5, hatch=DROPPED_HATCH)
        ax.axhline(capacity[i], color="black", linestyle="--", linewidth=1)
        ax.set_xticks(x, [str(e) for e in x], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("token assignments", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylim(0, max(capacity[i], routed[i].sum(0).max()) * 1.12)
        ax.set_title(f"{name}\n{dropped_fraction[i]:.1%} of assignments dropped", fontsize=9)
    handles = [Patch(facecolor="#808080", edgecolor="black", label="kept, 1st choice")]
    if K > 1:
        handles.append(Patch(facecolor="#808080", alpha=0.45, edgecolor="black", hatch="///",
                             label="kept, 2nd choice" if K == 2 else "kept, later choices"))
    handles += [Patch(facecolor="white", edgecolor="black", hatch=DROPPED_HATCH, label="dropped"),
                Line2D([], [], color="black", linestyle="--", label="capacity (all groups)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Expert load over {record.num_images} images (bar colors: experts)", fontsize=11)
    return fig, {"layers": names, "routed": routed, "kept": kept, "capacity": capacity,
                 "dropped_fraction": dropped_fraction}


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


def class_expert_matrix(record: RoutingRecord, labels, layers: Optional[Sequence[str]] = None,
                        choice: Optional[int] = 0, kept_only: bool = False,
                        include_prefix: bool = False, class_names: Optional[Sequence[str]] = None):
    """How each class's patches spread over the experts, per layer, over the recorded images.

    Args:
        record: from ``record_routing`` over a dataset.
        labels: [num_images] int class of each recorded image, in recording order.
        choice: count the experts of this choice (0: first choice), or None for every kept
            assignment (the only option for expert-choice layers).
        kept_only: count only assignments that got a buffer place (default: the router's choice).
        include_prefix: count the prefix tokens (class token) too (default: patches only).
        class_names: names of the class ids, for the tick labels.
    Returns:
        (figure, numbers) with numbers: ``layers``; ``classes`` [C] class ids present;
        ``counts`` [L, C, E]; ``matrix`` [L, C, E] rows normalized to sum to 1 (class and expert
        ids in increasing order); ``class_order`` [L, C] and ``expert_order`` [L, E] the display
        order (experts by total load, classes grouped by their most used expert, strongest
        first); ``mutual_information_bits`` [L], I(class; expert) in bits.
    """
    names = _names(record, layers)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if labels.ndim != 1 or len(labels) != record.num_images or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {record.num_images} ints (one per recorded image), got "
                         f"shape {labels.shape} dtype {labels.dtype}")
    classes = np.unique(labels)
    row_of = np.searchsorted(classes, labels)                                   # [B]
    counts_all = []
    for name in names:
        view = record.tokens(name)
        E = view.gates.shape[-1]
        P = 0 if include_prefix else record.num_prefix_tokens
        expert, kept = view.expert[:, P:], view.kept[:, P:]                      # [B, N', K]
        if choice is None:
            mask = kept
        else:
            if not record.is_top_k(name):
                raise ValueError(f"layer {name!r} uses expert-choice routing: pass choice=None")
            if not 0 <= choice < expert.shape[-1]:
                raise ValueError(f"choice must be None or in [0, {expert.shape[-1]}), got choice={choice}")
            expert, kept = expert[..., choice:choice + 1], kept[..., choice:choice + 1]
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
    expert_order = np.argsort(-counts.sum(1), axis=-1, kind="stable")           # [L, E]
    class_order = []
    for i in range(len(names)):
        rank = np.argsort(expert_order[i])                                      # expert -> display position
        top = matrix[i].argmax(-1)
        class_order.append(np.lexsort((-matrix[i, np.arange(len(classes)), top], rank[top])))
    class_order = np.stack(class_order)
    mi = np.array([mutual_information(c) for c in counts])

    names_of = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
    fig, axes = _panel_grid(len(names), max_cols=3, panel=(3.6, max(2.6, 0.18 * len(classes) + 1.2)))
    for i, (ax, name) in enumerate(zip(axes, names)):
        shown = matrix[i][class_order[i]][:, expert_order[i]]
        im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(np.arange(shown.shape[1]), [str(e) for e in expert_order[i]], fontsize=7)
        if len(classes) <= 40:
            ax.set_yticks(np.arange(len(classes)), [names_of[c] for c in class_order[i]], fontsize=7)
        else:
            ax.set_yticks([])
        ax.set_xlabel("expert (by load)", fontsize=8)
        ax.set_ylabel("class", fontsize=8)
        ax.set_title(f"{name}\nI(class; expert) = {mi[i]:.3f} bits", fontsize=9)
    fig.colorbar(im, ax=list(axes)[:len(names)], fraction=0.04, label="share of the class's tokens")
    what = "first-choice" if choice == 0 else ("kept" if choice is None else f"choice-{choice + 1}")
    fig.suptitle(f"Class x expert: {what} expert of each class's {'tokens' if include_prefix else 'patches'}",
                 fontsize=11)
    return fig, {"layers": names, "classes": classes, "counts": counts, "matrix": matrix,
                 "class_order": class_order, "expert_order": expert_order, "mutual_information_bits": mi}
