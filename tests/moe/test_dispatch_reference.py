"""x -> dispatch -> per-expert linear map -> combine, equal to the official code with groups."""

import numpy as np
import pytest
import torch

from vmoe.moe import TopKRouter, combine, dispatch, einsum_combine, einsum_dispatch

CASES = {
    "G1_S16_E4_K2_cf1.0": (2, 1.0, False),
    "G2_S16_E4_K1_cf1.05_bpr": (1, 1.05, True),
    "G4_S8_E4_K2_cf0.5": (2, 0.5, False),
    "G8_S8_E4_K2_cf1.0_bpr": (2, 1.0, True),
}


def official_buffer_order(buffers: torch.Tensor, G: int, C: int) -> torch.Tensor:
    """Our [E, G*C, d] rows are g*C + c; the official layout interleaves groups when G % E == 0."""
    E = buffers.shape[0]
    if G % E != 0:
        return buffers
    per_group = buffers.view(E, G, C, -1)
    a, b = G // (G // E), G // E  # g = a_idx * (G/E) + b_idx -> row (b_idx*E + a_idx)*C + c
    out = per_group.view(E, a, b, C, -1).transpose(1, 2).reshape(E, G * C, -1)
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["index", "einsum"])
def test_dispatch_expert_combine_equals_official(reference, case, which):
    data = reference("dispatch_combine_e2e")
    K, cf, bpr = CASES[case]
    gates = torch.from_numpy(data[f"{case}/gates"])
    x = torch.from_numpy(data[f"{case}/x"])
    W = torch.from_numpy(data[f"{case}/W"])
    G, S, E = gates.shape
    plan = TopKRouter(
        dim=x.shape[-1], num_experts=E, num_selected=K, capacity_factor=cf, batch_priority=bpr
    ).route(gates)
    assert plan.capacity == int(data[f"{case}/capacity"])
    ref_indices = data[f"{case}/indices/indices"]
    C = plan.capacity
    np.testing.assert_array_equal(
        plan.slot.numpy(), np.where(ref_indices[..., 1] < C, ref_indices[..., 1], -1)
    )
    disp, comb = (dispatch, combine) if which == "index" else (einsum_dispatch, einsum_combine)
    buffers = disp(x, plan)
    assert buffers.shape == (E, G * C, x.shape[-1])
    np.testing.assert_allclose(
        official_buffer_order(buffers, G, C), data[f"{case}/einsum/dispatched"], atol=1e-6
    )
    expert_out = torch.einsum("ecd,edf->ecf", buffers, W)
    np.testing.assert_allclose(
        official_buffer_order(expert_out, G, C), data[f"{case}/einsum/expert_out"], atol=1e-5
    )
    out = comb(expert_out, plan)
    np.testing.assert_allclose(out, data[f"{case}/einsum/output"], atol=1e-5)
    np.testing.assert_allclose(out, data[f"{case}/indices/output"], atol=1e-5)
