"""Shared drawing pieces: the expert palette, image handling, a token grid drawn over an image.

Expert colors are colorblind-safe: Okabe-Ito for up to 8 experts, Tableau's colorblind-10 for 9 or
10. Beyond 10 no palette stays distinguishable for color-blind readers; tab20 (then a hue
cycle) is used and the legend remains the reference.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import matplotlib

# Figures are for files: Agg never opens a window and works headless. A Jupyter kernel sets
# MPLBACKEND to its inline (or widget) backend "module://...": keep it, so notebooks show figures.
if not os.environ.get("MPLBACKEND", "").startswith("module://"):
    matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

ImageLike = Union[torch.Tensor, np.ndarray]
"""An image drawn under the routing: a tensor [C, H, W] / [H, W] or an array [H, W, C] / [H, W]."""

__all__ = [
    "expert_colors",
    "to_display_image",
    "draw_token_grid",
    "expert_legend_handles",
    "DROPPED_HATCH",
    "SKIPPED_COLOR",
    "new_figure",
]

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
TABLEAU_CB10 = [
    "#006BA4",
    "#FF800E",
    "#ABABAB",
    "#595959",
    "#5F9ED1",
    "#C85200",
    "#898989",
    "#A2C8EC",
    "#FFBC79",
    "#CFCFCF",
]
DROPPED_HATCH = "xxx"
DROPPED_COLOR = "#FFFFFF"  # hatch lines, drawn over a black outline hatch so they show on any color
OVERLAY_ALPHA = 0.55  # expert colors over the grayscale image: both stay readable
SKIPPED_COLOR = (0.835, 0.369, 0.0, 0.85)  # Okabe-Ito vermillion: stands out on black and white


def expert_colors(num_experts: int) -> np.ndarray:
    """[E, 4] RGBA in [0, 1]: one color per expert (see the module docstring)."""
    if num_experts <= len(OKABE_ITO):
        names = OKABE_ITO[:num_experts]
    elif num_experts <= len(TABLEAU_CB10):
        names = TABLEAU_CB10[:num_experts]
    elif num_experts <= 20:
        names = [plt.get_cmap("tab20")(i) for i in range(num_experts)]
    else:
        names = [plt.get_cmap("hsv")(i / num_experts) for i in range(num_experts)]
    return np.array([mcolors.to_rgba(c) for c in names])


def to_display_image(
    image, name: str = "image", expected_size: Optional[Tuple[int, int]] = None
) -> Optional[np.ndarray]:
    """Image -> [H, W] grayscale float in [0, 1] (the background under colored patches).

    Accepts a torch tensor [C, H, W] or [H, W] or a numpy array [H, W, C] or [H, W] (C = 1 or
    3), any value range (min-max scaled when outside [0, 1]). None passes through.
    Raises ValueError if its size is not ``expected_size`` (H, W).
    """
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu().numpy()
        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    else:
        array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        rgb = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array, 3, -1)
        array = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # luminance
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be [C,H,W] (tensor), [H,W,C] (array) or [H,W], "
            f"got shape {tuple(np.shape(image))}"
        )
    if expected_size is not None and tuple(array.shape) != tuple(expected_size):
        raise ValueError(
            f"{name} is {array.shape[0]}x{array.shape[1]} pixels but the model's patch "
            f"grid covers {expected_size[0]}x{expected_size[1]}"
        )
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if lo < 0 or hi > 1:
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    return array


def new_figure(
    rows: int,
    cols: int,
    panel: float = 2.8,
    extra_width: float = 0.0,
    extra_height: float = 0.25,
    **kwargs,
):
    """A constrained-layout figure with a rows x cols grid of panels (squeeze=False)."""
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel * cols + extra_width, panel * rows + 0.6 + extra_height),
        squeeze=False,
        layout="constrained",
        **kwargs,
    )
    return fig, axes


def _outline(ax, background: np.ndarray) -> None:
    """The image [H, W] as contour lines (a white line under a black one: visible on every
    expert color) at the brightness halfway between its dark and bright parts (the 10% and
    90% quantiles)."""
    low, high = (float(q) for q in np.quantile(background, (0.1, 0.9)))
    if not high > low:
        return  # a flat image has no outline
    levels = [(low + high) / 2]
    H, W = background.shape
    x, y = np.arange(W) + 0.5, np.arange(H) + 0.5
    for color, width in (("white", 1.8), ("black", 0.8)):
        lines = ax.contour(x, y, background, levels=levels, colors=color, linewidths=width)
        lines.set_gid("image_outline")


def _mark(ax, x: float, y: float, w: float, h: float) -> None:
    # A black hatch under a white one: readable on light and dark expert colors alike.
    for color, width in (("black", 2.2), (DROPPED_COLOR, 0.9)):
        rect = Rectangle(
            (x, y),
            w,
            h,
            fill=False,
            hatch=DROPPED_HATCH,
            edgecolor=color,
            linewidth=0,
            gid="dropped",
        )
        rect.set_hatch_linewidth(width) if hasattr(rect, "set_hatch_linewidth") else None
        ax.add_patch(rect)


def draw_token_grid(
    ax,
    background: Optional[np.ndarray],
    grid_size: Tuple[int, int],
    patch_rgba: np.ndarray,
    prefix_rgba: np.ndarray,
    patch_marked: Optional[np.ndarray] = None,
    prefix_marked: Optional[np.ndarray] = None,
    prefix_labels: Sequence[str] = (),
    alpha: float = OVERLAY_ALPHA,
    image_size: Optional[Tuple[int, int]] = None,
    outline: bool = False,
):
    """Draw per-patch colors over an image, prefix tokens as squares left of it.

    Args:
        background: [H, W] grayscale in [0, 1], or None (white).
        grid_size: (h, w) patches.
        patch_rgba: [h, w, 4] color of each patch (shown with ``alpha`` over the image).
        prefix_rgba: [P, 4] color of each prefix token.
        patch_marked / prefix_marked: [h, w] / [P] bool, tokens to hatch (dropped).
        prefix_labels: P names written under the prefix squares ("cls", "reg1", ...).
        outline: draw the colors opaque and the image as contour lines over them, instead of
            the colors translucent over the image: categorical colors (experts) then look the
            same on dark and bright image regions.
    Returns the AxesImage of the patch colors (gid "patch_colors", its array is ``patch_rgba``).
    """
    h, w = grid_size
    H, W = background.shape if background is not None else (image_size or (h, w))
    ph, pw = H / h, W / w
    if background is not None and outline:
        overlay = ax.imshow(patch_rgba, extent=(0, W, H, 0), interpolation="nearest")
        _outline(ax, background)
    elif background is not None:
        # Washed out to [0.4, 1] gray: the image stays legible and dark expert colors (black)
        # cannot be confused with dark image regions.
        ax.imshow(
            background,
            cmap="gray",
            vmin=-2 / 3,
            vmax=1,
            extent=(0, W, H, 0),
            interpolation="nearest",
        )
    if not (background is not None and outline):
        overlay = ax.imshow(
            patch_rgba,
            extent=(0, W, H, 0),
            interpolation="nearest",
            alpha=alpha if background is not None else 1.0,
        )
    overlay.set_gid("patch_colors")
    if patch_marked is not None:
        for i, j in zip(*np.nonzero(patch_marked)):
            _mark(ax, j * pw, i * ph, pw, ph)
    # Prefix tokens: squares of at least a sixth of the image height, left of the grid.
    P = len(prefix_rgba)
    size = max(ph, H / 6)
    gap = 0.3 * size
    for p in range(P):
        x, y = -gap - size, p * size * 1.6
        ax.add_patch(
            Rectangle(
                (x, y),
                size,
                size,
                facecolor=prefix_rgba[p],
                edgecolor="black",
                linewidth=0.8,
                gid="prefix_token",
            )
        )
        if prefix_marked is not None and prefix_marked[p]:
            _mark(ax, x, y, size, size)
        if p < len(prefix_labels):
            ax.text(
                x + size / 2, y + size * 1.05, prefix_labels[p], ha="center", va="top", fontsize=7
            )
    ax.set_xlim(-gap - size if P else 0, W)
    ax.set_ylim(max(H, P * size * 1.6), 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return overlay


def expert_legend_handles(num_experts: int, with_dropped: bool = True) -> List[Patch]:
    """Legend entries: one colored square per expert, plus the dropped hatch."""
    colors = expert_colors(num_experts)
    handles = [
        Patch(facecolor=colors[e], edgecolor="black", linewidth=0.5, label=f"expert {e}")
        for e in range(num_experts)
    ]
    if with_dropped:
        handles.append(
            Patch(
                facecolor="#808080",
                edgecolor="black",
                hatch=DROPPED_HATCH,
                linewidth=0.5,
                label="dropped (over capacity)",
            )
        )
    return handles
