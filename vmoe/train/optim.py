"""Optimizer parameter groups and the per-step learning-rate schedule.

The V-MoE recipe decays only "kernels": matrices and expert weight slabs. Biases, norm scales,
the class token and position embeddings get no weight decay (timm's and the official code's
convention). Fine-tuning can scale each layer's learning rate by
``layer_decay ** depth-from-top`` (timm's layer-wise decay). The schedule is a linear warmup from 0
to the peak, then cosine or linear decay to ``end_lr``; it is stepped every optimizer step.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn
from timm.optim import (
    create_optimizer_v2,
    get_optimizer_info,
    list_optimizers,
    param_groups_layer_decay,
)

__all__ = [
    "param_groups",
    "no_weight_decay_names",
    "lr_factor",
    "SCHEDULES",
    "create_optimizer",
    "check_optimizer_name",
]

SCHEDULES = ("cosine", "linear", "constant")


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Names of the trainable parameters that get no weight decay: 0/1-D tensors, biases
    (expert biases are [E, h], 2-D, but biases: the name decides, not only the rank) and the
    model's ``no_weight_decay()`` (timm: pos_embed, cls_token, reg_token, ...)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.requires_grad and (
            param.ndim <= 1 or leaf.endswith("bias") or name in skip or leaf in skip
        ):
            names.add(name)
    return names


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None
) -> List[Dict]:
    """Optimizer parameter groups: kernels get ``weight_decay``, ``no_weight_decay_names`` 0.

    Without ``layer_decay``: two groups (decayed, not decayed). With it: timm's
    ``param_groups_layer_decay`` (the model's ``group_matcher``: stem = layer 0, block i and the
    final norm after block i = layer i + 1, the head = the top layer, depth + 1), one group per
    layer and decay kind, each with ``lr_scale = layer_decay ** (top - layer)``; the decay
    membership is the same.
    """
    no_decay_names = no_weight_decay_names(model)
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
        return param_groups_layer_decay(
            model,
            weight_decay=weight_decay,
            layer_decay=layer_decay,
            no_weight_decay_list=sorted(no_decay_names),
        )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in no_decay_names else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# vmoe's optimizer names that differ from timm's: "sgd" is SGD with classical momentum (the
# official V-MoE fine-tuning optimizer), which timm calls "momentum" (timm's "sgd" is Nesterov).
_TIMM_NAMES = {"sgd": "momentum"}


def check_optimizer_name(name: str) -> None:
    """ValueError unless ``name`` is ``"sgd"`` (classical momentum) or one of timm's optimizers
    (``timm.optim.list_optimizers()``: adamw, adam, lamb, lion, adafactor, nadamw, ...)."""
    if name not in _TIMM_NAMES and name not in list_optimizers():
        raise ValueError(
            f"model.optimizer={name!r} is not an optimizer: use 'adamw', 'sgd' "
            "(classical momentum) or a name from timm.optim.list_optimizers()"
        )


def create_optimizer(
    groups: List[Dict], name: str, *, lr: float, momentum: float = 0.9, betas=(0.9, 0.999)
) -> torch.optim.Optimizer:
    """timm's optimizer factory on vmoe's parameter groups (``param_groups``: each group's own
    ``weight_decay``/``lr``). ``momentum`` goes to optimizers that have one, ``betas`` to those
    with betas (timm's ``OptimInfo``); ``foreach`` where supported (one kernel per group: on a
    CPU it halves the update of a small model)."""
    check_optimizer_name(name)
    timm_name = _TIMM_NAMES.get(name, name)
    info = get_optimizer_info(timm_name)
    kwargs = {"betas": tuple(betas)[: info.num_betas]} if info.has_betas else {}
    return create_optimizer_v2(
        groups, opt=timm_name, lr=lr, momentum=momentum, foreach=True, **kwargs
    )


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, peak_lr: float, end_lr: float
) -> float:
    """Multiplier of ``peak_lr`` at optimizer step ``step`` (0-based).

    Warmup: linear from ``peak_lr / (warmup_steps + 1)`` up to the peak (never exactly 0, so the
    first step moves). Decay over the remaining steps to ``end_lr`` (cosine or linear).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    end = end_lr / peak_lr if peak_lr > 0 else 0.0
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return end + (1.0 - end) * shape
