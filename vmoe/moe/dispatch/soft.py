"""Dispatch and combine for a SoftRoutingPlan (Soft MoE): dense mixing matmuls, no indices.

Shapes: x [G, S, d] -> slots [E, G*P, d] -> expert outputs [E, G*P, d'] -> y [G, S, d'].
Slot (g, e, p) is ``sum_s dispatch_weight[g, s, e, p] * x[g, s]`` (the raw tokens, as the
official code: normalization only enters the logits); token (g, s) of the output is
``sum_{e,p} combine_weight[g, s, e, p] * expert_out[e, row(g, p)]``.

Row order of the [E, G*P] buffers, as the official dispatcher lays them out (so per-slot
intermediates and expert parallelism line up with the JAX code): row ``g*P + p`` when
``G % E != 0``; when ``G % E == 0`` the groups are interleaved, group ``g = a*(G/E) + b`` going to
row ``(b*E + a)*P + p``. The layer output does not depend on the order.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..plan import SoftRoutingPlan

__all__ = ["soft_dispatch", "soft_combine"]


def _mixing_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _groups_to_rows(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[G, E*P, d] (one bmm output per group) -> [E, G*P, d] in the official row order: one copy."""
    G, EP, d = slots.shape
    E = num_experts
    P = EP // E
    if G % E == 0:  # g = a*(G/E) + b -> row (b*E + a)*P + p
        rows = slots.view(E, G // E, E, P, d).permute(2, 1, 0, 3, 4)     # [E, b, a, P, d]
    else:
        rows = slots.view(G, E, P, d).transpose(0, 1)                    # [E, G, P, d]
    return rows.reshape(E, G * P, d)


def _rows_to_groups(rows: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[E, G*P, d] in the official row order -> [G, E*P, d]: one copy."""
    E, GP, d = rows.shape
    G = num_groups
    P = GP // G
    if G % E == 0:
        groups = rows.view(E, G // E, E, P, d).permute(2, 1, 0, 3, 4)    # [a, b, E, P, d]
    else:
        groups = rows.view(E, G, P, d).transpose(0, 1)                   # [G, E, P, d]
    return groups.reshape(G, E * P, d)


def soft_dispatch(x: torch.Tensor, plan: SoftRoutingPlan, dtype: Optional[torch.dtype] = None
                  ) -> torch.Tensor:
    """x: [G, S, d] -> slot buffers [E, G*P, d]: each slot the dispatch-weighted mix of its
    group's tokens. One batched matmul over the groups ([E*P, S] @ [S, d] per group).

    dtype: buffer dtype (default: the autocast dtype if autocast is on, else x's).
    """
    G, S, d = x.shape
    E, P = plan.num_experts, plan.slots_per_expert
    dtype = _mixing_dtype(x, dtype)
    weight = plan.dispatch_weight.reshape(G, S, E * P).to(dtype)
    slots = torch.bmm(weight.transpose(1, 2), x.to(dtype))                 # [G, E*P, d]
    return _groups_to_rows(slots, E)


def soft_combine(expert_out: torch.Tensor, plan: SoftRoutingPlan) -> torch.Tensor:
    """expert_out: [E, G*P, d'] -> [G, S, d']: each token the combine-weighted mix of all E*P
    slot outputs of its group."""
    E, GP, d = expert_out.shape
    G, S = plan.num_groups, plan.group_size
    slots = _rows_to_groups(expert_out, G)                                 # [G, E*P, d']
    weight = plan.combine_weight.reshape(G, S, -1).to(expert_out.dtype)
    return torch.bmm(weight, slots)                                        # [G, S, d']
