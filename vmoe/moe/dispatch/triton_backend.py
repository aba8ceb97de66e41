"""The Triton dispatch backend: the fast path on CUDA (``TritonBackend``).

Its kernels (``triton_kernels.py``) implement the three gathers of ``autograd.py`` (see its
docstring for the index maps):
one program per output row (and per block of columns), reading its inputs through the maps, so
no atomics are needed and results are deterministic run to run. Accumulation is float32; the
dispatch casts to the compute dtype on the way (e.g. fp32 tokens -> bf16 buffers under autocast).

Triton is imported lazily: ``vmoe`` imports without it. On CPU tensors the kernels run in the
Triton interpreter when ``TRITON_INTERPRET=1`` is set (slow; used by the tests). Note that the
interpreter converts float32 -> bfloat16 by truncation, where the GPU rounds to nearest even.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

__all__ = ["TritonBackend", "unsupported_reason", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_D = 256  # columns per program; d = 512/768/1024 -> 2-4 programs per row


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_IMPORT_STATE: dict = {}  # a plain dict, not lru_cache: dynamo traces through it cleanly


def _triton_import_error() -> Optional[str]:
    if "error" not in _IMPORT_STATE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _IMPORT_STATE["error"] = None
        except Exception as exc:  # ImportError, or a broken install
            _IMPORT_STATE["error"] = f"triton is not importable ({type(exc).__name__}: {exc})"
    return _IMPORT_STATE["error"]


def unsupported_reason(*tensors: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run on these tensors, or None if they can."""
    error = _triton_import_error()
    if error:
        return error
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported (supported: {SUPPORTED_DTYPES})"
        if t.device.type == "cuda":
            if torch.version.hip is None and torch.cuda.get_device_capability(t.device) < (7, 5):
                return f"CUDA device {t.device} has compute capability < 7.5"
        elif t.device.type == "cpu":
            if not interpreter_enabled():
                return "tensors are on the CPU (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for the interpreter)"
        else:
            return f"device type {t.device.type!r} is not supported"
    return None


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """Build the kernels once per mode: JIT-compiled for CUDA, interpreted for CPU tensors."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from . import triton_kernels as k

    wrap = InterpretedFunction if interpret else triton.jit
    return wrap(k.gather_rows), wrap(k.gather_sum), wrap(k.combine_backward)


def _check(*tensors: torch.Tensor) -> bool:
    reason = unsupported_reason(*tensors)
    if reason:
        raise RuntimeError(f"the Triton dispatch kernels cannot run here: {reason}")
    return tensors[0].device.type == "cpu"  # -> interpreter


def _acc(*tensors: torch.Tensor):
    """Accumulation dtype (a triton dtype, passed as a constexpr): float64 if any tensor is."""
    import triton.language as tl

    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _block(d: int) -> int:
    return min(_BLOCK_D, max(16, 1 << (d - 1).bit_length()))


# The launches are registered as custom ops: torch.compile and CUDA graphs then see opaque ops
# with known output shapes (the fake implementations) instead of tracing Python launch code.
@torch.library.custom_op("vmoe::triton_gather_rows", mutates_args=())
def _gather_rows_op(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    interpret = _check(src)
    N, d = src.shape
    out = torch.empty(index.shape[0], d, dtype=out_dtype, device=src.device)
    if out.numel():
        block = _block(d)
        _kernels(interpret)[0][(index.shape[0], -(-d // block))](src, index, out, N, d, BLOCK=block)
    return out


@_gather_rows_op.register_fake
def _(src, index, out_dtype):
    return src.new_empty(index.shape[0], src.shape[1], dtype=out_dtype)


@torch.library.custom_op("vmoe::triton_gather_sum", mutates_args=())
def _gather_sum_op(
    src: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    interpret = _check(src) if weight is None else _check(src, weight)
    T, K = index.shape
    d = src.shape[1]
    out = torch.empty(T, d, dtype=out_dtype, device=src.device)
    if out.numel():
        block = _block(d)
        w = src if weight is None else weight
        _kernels(interpret)[1][(T, -(-d // block))](
            src,
            index,
            w,
            out,
            src.shape[0],
            d,
            K=K,
            HAS_WEIGHT=weight is not None,
            ACC=_acc(src, w, out),
            BLOCK=block,
        )
    return out


@_gather_sum_op.register_fake
def _(src, index, weight, out_dtype):
    return src.new_empty(index.shape[0], src.shape[1], dtype=out_dtype)


@torch.library.custom_op("vmoe::triton_combine_backward", mutates_args=())
def _combine_backward_op(
    grad_out: torch.Tensor,
    expert_out: torch.Tensor,
    weight: torch.Tensor,
    row_assignment: torch.Tensor,
    num_selected: int,
    need_weight_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    interpret = _check(grad_out, expert_out, weight)
    R, d = expert_out.shape
    grad_eo = torch.empty_like(expert_out)
    # Dropped assignments own no row and keep their zero gradient.
    grad_w = torch.zeros(weight.shape, dtype=_acc_torch(expert_out), device=expert_out.device)
    if R:
        _kernels(interpret)[2][(R,)](
            grad_out,
            expert_out,
            weight,
            row_assignment,
            grad_eo,
            grad_w,
            weight.numel(),
            d,
            K=num_selected,
            NEED_W=need_weight_grad,
            ACC=_acc(grad_out, expert_out, weight),
            BLOCK=_block(d),
        )
    return grad_eo, grad_w


@_combine_backward_op.register_fake
def _(grad_out, expert_out, weight, row_assignment, num_selected, need_weight_grad):
    return torch.empty_like(expert_out), weight.new_empty(
        weight.shape, dtype=_acc_torch(expert_out)
    )


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TritonBackend:
    """The kernels of ``torch_backend.TorchBackend``, fused in Triton (same contracts)."""

    name = "triton"

    @staticmethod
    def gather_rows(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _gather_rows_op(src.contiguous(), index.contiguous(), out_dtype)

    @staticmethod
    def gather_sum(
        src: torch.Tensor,
        index: torch.Tensor,
        weight: Optional[torch.Tensor],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        weight = None if weight is None else weight.contiguous()
        return _gather_sum_op(src.contiguous(), index.contiguous(), weight, out_dtype)

    @staticmethod
    def combine_backward(
        grad_out: torch.Tensor,
        expert_out: torch.Tensor,
        weight: torch.Tensor,
        token_rows: torch.Tensor,
        row_assignment: torch.Tensor,
        need_weight_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        grad_eo, grad_w = _combine_backward_op(
            grad_out.contiguous(),
            expert_out.contiguous(),
            weight.contiguous(),
            row_assignment.contiguous(),
            token_rows.shape[1],
            need_weight_grad,
        )
        return grad_eo, grad_w if need_weight_grad else None
