"""Routers: tokens of one routing group -> RoutingPlan (+ auxiliary losses).

Axis letters: G groups, S tokens per group, E experts, K choices per token, C capacity, d width.
Everything is static-shape (no ``nonzero``, ``.item()`` or boolean masking), so the routers run
under ``torch.compile(fullgraph=True)`` and without host syncs on CUDA.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capacity import compute_capacity
from .losses import gshard_loss, importance_loss, load_loss, router_z_loss
from .plan import RoutingPlan

__all__ = ["TopKRouter", "ExpertChoiceRouter", "assign_buffer_slots"]

Losses = Dict[str, torch.Tensor]


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _check_capacity_factor(value) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"capacity_factor must be a finite number > 0, got capacity_factor={value!r}")


def _descending_order(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices sorting ``values`` high to low along ``dim``; ties keep the lower index first
    (like ``jax.lax.top_k`` and the official stable argsort). NaN sorts as the largest value."""
    return torch.sort(values, dim=dim, descending=True, stable=True).indices


def assign_buffer_slots(
    expert_index: torch.Tensor,
    num_experts: int,
    priority_order: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each assignment's position in its expert's buffer, before the capacity cut.

    All first choices take places before any second choice; within a round tokens go in group
    order, or in ``priority_order`` (Batch Priority Routing).

    Args:
        expert_index: [G, S, K] int64, the chosen experts, best first.
        num_experts: E.
        priority_order: [G, S] int64 permutation of the tokens, highest priority first, or None
            for group order.
        valid: [G, S] bool; padding tokens (False) take no place and get position -1.

    Returns:
        [G, S, K] int64: number of earlier assignments (in priority order) to the same expert.
    """
    G, S, K = expert_index.shape
    if priority_order is not None:
        expert_index = expert_index.gather(1, priority_order.unsqueeze(-1).expand(G, S, K))
        if valid is not None:
            valid = valid.gather(1, priority_order)
    # [G, K*S]: round-major order, so first choices come before second choices.
    rounds = expert_index.transpose(1, 2).reshape(G, K * S)
    experts = torch.arange(num_experts, device=expert_index.device)
    one_hot = (rounds.unsqueeze(-1) == experts).to(torch.int32)  # [G, K*S, E]
    if valid is not None:
        one_hot = one_hot * valid.repeat(1, K).unsqueeze(-1).to(torch.int32)
    position = one_hot.cumsum(1).gather(2, rounds.unsqueeze(-1)).squeeze(-1).long() - 1
    if valid is not None:
        position = torch.where(valid.repeat(1, K), position, torch.full_like(position, -1))
    position = position.view(G, K, S).transpose(1, 2)  # [G, S, K], in priority order
    if priority_order is not None:
        position = torch.empty_like(position).scatter_(
            1, priority_order.unsqueeze(-1).expand(G, S, K), position)
    return position


class _GatingRouter(nn.Module):
    """Shared part of the routers: float32 gating logits without bias, and training noise."""

    def __init__(self, dim: int, num_experts: int, noise_std: float = 1.0,
                 noisy_at_eval: bool = False):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("num_experts", num_experts)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got noise_std={noise_std}")
        self.dim = dim
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.noisy_at_eval = noisy_at_eval
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Normal init with ``std`` (default: LeCun, 1/sqrt(d), as Flax's Dense)."""
        nn.init.normal_(self.weight, std=self.dim**-0.5 if std is None else std)

    @property
    def adds_noise(self) -> bool:
        return self.noise_std > 0 and (self.training or self.noisy_at_eval)

    def gating_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [G, S, d] -> (clean logits, logits used for routing), both [G, S, E] float32.

        Computed in float32 even under autocast. The routing logits carry Gaussian noise of std
        ``noise_std / E`` in training.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.adds_noise:
            noise = torch.randn_like(logits) * (self.noise_std / self.num_experts)
            return logits, logits + noise
        return logits, logits

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, noise_std={self.noise_std}"


class TopKRouter(_GatingRouter):
    """Top-K experts per token, with capacity and optional Batch Priority Routing.

    Args:
        dim: token width d.
        num_experts: E.
        num_selected: K, experts per token (1 <= K <= E).
        capacity_factor: buffer size per expert = ceil(S*K*cf/E) rounded up to
            ``capacity_multiple_of``. Ignored when ``capacity`` is given.
        capacity: explicit buffer size C per expert and group.
        capacity_multiple_of: round C up to a multiple of this (None/0: no rounding).
        capacity_rounding: 'ceil' (official default) or 'round'.
        batch_priority: BPR. Tokens with the largest top-1 gate take places first; otherwise
            earlier tokens in the group do.
        noise_std: training noise std before division by E (paper: 1.0, i.e. std 1/E).
        noisy_at_eval: also add noise in eval mode.
        renormalize: combine weights are the gates renormalized over the K choices (sum 1)
            instead of the raw softmax gates (paper default: raw).
        importance_weight, load_weight, gshard_weight, zloss_weight: auxiliary loss weights.

    All routing options are plain attributes and may be changed after construction, e.g. a
    larger ``capacity_factor`` for evaluation or BPR with a capacity below 1.0 at inference.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_selected: int = 1,
        capacity_factor: Optional[float] = 1.05,
        capacity: Optional[int] = None,
        capacity_multiple_of: Optional[int] = 4,
        capacity_rounding: str = "ceil",
        batch_priority: bool = False,
        noise_std: float = 1.0,
        noisy_at_eval: bool = False,
        renormalize: bool = False,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        gshard_weight: float = 0.0,
        zloss_weight: float = 0.0,
    ):
        super().__init__(dim, num_experts, noise_std, noisy_at_eval)
        _check_positive_int("num_selected", num_selected)
        if num_selected > num_experts:
            raise ValueError(f"num_selected (K) must be <= num_experts={num_experts}, "
                             f"got num_selected={num_selected}")
        if capacity is None and capacity_factor is None:
            raise ValueError("give capacity_factor or capacity, got neither")
        if capacity is not None:
            _check_positive_int("capacity", capacity)
        _check_capacity_factor(capacity_factor)
        if capacity_rounding not in ("ceil", "round"):
            raise ValueError(f"capacity_rounding must be 'ceil' or 'round', got {capacity_rounding!r}")
        self.num_selected = num_selected
        self.capacity_factor = capacity_factor
        self.capacity = capacity
        self.capacity_multiple_of = capacity_multiple_of
        self.capacity_rounding = capacity_rounding
        self.batch_priority = batch_priority
        self.renormalize = renormalize
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.gshard_weight = gshard_weight
        self.zloss_weight = zloss_weight

    def capacity_for(self, group_size: int) -> int:
        """Buffer size C per expert for groups of ``group_size`` tokens."""
        if self.capacity is not None:
            return self.capacity
        _check_capacity_factor(self.capacity_factor)
        return compute_capacity(group_size * self.num_selected, self.num_experts,
                                self.capacity_factor, self.capacity_rounding,
                                self.capacity_multiple_of)

    def route(self, gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> RoutingPlan:
        """gates: [G, S, E] softmax -> RoutingPlan. Pure function of the gates (no noise)."""
        G, S, E = gates.shape
        K = self.num_selected
        capacity = self.capacity_for(S)
        # Top-K experts per token, best first (ties -> lower expert index, as lax.top_k).
        expert_index = _descending_order(gates, dim=-1)[..., :K]
        top_gates = gates.gather(-1, expert_index)  # [G, S, K]
        priority_order = _descending_order(top_gates[..., 0], dim=1) if self.batch_priority else None
        position = assign_buffer_slots(expert_index, E, priority_order, valid)
        kept = (position >= 0) & (position < capacity)
        slot = torch.where(kept, position, torch.full_like(position, -1))
        weight = top_gates / top_gates.sum(-1, keepdim=True) if self.renormalize else top_gates
        combine_weight = torch.where(kept, weight, torch.zeros_like(weight))
        return RoutingPlan(expert_index=expert_index, slot=slot, combine_weight=combine_weight,
                           gates=gates, capacity=capacity, valid=valid)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> Tuple[RoutingPlan, Losses]:
        """x: [G, S, d] -> (RoutingPlan, losses). ``losses`` maps each auxiliary loss to its
        per-group values [G]; 'load' is present only when noise was added (training)."""
        logits, routing_logits = self.gating_logits(x)
        gates = logits.softmax(-1)
        routing_gates = routing_logits.softmax(-1) if self.adds_noise else gates
        losses: Losses = {
            "importance": importance_loss(gates, valid),
            "gshard": gshard_loss(routing_gates, valid),
        }
        if self.adds_noise:
            losses["load"] = load_loss(logits, routing_logits, self.noise_std / self.num_experts,
                                       self.num_selected, valid)
        if self.zloss_weight > 0:
            losses["z"] = router_z_loss(logits, valid)
        return self.route(routing_gates, valid), losses

    def loss_weights(self) -> Dict[str, float]:
        return {"importance": self.importance_weight, "load": self.load_weight,
                "gshard": self.gshard_weight, "z": self.zloss_weight}

    def extra_repr(self) -> str:
        cap = f"capacity={self.capacity}" if self.capacity is not None else f"capacity_factor={self.capacity_factor}"
        return (f"{super().extra_repr()}, num_selected={self.num_selected}, {cap}, "
                f"batch_priority={self.batch_priority}")


class ExpertChoiceRouter(_GatingRouter):
    """Each expert takes its top-C tokens of the group ("top items per expert").

    The plan it returns uses K = E: ``expert_index[..., e] = e`` and ``slot[g, s, e]`` is the
    token's position in expert e's buffer (-1 if e did not pick it), so dispatch and combine are
    the same as for top-K routing. C = ceil(S*cf/E) (no K factor), rounded as for top-K.
    The official router has no auxiliary loss (perfect balance by construction); z-loss is
    available.
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: Optional[float] = 1.0,
                 capacity: Optional[int] = None, capacity_multiple_of: Optional[int] = 4,
                 capacity_rounding: str = "ceil", noise_std: float = 1.0,
                 noisy_at_eval: bool = False, zloss_weight: float = 0.0):
        super().__init__(dim, num_experts, noise_std, noisy_at_eval)
        if capacity is None and capacity_factor is None:
            raise ValueError("give capacity_factor or capacity, got neither")
        if capacity is not None:
            _check_positive_int("capacity", capacity)
        _check_capacity_factor(capacity_factor)
        self.capacity_factor = capacity_factor
        self.capacity = capacity
        self.capacity_multiple_of = capacity_multiple_of
        self.capacity_rounding = capacity_rounding
        self.batch_priority = False  # not meaningful here; kept so layers can be set uniformly
        self.zloss_weight = zloss_weight

    def capacity_for(self, group_size: int) -> int:
        if self.capacity is not None:
            capacity = self.capacity
        else:
            _check_capacity_factor(self.capacity_factor)
            capacity = compute_capacity(group_size, self.num_experts, self.capacity_factor,
                                        self.capacity_rounding, self.capacity_multiple_of)
        if capacity > group_size:
            raise ValueError(f"expert-choice capacity {capacity} exceeds the group size "
                             f"{group_size}: each expert can pick at most every token once")
        return capacity

    def route(self, gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> RoutingPlan:
        G, S, E = gates.shape
        capacity = self.capacity_for(S)
        scores = gates if valid is None else torch.where(valid.unsqueeze(-1), gates, torch.full_like(gates, -1.0))
        # [G, E, C]: each expert's C best tokens, ties -> lower token index.
        token_index = _descending_order(scores.transpose(1, 2), dim=-1)[..., :capacity]
        position = torch.arange(capacity, device=gates.device).expand(G, E, capacity)
        slot = torch.full((G, S, E), -1, dtype=torch.long, device=gates.device)
        slot.scatter_(1, token_index.transpose(1, 2), position.transpose(1, 2).contiguous())
        if valid is not None:
            slot = torch.where(valid.unsqueeze(-1), slot, torch.full_like(slot, -1))
        expert_index = torch.arange(E, device=gates.device).expand(G, S, E).contiguous()
        combine_weight = torch.where(slot >= 0, gates, torch.zeros_like(gates))
        return RoutingPlan(expert_index=expert_index, slot=slot, combine_weight=combine_weight,
                           gates=gates, capacity=capacity, valid=valid)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> Tuple[RoutingPlan, Losses]:
        logits, routing_logits = self.gating_logits(x)
        losses: Losses = {}
        if self.zloss_weight > 0:
            losses["z"] = router_z_loss(logits, valid)
        return self.route(routing_logits.softmax(-1), valid), losses

    def loss_weights(self) -> Dict[str, float]:
        return {"z": self.zloss_weight}
