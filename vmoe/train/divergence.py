"""Divergence: a training run whose loss or weights became non-finite stops with one line that
says what diverged, at which step, and what to try; such weights are never saved."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["DivergenceError", "first_nonfinite_parameter", "DIVERGENCE_HINT"]

DIVERGENCE_HINT = (
    "try a lower model.lr (or more model.warmup_steps), gradient clipping "
    "(trainer.gradient_clip_val: 1.0), or trainer.precision: bf16-mixed instead of 16-mixed"
)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


@torch.no_grad()
def first_nonfinite_parameter(module: nn.Module) -> Optional[str]:
    """Name of the first parameter holding a NaN or an infinity, or None.

    One host sync when all is well: the per-tensor sums are stacked and tested together (a sum
    can overflow for huge finite weights; those tensors are then checked element-wise)."""
    named = [(n, p) for n, p in module.named_parameters() if p.numel() and p.is_floating_point()]
    if not named:
        return None
    sums = torch.stack([p.detach().float().sum().to(named[0][1].device) for _, p in named])
    if bool(torch.isfinite(sums).all()):
        return None
    for (name, p), total in zip(named, sums.tolist()):
        if not torch.isfinite(torch.tensor(total)) and not bool(torch.isfinite(p).all()):
            return name
    return None
