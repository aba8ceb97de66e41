"""The Triton dispatch kernels compile for real GPUs (ahead of time, no GPU needed).

The interpreter tests check what the kernels compute; this checks that the JIT path a CUDA
machine takes (Triton -> TTIR -> TTGIR -> LLVM -> PTX -> cubin) accepts them, for Ampere and
Hopper and for the dtypes the layer uses.
"""

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vmoe.moe.dispatch import triton_kernels as kernels  # noqa: E402

KERNELS = {
    "gather_rows": (
        kernels.gather_rows,
        dict(src="*{x}", index="*i64", out="*{y}", limit="i64", d="i64"),
        dict(BLOCK=256),
    ),
    "gather_sum": (
        kernels.gather_sum,
        dict(src="*{y}", index="*i64", weight="*fp32", out="*{x}", n_src="i64", d="i64"),
        dict(K=2, HAS_WEIGHT=True, ACC=tl.float32, BLOCK=256),
    ),
    "combine_backward": (
        kernels.combine_backward,
        dict(
            grad_out="*{x}",
            expert_out="*{y}",
            weight="*fp32",
            row_assignment="*i64",
            grad_eo="*{y}",
            grad_w="*fp32",
            n_assign="i64",
            d="i64",
        ),
        dict(K=2, NEED_W=True, ACC=tl.float32, BLOCK=256),
    ),
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtypes", [("fp32", "bf16"), ("fp32", "fp32")])
def test_kernel_compiles_to_cubin(name, arch, dtypes):
    fn, signature, constants = KERNELS[name]
    jitted = triton.jit(fn)
    x, y = dtypes
    full = {k: v.format(x=x, y=y) for k, v in signature.items()}
    full.update({k: "constexpr" for k in constants})
    source = ASTSource(
        fn=jitted,
        signature=full,
        constexprs={(jitted.arg_names.index(k),): v for k, v in constants.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0
