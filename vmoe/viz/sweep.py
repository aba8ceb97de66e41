"""Capacity sweep: accuracy and MoE-layer FLOPs against the inference capacity factor,
vanilla routing vs Batch Priority Routing (the V-MoE paper's figure showing that BPR keeps
accuracy at low capacity)."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, TypedDict

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from vmoe.moe import MoeMlp, require_moe_layers, routing_settings

from .record import image_grid, refuse_soft_layer

__all__ = ["capacity_sweep", "evaluate", "SweepRow"]

# Where both routings give the same value (every point at a large capacity factor), BPR's
# dashed line and small filled squares sit inside vanilla's solid line and hollow circles: both
# stay visible.
_STYLE = {
    "vanilla": dict(
        color="#0072B2",
        marker="o",
        markersize=8,
        markerfacecolor="white",
        linestyle="-",
        linewidth=2.2,
        zorder=2,
        label="vanilla (earlier tokens first)",
    ),
    "bpr": dict(
        color="#D55E00",
        marker="s",
        markersize=4,
        linestyle=(0, (4, 2)),
        linewidth=1.4,
        zorder=3,
        label="BPR (largest gate first)",
    ),
}


class SweepRow(TypedDict):
    """One evaluation of the capacity sweep: plain JSON-ready values, so the markdown table, the
    report's JSON and its page are all rendered from the same list of rows."""

    routing: str  # "vanilla" (earlier tokens first) or "bpr" (largest gate first)
    capacity_factor: float  # inference capacity factor of every MoE layer
    accuracy: float  # top-1 accuracy
    dropped_fraction: float  # dropped token assignments, all MoE layers
    moe_flops_per_image: float  # router + expert MLPs on the E*G*C buffer rows, all MoE layers


def _moe_flops(layer: MoeMlp, plan, tokens_per_group: int) -> int:
    """FLOPs (multiply-add = 2) one forward of ``layer`` spent: router logits for every grouped
    token (padding included) plus the expert MLPs on all E*G*C buffer rows, which are computed
    whether a slot is filled or not; for a dropless plan, the valid tokens' router logits and
    the expert MLPs on the K rows of each token."""
    G, C, E = plan.num_groups, plan.capacity, plan.num_experts
    ex = layer.experts
    # a dropless forward runs the experts on exactly the kept assignments' rows, and routes
    # the valid tokens only (no buffer row, no padding)
    rows = int(plan.kept.sum()) if plan.dropless else E * G * C
    expert = 2 * rows * (ex.in_features * ex.hidden_features + ex.hidden_features * ex.out_features)
    tokens = G * tokens_per_group
    if plan.dropless and plan.valid is not None:
        tokens = int(plan.valid.sum())
    router = 2 * tokens * layer.in_features * E
    return expert + router


def _sparse_layers(model: nn.Module, what: str):
    """The model's MoE layers; the clear ValueError naming a Soft MoE layer among them."""
    layers = require_moe_layers(model)
    for name, layer in layers.items():
        if layer.is_soft:
            refuse_soft_layer(name, what)
    return layers


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, device=None) -> Dict[str, float]:
    """Top-1 accuracy of ``model`` (eval mode) over ``data`` (batches of (images, labels)), with
    the MoE layers' dropped fraction and FLOPs per image. The model's mode is restored."""
    layers = _sparse_layers(model, "evaluate (dropped fraction, MoE FLOPs at a capacity factor)")
    device = device if device is not None else next(model.parameters()).device
    totals = {"flops": 0, "kept": 0, "assignments": 0}

    def hook(module: MoeMlp, args, output):
        plan = module.last_plan
        valid = plan.valid.sum() if plan.valid is not None else plan.num_groups * plan.group_size
        valid_mask = plan.valid.unsqueeze(-1) if plan.valid is not None else True
        totals["flops"] += _moe_flops(module, plan, plan.group_size)
        totals["kept"] += int((plan.kept & valid_mask).sum())
        totals["assignments"] += int(valid) * plan.num_selected

    handles = [m.register_forward_hook(hook) for m in layers.values()]
    was_training = model.training
    correct = count = 0
    try:
        model.eval()
        for i, batch in enumerate(data):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(
                    f"data must yield (images, labels) batches, batch {i} is {type(batch).__name__}"
                )
            image_grid(model, batch[0])  # a clear ValueError for images of the wrong size
            images, labels = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
            logits = model(images)
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError(
            "data yielded no images (empty dataset, or a generator already consumed: "
            "pass a list or a DataLoader, which can be iterated again)"
        )
    return {
        "accuracy": correct / count,
        "num_images": count,
        "dropped_fraction": 1.0 - totals["kept"] / max(totals["assignments"], 1),
        "moe_flops_per_image": totals["flops"] / count,
    }


def capacity_sweep(
    model: nn.Module,
    data: Iterable,
    capacity_factors: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0),
    modes: Sequence[str] = ("vanilla", "bpr"),
    device=None,
    reference: bool = True,
):
    """Evaluate ``model`` at each inference capacity factor, with and without BPR.

    Every MoE layer's ``capacity_factor`` and ``batch_priority`` are set for each run and put back
    afterwards, even on error (``routing_settings``).

    Args:
        model: a model with MoeMlp layers; evaluated in eval mode (mode restored afterwards).
        data: re-iterable batches of (images [B,3,H,W], labels [B]) (a list or DataLoader).
        capacity_factors: inference capacity factors (x axis).
        modes: 'vanilla' and/or 'bpr'.
        reference: also evaluate with the layers' own settings (a dashed line in the plot).
    Returns:
        (figure, numbers) with numbers: ``rows``, one ``SweepRow`` per (routing, capacity
        factor), modes outermost; the same values as arrays for plotting: ``capacity_factors``
        [n] and dicts mode -> [n] arrays ``accuracy``, ``dropped_fraction`` and
        ``moe_flops_per_image``; ``reference_accuracy`` (float or None) and ``num_images``.
    """
    layers = _sparse_layers(model, "the capacity sweep (inference capacity factor, vanilla vs BPR)")
    for mode in modes:
        if mode not in _STYLE:
            raise ValueError(f"modes must hold 'vanilla' and/or 'bpr', got {mode!r}")
    if not len(capacity_factors) or not len(modes):
        raise ValueError(
            f"capacity_factors and modes must be non-empty, got {capacity_factors!r}, {modes!r}"
        )
    cfs = np.array([float(c) for c in capacity_factors])
    ref: Optional[Dict[str, float]] = evaluate(model, data, device) if reference else None
    rows: List[SweepRow] = []
    for mode in modes:
        for cf in cfs:
            with routing_settings(
                layers, capacity_factor=float(cf), batch_priority=(mode == "bpr")
            ):
                result = evaluate(model, data, device)
            rows.append(
                SweepRow(
                    routing=mode,
                    capacity_factor=float(cf),
                    accuracy=float(result["accuracy"]),
                    dropped_fraction=float(result["dropped_fraction"]),
                    moe_flops_per_image=float(result["moe_flops_per_image"]),
                )
            )
    keys = ("accuracy", "dropped_fraction", "moe_flops_per_image")
    numbers: Dict[str, object] = {
        "rows": rows,
        "capacity_factors": cfs,
        **{
            k: {m: np.array([r[k] for r in rows if r["routing"] == m]) for m in modes} for k in keys
        },
        "reference_accuracy": ref["accuracy"] if ref else None,
        "num_images": result["num_images"],
    }

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
    peak = max(float(v.max()) for v in numbers["moe_flops_per_image"].values())
    unit, flops_scale = next(
        (u, s)
        for u, s in (("GFLOPs", 1e-9), ("MFLOPs", 1e-6), ("kFLOPs", 1e-3), ("FLOPs", 1.0))
        if peak * s >= 1 or s == 1.0
    )
    panels = [
        ("accuracy", "top-1 accuracy"),
        ("dropped_fraction", "dropped token assignments"),
        ("moe_flops_per_image", f"MoE-layer {unit} per image"),
    ]
    for ax, (key, ylabel) in zip(axes, panels):
        scale = flops_scale if key == "moe_flops_per_image" else 1.0
        for mode in modes:
            ax.plot(cfs, numbers[key][mode] * scale, **_STYLE[mode])
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfs, [f"{c:g}" for c in cfs], fontsize=8)
        ax.minorticks_off()
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("inference capacity factor", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    if ref is not None:
        axes[0].axhline(
            ref["accuracy"],
            color="#555555",
            linestyle=":",
            linewidth=1.2,
            label="model's own settings",
        )
    if len(modes) > 1:
        axes[2].set_title("same buffers, so identical for every routing", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False
    )
    fig.suptitle(f"Capacity sweep over {numbers['num_images']} images", fontsize=11)
    return fig, numbers
