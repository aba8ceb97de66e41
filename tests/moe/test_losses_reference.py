"""Auxiliary losses equal to the official router's classmethods."""

import numpy as np
import pytest
import torch

from vmoe.moe import gshard_loss, importance_loss, load_loss, router_z_loss


@pytest.mark.parametrize("shape", ["S16_E4", "S64_E8", "S50_E8"])
def test_aux_losses_equal_official(reference, shape):
    data = reference("aux_losses")
    t = {
        k.split("/", 1)[1]: torch.from_numpy(data[k])
        for k in data.files
        if k.startswith(shape + "/")
    }
    gates = t["logits"].softmax(-1)[None]
    gates_noisy = t["logits_noisy"].softmax(-1)[None]
    np.testing.assert_allclose(gates[0], t["gates"], atol=1e-7)
    np.testing.assert_allclose(importance_loss(gates), [t["importance_loss"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        importance_loss(gates_noisy), [t["importance_loss_noisy_gates"]], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(gshard_loss(gates), [t["gshard_loss"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        gshard_loss(gates_noisy), [t["gshard_loss_noisy_gates"]], rtol=1e-5, atol=1e-6
    )
    noise_std = float(t["noise_std"])
    E = gates.shape[-1]
    assert noise_std == pytest.approx(1.0 / E)
    for K in (1, 2):
        value = load_loss(t["logits"][None], t["logits_noisy"][None], noise_std, K)
        np.testing.assert_allclose(value, [t[f"load_loss_K{K}"]], rtol=1e-4, atol=1e-6)


def test_losses_ignore_padding_tokens():
    logits = torch.randn(1, 10, 4)
    padded = torch.cat([logits, torch.randn(1, 6, 4) * 5], dim=1)
    valid = torch.arange(16).view(1, 16) < 10
    for fn in (importance_loss, gshard_loss, router_z_loss):
        full = fn(padded.softmax(-1) if fn is not router_z_loss else padded, valid)
        ref = fn(logits.softmax(-1) if fn is not router_z_loss else logits)
        torch.testing.assert_close(full, ref)
    noisy = padded + 0.1 * torch.randn_like(padded)
    torch.testing.assert_close(
        load_loss(padded, noisy, 0.25, 2, valid), load_loss(padded[:, :10], noisy[:, :10], 0.25, 2)
    )


def test_importance_loss_is_zero_for_balanced_gates_and_uses_population_std():
    balanced = torch.full((1, 8, 4), 0.25)
    assert importance_loss(balanced).item() == pytest.approx(0.0)
    gates = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # I = [2, 1]
    expected = np.var([2.0, 1.0]) / 1.5**2  # ddof = 0
    assert importance_loss(gates).item() == pytest.approx(expected)
