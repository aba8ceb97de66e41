"""Dispatch tokens into per-expert buffers and combine expert outputs back, from a RoutingPlan.

Shapes: x [G, S, d] -> buffers [E, G*C, d] -> expert outputs [E, G*C, d'] -> y [G, S, d'].
Buffer row ``g*C + c`` of expert e holds the token that got slot c of e in group g.

The default path is index based and static-shape: dispatch gathers each buffer row's token
(empty rows read zero), combine *gathers* each token's K outputs and mixes them with its
weights, and both backward passes are gathers as well (``autograd_dispatch``): no atomics, so
results are deterministic on every device, and no tensor of size tokens x experts x capacity
exists on this path. ``einsum_dispatch``/``einsum_combine`` build the official one-hot tensors
and are kept as a test oracle.

Backends: 'torch' (portable ``index_select``), 'triton' (fused kernels, ``fused_dispatch``), or
'auto' (default): Triton for CUDA tensors when it can run there, else torch. Choose with the
``backend`` argument, the ``VMOE_DISPATCH_BACKEND`` environment variable, or
``MoeMlp(dispatcher='index_torch' | 'index_triton')``. 'auto' on CUDA falls back to torch with a
one-time warning when Triton cannot run; an explicit 'triton' there raises.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from . import fused_dispatch
from .autograd_dispatch import TorchBackend, index_combine, index_dispatch
from .plan import RoutingPlan

__all__ = ["dispatch", "combine", "einsum_dispatch", "einsum_combine", "DISPATCHERS",
           "BACKENDS", "BACKEND_ENV", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "VMOE_DISPATCH_BACKEND"
_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: Optional[str], *tensors: torch.Tensor):
    """The backend object (``TorchBackend`` or ``fused_dispatch.TritonBackend``) for ``tensors``.

    ``backend`` None reads ``$VMOE_DISPATCH_BACKEND`` (default 'auto')."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "auto") or "auto", BACKEND_ENV
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {source}={backend!r}")
    if backend == "torch":
        return TorchBackend
    if backend == "auto" and tensors[0].device.type != "cuda":
        return TorchBackend  # the portable path is the expected one off CUDA: no warning
    return _choose(backend, source, fused_dispatch.unsupported_reason(*tensors))


def _choose(backend: str, source: str, reason: Optional[str]):
    """'triton' or 'auto' on CUDA: Triton if it can run (``reason`` None); else an explicit
    request raises and 'auto' warns once and falls back to the portable path."""
    if reason is None:
        return fused_dispatch.TritonBackend
    if backend == "triton":
        raise RuntimeError(f"{source}='triton' was requested but the Triton dispatch kernels "
                           f"cannot run: {reason}")
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


def dispatch(x: torch.Tensor, plan: RoutingPlan, *, backend: Optional[str] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x: [G, S, d] -> expert buffers [E, G*C, d]. Empty buffer rows are zero.

    Args:
        backend: 'auto' | 'torch' | 'triton' (None: ``$VMOE_DISPATCH_BACKEND`` or 'auto').
        dtype: buffer dtype (default: the autocast dtype if autocast is on, else x's).
    """
    G, S, d = x.shape
    impl = resolve_backend(backend, x)
    row_token = plan.buffer_token()                                    # [E*G*C]
    token_rows = plan.buffer_position().reshape(G * S, -1)             # [G*S, K]
    rows = index_dispatch(x.reshape(G * S, d), row_token, token_rows, _compute_dtype(x, dtype), impl)
    return rows.view(plan.num_experts, G * plan.capacity, d)


def combine(expert_out: torch.Tensor, plan: RoutingPlan, *, backend: Optional[str] = None) -> torch.Tensor:
    """expert_out: [E, G*C, d] -> [G, S, d], each token the weighted sum of its K outputs.

    A dropped assignment reads a zero row with weight 0, so a token whose every choice was
    dropped gets exactly 0 (only the residual passes through the block).
    """
    E, GC, d = expert_out.shape
    G, S, K = plan.expert_index.shape
    weight = plan.combine_weight.reshape(G * S, K)
    impl = resolve_backend(backend, expert_out, weight)
    out = index_combine(expert_out.reshape(E * GC, d), weight,
                        plan.buffer_position().reshape(G * S, K), plan.buffer_assignment(), impl)
    return out.view(G, S, d)


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
    "index_torch": (functools.partial(dispatch, backend="torch"), functools.partial(combine, backend="torch")),
    "index_triton": (functools.partial(dispatch, backend="triton"), functools.partial(combine, backend="triton")),
    "einsum": (einsum_dispatch, einsum_combine),
}
