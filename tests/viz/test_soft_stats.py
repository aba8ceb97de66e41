"""Soft MoE routing statistics: the official metrics against the JAX fixtures, the rest against
direct computations from the plan's weights."""

import math

import numpy as np
import pytest
import torch

from tests.helpers import SOFT_MOE_REFERENCE
from vmoe.moe import SoftRoutingPlan, routing_statistics, soft_routing_statistics

FIXTURE = SOFT_MOE_REFERENCE / "soft_router.npz"
OFFICIAL = [f"{w}_weights_{m}_mean" for w in ("combine", "dispatch") for m in ("min", "max")]
SIMILARITY = [
    f"{w}_weights_similarity_{m}" for w in ("combine", "dispatch") for m in ("min", "max", "mean")
]


def _cases():
    with np.load(FIXTURE) as z:
        return [str(n) for n in z["cases/name"]]


def _fixture_plan(case: str) -> SoftRoutingPlan:
    with np.load(FIXTURE) as z:
        return SoftRoutingPlan(
            torch.from_numpy(z[f"{case}/dispatch_weights"]),
            torch.from_numpy(z[f"{case}/combine_weights"]),
        )


def _random_plan(G=3, S=7, E=4, P=2, seed=0, valid=None) -> SoftRoutingPlan:
    logits = torch.randn(G, S, E, P, generator=torch.Generator().manual_seed(seed)) * 2
    masked = logits if valid is None else logits.masked_fill(~valid.view(G, S, 1, 1), -math.inf)
    dispatch = masked.softmax(1)
    combine = logits.flatten(2).softmax(-1).view(G, S, E, P)
    return SoftRoutingPlan(dispatch, combine, valid)


@pytest.mark.parametrize("case", _cases())
def test_official_metrics_equal_the_jax_router(case):
    stats = soft_routing_statistics(_fixture_plan(case))
    with np.load(FIXTURE) as z:
        for name in OFFICIAL:
            assert float(stats[name]) == pytest.approx(
                float(z[f"{case}/metrics/{name}"]), abs=1e-6
            ), name
        for name in SIMILARITY:  # the README's metric tolerance
            assert float(stats[name]) == pytest.approx(
                float(z[f"{case}/metrics/{name}"]), abs=2e-5
            ), name


def test_statistics_equal_direct_computations():
    plan = _random_plan()
    G, S, E, P = plan.dispatch_weight.shape
    d, c = plan.dispatch_weight.double().numpy(), plan.combine_weight.double().numpy()
    stats = soft_routing_statistics(plan)
    slot_mass = c.sum((0, 1)) / c.sum()
    np.testing.assert_allclose(stats["slot_importance"], slot_mass, atol=1e-6)
    np.testing.assert_allclose(stats["importance"], slot_mass.sum(-1), atol=1e-6)
    assert float(stats["importance_max"]) == pytest.approx(slot_mass.sum(-1).max() * E, abs=1e-5)
    cf = c.reshape(G, S, E * P)
    assert float(stats["combine_entropy"]) == pytest.approx(
        -(cf * np.log(cf)).sum(-1).mean(), abs=1e-5
    )
    h = -(d * np.log(d)).sum(1)  # [G, E, P]
    assert float(stats["dispatch_entropy"]) == pytest.approx(h.mean(), abs=1e-5)
    np.testing.assert_allclose(stats["slot_effective_tokens"], np.exp(h).mean(0), atol=1e-5)
    assert float(stats["dispatch_effective_tokens"]) == pytest.approx(np.exp(h).mean(), abs=1e-5)
    vec = d.reshape(G, S, E * P).transpose(0, 2, 1)
    vec = vec / np.linalg.norm(vec, axis=-1, keepdims=True)
    sim = np.einsum("gan,gbn->gab", vec, vec)
    np.testing.assert_allclose(stats["slot_similarity"], sim.mean(0), atol=1e-5)
    off = ~np.eye(E * P, dtype=bool)
    assert float(stats["dispatch_weights_similarity_min"]) == pytest.approx(
        sim[:, off].min(), abs=1e-5
    )
    assert float(stats["dispatch_weights_similarity_mean"]) == pytest.approx(
        sim[:, off].mean(), abs=1e-5
    )


def test_padding_tokens_are_left_out():
    G, S = 2, 6
    valid = torch.ones(G, S, dtype=torch.bool)
    valid[1, 4:] = False
    plan = _random_plan(G=G, S=S, valid=valid)
    stats = soft_routing_statistics(plan)
    # The same numbers as from the valid tokens alone: group 1 cut to its 4 tokens.
    c = plan.combine_weight.flatten(2)
    tokens = torch.cat([c[0], c[1, :4]])
    assert float(stats["combine_weights_min_mean"]) == pytest.approx(
        float(tokens.amin(-1).mean()), abs=1e-6
    )
    entropy = -(tokens * tokens.log()).sum(-1).mean()
    assert float(stats["combine_entropy"]) == pytest.approx(float(entropy), abs=1e-6)
    d = plan.dispatch_weight
    low = torch.cat([d[0].amin(0).flatten(), d[1, :4].amin(0).flatten()]).mean()
    assert float(stats["dispatch_weights_min_mean"]) == pytest.approx(float(low), abs=1e-6)
    tok = tokens[6:] / tokens[6:].norm(dim=-1, keepdim=True)
    sim_g1 = tok @ tok.T
    off_diagonal = sim_g1[~torch.eye(4, dtype=torch.bool)]
    assert float(stats["combine_weights_similarity_min"]) <= float(off_diagonal.min()) + 1e-6
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_routing_statistics_of_a_soft_plan_has_no_dropped_fields():
    stats = routing_statistics(_random_plan())
    assert "dropped_fraction" not in stats and "load" not in stats
    assert set(stats) == set(soft_routing_statistics(_random_plan()))


def test_a_sparse_plan_is_refused_with_a_clear_message():
    from vmoe.moe import TopKRouter

    router = TopKRouter(8, 4, 2, capacity_factor=1.0)
    plan, _ = router(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="SoftRoutingPlan"):
        soft_routing_statistics(plan)


def test_image_expert_usage_of_a_soft_layer_is_its_combine_mass():
    """``vmoe predict --predictions.expert_usage`` on Soft MoE: each image's share of the combine
    mass per expert (one image per group here, so group b is image b)."""
    import timm

    import vmoe.models  # noqa: F401
    from vmoe.moe import moe_layers
    from vmoe.moe.stats import image_expert_usage

    torch.manual_seed(0)
    model = timm.create_model("soft_moe_tiny_e8", num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    for layer in moe_layers(model).values():
        plan = layer.last_plan
        usage = image_expert_usage(plan, 3)
        assert usage.shape == (3, layer.num_experts)
        assert torch.allclose(usage.sum(1), torch.ones(3), atol=1e-5)
        want = torch.stack([plan.combine_weight[b].sum(-1).mean(0) for b in range(3)])
        assert torch.allclose(usage, want, atol=1e-6)
