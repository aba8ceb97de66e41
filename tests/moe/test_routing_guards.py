"""Guards of the MoE layer against bad inputs and settings: non-finite gates under BPR, router
noise size and validation, empty batches, the capacity cap at the group size, routing settings
validated wherever they are set."""

import math

import pytest
import timm
import torch

import vmoe.models as vm
from vmoe.moe import ExpertChoiceRouter, MoeMlp, TopKRouter, compute_capacity, routing_statistics

NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def healthy_gates(S, E, seed=0):
    torch.manual_seed(seed)
    return (2 * torch.randn(1, S, E)).softmax(-1)  # [1, S, E]


def with_bad_token(gates, at, value=float("nan")):
    """gates [1, S, E] -> [1, S+1, E] with a token of non-finite gates inserted at ``at``."""
    bad = torch.full_like(gates[:, :1], value)
    return torch.cat([gates[:, :at], bad, gates[:, at:]], dim=1)


# --- 1. Batch Priority Routing with non-finite gates -------------------------------------------
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("at", [0, 5, 11])
@pytest.mark.parametrize("value", NON_FINITE)
def test_bpr_token_with_non_finite_gates_never_takes_a_healthy_place(K, at, value):
    S, E, C = 11, 4, 2  # 11 healthy tokens asking for K places each, 2 places per expert
    torch.manual_seed(0)
    # Expert 0 is every healthy token's second choice and nobody's first: with K = 2 a bad
    # token's first choice (expert 0, as its gates tie) would take a place healthy second
    # choices need unless all its assignments wait for every healthy one.
    logits = 0.3 * torch.randn(1, S, E)
    logits[0, torch.arange(S), 1 + torch.arange(S) % 3] += 3.0
    logits[..., 0] += 2.0
    gates = logits.softmax(-1)
    router = TopKRouter(
        dim=4, num_experts=E, num_selected=K, capacity_factor=None, capacity=C, batch_priority=True
    )
    reference = router.route(gates)
    plan = router.route(with_bad_token(gates, at, value))
    healthy = [s for s in range(S + 1) if s != at]
    assert (reference.slot >= 0).sum() < S * K  # capacity is tight: some assignments dropped
    assert torch.equal(plan.slot[:, healthy], reference.slot)
    assert torch.equal(plan.expert_index[:, healthy], reference.expert_index)
    assert torch.equal(plan.combine_weight[:, healthy], reference.combine_weight)
    assert ((plan.expert_index >= 0) & (plan.expert_index < E)).all()
    assert ((plan.slot >= -1) & (plan.slot < C)).all()
    # The bad token only gets places nobody healthy wanted: after every healthy one.
    for k in range(K):
        e, slot = int(plan.expert_index[0, at, k]), int(plan.slot[0, at, k])
        if slot >= 0:
            taken = reference.slot[(reference.expert_index == e) & (reference.slot >= 0)]
            assert slot == len(taken)


def test_bpr_layer_output_of_healthy_tokens_ignores_a_nan_token():
    """End to end: a NaN token at the end of a group changes nothing for the other tokens (they
    route and compute exactly as when that token is padding)."""
    torch.manual_seed(0)
    layer = MoeMlp(
        16,
        32,
        num_experts=4,
        num_selected=2,
        group_size=12,
        capacity=2,
        capacity_factor=None,
        batch_priority=True,
        dropless=False,  # the capacity path in eval mode
    ).eval()
    x = torch.randn(1, 12, 16)
    x[0, 11] = float("nan")
    y = layer(x)
    plan = layer.last_plan
    expected = layer(x[:, :11])  # the same group with the last token as padding
    torch.testing.assert_close(y[:, :11], expected, rtol=0, atol=0)
    assert torch.equal(plan.slot[0, :11], layer.last_plan.slot[0, :11])


def test_expert_choice_picks_tokens_with_non_finite_gates_last():
    S, E, C = 11, 4, 3
    gates = healthy_gates(S, E, seed=1)
    router = ExpertChoiceRouter(dim=4, num_experts=E, capacity_factor=None, capacity=C)
    reference = router.route(gates)
    plan = router.route(with_bad_token(gates, 0))
    assert torch.equal(plan.slot[:, 1:], reference.slot)
    assert (plan.slot[:, 0] == -1).all()  # every expert has C healthy tokens it prefers


def test_top_k_selection_never_prefers_a_nan_gate():
    gates = torch.tensor([[[0.2, float("nan"), 0.5, 0.3]]])
    plan = TopKRouter(dim=4, num_experts=4, num_selected=2, capacity=4, capacity_factor=None).route(
        gates
    )
    assert plan.expert_index[0, 0].tolist() == [2, 3]


# --- 2. noise_std validation -------------------------------------------------------------------
BAD_NOISE = [float("nan"), float("inf"), -1.0, "1.0", True, None]


@pytest.mark.parametrize("value", BAD_NOISE)
def test_noise_std_must_be_a_finite_number_at_least_zero(value):
    match = f"noise_std={value!r} must be a finite number >= 0"
    for build in (
        lambda: TopKRouter(4, 4, noise_std=value),
        lambda: ExpertChoiceRouter(4, 4, noise_std=value),
        lambda: MoeMlp(16, num_experts=4, noise_std=value),
        lambda: MoeMlp(16, num_experts=4, router="expert_choice", noise_std=value),
    ):
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
            build()
    layer = MoeMlp(16, num_experts=4)
    for target in (layer, layer.router):
        with pytest.raises(ValueError, match="noise_std="):
            target.noise_std = value
    assert layer.noise_std == layer.router.noise_std == 1.0  # unchanged
    layer.noise_std = 0.0  # a valid value goes through
    assert layer.router.noise_std == 0.0 and not layer.train().router.adds_noise


# --- 3. router noise size: std noise_std / E -----------------------------------------------------
@pytest.mark.parametrize("noise_std, E", [(1.0, 8), (0.5, 4)])
def test_router_training_noise_has_std_noise_std_over_num_experts(noise_std, E):
    torch.manual_seed(0)
    router = TopKRouter(dim=16, num_experts=E, noise_std=noise_std).train()
    x = torch.randn(4, 4096, 16)
    with torch.no_grad():
        clean, noisy = router.gating_logits(x)
        eval_logits, _ = router.eval().gating_logits(x)
    assert torch.equal(clean, eval_logits)
    noise = noisy - eval_logits
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01 * noise_std / E)
    assert float(noise.std()) == pytest.approx(noise_std / E, rel=0.1)


def test_layer_training_gates_carry_noise_of_std_noise_std_over_num_experts():
    """Through the layer's forward: log(train gates) - log(eval gates) is the noise minus a
    per-token constant; centred over the E experts its variance is (noise_std/E)^2 (1 - 1/E)."""
    torch.manual_seed(0)
    E, noise_std = 4, 2.0
    layer = MoeMlp(16, 32, num_experts=E, num_selected=1, noise_std=noise_std, group_size=512)
    x = torch.randn(16, 512, 16)
    layer.train()(x)
    train_log = layer.last_plan.gates.log()
    layer.eval()(x)
    diff = train_log - layer.last_plan.gates.log()
    centred = diff - diff.mean(-1, keepdim=True)
    std = float(centred.pow(2).mean().sqrt()) / math.sqrt(1 - 1 / E)
    assert std == pytest.approx(noise_std / E, rel=0.1)


# --- 4. empty batch -----------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_an_empty_output_like_timm_mlp(router, training):
    layer = MoeMlp(16, 32, num_experts=4, router=router).train(training)
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 16) and y.dtype == x.dtype
    assert float(layer.aux_loss.detach()) == 0.0
    assert all(float(v.detach()) == 0.0 for v in layer.aux_losses.values())
    if router == "top_k":
        assert "importance" in layer.aux_losses
    assert layer.last_plan.num_groups == 0
    assert math.isnan(float(routing_statistics(layer.last_plan)["dropped_fraction"]))
    (y.sum() + layer.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.experts.fc1_weight.grad is not None and not layer.experts.fc1_weight.grad.any()


def test_empty_batch_through_a_vmoe_model():
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).train()
    out = model(torch.randn(0, 3, 16, 16))
    assert out.shape == (0, 10)
    (out.sum() + vm.aux_loss(model)).backward()


# --- 5. capacity capped at the group size -------------------------------------------------------
def test_huge_capacity_factor_is_capped_at_the_group_size():
    S, E, K = 20, 4, 2
    huge = TopKRouter(dim=16, num_experts=E, num_selected=K, capacity_factor=1e9)
    assert compute_capacity(S * K, E, 1e9) > 10**9  # the official formula is unchanged
    assert huge.capacity_for(S) == S
    assert (
        TopKRouter(dim=16, num_experts=E, capacity_factor=None, capacity=10**6).capacity_for(S) == S
    )
    assert TopKRouter(dim=16, num_experts=E, capacity=7, capacity_factor=None).capacity_for(S) == 7
    assert ExpertChoiceRouter(dim=16, num_experts=E, capacity_factor=1e9).capacity_for(S) == S


@pytest.mark.parametrize("batch_priority", [False, True])
def test_never_drop_factor_routes_like_the_smallest_no_drop_factor(batch_priority):
    torch.manual_seed(0)
    kwargs = dict(num_experts=4, num_selected=2, group_size_images=2, batch_priority=batch_priority)
    huge = MoeMlp(16, 32, capacity_factor=1e9, **kwargs).eval()
    exact = MoeMlp(16, 32, capacity_factor=2.0, capacity_multiple_of=None, **kwargs).eval()  # C = S
    exact.load_state_dict(huge.state_dict())
    x = torch.randn(4, 10, 16)
    y_huge, y_exact = huge(x), exact(x)
    S, G = 20, 2
    assert huge.last_plan.capacity == exact.last_plan.capacity == S
    assert huge.last_plan.buffer_assignment().numel() == 4 * G * S  # E*G*S rows, not E*G*S*K*1e9/E
    assert torch.equal(huge.last_plan.slot, exact.last_plan.slot)
    assert (huge.last_plan.slot >= 0).all()  # nothing dropped
    torch.testing.assert_close(y_huge, y_exact, rtol=0, atol=0)


def test_expert_choice_capacity_above_group_size_takes_every_token():
    layer = MoeMlp(
        16, 32, num_experts=4, router="expert_choice", capacity_factor=1e9, group_size_images=1
    ).eval()
    layer(torch.randn(3, 5, 16))  # 3 images of 5 tokens, groups of 5
    plan = layer.last_plan
    assert plan.capacity == 5 and (plan.slot >= 0).all()


# --- 6. routing settings validated where they enter ----------------------------------------------
BAD_CAPACITY = [0, -3, 2.5, "8", True]
BAD_FACTOR = [0, 0.0, -1.0, float("nan"), float("inf"), "4.0", True]
BAD_BPR = ["false", 1, 0, None, 1.0]


def _escaped(text):
    return text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(".", r"\.")


@pytest.mark.parametrize("router_cls", [TopKRouter, ExpertChoiceRouter])
@pytest.mark.parametrize("value", BAD_CAPACITY)
def test_capacity_must_be_none_or_an_integer_at_least_one(router_cls, value):
    match = _escaped(f"capacity={value!r} must be None or an integer >= 1")
    with pytest.raises(ValueError, match=match):
        router_cls(dim=4, num_experts=4, capacity=value)
    router = router_cls(dim=4, num_experts=4)
    with pytest.raises(ValueError, match=match):
        router.capacity = value  # e.g. a config.json routing entry, assigned directly
    assert router.capacity is None
    with pytest.raises(ValueError, match=match):
        MoeMlp(16, num_experts=4, capacity=value)


@pytest.mark.parametrize("value", BAD_FACTOR)
def test_capacity_factor_must_be_a_finite_number_above_zero(value):
    match = _escaped(f"capacity_factor={value!r} must be a finite number > 0")
    with pytest.raises(ValueError, match=match):
        TopKRouter(dim=4, num_experts=4, capacity_factor=value)
    layer = MoeMlp(16, num_experts=4)
    for target in (layer, layer.router):
        with pytest.raises(ValueError, match=match):
            target.capacity_factor = value
    assert layer.capacity_factor == 1.05


def test_capacity_factor_none_needs_an_explicit_capacity():
    with pytest.raises(ValueError, match="capacity_factor=None must be a finite number > 0"):
        MoeMlp(16, num_experts=4).capacity_factor = None
    router = TopKRouter(dim=4, num_experts=4, capacity=8, capacity_factor=None)
    # The settings are replaced all at once (RoutingSettings), so the router's config refuses a
    # state without either and keeps the one it has.
    with pytest.raises(ValueError, match="give capacity_factor or capacity, got neither"):
        router.capacity = None
    assert router.capacity == 8 and router.capacity_for(16) == 8


@pytest.mark.parametrize("value", BAD_BPR)
def test_batch_priority_must_be_a_bool(value):
    match = _escaped(f"batch_priority={value!r} must be a bool")
    with pytest.raises(ValueError, match=match):
        TopKRouter(dim=4, num_experts=4, batch_priority=value)
    with pytest.raises(ValueError, match=match):
        MoeMlp(16, num_experts=4, batch_priority=value)
    layer = MoeMlp(16, num_experts=4)
    for target in (layer, layer.router):
        with pytest.raises(ValueError, match=match):
            target.batch_priority = value
    assert layer.batch_priority is False


def test_expert_choice_router_refuses_batch_priority():
    router = ExpertChoiceRouter(dim=4, num_experts=4)
    with pytest.raises(ValueError, match="batch_priority=True does not apply"):
        router.batch_priority = True
    router.batch_priority = False


def test_set_routing_checks_every_value_before_changing_anything():
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10)
    layers = vm.moe_layers(model)
    before = {
        n: (m.router.capacity_factor, m.router.capacity, m.router.batch_priority)
        for n, m in layers.items()
    }
    for kwargs, match in [
        (dict(capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
        (dict(capacity_factor=2.0, batch_priority="no"), "batch_priority='no'"),
    ]:
        with pytest.raises(ValueError, match=match):
            vm.set_routing(model, **kwargs)
        assert before == {
            n: (m.router.capacity_factor, m.router.capacity, m.router.batch_priority)
            for n, m in layers.items()
        }
    first = next(iter(layers))
    layers[first].router = ExpertChoiceRouter(layers[first].router.dim, 4)
    with pytest.raises(ValueError, match=f"expert-choice layers \\['{first}'\\]"):
        vm.set_routing(model, capacity_factor=2.0, batch_priority=True)
    assert all(m.router.capacity_factor == before[n][0] for n, m in layers.items() if n != first)


def test_restore_routing_validates_the_settings():
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10)
    name = next(iter(vm.moe_layers(model)))
    with pytest.raises(ValueError, match="capacity=0 must be None or an integer >= 1"):
        vm.restore_routing(
            model, {name: {"capacity_factor": 1.0, "capacity": 0, "batch_priority": False}}
        )
    with pytest.raises(ValueError, match="unknown MoE layers"):
        vm.restore_routing(
            model,
            {"blocks.0.attn": {"capacity_factor": 1.0, "capacity": None, "batch_priority": False}},
        )


# --- 7. padding tokens take no place in the buffers ---------------------------------------------
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("where", ["end", "interleaved"])
def test_padding_tokens_do_not_take_places_of_valid_tokens(batch_priority, where):
    """A half-padded group (K=2, capacity 2 for 8 valid assignments over 4 experts): the valid
    tokens get exactly the slots they get when routed alone, without the padding (whose first
    choices would otherwise queue before the valid tokens' second choices)."""
    S, E = 8, 4
    router = TopKRouter(
        dim=16,
        num_experts=E,
        num_selected=2,
        capacity_factor=None,
        capacity=2,
        batch_priority=batch_priority,
    )
    gates = healthy_gates(S, E, seed=3)
    valid = torch.zeros(1, S, dtype=torch.bool)
    valid[:, : S // 2] = True if where == "end" else False
    if where == "interleaved":
        valid[:, 1::2] = True
    padded = router.route(gates, valid)
    alone = router.route(gates[:, valid[0]])
    assert (alone.slot[..., 1] >= 0).any() and (
        alone.slot < 0
    ).any()  # second choices kept, some dropped
    assert torch.equal(padded.slot[:, valid[0]], alone.slot)
    assert torch.equal(padded.combine_weight[:, valid[0]], alone.combine_weight)
    assert (padded.slot[:, ~valid[0]] == -1).all()
