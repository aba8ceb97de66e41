"""Soft MoE router (Puigcerver et al. 2023): tokens of a group -> SoftRoutingPlan.

Axis letters: G groups, S tokens per group, E experts, P slots per expert, d width.

Semantics of the official ``vmoe.projects.soft_moe.router.SoftRouter`` (JAX), which the tests
check against recorded outputs:

* tokens and the slot embeddings ``mu`` [d, E, P] are normalized with the eps *inside* the
  rsqrt: ``x * rsqrt(sum_d x^2 + 1e-6)`` (a zero token stays 0, a tiny one does not reach norm 1);
* ``logits[g, s, e, p] = scale * <x_unit[g, s], mu_unit[:, e, p]>`` with a learned scalar
  ``scale`` (initialized to 1);
* training noise (off by default): ``logits += noise_std * N(0, 1)`` (not divided by E);
* dispatch weights: softmax over the S tokens of the group, for each slot (e, p);
  combine weights: softmax over all E*P slots jointly, for each token;
* P is ``num_slots``, or ``round(S * capacity_factor / E)`` with Python's round (half to even);
* no auxiliary loss, nothing is dropped.

Everything is static-shape, so the router runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .capacity import compute_capacity
from .checks import check_capacity_factor, check_positive_int
from .config import RoutingSettings, SoftRouterConfig
from .plan import SoftRoutingPlan

__all__ = ["SoftRouter", "soft_slots_per_expert", "unit_normalize", "normalized_logits"]

#: eps added to the squared norm inside the rsqrt (the official ``normalize``).
NORM_EPS = 1e-6


def unit_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x * rsqrt(sum(x^2, dim) + 1e-6)``: the official Soft MoE normalization (eps inside the
    rsqrt; unlike ``F.normalize``, a token of norm 1e-3 ends at norm 0.707, not 1)."""
    return x * torch.rsqrt(x.square().sum(dim, keepdim=True) + NORM_EPS)


def soft_slots_per_expert(group_size: int, num_experts: int, capacity_factor: float) -> int:
    """P = ``round(group_size * capacity_factor / num_experts)`` as the official code computes it
    (Python floats, half to even: 2.5 -> 2, 3.5 -> 4). ValueError naming the numbers when P < 1."""
    check_positive_int("group_size", group_size)
    check_capacity_factor(capacity_factor, allow_none=False)
    try:
        return compute_capacity(
            group_size, num_experts, capacity_factor, ceil_or_round="round", multiple_of=None
        )
    except ValueError as error:
        raise ValueError(
            f"Soft MoE slots per expert: {error} (give num_slots >= 1 instead)"
        ) from None


class _NormalizedLogits(torch.autograd.Function):
    """``scale * <x * r, mu_unit>`` with ``r = rsqrt(|x|^2 + 1e-6)`` per token, computed as
    ``scale * r * (x @ mu_unit)`` (the same product to float rounding), so the [T, d] tokens are
    read once for the norm and never copied normalized. Backward, also one pass over x besides
    the two matmuls: ``dx = (g * scale * r) @ mu_unit^T - x * r^3 * scale * sum_j g_j raw_j``
    (the second term fused into the matmul as its ``addmm`` input).

    x: [T, d] float32, mu_unit: [d, E*P], scale: () -> logits [T, E*P].
    """

    @staticmethod
    def forward(ctx, x, mu_unit, scale):
        r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + NORM_EPS)
        raw = x @ mu_unit  # [T, E*P]
        ctx.save_for_backward(x, mu_unit, scale, r, raw)
        return raw * (r * scale)

    @staticmethod
    def backward(ctx, grad):
        x, mu_unit, scale, r, raw = ctx.saved_tensors
        grad_raw = grad * (r * scale)  # [T, E*P]
        dot = (grad * raw).sum(-1, keepdim=True)  # [T, 1]: sum_j g_j raw_j
        grad_x = grad_mu = grad_scale = None
        if ctx.needs_input_grad[0]:
            coef = -(r * r * r) * scale * dot  # through r = rsqrt(|x|^2 + eps)
            grad_x = torch.addmm(x * coef, grad_raw, mu_unit.t())
        if ctx.needs_input_grad[1]:
            grad_mu = x.t() @ grad_raw
        if ctx.needs_input_grad[2]:
            grad_scale = (dot * r).sum()
        return grad_x, grad_mu, grad_scale


def normalized_logits(x: torch.Tensor, mu_unit: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [T, d], mu_unit: [d, E*P] (unit columns), scale: () -> ``scale * <unit_normalize(x),
    mu_unit>`` [T, E*P], with a fused backward (see ``_NormalizedLogits``)."""
    return _NormalizedLogits.apply(x, mu_unit, scale)


class SoftRouter(nn.Module):
    """Soft MoE router: ``forward(x [G, S, d], valid [G, S] or None) -> (SoftRoutingPlan, {})``.

    Args:
        dim: token width d.
        num_experts: E.
        num_slots: P, slots per expert (the paper: 1). If None, P comes from
            ``capacity_factor`` and ``group_size`` (see ``soft_slots_per_expert``).
        capacity_factor: used only when ``num_slots`` is None (official default 1.0).
        group_size: S, tokens per group; needed only to derive P from ``capacity_factor``.
        noise_std: std of the Gaussian noise added to the logits in training (official default
            0.0; not divided by E).

    Parameters: ``mu`` [d, E, P] (the official layout; normalized over d at every forward, so
    its init scale does not matter) and the scalar ``scale`` (init 1).

    The options are held in ``self.config`` (a ``SoftRouterConfig`` with ``num_slots`` = P, derived
    or given; pass ``config=`` to give them so). The routing settings are fixed: P is the shape
    of ``mu``. ``capacity_factor`` (always None), ``capacity`` (= P: the slot buffers are
    [E, G*P, d], so P is the per-group capacity C) and ``batch_priority`` (always False) read
    as ``SoftRouterConfig.routing_settings`` gives them; assigning another value raises
    ValueError (``SoftRouterConfig.with_routing``).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_slots: Optional[int] = None,
        capacity_factor: Optional[float] = 1.0,
        group_size: Optional[int] = None,
        noise_std: float = 0.0,
        *,
        config: Optional[SoftRouterConfig] = None,
    ):
        super().__init__()
        if config is None:
            config = SoftRouterConfig(
                num_slots=num_slots, capacity_factor=capacity_factor, noise_std=noise_std
            )
        elif not isinstance(config, SoftRouterConfig):
            raise TypeError(f"config must be a SoftRouterConfig, got {type(config).__name__}")
        check_positive_int("dim", dim)
        check_positive_int("num_experts", num_experts)
        if config.num_slots is None:  # (a given num_slots ignores capacity_factor, as officially)
            if group_size is None:
                raise ValueError(
                    "Soft MoE router: num_slots=None derives the slots per expert "
                    f"from capacity_factor={config.capacity_factor} and the group "
                    "size in tokens; give group_size (tokens) or num_slots"
                )
            config = config.replace(
                num_slots=soft_slots_per_expert(group_size, num_experts, config.capacity_factor)
            )
        self.dim = dim
        self.num_experts = num_experts
        self.config = config
        self.mu = nn.Parameter(torch.empty(dim, num_experts, config.num_slots))
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    # --- settings (read from the config; the routing ones are fixed) ---------------------------
    @property
    def supports_batch_priority(self) -> bool:
        """Soft routing has no token priority (nothing is dropped)."""
        return self.config.supports_batch_priority

    @property
    def num_slots(self) -> int:
        """P, slots per expert."""
        return self.config.num_slots

    @property
    def noise_std(self) -> float:
        return self.config.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self.config = self.config.replace(noise_std=value)

    def apply_routing(self, settings: RoutingSettings) -> None:
        """Accepts only the settings it has, ``(None, P, False)``; ValueError otherwise."""
        self.config = self.config.with_routing(settings)

    def _set_routing(self, **change) -> None:
        self.apply_routing(dataclasses.replace(self.config.routing_settings(), **change))

    @property
    def capacity_factor(self) -> None:
        """None: the slots are fixed (``capacity`` is P)."""
        return None

    @capacity_factor.setter
    def capacity_factor(self, value) -> None:
        self._set_routing(capacity_factor=value)

    @property
    def capacity(self) -> int:
        """P: each expert's slots per group (its buffer rows per group)."""
        return self.config.num_slots

    @capacity.setter
    def capacity(self, value) -> None:
        self._set_routing(capacity=value)

    @property
    def batch_priority(self) -> bool:
        return False

    @batch_priority.setter
    def batch_priority(self, value) -> None:
        self._set_routing(batch_priority=value)

    # --- routing -------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        """``mu``: normal with ``std`` (default LeCun, 1/sqrt(fan_in) with the official fan_in
        E*d; irrelevant after normalization); ``scale``: 1."""
        fan_in = self.dim * self.num_experts
        nn.init.normal_(self.mu, std=1.0 / math.sqrt(fan_in) if std is None else std)
        self.scale.fill_(1.0)

    @property
    def adds_noise(self) -> bool:
        return self.config.noise_std > 0 and self.training

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [G, S, d] -> clean logits [G, S, E, P], float32 even under autocast."""
        G, S, d = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu_unit = unit_normalize(self.mu.float(), dim=0).reshape(d, -1)  # [d, E*P]
            logits = normalized_logits(
                x.reshape(G * S, d).float(), mu_unit, self.scale.float()
            )  # [G*S, E*P]
        return logits.view(G, S, self.num_experts, self.config.num_slots)

    @staticmethod
    def route(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> SoftRoutingPlan:
        """logits: [G, S, E, P] -> SoftRoutingPlan. Pure function of the logits (no noise).

        Padding tokens (``valid`` False) get dispatch weight 0; a group needs one valid token.
        """
        G, S, E, P = logits.shape
        masked = logits
        if valid is not None:
            masked = logits.masked_fill(~valid.view(G, S, 1, 1), -math.inf)
        dispatch_weight = masked.softmax(dim=1)  # over S
        combine_weight = logits.reshape(G, S, E * P).softmax(-1).view(G, S, E, P)  # over (E, P)
        return SoftRoutingPlan(dispatch_weight, combine_weight, valid)

    def forward(
        self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> Tuple[SoftRoutingPlan, Dict[str, torch.Tensor]]:
        """x: [G, S, d] -> (SoftRoutingPlan, {}): no auxiliary loss."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"SoftRouter input width d={x.shape[-1]} differs from dim={self.dim}")
        logits = self.logits(x)
        if self.adds_noise:
            logits = logits + self.config.noise_std * torch.randn_like(logits)
        return self.route(logits, valid), {}

    def loss_weights(self) -> Dict[str, float]:
        return {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, num_slots={self.num_slots}, "
            f"noise_std={self.noise_std}"
        )
