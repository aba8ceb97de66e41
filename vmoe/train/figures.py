"""Small matplotlib figures for the training logs: expert load per layer and a routing map.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI backend needed). The
richer pictures of ``vmoe.viz`` are used instead when that package provides them.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = ["expert_load_figure", "routing_map_figure", "figure_to_array", "resolve_figure_fn"]


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render to an RGB uint8 array [H, W, 3] (for wandb/tensorboard)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def expert_load_figure(loads: Dict[str, np.ndarray], title: str = "expert load") -> Figure:
    """One bar chart per MoE layer: each expert's share of the kept assignments (x E, so 1.0
    is a perfectly balanced expert). ``loads``: {layer: [E] fractions summing to 1}."""
    n = max(1, len(loads))
    fig = Figure(figsize=(3.2 * n, 2.8), layout="constrained")
    for i, (name, load) in enumerate(loads.items()):
        ax = fig.add_subplot(1, n, i + 1)
        load = np.asarray(load, dtype=float)
        E = load.shape[0]
        ax.bar(np.arange(E), load * E, color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(np.arange(E) if E <= 16 else np.linspace(0, E - 1, 5).astype(int))
        if i == 0:
            ax.set_ylabel("load x E (1 = balanced)")
    fig.suptitle(title, fontsize=10)
    return fig


def _display(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] normalized image -> [H, W, 3] in [0, 1] (min-max: the normalization is unknown)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
    img = img.permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


def routing_map_figure(images: torch.Tensor, first_choice: Dict[str, torch.Tensor],
                       num_experts: Dict[str, int], grid_size) -> Figure:
    """Which expert got each patch (first choice; black: dropped).

    Args:
        images: [B, C, H, W] the inputs (B small, e.g. 4).
        first_choice: {layer: [B, h*w] int}, expert of each patch token's first choice, -1 if
            that choice was dropped (prefix tokens such as cls removed).
        num_experts: {layer: E}.
        grid_size: (h, w) patches per image side.
    """
    B = images.shape[0]
    layers = list(first_choice)
    fig = Figure(figsize=(1.8 * (1 + len(layers)), 1.9 * B), layout="constrained")
    h, w = grid_size
    for b in range(B):
        ax = fig.add_subplot(B, 1 + len(layers), b * (1 + len(layers)) + 1)
        ax.imshow(_display(images[b]))
        ax.set_axis_off()
        if b == 0:
            ax.set_title("image", fontsize=8)
        for j, name in enumerate(layers):
            E = num_experts[name]
            colors = np.vstack([[0, 0, 0, 1], _palette(E)])
            ax = fig.add_subplot(B, 1 + len(layers), b * (1 + len(layers)) + 2 + j)
            grid = first_choice[name][b].reshape(h, w).cpu().numpy() + 1  # 0 = dropped
            ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=E, interpolation="nearest")
            ax.set_axis_off()
            if b == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle("first-choice expert per patch (black: dropped)", fontsize=9)
    return fig


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return np.array([cmap(i / max(1, n - 1)) if n > 20 else cmap(i) for i in range(n)])


def resolve_figure_fn(spec: Optional[str]) -> Optional[Callable]:
    """A routing-picture function ``fn(model, images) -> Figure``: ``"module:function"``, or by
    default ``vmoe.viz.routing_figure`` when the visualization package provides one; None to use
    ``routing_map_figure``."""
    if spec:
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"routing figure function {spec!r} cannot be imported: {err}") from None
    try:
        viz = importlib.import_module("vmoe.viz")
    except ImportError:
        return None
    return getattr(viz, "routing_figure", None)
