"""Tiny Soft MoE ViTs (model S: one slot per expert, S2: two) built as timm ViTs and imported from
the official checkpoint, against the official JAX outputs (tests/fixtures/soft_moe_reference)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch

import vmoe.models  # noqa: F401  (registers the timm factories)
from tests.helpers import SOFT_MOE_REFERENCE as FIX
from vmoe.models import from_vmoe_checkpoint, from_vmoe_params, moe_layers
from vmoe.moe import SoftRoutingPlan

OUTPUTS = np.load(FIX / "model_s_outputs.npz")
IMAGES = torch.from_numpy(OUTPUTS["images"]).permute(0, 3, 1, 2)  # NHWC -> NCHW


def _params(model: str):
    return dict(np.load(FIX / f"model_{model}_params.npz"))


def _capture(model):
    """Per block: (ln1_out, mlp_out, out) of the last forward."""
    seen = {}
    for i, block in enumerate(model.blocks):
        block.norm2.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"{i}/ln1_out", o))
        block.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"{i}/mlp_out", o))
        block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"{i}/out", o))
        block.norm1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"{i}/ln0_out", o))
    return seen


@pytest.mark.parametrize("name", ["s", "s2"])
def test_built_model_matches_official_without_bf16(name):
    model = from_vmoe_params(_params(name)).eval()
    config = json.loads((FIX / f"model_{name}_config.json").read_text())
    layers = moe_layers(model)
    assert list(layers) == ["blocks.2.mlp", "blocks.3.mlp"]
    assert all(m.is_soft and m.num_slots == (1 if name == "s" else 2) for m in layers.values())
    assert model.global_pool == "avg" and model.cls_token is None
    seen = _capture(model)
    with torch.no_grad():
        logits = model(IMAGES)
    outputs = np.load(FIX / f"model_{name}_outputs.npz")
    torch.testing.assert_close(
        logits, torch.from_numpy(outputs["no_bf16/logits"]), atol=1e-5, rtol=0
    )
    for b in (2, 3):
        torch.testing.assert_close(
            seen[f"{b}/mlp_out"],
            torch.from_numpy(outputs[f"no_bf16/encoderblock_{b}/mlp_out"]),
            atol=1e-5,
            rtol=0,
        )
    # The official constructor config, read back from our model.
    c = config["model"]
    assert (
        len(model.blocks),
        model.embed_dim,
        model.blocks[0].attn.num_heads,
        model.num_classes,
    ) == (c["encoder"]["num_layers"], c["hidden_size"], c["encoder"]["num_heads"], c["num_classes"])
    assert [int(n.split(".")[1]) for n in layers] == c["encoder"]["moe"]["layers"]
    assert all(
        m.num_experts == c["encoder"]["moe"]["num_experts"]
        and m.group_size_for(model.patch_embed.num_patches) == c["encoder"]["moe"]["group_size"]
        for m in layers.values()
    )
    q_norm = model.blocks[0].attn.q_norm
    assert q_norm.bias is None and q_norm.eps == config["derived"]["qk_layer_norm"]["epsilon"]


def test_model_s_architecture_built_by_name_equals_the_import():
    """The README's model S as an explicit timm build (GAP, qk-norm, no cls token, head bias
    -log(C)), then given the official weights: the same logits as the import."""
    model = timm.create_model(
        "vmoe_vit",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        qk_norm=True,
        qk_norm_bias=False,
        act_layer="gelu_tanh",
        head_bias_init=-math.log(10),
        moe=dict(blocks=[2, 3], num_experts=8, router="soft", num_slots=1, noise_std=0.0),
    ).eval()
    torch.testing.assert_close(model.head.bias, torch.full((10,), -math.log(10)))
    imported = from_vmoe_params(_params("s")).eval()
    model.load_state_dict(imported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            model(IMAGES), torch.from_numpy(OUTPUTS["no_bf16/logits"]), atol=1e-5, rtol=0
        )


def test_model_s_intermediates_up_to_the_first_soft_moe_and_router_weights():
    inter = np.load(FIX / "model_s_intermediates.npz")
    model = from_vmoe_params(_params("s")).eval()
    seen = _capture(model)
    with torch.no_grad():
        model(IMAGES)
    t = lambda k: torch.from_numpy(inter[k])  # noqa: E731
    # The stored intermediates after the first Soft MoE carry the official bf16 casts: compare
    # up to block 2's MoE input (the README's rule).
    for b in range(3):
        torch.testing.assert_close(
            seen[f"{b}/ln0_out"], t(f"encoderblock_{b}/ln0_out"), atol=1e-5, rtol=0
        )
    for b in (0, 1):
        for k in ("ln1_out", "mlp_out", "out"):
            torch.testing.assert_close(
                seen[f"{b}/{k}"], t(f"encoderblock_{b}/{k}"), atol=1e-5, rtol=0
            )
    torch.testing.assert_close(seen["2/ln1_out"], t("encoderblock_2/ln1_out"), atol=1e-5, rtol=0)
    # Block 2's router on the official block-2 input: dispatch/combine weights at 1e-6.
    layer = model.blocks[2].mlp
    with torch.no_grad():
        layer(t("encoderblock_2/ln1_out"))
    plan = layer.last_plan
    assert isinstance(plan, SoftRoutingPlan)
    torch.testing.assert_close(
        plan.dispatch_weight, t("encoderblock_2/moe/dispatch_weights"), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        plan.combine_weight, t("encoderblock_2/moe/combine_weights"), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", ["s", "s2"])
def test_bf16_option_reproduces_the_official_logits(name):
    model = from_vmoe_params(_params(name), bf16_dispatch=True).eval()
    outputs = np.load(FIX / f"model_{name}_outputs.npz")
    with torch.no_grad():
        logits = model(IMAGES)
    official = torch.from_numpy(outputs["logits"])
    torch.testing.assert_close(logits, official, atol=3e-4, rtol=0)
    # ... which float32 alone misses (the official bf16 casts move the logits by up to 7.7e-4).
    assert (official - torch.from_numpy(outputs["no_bf16/logits"])).abs().max() > 3e-4


def test_imported_checkpoint_reproduces_model_s():
    model = from_vmoe_checkpoint(FIX / "soft_moe_tiny_s").eval()
    with torch.no_grad():
        logits = model(IMAGES)
    torch.testing.assert_close(
        logits, torch.from_numpy(OUTPUTS["no_bf16/logits"]), atol=1e-5, rtol=0
    )
    bf16 = from_vmoe_checkpoint(FIX / "soft_moe_tiny_s", bf16_dispatch=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            bf16(IMAGES), torch.from_numpy(OUTPUTS["logits"]), atol=3e-4, rtol=0
        )
    # The head bias of the official model family starts at -log(C); here it was perturbed.
    assert (
        model.blocks[0].attn.q_norm.bias is None and model.blocks[2].mlp.router.scale.item() == 5.0
    )


def test_vmoe_convert_recognizes_the_soft_moe_checkpoint(tmp_path):
    from vmoe.cli import main
    from vmoe.models import from_pretrained

    assert main(["convert", str(FIX / "soft_moe_tiny_s"), "--out", str(tmp_path / "f32")]) == 0
    assert (
        main(
            [
                "convert",
                str(FIX / "soft_moe_tiny_s"),
                "--out",
                str(tmp_path / "bf16"),
                "--bf16-dispatch",
            ]
        )
        == 0
    )
    model = from_pretrained(tmp_path / "f32").eval()
    assert all(
        m.is_soft and m.group_size_images == 1 and m.noise_std == 0.0
        for m in moe_layers(model).values()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(IMAGES), torch.from_numpy(OUTPUTS["no_bf16/logits"]), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            from_pretrained(tmp_path / "bf16").eval()(IMAGES),
            torch.from_numpy(OUTPUTS["logits"]),
            atol=3e-4,
            rtol=0,
        )
    with pytest.raises(ValueError, match="num_selected=1 only applies to sparse routers"):
        from_vmoe_checkpoint(FIX / "soft_moe_tiny_s", num_selected=1)
