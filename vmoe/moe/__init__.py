"""vmoe.moe: the Mixture-of-Experts layer, sparse or soft (plain PyTorch: no Lightning, no timm).

``MoeMlp`` is the drop-in for timm's ``Mlp``, configured by ``MoeLayerConfig`` (one config per
router); the routers, routing plans, experts, dispatch, auxiliary losses and balancing, routing
settings and statistics it is built from are public too. Guide:
[The MoE layer](../guides/moe-layer.md).
"""

from .balancing import AUX_LOSS_MODES, AttachAuxLoss, set_aux_loss_mode, set_aux_loss_scale
from .bias_balancing import attach_bias_updates, expert_bias_values, update_expert_biases
from .capacity import compute_capacity
from .config import (
    ROUTER_CONFIGS,
    ExpertChoiceRouterConfig,
    MoeLayerConfig,
    RouterConfig,
    SoftRouterConfig,
    TopKRouterConfig,
    router_config,
)
from .dispatch import combine, dispatch, einsum_combine, einsum_dispatch
from .experts import Experts
from .layer import MoeMlp, moe_layers, require_moe_layers
from .losses import gshard_loss, importance_loss, load_loss, router_z_loss
from .plan import RoutingPlan, SoftRoutingPlan
from .routing import SCORE_FUNCS, ExpertChoiceRouter, TopKRouter
from .settings import RoutingSettings, read_routing, restore_routing, routing_settings, set_routing
from .shared import SharedExperts
from .soft_routing import SoftRouter
from .stats import (
    SOFT_TRAIN_STATS,
    expert_choice_metrics,
    routing_statistics,
    soft_routing_statistics,
)

__all__ = [
    "MoeLayerConfig",
    "TopKRouterConfig",
    "ExpertChoiceRouterConfig",
    "SoftRouterConfig",
    "RouterConfig",
    "ROUTER_CONFIGS",
    "router_config",
    "MoeMlp",
    "TopKRouter",
    "ExpertChoiceRouter",
    "SoftRouter",
    "RoutingPlan",
    "SoftRoutingPlan",
    "Experts",
    "compute_capacity",
    "dispatch",
    "combine",
    "einsum_dispatch",
    "einsum_combine",
    "importance_loss",
    "load_loss",
    "gshard_loss",
    "router_z_loss",
    "routing_statistics",
    "expert_choice_metrics",
    "moe_layers",
    "require_moe_layers",
    "RoutingSettings",
    "routing_settings",
    "set_routing",
    "restore_routing",
    "read_routing",
    "soft_routing_statistics",
    "SOFT_TRAIN_STATS",
    "set_aux_loss_mode",
    "set_aux_loss_scale",
    "AttachAuxLoss",
    "AUX_LOSS_MODES",
    "update_expert_biases",
    "attach_bias_updates",
    "expert_bias_values",
    "SharedExperts",
    "SCORE_FUNCS",
]
