"""Soft MoE models: moeify(router='soft'), upcycling, the registered variants, save/load."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch

import vmoe.models as vm
from vmoe.moe import MoeMlp, SoftRoutingPlan, read_routing


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs})


def test_moeify_soft_with_explicit_and_derived_slots():
    model = vm.moeify(tiny_vit(), last=1, router="soft", num_experts=4, num_slots=2).eval()
    layer = model.blocks[3].mlp
    assert layer.is_soft and layer.num_slots == 2 and layer.group_size_images == 1
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 5)
    plan = layer.last_plan
    assert isinstance(plan, SoftRoutingPlan)
    assert (plan.num_groups, plan.group_size, plan.num_experts, plan.slots_per_expert) == (
        2,
        17,
        4,
        2,
    )
    # From a capacity factor and the model's tokens per image (16 patches + cls = 17):
    # round(17 * 1.0 / 4) = round(4.25) = 4; 2 images per group: round(34 * 1.0 / 8) = 4;
    # round(17 * 1.0 / 2) = round(8.5) = 8 (half to even).
    for kwargs, slots in (
        (dict(num_experts=4), 4),
        (dict(num_experts=8, group_size_images=2), 4),
        (dict(num_experts=2), 8),
    ):
        m = vm.moeify(tiny_vit(), last=1, router="soft", capacity_factor=1.0, **kwargs)
        assert m.blocks[3].mlp.num_slots == slots, kwargs
    with pytest.raises(ValueError, match="capacity rounds to 0"):
        vm.moeify(tiny_vit(), last=1, router="soft", num_experts=64, capacity_factor=1.0)


def test_upcycling_a_dense_vit_to_soft_moe():
    dense = tiny_vit(class_token=False, global_pool="avg").eval()
    moe = vm.moeify(
        copy.deepcopy(dense),
        blocks=[2, 3],
        from_dense=True,
        router="soft",
        num_experts=4,
        num_slots=1,
    ).eval()
    for i in (2, 3):
        experts = moe.blocks[i].mlp.experts
        for e in range(4):
            torch.testing.assert_close(experts.fc1_weight[e], dense.blocks[i].mlp.fc1.weight.t())
            torch.testing.assert_close(experts.fc2_bias[e], dense.blocks[i].mlp.fc2.bias)
    x = torch.randn(2, 3, 16, 16)
    logits = moe(x)
    logits.sum().backward()
    assert moe.blocks[3].mlp.router.mu.grad.abs().sum() > 0
    assert vm.aux_loss(moe).item() == 0.0


def test_soft_variants_are_registered_with_the_paper_architecture():
    names = timm.list_models("soft_moe_*")
    assert set(names) >= {
        "soft_moe_s16_e128",
        "soft_moe_b16_e128",
        "soft_moe_l16_e128",
        "soft_moe_h14_e256",
        "soft_moe_tiny_e8",
    }
    with torch.device("meta"):
        model = timm.create_model("soft_moe_b16_e128")
    layers = vm.moe_layers(model)
    assert list(layers) == [f"blocks.{i}.mlp" for i in range(6, 12)]  # the last half
    assert all(
        m.is_soft
        and m.num_experts == 128
        and m.num_slots == 1
        and m.group_size_images == 1
        and m.noise_std == 0.0
        for m in layers.values()
    )
    assert model.cls_token is None and model.global_pool == "avg"
    assert model.blocks[0].attn.q_norm.bias is None  # official qk-LayerNorm: scale only
    assert model.pretrained_cfg["paper_ids"] == "arXiv:2308.00951"
    with torch.device("meta"):
        h14 = timm.create_model("soft_moe_h14_e256")
    assert list(vm.moe_layers(h14)) == [f"blocks.{i}.mlp" for i in range(16, 32)]
    assert h14.blocks[31].mlp.num_experts == 256 and h14.embed_dim == 1280


def test_tiny_soft_variant_trains_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("soft_moe_tiny_e8", num_classes=10)
    assert torch.allclose(model.head.bias, torch.full((10,), -math.log(10)))
    x = torch.randn(4, 3, 16, 16)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    out = vm.save_pretrained(model, tmp_path / "m", model_card=True)
    card = (out / "README.md").read_text()
    assert "# soft_moe_tiny_e8 (Soft MoE)" in card and "| `blocks.2.mlp` | SoftRouter | 8 |" in card
    config = json.loads((out / "config.json").read_text())
    assert config["routing"]["blocks.2.mlp"] == dict(
        capacity_factor=None, capacity=1, batch_priority=False, dropless=False
    )
    loaded = vm.from_pretrained(out).eval()
    assert torch.equal(loaded(x), model(x))
    via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(via_timm(x), model(x))
    assert read_routing(loaded) == read_routing(model)
    # timm's family features: data config and feature maps (no class token to drop).
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 16, 16)
    features = timm.create_model("soft_moe_tiny_e8", features_only=True)(x)
    assert [tuple(f.shape) for f in features] == [(4, 64, 4, 4)] * 3


def test_moeified_soft_model_round_trip_and_config_checks(tmp_path):
    model = vm.moeify(tiny_vit(), last=2, router="soft", num_experts=4, capacity_factor=1.0).eval()
    out = vm.save_pretrained(model, tmp_path / "m")
    loaded = vm.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.blocks[3].mlp, MoeMlp) and loaded.blocks[3].mlp.num_slots == 4
    # Fine-tuning at another resolution keeps the slots the weights were trained with.
    tuned = vm.from_pretrained(out, img_size=32, num_classes=3)
    assert tuned.blocks[3].mlp.num_slots == 4 and tuned(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # A config that disagrees with the weights' Soft MoE routers is refused before building.
    config = json.loads((out / "config.json").read_text())
    config["moeify"]["layer"]["num_experts"] = 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"num_experts=8 does not match .* routers with \[4\] experts"
    ):
        vm.from_pretrained(out)
    config["moeify"]["layer"]["num_experts"] = 4
    config["routing"]["blocks.3.mlp"]["capacity"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="capacity=3 does not apply to a Soft MoE layer"):
        vm.from_pretrained(out)
