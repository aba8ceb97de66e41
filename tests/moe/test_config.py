"""The typed MoE options (vmoe.moe.config): nested, flat and constructor forms agree, round trips,
bad input named by its path, and ``layer.config`` following the evaluation settings."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from vmoe.moe import (
    ROUTER_CONFIGS,
    ExpertChoiceRouter,
    ExpertChoiceRouterConfig,
    MoeLayerConfig,
    MoeMlp,
    SoftRouter,
    SoftRouterConfig,
    TopKRouter,
    TopKRouterConfig,
    read_routing,
    router_config,
    routing_settings,
    set_routing,
)

FORMS = {
    "top_k": (
        dict(
            num_experts=4,
            num_selected=2,
            capacity_factor=0.5,
            batch_priority=True,
            group_size_images=2,
            renormalize=True,
        ),
        dict(
            num_experts=4,
            group_size_images=2,
            router=dict(
                name="top_k",
                num_selected=2,
                capacity_factor=0.5,
                batch_priority=True,
                renormalize=True,
            ),
        ),
    ),
    "expert_choice": (
        dict(num_experts=4, router="expert_choice", capacity=3, group_size=6),
        dict(num_experts=4, group_size=6, router=dict(name="expert_choice", capacity=3)),
    ),
    "soft": (
        dict(num_experts=4, router="soft", num_slots=2, bf16_dispatch=True),
        dict(num_experts=4, bf16_dispatch=True, router=dict(name="soft", num_slots=2)),
    ),
}


def _built(seed, **kwargs):
    torch.manual_seed(seed)
    return MoeMlp(8, 16, **kwargs).eval()


@pytest.mark.parametrize("name", FORMS)
def test_nested_flat_and_typed_forms_build_the_same_layer(name):
    flat, nested = FORMS[name]
    typed = MoeLayerConfig.from_dict(nested)
    assert MoeLayerConfig.from_dict(flat) == typed
    layers = [_built(0, **flat), _built(0, config=nested), _built(0, config=typed)]
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
    states = [layer.state_dict() for layer in layers]
    for out, state in zip(outs[1:], states[1:]):
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in states[0].items()}
        assert torch.equal(out, outs[0])
    assert all(layer.config == layers[0].config for layer in layers)
    assert type(layers[0].router.config) is ROUTER_CONFIGS[name]


def test_defaults_and_router_defaults():
    layer = MoeMlp(8, 16)
    assert layer.config == MoeLayerConfig(group_size_images=8)  # the default resolved
    assert layer.num_experts == 8 and layer.router.num_selected == 2
    assert layer.capacity_factor == 1.05 and layer.noise_std == 1.0
    soft = MoeMlp(8, 16, num_experts=4, router="soft", num_slots=1)
    assert soft.group_size_images == 1 and soft.noise_std == 0.0 and soft.is_soft
    assert ExpertChoiceRouterConfig().capacity_factor == 1.05
    assert [c.default_group_size_images for c in ROUTER_CONFIGS.values()] == [8, 8, 1]


@pytest.mark.parametrize(
    "config",
    [
        TopKRouterConfig(
            num_selected=1,
            capacity=None,
            capacity_factor=2.0,
            capacity_rounding="round",
            zloss_weight=0.01,
            dispatcher="einsum",
            noisy_at_eval=True,
        ),
        ExpertChoiceRouterConfig(capacity=5, capacity_factor=None, capacity_multiple_of=None),
        SoftRouterConfig(num_slots=3, noise_std=0.5),
        SoftRouterConfig(num_slots=None, capacity_factor=2.0),
    ],
)
def test_to_dict_from_dict_round_trip(config):
    as_dict = config.to_dict()
    assert as_dict["name"] == config.name and set(as_dict) == {"name", *config.options()}
    assert router_config(**as_dict) == config
    layer = MoeLayerConfig(num_experts=4, router=config, group_size=16)
    assert MoeLayerConfig.from_dict(layer.to_dict()) == layer


def test_replace_validates_and_names_the_option():
    config = TopKRouterConfig()
    assert config.replace(capacity_factor=4.0).capacity_factor == 4.0
    with pytest.raises(ValueError, match="capacity_factor=-1.0 must be a finite number > 0"):
        config.replace(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="num_slots: not an option of router 'top_k'"):
        config.replace(num_slots=1)
    layer = MoeLayerConfig(num_experts=4)
    with pytest.raises(ValueError, match="router.num_selected=2 must be <= num_experts=1"):
        layer.replace(num_experts=1)
    with pytest.raises(ValueError, match="gruop_size: not an option of the MoE layer"):
        layer.replace(gruop_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.capacity_factor = 2.0


@pytest.mark.parametrize(
    "options, error, match",
    [
        (
            dict(router="softmax"),
            ValueError,
            r"moe\.router='softmax': unknown router \(routers: top_k, expert_choice, soft\)",
        ),
        (dict(router=dict(name="sofft")), ValueError, r"moe\.router\.name='sofft': unknown router"),
        (
            dict(capacity_facter=2.0),
            ValueError,
            r"moe\.capacity_facter: not an option of the MoE layer nor of router 'top_k'",
        ),
        (
            dict(router=dict(name="top_k", capacity_facter=2.0)),
            ValueError,
            r"moe\.router\.capacity_facter: not an option of router 'top_k' "
            r"\(its options: num_selected, capacity_factor",
        ),
        (
            dict(router="soft", num_slots=1, num_selected=2),
            ValueError,
            r"moe\.num_selected=2 only applies to sparse routers "
            r".*router 'soft' has no such option",
        ),
        (
            dict(router=dict(name="soft", num_slots=1, num_selected=2)),
            ValueError,
            r"moe\.router\.num_selected: not an option of router 'soft' "
            r"\(its options: num_slots, capacity_factor, noise_std\)",
        ),
        (dict(num_slots=2), ValueError, r"moe\.num_slots=2 only applies to router='soft'"),
        (
            dict(router=dict(name="top_k", num_slots=2)),
            ValueError,
            r"moe\.router\.num_slots: not an option of router 'top_k'",
        ),
        (
            dict(num_experts=4, num_selected=5),
            ValueError,
            r"moe\.router\.num_selected=5 must be <= num_experts=4",
        ),
        (
            dict(capacity_rounding="floor"),
            ValueError,
            r"moe\.capacity_rounding='floor' must be one of 'ceil', 'round'",
        ),
        (
            dict(router=dict(name="expert_choice", capacity_rounding="floor")),
            ValueError,
            r"moe\.router\.capacity_rounding='floor' must be one of",
        ),
        (dict(num_experts="8"), TypeError, r"moe\.num_experts must be an int, got num_experts='8'"),
        (dict(num_selected=2.0), TypeError, r"moe\.num_selected must be an int"),
        (dict(batch_priority="yes"), ValueError, r"moe\.batch_priority='yes' must be a bool"),
        (dict(renormalize=1), ValueError, r"moe\.renormalize=1 must be a bool"),
        (dict(noise_std="1"), ValueError, r"moe\.noise_std='1' must be a finite number >= 0"),
        (dict(load_weight=-0.1), ValueError, r"moe\.load_weight=-0.1 must be a finite number >= 0"),
        (
            dict(capacity_multiple_of=-4),
            ValueError,
            r"moe\.capacity_multiple_of=-4 must be None or an integer >= 0",
        ),
        (dict(dispatcher="dense"), ValueError, r"moe\.dispatcher must be one of"),
        (
            dict(expert_gemm="mm"),
            ValueError,
            r"moe\.expert_gemm='mm' must be one of 'bmm', 'grouped_mm'",
        ),
        (dict(same_init="yes"), ValueError, r"moe\.same_init='yes' must be a bool"),
        (
            dict(group_size=8, group_size_images=1),
            ValueError,
            r"moe: give group_size \(tokens\) or group_size_images",
        ),
        (
            dict(capacity=None, capacity_factor=None),
            ValueError,
            r"moe: give capacity_factor or capacity, got neither",
        ),
        (dict(router=3), TypeError, r"moe\.router=3 must be a router name"),
        (
            dict(router=dict(name="top_k"), num_selected=1),
            ValueError,
            r"moe\.num_selected: give the router options inside moe\.router",
        ),
    ],
)
def test_bad_input_names_the_option_by_its_path(options, error, match):
    with pytest.raises(error, match=match):
        MoeLayerConfig.from_dict(options)
    with pytest.raises(error, match=match):
        MoeMlp(8, 16, config=options)


def test_where_prefixes_the_path():
    with pytest.raises(ValueError, match=r"model\.moe\.router\.capacity=0 must be None"):
        MoeLayerConfig.from_dict({"router": {"name": "top_k", "capacity": 0}}, where="model.moe")
    with pytest.raises(
        ValueError, match=r"^cfg\.num_slots: not an option of router 'expert_choice'"
    ):
        router_config("expert_choice", where="cfg", num_slots=1)
    with pytest.raises(TypeError, match="must be a mapping"):
        MoeLayerConfig.from_dict([("num_experts", 4)])
    with pytest.raises(TypeError, match="router=.* must be a router config"):
        MoeLayerConfig(router={"name": "top_k"})


def test_config_and_flat_options_are_exclusive():
    with pytest.raises(ValueError, match="give config or the flat options, not both .*num_experts"):
        MoeMlp(8, 16, config=MoeLayerConfig(), num_experts=4)


def test_flat_expert_choice_ignores_top_k_options_as_before():
    layer = MoeMlp(8, 16, num_experts=4, router="expert_choice", num_selected=2, renormalize=True)
    assert layer.config.router == ExpertChoiceRouterConfig()
    with pytest.raises(
        ValueError, match=r"moe\.batch_priority=True does not apply to router='expert_choice'"
    ):
        MoeMlp(8, 16, num_experts=4, router="expert_choice", batch_priority=True)
    with pytest.raises(
        ValueError, match=r"moe\.router\.num_selected: not an option of router 'expert_choice'"
    ):
        MoeMlp(8, 16, config=dict(router=dict(name="expert_choice", num_selected=2)))


def test_routers_hold_their_config_and_setters_replace_it():
    router = TopKRouter(4, 4, 2, capacity_factor=1.0)
    assert router.config == TopKRouterConfig(num_selected=2, capacity_factor=1.0)
    before = router.config
    router.capacity_factor = 2.0
    router.batch_priority = True
    router.noise_std = 0.5
    assert router.config == before.replace(capacity_factor=2.0, batch_priority=True, noise_std=0.5)
    with pytest.raises(ValueError, match="capacity=0 must be None or an integer >= 1"):
        router.capacity = 0
    assert router.capacity is None and router.config.capacity_factor == 2.0
    config = ExpertChoiceRouterConfig(capacity=3)
    assert config.build(4, 4).config is config and isinstance(
        config.build(4, 4), ExpertChoiceRouter
    )
    soft = SoftRouterConfig(num_slots=None, capacity_factor=1.0).build(4, 4, group_size=8)
    assert isinstance(soft, SoftRouter) and soft.num_slots == 2 and soft.config.num_slots == 2
    assert SoftRouter(4, 4, num_slots=3).config == SoftRouterConfig(num_slots=3)
    with pytest.raises(TypeError, match="config must be a TopKRouterConfig"):
        TopKRouter(4, 4, config=SoftRouterConfig(num_slots=1))


def test_layer_config_follows_the_routing_settings():
    model = nn.Sequential(
        MoeMlp(8, 16, num_experts=4, num_selected=1),
        MoeMlp(8, 16, num_experts=4, router="soft", capacity_factor=1.0, group_size=8),
    )
    sparse, soft = model
    assert soft.config.router.num_slots == 2  # derived from S * cf / E, then fixed
    with routing_settings({"0": sparse}, capacity_factor=4.0, batch_priority=True):
        assert sparse.config.router == TopKRouterConfig(
            num_selected=1, capacity_factor=4.0, batch_priority=True, dropless=False
        )
    assert sparse.config.router == TopKRouterConfig(num_selected=1)
    set_routing({"0": sparse}, capacity_factor=2.0)
    assert sparse.config.router.capacity_factor == 2.0
    sparse.router.capacity = 3
    assert sparse.config.router.capacity == 3 and read_routing(model)["0"].capacity == 3
    sparse.capacity_factor = 1.5  # clears the explicit capacity
    assert sparse.config.router.capacity is None and sparse.config.router.capacity_factor == 1.5
    with pytest.raises(ValueError, match="capacity_factor=4.0 does not apply to a Soft MoE layer"):
        set_routing(model, capacity_factor=4.0)
    assert sparse.config.router.capacity_factor == 1.5  # all or none
    # A rebuilt layer from layer.config routes like the layer it came from.
    x = torch.randn(2, 4, 8)
    torch.manual_seed(0)
    rebuilt = MoeMlp(8, 16, config=sparse.config).eval()
    rebuilt.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), sparse.eval()(x))
