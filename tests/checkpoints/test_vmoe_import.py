"""Official V-MoE checkpoints imported into our model reproduce the official model's outputs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import VMOE_REFERENCE as FIX
from vmoe.checkpoints import CheckpointFormatError, read_checkpoint
from vmoe.cli import main
from vmoe.models import from_pretrained, moe_layers
from vmoe.models.official import (
    convert_vmoe_checkpoint,
    from_vmoe_checkpoint,
    infer_vmoe_architecture,
)

from .official_writer import index_bytes, leaf_order, plan_chunks, write_checkpoint

MODELS = [
    ("vmoe_tiny_a", "model_a"),
    ("vmoe_tiny_a_3shards", "model_a"),
    ("vmoe_tiny_a_repr", "model_a_repr"),
    ("vmoe_tiny_a_perturbed", "model_a_perturbed"),
]
VARIANTS = {
    "": {},
    "cf4.0/": dict(capacity_factor=4.0),
    "cf0.5_bpr/": dict(capacity_factor=0.5, batch_priority=True),
    "cf1.05_mult1/": dict(capacity_multiple_of=1),
    "indices/": {},
}
# model A routes groups of 34 tokens (2 images x 17 tokens), on the capacity path in eval mode
# too (dropless=False), as the official model that made the fixtures
GROUP = dict(group_size=34, dropless=False)


def _images(outputs):
    return torch.from_numpy(outputs["images"]).permute(0, 3, 1, 2)  # stored NHWC -> NCHW


def _run_with_moe_inputs(model, x):
    """Forward in eval mode; returns logits and each MoE layer's input [B, N, d]."""
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, m in moe_layers(model).items()
    ]
    with torch.no_grad():
        logits = model.eval()(x)
    for h in hooks:
        h.remove()
    return logits, inputs


def _dense_routing(plan, num_experts):
    """RoutingPlan -> the official (G, S, E, C) dispatch mask and combine weights."""
    G, S, _ = plan.expert_index.shape
    mask = torch.zeros(G, S, num_experts, plan.capacity, dtype=torch.bool)
    weights = torch.zeros(G, S, num_experts, plan.capacity)
    g, s, k = (plan.slot >= 0).nonzero(as_tuple=True)
    e, c = plan.expert_index[g, s, k], plan.slot[g, s, k]
    mask[g, s, e, c] = True
    weights[g, s, e, c] = plan.combine_weight[g, s, k].float()
    return mask.numpy(), weights.numpy()


@pytest.mark.parametrize("ckpt,model_name", MODELS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_losses_and_routing_equal_the_official_model(ckpt, model_name, variant):
    out = np.load(FIX / f"{model_name}_outputs.npz")
    model = from_vmoe_checkpoint(FIX / ckpt, **GROUP, **VARIANTS[variant])
    logits, inputs = _run_with_moe_inputs(model, _images(out))
    np.testing.assert_allclose(logits.numpy(), out[f"{variant}logits"], rtol=0, atol=1e-5)
    total = 0
    for block, (name, layer) in zip((1, 3), moe_layers(model).items()):
        x = inputs[name]
        with torch.no_grad():
            plan, losses = layer.router(x.reshape(2, 34, x.shape[-1]), None)  # per group: [G]
        ref = f"{variant}metrics/encoderblock_{block}/"
        np.testing.assert_allclose(
            losses["importance"].detach().numpy(), out[ref + "importance_loss"], rtol=1e-5
        )
        np.testing.assert_allclose(
            losses["gshard"].detach().numpy(), out[ref + "gshard_loss"], rtol=1e-5
        )
        aux = 0.005 * losses["importance"].detach().numpy()
        np.testing.assert_allclose(aux, out[ref + "auxiliary_loss"], rtol=1e-5)
        total = total + aux
        if f"{variant}encoderblock_{block}/moe/dispatch_weights" in out.files:
            mask, weights = _dense_routing(plan, layer.num_experts)
            ref_mask = out[f"{variant}encoderblock_{block}/moe/dispatch_weights"]
            ref_weights = out[f"{variant}encoderblock_{block}/moe/combine_weights"]
            # Our router caps C at the group size S; the official buffers beyond S stay empty.
            C = plan.capacity
            assert C == min(ref_mask.shape[-1], plan.group_size)
            assert not ref_mask[..., C:].any() and not ref_weights[..., C:].any()
            np.testing.assert_array_equal(mask, ref_mask[..., :C])
            np.testing.assert_allclose(weights, ref_weights[..., :C], atol=1e-6)
    np.testing.assert_allclose(total, out[f"{variant}metrics/auxiliary_loss"], rtol=1e-5)


@pytest.mark.parametrize("model_name", ["model_a", "model_a_perturbed"])
def test_intermediate_activations(model_name):
    ref = np.load(FIX / f"{model_name}_intermediates.npz")
    model = from_vmoe_checkpoint(FIX / f"vmoe_tiny_a{model_name[7:]}", **GROUP).eval()
    got = {}
    hook = lambda key: lambda mod, args, out: got.__setitem__(key, out)  # noqa: E731
    model.patch_embed.register_forward_hook(hook("embedding"))
    model.norm.register_forward_hook(hook("encoder_norm_out"))
    for i, block in enumerate(model.blocks):
        block.norm1.register_forward_hook(hook(f"encoderblock_{i}/ln0_out"))
        block.norm2.register_forward_hook(hook(f"encoderblock_{i}/ln1_out"))
        block.mlp.register_forward_hook(hook(f"encoderblock_{i}/mlp_out"))
        block.register_forward_hook(hook(f"encoderblock_{i}/out"))
    images = _images(np.load(FIX / f"{model_name}_outputs.npz"))
    with torch.no_grad():
        logits = model(images)
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    np.testing.assert_allclose(
        got.pop("embedding").numpy(), ref["embedding_conv_out"].reshape(4, 16, 32), atol=1e-5
    )
    for key, value in got.items():
        np.testing.assert_allclose(value.numpy(), ref[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(pre_logits.numpy(), ref["pre_logits"], atol=1e-5)
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=1e-5)
    for i in (1, 3):
        layer = model.blocks[i].mlp
        x = torch.from_numpy(ref[f"encoderblock_{i}/ln1_out"]).reshape(2, 34, 32)
        np.testing.assert_allclose(
            (x @ layer.router.weight.T).detach().numpy(),
            ref[f"encoderblock_{i}/moe/router_logits"],
            atol=1e-5,
        )
        with torch.no_grad():
            plan, _ = layer.router(x, None)
        mask, weights = _dense_routing(plan, layer.num_experts)
        np.testing.assert_array_equal(mask, ref[f"encoderblock_{i}/moe/dispatch_weights"])
        np.testing.assert_allclose(weights, ref[f"encoderblock_{i}/moe/combine_weights"], atol=1e-6)


def test_inferred_architecture():
    a = infer_vmoe_architecture(FIX / "vmoe_tiny_a_repr")
    assert (a["embed_dim"], a["depth"], a["num_heads"], a["mlp_dim"], a["patch"]) == (
        32,
        4,
        4,
        64,
        (4, 4),
    )
    assert (a["moe_blocks"], a["num_experts"], a["num_classes"]) == ([1, 3], 4, 10)
    assert a["class_token"] and a["representation_size"] == 32 and a["grid"] == 4
    model = from_vmoe_checkpoint(FIX / "vmoe_tiny_a_repr")  # paper defaults for the rest
    layer = model.blocks[3].mlp
    assert layer.router.num_selected == 2 and layer.capacity_factor == 1.05
    assert layer.group_size_images == 8 and not layer.batch_priority
    assert (
        model.blocks[0].norm1.eps == 1e-6 and type(model.blocks[0].mlp.act).__name__ == "GELUTanh"
    )


def test_convert_writes_a_pretrained_directory(tmp_path):
    out = np.load(FIX / "model_a_perturbed_outputs.npz")
    convert_vmoe_checkpoint(FIX / "vmoe_tiny_a_perturbed", tmp_path / "conv", **GROUP)
    model = from_pretrained(tmp_path / "conv")
    with torch.no_grad():
        logits = model.eval()(_images(out))
    np.testing.assert_allclose(logits.numpy(), out["logits"], atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_vmoe_checkpoint(FIX / "vmoe_tiny_a", tmp_path / "conv")
    # fine-tuning setup: a new 7-class head and 32x32 inputs with resampled position embeddings
    tuned = from_pretrained(tmp_path / "conv", num_classes=7, img_size=32)
    direct = from_vmoe_checkpoint(
        FIX / "vmoe_tiny_a_perturbed", num_classes=7, img_size=32, **GROUP
    )
    for m in (tuned, direct):
        assert m.pos_embed.shape == (1, 65, 32)
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    torch.testing.assert_close(tuned.pos_embed, direct.pos_embed)
    torch.testing.assert_close(
        tuned.blocks[1].mlp.experts.fc1_weight, model.blocks[1].mlp.experts.fc1_weight
    )


def test_global_average_pooling_checkpoint(tmp_path):
    """A 'gap' model (no cls token): the final LayerNorm applies to tokens before the mean."""
    params = read_checkpoint(FIX / "vmoe_tiny_a_perturbed")
    del params["cls"]
    params["Encoder/posembed_input/pos_embedding"] = params["Encoder/posembed_input/pos_embedding"][
        :, 1:
    ]
    write_checkpoint(tmp_path / "gap", params)
    model = from_vmoe_checkpoint(tmp_path / "gap", **GROUP).eval()
    assert not infer_vmoe_architecture(tmp_path / "gap")["class_token"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [4, 16, 32], after the final norm
        np.testing.assert_allclose(model(x).numpy(), model.head(tokens.mean(1)).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda p: {
                "conv1/kernel": np.zeros((3, 3, 3, 8), np.float32),
                "fc/bias": np.zeros(2, np.float32),
            },
            r"not a V-MoE / ViT checkpoint: expected a 4-d parameter 'embedding/kernel'",
        ),
        (
            lambda p: {
                k: v for k, v in p.items() if k != "Encoder/encoderblock_2/Mlp/Dense_1/bias"
            },
            r"missing \['Encoder/encoderblock_2/Mlp/Dense_1/bias'\]",
        ),
        (
            lambda p: {**p, "Encoder/encoderblock_1/Moe/extra": np.zeros(1, np.float32)},
            r"unexpected \['Encoder/encoderblock_1/Moe/extra'\]",
        ),
        (
            lambda p: {**p, "head/bias": np.zeros(11, np.float32)},
            r"wrong shapes \['head/bias: \[11\]",
        ),
        (
            lambda p: {
                **p,
                "Encoder/posembed_input/pos_embedding": np.zeros((1, 20, 32), np.float32),
            },
            "not a square grid",
        ),
        (
            lambda p: {k.replace("encoderblock_3", "encoderblock_5"): v for k, v in p.items()},
            r"blocks Encoder/encoderblock_0..N-1, found \[0, 1, 2, 5\]",
        ),
    ],
)
def test_unexpected_trees_are_rejected(tmp_path, edit, match):
    params = read_checkpoint(FIX / "vmoe_tiny_a")
    write_checkpoint(tmp_path / "bad", edit(params))
    with pytest.raises(CheckpointFormatError, match=match) as err:
        from_vmoe_checkpoint(tmp_path / "bad")
    assert "bad.index" in str(err.value)


def test_convert_command_line(tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                str(FIX / "vmoe_tiny_a_3shards"),
                "--out",
                str(tmp_path / "cli"),
                "--group-size-images",
                "2",
                "--capacity-factor",
                "4.0",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    out = np.load(FIX / "model_a_outputs.npz")
    model = from_pretrained(tmp_path / "cli")
    with torch.no_grad():
        np.testing.assert_allclose(
            model.eval()(_images(out)).numpy(), out["cf4.0/logits"], atol=1e-5
        )


class _ShapeOnly:
    """An array that has a shape and a dtype but no data (for writing an index alone)."""

    def __init__(self, shape):
        self.shape, self.dtype = shape, np.dtype(np.float32)


@pytest.fixture
def huge_index(tmp_path):
    """The 1-shard fixture with an index that declares a 10**9-class head (128 GB of float32)
    and is only a few KB itself: the shard on disk is the fixture's."""
    import shutil

    params = {k: _ShapeOnly(v.shape) for k, v in read_checkpoint(FIX / "vmoe_tiny_a").items()}
    params["head/kernel"], params["head/bias"] = _ShapeOnly((32, 10**9)), _ShapeOnly((10**9,))
    names = leaf_order(params)
    index = index_bytes(plan_chunks(params, names, set(), 1, 256 * 2**20), 1)
    prefix = tmp_path / "huge"
    Path(f"{prefix}.index").write_bytes(index)
    shutil.copy(FIX / "vmoe_tiny_a.data-00000-of-00001", f"{prefix}.data-00000-of-00001")
    assert len(index) < 200_000
    return prefix


def test_what_the_index_declares_is_checked_against_the_shards_before_allocating(
    huge_index, tmp_path, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was allocated before the shards were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)
    monkeypatch.setattr("vmoe.models.official._build_empty", refuse)
    match = (
        r"huge.data-00000-of-00001: file is truncated, or .*huge.index does not belong to it: "
        r"the index places 132000\d{6} bytes of array data in this shard, which has \d+ bytes"
    )
    with pytest.raises(CheckpointFormatError, match=match):
        from_vmoe_checkpoint(huge_index, **GROUP)
    with pytest.raises(CheckpointFormatError, match=match):
        convert_vmoe_checkpoint(huge_index, tmp_path / "out", **GROUP)
    assert not (tmp_path / "out").exists()


def test_a_shard_that_fails_its_scan_is_reported_before_allocating(tmp_path, monkeypatch):
    """A shard with the right size but a wrong structure is also found before the model exists."""
    import shutil

    prefix = tmp_path / "a"
    shutil.copy(FIX / "vmoe_tiny_a.index", f"{prefix}.index")
    data = (FIX / "vmoe_tiny_a.data-00000-of-00001").read_bytes()
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data[:3] + b"\xc1" + data[4:])
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated first"))
    with pytest.raises(CheckpointFormatError, match=r"byte 0xc1 is not a valid MessagePack type"):
        from_vmoe_checkpoint(prefix, **GROUP)
