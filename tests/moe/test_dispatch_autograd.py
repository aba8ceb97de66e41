"""The portable index dispatch/combine: equal to the one-hot einsum oracle (forward and
gradients), float64 gradcheck of the gather-only autograd Functions, no scatter anywhere, backend
selection and its errors, and torch.compile(fullgraph=True) of MoeMlp on CPU."""

import importlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vmoe.moe import MoeMlp, combine, dispatch, einsum_combine, einsum_dispatch
from vmoe.moe.dispatch.autograd import index_combine, index_dispatch
from vmoe.moe.dispatch.torch_backend import TorchBackend
from vmoe.moe.routing import ExpertChoiceRouter, TopKRouter

dispatch_mod = importlib.import_module("vmoe.moe.dispatch")


def make_plan(
    kind="top_k",
    G=3,
    S=10,
    E=4,
    K=2,
    capacity=3,
    batch_priority=False,
    pad=0,
    dtype=torch.float32,
    seed=0,
):
    """A plan with dropped assignments (capacity below demand), empty rows and optional padding."""
    g = torch.Generator().manual_seed(seed)
    gates = torch.randn(G, S, E, generator=g, dtype=dtype).softmax(-1)
    valid = None
    if pad:
        valid = (torch.arange(G * S) < G * S - pad).view(G, S)
    if kind == "top_k":
        router = TopKRouter(8, E, K, capacity=capacity, batch_priority=batch_priority)
    else:
        router = ExpertChoiceRouter(8, E, capacity=capacity)
    return router.route(gates, valid)


PLANS = {
    "top2": dict(),
    "top1_bpr": dict(K=1, batch_priority=True, capacity=2),
    "top2_pad": dict(pad=7),
    "expert_choice": dict(kind="expert_choice", capacity=4),
    "expert_choice_pad": dict(kind="expert_choice", capacity=4, pad=5),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_forward_and_gradients_equal_einsum_oracle(name):
    plan = make_plan(**PLANS[name])
    assert (~plan.kept).any(), "the case should drop some assignments"
    x = torch.randn(plan.num_groups, plan.group_size, 6)
    results = []
    for d, c in ((dispatch, combine), (einsum_dispatch, einsum_combine)):
        xi = x.clone().requires_grad_()
        w = plan.combine_weight.clone().requires_grad_()
        p = plan.detach()
        p.combine_weight = w
        buffers = d(xi, p)
        expert_out = torch.tanh(buffers) * torch.linspace(0.5, 2, buffers.shape[1]).view(1, -1, 1)
        y = c(expert_out, p)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append((buffers, y, xi.grad, w.grad))
    (b1, y1, gx1, gw1), (b2, y2, gx2, gw2) = results
    assert torch.equal(b1, b2)  # a gather of the same values: exactly equal, zeros included
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-6, atol=1e-6)
    # Dropped weights: ours get 0; the oracle's scatter_add sends them an artifact (the router
    # zeroes them anyway with torch.where, so neither reaches the parameters).
    torch.testing.assert_close(gw1[plan.kept], gw2[plan.kept], rtol=1e-5, atol=1e-6)
    assert torch.all(gw1[~plan.kept] == 0)
    if plan.valid is not None:  # padding tokens neither output nor get gradient
        assert torch.all(y1[~plan.valid] == 0) and torch.all(gx1[~plan.valid] == 0)


@pytest.mark.parametrize("name", ["top2", "top2_pad", "expert_choice"])
def test_gradcheck_float64(name):
    plan = make_plan(dtype=torch.float64, **PLANS[name])
    G, S, K = plan.expert_index.shape
    T = G * S
    row_token = plan.buffer_token()
    token_rows = plan.buffer_position().reshape(T, K)
    row_assignment = plan.buffer_assignment()
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: index_dispatch(x, row_token, token_rows), (x,))
    eo = torch.randn(row_token.shape[0], 5, dtype=torch.float64, requires_grad=True)
    w = plan.combine_weight.reshape(T, K).clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda eo, w: index_combine(eo, w, token_rows, row_assignment), (eo, w)
    )


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_and_combine_passes_use_no_scatter():
    """Forward and backward of dispatch+combine are gathers: no scatter/index_add/index_put
    (which need atomics on GPU and are non-deterministic there). The plan's index maps are
    built before recording (buffer_assignment scatters once into distinct rows)."""
    plan = make_plan()
    G, S, K = plan.expert_index.shape
    maps = (plan.buffer_token(), plan.buffer_position().reshape(G * S, K), plan.buffer_assignment())
    x = torch.randn(G * S, 6, requires_grad=True)
    w = plan.combine_weight.reshape(G * S, K).clone().requires_grad_()
    with _OpRecorder() as rec:
        buf = index_dispatch(x, maps[0], maps[1])
        y = index_combine(buf * 2, w, maps[1], maps[2])
        y.sum().backward()
    assert any("index_select" in op for op in rec.ops)
    assert not [op for op in rec.ops if any(s in op for s in ("scatter", "index_add", "index_put"))]
    assert x.grad is not None and w.grad is not None


def test_inf_token_does_not_leak_into_dropped_tokens():
    plan = make_plan()
    x = torch.randn(plan.num_groups, plan.group_size, 4)
    kept_any = plan.kept.any(-1)
    # put inf into a kept token; every fully dropped token must still get exactly 0
    g, s = [int(i[0]) for i in torch.nonzero(kept_any, as_tuple=True)]
    x[g, s] = float("inf")
    xi = x.clone().requires_grad_()
    y = combine(dispatch(xi, plan) * 1.0, plan)
    assert torch.all(y[~kept_any] == 0)
    y[~kept_any].sum().backward()
    assert torch.all(xi.grad == 0)


def test_backend_selection_and_errors(monkeypatch):
    x = torch.randn(2, 3)
    assert dispatch_mod.resolve_backend("auto", x) is TorchBackend  # auto on CPU: portable
    assert dispatch_mod.resolve_backend("torch", x) is TorchBackend
    with pytest.raises(ValueError, match="dispatcher.*'fast'"):
        dispatch_mod.resolve_backend("fast", x)
    with pytest.raises(ValueError, match="dispatcher.*'gpu'"):
        dispatch_mod.check_dispatcher("gpu")
    with pytest.raises(ValueError, match="dispatcher.*'gpu'"):
        MoeMlp(16, 32, dispatcher="gpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="dispatcher='triton'.*TRITON_INTERPRET"):
        dispatch_mod.resolve_backend("triton", x)
    with pytest.raises(RuntimeError, match="dispatcher='triton'"):
        dispatch(torch.randn(3, 10, 4), make_plan(), dispatcher="triton")
    with pytest.warns(DeprecationWarning, match="'index_torch' is now dispatcher='torch'"):
        assert MoeMlp(16, 32, dispatcher="index_torch").dispatcher == "torch"


def test_auto_falls_back_with_one_warning_and_explicit_request_raises(monkeypatch):
    monkeypatch.setattr(dispatch_mod, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back.*no triton here"):
        assert dispatch_mod._choose("auto", "no triton here") is TorchBackend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second time: silent
        assert dispatch_mod._choose("auto", "no triton here") is TorchBackend
    with pytest.raises(RuntimeError, match="requested.*no triton here"):
        dispatch_mod._choose("triton", "no triton here")


def test_dispatch_casts_to_autocast_dtype_and_gradient_comes_back_in_input_dtype():
    plan = make_plan()
    x = torch.randn(plan.num_groups, plan.group_size, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        buf = dispatch(x, plan)
    assert buf.dtype == torch.bfloat16
    assert torch.equal(buf, dispatch(x.detach(), plan).to(torch.bfloat16))
    (buf.float() * 3).sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, 3.0 * plan.kept.sum(-1, keepdim=True).float().expand_as(x))


@pytest.mark.parametrize("dispatcher", ["torch", "einsum"])
def test_moe_mlp_dispatchers_agree(dispatcher):
    torch.manual_seed(0)
    ref = MoeMlp(16, 32, num_experts=4, num_selected=2, group_size=20, capacity_factor=0.8).eval()
    other = MoeMlp(
        16,
        32,
        num_experts=4,
        num_selected=2,
        group_size=20,
        capacity_factor=0.8,
        dispatcher=dispatcher,
    ).eval()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(3, 15, 16)
    torch.testing.assert_close(other(x), ref(x), rtol=1e-5, atol=1e-6)


def test_moe_mlp_compiles_fullgraph_on_cpu():
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, num_experts=4, num_selected=2, group_size=20).train()
    x = torch.randn(2, 13, 16)  # 26 tokens: the last group is padded
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    xa = x.clone().requires_grad_()
    ya = compiled(xa)
    (ya.square().sum() + layer.aux_loss).backward()
    grads_a = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(1)  # same router noise
    xb = x.clone().requires_grad_()
    yb = layer(xb)
    (yb.square().sum() + layer.aux_loss).backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for ga, p in zip(grads_a, layer.parameters()):
        torch.testing.assert_close(ga, p.grad, rtol=1e-4, atol=1e-6)
