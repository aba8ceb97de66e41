"""vmoe.models: timm ViT -> V-MoE or Soft MoE, the papers' variants, upcycling, save/load, the
official checkpoints' key mapping, export.

Importing this package registers the ``vmoe_*`` models in timm's registry.
"""

# The MoE layers of a model, their routing settings and aux-loss modes live in vmoe.moe;
# re-exported here.
from ..moe import (
    moe_layers,
    restore_routing,
    routing_settings,
    set_aux_loss_mode,
    set_aux_loss_scale,
    set_routing,
)
from . import variants  # noqa: F401  (registers the timm factories)
from .export import (
    check_export,
    export_model,
    export_onnx,
    export_program,
    inference_routing,
    save_program,
)
from .moeify import (
    MoeifyConfig,
    aux_loss,
    aux_losses,
    moe_block_indices,
    moeify,
    routing_plans,
    routing_stats,
)
from .official import (
    convert_vmoe_checkpoint,
    from_vmoe_checkpoint,
    from_vmoe_params,
    infer_vmoe_architecture,
)
from .pretrained import (
    from_pretrained,
    load_state_dict_checked,
    push_to_hub,
    save_pretrained,
    upcycle,
)
from .variants import PAPER_MOE_DEFAULTS, SOFT_MOE_PAPER_DEFAULTS, SOFT_VARIANTS, VARIANTS
from .vit_moe import VisionTransformerMoe

__all__ = [
    "moeify",
    "MoeifyConfig",
    "moe_block_indices",
    "moe_layers",
    "aux_loss",
    "aux_losses",
    "routing_plans",
    "routing_stats",
    "set_routing",
    "restore_routing",
    "routing_settings",
    "set_aux_loss_mode",
    "set_aux_loss_scale",
    "VisionTransformerMoe",
    "VARIANTS",
    "PAPER_MOE_DEFAULTS",
    "SOFT_VARIANTS",
    "SOFT_MOE_PAPER_DEFAULTS",
    "save_pretrained",
    "push_to_hub",
    "from_pretrained",
    "load_state_dict_checked",
    "upcycle",
    "from_vmoe_checkpoint",
    "from_vmoe_params",
    "convert_vmoe_checkpoint",
    "infer_vmoe_architecture",
    "export_program",
    "export_onnx",
    "export_model",
    "save_program",
    "check_export",
    "inference_routing",
]
