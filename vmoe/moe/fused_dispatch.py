"""Triton kernels for index dispatch/combine: the fast path on CUDA (``TritonBackend``).

They implement the three gathers of ``autograd_dispatch`` (see its docstring for the index maps):
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


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


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
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    wrap = InterpretedFunction if interpret else triton.jit

    def gather_rows(src, index, weight, out, limit, d, DIVISOR: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        # out[r] = weight[a] * src[a // DIVISOR] with a = index[r]; zero if a >= limit.
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < d
        a = tl.load(index + r)
        valid = a < limit
        src_row = a // DIVISOR
        v = tl.load(src + src_row * d + cols, mask=cmask & valid, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.load(weight + a, mask=valid, other=0.0).to(tl.float32)
        tl.store(out + r * d + cols, v.to(out.dtype.element_ty), mask=cmask)

    def gather_sum(src, index, weight, out, n_src, d, K: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        # out[t] = sum_k weight[t, k] * src[index[t, k]]; index >= n_src reads zero.
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < d
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(index + t * K + k)
            valid = row < n_src
            v = tl.load(src + row * d + cols, mask=cmask & valid, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                v = v * tl.load(weight + t * K + k).to(tl.float32)
            acc += v
        tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=cmask)

    def combine_backward(grad_out, expert_out, weight, row_assignment, grad_eo, grad_w,
                         n_assign, d, K: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
        # Row r holds assignment a = t*K + k: grad_eo[r] = w[a] * gy[t]; grad_w[a] = <gy[t], eo[r]>.
        # Each assignment owns at most one row, so the grad_w store never collides.
        r = tl.program_id(0).to(tl.int64)
        a = tl.load(row_assignment + r)
        valid = a < n_assign
        t = a // K
        w = tl.load(weight + a, mask=valid, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            cmask = cols < d
            g = tl.load(grad_out + t * d + cols, mask=cmask & valid, other=0.0).to(tl.float32)
            tl.store(grad_eo + r * d + cols, (g * w).to(grad_eo.dtype.element_ty), mask=cmask)
            if NEED_W:
                e = tl.load(expert_out + r * d + cols, mask=cmask, other=0.0).to(tl.float32)
                dot += g * e
        if NEED_W:
            tl.store(grad_w + a, tl.sum(dot, axis=0), mask=valid)

    return wrap(gather_rows), wrap(gather_sum), wrap(combine_backward)


def _check(*tensors: torch.Tensor) -> bool:
    reason = unsupported_reason(*tensors)
    if reason:
        raise RuntimeError(f"the Triton dispatch kernels cannot run here: {reason}")
    return tensors[0].device.type == "cpu"  # -> interpreter


def _block(d: int) -> int:
    return min(_BLOCK_D, max(16, 1 << (d - 1).bit_length()))


class TritonBackend:
    """The kernels of ``autograd_dispatch.TorchBackend``, fused in Triton (same contracts)."""

    name = "triton"

    @staticmethod
    def gather_rows(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        interpret = _check(src)
        N, d = src.shape
        out = torch.empty(index.shape[0], d, dtype=out_dtype, device=src.device)
        if out.numel():
            block = _block(d)
            _kernels(interpret)[0][(index.shape[0], -(-d // block))](
                src, index.contiguous(), src, out, N, d, DIVISOR=1, HAS_WEIGHT=False, BLOCK=block)
        return out

    @staticmethod
    def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor],
                   out_dtype: torch.dtype) -> torch.Tensor:
        interpret = _check(src) if weight is None else _check(src, weight)
        T, K = index.shape
        d = src.shape[1]
        out = torch.empty(T, d, dtype=out_dtype, device=src.device)
        if out.numel():
            block = _block(d)
            w = src if weight is None else weight.contiguous()
            _kernels(interpret)[1][(T, -(-d // block))](
                src, index.contiguous(), w, out, src.shape[0], d, K=K,
                HAS_WEIGHT=weight is not None, BLOCK=block)
        return out

    @staticmethod
    def combine_backward(grad_out: torch.Tensor, expert_out: torch.Tensor, weight: torch.Tensor,
                         token_rows: torch.Tensor, row_assignment: torch.Tensor, need_weight_grad: bool
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        interpret = _check(grad_out, expert_out, weight)
        T, K = token_rows.shape
        R, d = expert_out.shape
        grad_eo = torch.empty(R, d, dtype=expert_out.dtype, device=expert_out.device)
        # Dropped assignments own no row and keep their zero gradient.
        grad_w = torch.zeros(T, K, dtype=torch.float32, device=expert_out.device)
        if R:
            _kernels(interpret)[2][(R,)](
                grad_out, expert_out, weight.contiguous(), row_assignment.contiguous(), grad_eo,
                grad_w, T * K, d, K=K, NEED_W=need_weight_grad, BLOCK=_block(d))
        return grad_eo, grad_w if need_weight_grad else None
