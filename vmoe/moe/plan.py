"""The RoutingPlan: the one structure a router hands on to dispatch, combine, losses and plots.

Axis letters (as in the official V-MoE code): G routing groups, S tokens per group, E experts,
K choices per token, C buffer capacity per expert and group, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

__all__ = ["RoutingPlan", "SoftRoutingPlan"]


@dataclass
class RoutingPlan:
    """Who goes where, with what weight, for every routing group.

    Attributes:
        expert_index: [G, S, K] int64. The K experts chosen by each token, best first. For
            expert-choice routing K = E and ``expert_index[..., e] = e``.
        slot: [G, S, K] int64. Position of the token in that expert's buffer of group g, in
            ``[0, C)``; -1 when the assignment was dropped (over capacity) or the token is padding.
        combine_weight: [G, S, K] float. Weight that mixes the expert outputs back into the token:
            the softmax gate (renormalized over the K choices if the router was asked to), 0 where
            dropped.
        gates: [G, S, E] float32. Softmax over experts, before selection (noisy in training).
        capacity: C, the buffer size of each expert per group.
        valid: [G, S] bool or None. False for padding tokens appended to fill the last group.
        dropless: The plan of a dropless forward (eval mode): every valid assignment is kept
            (C = S, slots in group order) and the experts ran on exactly the kept assignments'
            rows, not on E*G*C buffer rows.
    """

    expert_index: torch.Tensor
    slot: torch.Tensor
    combine_weight: torch.Tensor
    gates: torch.Tensor
    capacity: int
    valid: Optional[torch.Tensor] = None
    dropless: bool = False
    # The index maps below are derived from the fields; dispatch and combine both need them in
    # every forward, so each is computed once per plan.
    _index_maps: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_groups(self) -> int:
        return self.gates.shape[0]

    @property
    def group_size(self) -> int:
        return self.gates.shape[1]

    @property
    def num_experts(self) -> int:
        return self.gates.shape[2]

    @property
    def num_selected(self) -> int:
        return self.expert_index.shape[2]

    @property
    def kept(self) -> torch.Tensor:
        """[G, S, K] bool: the assignment has a buffer place."""
        return self.slot >= 0

    def buffer_position(self) -> torch.Tensor:
        """[G, S, K] int64: each assignment's row in the flattened [E * G * C] expert buffers.

        Row ``e * (G*C) + g * C + slot``; dropped assignments point at ``E * G * C``, one past the
        end, where dispatch/combine keep an all-zero row.
        """
        if "position" not in self._index_maps:
            G, C, E = self.num_groups, self.capacity, self.num_experts
            group_offset = torch.arange(G, device=self.slot.device).view(G, 1, 1) * C
            position = self.expert_index * (G * C) + group_offset + self.slot
            self._index_maps["position"] = torch.where(
                self.kept, position, torch.full_like(position, E * G * C)
            )
        return self._index_maps["position"]

    def buffer_assignment(self) -> torch.Tensor:
        """[E * G * C] int64: for each buffer row, the assignment it holds, as the flat index
        ``(g * S + s) * K + k`` into the [G, S, K] plan fields.

        Empty rows hold ``G * S * K``, one past the last assignment. Every kept assignment owns
        exactly one row (no collisions), so this is the inverse of ``buffer_position()`` and lets
        the backward passes of dispatch and combine be gathers too (deterministic, no atomics).
        """
        if "assignment" not in self._index_maps:
            G, S, K = self.expert_index.shape
            num_rows = self.num_experts * G * self.capacity
            table = torch.full(
                (num_rows + 1,), G * S * K, dtype=torch.long, device=self.slot.device
            )
            # Dropped assignments all write the scratch row ``num_rows``, which is cut off.
            table.scatter_(
                0,
                self.buffer_position().reshape(-1),
                torch.arange(G * S * K, device=self.slot.device),
            )
            self._index_maps["assignment"] = table[:num_rows]
        return self._index_maps["assignment"]

    def buffer_token(self) -> torch.Tensor:
        """[E * G * C] int64: for each buffer row, the token (``g * S + s``) it holds.

        Empty rows hold ``G * S``, one past the last token, where dispatch keeps a zero row.
        """
        return torch.div(self.buffer_assignment(), self.num_selected, rounding_mode="floor")

    def _map_tensors(self, fn) -> "RoutingPlan":
        """A copy with ``fn`` applied to every tensor field (derived index maps are not copied:
        the copy recomputes them on demand)."""
        values = {}
        for f in fields(self):
            if f.init:
                v = getattr(self, f.name)
                values[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return replace(self, **values)

    def detach(self) -> "RoutingPlan":
        """A copy whose tensors are cut from the autograd graph (cheap: views)."""
        return self._map_tensors(torch.Tensor.detach)

    def to(self, device) -> "RoutingPlan":
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device))


@dataclass
class SoftRoutingPlan:
    """Soft MoE routing (Puigcerver et al. 2023): every slot mixes all tokens of its group,
    every token mixes all slots. Nothing is dropped.

    Axis letters: G groups, S tokens per group, E experts, P slots per expert. The flattened
    slot index is ``e * P + p`` (the official layout).

    Attributes:
        dispatch_weight: [G, S, E, P] float32. For each slot (g, e, p), a softmax over the S tokens
            of group g; padding tokens get weight 0.
        combine_weight: [G, S, E, P] float32. For each token (g, s), a softmax over all E*P slots
            jointly (not per expert).
        valid: [G, S] bool or None. False for padding tokens appended to fill the last group.
    """

    dispatch_weight: torch.Tensor
    combine_weight: torch.Tensor
    valid: Optional[torch.Tensor] = None

    @property
    def num_groups(self) -> int:
        return self.dispatch_weight.shape[0]

    @property
    def group_size(self) -> int:
        return self.dispatch_weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.dispatch_weight.shape[2]

    @property
    def slots_per_expert(self) -> int:
        return self.dispatch_weight.shape[3]

    def _map_tensors(self, fn) -> "SoftRoutingPlan":
        return SoftRoutingPlan(
            *(
                None if v is None else fn(v)
                for v in (self.dispatch_weight, self.combine_weight, self.valid)
            )
        )

    def detach(self) -> "SoftRoutingPlan":
        """A copy whose tensors are cut from the autograd graph (cheap: views)."""
        return self._map_tensors(torch.Tensor.detach)

    def to(self, device) -> "SoftRoutingPlan":
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device))
