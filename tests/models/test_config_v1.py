"""Model directories saved by vmoe before config.json format version 2 (flat MoE options) load
with the current code and compute the logits they computed then (tests/fixtures/config_v1)."""

import json

import pytest
import timm
import torch

import vmoe.models as vm
from tests.helpers import FIXTURES

V1 = FIXTURES / "config_v1"
NAMES = ["vmoe_tiny_topk", "soft_moe_tiny", "moeified_vit", "moeified_soft"]
# The logits were recorded on one CPU; another CPU's kernels may round differently (~1e-7).
# A wrongly read option (capacity, BPR, slots, router) changes them by far more.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_a_version_1_directory_loads_with_the_saved_logits(name):
    assert json.loads((V1 / name / "config.json").read_text())["version"] == 1
    x = torch.load(V1 / "input.pt", weights_only=True)
    expected = torch.load(V1 / name / "logits.pt", weights_only=True)
    model = vm.from_pretrained(V1 / name).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_a_version_1_directory_loads_through_timm_local_dir(name):
    x = torch.load(V1 / "input.pt", weights_only=True)
    expected = torch.load(V1 / name / "logits.pt", weights_only=True)
    model = timm.create_model(f"local-dir:{V1 / name}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


def test_the_version_1_routing_options_are_the_saved_ones():
    layers = vm.moe_layers(vm.from_pretrained(V1 / "vmoe_tiny_topk"))
    assert layers and all(
        m.router.capacity_factor == 1.5 and m.router.batch_priority for m in layers.values()
    )
