"""vmoe.models: placement, upcycling, paper variants, model-level routing API, save/load."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import vmoe.models as vm
from vmoe.moe import MoeMlp


def tiny_vit(**kwargs):
    options = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    options.update(kwargs)
    return VisionTransformer(**options).eval()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(every=2), [1, 3, 5, 7]),
        (dict(every=1), list(range(8))),
        (dict(every=3), [2, 5]),
        (dict(last=2), [5, 7]),
        (dict(last=1), [7]),
        (dict(blocks=[0, -1]), [0, 7]),
    ],
)
def test_moe_block_placement(kwargs, expected):
    assert vm.moe_block_indices(8, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(blocks=[8]), "block index 8 is out of range"),
        (dict(blocks=[1, 1]), "twice"),
        (dict(every=9), "every=9"),
        (dict(last=5), "last=5"),
        (dict(), "exactly one"),
        (dict(every=2, last=2), "exactly one"),
    ],
)
def test_bad_placement_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vm.moe_block_indices(8, **kwargs)


def test_moeify_rejects_models_without_timm_blocks():
    with pytest.raises(TypeError, match="not a timm Vision Transformer"):
        vm.moeify(nn.Sequential(nn.Linear(3, 3)), every=2)
    with pytest.raises(ValueError, match="out of range"):
        vm.moeify(tiny_vit(), blocks=[4])


@pytest.mark.parametrize(
    "vit_kwargs",
    [
        dict(),  # class token
        dict(class_token=False, global_pool="avg"),  # no class token, average pooling
        dict(reg_tokens=4),  # registers
        dict(no_embed_class=True),  # DeiT-3 style position embedding
    ],
)
def test_upcycled_model_equals_dense_model(vit_kwargs):
    dense = tiny_vit(**vit_kwargs)
    moe = vm.moeify(
        copy.deepcopy(dense),
        every=2,
        from_dense=True,
        num_experts=4,
        num_selected=2,
        renormalize=True,
        capacity_factor=4.0,
        group_size_images=2,
    ).eval()
    assert list(vm.moe_layers(moe)) == ["blocks.1.mlp", "blocks.3.mlp"]
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)
    # The paper's un-normalized combine weights (K gates summing to < 1) change the output.
    paper = vm.moeify(
        copy.deepcopy(dense), every=2, from_dense=True, num_experts=4, capacity_factor=4.0
    ).eval()
    assert (paper(x) - dense(x)).abs().max() > 1e-3


def test_model_level_routing_api():
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    with pytest.raises(RuntimeError, match="no forward"):
        vm.routing_plans(model)
    model(torch.randn(4, 3, 16, 16))
    plans = vm.routing_plans(model)
    assert list(plans) == ["blocks.1.mlp", "blocks.3.mlp"]
    # 4 images of 17 tokens fill half of one group of 8 images; the rest is padding.
    assert all(p.gates.shape == (1, 8 * 17, 4) and p.valid.sum() == 4 * 17 for p in plans.values())
    expected = sum(0.005 * m.aux_losses["importance"] for m in vm.moe_layers(model).values())
    torch.testing.assert_close(vm.aux_loss(model), expected)
    previous = vm.set_routing(model, capacity_factor=4.0, batch_priority=True)
    model(torch.randn(4, 3, 16, 16))
    assert all(
        p.capacity == 136 for p in vm.routing_plans(model).values()
    )  # ceil(136*2*4/4) = 272, capped at S = 136
    assert all(m.router.batch_priority for m in vm.moe_layers(model).values())
    vm.restore_routing(model, previous)
    assert all(
        m.capacity_factor == 1.05 and not m.batch_priority for m in vm.moe_layers(model).values()
    )
    stats = vm.routing_stats(model)
    assert set(stats["blocks.1.mlp"]) >= {"dropped_fraction", "load", "importance"}
    with pytest.raises(ValueError, match="no MoE layers"):
        vm.set_routing(tiny_vit(), capacity_factor=2.0)


def test_paper_variants_are_registered():
    names = set(timm.list_models("vmoe_*"))
    for size in ("s32", "b32", "b16", "l32", "l16", "h14"):
        for e in (8, 32):
            for k in (1, 2):
                for place in ("every2", "last2"):
                    assert f"vmoe_{size}_e{e}_k{k}_{place}" in names
    assert {"vmoe_tiny_e4_k2", "vmoe_vit"} <= names


def test_s32_e8_last2_parameter_count_and_config():
    model = timm.create_model("vmoe_s32_e8_k2_last2", num_classes=1000)
    d, mlp, depth, E, classes, tokens = 512, 2048, 8, 8, 1000, (224 // 32) ** 2 + 1
    dense_mlp = d * mlp + mlp + mlp * d + d
    attention = d * 3 * d + 3 * d + d * d + d
    norms = 2 * 2 * d
    count = (3 * 32 * 32 * d + d) + d + tokens * d  # patch embedding, cls, positions
    count += depth * (attention + norms) + (depth - 2) * dense_mlp
    count += 2 * (E * d + E * dense_mlp)  # 2 MoE blocks: router + experts
    count += 2 * d + (d * d + d) + (d * classes + classes)  # final norm, pre-logits, head
    assert sum(p.numel() for p in model.parameters()) == count
    layers = vm.moe_layers(model)
    assert list(layers) == ["blocks.5.mlp", "blocks.7.mlp"]
    layer = layers["blocks.5.mlp"]
    assert (layer.num_experts, layer.router.num_selected, layer.capacity_factor) == (8, 2, 1.05)
    assert layer.group_size_images == 8 and layer.router.noise_std == 1.0
    assert layer.router.importance_weight == layer.router.load_weight == 0.005
    torch.testing.assert_close(
        model.head.bias, torch.full((classes,), -torch.log(torch.tensor(1000.0)).item())
    )
    assert isinstance(model.pre_logits.act, nn.Tanh)


def test_save_and_load_give_same_logits_and_protect_existing_dirs(tmp_path):
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    vm.set_routing(model, capacity_factor=2.0, batch_priority=True)
    x = torch.randn(3, 3, 16, 16)
    out = vm.save_pretrained(model, tmp_path / "m")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    loaded = vm.from_pretrained(out).eval()
    assert torch.equal(loaded(x), model(x))
    assert all(
        m.capacity_factor == 2.0 and m.batch_priority for m in vm.moe_layers(loaded).values()
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vm.save_pretrained(model, out)
    vm.save_pretrained(model, out, overwrite=True)
    # Fine-tuning: new head, new resolution (position embeddings resampled).
    tuned = vm.from_pretrained(out, num_classes=3, img_size=32)
    assert tuned(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert tuned.pos_embed.shape == (1, 65, 64)


def test_save_and_load_moeified_timm_model(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32)
    moe = vm.moeify(dense, last=1, num_experts=4, from_dense=True).eval()
    vm.save_pretrained(moe, tmp_path / "m")
    loaded = vm.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), moe(x))
    assert isinstance(loaded.blocks[11].mlp, MoeMlp)


def test_load_errors_name_the_problem(tmp_path):
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10)
    d = vm.save_pretrained(model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        vm.from_pretrained(tmp_path / "nothing")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        vm.from_pretrained(d)
    state = model.state_dict()
    state.pop("blocks.1.mlp.router.weight")
    state["extra.weight"] = torch.zeros(1)
    state["head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        vm.load_state_dict_checked(model, state)
    message = str(err.value)
    assert "missing keys (1): blocks.1.mlp.router.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.bias: checkpoint (3,) vs model (10,)" in message


def test_upcycle_from_local_weights_file(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4).eval()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    moe = vm.upcycle(
        "vit_tiny_patch16_224",
        checkpoint_path=path,
        img_size=32,
        num_classes=4,
        every=2,
        num_experts=4,
        renormalize=True,
        capacity_factor=4.0,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    # timm re-initializes the classifier when loading a file for a new head, so compare features.

    def features(m):
        return m.forward_head(m.forward_features(x), pre_logits=True)

    torch.testing.assert_close(features(moe), features(dense), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vm.upcycle("vit_tiny_patch16_224", checkpoint_path=tmp_path / "missing.npz", every=2)


def test_hub_download_offline_gives_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    # The variable is read when huggingface_hub is imported: set the constant itself.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        vm.upcycle("vit_tiny_patch16_224", pretrained=True, every=2)


def test_expert_dropout_defaults_to_the_dense_mlp_and_can_be_set():
    model = vm.moeify(tiny_vit(proj_drop_rate=0.1), every=2, num_experts=4)
    assert vm.moe_layers(model)["blocks.1.mlp"].experts.drop1.p == 0.1
    model = vm.moeify(tiny_vit(), every=2, num_experts=4, drop=0.2)
    assert vm.moe_layers(model)["blocks.3.mlp"].experts.drop2.p == 0.2
