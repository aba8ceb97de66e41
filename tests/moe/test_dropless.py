"""Dropless inference (eval mode, top-K layers): the same routing as the capacity path when
capacity does not bind (checked against the einsum oracle), each expert on exactly its rows,
batch-independent, selectable through the routing settings; the export-friendly orderings."""

import math

import pytest
import torch

from vmoe.moe import (
    MoeMlp,
    RoutingSettings,
    read_routing,
    routing_settings,
    routing_statistics,
    set_routing,
)
from vmoe.moe.dispatch import einsum_combine, einsum_dispatch
from vmoe.moe.dropless import order_by_expert
from vmoe.moe.routing import _pairwise_descending_order


def layer(**kwargs):
    torch.manual_seed(0)
    options = dict(num_experts=4, num_selected=2, group_size_images=2, capacity_factor=1.05)
    options.update(kwargs)
    m = MoeMlp(16, 32, **options).eval()
    torch.nn.init.normal_(m.experts.fc1_bias)  # every expert different (same_init otherwise)
    torch.nn.init.normal_(m.experts.fc1_weight, std=0.3)
    return m


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_selected=1, batch_priority=True),
        dict(renormalize=True, batch_priority=True),
        dict(score_func="sigmoid", renormalize=True),
        dict(bias_update_rate=1e-3),
    ],
)
def test_dropless_equals_the_einsum_oracle_when_capacity_does_not_bind(options):
    m = layer(**options)
    if m.router.expert_bias is not None:
        m.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(5, 7, 16)  # 35 tokens, groups of 14: the last group half padding
    with torch.no_grad():
        y = m(x)
        plan = m.last_plan
        assert plan.dropless and plan.capacity == plan.group_size
        # every valid assignment kept: nothing dropped, nothing given to padding
        assert torch.equal(plan.kept, plan.valid.unsqueeze(-1).expand_as(plan.kept))
        assert routing_statistics(plan)["dropped_fraction"] == 0
        # the capacity path at C = S (never binds), with the official one-hot einsum dispatch
        with routing_settings(m, capacity_factor=1e9):
            m.dispatcher = "einsum"
            reference = m(x)
            m.dispatcher = "auto"
            capacity_plan = m.last_plan
        assert not capacity_plan.dropless
        assert torch.equal(capacity_plan.kept, plan.kept)
        assert torch.equal(capacity_plan.expert_index, plan.expert_index)
        torch.testing.assert_close(
            capacity_plan.combine_weight, plan.combine_weight, rtol=0, atol=0
        )
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
        # and by hand: the oracle's dispatch -> experts -> combine of the dropless plan itself
        tokens = torch.nn.functional.pad(x.reshape(35, 16), (0, 0, 0, 7)).view(3, 14, 16)
        oracle = einsum_combine(m.experts(einsum_dispatch(tokens, plan)), plan)
        torch.testing.assert_close(
            y, oracle.reshape(42, -1)[:35].view(5, 7, -1), rtol=1e-5, atol=1e-6
        )


def test_an_image_alone_equals_the_same_image_in_any_batch():
    m = layer(capacity_factor=0.5, group_size_images=4)
    x = torch.randn(11, 6, 16)
    with torch.no_grad():
        alone = torch.cat([m(x[i : i + 1]) for i in range(11)])
        for index in (range(11), range(3, 11), range(7), range(10, -1, -1), [4, 4, 1]):
            index = torch.tensor(list(index))
            torch.testing.assert_close(m(x[index]), alone[index], rtol=1e-5, atol=1e-6)
        # the capacity path at the same factor is batch-dependent (tokens compete for places)
        with routing_settings(m, capacity_factor=0.5):
            grouped = m(x)
            assert m.last_plan.kept.sum() < m.last_plan.valid.sum() * 2
            alone_capacity = torch.cat([m(x[i : i + 1]) for i in range(11)])
        assert not torch.allclose(grouped, alone_capacity, atol=1e-3)


def test_each_expert_runs_exactly_its_rows_and_nothing_pads_to_a_group():
    m = layer(group_size_images=8)
    rows = []
    original = m.experts.forward_sorted

    def spy(x, ends, bounds):
        rows.append((x.shape[0], list(bounds)))
        return original(x, ends, bounds)

    m.experts.forward_sorted = spy
    buffers = []
    m.experts.register_forward_hook(lambda mod, args, out: buffers.append(args[0].shape))
    with torch.no_grad():
        m(torch.randn(1, 9, 16))  # one image: 9 tokens of a 72-token group
    ((count, bounds),) = rows
    assert count == 9 * 2 and bounds[0] == 0 and bounds[-1] == 18  # K*T rows, no padding
    assert buffers == []  # no [E, G*C, d] buffer
    counts = torch.bincount(m.last_plan.expert_index[m.last_plan.kept], minlength=4)
    assert [b - a for a, b in zip(bounds, bounds[1:])] == counts.tolist()


def test_training_and_dropless_false_take_the_capacity_path():
    m = layer(capacity_factor=0.5, noise_std=0.0)
    x = torch.randn(4, 7, 16)
    m.train()
    m(x)
    assert not m.last_plan.dropless and m.last_plan.kept.sum() < m.last_plan.kept.numel()
    m.eval()
    assert m.routes_dropless
    with torch.no_grad():
        m(x)
        assert m.last_plan.dropless and bool(m.last_plan.kept.all())
        m.dropless = False
        m(x)
        assert not m.last_plan.dropless and m.last_plan.kept.sum() < m.last_plan.kept.numel()
    built = MoeMlp(16, 32, num_experts=4, router={"name": "top_k", "dropless": False}).eval()
    assert not built.routes_dropless and built.config.router.dropless is False


def test_routing_settings_select_the_path_and_restore_it():
    m = layer()
    ec = MoeMlp(16, 32, num_experts=4, router="expert_choice", capacity_factor=1.0).eval()
    model = torch.nn.ModuleDict({"a": m, "b": ec})
    before = read_routing(model)
    assert before["a"] == RoutingSettings(1.05, None, False, True)
    assert before["b"] == RoutingSettings(1.0, None, False, False)
    with routing_settings(model, capacity_factor=4.0):  # the capacity sweep's setting
        assert not m.dropless and m.capacity_factor == 4.0
        with routing_settings({"a": m}, dropless=True):
            assert m.dropless and m.capacity_factor == 4.0
    assert read_routing(model) == before
    with pytest.raises(ValueError, match="dropless=True does not apply to the expert-choice"):
        set_routing(model, dropless=True)
    assert read_routing(model) == before  # all or none
    soft = MoeMlp(16, 32, num_experts=4, router="soft", num_slots=1)
    with pytest.raises(ValueError, match="dropless=True does not apply to a Soft MoE layer"):
        set_routing({"s": soft}, dropless=True)
    with pytest.raises(ValueError, match="dropless='yes' must be a bool"):
        RoutingSettings(1.0, None, False, "yes")
    # an entry written before the option existed: the router's default (dropless for top-K)
    old = {"capacity_factor": 2.0, "capacity": None, "batch_priority": False}
    assert RoutingSettings.from_dict(old).dropless is None
    m.dropless = False
    from vmoe.moe import restore_routing

    restore_routing({"a": m, "b": ec}, {"a": old, "b": {**old, "capacity_factor": 1.0}})
    assert m.dropless and not ec.dropless and m.capacity_factor == 2.0


def test_dropless_with_bf16_dispatch_and_under_autocast():
    m = layer(bf16_dispatch=True)
    seen = []
    original = m.experts.forward_sorted
    m.experts.forward_sorted = lambda x, ends, bounds: seen.append(x) or original(x, ends, bounds)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(seen[0], seen[0].bfloat16().float())  # the rows were rounded
        with routing_settings(m, capacity_factor=1e9):
            torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert seen[-1].dtype == torch.bfloat16 and out.shape == y.shape
        torch.testing.assert_close(out.float(), y, rtol=0.05, atol=0.05)


def test_pairwise_order_is_the_stable_descending_sort_ties_and_non_finite_included():
    torch.manual_seed(0)
    values = torch.randint(0, 4, (5, 7, 9)).float()  # many ties
    values[0, 0, 3] = math.nan
    values[1, 2, :] = -math.inf
    key = torch.nan_to_num(values, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    for dim in (-1, 1):
        want = torch.sort(key, dim=dim, descending=True, stable=True).indices
        assert torch.equal(_pairwise_descending_order(key, dim), want)


def test_order_by_expert_groups_pairs_stably():
    expert_index = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    position, order, ends = order_by_expert(expert_index, 5)
    flat = expert_index.reshape(-1)
    want = torch.sort(flat, stable=True).indices
    assert torch.equal(order, want)
    assert torch.equal(position[order], torch.arange(8))
    assert ends.tolist() == [3, 5, 7, 8, 8]


def test_evaluation_of_the_routing_report_and_sweep_runs_dropless_by_default():
    import timm

    import vmoe.models  # noqa: F401  (registers the vmoe_* models)
    from vmoe.viz.sweep import evaluate

    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=3)
    data = [(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))]
    result = evaluate(model, data)
    assert result["dropped_fraction"] == 0
    ex = next(iter(vmoe.models.moe_layers(model).values())).experts
    per_row = 2 * (ex.in_features * ex.hidden_features + ex.hidden_features * ex.out_features)
    router = 2 * 17 * ex.in_features * 4  # 17 tokens per image, E = 4
    # 2 MoE layers, K = 2 rows per token, nothing for the padding of the 8-image group
    assert result["moe_flops_per_image"] == 2 * (17 * 2 * per_row + router)
    with routing_settings(model, capacity_factor=0.25):
        assert evaluate(model, data)["dropped_fraction"] > 0


def test_compiled_eval_forward_is_fullgraph_and_equals_the_dropless_forward():
    m = layer()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        want = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
    assert m.last_plan.dropless


def test_dropless_forward_backpropagates_into_experts_router_and_the_aux_loss():
    m = layer()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = m(x)  # eval mode, gradients on (e.g. saliency maps)
    assert m.last_plan.dropless and m.aux_loss.requires_grad is False  # logged detached
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.experts.fc1_weight.grad.abs().sum() > 0
    assert m.router.weight.grad.abs().sum() > 0  # through the combine weights and aux loss
    # the same gradients as the capacity path that never binds
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with routing_settings(m, capacity_factor=1e9):
        m(x).square().sum().backward()
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
