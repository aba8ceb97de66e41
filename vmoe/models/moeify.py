"""Turn a timm Vision Transformer into a V-MoE, and read its MoE layers' losses and plans."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..jsonable import to_jsonable
from ..moe import MoeMlp, RoutingPlan, moe_layers, require_moe_layers, routing_statistics
from ..moe.soft_routing import soft_slots_per_expert

__all__ = ["moe_block_indices", "moeify", "aux_loss", "aux_losses", "routing_plans", "routing_stats",
           "MOEIFIED_ARCHITECTURE", "MOEIFIED_ARGS"]

# The timm name that rebuilds a moeified timm model (``vmoe.models.variants.vmoe_moeified``):
# saved directories of such models name it as their architecture, so that timm's ``local-dir:``
# and ``hf-hub:`` loaders build the MoE model. ``MOEIFIED_ARGS`` are its own arguments (every
# other one goes to the base model).
MOEIFIED_ARCHITECTURE = "vmoe_moeified"
MOEIFIED_ARGS = ("base_architecture", "moeify", "routing")


def moe_block_indices(depth: int, every: Optional[int] = None, last: Optional[int] = None,
                      blocks: Optional[Sequence[int]] = None) -> List[int]:
    """Indices of the blocks that become MoE, from exactly one placement rule.

    ``every=N``: blocks N-1, 2N-1, ... (the paper's "Every 2" is blocks 1, 3, 5, ...).
    ``last=N``: the last N odd blocks (the paper's "Last 2": blocks depth-3 and depth-1 for an
    even depth). ``blocks``: an explicit list (negative indices count from the end).
    """
    given = [name for name, v in (("every", every), ("last", last), ("blocks", blocks)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of every=, last=, blocks= (got {given or 'none'})")
    if every is not None:
        if not isinstance(every, int) or not 1 <= every <= depth:
            raise ValueError(f"every={every!r} must be an int in [1, depth={depth}]")
        return list(range(every - 1, depth, every))
    if last is not None:
        odd = list(range(1, depth, 2))
        if not isinstance(last, int) or not 1 <= last <= len(odd):
            raise ValueError(f"last={last!r} must be an int in [1, {len(odd)}] (the model has depth "
                             f"{depth}, i.e. {len(odd)} odd blocks)")
        return odd[-last:]
    indices = []
    for i in blocks:
        if not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"block index {i!r} is out of range for a model of depth {depth} "
                             f"(valid: 0..{depth - 1} or negative)")
        indices.append(i % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"blocks={list(blocks)} lists a block twice")
    return sorted(indices)


def _vit_blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} is not a timm Vision Transformer: it has no "
                        "`blocks` list of transformer blocks")
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, MoeMlp) and not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")
                                                 and isinstance(mlp.fc1, nn.Linear)):
            raise TypeError(f"block {i} of {type(model).__name__} has no timm `Mlp` "
                            f"(`mlp.fc1`/`mlp.fc2` Linear layers); got {type(mlp).__name__}")
    return blocks


def moeify(model: nn.Module, *, every: Optional[int] = None, last: Optional[int] = None,
           blocks: Optional[Sequence[int]] = None, from_dense: bool = False,
           router_init_std: Optional[float] = None, **moe_kwargs) -> nn.Module:
    """Replace the ``mlp`` of chosen blocks of a timm ViT by ``MoeMlp`` (in place; returns model).

    Args:
        model: a timm ``VisionTransformer`` (or any model with ``blocks[i].mlp`` timm ``Mlp``s:
            DeiT, ViTs with registers, with or without class token, ``global_pool='avg'``).
        every / last / blocks: placement, see ``moe_block_indices``.
        from_dense: sparse upcycling. Every expert starts as a copy of the dense MLP it replaces
            (shared experts too: n copies with fc2 / n, computing the dense MLP exactly; a
            ``shared_hidden_features`` that is not a multiple of the dense width is a
            ValueError) and the router starts small (std 1e-3 unless ``router_init_std``). Otherwise experts
            get timm's ViT init (truncated normal, std 0.02) and the router LeCun-normal.
        **moe_kwargs: passed to ``MoeMlp`` (num_experts, num_selected, capacity_factor,
            batch_priority, group_size_images, router, noise_std, renormalize, loss weights,
            score_func, bias_update_rate, shared_experts, shared_hidden_features, shared_gate,
            ``drop`` for expert dropout: default the replaced MLP's). Soft MoE:
            ``router='soft'`` with ``num_slots=P``, or without it P = round(S * capacity_factor
            / E) for the model's group size S in tokens (default one image per group).
    """
    vit_blocks = _vit_blocks(model)
    indices = moe_block_indices(len(vit_blocks), every, last, blocks)
    layer_kwargs = _soft_slots(model, moe_kwargs)
    for i in indices:
        mlp = vit_blocks[i].mlp
        if isinstance(mlp, MoeMlp):
            raise ValueError(f"block {i} is already a MoE block")
        act = mlp.act
        options = dict(layer_kwargs)
        # Expert dropout: the dense MLP's unless given (the paper's recipes use MoE dropout 0.2).
        options.setdefault("drop", (getattr(mlp.drop1, "p", 0.0), getattr(mlp.drop2, "p", 0.0)))
        layer = MoeMlp(
            mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features,
            act_layer=lambda act=act: copy.deepcopy(act), bias=mlp.fc1.bias is not None, **options)
        layer.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        if from_dense:
            layer.experts.load_from_mlp(mlp)
            if layer.shared is not None:  # the shared experts start as the dense MLP too
                layer.shared.load_from_mlp(mlp)
            layer.router.reset_parameters(std=1e-3 if router_init_std is None else router_init_std)
        else:
            layer.experts.reset_parameters(std=0.02)
            if layer.shared is not None:
                layer.shared.reset_parameters(std=0.02)
            if router_init_std is not None:
                layer.router.reset_parameters(std=router_init_std)
        vit_blocks[i].mlp = layer
    recipe = dict(getattr(model, "vmoe_moe", {}) or {})
    recipe.setdefault("blocks", [])
    recipe["blocks"] = sorted(set(recipe["blocks"]) | set(indices))
    # (with the derived num_slots of a Soft MoE: a rebuild at another image size keeps P)
    recipe["moe_kwargs"] = {**recipe.get("moe_kwargs", {}), **_storable(layer_kwargs)}
    model.vmoe_moe = recipe
    return model


def _soft_slots(model: nn.Module, moe_kwargs: dict) -> dict:
    """``moe_kwargs`` with ``num_slots`` set for a Soft MoE whose slots come from a capacity
    factor: P = round(S * capacity_factor / E) (official rounding) with S = the group size in
    tokens of this model's images."""
    if moe_kwargs.get("router") != "soft" or moe_kwargs.get("num_slots") is not None:
        return moe_kwargs
    group_size = moe_kwargs.get("group_size")
    if group_size is None:
        patch_embed = getattr(model, "patch_embed", None)
        num_patches = getattr(patch_embed, "num_patches", None)
        if num_patches is None:
            raise ValueError("router='soft' without num_slots derives the slots per expert from "
                             "the tokens per group, but the model has no patch_embed.num_patches: "
                             "give num_slots or group_size (tokens)")
        tokens = num_patches + getattr(model, "num_prefix_tokens", 0)
        group_size = (moe_kwargs.get("group_size_images") or 1) * tokens
    slots = soft_slots_per_expert(group_size, moe_kwargs.get("num_experts", 8),
                                  moe_kwargs.get("capacity_factor", 1.0))  # official default
    return {**moe_kwargs, "num_slots": slots}


def _storable(moe_kwargs: dict) -> dict:
    """The MoE options as JSON values (``model.vmoe_moe`` goes into config.json), or TypeError
    naming the option that is not a plain value."""
    out = {}
    for k, v in moe_kwargs.items():
        try:
            out[k] = to_jsonable(v, strict=True)
        except TypeError:
            raise TypeError(f"MoE option {k}={v!r} is not a plain value (None, bool, int, float, "
                            "str, or lists/dicts of them); "
                            "pass a name instead so the model can be saved and rebuilt") from None
    return out


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of the weighted auxiliary loss of the last forward (float32 scalar).

    In the layers' default ``aux_loss_mode='backward'`` it is detached, for logging: the aux
    losses already reach the gradients through the backward pass of the layer outputs, so adding
    it to a loss changes nothing. After ``set_aux_loss_mode(model, 'manual')`` it has a graph and
    the training loop adds it to its loss (``vmoe.moe.balancing``)."""
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def aux_losses(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per layer, each unweighted auxiliary loss of the last forward: {layer: {name: scalar}}."""
    return {name: dict(m.aux_losses) for name, m in moe_layers(model).items()}


def routing_plans(model: nn.Module) -> Dict[str, RoutingPlan]:
    """The RoutingPlan of every MoE layer from the last forward."""
    plans = {name: m.last_plan for name, m in require_moe_layers(model).items()}
    missing = [name for name, plan in plans.items() if plan is None]
    if missing:
        raise RuntimeError(f"no forward has run yet through {missing}")
    return plans


def routing_stats(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """``routing_statistics`` of every MoE layer's last plan."""
    return {name: routing_statistics(plan) for name, plan in routing_plans(model).items()}
