"""Triton kernel bodies for ``triton_backend`` (imported lazily: needs triton).

Plain functions with ``tl`` as a module global: ``triton_backend`` wraps them with ``triton.jit``
for CUDA or with the interpreter for CPU tensors (the interpreter patches ``tl`` in the
function's globals, so the bodies cannot be closures). Indices are int64; every row index at or
beyond its limit is a sentinel that reads zero. ``ACC`` is the accumulation dtype: float32, or
float64 for float64 tensors.

Only builtins are used (``tl.full``, ``tl.reduce``), not the ``@jit`` helpers of
``triton.language.standard`` such as ``tl.zeros``/``tl.sum``: those are JIT functions unless
``TRITON_INTERPRET=1`` was set before triton was first imported (torch._dynamo imports it), and
the interpreter cannot call them then. ``tl.reduce`` with ``_sum_combine`` is what ``tl.sum``
does for floats, and the interpreter maps it to numpy's sum.
"""

import triton.language as tl


def gather_rows(src, index, out, limit, d, BLOCK: tl.constexpr):
    # out[r] = src[index[r]]; zero if index[r] >= limit. A plain copy: one rounding, straight to
    # the output dtype.
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < d
    a = tl.load(index + r)
    v = tl.load(src + a * d + cols, mask=cmask & (a < limit), other=0.0)
    tl.store(out + r * d + cols, v.to(out.dtype.element_ty), mask=cmask)


def gather_sum(
    src,
    index,
    weight,
    out,
    n_src,
    d,
    K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[t] = sum_k weight[t, k] * src[index[t, k]]; index >= n_src reads zero.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < d
    acc = tl.full([BLOCK], 0.0, ACC)
    for k in tl.static_range(K):
        row = tl.load(index + t * K + k)
        valid = row < n_src
        v = tl.load(src + row * d + cols, mask=cmask & valid, other=0.0).to(ACC)
        if HAS_WEIGHT:
            v = v * tl.load(weight + t * K + k).to(ACC)
        acc += v
    tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=cmask)


def combine_backward(
    grad_out,
    expert_out,
    weight,
    row_assignment,
    grad_eo,
    grad_w,
    n_assign,
    d,
    K: tl.constexpr,
    NEED_W: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row r holds assignment a = t*K + k: grad_eo[r] = w[a] * gy[t]; grad_w[a] = <gy[t], eo[r]>.
    # Each assignment owns at most one row, so the grad_w store never collides.
    r = tl.program_id(0).to(tl.int64)
    a = tl.load(row_assignment + r)
    valid = a < n_assign
    t = a // K
    w = tl.load(weight + a, mask=valid, other=0.0).to(ACC)
    dot = tl.full([BLOCK], 0.0, ACC)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < d
        g = tl.load(grad_out + t * d + cols, mask=cmask & valid, other=0.0).to(ACC)
        tl.store(grad_eo + r * d + cols, (g * w).to(grad_eo.dtype.element_ty), mask=cmask)
        if NEED_W:
            e = tl.load(expert_out + r * d + cols, mask=cmask, other=0.0).to(ACC)
            dot += g * e
    if NEED_W:
        tl.store(grad_w + a, tl.reduce(dot, 0, tl.standard._sum_combine), mask=valid)
