"""Shared experts: a dense MLP every token passes through, added to the routed experts' output.

DeepSeek-MoE isolates ``shared_experts`` always-active experts (of the routed experts' width,
so one MLP of width ``shared_experts x h``); Qwen-MoE scales its shared expert by a per-token
sigmoid gate ``sigmoid(x @ w_gate)``. ``MoeMlp(..., shared_experts=n)`` computes
``routed(x) + shared(x)`` (``shared_gate=True``: ``routed(x) + sigmoid(x @ w_gate) * shared(x)``).
The options are validated by ``MoeLayerConfig`` (``vmoe.moe.checks.check_shared_experts``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["SharedExperts", "shared_width"]


def shared_width(
    shared_experts: int, shared_hidden_features: Optional[int], expert_width: int
) -> int:
    """The hidden width of the shared MLP: ``shared_hidden_features``, else
    ``shared_experts x expert_width`` (DeepSeek-MoE: n experts of the routed width)."""
    return (
        shared_hidden_features
        if shared_hidden_features is not None
        else shared_experts * expert_width
    )


def _pair(value) -> Tuple[float, float]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class SharedExperts(nn.Module):
    """``forward(x: [..., d]) -> [..., d']``: ``fc2(drop(act(fc1(x))))`` then dropout (timm's
    ``Mlp`` order and parameter names: ``fc1`` [h_s, d], ``fc2`` [d', h_s] ``nn.Linear``),
    times ``sigmoid(gate(x))`` ([..., 1], ``gate``: ``nn.Linear(d, 1, bias=False)``, zero init:
    the gate starts at 1/2 for every token) when ``gate=True``.

    Args:
        in_features: d.
        hidden_features: h_s.
        out_features: d' (default d).
        act_layer: the activation, as the routed experts'.
        bias: whether the linear layers have biases.
        drop: dropout after the activation and after fc2 (a float or a pair).
        gate: Qwen-MoE's sigmoid gate on the shared output.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        gate: bool = False,
    ):
        super().__init__()
        out_features = out_features or in_features
        self.in_features, self.hidden_features, self.out_features = (
            in_features,
            hidden_features,
            out_features,
        )
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        drop1, drop2 = _pair(drop)
        self.drop1 = nn.Dropout(drop1)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop2)
        self.gate = nn.Linear(in_features, 1, bias=False) if gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        """``std=None``: ``nn.Linear``'s default init; a number: truncated normal with that std
        and zero biases (timm's ViT init, as ``Experts.reset_parameters``). The gate: zeros."""
        for linear in (self.fc1, self.fc2):
            if std is None:
                linear.reset_parameters()
            else:
                nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)

    @torch.no_grad()
    def load_from_mlp(self, mlp: nn.Module, scale: float = 1.0) -> None:
        """Start as the dense timm ``Mlp`` (``fc1``/``fc2`` ``nn.Linear``) it replaces (sparse
        upcycling): a shared MLP of width n x the dense width h holds n copies of ``fc1`` and
        ``fc2 * scale / n`` (and ``fc2``'s bias times ``scale``), so it computes
        ``scale * mlp(x)`` (the gate, if any, still scales it; ``moeify`` picks ``scale`` so
        that routed + shared output equals the dense MLP's). ValueError naming
        ``shared_hidden_features`` when h_s is not a multiple of h."""
        dense_in, dense_hidden = mlp.fc1.in_features, mlp.fc1.out_features
        if (dense_in, mlp.fc2.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"the dense MLP maps {dense_in} -> {mlp.fc2.out_features} features, the "
                f"shared experts {self.in_features} -> {self.out_features}"
            )
        if self.hidden_features % dense_hidden:
            raise ValueError(
                f"shared_hidden_features={self.hidden_features} must be a multiple of the "
                f"dense MLP's width {dense_hidden} to start from it (upcycling): give "
                f"shared_hidden_features=n*{dense_hidden} or shared_experts=n alone"
            )
        n = self.hidden_features // dense_hidden
        self.fc1.weight.copy_(mlp.fc1.weight.repeat(n, 1))  # [n*h, d]
        self.fc2.weight.copy_(mlp.fc2.weight.repeat(1, n) * (scale / n))  # [d', n*h]
        for mine, theirs, repeat, factor in (
            (self.fc1.bias, mlp.fc1.bias, n, 1.0),
            (self.fc2.bias, mlp.fc2.bias, 1, scale),
        ):
            if mine is not None:
                mine.copy_(
                    theirs.repeat(repeat) * factor if theirs is not None else torch.zeros_like(mine)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d']."""
        out = self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out

    def extra_repr(self) -> str:
        return f"gate={self.gate is not None}"
