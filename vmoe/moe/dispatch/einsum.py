"""The oracle: the official V-MoE one-hot einsum dispatch and combine.

They build [G, S, E, C] tensors (tokens x experts x capacity), so they are slow and memory-hungry;
kept as the reference the index backends are tested against (``dispatcher="einsum"``).
"""

from __future__ import annotations

import torch

from ..plan import RoutingPlan

__all__ = ["einsum_dispatch", "einsum_combine", "one_hot_weights"]


def one_hot_weights(plan: RoutingPlan):
    """One-hot dispatch [G, S, E, C] bool and combine [G, S, E, C] float tensors."""
    G, S, K = plan.expert_index.shape
    E, C = plan.num_experts, plan.capacity
    flat = plan.expert_index * C + plan.slot.clamp_min(0)  # [G, S, K] index into E*C
    dispatch_mask = torch.zeros(G, S, E * C, dtype=torch.bool, device=flat.device)
    dispatch_mask.scatter_(2, flat, plan.kept)
    combine_weight = torch.zeros(G, S, E * C, dtype=plan.combine_weight.dtype, device=flat.device)
    combine_weight = combine_weight.scatter_add(2, flat, plan.combine_weight)
    return dispatch_mask.view(G, S, E, C), combine_weight.view(G, S, E, C)


def einsum_dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Oracle: the official one-hot einsum dispatch. [G, S, d] -> [E, G*C, d]."""
    dispatch_mask, _ = one_hot_weights(plan)
    out = torch.einsum("gsec,gsd->egcd", dispatch_mask.to(x.dtype), x)
    return out.reshape(plan.num_experts, -1, x.shape[-1])


def einsum_combine(expert_out: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Oracle: the official one-hot einsum combine. [E, G*C, d] -> [G, S, d]."""
    _, combine_weight = one_hot_weights(plan)
    E, GC, d = expert_out.shape
    per_group = expert_out.view(E, plan.num_groups, plan.capacity, d)
    return torch.einsum("gsec,egcd->gsd", combine_weight.to(expert_out.dtype), per_group)
