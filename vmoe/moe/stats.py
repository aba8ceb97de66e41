"""Routing statistics read from a plan (never re-deriving the routing): ``routing_statistics``
for the sparse routers' RoutingPlan, ``soft_routing_statistics`` for Soft MoE's SoftRoutingPlan.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from .plan import RoutingPlan, SoftRoutingPlan

__all__ = [
    "routing_statistics",
    "expert_choice_metrics",
    "soft_routing_statistics",
    "SOFT_TRAIN_STATS",
    "image_expert_usage",
]


@torch.no_grad()
def routing_statistics(plan: Union[RoutingPlan, SoftRoutingPlan]) -> Dict[str, torch.Tensor]:
    """Summary of one forward's routing (padding tokens excluded).

    A SoftRoutingPlan (Soft MoE) drops nothing and has no load: it gets
    ``soft_routing_statistics(plan)`` instead (no dropped-token fields).

    The result is a dict of float tensors:

    - ``dropped_fraction`` (): fraction of token-choices (assignments) that got no buffer place;
    - ``unrouted_fraction`` (): fraction of tokens with no expert at all (output = residual);
    - ``load`` [E]: fraction of the kept assignments that each expert processed (sums to 1);
    - ``load_cv``, ``load_min``, ``load_max`` (): CV of ``load`` and min/max relative to 1/E;
    - ``importance`` [E]: each expert's share of the total gate mass (sums to 1);
    - ``buffer_fill`` (): kept assignments / (E * G * C), how full the buffers are;
    - ``router_entropy`` (): mean entropy (nats) of the tokens' gate distributions.

    A plan without tokens (an empty batch) has nothing to measure: its fractions and
    ``load_cv`` are NaN (not a misleading 0 or 1).
    """
    if isinstance(plan, SoftRoutingPlan):
        return soft_routing_statistics(plan)
    G, S, K = plan.expert_index.shape
    E = plan.num_experts
    valid = (
        plan.valid
        if plan.valid is not None
        else torch.ones(G, S, dtype=torch.bool, device=plan.slot.device)
    )
    kept = plan.kept & valid.unsqueeze(-1)
    num_valid = valid.sum().float()  # >= 1 for a layer's plan; 0 only for an empty batch
    counts = torch.zeros(E, device=kept.device).index_add_(
        0, plan.expert_index.reshape(-1), kept.reshape(-1).float()
    )
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
        "min_selected_gate": torch.where(kept, selected, torch.full_like(selected, math.inf))
        .flatten(1)
        .min(1)
        .values,
        "max_selected_gate": torch.where(kept, selected, torch.full_like(selected, -math.inf))
        .flatten(1)
        .max(1)
        .values,
    }
    thresholds = sorted({2**i for i in range(int(math.log2(E)) + 1)} | {E})
    for t in thresholds:
        metrics[f"ratio_processed_items_by_at_least_{t}_experts"] = (per_item >= t).float().mean(1)
    return metrics


# The scalars of ``soft_routing_statistics`` a training logger follows (all finite for a layer's
# plan): how balanced the combine mass is over experts, and how spread the two softmaxes are.
SOFT_TRAIN_STATS = (
    "importance_min",
    "importance_max",
    "importance_cv",
    "combine_entropy",
    "dispatch_effective_tokens",
)

# Cosine similarity as the official Soft MoE metrics compute it: rsqrt(sum x^2 + eps).
_COSINE_EPS = 1e-9


def _entropy(p: torch.Tensor, dim) -> torch.Tensor:
    """Entropy in nats of distributions ``p`` along ``dim`` (0 log 0 = 0)."""
    return -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum(dim)


def _pairwise_cosine(
    vectors: torch.Tensor, valid: Optional[torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """vectors [G, V, n] -> cosine similarity [G, V, V] of the V vectors of each group, and the
    official summary over the off-diagonal pairs of every group: ``min``; ``max`` = max(0, the
    largest) as the official masking does; ``mean`` = (sum - diagonal count) / off-diagonal count,
    i.e. the off-diagonal mean taking the diagonal as exactly 1. ``valid`` [G, V] (or None)
    leaves padding vectors out of the summary."""
    G, V, _ = vectors.shape
    unit = vectors * torch.rsqrt((vectors * vectors).sum(-1, keepdim=True) + _COSINE_EPS)
    sim = unit @ unit.transpose(1, 2)  # [G, V, V]
    eye = torch.eye(V, dtype=torch.bool, device=sim.device).expand(G, V, V)
    both = (valid.unsqueeze(1) & valid.unsqueeze(2)) if valid is not None else torch.ones_like(eye)
    pair, diag = ~eye & both, eye & both
    num_pairs = pair.sum()
    inf = sim.new_full((1,), math.inf)
    nan = sim.new_full((), math.nan)
    # One extra +-inf element keeps the reductions defined without any pair (no host sync).
    low = torch.cat([torch.where(pair, sim, inf).flatten(), inf]).amin()
    high = torch.cat([torch.where(pair, sim, -inf).flatten(), -inf]).amax()
    return {
        "matrix": sim,
        "min": torch.where(num_pairs > 0, low, nan),
        "max": torch.where(num_pairs > 0, high.clamp_min(0.0), nan),
        "mean": ((sim * (pair | diag)).sum() - diag.sum()) / num_pairs,
    }


@torch.no_grad()
def soft_routing_statistics(plan: SoftRoutingPlan) -> Dict[str, torch.Tensor]:
    """Summary of one forward of a Soft MoE layer, read from its plan (padding tokens excluded).

    Axis letters: G groups, S tokens per group, E experts, P slots per expert. A slot is one
    (e, p); flattened slot index ``e * P + p``.

    The result is a dict of float32 tensors:

    - ``importance`` [E]: each expert's share of the combine mass (the combine weights of all
      tokens summed over its P slots; sums to 1);
    - ``slot_importance`` [E, P]: the same per slot (sums to 1);
    - ``importance_cv``, ``importance_min``, ``importance_max`` (): CV of ``importance`` and
      its min/max relative to 1/E (1 = balanced);
    - ``combine_entropy`` (): mean over tokens of the entropy (nats) of their combine weights
      over the E*P slots (log(E*P): every slot equally; 0: a single slot);
    - ``dispatch_entropy`` (): mean over the G*E*P slots of the entropy (nats) of their dispatch
      weights over the group's tokens; ``slot_dispatch_entropy`` [E, P] its mean over groups;
    - ``dispatch_effective_tokens`` (): mean over slots of exp(dispatch entropy), the number of
      tokens a slot effectively mixes (1: one token; S: all equally);
      ``slot_effective_tokens`` [E, P] its mean over groups;
    - ``slot_similarity`` [E*P, E*P]: cosine similarity of the slots' dispatch weight vectors
      (over the group's tokens), averaged over groups (1 on the diagonal);

    and the official Soft MoE router metrics (``vmoe/projects/soft_moe/router.py``), over all
    groups:

    - ``combine_weights_min_mean`` / ``_max_mean``: mean over tokens of the smallest / largest
      combine weight; ``dispatch_weights_min_mean`` / ``_max_mean``: mean over slots of the
      smallest / largest dispatch weight (over the valid tokens);
    - ``combine_weights_similarity_{min,max,mean}``: cosine similarity of the combine weight
      vectors of token pairs within a group; ``dispatch_weights_similarity_{min,max,mean}``:
      of slot pairs within a group (official summary: ``max`` is at least 0, ``mean`` takes
      the diagonal as 1).

    A plan without tokens (an empty batch) has nothing to measure: its means are NaN.
    """
    if not isinstance(plan, SoftRoutingPlan):
        raise TypeError(
            f"soft_routing_statistics needs a SoftRoutingPlan (a Soft MoE layer's "
            f"last_plan), got {type(plan).__name__}; use routing_statistics"
        )
    G, S, E, P = plan.dispatch_weight.shape
    dispatch = plan.dispatch_weight.float()
    combine = plan.combine_weight.float()
    valid = (
        plan.valid
        if plan.valid is not None
        else torch.ones(G, S, dtype=torch.bool, device=dispatch.device)
    )
    num_valid = valid.sum().float()
    combine = combine * valid.view(G, S, 1, 1)  # padding tokens carry no combine mass

    slot_mass = combine.sum((0, 1))  # [E, P]
    slot_importance = slot_mass / slot_mass.sum().clamp_min(1e-12)
    importance = slot_importance.sum(-1)  # [E]

    flat_combine = combine.reshape(G, S, E * P)
    combine_entropy = (_entropy(flat_combine, -1) * valid).sum() / num_valid
    dispatch_entropy = _entropy(dispatch, 1)  # [G, E, P]
    effective = dispatch_entropy.exp()

    dispatch_valid = valid.view(G, S, 1, 1)
    slots = dispatch.reshape(G, S, E * P).transpose(1, 2)  # [G, E*P, S]: one vector per slot
    slot_cos = _pairwise_cosine(slots, None)
    token_cos = _pairwise_cosine(flat_combine, plan.valid)
    return {
        "importance": importance,
        "slot_importance": slot_importance,
        "importance_cv": importance.std(unbiased=False) / importance.mean(),
        "importance_min": importance.min() * E,
        "importance_max": importance.max() * E,
        "combine_entropy": combine_entropy,
        "dispatch_entropy": dispatch_entropy.mean(),
        "slot_dispatch_entropy": dispatch_entropy.mean(0),
        "dispatch_effective_tokens": effective.mean(),
        "slot_effective_tokens": effective.mean(0),
        "slot_similarity": slot_cos["matrix"].mean(0),
        "combine_weights_min_mean": (flat_combine.amin(-1) * valid).sum() / num_valid,
        "combine_weights_max_mean": (flat_combine.amax(-1) * valid).sum() / num_valid,
        "dispatch_weights_min_mean": torch.where(dispatch_valid, dispatch, math.inf).amin(1).mean(),
        "dispatch_weights_max_mean": dispatch.amax(1).mean(),
        **{f"combine_weights_similarity_{k}": token_cos[k] for k in ("min", "max", "mean")},
        **{f"dispatch_weights_similarity_{k}": slot_cos[k] for k in ("min", "max", "mean")},
    }


@torch.no_grad()
def image_expert_usage(plan: Union[RoutingPlan, SoftRoutingPlan], batch_size: int) -> torch.Tensor:
    """[B, E] float: for each of the forward's B images, the share of its routing that expert e
    took. Sparse plans: the fraction of the image's N*K token choices that expert e processed
    (a row sums to 1 minus the image's dropped fraction). Soft plans: expert e's share of the
    image's combine mass (its P slots' combine weights summed over the image's tokens / N; a
    row sums to 1, nothing is dropped). Images are the plan's tokens in order, N = tokens / B
    (padding at the end excluded)."""
    G, S = plan.num_groups, plan.group_size
    tokens = G * S if plan.valid is None else int(plan.valid.sum())
    if batch_size < 1 or tokens % batch_size:
        raise ValueError(
            f"the plan holds {tokens} tokens, not a whole number of tokens for "
            f"each of {batch_size} images"
        )
    if isinstance(plan, SoftRoutingPlan):
        combine = plan.combine_weight.float().sum(-1).reshape(G * S, -1)[:tokens]  # [T, E]
        return combine.reshape(batch_size, tokens // batch_size, -1).mean(1)
    K = plan.num_selected
    per_image = tokens // batch_size * K  # N*K choices
    experts = plan.expert_index.reshape(G * S, K)[:tokens].reshape(batch_size, per_image)
    kept = plan.kept.reshape(G * S, K)[:tokens].reshape(batch_size, per_image).float()
    usage = torch.zeros(batch_size, plan.num_experts, device=kept.device)
    return usage.scatter_add_(1, experts, kept) / per_image
