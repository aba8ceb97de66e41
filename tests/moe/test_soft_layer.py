"""MoeMlp(router='soft') against the official Soft MoE layer (tests/fixtures/soft_moe_reference),
plus its contract: compile, autocast, empty batch, padding, bad input, routing settings."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import SOFT_MOE_REFERENCE as FIXTURES
from vmoe.moe import MoeMlp, SoftRoutingPlan, read_routing, routing_settings, set_routing

LAYER = np.load(FIXTURES / "soft_moe_layer.npz")
CASES = [str(name) for name in LAYER["cases/name"]]
GELU_TANH = functools.partial(nn.GELU, approximate="tanh")


def _layer_case(name, **kwargs):
    a = {
        k[len(name) + 1 :]: torch.from_numpy(LAYER[k])
        for k in LAYER.files
        if k.startswith(name + "/")
    }
    E, D, H = a["params/Mlp/Dense_0/kernel"].shape
    cf_case = "cf" in name
    layer = MoeMlp(
        D,
        H,
        num_experts=E,
        router="soft",
        group_size=int(a["group_size"]),
        act_layer=GELU_TANH,
        **({} if cf_case else dict(num_slots=int(a["num_slots"]))),
        **kwargs,
    ).eval()
    assert layer.num_slots == int(a["num_slots"])
    with torch.no_grad():
        layer.router.mu.copy_(a["params/Router/mu"])
        layer.router.scale.copy_(a["params/Router/scale"])
        layer.experts.fc1_weight.copy_(a["params/Mlp/Dense_0/kernel"])
        layer.experts.fc1_bias.copy_(a["params/Mlp/Dense_0/bias"])
        layer.experts.fc2_weight.copy_(a["params/Mlp/Dense_1/kernel"])
        layer.experts.fc2_bias.copy_(a["params/Mlp/Dense_1/bias"])
    return layer, a


@pytest.mark.parametrize("name", CASES)
def test_layer_matches_official_without_bf16(name):
    layer, a = _layer_case(name)
    out = layer(a["x"])
    plan = layer.last_plan
    assert isinstance(plan, SoftRoutingPlan)
    torch.testing.assert_close(plan.dispatch_weight, a["dispatch_weights"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.combine_weight, a["combine_weights"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, a["output_no_bf16"], atol=1e-5, rtol=0)
    assert layer.aux_loss.item() == 0.0 and layer.aux_losses == {}


@pytest.mark.parametrize("name", CASES)
def test_layer_with_bf16_dispatch_matches_official_output(name):
    layer, a = _layer_case(name, bf16_dispatch=True)
    out = layer(a["x"])
    # The official output carries the bf16 roundings; float32 alone misses it (by up to 1.7e-3).
    torch.testing.assert_close(out, a["output"], atol=1e-5, rtol=0)
    assert (a["output"] - a["output_no_bf16"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", CASES)
def test_buffers_follow_the_official_row_layout(name):
    """Slot buffers [E, G*P, d] in the official row order (interleaved groups when G % E == 0),
    stage by stage: our dispatch of the bf16 tokens, our experts on the stored slots, our
    combine of the stored expert outputs."""
    from vmoe.moe import combine, dispatch

    layer, a = _layer_case(name, bf16_dispatch=True)
    layer(a["x"])
    plan = layer.last_plan
    tokens = a["x"].reshape(plan.num_groups, plan.group_size, -1)
    slots = dispatch(tokens.to(torch.bfloat16).float(), plan)
    torch.testing.assert_close(slots, a["dispatched"], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            layer.experts(a["dispatched"]), a["expert_out"], atol=1e-5, rtol=0
        )
    out = combine(a["expert_out"].to(torch.bfloat16).float(), plan)
    torch.testing.assert_close(out.reshape(a["output"].shape), a["output"], atol=1e-5, rtol=0)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return MoeMlp(8, 16, num_experts=4, router="soft", num_slots=2, **kwargs)


@pytest.mark.parametrize("G_multiple_of_E", [False, True])
def test_compiles_fullgraph_and_matches_eager(G_multiple_of_E):
    """No graph break (fullgraph) in forward and backward; both row layouts (4 or 3 groups)."""
    layer = _tiny(group_size=5).train()
    x = torch.randn(4 if G_multiple_of_E else 3, 5, 8)
    grad = torch.randn_like(x)
    xe = x.clone().requires_grad_()
    layer(xe).backward(grad)
    eager = [xe.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    xc = x.clone().requires_grad_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(xc).backward(grad)
    for got, want in zip([xc.grad] + [p.grad for p in layer.parameters()], eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_soft_layer_compiled_bf16_matches_cpu():
    """On a GPU: the soft layer (inductor-compiled, bf16 autocast) against the float32 CPU layer."""
    layer = MoeMlp(64, 128, num_experts=8, router="soft", num_slots=2).eval()
    x = torch.randn(16, 50, 64)
    want = layer(x)
    cuda_layer = copy.deepcopy(layer).cuda()
    compiled = torch.compile(cuda_layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = compiled(x.cuda())
    torch.testing.assert_close(got.float().cpu(), want, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(
        cuda_layer.last_plan.dispatch_weight.cpu(),
        layer.last_plan.dispatch_weight,
        atol=1e-4,
        rtol=1e-3,
    )


def test_bf16_autocast_and_gradients():
    layer = _tiny()
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32 and seen == [torch.bfloat16]  # slots mixed in bf16
    assert layer.last_plan.dispatch_weight.dtype == torch.float32  # routing stays float32
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.router.mu.grad.abs().sum() > 0 and layer.router.scale.grad.abs() > 0
    reference = layer(x.detach())
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


def test_empty_batch():
    layer = _tiny()
    x = torch.randn(0, 5, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 5, 8) and layer.aux_loss.item() == 0.0
    assert layer.last_plan.num_groups == 0
    out.sum().backward()


def test_padding_matches_the_unpadded_groups():
    """Groups of 4 tokens over 2 images of 5 tokens: the last group has 2 real tokens and
    2 padding ones. Each group's output equals the layer run on that group alone."""
    layer = MoeMlp(8, 16, num_experts=4, router="soft", num_slots=1, group_size=4).eval()
    x = torch.randn(2, 5, 8)
    out = layer(x).reshape(10, 8)
    assert layer.last_plan.valid is not None and not layer.last_plan.valid[2, 2:].any()
    assert torch.all(layer.last_plan.dispatch_weight[2, 2:] == 0)
    tokens = x.reshape(10, 8)
    alone = MoeMlp(8, 16, num_experts=4, router="soft", num_slots=1, group_size=2).eval()
    alone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out[8:], alone(tokens[8:].reshape(1, 2, 8)).reshape(2, 8))
    torch.testing.assert_close(out[:4], layer(tokens[:4].reshape(1, 4, 8)).reshape(4, 8))


def test_prediction_of_an_image_does_not_depend_on_the_batch():
    layer = MoeMlp(8, 16, num_experts=4, router="soft", num_slots=1).eval()  # 1 image per group
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_slots=0), "num_slots must be >= 1"),
        (dict(num_slots=-1), "num_slots must be >= 1"),
        (dict(capacity_factor=0.1, group_size=8), "capacity rounds to 0"),
        (dict(num_slots=1, num_selected=1), "num_selected=1 only applies to sparse routers"),
        (dict(num_slots=1, batch_priority=True), "batch_priority=True only applies to sparse"),
        (dict(num_slots=1, importance_weight=0.01), "importance_weight=0.01 only applies"),
        (
            dict(num_slots=1, load_weight=0.1, gshard_weight=1.0),
            "load_weight=0.1, gshard_weight=1.0 only apply",
        ),
        (dict(num_slots=1, capacity=4), "capacity=4 only applies"),
        (dict(num_slots=1, zloss_weight=0.1), "zloss_weight=0.1 only applies"),
        # given with the sparse default's value: still refused (it was given, so the user meant it)
        (dict(num_slots=1, num_selected=2), "num_selected=2 only applies to sparse routers"),
        (
            dict(num_slots=1, batch_priority=False, dispatcher="auto"),
            "batch_priority=False, dispatcher='auto' only apply",
        ),
        (dict(num_slots=1, capacity=None), "capacity=None only applies"),
    ],
)
def test_bad_soft_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeMlp(8, 16, num_experts=8, router="soft", **kwargs)


def test_num_slots_is_soft_only_and_width_is_checked():
    with pytest.raises(ValueError, match="num_slots=2 only applies to router='soft'"):
        MoeMlp(8, 16, num_experts=4, num_slots=2)
    with pytest.raises(ValueError, match="input width d=6 differs from in_features=8"):
        _tiny()(torch.randn(1, 4, 6))


def test_routing_settings_of_a_soft_layer():
    model = nn.Sequential(_tiny(), MoeMlp(8, 16, num_experts=4, num_selected=1))
    settings = read_routing(model)
    assert settings["0"].to_dict() == dict(
        capacity_factor=None, capacity=2, batch_priority=False, dropless=False
    )
    with pytest.raises(ValueError, match="capacity_factor=4.0 does not apply to a Soft MoE layer"):
        set_routing(model, capacity_factor=4.0)
    assert read_routing(model) == settings  # all or none: the sparse layer is unchanged
    with pytest.raises(ValueError, match="batch_priority=True does not apply"):
        set_routing(model, batch_priority=True)
    with routing_settings({"1": model[1]}, capacity_factor=4.0):
        assert model[1].capacity_factor == 4.0
    assert read_routing(model) == settings


@pytest.mark.parametrize("router", ["soft", "top_k"])
def test_bf16_dispatch_rounds_what_the_experts_see(router):
    kwargs = (
        dict(num_slots=2)
        if router == "soft"
        else dict(num_selected=2, capacity_factor=4.0, dropless=False)  # the buffers' path
    )
    torch.manual_seed(0)
    layer = MoeMlp(
        8, 16, num_experts=4, router=router, bf16_dispatch=True, group_size=5, **kwargs
    ).eval()
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(3, 5, 8)
    rounded = layer(x)
    from vmoe.moe import dispatch

    plan = layer.last_plan
    tokens = x.reshape(plan.num_groups, -1, 8)
    # The experts see the dispatch of the bf16-rounded tokens (slots mixed in float32).
    torch.testing.assert_close(
        seen[0], dispatch(tokens.bfloat16().float(), plan), atol=1e-6, rtol=0
    )
    assert not torch.allclose(seen[0], dispatch(tokens, plan), atol=1e-6, rtol=0)
    layer.bf16_dispatch = False
    exact = layer(x)
    assert 0 < (rounded - exact).abs().max() < 0.05
