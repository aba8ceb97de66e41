"""How the report's pictures read: the patch maps' expert colors are not shaded by the image
(the image is an outline over opaque colors, so expert 0 and expert 3 look as in the legend on
dark and bright patches alike); in the capacity sweep the vanilla line stays visible where BPR
equals it (hollow circles and a solid line under dashes and small squares). On main the colors
were blended with the image and both lines were solid with same-size filled markers."""

import matplotlib.colors as mcolors
import numpy as np

import vmoe.viz as V
from tests.viz.test_viz import batches, images, record_two_forwards, tiny_vit
from vmoe.viz.style import expert_colors


def test_patch_map_colors_are_the_palette_unshaded_with_the_image_outlined():
    model = tiny_vit()
    x = images(4)
    record, _ = record_two_forwards(model, x, split=2)
    fig, numbers = V.patch_map(record, 0, image=x[0])
    colors = expert_colors(numbers["expert"].max() + 1)
    for ax in fig.axes[: len(record.layer_names) * 2]:
        (drawn,) = ax.images  # the colors only: no image blended under them
        assert drawn.get_gid() == "patch_colors" and drawn.get_alpha() in (None, 1.0)
        shown = np.asarray(drawn.get_array())
        assert {tuple(c) for c in shown.reshape(-1, 4)} <= {tuple(c) for c in colors}
        outlines = [
            c for c in ax.get_children() if getattr(c, "get_gid", lambda: None)() == "image_outline"
        ]
        assert len(outlines) == 2  # a white line under a black one
    # the legend's swatches are the very colors of the map
    swatches = [mcolors.to_rgba(h.get_facecolor()) for h in fig.legends[0].legend_handles[:-1]]
    np.testing.assert_allclose(swatches, colors[: len(swatches)])


def test_sweep_lines_stay_visible_where_they_coincide():
    model = tiny_vit(cf=0.5)
    fig, numbers = V.capacity_sweep(model, batches(model), capacity_factors=(0.25, 4.0))
    vanilla, bpr = fig.axes[1].get_lines()[:2]
    assert numbers["dropped_fraction"]["vanilla"][1] == numbers["dropped_fraction"]["bpr"][1]
    assert vanilla.get_linestyle() != bpr.get_linestyle()
    assert vanilla.get_marker() != bpr.get_marker()
    assert mcolors.to_rgba(vanilla.get_markerfacecolor()) == (1.0, 1.0, 1.0, 1.0)  # hollow
    assert (
        vanilla.get_markersize() > bpr.get_markersize() and bpr.get_zorder() > vanilla.get_zorder()
    )
    assert vanilla.get_linewidth() > bpr.get_linewidth()
