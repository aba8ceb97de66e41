"""The Triton dispatch/combine kernels against the portable path.

On CPU they run in the Triton interpreter (``TRITON_INTERPRET=1``, set per test; the kernels are
built lazily per mode, so the order of imports does not matter). Tests marked ``cuda`` compile
them for a real GPU (run by ``benchmarks/gpu_check.sh``).
"""

import importlib

import pytest
import torch

from vmoe.moe import MoeMlp, combine, dispatch
from vmoe.moe.dispatch.autograd import index_combine, index_dispatch
from vmoe.moe.routing import ExpertChoiceRouter, TopKRouter

pytest.importorskip("triton")
fused = importlib.import_module("vmoe.moe.dispatch.triton_backend")
dispatch_mod = importlib.import_module("vmoe.moe.dispatch")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_plan(kind="top_k", G=2, S=12, E=4, K=2, capacity=3, pad=0, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = torch.randn(G, S, E, generator=g).softmax(-1).to(device)
    valid = None if not pad else (torch.arange(G * S, device=device) < G * S - pad).view(G, S)
    router = (
        TopKRouter(8, E, K, capacity=capacity)
        if kind == "top_k"
        else ExpertChoiceRouter(8, E, capacity=capacity)
    )
    return router.route(gates, valid)


def run_layer_ops(plan, x, dispatcher, dtype=None):
    """dispatch -> nonlinear 'experts' -> combine, backward of a fixed gradient."""
    xi = x.clone().requires_grad_()
    w = plan.combine_weight.clone().requires_grad_()
    p = plan.detach()
    p.combine_weight = w
    buffers = dispatch(xi, p, dispatcher=dispatcher, dtype=dtype)
    expert_out = torch.sin(buffers.float() * 1.5).to(buffers.dtype)
    y = combine(expert_out, p, dispatcher=dispatcher)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    y.backward(gy)
    return buffers, y, xi.grad, w.grad


CASES = {
    "top2_drops": dict(),
    "top1": dict(K=1, capacity=2),
    "top2_pad": dict(pad=5, capacity=4),
    "expert_choice": dict(kind="expert_choice", capacity=5),
    "width_not_power_of_two": dict(E=3, capacity=6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_matches_portable_path_forward_and_gradients(interpret, name):
    plan = make_plan(**CASES[name])
    d = 37 if name == "width_not_power_of_two" else 300  # 300 > one column block (256)
    x = torch.randn(plan.num_groups, plan.group_size, d)
    ref = run_layer_ops(plan, x, "torch")
    out = run_layer_ops(plan, x, "triton")
    assert torch.equal(out[0], ref[0])  # dispatch: a pure copy
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.all(out[3][~plan.kept] == 0)


def test_triton_bf16_dispatch_cast_and_half_precision_passes(interpret):
    plan = make_plan()
    G, S, K = plan.expert_index.shape
    row_token, row_assignment = plan.buffer_token(), plan.buffer_assignment()
    token_rows = plan.buffer_position().reshape(G * S, K)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(G * S, 64, generator=gen, requires_grad=True)
    be = fused.TritonBackend
    buf = index_dispatch(x, row_token, token_rows, torch.bfloat16, backend=be)
    ref = index_dispatch(x, row_token, token_rows, torch.bfloat16)
    assert buf.dtype == torch.bfloat16
    # The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even, as torch
    # does): at most 1 ulp apart, and exactly the truncated values.
    exact = x.detach()[row_token.clamp(max=G * S - 1)] * (row_token < G * S).unsqueeze(-1)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert torch.equal(buf.float(), truncated)
    torch.testing.assert_close(buf.float(), ref.float(), rtol=2**-7, atol=0)
    # Backward from the same bf16 gradient: fp32 sums of the same values, exactly equal.
    gbuf = torch.randn(buf.shape, generator=gen).to(torch.bfloat16)
    (gx,) = torch.autograd.grad(buf, x, gbuf)
    (gx_ref,) = torch.autograd.grad(ref, x, gbuf)
    assert gx.dtype == torch.float32 and torch.equal(gx, gx_ref)
    # Combine on the same bf16 expert outputs: fp32 accumulation, one rounding.
    eo = torch.randn(buf.shape, generator=gen).to(torch.bfloat16).requires_grad_()
    w = plan.combine_weight.reshape(G * S, K).clone().requires_grad_()
    y = index_combine(eo, w, token_rows, row_assignment, backend=be)
    y_ref = index_combine(eo, w, token_rows, row_assignment)
    assert y.dtype == torch.bfloat16
    # (torch's bf16 bmm rounds the weights to bf16 first; Triton keeps them fp32: ~1 ulp)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=2**-8)
    gy = torch.randn(y.shape, generator=gen).to(torch.bfloat16)
    geo, gw = torch.autograd.grad(y, (eo, w), gy)
    geo_ref, gw_ref = torch.autograd.grad(y_ref, (eo, w), gy)
    torch.testing.assert_close(geo.float(), geo_ref.float(), rtol=2**-7, atol=2**-8)
    torch.testing.assert_close(gw, gw_ref, rtol=2**-7, atol=1e-3)  # torch: a bf16 bmm dot


def test_triton_gradcheck_float64(interpret):
    plan = make_plan(G=1, S=6, E=3, capacity=3)
    G, S, K = plan.expert_index.shape
    row_token, row_assignment = plan.buffer_token(), plan.buffer_assignment()
    token_rows = plan.buffer_position().reshape(G * S, K)
    be = fused.TritonBackend
    x = torch.randn(G * S, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: index_dispatch(x, row_token, token_rows, backend=be), (x,)
    )
    eo = torch.randn(row_token.shape[0], 3, dtype=torch.float64, requires_grad=True)
    w = plan.combine_weight.reshape(G * S, K).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda eo, w: index_combine(eo, w, token_rows, row_assignment, backend=be), (eo, w)
    )


def test_moe_mlp_triton_dispatcher_equals_torch_dispatcher(interpret):
    torch.manual_seed(0)
    a = MoeMlp(
        32,
        48,
        num_experts=4,
        num_selected=2,
        group_size=16,
        capacity_factor=0.9,
        dispatcher="torch",
    ).train()
    b = MoeMlp(
        32,
        48,
        num_experts=4,
        num_selected=2,
        group_size=16,
        capacity_factor=0.9,
        dispatcher="triton",
    ).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 11, 32)
    outs = []
    for layer in (a, b):
        torch.manual_seed(3)  # same router noise
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.square().sum() + layer.aux_loss).backward()
        outs.append((y, xi.grad, [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_unsupported_dtype_is_reported(interpret):
    assert "dtype" in fused.unsupported_reason(torch.zeros(2, dtype=torch.int32))
    assert fused.unsupported_reason(torch.zeros(2)) is None  # CPU + interpreter: runnable
    with pytest.raises(RuntimeError, match="dispatcher='triton'.*dtype"):
        dispatch_mod.resolve_backend("triton", torch.zeros(2, dtype=torch.int32))


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in fused.unsupported_reason(torch.zeros(2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused.TritonBackend.gather_rows(
            torch.zeros(2, 3), torch.zeros(1, dtype=torch.long), torch.float32
        )


# --- real GPU (benchmarks/gpu_check.sh) ----------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_torch_and_is_deterministic(dtype):
    plan = make_plan(G=4, S=400, E=8, K=2, capacity=108, device="cuda")
    x = torch.randn(4, 400, 512, device="cuda")
    assert dispatch_mod.resolve_backend("auto", x) is fused.TritonBackend  # auto picks Triton
    ref = run_layer_ops(plan, x, "torch", dtype=dtype)
    out = run_layer_ops(plan, x, "triton", dtype=dtype)
    again = run_layer_ops(plan, x, "triton", dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.equal(out[0], ref[0])  # GPU casts round to nearest, as torch does
    for a, b, c in zip(out[1:], ref[1:], again[1:]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
        assert torch.equal(a, c)  # bit-for-bit run to run: no atomics


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_triton_layer_equals_eager(dtype):
    """Inductor-compiled layer on the Triton path == the eager layer: same routing, outputs,
    input and weight gradients (eval: no router noise, so both see the same gates)."""
    torch.manual_seed(0)
    layer = (
        MoeMlp(
            64,
            128,
            num_experts=4,
            num_selected=2,
            group_size_images=2,
            batch_priority=True,
            dispatcher="triton",
            dropless=False,  # the dispatch kernels' path in eval mode too
        )
        .cuda()
        .eval()
    )
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 10, 64, device="cuda")  # 3 groups, the last one padded
    results = []
    for fn in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = fn(xi)
        y.float().square().sum().backward()
        plan = layer.last_plan
        results.append(
            (
                y.float(),
                xi.grad,
                layer.experts.fc1_weight.grad.clone(),
                layer.router.weight.grad.clone(),
                plan.expert_index.clone(),
                plan.slot.clone(),
            )
        )
    eager, comp = results
    assert torch.equal(comp[4], eager[4]) and torch.equal(comp[5], eager[5])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(eager[:4], comp[:4]):
        torch.testing.assert_close(b, a, **tol)


def test_triton_path_compiles_fullgraph_as_opaque_custom_ops(interpret):
    """The launches are custom ops with fake implementations, so dynamo captures the layer in
    one graph (here run by aot_eager, the kernels in the interpreter)."""
    torch.manual_seed(0)
    layer = MoeMlp(
        32, 48, num_experts=4, num_selected=2, group_size=16, dispatcher="triton", dropless=False
    ).eval()  # the buffers' path (dispatch kernels) in eval mode too
    x = torch.randn(2, 11, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=1e-6)
