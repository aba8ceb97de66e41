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
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..plan import SoftRoutingPlan

__all__ = ["soft_dispatch", "soft_combine"]


def _mixing_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _row_order(num_groups, num_experts: int, device: torch.device) -> torch.Tensor:
    """[G] int64: the group whose slots fill row block r (rows ``r*P .. r*P + P - 1``) of each
    expert, in the official order: ``r`` itself when ``G % E != 0``; when ``G % E == 0`` the
    interleaved ``g = (r % E) * (G/E) + r // E``. Tensor arithmetic, no branch on G (which
    stays symbolic under torch.export with a dynamic batch)."""
    G, E = num_groups, num_experts
    r = torch.arange(G, device=device)
    interleaved = (r % E) * (G // E) + r // E
    divisible = (r[-1:] + 1) % E == 0  # [1]: G % E == 0
    return torch.where(divisible, interleaved, r)


def _layout_known(num_groups, num_experts: int):
    """True/False when ``G % E == 0`` is known without a guard (eager: always; the views below,
    one copy), None when G is symbolic (torch.export with a dynamic batch: the index form,
    which gives the same rows for every G without specializing on it)."""
    if statically_known_true(num_groups % num_experts == 0):
        return True
    if statically_known_true(num_groups % num_experts != 0):
        return False
    return None


def _groups_to_rows(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[G, E*P, d] (one bmm output per group) -> [E, G*P, d] in the official row order: one copy."""
    G, EP, d = slots.shape
    E = num_experts
    P = EP // E
    divisible = _layout_known(G, E)
    if divisible:  # g = a*(G/E) + b -> row (b*E + a)*P + p
        rows = slots.view(E, G // E, E, P, d).permute(2, 1, 0, 3, 4)  # [E, b, a, P, d]
    elif divisible is False:
        rows = slots.view(G, E, P, d).transpose(0, 1)  # [E, G, P, d]
    else:
        rows = (
            slots.view(G, E, P, d).transpose(0, 1).index_select(1, _row_order(G, E, slots.device))
        )
    return rows.reshape(E, G * P, d)


def _rows_to_groups(rows: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[E, G*P, d] in the official row order -> [G, E*P, d]: one copy."""
    E, GP, d = rows.shape
    G = num_groups
    P = GP // G
    divisible = _layout_known(G, E)
    if divisible:
        groups = rows.view(E, G // E, E, P, d).permute(2, 1, 0, 3, 4)  # [a, b, E, P, d]
    elif divisible is False:
        groups = rows.view(E, G, P, d).transpose(0, 1)  # [G, E, P, d]
    else:
        order = _row_order(G, E, rows.device)
        block = torch.empty_like(order).scatter_(0, order, torch.arange(G, device=rows.device))
        groups = rows.view(E, G, P, d).transpose(0, 1).index_select(0, block)  # [G, E, P, d]
    return groups.reshape(G, E * P, d)


def soft_dispatch(
    x: torch.Tensor, plan: SoftRoutingPlan, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """x: [G, S, d] -> slot buffers [E, G*P, d]: each slot the dispatch-weighted mix of its
    group's tokens. One batched matmul over the groups ([E*P, S] @ [S, d] per group).

    dtype: buffer dtype (default: the autocast dtype if autocast is on, else x's).
    """
    G, S, d = x.shape
    E, P = plan.num_experts, plan.slots_per_expert
    dtype = _mixing_dtype(x, dtype)
    weight = plan.dispatch_weight.reshape(G, S, E * P).to(dtype)
    slots = torch.bmm(weight.transpose(1, 2), x.to(dtype))  # [G, E*P, d]
    return _groups_to_rows(slots, E)


def soft_combine(expert_out: torch.Tensor, plan: SoftRoutingPlan) -> torch.Tensor:
    """expert_out: [E, G*P, d'] -> [G, S, d']: each token the combine-weighted mix of all E*P
    slot outputs of its group."""
    E, GP, d = expert_out.shape
    G, S = plan.num_groups, plan.group_size
    slots = _rows_to_groups(expert_out, G)  # [G, E*P, d']
    weight = plan.combine_weight.reshape(G, S, -1).to(expert_out.dtype)
    return torch.bmm(weight, slots)  # [G, S, d']
