"""Auxiliary-loss-free load balancing (DeepSeek-V3), with torchtitan's centred update.

A top-K router with ``bias_update_rate`` set keeps two float32 buffers of shape [E] (float32
under any cast of the model: ``TopKRouter._apply``): ``expert_bias``, added to the scores only
to choose the experts (the combine weights stay the unbiased scores), and ``expert_load``, the
assignments its training forwards chose since the last update (demand, counted before the
capacity cut). Once per optimizer step, outside the gradient::

    load  = expert_load summed over the data-parallel ranks        # [E]
    delta = rate * sign(mean(load) - load)                         # under-loaded experts up
    delta = delta - mean(delta)                                    # centred (torchtitan)
    expert_bias += delta;  expert_load = 0

Whose rule: DeepSeek-V3 (its paper) and Megatron-Core (``get_updated_expert_bias``) move each
bias by ``+-rate`` (the first two lines, no centring); torchtitan (its optimizer pre-hook)
also subtracts the mean, as here. Centring shifts every bias of a router by the same amount,
so it changes no choice (top-K of scores + bias): both rules route the same (up to float
rounding), and the centred biases stay at mean 0 instead of drifting.

Both buffers are in the state dict: ``expert_bias`` is what the model routes with, and keeping
``expert_load`` makes a checkpoint written between two micro-batches of one optimizer step
resume exactly (the counts of the micro-batches already run are not lost).

In a plain loop call ``update_expert_biases(model)`` after the backward and before (or
after) ``optimizer.step()``, or ``attach_bias_updates(optimizer, model)`` once: it updates
after every step that really happened (not after a step fp16's ``GradScaler`` skips for inf
gradients: the counts then wait for the next step). ``vmoe fit`` attaches it to its optimizers
(once per real optimizer step, after the last micro-batch of a gradient-accumulation window).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
import torch.nn as nn

from .checks import check_bias_update_rate  # noqa: F401  (the rule; re-exported)

__all__ = [
    "check_bias_update_rate",
    "bias_update",
    "update_expert_biases",
    "attach_bias_updates",
    "step_was_skipped",
    "bias_balanced_routers",
    "expert_load_buffer_names",
    "expert_bias_values",
]


@torch.no_grad()
def bias_update(load: torch.Tensor, rate: float) -> torch.Tensor:
    """load: [E] assignments per expert -> the bias change [E] (float32, mean 0):
    ``rate * sign(mean(load) - load)`` minus its mean. Equal loads (or none at all) give 0."""
    load = load.float()
    delta = rate * torch.sign(load.mean() - load)
    return delta - delta.mean()


def bias_balanced_routers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The routers of ``model`` that balance by bias (``bias_update_rate`` set), by module name
    (e.g. ``"blocks.1.mlp.router"``), in module order."""
    return OrderedDict(
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "bias_update_rate", None) is not None
        and isinstance(getattr(m, "expert_load", None), torch.Tensor)
    )


def expert_load_buffer_names(model: nn.Module) -> list:
    """The state-dict names of every ``expert_load`` buffer (each rank's own counts: DDP must not
    broadcast them from rank 0, see ``VmoeClassifier.setup``)."""
    return [
        f"{name}.expert_load" if name else "expert_load" for name in bias_balanced_routers(model)
    ]


def _distributed(process_group) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(process_group) > 1


@torch.no_grad()
def update_expert_biases(model: nn.Module, process_group=None) -> Dict[str, torch.Tensor]:
    """Apply one bias update to every bias-balanced router of ``model`` and reset their counts.

    The counts of all layers are summed over ``process_group`` (default: the whole world, i.e.
    every data-parallel rank, also under expert parallelism, where every rank routes its own
    tokens with the same router) with one ``all_reduce`` when torch.distributed is initialized,
    so every rank applies the same update and the biases stay identical across ranks.

    Returns ``{router name: load [E]}``, the (reduced) counts the update used; empty when the
    model has no bias-balanced router (then nothing is communicated).
    """
    routers = bias_balanced_routers(model)
    if not routers:
        return {}
    loads = [router.expert_load for router in routers.values()]
    flat = torch.cat([load.reshape(-1).float() for load in loads])  # [sum of E]
    if _distributed(process_group):
        torch.distributed.all_reduce(flat, group=process_group)
    out, offset = {}, 0
    for (name, router), load in zip(routers.items(), loads):
        size = load.numel()
        total = flat[offset : offset + size]
        offset += size
        router.expert_bias.add_(bias_update(total, router.bias_update_rate).to(router.expert_bias))
        load.zero_()
        out[name] = total.clone()
    return out


def step_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the ``optimizer.step()`` running now leaves the parameters as they were because
    fp16's ``GradScaler`` found inf/NaN gradients. ``GradScaler.step`` does not call ``step()``
    at all for such a step, except on optimizers that skip by themselves (fused Adam, AdamW,
    SGD: ``_step_supports_amp_scaling``), which it calls with ``optimizer.found_inf`` set (a
    tensor, nonzero to skip): read during the step, i.e. in a step hook."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.sum().item())


def attach_bias_updates(optimizer: torch.optim.Optimizer, model: nn.Module, process_group=None):
    """Run ``update_expert_biases(model, process_group)`` after every optimizer step that
    really updates the parameters (``optimizer.register_step_post_hook``); returns the hook
    handle (``.remove()`` detaches).

    Once per real step: with gradient accumulation the update uses the counts of every
    micro-batch of the step; a step that fp16's ``GradScaler`` skips (inf/NaN gradients; see
    ``step_was_skipped``) moves no bias and keeps the counts, so the next real step's update
    uses them too. After the step, so optimizers stepped with a closure that runs the forward
    (Lightning's automatic optimization, LBFGS) count that forward first; ``vmoe fit`` attaches
    it to its optimizers (``VmoeClassifier.on_train_start``).
    """

    return optimizer.register_step_post_hook(_UpdateAfterStep(model, process_group))


class _UpdateAfterStep:
    """The step post-hook of ``attach_bias_updates`` (a class, not a closure: a module holding
    its handle stays picklable)."""

    def __init__(self, model: nn.Module, process_group=None):
        self.model, self.process_group = model, process_group

    def __call__(self, optimizer, args, kwargs) -> None:
        if not step_was_skipped(optimizer):
            update_expert_biases(self.model, self.process_group)


@torch.no_grad()
def expert_bias_values(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{MoE layer name: expert_bias [E]}`` of every bias-balanced router (e.g.
    ``"blocks.1.mlp"``), for logging the bias per expert over training."""
    out = {}
    for name, router in bias_balanced_routers(model).items():
        layer = name[: -len(".router")] if name.endswith(".router") else name
        out[layer] = router.expert_bias.detach().clone()
    return out
