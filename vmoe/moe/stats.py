"""Routing statistics read from a RoutingPlan (never re-deriving the routing)."""
from __future__ import annotations

import math
from typing import Dict

import torch

from .plan import RoutingPlan

__all__ = ["routing_statistics", "expert_choice_metrics", "image_expert_usage"]


@torch.no_grad()
def routing_statistics(plan: RoutingPlan) -> Dict[str, torch.Tensor]:
    """Summary of one forward's routing (padding tokens excluded).

    Returns a dict of float tensors:
        ``dropped_fraction`` (): fraction of token-choices (assignments) that got no buffer place;
        ``unrouted_fraction`` (): fraction of tokens with no expert at all (output = residual);
        ``load`` [E]: fraction of the kept assignments that each expert processed (sums to 1);
        ``load_cv``, ``load_min``, ``load_max`` (): CV of ``load`` and min/max relative to 1/E;
        ``importance`` [E]: each expert's share of the total gate mass (sums to 1);
        ``buffer_fill`` (): kept assignments / (E * G * C), how full the buffers are;
        ``router_entropy`` (): mean entropy (nats) of the tokens' gate distributions.
    A plan without tokens (an empty batch) has nothing to measure: its fractions and
    ``load_cv`` are NaN (not a misleading 0 or 1).
    """
    G, S, K = plan.expert_index.shape
    E = plan.num_experts
    valid = plan.valid if plan.valid is not None else torch.ones(G, S, dtype=torch.bool, device=plan.slot.device)
    kept = plan.kept & valid.unsqueeze(-1)
    num_valid = valid.sum().float()  # >= 1 for a layer's plan; 0 only for an empty batch
    counts = torch.zeros(E, device=kept.device).index_add_(
        0, plan.expert_index.reshape(-1), kept.reshape(-1).float())
    total_kept = counts.sum().clamp_min(1.0)
    load = counts / total_kept
    gates = plan.gates.float() * valid.unsqueeze(-1)
    importance = gates.sum((0, 1))
    importance = importance / importance.sum().clamp_min(1e-12)
    entropy = -(plan.gates.float().clamp_min(1e-12).log() * plan.gates.float()).sum(-1)
    return {
        "dropped_fraction": 1.0 - kept.sum() / (num_valid * K),
        "unrouted_fraction": ((~kept.any(-1)) & valid).sum() / num_valid,
        "load": load,
        "load_cv": load.std(unbiased=False) / load.mean(),
        "load_min": load.min() * E,
        "load_max": load.max() * E,
        "importance": importance,
        "buffer_fill": kept.sum() / float(E * G * plan.capacity),
        "router_entropy": (entropy * valid).sum() / num_valid,
    }


@torch.no_grad()
def expert_choice_metrics(plan: RoutingPlan) -> Dict[str, torch.Tensor]:
    """The official expert-choice router's metrics, one value per group ([G] tensors):
    ``num_experts_per_item_min/max``, ``min/max_selected_gate`` and
    ``ratio_processed_items_by_at_least_{t}_experts`` for t = 1, 2, 4, ..., E."""
    G, S, E = plan.slot.shape
    kept = plan.kept
    per_item = kept.sum(-1)  # [G, S]
    selected = plan.gates.float()
    metrics = {
        "num_experts_per_item_min": per_item.min(1).values,
        "num_experts_per_item_max": per_item.max(1).values,
        "min_selected_gate": torch.where(kept, selected, torch.full_like(selected, math.inf)).flatten(1).min(1).values,
        "max_selected_gate": torch.where(kept, selected, torch.full_like(selected, -math.inf)).flatten(1).max(1).values,
    }
    thresholds = sorted({2**i for i in range(int(math.log2(E)) + 1)} | {E})
    for t in thresholds:
        metrics[f"ratio_processed_items_by_at_least_{t}_experts"] = (per_item >= t).float().mean(1)
    return metrics


@torch.no_grad()
def image_expert_usage(plan: RoutingPlan, batch_size: int) -> torch.Tensor:
    """[B, E] float: for each of the forward's B images, the fraction of its N*K token choices
    that expert e processed (a row sums to 1 minus the image's dropped fraction). Images are
    the plan's tokens in order, N = tokens / B (padding at the end excluded)."""
    G, S, K = plan.expert_index.shape
    tokens = G * S if plan.valid is None else int(plan.valid.sum())
    if batch_size < 1 or tokens % batch_size:
        raise ValueError(f"the plan holds {tokens} tokens, not a whole number of tokens for "
                         f"each of {batch_size} images")
    per_image = tokens // batch_size * K  # N*K choices
    experts = plan.expert_index.reshape(G * S, K)[:tokens].reshape(batch_size, per_image)
    kept = plan.kept.reshape(G * S, K)[:tokens].reshape(batch_size, per_image).float()
    usage = torch.zeros(batch_size, plan.num_experts, device=kept.device)
    return usage.scatter_add_(1, experts, kept) / per_image
