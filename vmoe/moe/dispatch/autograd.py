"""Dispatch and combine as autograd Functions whose forward *and* backward are gathers.

Axis letters: T = G*S tokens, K choices per token, R = E*G*C buffer rows, d width.
Three index maps, all from the RoutingPlan, describe the routing (each buffer row holds at most
one assignment, so they are inverse to each other and every pass can be written as a gather):

- ``row_token``      [R]    the token in each buffer row; T for an empty row;
- ``row_assignment`` [R]    the assignment ``t*K + k`` in each buffer row; T*K for an empty row;
- ``token_rows``     [T, K] the buffer row of each assignment; R for a dropped one.

Passes (each output row reads its inputs; nothing is scattered, so no atomics and results are
bit-for-bit deterministic on every device):

- dispatch  fwd: buf[r]   = x[row_token[r]]                               (gather_rows)
- dispatch  bwd: gx[t]    = sum_k gbuf[token_rows[t, k]]                  (gather_sum)
- combine   fwd: y[t]     = sum_k w[t, k] * eo[token_rows[t, k]]           (gather_sum)
- combine   bwd: geo[r]   = w[a] * gy[a // K],  a = row_assignment[r]      (combine_backward)
                 gw[t, k] = <gy[t], eo[token_rows[t, k]]>

A *backend* implements those three kernels (``gather_rows``, ``gather_sum``, ``combine_backward``):
``TorchBackend`` (``torch_backend.py``, portable) or ``TritonBackend`` (``triton_backend.py``).
Out-of-range indices (the sentinels above) read zero.
"""

from __future__ import annotations

from typing import Optional

import torch

from .torch_backend import TorchBackend

__all__ = ["index_dispatch", "index_combine"]


class _IndexDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_token, token_rows, out_dtype, backend):
        ctx.save_for_backward(token_rows)
        ctx.backend, ctx.x_dtype = backend, x.dtype
        return backend.gather_rows(x.contiguous(), row_token, out_dtype)

    @staticmethod
    def backward(ctx, grad_buf):
        (token_rows,) = ctx.saved_tensors
        grad_x = ctx.backend.gather_sum(grad_buf.contiguous(), token_rows, None, ctx.x_dtype)
        return grad_x, None, None, None, None


class _IndexCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, weight, token_rows, row_assignment, backend):
        expert_out = expert_out.contiguous()
        ctx.save_for_backward(expert_out, weight, token_rows, row_assignment)
        ctx.backend = backend
        return backend.gather_sum(expert_out, token_rows, weight, expert_out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, weight, token_rows, row_assignment = ctx.saved_tensors
        grad_eo, grad_w = ctx.backend.combine_backward(
            grad_out.contiguous(),
            expert_out,
            weight,
            token_rows,
            row_assignment,
            ctx.needs_input_grad[1],
        )
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_eo, grad_w, None, None, None


def index_dispatch(
    x: torch.Tensor,
    row_token: torch.Tensor,
    token_rows: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
    backend=TorchBackend,
) -> torch.Tensor:
    """x [T, d] -> buffer rows [R, d] (in ``out_dtype``, default x's). Empty rows are zero.
    Backward: each token gathers and sums the gradients of its K rows."""
    out_dtype = out_dtype or x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _IndexDispatch.apply(x, row_token, token_rows, out_dtype, backend)


def index_combine(
    expert_out: torch.Tensor,
    weight: torch.Tensor,
    token_rows: torch.Tensor,
    row_assignment: torch.Tensor,
    backend=TorchBackend,
) -> torch.Tensor:
    """expert_out [R, d], weight [T, K] -> [T, d] in expert_out's dtype:
    ``y[t] = sum_k weight[t, k] * expert_out[token_rows[t, k]]``. Backward: each buffer row
    gathers its token's output gradient; each weight the dot product with its row."""
    with torch.autocast(device_type=expert_out.device.type, enabled=False):
        return _IndexCombine.apply(expert_out, weight, token_rows, row_assignment, backend)
