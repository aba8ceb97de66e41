"""moeify with a MoeLayerConfig / MoeifyConfig, the nested moeify recipe of config.json format
2, and the merging of a vmoe factory's MoE options with the user's."""

import json

import pytest
import timm
import torch

import vmoe.models as vm
from vmoe.models.moeify import MoeifyConfig, merge_moe_options, nested_moe_options
from vmoe.moe.config import MoeLayerConfig, SoftRouterConfig, TopKRouterConfig

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def dense():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY)


def test_config_flat_options_and_moeify_config_build_the_same_layers():
    config = MoeLayerConfig(
        num_experts=4, router=TopKRouterConfig(num_selected=1, batch_priority=True)
    )
    by_config = vm.moeify(dense(), blocks=[1], config=config)
    by_options = vm.moeify(dense(), blocks=[1], num_experts=4, num_selected=1, batch_priority=True)
    by_nested = vm.moeify(
        dense(),
        blocks=[1],
        num_experts=4,
        router=dict(name="top_k", num_selected=1, batch_priority=True),
    )
    by_moeify_config = MoeifyConfig(blocks=(1,), layer=config).apply(dense())
    for model in (by_options, by_nested, by_moeify_config):
        assert model.blocks[1].mlp.config == by_config.blocks[1].mlp.config
        assert model.vmoe_moe == by_config.vmoe_moe
    # keyword options change a given config
    changed = vm.moeify(dense(), blocks=[1], config=config, capacity_factor=2.0)
    assert changed.blocks[1].mlp.config.router == config.router.replace(capacity_factor=2.0)


def test_config_json_version_2_stores_the_nested_recipe(tmp_path):
    model = vm.moeify(
        dense(), last=1, num_experts=4, router="soft", capacity_factor=0.5, drop=0.1
    ).eval()
    config = json.loads((vm.save_pretrained(model, tmp_path / "m") / "config.json").read_text())
    assert config["version"] == 2
    recipe = config["moeify"]
    assert (
        set(recipe) == {"blocks", "layer", "drop"}
        and recipe["blocks"] == [1]
        and recipe["drop"] == 0.1
    )
    # the derived slots are stored: P = round(17 tokens * 0.5 / 4) = 2
    assert recipe["layer"]["router"] == SoftRouterConfig(num_slots=2, capacity_factor=0.5).to_dict()
    assert (
        MoeLayerConfig.from_dict(recipe["layer"]).replace(group_size_images=1)
        == model.blocks[1].mlp.config
    )
    loaded = vm.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x)) and loaded.blocks[1].mlp.experts.drop1.p == 0.1


def test_a_variants_moe_options_are_stored_nested(tmp_path):
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=3, moe=dict(capacity_factor=1.5))
    config = json.loads((vm.save_pretrained(model, tmp_path / "v") / "config.json").read_text())
    assert config["model_args"]["moe"] == {"router": {"capacity_factor": 1.5}}
    loaded = vm.from_pretrained(tmp_path / "v")
    assert {m.config.router.capacity_factor for m in vm.moe_layers(loaded).values()} == {1.5}


def test_moeify_twice_with_other_options_cannot_be_saved(tmp_path):
    model = vm.moeify(dense(), blocks=[0], num_experts=4)
    vm.moeify(model, blocks=[1], num_experts=2, num_selected=1)
    with pytest.raises(
        ValueError, match=r"moeify was called more than once with different MoE options"
    ):
        vm.save_pretrained(model, tmp_path / "m")
    same = vm.moeify(vm.moeify(dense(), blocks=[0], num_experts=4), blocks=[1], num_experts=4)
    assert vm.save_pretrained(same, tmp_path / "ok").is_dir() and same.vmoe_moe["blocks"] == [0, 1]


def test_merging_a_factorys_options_with_the_users():
    base = dict(every=2, num_experts=4, num_selected=2, capacity_factor=1.05, group_size_images=8)
    assert merge_moe_options(
        base, dict(blocks=[1], group_size=32, router=dict(capacity_factor=2.0))
    ) == {
        "blocks": [1],
        "num_experts": 4,
        "group_size": 32,
        "router": {"num_selected": 2, "capacity_factor": 2.0},
    }
    # naming another router drops the base router's options
    assert merge_moe_options(base, dict(router="soft", num_slots=1))["router"] == {
        "name": "soft",
        "num_slots": 1,
    }
    assert nested_moe_options(dict(router="soft", num_slots=1, num_experts=8)) == {
        "num_experts": 8,
        "router": {"name": "soft", "num_slots": 1},
    }
    with pytest.raises(
        ValueError, match=r"moe.num_slots: give the router options inside moe.router"
    ):
        nested_moe_options(dict(router=dict(name="soft"), num_slots=1))


def test_a_variant_takes_another_placement():
    model = timm.create_model("soft_moe_tiny_e8", moe=dict(blocks=[1]))  # the variant's: [2, 3]
    assert list(vm.moe_layers(model)) == ["blocks.1.mlp"]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(last=1, every=2, num_experts=4), r"model.moe: give exactly one of"),
        (dict(last=0, num_experts=4), r"model.moe.last=0 must be an int >= 1"),
        (dict(blocks="1", num_experts=4), r"model.moe.blocks='1' must be a non-empty list"),
        (dict(last=1, drop=1.5), r"model.moe.drop=1.5 must be a dropout probability"),
        (
            dict(last=1, router_init_std=0.0),
            r"model.moe.router_init_std=0.0 must be a finite number > 0",
        ),
        (dict(last=1, from_dense=True), r"model.moe.from_dense: not an option here"),
        (
            dict(last=1, router=dict(name="soft", num_selected=1)),
            r"model.moe.router.num_selected: not an option of router 'soft'",
        ),
        ([1, 2], r"model.moe must be a mapping"),
    ],
)
def test_moeify_config_names_bad_input(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoeifyConfig.from_dict(options)


def test_moeify_config_round_trips_through_its_dict():
    config = MoeifyConfig.from_dict(
        dict(last=2, num_experts=4, drop=[0.1, 0.2], router="soft", num_slots=2)
    )
    assert config.drop == (0.1, 0.2) and config.layer.router == SoftRouterConfig(num_slots=2)
    assert MoeifyConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert config.replace(every=2).every == 2 and config.replace(every=2).last is None


def test_a_flat_expert_choice_next_to_a_familys_top_k_options_saves_and_loads(tmp_path):
    # the flat form ignores top-K options for an expert-choice layer (as before the typed
    # configs); the nested form stored in config.json leaves them out
    model = timm.create_model(
        "vmoe_tiny_e4_k2",
        num_classes=3,
        moe=dict(router="expert_choice", num_selected=1, capacity_factor=0.75),
    ).eval()
    config = json.loads((vm.save_pretrained(model, tmp_path / "e") / "config.json").read_text())
    assert config["model_args"]["moe"] == {
        "router": {"name": "expert_choice", "capacity_factor": 0.75}
    }
    loaded = vm.from_pretrained(tmp_path / "e").eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))
    # a misspelt option is kept (and refused), not dropped
    assert (
        nested_moe_options(dict(router="expert_choice", num_selcted=1))["router"]["num_selcted"]
        == 1
    )
