"""MoeMlp behaviour: drop-in for timm's Mlp, padding, options, errors, compile and autocast."""

import functools
import math

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

from vmoe.moe import MoeMlp, routing_statistics


def make_layer(**kwargs):
    # the capacity path in eval mode too (these tests are about capacity; dropless inference
    # is tested in test_dropless.py)
    options = dict(num_experts=4, num_selected=2, group_size_images=2)
    if kwargs.get("router", "top_k") == "top_k":
        options.update(dropless=False)
    options.update(kwargs)
    return MoeMlp(16, 32, **options)


def test_index_and_einsum_dispatch_agree_forward_and_backward():
    x = torch.randn(4, 9, 16, requires_grad=True)
    a = make_layer(capacity_factor=0.7).eval()
    b = make_layer(capacity_factor=0.7, dispatcher="einsum").eval()
    b.load_state_dict(a.state_dict())
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    assert a.last_plan.kept.sum() < a.last_plan.kept.numel()  # some tokens were dropped
    ga = torch.autograd.grad((ya * torch.cos(ya)).sum(), [x, *a.parameters()])
    gb = torch.autograd.grad((yb * torch.cos(yb)).sum(), [x, *b.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_upcycled_layer_with_renormalized_weights_equals_dense_mlp():
    dense = Mlp(16, 32)
    layer = make_layer(renormalize=True, capacity_factor=4.0).eval()
    layer.experts.load_from_mlp(dense)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)


def test_padding_tokens_take_no_place_and_do_not_change_full_groups():
    layer = make_layer(batch_priority=True, capacity_factor=0.5).eval()
    x = torch.randn(3, 7, 16)  # 21 tokens, groups of 14 -> second group is half padding
    y = layer(x)
    plan = layer.last_plan
    assert plan.valid is not None and plan.valid.sum() == 21
    assert not plan.kept[~plan.valid].any()
    assert (plan.slot < plan.capacity).all()
    # The first group (images 0 and 1) routes exactly as it would alone.
    torch.testing.assert_close(y[:2], layer(x[:2]))
    # Per expert and group, at most C places are used, each at most once.
    pos = plan.buffer_position()[plan.kept]
    assert pos.unique().numel() == pos.numel()


def test_group_size_in_tokens_and_capacity_from_group():
    layer = make_layer(group_size_images=None, group_size=6, capacity_factor=1.0).eval()
    layer(torch.randn(2, 9, 16))
    plan = layer.last_plan
    assert plan.gates.shape == (3, 6, 4)
    assert plan.capacity == 4  # ceil(6*2*1.0/4) = 3 -> multiple of 4


def test_capacity_and_batch_priority_can_change_after_construction():
    layer = make_layer(capacity_factor=1.05).eval()
    x = torch.randn(4, 10, 16)
    layer(x)
    assert layer.last_plan.capacity == 12  # ceil(20*2*1.05/4) = 11 -> 12
    layer.capacity_factor = 4.0
    layer(x)
    assert layer.last_plan.capacity == 20  # ceil(20*2*4/4) = 40, capped at the group size S=20
    assert routing_statistics(layer.last_plan)["dropped_fraction"] == 0
    layer.capacity_factor, layer.batch_priority = 0.5, True
    y = layer(x)
    assert layer.last_plan.capacity == 8 and layer.router.batch_priority  # ceil(5) -> 8
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="capacity_factor"):
        layer.capacity_factor = 0.0


def test_noise_only_in_training_and_load_loss_only_with_noise():
    layer = make_layer()
    x = torch.randn(2, 8, 16)
    layer.train()
    layer(x)
    g1 = layer.last_plan.gates
    assert set(layer.aux_losses) == {"importance", "gshard", "load"}
    layer(x)
    assert not torch.equal(g1, layer.last_plan.gates)
    layer.eval()
    layer(x)
    g3 = layer.last_plan.gates
    layer(x)
    assert torch.equal(g3, layer.last_plan.gates)
    assert set(layer.aux_losses) == {"importance", "gshard"}
    expected = 0.005 * layer.aux_losses["importance"]
    torch.testing.assert_close(layer.aux_loss, expected)


def test_aux_loss_trains_the_router():
    layer = make_layer(zloss_weight=0.01).train()
    layer.aux_loss_mode = "manual"  # the loop adds aux_loss itself (vmoe.moe.balancing)
    layer(torch.randn(2, 8, 16))
    assert "z" in layer.aux_losses
    layer.aux_loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_expert_choice_layer_balances_load_exactly():
    layer = make_layer(router="expert_choice", capacity_factor=1.0).eval()
    x = torch.randn(4, 8, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    plan = layer.last_plan
    assert plan.capacity == 4  # ceil(16*1.0/4) = 4
    per_expert = torch.zeros(4).index_add_(
        0, plan.expert_index[plan.kept], torch.ones(int(plan.kept.sum()))
    )
    assert per_expert.tolist() == [8.0] * 4  # 2 groups x 4 places, every place used
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dropped_tokens_get_zero_output_and_results_are_deterministic():
    layer = make_layer(num_selected=1, capacity=1, capacity_factor=None).eval()
    x = torch.randn(2, 6, 16)
    y = layer(x)
    kept_any = layer.last_plan.kept.any(-1).view(-1)
    assert (~kept_any).sum() > 0
    assert torch.equal(y.view(-1, 16)[~kept_any], torch.zeros_like(y.view(-1, 16)[~kept_any]))
    assert torch.equal(layer(x), y)


def test_nan_and_inf_inputs_do_not_break_routing():
    layer = make_layer().eval()
    x = torch.randn(2, 8, 16)
    x[0, 0] = float("nan")
    x[1, 3] = float("inf")
    layer(x)
    plan = layer.last_plan
    assert ((plan.expert_index >= 0) & (plan.expert_index < 4)).all()
    assert (plan.slot < plan.capacity).all()
    pos = plan.buffer_position()
    assert (pos >= 0).all() and (pos <= 4 * plan.num_groups * plan.capacity).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_selected=0), "num_selected"),
        (dict(num_selected=5), "num_selected"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(group_size_images=0), "group_size_images"),
        (dict(group_size_images=None, group_size=0), "group_size"),
        (dict(router="softmax"), "router"),
        (dict(dispatcher="dense"), "dispatcher"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_layer(**kwargs)


def test_bad_inputs_name_the_problem():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"\[B, N, d\]"):
        layer(torch.randn(4, 16))
    with pytest.raises(ValueError, match="d=8"):
        layer(torch.randn(2, 4, 8))
    tiny = make_layer(
        num_selected=1, capacity_factor=0.01, capacity_multiple_of=None, capacity_rounding="round"
    )
    with pytest.raises(ValueError, match="capacity rounds to 0"):
        tiny(torch.randn(1, 4, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_router_in_float32(dtype):
    layer = make_layer().eval()
    x = torch.randn(2, 8, 16)
    expected = layer(x)
    plan32 = layer.last_plan
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == torch.float32  # same dtype as the input, like the residual stream
    assert layer.last_plan.gates.dtype == torch.float32
    assert torch.equal(layer.last_plan.slot, plan32.slot)  # same routing decisions as fp32
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_torch_compile_fullgraph_cpu(batch_priority):
    layer = make_layer(batch_priority=batch_priority).eval()
    x = torch.randn(3, 8, 16)
    x[1, 2] = float("nan")  # BPR: non-finite gates queue last, without a graph break
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, equal_nan=True)
    assert compiled.last_plan.capacity == layer.last_plan.capacity


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_training_step_never_reads_tensor_values_on_the_host(router):
    """Forward+backward on fake tensors (shapes only, no data): any ``.item()``, data-dependent
    shape (nonzero, boolean masks) or Python branch on a value would raise here. This is what
    lets the layer run without host syncs and be captured by CUDA graphs (checked on a GPU by
    tests/moe/test_layer_cuda.py)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    extra = dict(num_selected=2, batch_priority=True) if router == "top_k" else {}
    layer = MoeMlp(
        16, 32, num_experts=4, router=router, group_size_images=3, zloss_weight=0.01, **extra
    ).train()  # 4 images of 5 tokens: last group padded
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 5, 16, requires_grad=True)
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        assert y.shape == x.grad.shape == (4, 5, 16)
        assert layer.last_plan.expert_index.shape[:2] == (2, 15)
        with pytest.raises(DataDependentOutputException):
            y.sum().item()  # the mode does catch host reads


def test_same_init_and_independent_init():
    same = make_layer()
    w = same.experts.fc1_weight
    assert all(torch.equal(w[0], w[e]) for e in range(1, 4))
    indep = make_layer(same_init=False)
    w = indep.experts.fc1_weight
    assert not torch.equal(w[0], w[1])
    bound = 1 / math.sqrt(16)
    assert w.abs().max() <= bound


def test_tanh_gelu_experts_follow_act_layer():
    layer = make_layer(act_layer=functools.partial(nn.GELU, approximate="tanh"))
    assert layer.experts.act.approximate == "tanh"
