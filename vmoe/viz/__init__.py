"""vmoe.viz: see the routing. Record the RoutingPlans of a forward pass, then draw them.

    with record_routing(model) as record:
        model(images)
    fig, numbers = patch_map(record, index=0, image=images[0])
    fig, numbers = dispatch_map(record, index=0, image=images[0])  # Soft MoE: slots' patches
    write_routing_report(model, loader, "report/")   # PNGs + index.html + report.json

Every plotting function returns ``(figure, numbers)``: a matplotlib Figure (Agg backend) and
the numpy arrays/dicts drawn in it. Routing is read from the recorded plans, never re-derived;
what-if maps re-route the recorded gates with the layer's own ``router.route``.
"""

from vmoe.moe import (
    moe_layers,
    routing_settings,
)  # re-exported: notebooks use them beside the plots

from .maps import patch_map, priority_map, routing_figure
from .page import sweep_markdown, sweep_table
from .record import (
    RoutingRecord,
    SoftTokenRouting,
    TokenRouting,
    image_grid,
    record_routing,
    ungroup,
)
from .report import write_routing_report
from .soft import combine_entropy_map, dispatch_map, slot_similarity
from .stats import (
    class_expert_matrix,
    expert_load,
    expert_load_chart,
    expert_load_counts,
    mutual_information,
)
from .style import expert_colors
from .sweep import SweepRow, capacity_sweep, evaluate

__all__ = [
    "record_routing",
    "RoutingRecord",
    "TokenRouting",
    "moe_layers",
    "image_grid",
    "ungroup",
    "routing_settings",
    "patch_map",
    "priority_map",
    "routing_figure",
    "expert_load",
    "expert_load_counts",
    "expert_load_chart",
    "class_expert_matrix",
    "mutual_information",
    "capacity_sweep",
    "evaluate",
    "expert_colors",
    "write_routing_report",
    "sweep_markdown",
    "sweep_table",
    "SweepRow",
    "dispatch_map",
    "combine_entropy_map",
    "slot_similarity",
    "SoftTokenRouting",
]
