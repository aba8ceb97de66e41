"""timm's model contract (what its own tests/models/test_models.py checks of a model family), as our
own tests over every registered vmoe family: one tiny representative each, and every registered
name built on the meta device."""

import json

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names
from timm.models._manipulate import adapt_input_conv

import vmoe.models as vm
from vmoe.moe import MoeMlp

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
# family -> (timm name, the arguments of a tiny representative)
FAMILIES = {
    "vmoe_tiny_e4_k2": ("vmoe_tiny_e4_k2", {}),
    "soft_moe_tiny_e8": ("soft_moe_tiny_e8", {}),
    "vmoe_vit": (
        "vmoe_vit",
        dict(
            TINY_VIT,
            representation_size=48,
            head_bias_init="paper",
            moe=dict(every=2, num_experts=4, group_size_images=1),
        ),
    ),
    "vmoe_moeified": (
        "vmoe_moeified",
        dict(
            TINY_VIT,
            base_architecture="vit_tiny_patch16_224",
            moeify={"blocks": [1], "moe_kwargs": {"num_experts": 4}},
        ),
    ),
}
# timm's test_model_default_cfgs reads these keys of every model's pretrained cfg.
CFG_KEYS = (
    "input_size",
    "num_classes",
    "first_conv",
    "classifier",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "pool_size",
    "fixed_input_size",
)


def create(family, **kwargs):
    name, args = FAMILIES[family]
    return timm.create_model(name, **{**args, **kwargs})


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (the saved model with 10 classes, its save_pretrained directory)."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(1234)  # not conftest's seed 0: a fresh init of a loaded model differs
        model = create(family, num_classes=10).eval()
        out[family] = model, vm.save_pretrained(model, tmp_path_factory.mktemp(family))
    return out


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_forward_and_backward_reach_every_parameter(family):
    """Train mode, router noise on: every parameter gets a gradient from the task loss alone."""
    model = create(family, num_classes=7).train()
    out = model(X)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert sum(p.grad.numel() for p in model.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_default_cfg_head_and_pre_logits(family):
    """timm's default-cfg test: cfg keys, classifier/first-conv names, num_features,
    forward_head(pre_logits=True), reset_classifier(0) and num_classes=0 give pooled features."""
    model = create(family).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert set(CFG_KEYS) <= set(cfg) and cfg["num_classes"] == model.num_classes == 1000
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    if family != "vmoe_moeified":  # a moeified timm ViT keeps timm's cfg (224 for ViT-Ti/16)
        assert tuple(cfg["input_size"]) == (3, 16, 16)
    assert model.num_features > 0 and model.head_hidden_size > 0
    with torch.no_grad():
        features = model.forward_features(X)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape[-1] == model.num_features
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(5)
        assert model(X).shape == (2, 5)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(X), pre)
        headless = create(family, num_classes=0).eval()
        assert headless(X).shape == (2, headless.head_hidden_size)


def test_forward_intermediates_equal_forward_features(family):
    model = create(family).eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(X)
        torch.testing.assert_close(final, model.forward_features(X))
        only = model.forward_intermediates(X, indices=2, intermediates_only=True)
    assert len(intermediates) == len(model.blocks)
    for got, want in zip(only, intermediates[-2:]):
        torch.testing.assert_close(got, want)
    assert intermediates[-1].shape == (2, model.embed_dim, 4, 4)


def test_features_only_getter_and_fx(family):
    """features_only with timm's getter and with feature_cls='fx': the same block outputs as
    forward_intermediates (fx: tokens, prefix included; getter: NCHW maps)."""
    torch.manual_seed(0)
    model = create(family, num_classes=0).eval()
    with torch.no_grad():
        want = model.forward_intermediates(
            X, indices=(0, 1), intermediates_only=True, output_fmt="NLC"
        )
        for feature_cls in ("getter", "fx"):
            torch.manual_seed(0)
            features = create(
                family, features_only=True, feature_cls=feature_cls, out_indices=(0, 1)
            ).eval()
            inner = features.model if feature_cls == "getter" else features.graph_module
            missing, _ = inner.load_state_dict(model.state_dict(), strict=False)
            assert missing == []
            maps = features(X)
            assert len(maps) == 2
            for got, expected in zip(maps, want):
                if feature_cls == "getter":
                    got = got.flatten(2).transpose(1, 2)  # [B, d, h, w] -> [B, h*w, d]
                else:
                    got = got[:, model.num_prefix_tokens :]
                torch.testing.assert_close(got, expected)


def test_fx_forward_and_backward_equal_eager(family):
    """Traced with timm's tracer (MoeMlp a leaf): same logits, aux losses and gradients as eager
    (train mode: the same router noise from the same seed), aux losses kept on the layers."""
    model = create(family, num_classes=7).train()
    last = get_graph_node_names(model)[0][-1]
    fx = create_feature_extractor(model, return_nodes={last: "out"})
    results = []
    for run in (model, lambda x: fx(x)["out"]):
        model.zero_grad()
        for layer in vm.moe_layers(model).values():
            layer.aux_loss, layer.last_plan = None, None
        torch.manual_seed(0)
        out = run(X)
        loss = out.square().mean() + vm.aux_loss(model)
        loss.backward()
        results.append((out.detach(), loss.detach(), grads(model)))
    (out, loss, g), (fx_out, fx_loss, fx_g) = results
    torch.testing.assert_close(fx_out, out)
    torch.testing.assert_close(fx_loss, loss)
    assert g.keys() == fx_g.keys() and len(g) == len(list(model.parameters()))
    for name in g:
        torch.testing.assert_close(fx_g[name], g[name])
    assert set(vm.moe_layers(fx)) == set(vm.moe_layers(model))
    assert all(layer.last_plan is not None for layer in vm.moe_layers(fx).values())
    # torchvision's own extractor, told timm's leaves (timm.models.create_feature_extractor does)
    from torchvision.models.feature_extraction import create_feature_extractor as tv_extractor

    tv = tv_extractor(model.eval(), [last], tracer_kwargs=dict(leaf_modules=[MoeMlp]))
    torch.testing.assert_close(tv(X)[last], model(X))


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(family):
    """Eval mode (no noise): logits, aux losses and gradients of task + aux loss unchanged."""
    model = create(family, num_classes=7).eval()
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(X)
        aux = vm.aux_loss(model)
        (out.square().mean() + aux).backward()
        results.append((out.detach(), aux.detach(), grads(model)))
    (out, aux, g), (ck_out, ck_aux, ck_g) = results
    torch.testing.assert_close(ck_out, out)
    torch.testing.assert_close(ck_aux, aux)
    assert g.keys() == ck_g.keys()
    for name in g:
        torch.testing.assert_close(ck_g[name], g[name])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_names_the_supported_route(family):
    model = create(family).eval()
    with pytest.raises(RuntimeError, match=r"TorchScript.*torch\.export.*ONNX"):
        torch.jit.script(model)
    last = get_graph_node_names(model)[0][-1]
    with pytest.raises(RuntimeError, match=r"torch\.export"):  # timm's FX-then-script path too
        torch.jit.script(create_feature_extractor(model, return_nodes=[last]))


@pytest.mark.parametrize("family", ["vmoe_tiny_e4_k2", "soft_moe_tiny_e8"])
def test_torch_export_is_the_supported_route(family):
    model = create(family).eval()
    exported = torch.export.export(model, (X,))
    torch.testing.assert_close(exported.module()(X), model(X))


def _loaders(family, directory, **kwargs):
    """The model of ``directory`` loaded by timm from its weights file and as ``local-dir:``."""
    file = dict(pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors")))
    yield create(family, pretrained=True, **file, **kwargs)
    yield timm.create_model(f"local-dir:{directory}", pretrained=True, **kwargs)


def test_pretrained_keeps_the_head_or_gets_a_new_one(family, saved):
    model, directory = saved[family]
    for loaded in _loaders(family, directory, num_classes=10):
        torch.testing.assert_close(loaded.eval()(X), model(X))
    for loaded in _loaders(family, directory, num_classes=3):
        assert loaded.eval()(X).shape == (2, 3)
        torch.testing.assert_close(loaded.forward_features(X), model.forward_features(X))
    headless = timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0).eval()
    torch.testing.assert_close(
        headless(X), model.forward_head(model.forward_features(X), pre_logits=True)
    )


@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_with_other_input_channels_adapts_the_first_conv(family, saved, in_chans):
    """As timm does (adapt_input_conv): the other weights unchanged, the data config follows."""
    model, directory = saved[family]
    conv = "patch_embed.proj.weight"
    want = adapt_input_conv(in_chans, model.state_dict()[conv])
    for loaded in _loaders(family, directory, num_classes=10, in_chans=in_chans):
        state = loaded.state_dict()
        torch.testing.assert_close(state[conv], want)
        for key, value in model.state_dict().items():
            if key != conv:
                torch.testing.assert_close(state[key], value)
        assert loaded.eval()(torch.randn(2, in_chans, 16, 16)).shape == (2, 10)
        if family != "vmoe_moeified":  # a moeified timm ViT keeps timm's cfg as it is
            config = timm.data.resolve_model_data_config(loaded)
            assert config["input_size"][0] == in_chans and len(config["mean"]) == in_chans


def test_local_dir_without_model_args_num_classes_keeps_the_trained_head(family, saved, tmp_path):
    """config.json with the classes only at its top level (older timm layouts, other tools)."""
    model, directory = saved[family]
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"].pop("num_classes", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for loaded in (
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True),
        vm.from_pretrained(tmp_path),
    ):
        assert loaded.num_classes == 10
        torch.testing.assert_close(loaded.eval()(X), model(X))


def test_a_trained_head_is_never_dropped_silently(saved):
    """A weights file whose head differs from the default 1000 classes: an error saying how to
    keep it, not a fresh head."""
    _, directory = saved["vmoe_tiny_e4_k2"]
    with pytest.raises(ValueError, match=r"head has 10 classes: pass num_classes=10"):
        create(
            "vmoe_tiny_e4_k2",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors")),
        )


def test_every_registered_name_is_creatable_on_the_meta_device():
    names = timm.list_models("vmoe_*") + timm.list_models("soft_moe_*")
    assert (
        "vmoe_moeified" in names and len(names) == 56
    )  # 48 paper V-MoE + 5 Soft MoE + tiny, vmoe_vit, moeified
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg, state = model.pretrained_cfg, model.state_dict()
        assert set(CFG_KEYS) <= set(cfg), name
        assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state, (
            name
        )
        assert model.num_classes == 1000 and model.num_features > 0
        assert name == "vmoe_vit" or vm.moe_layers(model), name  # vmoe_vit: every arg explicit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_chans=0), r"in_chans=0 must be an int >= 1"),
        (dict(in_chans=-3), r"in_chans=-3 must be an int >= 1"),
        (
            dict(features_only=True, feature_cls="nope"),
            r"feature_cls='nope' is not a timm feature extractor",
        ),
        (
            dict(features_only=True, out_indices=(0, 7)),
            r"out_indices=\(0, 7\) does not fit a model of \d blocks",
        ),
        (dict(features_only=True, out_indices=9), r"out_indices=9 does not fit"),
    ],
)
def test_bad_arguments_name_the_problem(family, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create(family, **kwargs)


def test_local_dir_runs_the_config_checks(saved, tmp_path):
    """timm's local-dir: loader refuses what vm.from_pretrained refuses, with the same message."""
    _, directory = saved["vmoe_tiny_e4_k2"]
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["model_args"]["routing"] = "fast"
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (
        lambda: timm.create_model(f"local-dir:{tmp_path}", pretrained=True),
        lambda: vm.from_pretrained(tmp_path),
    ):
        with pytest.raises(
            ValueError, match=r"config.json: entry 'model_args' -> 'routing' must be"
        ):
            load()


def test_weights_of_another_model_are_refused_before_resampling(saved, tmp_path):
    """Soft MoE weights (16 position embeddings, no class token) for a V-MoE: the shape check
    names what differs (before timm's resampling could fail on a 15-token grid)."""
    _, soft_dir = saved["soft_moe_tiny_e8"]
    _, vmoe_dir = saved["vmoe_tiny_e4_k2"]
    file = str(soft_dir / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"do not fit vmoe_tiny_e4_k2: .*pos_embed: weights \(1, 16, 64\)"
    ):
        create(
            "vmoe_tiny_e4_k2",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay=dict(file=file),
        )
    (tmp_path / "model.safetensors").write_bytes((soft_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_bytes((vmoe_dir / "config.json").read_bytes())
    with pytest.raises(
        ValueError, match=r"config.json: model_args.moe.num_experts=4 does not match"
    ):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_a_missing_weights_file_is_named(family, tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(
        FileNotFoundError, match=r"weights file .*nowhere/model.safetensors not found"
    ):
        create(family, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
