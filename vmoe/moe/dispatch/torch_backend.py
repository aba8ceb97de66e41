"""The portable dispatch backend: the three gathers of ``autograd.py`` with ``index_select``
(CPU, CUDA, any device). Shapes as there: T tokens, K choices, R buffer rows, d width."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["TorchBackend"]


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
    def gather_sum(
        src: torch.Tensor,
        index: torch.Tensor,
        weight: Optional[torch.Tensor],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """src [N, d], index [T, K] in [0, N], weight [T, K] or None -> [T, d]:
        ``out[t] = sum_k weight[t, k] * src[index[t, k]]`` (index N reads zero)."""
        T, K = index.shape
        picked = _gather_or_zero(src, index.reshape(-1)).view(T, K, -1)
        if weight is None:
            return picked.to(out_dtype).sum(1)
        out = torch.bmm(weight.to(picked.dtype).view(T, 1, K), picked)
        return out.view(T, -1).to(out_dtype)

    @staticmethod
    def combine_backward(
        grad_out: torch.Tensor,
        expert_out: torch.Tensor,
        weight: torch.Tensor,
        token_rows: torch.Tensor,
        row_assignment: torch.Tensor,
        need_weight_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """grad_out [T, d], expert_out [R, d], weight [T, K] -> (grad expert_out [R, d],
        grad weight [T, K] float32 or None)."""
        T, K = token_rows.shape
        row_token = torch.div(row_assignment, K, rounding_mode="floor")  # empty rows -> T
        g_rows = _gather_or_zero(grad_out, row_token)  # [R, d]
        grad_w = None
        if need_weight_grad:
            # <gy[t], eo[r]> per row (bmm: no [R, d] temporary), then each assignment gathers
            # its row's value; dropped assignments read zero.
            dots = torch.bmm(g_rows.unsqueeze(1), expert_out.to(g_rows.dtype).unsqueeze(2))
            grad_w = _gather_or_zero(dots.view(-1, 1).float(), token_rows.reshape(-1)).view(T, K)
        w_rows = _gather_or_zero(weight.reshape(-1, 1), row_assignment)  # [R, 1], 0 if empty
        return g_rows.mul_(w_rows.to(g_rows.dtype)).to(expert_out.dtype), grad_w
