"""Dropless execution: every kept (token, choice) pair runs on its expert, nothing else runs.

The formulation of MegaBlocks and torchtitan: the T*K pairs are ordered by expert (stable:
token order within an expert), each expert runs one matmul pair on exactly its rows, and every
token mixes its K outputs with its combine weights. No capacity, no empty buffer row, no
padding to a routing group: the cost is K*T expert rows, and a token's output depends on that
token alone (batch-independent by construction).

Shapes: T tokens, K choices per token, P = T*K pairs (pair ``t*K + k``), E experts, d width.

The ordering is built without a sort (one-hot cumsums, O(P*E)), so it is deterministic and
exports to every runtime; the per-expert row counts are data-dependent: eager reads them once
(``tolist``), ``torch.export`` makes them unbacked sizes bounded with ``torch._check`` (one
dynamic slice per expert, E static), and ONNX gets one ``Slice`` per expert.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["order_by_expert", "expert_bounds", "dropless_combine", "run_dropless"]


def order_by_expert(
    expert_index: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_index: [T, K] -> (position [P], order [P], ends [E]).

    ``position[p]``: the row of pair p once the pairs are grouped by expert (expert 0's pairs
    first, token order within an expert); ``order``: its inverse (the pair at each row);
    ``ends[e]``: one past expert e's last row (its rows are ``ends[e-1] .. ends[e]``).
    """
    flat = expert_index.reshape(-1)  # [P]
    experts = torch.arange(num_experts, device=flat.device)
    one_hot = (flat.unsqueeze(1) == experts).to(torch.int32)  # [P, E]
    within = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # [P]: earlier pairs of the same expert
    ends = one_hot.sum(0).cumsum(0)  # [E]
    starts = ends - one_hot.sum(0)
    position = (starts.index_select(0, flat) + within).long()  # [P]
    order = torch.zeros_like(position).scatter_(
        0, position, torch.arange(flat.shape[0], device=flat.device)
    )
    return position, order, ends.long()


def expert_bounds(ends: torch.Tensor, num_rows) -> List:
    """[E] row ends -> the E+1 row bounds ``[0, ends[0], .., num_rows]`` as Python ints (eager;
    one host read) or, under ``torch.export``, unbacked sizes checked to be ordered and within
    ``[0, num_rows]`` (so each expert's rows are one dynamic slice)."""
    inner = ends[:-1].tolist()
    if torch.compiler.is_exporting():
        previous = 0
        for bound in inner:
            torch._check(bound >= 0)
            torch._check(bound >= previous)
            torch._check(bound <= num_rows)
            previous = bound
    return [0, *inner, num_rows]


def dropless_combine(
    sorted_out: torch.Tensor, position: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """sorted_out: [P, d'] expert outputs in expert order, position: [P], weight: [T, K] ->
    [T, d']: each token the weighted sum of its K outputs (a gather, no atomics)."""
    T, K = weight.shape
    picked = sorted_out.index_select(0, position).view(T, K, -1)  # [T, K, d']
    return torch.bmm(weight.to(picked.dtype).view(T, 1, K), picked).view(T, -1)


def run_dropless(
    tokens: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    experts,
    bf16_round=None,
) -> torch.Tensor:
    """tokens: [T, d], expert_index / weight: [T, K] -> [T, d'] through ``experts`` (an
    ``Experts``), each expert on exactly its pairs' rows. ``bf16_round``: applied to the
    dispatched rows and to the expert outputs (the official bfloat16 dispatcher), or None."""
    T, K = expert_index.shape
    position, order, ends = order_by_expert(expert_index, experts.num_experts)
    token_of_row = torch.div(order, K, rounding_mode="floor")  # [P]
    rows = tokens.index_select(0, token_of_row)  # [P, d]
    if tokens.is_floating_point() and torch.is_autocast_enabled(tokens.device.type):
        rows = rows.to(torch.get_autocast_dtype(tokens.device.type))  # as dispatch does
    if bf16_round is not None:
        rows = bf16_round(rows)
    out = experts.forward_sorted(rows, ends, expert_bounds(ends, T * K))  # [P, d']
    if bf16_round is not None:
        out = bf16_round(out)
    return dropless_combine(out, position, weight)
