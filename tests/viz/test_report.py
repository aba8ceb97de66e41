"""The routing report and its CLI: the page embeds every figure, the JSON numbers are the library
functions' numbers, the CLI runs on a saved model and an image folder, bad input is reported."""

import base64
import json
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import vmoe.models as vm
import vmoe.viz as V
from vmoe.cli import main

NUM_CLASSES = 4
CFS = (0.5, 4.0)


def tiny_model(**moe):
    torch.manual_seed(0)
    # capacity factor 0.75 on the capacity path (dropless=False: eval mode too): some tokens
    # are dropped, so the dropped counts are not all zero
    return timm.create_model(
        "vmoe_tiny_e4_k2",
        num_classes=NUM_CLASSES,
        moe={"capacity_factor": 0.75, "dropless": False, **moe},
    )


def batches(sizes=(8, 8, 8), size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 3, size, size, generator=g),
            torch.randint(0, NUM_CLASSES, (n,), generator=g),
        )
        for n in sizes
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report of 20 of the 24 images (the last batch is cut), with the routing re-recorded."""
    model, data = tiny_model(), batches()
    out = tmp_path_factory.mktemp("report")
    report = V.write_routing_report(
        model,
        data,
        out,
        max_images=20,
        capacity_factors=CFS,
        class_names=["a", "b", "c", "d"],
        progress=False,
    )
    first20 = [data[0], data[1], (data[2][0][:4], data[2][1][:4])]
    assert (
        model.training
    )  # restored by the report; its recording ran in eval mode (no router noise)
    model.eval()
    with torch.no_grad(), V.record_routing(model) as record:
        for x, _ in first20:
            model(x)
    labels = torch.cat([y for _, y in first20]).numpy()
    return dict(model=model, data=first20, out=out, report=report, record=record, labels=labels)


def test_page_embeds_every_figure_and_nothing_external(written):
    out, report = written["out"], written["report"]
    page = (out / "index.html").read_text()
    pngs = [f for f in report["files"] if f.endswith(".png")]
    assert sorted(pngs) == sorted(p.name for p in out.glob("*.png"))
    assert {"priority_map.png", "expert_load.png", "class_expert.png", "capacity_sweep.png"} <= set(
        pngs
    )
    assert len([f for f in pngs if f.startswith("patch_map_")]) == 4
    for name in pngs:
        encoded = base64.b64encode((out / name).read_bytes()).decode()
        assert f'src="data:image/png;base64,{encoded}"' in page, name
    # self-contained: every src is a data URI, one <figcaption> per figure
    assert all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page)
    )
    assert page.count("<figcaption>") == len(pngs)
    assert json.loads((out / "report.json").read_text()) == report


def test_json_numbers_equal_library_functions(written):
    report, record, labels = written["report"], written["record"], written["labels"]
    assert report["data"]["num_images"] == 20
    _, load = V.expert_load(record)
    for i, name in enumerate(load["layers"]):
        got = report["expert_load"]["layers"][name]
        np.testing.assert_array_equal(got["routed"], load["routed"][i])
        np.testing.assert_array_equal(got["kept"], load["kept"][i])
        assert got["capacity"] == load["capacity"][i]
        assert got["dropped_fraction"] == pytest.approx(load["dropped_fraction"][i])
    assert max(v["dropped_fraction"] for v in report["expert_load"]["layers"].values()) > 0
    _, ce = V.class_expert_matrix(record, labels, choice=0)
    for i, name in enumerate(ce["layers"]):
        got = report["class_expert"]["layers"][name]
        np.testing.assert_allclose(got["matrix"], ce["matrix"][i])
        np.testing.assert_allclose(np.sum(got["matrix"], 1), 1.0)
        assert got["mutual_information_bits"] == pytest.approx(ce["mutual_information_bits"][i])
    model, data = written["model"], written["data"]
    plain = V.evaluate(model, data)["accuracy"]
    assert report["accuracy"] == pytest.approx(plain)
    sweep = report["capacity_sweep"]
    assert sweep["reference_accuracy"] == pytest.approx(plain)
    _, again = V.capacity_sweep(model, data, capacity_factors=CFS, reference=False)
    for mode in ("vanilla", "bpr"):
        rows = [r for r in sweep["rows"] if r["routing"] == mode]
        assert [r["capacity_factor"] for r in rows] == list(CFS)
        np.testing.assert_allclose([r["accuracy"] for r in rows], again["accuracy"][mode])
        np.testing.assert_allclose(
            [r["moe_flops_per_image"] for r in rows], again["moe_flops_per_image"][mode]
        )


def test_examples_show_the_recorded_routing(written):
    report, record, labels = written["report"], written["record"], written["labels"]
    examples = report["examples"]
    indices = [e["index"] for e in examples]
    # half of the examples are the images with the most tokens with a dropped choice (so that
    # the maps show drops), the others the first image of each class; in data order
    drops = sum(record.tokens(n).dropped.any(-1).sum(-1) for n in record.layer_names)  # [B]
    most = sorted(np.nonzero(drops)[0].tolist(), key=lambda i: (-drops[i], i))[:2]
    assert len(most) == 2 and indices == sorted(indices)
    firsts = [int(np.nonzero(labels == c)[0][0]) for c in np.unique(labels)]
    rest = [i for i in sorted(firsts) if i not in most][:2]
    assert indices == sorted(most + rest)
    assert sum(sum(e["tokens_with_a_dropped_choice"].values()) for e in examples) > 0
    P, (h, w) = record.num_prefix_tokens, record.grid_size
    for ex in examples:
        assert ex["label"] == labels[ex["index"]]
        for i, name in enumerate(record.layer_names):
            view = record.image(ex["index"], name)
            np.testing.assert_array_equal(ex["expert"][i], view.expert[P:, :2].T.reshape(2, h, w))
            assert ex["tokens_with_a_dropped_choice"][name] == int(view.dropped.any(-1).sum())
    pm = report["priority_map"]
    for name in record.layer_names:
        for mode in ("bpr", "vanilla"):
            skipped = ~record.reroute(name, 0.5, batch_priority=mode == "bpr")[:, P:].any(-1)
            (whatif,) = [
                w for w in pm["whatif"] if (w["routing"], w["capacity_factor"]) == (mode, 0.5)
            ]
            assert whatif["dataset"][name]["skipped_fraction"] == pytest.approx(skipped.mean())


def test_captions_quote_the_numbers(written):
    report, page = written["report"], (written["out"] / "index.html").read_text()
    assert f"{100 * report['accuracy']:.1f}%" in page
    for name, layer in report["class_expert"]["layers"].items():
        assert f"{name} {layer['mutual_information_bits']:.3f}" in page
    for name, layer in report["expert_load"]["layers"].items():
        assert f"{name} {100 * layer['dropped_fraction']:.1f}%" in page
    assert "label a" in page or "label b" in page or "label c" in page or "label d" in page


def test_restores_model_state_and_shows_progress(tmp_path, capsys):
    model = tiny_model().train()
    data = batches((6, 6))
    report = V.write_routing_report(
        model, iter(data), tmp_path, capacity_factors=(1.0,), num_examples=2
    )
    assert model.training
    assert all(
        m.router.capacity_factor == 0.75 and not m.router.batch_priority
        for m in vm.moe_layers(model).values()
    )
    err = capsys.readouterr().err
    assert "recording routing" in err and "capacity sweep" in err
    # a one-shot iterator is kept for the sweep: same numbers as a list
    again = V.write_routing_report(
        model, data, tmp_path / "list", capacity_factors=(1.0,), num_examples=2, progress=False
    )
    assert report["capacity_sweep"]["rows"] == again["capacity_sweep"]["rows"]
    assert report["capacity_sweep"]["num_images"] == 12


def test_expert_choice_model_gets_load_matrix_and_vanilla_sweep(tmp_path):
    model = tiny_model(router="expert_choice", num_selected=1)
    report = V.write_routing_report(
        model, batches((8,)), tmp_path, capacity_factors=(1.0,), progress=False
    )
    assert "examples" not in report and "priority_map" not in report
    assert report["class_expert"]["choice"] is None
    assert {r["routing"] for r in report["capacity_sweep"]["rows"]} == {"vanilla"}
    assert (tmp_path / "index.html").read_text().count("<img") == 3


def test_bad_input_is_named(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="16x16"):
        V.write_routing_report(model, batches((2,), size=32), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no MoE layers"):
        V.write_routing_report(
            nn.Sequential(nn.Linear(2, 2)), batches((2,)), tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="no images"):
        V.write_routing_report(model, [], tmp_path, progress=False)
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        V.write_routing_report(model, [torch.zeros(2, 3, 16, 16)], tmp_path, progress=False)
    with pytest.raises(ValueError, match="max_images"):
        V.write_routing_report(model, batches((2,)), tmp_path, max_images=0, progress=False)
    with pytest.raises(ValueError, match="class_names"):
        V.write_routing_report(
            model,
            [(torch.zeros(2, 3, 16, 16), torch.tensor([0, 3]))],
            tmp_path,
            class_names=["x"],
            progress=False,
            capacity_factors=None,
        )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model and a folder of 3 classes x 3 PNGs of 20x20 pixels (resized to 16)."""
    root = tmp_path_factory.mktemp("cli")
    vm.save_pretrained(tiny_model(), root / "model")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "images" / c / f"{i}.png"
            )
    return root


def test_cli_routing_report_on_image_folder(saved, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "routing-report",
            "--model",
            str(saved / "model"),
            "--data",
            str(saved / "images"),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--capacity-factors",
            "0.5",
            "2",
            "--examples",
            "2",
            "--capacity-factor",
            "0.5",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recorded_with"]["capacity_factor"] == 0.5
    assert report["data"]["num_images"] == 9 and report["data"]["class_names"] == [
        "cat",
        "dog",
        "eel",
    ]
    assert all((out / f).is_file() for f in report["files"]) and len(report["files"]) == 8
    assert report["title"] == f"Routing report: vmoe_tiny_e4_k2 on {saved / 'images'}"
    assert [r["capacity_factor"] for r in report["capacity_sweep"]["rows"]] == [0.5, 2.0, 0.5, 2.0]
    assert "index.html" in capsys.readouterr().out


def test_cli_capacity_sweep_prints_table(saved, tmp_path, capsys):
    code = main(
        [
            "capacity-sweep",
            "--model",
            str(saved / "model"),
            "--data",
            str(saved / "images"),
            "--max-images",
            "6",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
            "--capacity-factors",
            "0.25",
            "1",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    rows = [ln for ln in printed.splitlines() if re.match(r"\| [0-9.]+ \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["0.25", "1", "4"]
    numbers = json.loads((tmp_path / "capacity_sweep.json").read_text())
    assert numbers["num_images"] == 6
    assert f"{100 * numbers['accuracy']['bpr'][0]:.1f}%" in rows[0]
    assert (tmp_path / "capacity_sweep.png").stat().st_size > 0


def test_cli_errors_are_one_line(saved, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert (
        main(["routing-report", "--model", str(tmp_path / "missing"), "--data", "digits"] + base)
        == 2
    )
    assert "--model" in capsys.readouterr().err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert (
        main(
            ["routing-report", "--model", str(saved / "model"), "--data", str(tmp_path / "empty")]
            + base
        )
        == 2
    )
    assert "without any image" in capsys.readouterr().err
    for c in "abcde":  # 5 classes, the model has 4
        (tmp_path / "many" / c).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "many" / c / "x.png")
    assert (
        main(
            ["capacity-sweep", "--model", str(saved / "model"), "--data", str(tmp_path / "many")]
            + base
        )
        == 2
    )
    assert "num_classes=4" in capsys.readouterr().err
    assert main(["routing-report", "--model", str(saved / "model"), "--data", "digits"] + base) == 2
    assert "10 classes" in capsys.readouterr().err
    assert main(["routing-report", "--model", str(saved / "model"), "--out", str(tmp_path)]) == 2
    assert "required: data" in capsys.readouterr().err


def test_report_says_how_it_recorded_and_records_at_a_capacity_factor(tmp_path):
    """By default a report records with the evaluation routing, dropless for top-K layers
    (nothing dropped, said on the page); record_capacity_factor records on the capacity path
    at that factor (tokens dropped) and leaves the model's routing as it was."""
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=NUM_CLASSES)  # dropless in eval
    data = batches()
    default = V.write_routing_report(
        model, data, tmp_path / "a", capacity_factors=None, progress=False
    )
    assert set(default["recorded_with"]["paths"].values()) == {"dropless"}
    drops = [sum(ex["tokens_with_a_dropped_choice"].values()) for ex in default["examples"]]
    assert drops == [0] * len(drops)
    assert "no token is dropped" in (tmp_path / "a" / "index.html").read_text()

    at = V.write_routing_report(
        model,
        data,
        tmp_path / "b",
        capacity_factors=None,
        progress=False,
        record_capacity_factor=0.5,
    )
    assert set(at["recorded_with"]["paths"].values()) == {"capacity"}
    assert at["recorded_with"]["capacity_factor"] == 0.5
    assert sum(sum(ex["tokens_with_a_dropped_choice"].values()) for ex in at["examples"]) > 0
    page = (tmp_path / "b" / "index.html").read_text()
    assert "no token is dropped" not in page and "capacity factor <span" in page
    model.eval()
    assert all(m.routes_dropless for m in vm.moe_layers(model).values())  # restored
