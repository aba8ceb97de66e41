"""Dispatch tokens into per-expert buffers and combine expert outputs back, from a RoutingPlan.

Shapes: x [G, S, d] -> buffers [E, G*C, d] -> expert outputs [E, G*C, d'] -> y [G, S, d'].
Buffer row ``g*C + c`` of expert e holds the token that got slot c of e in group g.

The default path is index based and static-shape: one ``index_select`` through the plan's
row -> token map (empty rows read an appended zero row), and a combine that *gathers* each
token's K outputs and mixes them with its weights (no atomics: deterministic). No tensor of
size tokens x experts x capacity exists on this path. ``einsum_dispatch``/``einsum_combine``
build the official one-hot tensors and are kept as a test oracle.
"""
from __future__ import annotations

import torch

from .plan import RoutingPlan

__all__ = ["dispatch", "combine", "einsum_dispatch", "einsum_combine", "DISPATCHERS"]


def _append_zero_row(rows: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N + 1, d] with a zero last row (the target of empty/dropped indices)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[-1])], dim=0)


def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """x: [G, S, d] -> expert buffers [E, G*C, d]. Empty buffer rows are zero."""
    G, S, d = x.shape
    rows = _append_zero_row(x.reshape(G * S, d)).index_select(0, plan.buffer_token())
    return rows.view(plan.num_experts, G * plan.capacity, d)


def combine(expert_out: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """expert_out: [E, G*C, d] -> [G, S, d], each token the weighted sum of its K outputs.

    A dropped assignment reads the zero row with weight 0, so a token whose every choice was
    dropped gets exactly 0 (only the residual passes through the block).
    """
    E, GC, d = expert_out.shape
    G, S, K = plan.expert_index.shape
    rows = _append_zero_row(expert_out.reshape(E * GC, d))
    picked = rows.index_select(0, plan.buffer_position().reshape(-1)).view(G * S, K, d)
    weight = plan.combine_weight.to(picked.dtype).reshape(G * S, 1, K)
    return torch.bmm(weight, picked).view(G, S, d)


def _dense_weights(plan: RoutingPlan):
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
    dispatch_mask, _ = _dense_weights(plan)
    out = torch.einsum("gsec,gsd->egcd", dispatch_mask.to(x.dtype), x)
    return out.reshape(plan.num_experts, -1, x.shape[-1])


def einsum_combine(expert_out: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Oracle: the official one-hot einsum combine. [E, G*C, d] -> [G, S, d]."""
    _, combine_weight = _dense_weights(plan)
    E, GC, d = expert_out.shape
    per_group = expert_out.view(E, plan.num_groups, plan.capacity, d)
    return torch.einsum("gsec,egcd->gsd", combine_weight.to(expert_out.dtype), per_group)


DISPATCHERS = {
    "index": (dispatch, combine),
    "einsum": (einsum_dispatch, einsum_combine),
}
