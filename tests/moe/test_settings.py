"""The one routing-settings primitive (vmoe.moe.settings), moe_layers and the JSON helper."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from vmoe.jsonable import to_jsonable
from vmoe.moe import (
    MoeMlp,
    RoutingSettings,
    moe_layers,
    read_routing,
    require_moe_layers,
    restore_routing,
    routing_settings,
    set_routing,
)


def two_layer_model() -> nn.Module:
    """blocks.0 a MoE layer with an explicit capacity, blocks.1 an expert-choice MoE layer."""
    model = nn.Module()
    model.blocks = nn.Sequential(
        MoeMlp(8, 16, num_experts=4, capacity_factor=None, capacity=3, batch_priority=True),
        MoeMlp(8, 16, num_experts=4, router="expert_choice", capacity_factor=1.0),
    )
    return model


def test_moe_layers_and_require_moe_layers():
    model = two_layer_model()
    assert list(moe_layers(model)) == ["blocks.0", "blocks.1"]
    assert moe_layers(nn.Linear(2, 2)) == {}
    with pytest.raises(ValueError, match="Linear has no MoE layers"):
        require_moe_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        require_moe_layers({"blocks.0": model.blocks[0]})


def test_settings_read_change_and_restore_exactly():
    model = two_layer_model()
    before = read_routing(model)
    assert before == {
        "blocks.0": RoutingSettings(None, 3, True, True),  # top-K: dropless in eval by default
        "blocks.1": RoutingSettings(1.0, None, False, False),
    }
    assert RoutingSettings.from_dict(before["blocks.0"].to_dict()) == before["blocks.0"]
    previous = set_routing(model, capacity_factor=2.0)
    assert previous == before
    assert read_routing(model) == {
        # the factor clears capacity and selects the capacity path
        "blocks.0": RoutingSettings(2.0, None, True, False),
        "blocks.1": RoutingSettings(2.0, None, False, False),
    }
    restore_routing(model, previous)
    assert read_routing(model) == before
    restore_routing(
        model, {"blocks.1": {"capacity_factor": 3.0, "capacity": None, "batch_priority": False}}
    )
    assert read_routing(model)["blocks.1"] == RoutingSettings(3.0, None, False, False)


def test_context_manager_restores_on_error_and_refuses_all_or_nothing():
    model = two_layer_model()
    before = read_routing(model)
    with pytest.raises(RuntimeError, match="inside"):
        with routing_settings(model, capacity_factor=0.5, batch_priority=False) as previous:
            assert previous == before
            assert read_routing(model)["blocks.0"] == RoutingSettings(0.5, None, False, False)
            raise RuntimeError("inside")
    assert read_routing(model) == before
    with pytest.raises(ValueError, match=r"expert-choice layers \['blocks.1'\]"):
        with routing_settings(model, batch_priority=True):
            pass
    with pytest.raises(ValueError, match="capacity_factor=-1.0"):
        set_routing(model, capacity_factor=-1.0)
    with pytest.raises(
        ValueError, match="capacity=0"
    ):  # the second layer refuses: the first is put back
        restore_routing(
            model,
            {
                "blocks.0": RoutingSettings(1.0, None, False),
                "blocks.1": RoutingSettings(1.0, 0, False),
            },
        )
    assert read_routing(model) == before
    only_first = {"blocks.0": model.blocks[0]}
    with routing_settings(only_first, capacity_factor=4.0):
        assert [s.capacity_factor for s in read_routing(model).values()] == [4.0, 1.0]
    assert read_routing(model) == before


def test_to_jsonable_strict_and_lenient():
    value = {"a": (1, 2.5, None, "x"), ("bpr", 0.5): True, 3: [np.float64(0.25)]}
    assert to_jsonable(value, strict=True) == {
        "a": [1, 2.5, None, "x"],
        "bpr@0.5": True,
        "3": [0.25],
    }
    with pytest.raises(TypeError, match="not a plain JSON value"):
        to_jsonable({"act": nn.GELU}, strict=True)
    lenient = to_jsonable(
        {"t": torch.arange(3), "n": np.int64(4), "p": Path("a/b"), "arr": np.eye(2)}
    )
    assert lenient == {"t": [0, 1, 2], "n": 4, "p": "a/b", "arr": [[1.0, 0.0], [0.0, 1.0]]}
    json.dumps(lenient)
