"""Shared experts (DeepSeek-MoE; Qwen-MoE's sigmoid gate): layer output = shared MLP (x gate) +
routed output, by hand; upcycling starts the shared part as the dense MLP; the new options go
through moeify, timm's create_model, vmoe fit's model_kwargs and save/load; bad input."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp

import vmoe.models as vm
from vmoe.models.model_card import _routing_rows
from vmoe.moe import MoeMlp, moe_layers, update_expert_biases
from vmoe.train import build_model
from vmoe.viz.report import _model_info


def routed_copy(layer):
    """The same layer without its shared experts (same router and experts)."""
    options = dict(
        num_experts=4, num_selected=2, group_size=5, capacity_factor=0.5, capacity_multiple_of=None
    )
    plain = MoeMlp(8, 16, dropless=layer.dropless, **options)
    plain.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")}
    )
    return plain.eval()


@pytest.mark.parametrize("gate", [False, True])
def test_output_is_the_shared_mlp_plus_the_routed_output(gate):
    torch.manual_seed(0)
    layer = MoeMlp(
        8,
        16,
        num_experts=4,
        num_selected=2,
        group_size=5,
        capacity_factor=0.5,
        capacity_multiple_of=None,
        shared_experts=2,
        shared_gate=gate,
        dropless=False,  # the capacity path in eval mode: some tokens are dropped
    ).eval()
    shared = layer.shared
    assert shared.fc1.weight.shape == (32, 8)  # default width: 2 experts x 16
    if gate:
        torch.nn.init.normal_(shared.gate.weight)  # (zero init: a constant 1/2)
    x = torch.randn(3, 5, 8)
    dense = (
        F.gelu(x @ shared.fc1.weight.T + shared.fc1.bias) @ shared.fc2.weight.T + shared.fc2.bias
    )
    if gate:
        dense = torch.sigmoid(x @ shared.gate.weight.T) * dense
    want = routed_copy(layer)(x) + dense
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)
    assert layer.last_plan.kept.sum() < layer.last_plan.kept.numel()  # the routed part drops some
    out = layer(x)
    out.sum().backward()
    assert shared.fc1.weight.grad.abs().sum() > 0 and (
        not gate or shared.gate.weight.grad.abs().sum() > 0
    )


def test_the_shared_gate_starts_at_weight_zero_so_the_shared_output_is_halved():
    """A new gated layer, its reset, a vmoe_* factory model and a moeified ViT: gate weight 0,
    output = routed + shared / 2 (the upcycled model: test_upcycled_shared_and_routed_...)."""
    torch.manual_seed(0)
    layer = MoeMlp(
        8,
        16,
        num_experts=4,
        num_selected=2,
        group_size=5,
        capacity_factor=0.5,
        capacity_multiple_of=None,
        shared_experts=2,
        shared_gate=True,
    ).eval()
    shared = layer.shared
    assert torch.equal(shared.gate.weight, torch.zeros(1, 8))
    x = torch.randn(3, 5, 8)
    ungated = shared.fc2(shared.act(shared.fc1(x)))
    assert ungated.abs().max() > 0.1
    torch.testing.assert_close(layer(x), routed_copy(layer)(x) + ungated / 2, atol=1e-6, rtol=1e-5)
    torch.nn.init.normal_(shared.gate.weight)
    shared.reset_parameters(std=0.02)
    assert torch.equal(shared.gate.weight, torch.zeros(1, 8))
    factory = timm.create_model(
        "vmoe_tiny_e4_k2", num_classes=10, moe=dict(shared_experts=1, shared_gate=True)
    )
    moeified = vm.moeify(
        timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5),
        every=2,
        num_experts=4,
        shared_experts=1,
        shared_gate=True,
    )
    for model in (factory, moeified):
        layers = moe_layers(model)
        assert layers
        for layer in layers.values():
            gate = layer.shared.gate.weight
            assert torch.equal(gate, torch.zeros_like(gate))


def test_shared_width_and_empty_batch():
    layer = MoeMlp(8, 16, num_experts=4, shared_experts=1, shared_hidden_features=24)
    assert layer.shared.hidden_features == 24
    assert layer(torch.randn(0, 5, 8)).shape == (0, 5, 8)
    assert MoeMlp(8, 16, num_experts=4).shared is None


@pytest.mark.parametrize(
    "options",
    [
        dict(shared_experts=1),
        dict(shared_experts=2),
        dict(shared_experts=1, shared_hidden_features=3 * 768),
        dict(shared_experts=1, shared_gate=True),
        dict(shared_experts=2, shared_gate=True),
    ],
)
def test_upcycled_shared_and_routed_parts_each_start_as_half_the_dense_mlp(options):
    """The split rule: the experts compute mlp(x) / 2 (fc2 halved); the shared MLP mlp(x) / 2
    ungated, or mlp(x) gated (times its zero-init gate, 1/2)."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5)
    mlps = [copy.deepcopy(block.mlp) for block in dense.blocks]
    moe = vm.upcycle(dense, every=1, num_experts=4, **options)
    gated = options.get("shared_gate", False)
    x = torch.randn(2, 7, 192)
    for layer, mlp in zip(moe_layers(moe).values(), mlps):
        assert isinstance(mlp, Mlp) and layer.shared.hidden_features in (768, 2 * 768, 3 * 768)
        shared = layer.shared
        if gated:
            assert torch.equal(shared.gate.weight, torch.zeros(1, 192))
            ungated = shared.fc2(shared.act(shared.fc1(x)))
            torch.testing.assert_close(ungated, mlp(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared(x), mlp(x) / 2, atol=1e-5, rtol=1e-5)
        experts = layer.experts(x.reshape(1, 14, 192).expand(4, 14, 192))  # [E, 14, d]
        torch.testing.assert_close(experts, (mlp(x) / 2).reshape(1, 14, 192).expand_as(experts))


@pytest.mark.parametrize("shared_experts", [1, 2])
@pytest.mark.parametrize("gate", [False, True])
def test_upcycled_model_with_shared_experts_computes_the_dense_model(shared_experts, gate):
    """renormalize=True, nothing dropped, no noise: the upcycled ViT's logits are the dense
    ViT's, with gated and ungated shared experts (today's main: 2x resp. 1.5x the dense MLP)."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    want = dense(x)
    moe = vm.upcycle(
        copy.deepcopy(dense),
        every=1,
        num_experts=4,
        num_selected=2,
        renormalize=True,
        capacity_factor=1e9,
        noise_std=0.0,
        shared_experts=shared_experts,
        shared_gate=gate,
    )
    for mode in (moe.eval(), moe.train()):
        torch.testing.assert_close(mode(x), want, atol=1e-5, rtol=1e-5)
    for layer in moe_layers(moe).values():  # nothing dropped (the padding of the group aside)
        plan = layer.last_plan
        assert plan.kept[plan.valid].all() and (plan.valid.sum() == 2 * 5)


def test_upcycling_refuses_a_width_that_is_not_a_multiple_of_the_dense_width():
    dense = timm.create_model(
        "vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5
    )  # width 768
    message = "shared_hidden_features=1000 must be a multiple of the dense MLP's width 768"
    with pytest.raises(ValueError, match=message):
        vm.moeify(
            dense,
            every=2,
            from_dense=True,
            num_experts=4,
            shared_experts=1,
            shared_hidden_features=1000,
        )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shared_experts=-1), "shared_experts must be >= 0"),
        (dict(shared_hidden_features=32), "shared_hidden_features=32 needs shared_experts >= 1"),
        (dict(shared_experts=1, shared_hidden_features=0), "shared_hidden_features must be >= 1"),
        (dict(shared_gate=True), "shared_gate=True needs shared_experts >= 1"),
        (dict(shared_experts=1, shared_gate="yes"), "shared_gate='yes' must be a bool"),
    ],
)
def test_bad_shared_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MoeMlp(8, 16, num_experts=4, **options)


NEW_OPTIONS = dict(
    score_func="sigmoid",
    renormalize=True,
    bias_update_rate=1e-2,
    shared_experts=1,
    shared_gate=True,
)


def check_new_options(model):
    layers = moe_layers(model)
    assert layers
    for layer in layers.values():
        assert layer.router.score_func == "sigmoid" and layer.router.bias_update_rate == 1e-2
        assert layer.shared is not None and layer.shared.gate is not None


def trained_a_little(model):
    """Non-trivial biases and gate weights."""
    model.train()
    for _ in range(3):
        model(torch.randn(2, 3, *model.patch_embed.img_size))
        update_expert_biases(model)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.shared.gate.weight.normal_()
    return model.eval()


def test_timm_variant_merges_the_options_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10, moe=dict(NEW_OPTIONS))
    assert all(
        m.num_experts == 4 and m.router.num_selected == 2 for m in moe_layers(model).values()
    )
    check_new_options(model)
    trained_a_little(model)
    biases = [m.router.expert_bias.clone() for m in moe_layers(model).values()]
    assert all(b.abs().sum() > 0 for b in biases)
    vm.save_pretrained(model, tmp_path / "m")
    card = "\n".join(_routing_rows(model))  # the model card's routing table
    assert "sigmoid scores, bias balancing (rate 0.01), shared experts (width 128, gated)" in card
    info = _model_info(model, moe_layers(model))["moe_layers"][
        "blocks.1.mlp"
    ]  # the routing report's
    assert info["score_func"] == "sigmoid" and info["shared_hidden_features"] == 128
    assert info["expert_bias"] == pytest.approx(biases[0].tolist(), abs=1e-6)
    loaded = vm.from_pretrained(tmp_path / "m").eval()
    check_new_options(loaded)
    for b, m in zip(biases, moe_layers(loaded).values()):
        assert torch.equal(m.router.expert_bias, b)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


def test_moeified_model_and_vmoe_fit_model_kwargs_take_the_options(tmp_path):
    torch.manual_seed(0)
    model = vm.moeify(
        timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5),
        every=2,
        num_experts=4,
        **NEW_OPTIONS,
    )
    check_new_options(model)
    trained_a_little(model)
    vm.save_pretrained(model, tmp_path / "moeified")
    loaded = vm.from_pretrained(tmp_path / "moeified").eval()
    check_new_options(loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    # vmoe fit: --model.model_kwargs '{"moe": {...}}' and model.moe on a dense ViT
    check_new_options(
        build_model(
            model_name="vmoe_tiny_e4_k2", num_classes=10, model_kwargs={"moe": dict(NEW_OPTIONS)}
        )
    )
    check_new_options(
        build_model(
            model_name="vit_tiny_patch16_224",
            num_classes=5,
            img_size=32,
            model_kwargs=dict(depth=2),
            moe=dict(every=2, **NEW_OPTIONS),
        )
    )
