"""The Soft MoE router against the official JAX SoftRouter (tests/fixtures/soft_moe_reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import SOFT_MOE_REFERENCE as FIXTURES
from vmoe.moe import SoftRoutingPlan
from vmoe.moe.soft_routing import SoftRouter, soft_slots_per_expert, unit_normalize

ROUTER = np.load(FIXTURES / "soft_router.npz")
CASES = [str(name) for name in ROUTER["cases/name"]]


def _case(name):
    i = CASES.index(name)
    row = {k[len("cases/") :]: ROUTER[k][i] for k in ROUTER.files if k.startswith("cases/")}
    arrays = {
        k[len(name) + 1 :]: torch.from_numpy(ROUTER[k])
        for k in ROUTER.files
        if k.startswith(name + "/")
    }
    return row, arrays


def _router(row, arrays) -> SoftRouter:
    G, M, d, E = (int(row[k]) for k in "GMdE")
    num_slots = None if int(row["num_slots_arg"]) < 0 else int(row["num_slots_arg"])
    cf = 1.0 if math.isnan(row["capacity_factor"]) else float(row["capacity_factor"])
    router = SoftRouter(
        d,
        E,
        num_slots=num_slots,
        capacity_factor=cf,
        group_size=M,
        noise_std=float(row["noise_std"]),
    )
    assert router.num_slots == int(row["P"])  # P exact, banker's rounding included
    with torch.no_grad():
        router.mu.copy_(arrays["params/mu"])
        router.scale.copy_(arrays["params/scale"])
    return router


@pytest.mark.parametrize("name", CASES)
def test_router_matches_official(name, monkeypatch):
    row, a = _case(name)
    router = _router(row, a)
    x = a["x"]
    torch.testing.assert_close(unit_normalize(x, -1), a["x_normalized"], atol=1e-6, rtol=0)
    torch.testing.assert_close(unit_normalize(router.mu, 0), a["mu_unit"], atol=1e-6, rtol=0)
    logits = router.logits(x)
    torch.testing.assert_close(
        logits, a["logits"], atol=2e-6 * max(1.0, float(row["scale"])), rtol=0
    )
    if row["noise_std"] > 0:
        # Test hook: the recorded N(0,1) draws replace torch.randn_like in training mode.
        draws = (a["logits_noisy"] - a["logits"]) / float(row["noise_std"])
        monkeypatch.setattr(torch, "randn_like", lambda t: draws.to(t))
        router.train()
    else:
        router.eval()
    plan, losses = router(x)
    assert isinstance(plan, SoftRoutingPlan) and losses == {}
    assert float(a["metrics/auxiliary_loss"]) == 0.0
    assert plan.dispatch_weight.dtype == torch.float32
    torch.testing.assert_close(plan.dispatch_weight, a["dispatch_weights"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.combine_weight, a["combine_weights"], atol=1e-6, rtol=0)
    G, M, E, P = (int(row[k]) for k in "GMEP")
    assert (plan.num_groups, plan.group_size, plan.num_experts, plan.slots_per_expert) == (
        G,
        M,
        E,
        P,
    )


def test_noise_is_gaussian_with_noise_std_only_in_training():
    torch.manual_seed(0)
    router = SoftRouter(8, 4, num_slots=2, noise_std=0.5)
    x = torch.randn(64, 16, 8)
    clean = router.logits(x)
    router.train()
    plan, _ = router(x)
    # Recover the noisy logits from the combine softmax (log-probs up to a per-token constant).
    log_c = plan.combine_weight.log().reshape(64, 16, -1)
    diff = log_c - clean.reshape(64, 16, -1)
    noise = diff - diff.mean(-1, keepdim=True)
    expected_std = 0.5 * math.sqrt(1 - 1 / 8)  # std of a draw minus the mean of its 8 draws
    assert abs(noise.std().item() - expected_std) < 0.02
    router.eval()
    torch.testing.assert_close(
        router(x)[0].combine_weight, clean.reshape(64, 16, -1).softmax(-1).view_as(clean)
    )


def test_padding_tokens_get_no_dispatch_weight():
    router = SoftRouter(8, 4, num_slots=1)
    x = torch.randn(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    plan, _ = router(x, valid)
    assert torch.all(plan.dispatch_weight[1, 3:] == 0)
    torch.testing.assert_close(plan.dispatch_weight.sum(1), torch.ones(2, 4, 1))
    # The valid tokens' weights are those of the group without the padding.
    alone, _ = router(x[1:, :3])
    torch.testing.assert_close(plan.dispatch_weight[1, :3], alone.dispatch_weight[0])


@pytest.mark.parametrize(
    "S,E,cf,P",
    [
        (16, 8, 1.0, 2),
        (196, 128, 1.0, 2),
        (20, 3, 1.0, 7),
        (30, 4, 1.0, 8),
        (12, 5, 1.25, 3),
        (10, 4, 1.0, 2),
        (14, 4, 1.0, 4),
    ],
)
def test_slots_from_capacity_factor_round_half_to_even(S, E, cf, P):
    assert soft_slots_per_expert(S, E, cf) == P


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_slots=0), "num_slots must be >= 1"),
        (dict(num_slots=-2), "num_slots must be >= 1"),
        (dict(capacity_factor=1.0, group_size=3), "capacity rounds to 0"),
        (dict(capacity_factor=-1.0, group_size=16), "capacity_factor=-1.0"),
        (dict(capacity_factor=1.0), "give group_size"),
        (dict(capacity_factor=None), "give num_slots or capacity_factor"),
    ],
)
def test_bad_slots_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftRouter(8, 8, **kwargs)


def test_fixed_settings_refuse_changes():
    router = SoftRouter(8, 4, num_slots=1)
    router.capacity_factor = None  # the same values: accepted
    router.capacity = 1
    router.batch_priority = False
    for name, value in (("capacity_factor", 2.0), ("capacity", 3), ("batch_priority", True)):
        with pytest.raises(ValueError, match=f"{name}=.* does not apply to a Soft MoE layer"):
            setattr(router, name, value)
    with pytest.raises(ValueError, match="input width d=6 differs from dim=8"):
        router(torch.randn(1, 4, 6))


def test_logits_gradients_match_autograd_of_the_plain_formula():
    """The fused logits' backward (x, mu, scale) equals autograd through the official formula,
    zero and tiny tokens included (float64 gradcheck)."""
    from vmoe.moe.soft_routing import normalized_logits

    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    x[0] = 0.0
    x[1] *= 1e-4
    x.requires_grad_()
    mu = unit_normalize(torch.randn(5, 3, dtype=torch.float64), 0).requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normalized_logits, (x, mu, scale))
    fused = normalized_logits(x, mu, scale)
    plain = scale * unit_normalize(x, -1) @ mu
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    want = torch.autograd.grad(plain, (x, mu, scale), g)
    got = torch.autograd.grad(fused, (x, mu, scale), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
