"""vmoe models as a timm model family: default cfgs, pretrained weights from files, local-dir and
hf-hub names, features_only."""

import json

import pytest
import timm
import torch

import vmoe.models as vm


def routing_of(model):
    """Every MoE layer's routing: evaluation settings, K, group size, router type, placement."""
    return {
        name: (
            layer.router.num_selected,
            layer.group_size,
            layer.group_size_images,
            type(layer.router).__name__,
            layer.router.capacity_factor,
            layer.router.capacity,
            layer.router.batch_priority,
        )
        for name, layer in vm.moe_layers(model).items()
    }


def tiny(**kwargs):
    return timm.create_model("vmoe_tiny_e4_k2", **kwargs).eval()


def test_data_config_is_the_models_own():
    config = timm.data.resolve_model_data_config(tiny(num_classes=10))
    assert config["input_size"] == (3, 16, 16)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    big = timm.data.resolve_model_data_config(
        timm.create_model("vmoe_s32_e8_k2_last2", num_classes=0)
    )
    assert big["input_size"] == (3, 224, 224) and big["mean"] == (0.5, 0.5, 0.5)
    wide = timm.create_model(
        "vmoe_vit", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    assert timm.data.resolve_model_data_config(wide)["input_size"] == (3, 32, 32)
    assert timm.data.resolve_model_data_config(tiny(img_size=24))["input_size"] == (3, 24, 24)
    cfg = tiny().pretrained_cfg
    assert cfg["architecture"] == "vmoe_tiny_e4_k2" and cfg["license"] == "apache-2.0"
    assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"


def test_pretrained_from_a_local_file(tmp_path):
    model = tiny(num_classes=10)
    vm.save_pretrained(model, tmp_path)
    file = str(tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 16, 16)
    loaded = tiny(pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=file))
    assert (loaded(x) - model(x)).abs().max() <= 1e-6
    # Fine-tuning: a new head and a resampled position embedding (the filter fn).
    tuned = tiny(
        pretrained=True, num_classes=3, img_size=32, pretrained_cfg_overlay=dict(file=file)
    )
    assert tuned(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert tuned.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(tuned.blocks[1].mlp.router.weight, model.blocks[1].mlp.router.weight)


def test_pretrained_without_weights_says_how_to_get_them():
    with pytest.raises(ValueError, match="no weights for this name.*list_pretrained.*vmoe convert"):
        tiny(pretrained=True)


def test_save_for_hf_and_local_dir(tmp_path):
    model = tiny(num_classes=10)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    assert (loaded(x) - model(x)).abs().max() <= 1e-6


def test_features_only_equals_forward_intermediates():
    model = tiny(num_classes=0)
    features = timm.create_model("vmoe_tiny_e4_k2", features_only=True, out_indices=(1, 3)).eval()
    missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    x = torch.randn(2, 3, 16, 16)
    maps = features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4), (2, 64, 4, 4)]
    assert features.feature_info.channels() == [64, 64]
    expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)


def test_features_only_backbone_from_a_saved_model(tmp_path):
    model = tiny(num_classes=10)
    vm.save_pretrained(model, tmp_path)
    backbone = timm.create_model(
        f"local-dir:{tmp_path}", pretrained=True, features_only=True
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    want = model.forward_intermediates(x, indices=3, intermediates_only=True)
    for got, expected in zip(backbone(x), want):
        assert (got - expected).abs().max() <= 1e-6


def test_save_pretrained_loads_through_local_dir_with_its_routing(tmp_path):
    model = tiny(num_classes=10)
    vm.set_routing(model, capacity_factor=0.5, batch_priority=True)  # drops tokens: routing matters
    vm.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16] and config["format"] == "vmoe"
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert routing_of(loaded) == routing_of(model)
    x = torch.randn(4, 3, 16, 16)
    assert (loaded(x) - model(x)).abs().max() <= 1e-6
    assert timm.data.resolve_model_data_config(loaded)["input_size"] == (3, 16, 16)
    for source in (tmp_path, f"local-dir:{tmp_path}"):  # and vmoe's own loader, checks included
        again = vm.from_pretrained(source).eval()
        assert (again(x) - model(x)).abs().max() <= 1e-6


def test_local_dir_fine_tuning_overrides(tmp_path):
    model = tiny(num_classes=10)
    vm.save_pretrained(model, tmp_path)
    tuned = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=4, img_size=32)
    assert tuned(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    torch.testing.assert_close(tuned.blocks[3].mlp.router.weight, model.blocks[3].mlp.router.weight)


def test_converted_official_checkpoint_loads_through_local_dir(tmp_path):
    from tests.checkpoints.test_vmoe_import import FIX, GROUP
    from vmoe.models.official import convert_vmoe_checkpoint, from_vmoe_checkpoint

    options = dict(GROUP, capacity_factor=0.5, batch_priority=True)
    convert_vmoe_checkpoint(FIX / "vmoe_tiny_a_perturbed", tmp_path, **options)
    direct = from_vmoe_checkpoint(FIX / "vmoe_tiny_a_perturbed", **options).eval()
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    for model in (direct, loaded, vm.from_pretrained(tmp_path)):
        assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 16, 16)
    assert routing_of(loaded) == routing_of(direct)
    x = torch.randn(3, 3, 16, 16)
    assert (loaded(x) - direct(x)).abs().max() <= 1e-6


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConnectionError,
        match=r"could not download 'hf-hub:nobody/vmoe-none' from the "
        r"Hugging Face Hub .*Offline\? .*local-dir:DIR",
    ):
        vm.from_pretrained("hf-hub:nobody/vmoe-none")


def test_model_card_is_written_on_request(tmp_path):
    model = tiny(num_classes=10)
    vm.set_routing(model, capacity_factor=2.0, batch_priority=True)
    vm.save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
    vm.save_pretrained(
        model,
        tmp_path / "card",
        model_card=dict(dataset="digits, 16x16", metrics={"val/acc1": 0.93}),
    )
    card = (tmp_path / "card" / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    assert "# vmoe_tiny_e4_k2" in card and f"total: {total:,}" in card
    assert "| `blocks.3.mlp` | TopKRouter | 4 | 2 | 2.0 | None | True | 8 images |" in card
    assert "digits, 16x16" in card and "| val/acc1 | 0.93 |" in card
    assert 'timm.create_model("local-dir:DIR", pretrained=True)' in card
    loaded = vm.from_pretrained(tmp_path / "card").eval()  # the card does not disturb loading
    x = torch.randn(2, 3, 16, 16)
    assert (loaded(x) - model(x)).abs().max() <= 1e-6


def test_push_to_hub_uploads_the_saved_directory(monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(p.name for p in folder_path.iterdir())
            return "https://huggingface.co/me/vmoe-tiny/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = vm.push_to_hub(tiny(num_classes=3), "me/vmoe-tiny")
    assert url.endswith("/commit/1") and uploaded["repo"] == "me/vmoe-tiny"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]


def test_push_to_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError,
        match=r"could not push to the Hugging Face Hub repository "
        r"'nobody/vmoe-none' .*Offline or not logged in\?",
    ):
        vm.push_to_hub(tiny(num_classes=3), "nobody/vmoe-none")


def test_weights_of_another_model_are_named(tmp_path):
    other = timm.create_model(
        "vmoe_vit",
        img_size=16,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        moe=dict(every=2, num_experts=4, num_selected=2),
    )
    vm.save_pretrained(other, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"the pretrained weights do not fit vmoe_tiny_e4_k2: "
        r"missing keys \(\d+\): blocks.2",
    ):
        tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))


def test_directories_of_the_previous_layout_still_load(tmp_path):
    model = tiny(num_classes=10)
    vm.set_routing(model, capacity_factor=2.0, batch_priority=True)
    vm.save_pretrained(model, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    old = {k: config[k] for k in ("format", "version", "architecture", "moeify", "routing")}
    old["model_args"] = {"num_classes": 10, "img_size": [16, 16]}  # what vmoe wrote before
    path.write_text(json.dumps(old))
    loaded = vm.from_pretrained(tmp_path).eval()
    assert routing_of(loaded) == routing_of(model)
    x = torch.randn(2, 3, 16, 16)
    assert (loaded(x) - model(x)).abs().max() <= 1e-6


def upcycled_tiny_vit():
    """A dense timm ViT made MoE by upcycle, with changed routing."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, depth=4)
    model = vm.upcycle(dense, last=2, num_experts=4, num_selected=2)
    vm.set_routing(model, capacity_factor=3.0, batch_priority=True)
    return model.eval()


def test_moeified_timm_models_load_through_timm_local_dir(tmp_path):
    model = upcycled_tiny_vit()
    vm.save_pretrained(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architecture"] == "vmoe_moeified"
    assert config["model_args"]["base_architecture"] == "vit_tiny_patch16_224"
    x = torch.randn(2, 3, 32, 32)
    for loaded in (
        timm.create_model(f"local-dir:{tmp_path / 'a'}", pretrained=True),
        vm.from_pretrained(tmp_path / "a"),
    ):
        loaded.eval()
        assert routing_of(loaded) == routing_of(model)
        assert (loaded(x) - model(x)).abs().max() <= 1e-6
    # timm's loader keeps the saved pretrained_cfg: the data config is the saved model's
    assert timm.data.resolve_model_data_config(timm.create_model(f"local-dir:{tmp_path / 'a'}"))[
        "input_size"
    ] == (3, 32, 32)
    # saved again, the same config: the loaded model is the same kind of model
    vm.save_pretrained(loaded, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == config
    # a new head for fine-tuning, through timm
    tuned = timm.create_model(f"local-dir:{tmp_path / 'a'}", pretrained=True, num_classes=3)
    assert tuned(x).shape == (2, 3) and routing_of(tuned) == routing_of(model)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.__setitem__("moeify", None), r"entry 'moeify' must be the MoE recipe"),
        (
            lambda c: c["model_args"].pop("base_architecture"),
            r"entry 'model_args' -> 'base_architecture' must be the dense timm model name",
        ),
        (
            lambda c: c["model_args"].__setitem__("base_architecture", "no_such_vit"),
            r"cannot build 'vmoe_moeified' .*'no_such_vit' is not a registered dense timm model",
        ),
    ],
)
def test_moeified_configs_are_checked(tmp_path, edit, message):
    vm.save_pretrained(upcycled_tiny_vit(), tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        vm.from_pretrained(tmp_path)


def test_moeified_soft_moe_loads_through_timm_local_dir(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        num_classes=5,
        depth=4,
        global_pool="avg",
        class_token=False,
    )
    model = vm.upcycle(dense, last=2, router="soft", num_experts=4, num_slots=2).eval()
    vm.save_pretrained(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert all(layer.is_soft and layer.num_slots == 2 for layer in vm.moe_layers(loaded).values())
    x = torch.randn(2, 3, 32, 32)
    assert (loaded(x) - model(x)).abs().max() <= 1e-6
