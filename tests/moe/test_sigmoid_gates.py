"""Sigmoid scores for top-K routing: the plan and the layer output against a hand computation
(with and without renormalization over the K chosen), float32 under autocast, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from vmoe.moe import MoeMlp, TopKRouter


def hand_sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


@pytest.mark.parametrize("renormalize", [False, True])
def test_sigmoid_plan_equals_a_hand_computation(renormalize):
    torch.manual_seed(0)
    router = TopKRouter(
        8,
        5,
        num_selected=2,
        capacity_factor=100.0,
        noise_std=0.0,
        score_func="sigmoid",
        renormalize=renormalize,
    )
    x = torch.randn(3, 7, 8)
    plan, losses = router(x)
    scores = hand_sigmoid(torch.einsum("gsd,ed->gse", x.double(), router.weight.double()))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :2]
    top = scores.gather(-1, order)
    weight = top / top.sum(-1, keepdim=True) if renormalize else top
    assert torch.equal(plan.expert_index, order)
    assert (plan.slot >= 0).all()  # nothing dropped at this capacity
    torch.testing.assert_close(plan.combine_weight.double(), weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plan.gates.double(), scores, atol=1e-6, rtol=1e-6)
    if renormalize:
        torch.testing.assert_close(plan.combine_weight.sum(-1), torch.ones(3, 7))
    else:
        assert (plan.combine_weight.sum(-1) > 1.0).any()  # sigmoids do not sum to 1
    # the importance loss takes the scores as gates: CV^2 of their per-expert sum
    importance = scores.sum(1)
    cv2 = importance.var(-1, unbiased=False) / importance.mean(-1) ** 2
    torch.testing.assert_close(losses["importance"].double(), cv2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_noisy_sigmoid_gates_in_training_are_the_sigmoid_of_the_noisy_logits(renormalize):
    """Train mode with noise: the plan's gates are sigmoid(logits + noise) for the noise the
    same seed draws (std noise_std / E), the choice and combine weights follow from them."""
    torch.manual_seed(0)
    router = TopKRouter(
        8,
        5,
        num_selected=2,
        capacity_factor=100.0,
        noise_std=2.0,
        score_func="sigmoid",
        renormalize=renormalize,
    ).train()
    x = torch.randn(3, 7, 8)
    torch.manual_seed(123)
    plan, losses = router(x)
    torch.manual_seed(123)
    noise = torch.randn(3, 7, 5) * (2.0 / 5)  # what the router drew: randn_like of the logits
    logits = torch.einsum("gsd,ed->gse", x.double(), router.weight.double())
    noisy = hand_sigmoid(logits + noise.double())
    clean = hand_sigmoid(logits)
    assert (noisy - clean).abs().max() > 0.05  # the noise matters
    torch.testing.assert_close(plan.gates.double(), noisy, atol=1e-6, rtol=1e-6)
    order = torch.argsort(noisy, dim=-1, descending=True, stable=True)[..., :2]
    top = noisy.gather(-1, order)
    weight = top / top.sum(-1, keepdim=True) if renormalize else top
    assert torch.equal(plan.expert_index, order)
    torch.testing.assert_close(plan.combine_weight.double(), weight, atol=1e-6, rtol=1e-6)
    # the importance loss takes the clean scores
    importance = clean.sum(1)
    cv2 = importance.var(-1, unbiased=False) / importance.mean(-1) ** 2
    torch.testing.assert_close(losses["importance"].double(), cv2, atol=1e-6, rtol=1e-5)
    assert "load" in losses


def expert(layer, e, x):
    ex = layer.experts
    h = F.gelu(x @ ex.fc1_weight[e] + ex.fc1_bias[e])
    return h @ ex.fc2_weight[e] + ex.fc2_bias[e]


def test_sigmoid_layer_output_equals_the_hand_mixture():
    torch.manual_seed(0)
    layer = MoeMlp(
        8,
        16,
        num_experts=4,
        num_selected=2,
        score_func="sigmoid",
        renormalize=True,
        capacity_factor=100.0,
        group_size=6,
        same_init=False,
    ).eval()
    x = torch.randn(2, 3, 8)
    tokens = x.reshape(6, 8)
    scores = hand_sigmoid(tokens @ layer.router.weight.T)
    top, index = scores.topk(2, dim=-1)
    weight = top / top.sum(-1, keepdim=True)
    want = torch.stack(
        [
            sum(weight[t, k] * expert(layer, index[t, k], tokens[t]) for k in range(2))
            for t in range(6)
        ]
    )
    torch.testing.assert_close(layer(x).reshape(6, 8), want, atol=1e-5, rtol=1e-5)


def test_sigmoid_scores_are_float32_under_bf16_autocast():
    layer = MoeMlp(8, 16, num_experts=4, score_func="sigmoid").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 4, 8))
    assert layer.last_plan.gates.dtype == torch.float32
    assert layer.last_plan.combine_weight.dtype == torch.float32


def test_sigmoid_trains_with_noise_and_every_loss():
    torch.manual_seed(0)
    layer = MoeMlp(
        8, 16, num_experts=4, score_func="sigmoid", gshard_weight=0.01, zloss_weight=0.01
    ).train()
    layer.aux_loss_mode = "manual"
    out = layer(torch.randn(2, 4, 8))
    assert set(layer.aux_losses) == {"importance", "gshard", "load", "z"}
    assert all(math.isfinite(v.item()) for v in layer.aux_losses.values())
    (out.sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_unknown_score_func_is_refused():
    with pytest.raises(ValueError, match="score_func='tanh' must be one of"):
        MoeMlp(8, 16, num_experts=4, score_func="tanh")
    with pytest.raises(ValueError, match="score_func='sigmoid' only applies to router 'top_k'"):
        MoeMlp(8, 16, num_experts=4, router="expert_choice", score_func="sigmoid")
