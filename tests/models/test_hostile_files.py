"""Untrusted model directories: config.json is validated and compared with the safetensors
header before any model is built for real, so an edited config cannot make vmoe allocate more
than the weights file on disk justifies."""

import errno
import json
import math
from pathlib import Path

import pytest
import timm
import torch

import vmoe.models as vm
from tests.helpers import VMOE_REFERENCE

TINY = dict(
    img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5
)


@pytest.fixture
def saved(tmp_path):
    """A tiny vmoe_vit (E=4 in block 1) saved with save_pretrained; returns (dir, model)."""
    model = timm.create_model(
        "vmoe_vit", moe=dict(blocks=[1], num_experts=4, num_selected=2), **TINY
    )
    return vm.save_pretrained(model.eval(), tmp_path / "m"), model.eval()


@pytest.fixture
def moeified(tmp_path):
    """A tiny timm ViT made MoE by moeify (the recipe is the config's 'moeify' entry)."""
    dense = timm.create_model("vit_tiny_patch16_224", **TINY)
    model = vm.moeify(dense, blocks=[1], num_experts=4)
    return vm.save_pretrained(model.eval(), tmp_path / "t"), model.eval()


def _edit(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def no_real_build(monkeypatch):
    """Fails the test if a model is built anywhere but on the meta device."""
    create = timm.create_model

    def guarded(*args, **kwargs):
        assert torch.get_default_device().type == "meta", "a model was built before the checks"
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", guarded)


@pytest.fixture
def no_build_at_all(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("timm.create_model was called before the config was checked")

    monkeypatch.setattr(timm, "create_model", refuse)


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "depth",
            10**5,
            r"model_args.depth=100000 does not match .*model.safetensors, which holds 2 "
            r"transformer blocks \(blocks.0..1\)",
        ),
        ("embed_dim", 10**6, r"model_args.embed_dim=1000000 does not match .*has hidden size 32"),
        (
            "moe",
            dict(blocks=[1], num_experts=10**9, num_selected=2),
            r"model_args.moe.num_experts=1000000000 does not match "
            r".*has routers with \[4\] experts",
        ),
    ],
)
def test_size_entries_are_checked_against_the_header_before_any_build(
    saved, no_build_at_all, key, value, match
):
    directory, _ = saved
    _edit(directory, lambda c: c["model_args"].__setitem__(key, value))
    with pytest.raises(ValueError, match=match) as err:
        vm.from_pretrained(directory)
    assert "config.json" in str(err.value)


def test_moeify_recipe_is_checked_against_the_header(moeified, no_build_at_all):
    directory, _ = moeified
    _edit(directory, lambda c: c["moeify"]["layer"].__setitem__("num_experts", 10**9))
    with pytest.raises(ValueError, match=r"moeify.layer.num_experts=1000000000 does not match"):
        vm.from_pretrained(directory)
    _edit(directory, lambda c: c["moeify"].update(blocks=[0, 1], layer={"num_experts": 4}))
    with pytest.raises(
        ValueError,
        match=r"moeify.blocks=\[0, 1\] does not match .*MoE routers only "
        r"in \['blocks.1.mlp'\]",
    ):
        vm.from_pretrained(directory)


def test_every_shape_is_compared_on_a_meta_build_before_the_real_one(saved, no_real_build):
    directory, _ = saved
    # Not one of the size entries checked first: caught by comparing the meta model's shapes.
    _edit(directory, lambda c: c["model_args"].__setitem__("mlp_ratio", 4000.0))
    with pytest.raises(
        ValueError,
        match=r"config.json describes a model that does not fit .*"
        r"model.safetensors: wrong shapes .*blocks.0.mlp.fc1.weight: "
        r"file \(64, 32\) vs config \(128000, 32\)",
    ):
        vm.from_pretrained(directory)


def test_a_head_of_another_size_is_an_error_unless_num_classes_is_given(saved):
    directory, model = saved
    _edit(directory, lambda c: c["model_args"].__setitem__("num_classes", 1000))
    # Before: the head silently became a freshly initialized 1000-class head.
    with pytest.raises(ValueError, match=r"head.weight: file \(5, 32\) vs config \(1000, 32\)"):
        vm.from_pretrained(directory)
    tuned = vm.from_pretrained(directory, num_classes=3)
    assert tuned.head.weight.shape == (3, 32)


def test_fine_tuning_loads_everything_but_the_new_head_exactly(saved):
    directory, model = saved
    tuned = vm.from_pretrained(directory, num_classes=7)
    own, new = model.state_dict(), tuned.state_dict()
    assert set(own) == set(new)
    for key in own:
        if key.startswith("head."):
            assert new[key].shape[0] == 7 and own[key].shape[0] == 5
        else:
            assert torch.equal(new[key], own[key]), key
    features = vm.from_pretrained(directory, num_classes=0).eval()
    assert isinstance(features.head, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(features(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_resampled_position_embeddings_equal_timms_resampling(saved):
    from timm.layers import resample_abs_pos_embed

    directory, model = saved
    tuned = vm.from_pretrained(directory, img_size=32)
    assert tuned.pos_embed.shape == (1, 1 + 8 * 8, 32)
    expected = resample_abs_pos_embed(
        model.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=1
    )
    torch.testing.assert_close(tuned.pos_embed.detach(), expected, rtol=0, atol=0)
    assert torch.equal(tuned.pos_embed[:, :1], model.pos_embed[:, :1])  # the class token's, kept
    own, new = model.state_dict(), tuned.state_dict()
    assert all(torch.equal(new[k], own[k]) for k in own if k != "pos_embed")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c.__setitem__("model_args", [["depth", 2]]),
            r"entry 'model_args' must be a JSON object of timm model arguments, "
            r"got \[\['depth', 2\]\]",
        ),
        (
            lambda c: c.__setitem__("architecture", 7),
            r"entry 'architecture' must be a timm model name",
        ),
        (
            lambda c: c.__setitem__("architecture", "no_such_net"),
            r"'no_such_net', which is not a registered timm model",
        ),
        (
            lambda c: c.__setitem__("version", 99),
            r"entry 'version' must be an int in \[1, 2\] \(a newer vmoe",
        ),
        (
            lambda c: c.__setitem__("version", 3),
            r"config.json: entry 'version' must be an int in \[1, 2\]",
        ),
        (lambda c: c.__setitem__("moeify", [1]), r"entry 'moeify' must be null or"),
        (
            lambda c: c.__setitem__("moeify", {"blocks": "1"}),
            r"entry 'moeify' -> 'blocks' must be a non-empty list",
        ),
        (
            lambda c: c.__setitem__("moeify", {"blocks": [1], "layer": 4}),
            r"'moeify' -> 'layer' must be",
        ),
        (
            lambda c: c.__setitem__("moeify", {"blocks": [1], "moe_kwargs": {}}),
            r"'moeify' -> 'moe_kwargs' must be absent in a version-2 file",
        ),
        (
            lambda c: c.__setitem__(
                "moeify", {"blocks": [1], "layer": {"router": {"name": "top_k", "num_selcted": 2}}}
            ),
            r"config.json: entry moeify.layer.router.num_selcted: not an option of router 'top_k'",
        ),
        (
            lambda c: c["model_args"]["moe"]["router"].__setitem__("num_selcted", 2),
            r"config.json: entry model_args.moe.router.num_selcted: "
            r"not an option of router 'top_k'",
        ),
        (
            lambda c: c["model_args"].__setitem__(
                "moe", {"router": {"name": "top_k", "capacity_factor": -1}}
            ),
            r"config.json: entry model_args.moe.router.capacity_factor=-1 "
            r"must be a finite number > 0",
        ),
        (lambda c: c.__setitem__("routing", [1]), r"entry 'routing' must be null or an object"),
        (
            lambda c: c["routing"]["blocks.1.mlp"].pop("capacity"),
            r"entry 'routing' -> 'blocks.1.mlp' must be an object with keys capacity_factor, "
            r"capacity, batch_priority",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity=0),
            r"'routing' -> 'blocks.1.mlp' -> 'capacity': "
            r"capacity=0 must be None or an integer >= 1",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity=-3),
            r"'capacity': capacity=-3 must be None or an integer >= 1",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity=2.5),
            r"'capacity': capacity=2.5 must be None or an integer >= 1",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity_factor=0),
            r"'capacity_factor': capacity_factor=0 must be a finite number > 0 or None",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity_factor=math.nan),
            r"'capacity_factor': capacity_factor=nan must be",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(capacity_factor=None),
            r"'blocks.1.mlp' must be settings with a capacity_factor or a capacity",
        ),
        (
            lambda c: c["routing"]["blocks.1.mlp"].update(batch_priority="yes"),
            r"'batch_priority': batch_priority='yes' must be a bool",
        ),
        (
            lambda c: c["routing"].__setitem__("blocks.0.mlp", c["routing"]["blocks.1.mlp"]),
            r"entry 'routing' names layers \['blocks.0.mlp'\] "
            r"that are not MoE layers .*\['blocks.1.mlp'\]",
        ),
        (
            lambda c: c["model_args"]["routing"]["blocks.1.mlp"].update(capacity=0),
            r"'model_args' -> 'routing' -> 'blocks.1.mlp' -> 'capacity': "
            r"capacity=0 must be None or an integer >= 1",
        ),
        (
            lambda c: c["model_args"]["routing"].__setitem__(
                "blocks.0.mlp", c["routing"]["blocks.1.mlp"]
            ),
            r"entry 'model_args' -> 'routing' names layers \['blocks.0.mlp'\] "
            r"that are not MoE layers",
        ),
    ],
)
def test_malformed_config_entries_are_named(saved, no_build_at_all, edit, match):
    directory, _ = saved
    _edit(directory, edit)
    with pytest.raises(ValueError, match=match) as err:
        vm.from_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


def test_routing_settings_are_restored(saved):
    directory, _ = saved
    _edit(
        directory,
        lambda c: c["routing"]["blocks.1.mlp"].update(
            capacity=3, capacity_factor=None, batch_priority=True
        ),
    )
    router = vm.from_pretrained(directory).blocks[1].mlp.router
    assert (router.capacity, router.capacity_factor, router.batch_priority) == (3, None, True)


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda b: (2**62).to_bytes(8, "little") + b[8:],
            r"header length 4611686018427387904 runs past the end",
        ),
        (lambda b: b[:5], r"fewer than the 8-byte header length"),
        (lambda b: b[:8] + b"[" + b[9:], r"header is not valid JSON"),
        (
            lambda b: b[:-4],
            r"tensor 'pos_embed' \(F32 \[1, 17, 32\], 2176 bytes\) "
            r"has byte offsets \[\d+, \d+\], which do not fit",
        ),
    ],
)
def test_weights_header_is_checked_against_the_file_size(saved, no_build_at_all, damage, match):
    directory, _ = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(
        ValueError, match=r"model.safetensors is not a readable safetensors file.*" + match
    ):
        vm.from_pretrained(directory)


def test_header_declaring_more_than_the_file_holds(saved, no_build_at_all):
    """An entry whose offsets are consistent but lie past the end of the data is refused."""
    directory, _ = saved
    weights = directory / "model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["blocks.1.mlp.experts.fc1_weight"] = {
        "dtype": "F32",
        "shape": [10**9, 32, 64],
        "data_offsets": [0, 10**9 * 32 * 64 * 4],
    }
    new = json.dumps(header).encode()
    weights.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    with pytest.raises(
        ValueError,
        match=r"'blocks.1.mlp.experts.fc1_weight' \(F32 \[1000000000, 32, 64\], "
        r"8192000000000 bytes\) has byte offsets",
    ):
        vm.from_pretrained(directory)


def test_a_non_empty_target_names_the_command_line_flag(saved, tmp_path):
    from vmoe.models.official import convert_vmoe_checkpoint

    directory, model = saved
    with pytest.raises(
        FileExistsError,
        match=r"m exists and is not empty; pass overwrite=True "
        r"\(--overwrite on the command line\)",
    ):
        vm.save_pretrained(model, directory)
    fixture = VMOE_REFERENCE / "vmoe_tiny_a"
    with pytest.raises(FileExistsError, match=r"\(--overwrite on the command line\)"):
        convert_vmoe_checkpoint(fixture, directory)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_during_save_leaves_the_target_as_it_was(tmp_path, monkeypatch, existing):
    from safetensors import SafetensorError

    import vmoe.models.pretrained as pretrained

    model = timm.create_model("vmoe_vit", **TINY)
    target = tmp_path / "m"
    if existing:
        target.mkdir()
        (target / "mine.txt").write_text("keep me")

    def full(
        state, path, metadata=None
    ):  # what safetensors raises on ENOSPC, after a partial write
        Path(path).write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(pretrained, "save_file", full)
    with pytest.raises(
        OSError,
        match=rf"could not write {target}: disk full \(No space left on device\); "
        r"nothing was changed",
    ) as err:
        vm.save_pretrained(model, target, overwrite=existing)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m"] if existing else [])
    if existing:
        assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_a_full_disk_during_convert_leaves_nothing(tmp_path, monkeypatch):
    from vmoe.checkpoints.safetensors_stream import SafetensorsStreamWriter
    from vmoe.models.official import convert_vmoe_checkpoint

    fixture = VMOE_REFERENCE / "vmoe_tiny_a"
    write = SafetensorsStreamWriter.write
    calls = []

    def fills_up(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            _disk_full()
        write(self, name, tensor)

    monkeypatch.setattr(SafetensorsStreamWriter, "write", fills_up)
    out = tmp_path / "out"
    with pytest.raises(
        OSError, match=rf"could not write {out}: disk full \(No space left on device\)"
    ) as err:
        convert_vmoe_checkpoint(fixture, out, group_size=34)
    assert err.value.errno == errno.ENOSPC and len(calls) == 4
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_removes_its_file_when_the_final_flush_fails(tmp_path):
    from vmoe.checkpoints.safetensors_stream import SafetensorsStreamWriter

    path = tmp_path / "w.safetensors"
    writer = SafetensorsStreamWriter(path, {"a": (torch.float32, (4,))})
    writer.write("a", torch.zeros(4))

    class FlushFails:
        closed = False

        def __init__(self, f):
            self.f = f

        def close(self):
            self.f.close()
            _disk_full()

    writer._f = FlushFails(writer._f)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_heads", 3, r"AssertionError"),
        ("bogus_option", 1, r"TypeError: .*bogus_option"),
    ],
)
def test_arguments_timm_refuses_are_named_as_config_errors(saved, no_real_build, key, value, match):
    directory, _ = saved
    _edit(directory, lambda c: c["model_args"].__setitem__(key, value))
    with pytest.raises(
        ValueError,
        match=r"config.json: cannot build 'vmoe_vit' from its "
        r"model_args/moeify entries \(" + match,
    ):
        vm.from_pretrained(directory)
