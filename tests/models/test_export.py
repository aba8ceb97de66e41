"""Deploy: torch.export and ONNX with a dynamic batch, routing carried, batch-independent
inference, ``vmoe export`` (vmoe/models/export.py; the layer's symbolic shape arithmetic in
vmoe/moe/layer.py and vmoe/moe/dispatch/soft.py)."""

import json

import pytest
import timm
import torch
import torch.distributed as dist

import vmoe.models as vm
from tests.helpers import FIXTURES, needs_onnx
from vmoe.cli import main
from vmoe.models import export as ex
from vmoe.moe.routing import _descending_order

EXAMPLE_BATCH = 5
BATCHES = (1, 3, 8, 13)  # 1, odd sizes, a full group of 8 images, partial last groups


def _model(kind):
    """(model, routing options): each router type, with a capacity that drops tokens (so the
    grouping and padding of the batch matter)."""
    torch.manual_seed(0)
    if kind == "top_k":
        return timm.create_model("vmoe_tiny_e4_k2"), dict(capacity_factor=1.05)
    if kind == "bpr":
        return timm.create_model("vmoe_tiny_e4_k2"), dict(capacity_factor=0.5, batch_priority=True)
    if kind == "expert_choice":
        return (
            timm.create_model(
                "vmoe_tiny_e4_k2", moe=dict(router="expert_choice", num_selected=None)
            ),
            dict(capacity_factor=0.5),
        )
    if kind == "soft":
        return timm.create_model("soft_moe_tiny_e8"), {}
    if kind == "deit":  # a moeified timm model, 2 images per routing group
        base = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=4, num_classes=10)
        return vm.moeify(base, every=2, num_experts=4, num_selected=2, group_size_images=2), dict(
            capacity_factor=1.0
        )
    raise AssertionError(kind)


def _images(model, b, seed):
    C, H, W = ex._input_shape(model)
    return torch.randn(b, C, H, W, generator=torch.Generator().manual_seed(seed))


def _eager(model, x, **routing):
    with ex.inference_routing(model, **routing), torch.no_grad():
        return model.eval()(x)


KINDS = ["top_k", "bpr", "expert_choice", "soft", "deit"]


@pytest.mark.parametrize("kind", KINDS)
def test_program_runs_at_every_batch_size(kind):
    """Exported once at batch 5, the program equals eager at 1, 3, 8 and 13 (fails on the code
    before issue 21: 'Constraints violated (batch)')."""
    model, routing = _model(kind)
    program = vm.export_program(model, _images(model, EXAMPLE_BATCH, 0), **routing)
    for b in BATCHES:
        x = _images(model, b, b)
        torch.testing.assert_close(
            program.module()(x), _eager(model, x, **routing), atol=1e-5, rtol=0
        )


@needs_onnx
@pytest.mark.parametrize("kind", ["bpr", "expert_choice", "soft", "deit"])
def test_onnx_runtime_at_every_batch_size(kind, tmp_path):
    """One ONNX file, a dynamic batch axis: ONNX Runtime equals eager within 1e-4 at every
    batch size, and the graph uses standard ONNX operators only (fails before issue 21: no
    ONNX function for aten.sort.stable; Soft MoE ran at multiples of 8 only)."""
    import onnx

    model, routing = _model(kind)
    path = vm.export_onnx(model, tmp_path / "m.onnx", _images(model, EXAMPLE_BATCH, 0), **routing)
    proto = onnx.load(str(path))
    assert {node.domain for node in proto.graph.node} == {""} and not proto.functions
    diffs = vm.check_export(path, model, BATCHES, **routing)
    assert max(diffs.values()) < 1e-4, diffs


@needs_onnx
def test_onnx_stable_descending_order_matches_eager(tmp_path):
    """The TopK lowering of the routers' stable sort: ties lower index first, NaN and +-inf last
    (as -inf, in index order) -- the same permutation as eager, along either axis."""
    import onnxruntime as ort

    class Order(torch.nn.Module):
        def forward(self, x):
            return _descending_order(x, dim=-1), _descending_order(x, dim=0)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (6, 11), generator=g).float() / 4  # many ties
    x[0, 2] = x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    x[3, 4] = x[3, 7] = float("-inf")
    program = torch.export.export(Order(), (x,))
    onnx_program = torch.onnx.export(
        program, dynamo=True, verbose=False, custom_translation_table=ex._sort_stable_to_onnx()
    )
    onnx_program.save(str(tmp_path / "order.onnx"))
    session = ort.InferenceSession(str(tmp_path / "order.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g_, want in zip(got, Order()(x)):
        assert torch.equal(torch.from_numpy(g_), want)


def test_exported_routing_is_the_evaluation_routing(tmp_path):
    """By default the artifact runs the top-K layers dropless, as model.eval() does, whatever
    the model trains with (never what capacity factor 1.05 drops); the model's own settings are
    unchanged; the settings, with each layer's path, travel with the .pt2 file."""
    model, _ = _model("top_k")
    program = vm.export_program(model)
    assert all(layer.capacity_factor == 1.05 for layer in vm.moe_layers(model).values())
    x = _images(model, 8, 1)
    torch.testing.assert_close(program.module()(x), _eager(model, x), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model.eval()(x), atol=1e-5, rtol=0)
    assert (
        program.module()(x) - _eager(model, x, capacity_factor=1.05)
    ).abs().max() > 1e-4  # 1.05 drops
    path = vm.save_program(program, tmp_path / "m.pt2")
    extra = {ex.ROUTING_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    routing = json.loads(extra[ex.ROUTING_FILE])
    assert {(s["path"], s["dropless"]) for s in routing.values()} == {("dropless", True)}


def test_batch_independent_inference():
    """With batch_independent=True an image's logits alone and inside a batch agree to 1e-6
    (eager and exported); without it they do not (groups of 8 images compete for capacity)."""
    model, _ = _model("top_k")
    routing = dict(capacity_factor=0.5)  # tokens compete for places
    batch = _images(model, 8, 2)
    alone = batch[3:4]
    dependent = (
        (_eager(model, batch, **routing)[3] - _eager(model, alone, **routing)[0]).abs().max()
    )
    assert dependent > 1e-5
    program = vm.export_program(model, batch_independent=True, **routing)
    for run in (program.module(), lambda x: _eager(model, x, batch_independent=True, **routing)):
        torch.testing.assert_close(run(batch)[3], run(alone)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(run(batch[1:6])[2], run(alone)[0], atol=1e-6, rtol=0)
    assert all(layer.group_size_images == 8 for layer in vm.moe_layers(model).values())


def test_export_refuses_sharded_experts():
    from vmoe.moe.parallel import ExpertParallelExperts

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model, _ = _model("top_k")
        layer = vm.moe_layers(model)["blocks.1.mlp"]
        layer.experts = ExpertParallelExperts(layer.experts, dist.group.WORLD)
        with pytest.raises(ValueError, match="sharded over processes.*unshard_experts"):
            vm.export_program(model)
    finally:
        dist.destroy_process_group()


def test_export_api_bad_input(tmp_path, monkeypatch):
    model, _ = _model("top_k")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        vm.export_model(model, tmp_path / "m.x", "tflite")
    existing = tmp_path / "m.pt2"
    existing.write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        vm.export_model(model, existing, "pt2")
    assert existing.read_text() == "keep"
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[export\]"'):
        vm.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "model"
    torch.manual_seed(0)
    vm.save_pretrained(timm.create_model("vmoe_tiny_e4_k2"), d)
    return d


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_onnx), "pt2"])
def test_cli_export_end_to_end(fmt, model_dir, tmp_path, capsys):
    out = tmp_path / f"m.{fmt}"
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--format",
                fmt,
                "--out",
                str(out),
                "--capacity-factor",
                "2.0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "max |exported - eager| batch 1:" in printed and "batch 5:" in printed
    model = vm.from_pretrained(model_dir)
    assert max(vm.check_export(out, model, (2, 11), capacity_factor=2.0).values()) < 1e-4
    # Existing output: refused, unchanged; --overwrite replaces it.
    before = out.read_bytes()
    assert main(["export", "--model", str(model_dir), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0]
    assert out.read_bytes() == before


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmoe export: error:") and match in err[0], err


def test_cli_export_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "m.onnx")
    _one_line_error(
        capsys,
        ["export", "--model", str(model_dir), "--format", "tflite", "--out", out],
        "--format 'tflite': choose one of onnx, pt2",
    )
    _one_line_error(
        capsys,
        ["export", "--model", str(tmp_path / "nope"), "--format", "pt2", "--out", out],
        "not a directory",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _one_line_error(
        capsys, ["export", "--model", str(broken), "--format", "pt2", "--out", out], str(broken)
    )
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    _one_line_error(
        capsys,
        ["export", "--model", str(model_dir), "--format", "onnx", "--out", out],
        'pip install -e ".[export]"',
    )
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "prefix", ["vmoe_reference/vmoe_tiny_a", "soft_moe_reference/soft_moe_tiny_s"]
)
def test_imported_official_checkpoints_export(prefix):
    model = vm.from_vmoe_checkpoint(FIXTURES / prefix)
    program = vm.export_program(model)
    assert max(vm.check_export(program, model, (1, 3, 9)).values()) < 1e-5
