"""Optimizer parameter groups and the per-step learning-rate schedule.

The V-MoE recipe decays only "kernels": matrices and expert weight slabs. Biases, norm scales,
the class token and position embeddings get no weight decay (timm's and the official code's
convention). The schedule is a linear warmup from 0 to the peak, then cosine or linear decay to
``end_lr``; it is stepped every optimizer step.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch.nn as nn

__all__ = ["param_groups", "lr_factor", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")


def _no_decay_names(model: nn.Module) -> set:
    names = set()
    if hasattr(model, "no_weight_decay"):
        names |= set(model.no_weight_decay())  # timm: pos_embed, cls_token, reg_token, ...
    return names


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups: decayed kernels, and everything 0/1-D, a bias or an embedding token.

    Expert biases are [E, h] (2-D) but are biases: the name decides, not only the rank.
    """
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf.endswith("bias") or name in skip or leaf in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              peak_lr: float, end_lr: float) -> float:
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


def count(groups: Iterable[Dict]) -> List[int]:
    """Number of parameter elements per group (for logging/tests)."""
    return [sum(p.numel() for p in g["params"]) for g in groups]
