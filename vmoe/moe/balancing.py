"""Balancing losses in any training loop: the auxiliary loss's gradient rides on the layer output.

A MoE layer computes its weighted auxiliary loss (importance, load, ...) in every forward. A
training loop must add it to the task loss, or the router trains without load balancing; timm's
``train.py``, the Hugging Face ``Trainer`` and most plain loops backpropagate only their own loss.
Each ``MoeMlp`` therefore has an ``aux_loss_mode``:

- ``"backward"`` (the default): the layer attaches its aux loss to its expert outputs with
  ``AttachAuxLoss`` (Megatron-Core's ``MoEAuxLossAutoScaler`` pattern): forward returns the
  outputs unchanged; backward passes their gradient on unchanged and also sends the gradient
  ``aux_loss_scale`` into the aux loss, exactly what ``aux_loss_scale * aux_loss`` added to the
  loss would give. The ``aux_loss``/``aux_losses`` kept on the layer (and
  ``vmoe.models.aux_loss(model)``) are then DETACHED: they are for logging, and adding them to a
  loss changes no gradient (nothing is counted twice).
- ``"manual"``: nothing is attached; ``aux_loss`` keeps its graph and the loop adds it
  (``loss = task + vmoe.models.aux_loss(model)``). ``VmoeClassifier`` (``vmoe fit``) uses this mode
  and adds ``aux_loss_weight`` x the aux loss itself, so Lightning's gradient accumulation and AMP
  loss scaling apply to both terms.

``aux_loss_scale`` (default 1.0) is the factor the aux loss enters the backpropagated loss with,
so it must follow what the loop does to its task loss: ``1 / N`` when the loop divides the loss by
N accumulation steps, times ``scaler.get_scale()`` under a float16 ``GradScaler``
(``set_aux_loss_scale(model, scaler.get_scale() / N)`` before each backward; bfloat16 needs no
scaler). The attached gradient is added once per backward pass through the layer's output.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn

AUX_LOSS_MODES = ("backward", "manual")

__all__ = [
    "AttachAuxLoss",
    "AUX_LOSS_MODES",
    "set_aux_loss_mode",
    "set_aux_loss_scale",
    "check_aux_loss_mode",
    "check_aux_loss_scale",
]


class AttachAuxLoss(torch.autograd.Function):
    """``apply(out, aux_loss, scale) -> out`` unchanged; in backward, ``out``'s gradient passes
    through and ``aux_loss`` (a scalar) receives the gradient ``scale``.

    out: any tensor on the path to the loss (the layer's expert outputs [E, G*C, d']);
    aux_loss: [] float tensor with a graph; scale: a Python float. Works under
    ``torch.compile(fullgraph=True)`` (a changed scale recompiles once, then stays symbolic).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_out, torch.ones_like(aux_loss) * ctx.scale, None


def check_aux_loss_mode(mode) -> str:
    if mode not in AUX_LOSS_MODES:
        raise ValueError(
            f"aux_loss_mode={mode!r} must be one of {AUX_LOSS_MODES} ('backward': "
            "the aux losses reach the gradients by themselves; 'manual': the training "
            "loop adds vmoe.models.aux_loss(model) to its loss)"
        )
    return mode


def check_aux_loss_scale(scale) -> float:
    """A finite float >= 0 (a 0-dim tensor, e.g. a GradScaler's scale, is read once)."""
    if torch.is_tensor(scale) and scale.numel() == 1:
        scale = scale.item()
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise ValueError(
            f"aux_loss_scale={scale!r} must be a finite number >= 0 (the factor the "
            "aux loss enters the backpropagated loss with: 1 / accumulation steps, "
            "times the GradScaler's scale under float16)"
        )
    return float(scale)


def set_aux_loss_mode(model: nn.Module, mode: str) -> None:
    """Set ``aux_loss_mode`` ('backward' or 'manual', see this module) on every MoE layer of
    ``model`` (ValueError when it has none, or for another mode)."""
    from .layer import require_moe_layers  # (layer.py imports this module)

    check_aux_loss_mode(mode)
    for layer in require_moe_layers(model).values():
        layer.aux_loss_mode = mode


def set_aux_loss_scale(model: nn.Module, scale: Union[float, torch.Tensor]) -> None:
    """Set ``aux_loss_scale`` on every MoE layer of ``model``: the factor the attached aux loss
    enters the backpropagated loss with in 'backward' mode (``1 / accumulation_steps``, times
    ``scaler.get_scale()`` under a float16 GradScaler). ValueError for a negative or non-finite
    scale."""
    from .layer import require_moe_layers

    scale = check_aux_loss_scale(scale)
    for layer in require_moe_layers(model).values():
        layer.aux_loss_scale = scale
