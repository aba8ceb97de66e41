"""save_pretrained directories load with transformers (AutoModelForImageClassification and the
image-classification pipeline; its TimmWrapper builds the timm architecture of config.json),
with the same logits and the saved routing, and still with timm's local-dir and vmoe."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import vmoe.models as vm
from tests.helpers import ROOT

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


def routing_of(model):
    return {
        name.removeprefix("timm_model."): (m.capacity_factor, m.batch_priority)
        for name, m in vm.moe_layers(model).items()
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    vm.set_routing(model, capacity_factor=2.0, batch_priority=True)
    directory = tmp_path_factory.mktemp("hf") / "model"
    vm.save_pretrained(model, directory)
    return directory, model


def test_auto_model_has_the_same_logits_and_routing(saved):
    """Failed before: "got multiple values for keyword argument 'num_classes'"."""
    directory, model = saved
    config = json.loads((directory / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 10
    hf = transformers.AutoModelForImageClassification.from_pretrained(directory).eval()
    assert hf.config.num_labels == 10
    assert (
        routing_of(hf)
        == routing_of(model)
        == {"blocks.1.mlp": (2.0, True), "blocks.3.mlp": (2.0, True)}
    )
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-6)


def test_the_directory_still_loads_with_vmoe_and_timm(saved):
    directory, model = saved
    x = torch.randn(3, 3, 16, 16)
    for loaded in (
        vm.from_pretrained(directory),
        timm.create_model(f"local-dir:{directory}", pretrained=True),
    ):
        loaded.eval()
        assert loaded.num_classes == 10 and routing_of(loaded) == routing_of(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_pipeline_classifies_a_pil_image_as_the_model_does(saved):
    directory, model = saved
    pipe = transformers.pipeline("image-classification", model=str(directory), top_k=3)
    image = PIL.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype("uint8"))
    out = pipe(image)
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    with torch.no_grad():
        probs = model(pixels).softmax(-1)[0]
    top = probs.topk(3)
    assert [o["label"] for o in out] == [f"LABEL_{i}" for i in top.indices.tolist()]
    np.testing.assert_allclose([o["score"] for o in out], top.values.numpy(), rtol=1e-5)


def test_a_moeified_timm_model_loads_with_transformers(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, depth=2)
    model = vm.upcycle(dense, blocks=[1], num_experts=4, num_selected=2).eval()
    vm.set_routing(model, capacity_factor=3.0)
    vm.save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert routing_of(hf) == routing_of(model) == {"blocks.1.mlp": (3.0, False)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-6)


def test_weights_of_another_model_are_refused(saved, tmp_path):
    from safetensors.torch import save_file

    directory, _ = saved
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((directory / "config.json").read_text())
    eight = timm.create_model("vmoe_tiny_e4_k2", num_classes=10, moe=dict(num_experts=8))
    save_file(
        {k: v.contiguous() for k, v in eight.state_dict().items()}, str(other / "model.safetensors")
    )
    # transformers' refusal (its load report, logged above the error, lists the keys)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForImageClassification.from_pretrained(other)
    with pytest.raises(
        ValueError,
        match=r"does not fit .*model.safetensors: wrong shapes .*"
        r"blocks.1.mlp.experts.fc1_bias: file \(8, 128\) vs config \(4, 128\)",
    ):
        vm.from_pretrained(other)


def test_without_importing_vmoe_models_transformers_names_the_architecture(saved):
    """transformers calls timm.create_model(architecture): the vmoe names exist in timm only
    after ``import vmoe.models``; without it the error names the architecture."""
    directory, _ = saved
    code = (
        "import transformers\n"
        f"transformers.AutoModelForImageClassification.from_pretrained({str(directory)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert "vmoe_tiny_e4_k2" in result.stderr and "not supported" in result.stderr
