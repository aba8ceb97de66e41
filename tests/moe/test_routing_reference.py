"""Routing decisions, capacities and combine weights equal to the official JAX V-MoE code."""

import numpy as np
import pytest
import torch

from tests.helpers import VMOE_REFERENCE as FIXTURES
from vmoe.moe import ExpertChoiceRouter, TopKRouter, compute_capacity, expert_choice_metrics
from vmoe.moe.dispatch.einsum import one_hot_weights


def test_capacity_table_equals_official():
    table = np.load(FIXTURES / "compute_capacity.npz")
    assert len(table["capacity"]) == 26
    for tokens, experts, cf, mode, mult, expected in zip(
        table["num_tokens"],
        table["num_experts"],
        table["capacity_factor"],
        table["ceil_or_round"],
        table["multiple_of"],
        table["capacity"],
    ):
        args = (int(tokens), int(experts), float(cf), str(mode), None if mult == -1 else int(mult))
        if expected == -1:
            with pytest.raises(ValueError, match="capacity"):
                compute_capacity(*args)
        else:
            assert compute_capacity(*args) == expected, args


def _top_k_cases():
    data = np.load(FIXTURES / "routing_top_experts_per_item.npz")
    return [str(k) for k in data["cases/key"]]


@pytest.mark.parametrize("key", _top_k_cases())
def test_top_k_routing_equals_official(reference, key):
    data = reference("routing_top_experts_per_item")
    shape_key = key.split("_K")[0]
    S, E = (int(v[1:]) for v in shape_key.split("_"))
    K = int(key.split("_K")[1][0])
    bpr = "_bpr1_" in key
    cf = float(key.split("_cf")[1])
    gates = torch.from_numpy(data[f"{shape_key}/gates"]).unsqueeze(0)  # [1, S, E]
    router = TopKRouter(
        dim=4, num_experts=E, num_selected=K, capacity_factor=cf, batch_priority=bpr
    )
    plan = router.route(gates)
    C = int(data[f"{key}/capacity"])
    assert plan.capacity == C

    indices = data[f"{key}/indices/indices"]  # [S, K, 2]: expert, raw slot (>= C when dropped)
    ref_expert = indices[..., 0]
    ref_slot = np.where(indices[..., 1] < C, indices[..., 1], -1)
    np.testing.assert_array_equal(plan.expert_index[0].numpy(), ref_expert)
    np.testing.assert_array_equal(plan.slot[0].numpy(), ref_slot)
    ref_weight = np.where(ref_slot >= 0, data[f"{key}/indices/combine_weights"], 0.0)
    np.testing.assert_allclose(plan.combine_weight[0].numpy(), ref_weight, atol=1e-7)

    # The one-hot form (the official einsum dispatcher's tensors) is identical too.
    dispatch_mask, combine_weight = one_hot_weights(plan)
    np.testing.assert_array_equal(dispatch_mask[0].numpy(), data[f"{key}/einsum/dispatch_weights"])
    np.testing.assert_allclose(
        combine_weight[0].numpy(), data[f"{key}/einsum/combine_weights"], atol=1e-7
    )
    dropped = S * K - int(plan.kept.sum())
    case = list(data["cases/key"]).index(key)
    assert dropped == int(data["cases/num_dropped_assignments"][case])


@pytest.mark.parametrize("shape", ["S16_E4", "S64_E8", "S50_E8"])
@pytest.mark.parametrize("cf", ["1.0", "2.0"])
def test_expert_choice_routing_equals_official(reference, shape, cf):
    data = reference("routing_expert_choice")
    key = f"{shape}_cf{cf}"
    gates = torch.from_numpy(data[f"{shape}/gates"]).unsqueeze(0)
    E = gates.shape[-1]
    router = ExpertChoiceRouter(dim=4, num_experts=E, capacity_factor=float(cf))
    plan = router.route(gates)
    assert plan.capacity == int(data[f"{key}/capacity"])
    dispatch_mask, combine_weight = one_hot_weights(plan)
    np.testing.assert_array_equal(dispatch_mask[0].numpy(), data[f"{key}/dispatch_weights"])
    np.testing.assert_allclose(combine_weight[0].numpy(), data[f"{key}/combine_weights"], atol=1e-7)
    metrics = expert_choice_metrics(plan)
    ref_names = [
        k[len(key) + len("/metrics/") :] for k in data.files if k.startswith(f"{key}/metrics/")
    ]
    assert sorted(ref_names) == sorted(metrics)
    for name in ref_names:
        np.testing.assert_allclose(
            metrics[name][0].numpy(), data[f"{key}/metrics/{name}"], rtol=1e-6, err_msg=name
        )


def test_bpr_gives_first_places_to_most_confident_tokens():
    gates = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.55, 0.45]]])
    vanilla = TopKRouter(
        dim=2, num_experts=2, num_selected=1, capacity=2, capacity_factor=None
    ).route(gates)
    bpr = TopKRouter(
        dim=2, num_experts=2, num_selected=1, capacity=2, capacity_factor=None, batch_priority=True
    ).route(gates)
    # All four tokens choose expert 0 which has 2 places.
    assert vanilla.slot[0, :, 0].tolist() == [0, 1, -1, -1]  # earlier tokens win
    assert bpr.slot[0, :, 0].tolist() == [-1, 0, 1, -1]  # tokens 1 (0.9) and 2 (0.7) win
