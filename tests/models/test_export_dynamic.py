"""Artifacts with a dynamic batch: vmoe's export and a bare client's torch.export / ONNX export
of a vmoe_* model, a Soft MoE and a moeified timm ViT equal eager at B = 1, 3, 8, 13, 33; the
artifact records which path each MoE layer runs; exporting assigns no tensor attribute.

The exported artifacts are built once per module (exports are slow) and shared by the tests.
"""

import json
import warnings

import pytest
import timm
import torch
from torch.export import Dim

import vmoe.models as vm
from vmoe.models import export as ex
from vmoe.moe import moe_layers

pytest.importorskip("onnxruntime")
import onnxruntime as ort  # noqa: E402

BATCHES = (1, 3, 8, 13, 33)
SHAPE = (3, 32, 32)


def _model(kind):
    torch.manual_seed(0)
    if kind == "vmoe":
        model = timm.create_model("vmoe_tiny_e4_k2", img_size=32, num_classes=5)
    elif kind == "soft":
        model = timm.create_model("soft_moe_tiny_e8", img_size=32, num_classes=5)
    else:  # a timm ViT made MoE by moeify
        model = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=4
        )
        vm.moeify(model, every=2, num_experts=4, num_selected=2)
    for layer in moe_layers(model).values():  # experts that differ, so routing matters
        torch.nn.init.normal_(layer.experts.fc1_weight, std=0.1)
    return model.eval()


def _batch(b):
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(b))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """{kind: (model, exported program, ONNX Runtime session, warnings while exporting, whether
    the layers' attributes were left unset)}, exported the way any client would, no wrapper."""
    out = {}
    for kind in ("vmoe", "soft", "moeified"):
        model = _model(kind)
        dynamic = ({0: Dim("batch", min=1, max=64)},)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program = torch.export.export(model, (_batch(3),), dynamic_shapes=dynamic)
        path = tmp_path_factory.mktemp("bare") / f"{kind}.onnx"
        onnx_program = torch.onnx.export(
            model, (_batch(3),), dynamo=True, dynamic_shapes=dynamic, verbose=False
        )
        onnx_program.save(str(path))
        untouched = all(
            m.aux_loss is None and m.last_plan is None and m.aux_losses == {}
            for m in moe_layers(model).values()
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[kind] = (model, program, session, [str(w.message) for w in caught], untouched)
    return out


@pytest.mark.parametrize("kind", ["vmoe", "soft", "moeified"])
def test_bare_torch_export_and_onnx_run_every_batch_size(bare, kind):
    model, program, session, _, _ = bare[kind]
    module = program.module()
    name = session.get_inputs()[0].name
    with torch.no_grad():
        for b in BATCHES:
            x = _batch(b)
            want = model(x)
            torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-5)
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_exporting_assigns_no_tensor_attribute(bare):
    for kind, (_, _, _, messages, untouched) in bare.items():
        attribute = [m for m in messages if "aux_loss" in m or "last_plan" in m]
        assert attribute == [], kind  # torch's "tensor attributes ... assigned" UserWarning
        assert untouched, kind  # export (and ONNX export) set no aux_loss / last_plan


@pytest.fixture(scope="module")
def vmoe_artifacts(tmp_path_factory):
    """vmoe's own export of the tiny V-MoE: the default (dropless) program and ONNX file, and
    the capacity path at the paper's 4.0."""
    model = _model("vmoe")
    tmp = tmp_path_factory.mktemp("vmoe")
    dropless = ex.export_program(model, _batch(3))
    capacity = ex.export_program(model, _batch(3), capacity_factor=4.0)
    onnx_path = ex.export_onnx(model, tmp / "m.onnx", _batch(3))
    pt2_path = ex.save_program(dropless, tmp / "m.pt2")
    return model, dropless, capacity, onnx_path, pt2_path


def test_vmoe_export_runs_dropless_and_records_the_path(vmoe_artifacts):
    import onnx

    model, dropless, capacity, onnx_path, pt2_path = vmoe_artifacts
    routing = dropless.graph_module.meta["vmoe_routing"]
    assert {s["path"] for s in routing.values()} == {"dropless"}
    assert all(s["dropless"] for s in routing.values())
    assert {s["path"] for s in capacity.graph_module.meta["vmoe_routing"].values()} == {"capacity"}
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert {s["path"] for s in json.loads(props["vmoe.routing"]).values()} == {"dropless"}
    extra = {"vmoe_routing.json": ""}
    torch.export.load(str(pt2_path), extra_files=extra)
    assert json.loads(extra["vmoe_routing.json"]) == routing
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program, name = dropless.module(), session.get_inputs()[0].name
    with torch.no_grad():
        for b in BATCHES:
            x = _batch(b)
            want = model(x)  # eval mode: dropless by default
            torch.testing.assert_close(program(x), want, rtol=1e-4, atol=1e-5)
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            # an image alone = the same image in the batch, in the artifact too
            torch.testing.assert_close(program(x[-1:]), program(x)[-1:], rtol=1e-4, atol=1e-5)
    # the capacity program equals eager on the capacity path at 4.0
    with ex.inference_routing(model, capacity_factor=4.0), torch.no_grad():
        for b in (1, 13):
            x = _batch(b)
            torch.testing.assert_close(capacity.module()(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(layer.dropless for layer in moe_layers(model).values())  # restored
