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

A *backend* implements those three kernels: ``TorchBackend`` here (portable), and the Triton one
in ``fused_dispatch.py``. Out-of-range indices (the sentinels above) read zero.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["TorchBackend", "index_dispatch", "index_combine"]


def _gather_or_zero(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src [N, d], index [M] in [0, N] -> [M, d]; index N reads zero.

    Gathers through clamped indices and zero-fills the sentinel rows in place, rather than
    appending a zero row to ``src`` (a full copy) or multiplying by a mask (0 * inf = nan)."""
    N = src.shape[0]
    if N == 0:
        return src.new_zeros(index.shape[0], src.shape[-1])
    out = src.index_select(0, index.clamp(max=N - 1))
    return out.masked_fill_((index == N).unsqueeze(-1), 0)


class TorchBackend:
    """Portable PyTorch kernels (CPU, CUDA, anything), built on ``index_select``."""

    name = "torch"

    @staticmethod
    def gather_rows(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """src [N, d], index [M] in [0, N] -> [M, d] in ``out_dtype``; index N reads zero."""
        if src.dtype != out_dtype and index.numel() > src.shape[0]:
            src = src.to(out_dtype)  # cast the smaller tensor
        return _gather_or_zero(src, index).to(out_dtype)

    @staticmethod
    def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor],
                   out_dtype: torch.dtype) -> torch.Tensor:
        """src [N, d], index [T, K] in [0, N], weight [T, K] or None -> [T, d]:
        ``out[t] = sum_k weight[t, k] * src[index[t, k]]`` (index N reads zero)."""
        T, K = index.shape
        picked = _gather_or_zero(src, index.reshape(-1)).view(T, K, -1)
        if weight is None:
            return picked.to(out_dtype).sum(1)
        out = torch.bmm(weight.to(picked.dtype).view(T, 1, K), picked)
        return out.view(T, -1).to(out_dtype)

    @staticmethod
    def combine_backward(grad_out: torch.Tensor, expert_out: torch.Tensor, weight: torch.Tensor,
                         token_rows: torch.Tensor, row_assignment: torch.Tensor, need_weight_grad: bool
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """grad_out [T, d], expert_out [R, d], weight [T, K] -> (grad expert_out [R, d],
        grad weight [T, K] float32 or None)."""
        T, K = token_rows.shape
        row_token = torch.div(row_assignment, K, rounding_mode="floor")  # empty rows -> T
        g_rows = _gather_or_zero(grad_out, row_token)                    # [R, d]
        grad_w = None
        if need_weight_grad:
            # <gy[t], eo[r]> per row (bmm: no [R, d] temporary), then each assignment gathers
            # its row's value; dropped assignments read zero.
            dots = torch.bmm(g_rows.unsqueeze(1), expert_out.to(g_rows.dtype).unsqueeze(2))
            grad_w = _gather_or_zero(dots.view(-1, 1).float(), token_rows.reshape(-1)).view(T, K)
        w_rows = _gather_or_zero(weight.reshape(-1, 1), row_assignment)   # [R, 1], 0 if empty
        return g_rows.mul_(w_rows.to(g_rows.dtype)).to(expert_out.dtype), grad_w


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
            grad_out.contiguous(), expert_out, weight, token_rows, row_assignment,
            ctx.needs_input_grad[1])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_eo, grad_w, None, None, None


def index_dispatch(x: torch.Tensor, row_token: torch.Tensor, token_rows: torch.Tensor,
                   out_dtype: Optional[torch.dtype] = None, backend=TorchBackend) -> torch.Tensor:
    """x [T, d] -> buffer rows [R, d] (in ``out_dtype``, default x's). Empty rows are zero.
    Backward: each token gathers and sums the gradients of its K rows."""
    out_dtype = out_dtype or x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _IndexDispatch.apply(x, row_token, token_rows, out_dtype, backend)


def index_combine(expert_out: torch.Tensor, weight: torch.Tensor, token_rows: torch.Tensor,
                  row_assignment: torch.Tensor, backend=TorchBackend) -> torch.Tensor:
    """expert_out [R, d], weight [T, K] -> [T, d] in expert_out's dtype:
    ``y[t] = sum_k weight[t, k] * expert_out[token_rows[t, k]]``. Backward: each buffer row
    gathers its token's output gradient; each weight the dot product with its row."""
    with torch.autocast(device_type=expert_out.device.type, enabled=False):
        return _IndexCombine.apply(expert_out, weight, token_rows, row_assignment, backend)
