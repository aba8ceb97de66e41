"""Dispatch tokens into per-expert buffers and combine expert outputs back, from a RoutingPlan.

Shapes: x [G, S, d] -> buffers [E, G*C, d] -> expert outputs [E, G*C, d'] -> y [G, S, d'].
Buffer row ``g*C + c`` of expert e holds the token that got slot c of e in group g.

One knob, ``dispatcher`` (here and in ``MoeMlp(dispatcher=...)``), picks the implementation:

- ``"torch"``: the portable backend (``torch_backend.py``, ``index_select``, any device);
- ``"triton"``: fused kernels (``triton_backend.py`` + ``triton_kernels.py``); CUDA, or the
  Triton interpreter on CPU tensors when ``TRITON_INTERPRET=1``;
- ``"auto"`` (default): Triton for CUDA tensors when it can run there, else torch; on CUDA the
  fallback warns once. An explicit ``"triton"`` that cannot run raises, naming the reason;
- ``"einsum"``: the official one-hot einsum tensors (``einsum.py``), the test oracle: slow.

A ``SoftRoutingPlan`` (Soft MoE) always goes through ``soft.py`` (dense mixing matmuls; the knob
does not apply: every slot mixes every token of its group).

Both index backends plug into the same autograd Functions (``autograd.py``): forward and backward
are gathers, with no atomics, so results are deterministic on every device, and no tensor of size
tokens x experts x capacity exists on that path.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..plan import RoutingPlan, SoftRoutingPlan
from . import triton_backend
from .autograd import index_combine, index_dispatch
from .einsum import einsum_combine, einsum_dispatch
from .soft import soft_combine, soft_dispatch
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

__all__ = [
    "dispatch",
    "combine",
    "einsum_dispatch",
    "einsum_combine",
    "DISPATCHERS",
    "check_dispatcher",
    "resolve_backend",
    "TorchBackend",
    "TritonBackend",
    "soft_dispatch",
    "soft_combine",
]

DISPATCHERS = ("auto", "torch", "triton", "einsum")
# Names used before the dispatch package (saved configs may hold them).
_RENAMED = {"index": "auto", "index_torch": "torch", "index_triton": "triton"}
_warned = set()


def check_dispatcher(dispatcher: str) -> str:
    """``dispatcher`` as one of ``DISPATCHERS`` (the former 'index', 'index_torch',
    'index_triton' map to 'auto', 'torch', 'triton'); ValueError for anything else."""
    if dispatcher in _RENAMED:
        warnings.warn(
            f"dispatcher={dispatcher!r} is now dispatcher={_RENAMED[dispatcher]!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        return _RENAMED[dispatcher]
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got dispatcher={dispatcher!r}")
    return dispatcher


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(dispatcher: str, *tensors: torch.Tensor):
    """The index backend (``TorchBackend`` or ``TritonBackend``) that ``dispatcher`` ('auto',
    'torch' or 'triton') selects for ``tensors``."""
    if dispatcher not in ("auto", "torch", "triton"):
        raise ValueError(
            f"dispatcher must be 'auto', 'torch' or 'triton' to pick an index backend, "
            f"got dispatcher={dispatcher!r}"
        )
    if dispatcher == "torch":
        return TorchBackend
    if dispatcher == "auto" and tensors[0].device.type != "cuda":
        return TorchBackend  # the portable path is the expected one off CUDA: no warning
    return _choose(dispatcher, triton_backend.unsupported_reason(*tensors))


def _choose(dispatcher: str, reason: Optional[str]):
    """'triton', or 'auto' on CUDA: Triton if it can run (``reason`` None); else an explicit
    request raises and 'auto' warns once and falls back to the portable path."""
    if reason is None:
        return TritonBackend
    if dispatcher == "triton":
        raise RuntimeError(
            f"dispatcher='triton' was requested but the Triton dispatch kernels "
            f"cannot run: {reason}"
        )
    _warn_once(f"vmoe dispatch: falling back to the portable torch path: {reason}")
    return TorchBackend


def _compute_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The buffers' dtype: ``dtype``, else the autocast dtype when autocast is on (the experts'
    GEMMs would cast to it anyway; dispatch does it on the way), else x's."""
    if dtype is not None:
        return dtype
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dispatch(
    x: torch.Tensor,
    plan: RoutingPlan,
    *,
    dispatcher: str = "auto",
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """x: [G, S, d] -> expert buffers [E, G*C, d]. Empty buffer rows are zero.

    Args:
        dispatcher: 'auto' | 'torch' | 'triton' | 'einsum' (see the module docstring).
        dtype: buffer dtype (default: the autocast dtype if autocast is on, else x's).
    """
    if isinstance(plan, SoftRoutingPlan):
        return soft_dispatch(x, plan, dtype)
    if dispatcher == "einsum":
        out = einsum_dispatch(x, plan)
        return out if dtype is None else out.to(dtype)
    G, S, d = x.shape
    backend = resolve_backend(dispatcher, x)
    row_token = plan.buffer_token()  # [E*G*C]
    token_rows = plan.buffer_position().reshape(G * S, -1)  # [G*S, K]
    rows = index_dispatch(
        x.reshape(G * S, d), row_token, token_rows, _compute_dtype(x, dtype), backend
    )
    return rows.view(plan.num_experts, G * plan.capacity, d)


def combine(
    expert_out: torch.Tensor, plan: RoutingPlan, *, dispatcher: str = "auto"
) -> torch.Tensor:
    """expert_out: [E, G*C, d] -> [G, S, d], each token the weighted sum of its K outputs.

    A dropped assignment reads a zero row with weight 0, so a token whose every choice was
    dropped gets exactly 0 (only the residual passes through the block).
    """
    if isinstance(plan, SoftRoutingPlan):
        return soft_combine(expert_out, plan)
    if dispatcher == "einsum":
        return einsum_combine(expert_out, plan)
    E, GC, d = expert_out.shape
    G, S, K = plan.expert_index.shape
    weight = plan.combine_weight.reshape(G * S, K)
    backend = resolve_backend(dispatcher, expert_out, weight)
    out = index_combine(
        expert_out.reshape(E * GC, d),
        weight,
        plan.buffer_position().reshape(G * S, K),
        plan.buffer_assignment(),
        backend,
    )
    return out.view(G, S, d)
