"""Batched expert MLPs: one weight slab per expert, applied to fixed-capacity buffers."""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Experts", "EXPERT_GEMMS"]

# How the per-expert GEMMs run: 'bmm' (batched GEMM, every dtype and device) or 'grouped_mm'
# (``torch.nn.functional.grouped_mm``: CUTLASS grouped GEMM on Hopper/Blackwell in bfloat16).
EXPERT_GEMMS = ("bmm", "grouped_mm")
# grouped_mm reads rows with 16-byte aligned strides: widths must be multiples of 8 bf16 values.
_GROUPED_MM_ALIGN = 8


def _pair(value) -> Tuple[float, float]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Experts(nn.Module):
    """E MLPs ``fc1 -> act -> drop -> fc2 -> drop`` (timm's ``Mlp`` order) run as batched GEMMs.

    Weights: ``fc1_weight`` [E, d, h], ``fc1_bias`` [E, h], ``fc2_weight`` [E, h, d'],
    ``fc2_bias`` [E, d']. Note the (in, out) layout per expert: ``x @ W``, the transpose of
    ``nn.Linear.weight`` (and the layout of the official Flax kernels).

    Args:
        num_experts: E.
        in_features: d.
        hidden_features: h (default d).
        out_features: d' (default d).
        act_layer: activation module class (timm's default ``nn.GELU``; the official V-MoE uses
            the tanh approximation: ``functools.partial(nn.GELU, approximate='tanh')``).
        bias: use biases.
        drop: dropout after the activation and after fc2 (a float or a pair).
        same_init: all experts start from the same values (the paper's default); False draws
            each expert independently.
        gemm: 'bmm' (default) or 'grouped_mm' (``torch.nn.functional.grouped_mm``: needs
            bfloat16 autocast and widths that are multiples of 8).

    Raises:
        ValueError: An unknown ``gemm``, or widths 'grouped_mm' cannot run with.
    """

    #: Whether ``forward_sorted`` (the dropless path) can run: all E experts are local.
    runs_sorted_rows: bool = True

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        same_init: bool = True,
        gemm: str = "bmm",
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.num_experts = num_experts
        self.in_features, self.hidden_features, self.out_features = (
            in_features,
            hidden_features,
            out_features,
        )
        self.same_init = same_init
        if gemm not in EXPERT_GEMMS:
            raise ValueError(f"gemm must be one of {EXPERT_GEMMS}, got gemm={gemm!r}")
        if gemm == "grouped_mm":
            widths = dict(
                in_features=in_features, hidden_features=hidden_features, out_features=out_features
            )
            bad = {k: v for k, v in widths.items() if v % _GROUPED_MM_ALIGN}
            if bad:
                raise ValueError(
                    f"gemm='grouped_mm' needs widths that are multiples of "
                    f"{_GROUPED_MM_ALIGN} (16-byte rows in bfloat16); got {bad}. "
                    "Use gemm='bmm' for these widths."
                )
        self.gemm = gemm
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, in_features, hidden_features))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_features, out_features))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_features)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.act = act_layer()
        drop1, drop2 = _pair(drop)
        self.drop1 = nn.Dropout(drop1)
        self.drop2 = nn.Dropout(drop2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Re-initialize. ``std=None``: ``nn.Linear``'s default (uniform +-1/sqrt(fan_in)), as an
        un-initialized timm ``Mlp``; a number: truncated normal with that std and zero biases,
        as timm's ViT init (std 0.02). With ``same_init`` every expert gets expert 0's values."""
        count = 1 if self.same_init else self.num_experts
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            fan_in = weight.shape[1]
            if std is None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(weight[:count], -bound, bound)
                if bias is not None:
                    nn.init.uniform_(bias[:count], -bound, bound)
            else:
                nn.init.trunc_normal_(weight[:count], std=std, a=-2 * std, b=2 * std)
                if bias is not None:
                    nn.init.zeros_(bias[:count])
            if self.same_init:
                weight.copy_(weight[:1].expand_as(weight))
                if bias is not None:
                    bias.copy_(bias[:1].expand_as(bias))

    @torch.no_grad()
    def load_from_mlp(self, mlp: nn.Module, scale: float = 1.0) -> None:
        """Copy a dense timm ``Mlp`` (``fc1``/``fc2`` ``nn.Linear``) into every expert
        (sparse upcycling), ``fc2``'s weight and bias times ``scale``: every expert computes
        ``scale * mlp(x)`` (``moeify`` gives 1/2 next to shared experts)."""
        for name in ("fc1", "fc2"):
            factor = scale if name == "fc2" else 1.0
            linear = getattr(mlp, name)
            weight = getattr(self, f"{name}_weight")
            if tuple(linear.weight.t().shape) != tuple(weight.shape[1:]):
                raise ValueError(
                    f"{name}: dense weight {tuple(linear.weight.shape)} does not fit "
                    f"experts {tuple(weight.shape)} (expected [out, in] = "
                    f"{tuple(weight.shape[1:][::-1])})"
                )
            weight.copy_(linear.weight.t().unsqueeze(0).expand_as(weight) * factor)
            bias = getattr(self, f"{name}_bias")
            if bias is not None:
                if linear.bias is None:
                    bias.zero_()
                else:
                    bias.copy_(linear.bias.unsqueeze(0).expand_as(bias) * factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [E, T, d] -> [E, T, d'] (T = G*C buffer rows per expert)."""
        linear = self._linear
        if self.gemm == "grouped_mm" and x.shape[1] > 0:  # no rows (empty batch): bmm handles it
            _check_grouped_mm(x)
            linear = self._grouped_linear
        h = linear(x, self.fc1_weight, self.fc1_bias)
        h = self.drop1(self.act(h))
        return self.drop2(linear(h, self.fc2_weight, self.fc2_bias))

    def forward_sorted(self, x: torch.Tensor, ends: torch.Tensor, bounds: List) -> torch.Tensor:
        """x: [R, d] rows grouped by expert -> [R, d'] (the dropless path, ``vmoe.moe.dropless``).

        Expert e runs on rows ``bounds[e] .. bounds[e+1]`` (``bounds``: E+1 ints or unbacked
        sizes; ``ends``: [E] the same ends as a tensor). One matmul pair per expert
        (``addmm``: on CPU faster than ``grouped_mm``'s fallback, measured), or with
        ``gemm='grouped_mm'`` one grouped GEMM over all rows (offsets ``ends``).
        """
        if self.gemm == "grouped_mm" and x.shape[0] > 0:
            _check_grouped_mm(x.unsqueeze(0))
            offsets = ends.to(torch.int32)
            expert_of_row = torch.bucketize(
                torch.arange(x.shape[0], device=x.device), ends, right=True
            )
            h = self._grouped_rows(x, self.fc1_weight, self.fc1_bias, offsets, expert_of_row)
            h = self.drop1(self.act(h))
            return self.drop2(
                self._grouped_rows(h, self.fc2_weight, self.fc2_bias, offsets, expert_of_row)
            )
        outs = []
        for e in range(self.num_experts):
            rows = x.narrow(0, bounds[e], bounds[e + 1] - bounds[e])  # [R_e, d]
            h = self._expert_linear(rows, self.fc1_weight[e], self.fc1_bias, e)
            h = self.drop1(self.act(h))
            outs.append(self.drop2(self._expert_linear(h, self.fc2_weight[e], self.fc2_bias, e)))
        return torch.cat(outs)

    @staticmethod
    def _expert_linear(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], e: int
    ) -> torch.Tensor:
        """x [R_e, k] @ weight [k, n] (+ bias[e])."""
        if bias is None:
            return torch.mm(x, weight)
        return torch.addmm(bias[e], x, weight)

    @staticmethod
    def _grouped_rows(x, weight, bias, offsets, expert_of_row) -> torch.Tensor:
        """x [R, k] bf16 rows grouped by expert (offsets: [E] int32 ends) @ weight [E, k, n]."""
        out = F.grouped_mm(x, weight.to(x.dtype), offs=offsets)
        return out if bias is None else out + bias.to(out.dtype).index_select(0, expert_of_row)

    @staticmethod
    def _linear(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    def _grouped_linear(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """x [E, T, k] bf16 @ weight [E, k, n] (cast to bf16, as autocast would for bmm)."""
        out = F.grouped_mm(x, weight.to(x.dtype))
        return out if bias is None else out + bias.to(out.dtype).unsqueeze(1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"hidden_features={self.hidden_features}, out_features={self.out_features}"
            + (f", gemm={self.gemm!r}" if self.gemm != "bmm" else "")
        )


def _check_grouped_mm(x: torch.Tensor) -> None:
    """Raise a RuntimeError naming why ``grouped_mm`` cannot run on buffers ``x``."""
    if x.dtype != torch.bfloat16:
        raise RuntimeError(
            f"Experts(gemm='grouped_mm') needs bfloat16 expert buffers, got {x.dtype}: run the "
            "model under torch.autocast(device_type, dtype=torch.bfloat16) (or "
            "Trainer(precision='bf16-mixed')), or use gemm='bmm' / expert_gemm='bmm'"
        )
    if (
        x.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and torch.cuda.get_device_capability(x.device) < (8, 0)
    ):
        raise RuntimeError(
            f"Experts(gemm='grouped_mm') needs a CUDA device of compute capability >= 8.0, got "
            f"{torch.cuda.get_device_name(x.device)} "
            f"{torch.cuda.get_device_capability(x.device)}; use gemm='bmm'"
        )
