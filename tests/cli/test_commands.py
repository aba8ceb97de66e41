"""The extra `vmoe` subcommands, run through the real entry point."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import vmoe.models as vm
from tests.helpers import VMOE_REFERENCE as FIXTURES
from vmoe.cli import main


def test_convert_then_routing_report_and_capacity_sweep(tmp_path, capsys):
    out = tmp_path / "model_a"
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(out)]) == 0
    model = vm.from_pretrained(out).eval()
    ref = np.load(FIXTURES / "model_a_outputs.npz")
    images = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    vm.set_routing(model, capacity_factor=1.05)
    for layer in vm.moe_layers(model).values():
        layer.group_size, layer.group_size_images = 34, None  # model A's routing groups
    np.testing.assert_allclose(model(images).detach().numpy(), ref["logits"], atol=1e-5)

    report = tmp_path / "report"
    assert (
        main(
            [
                "routing-report",
                "--model",
                str(out),
                "--data",
                "digits",
                "--out",
                str(report),
                "--max-images",
                "24",
                "--batch-size",
                "12",
                "--capacity-factors",
                "0.5",
                "2.0",
                "--no-progress",
            ]
        )
        == 0
    )
    html = (report / "index.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs and html.count("data:image/png;base64,") >= len(pngs)  # every picture embedded
    numbers = json.loads((report / "report.json").read_text())
    assert numbers

    sweep = tmp_path / "sweep"
    assert (
        main(
            [
                "capacity-sweep",
                "--model",
                str(out),
                "--data",
                "digits",
                "--out",
                str(sweep),
                "--max-images",
                "24",
                "--capacity-factors",
                "0.5",
                "4.0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "|" in capsys.readouterr().out  # the markdown table
    assert (sweep / "capacity_sweep.png").is_file()


def test_extra_commands_report_errors_in_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "vmoe convert: error:" in err and "missing.index does not exist" in err
    assert (
        main(
            [
                "routing-report",
                "--model",
                str(tmp_path / "nothing"),
                "--data",
                "digits",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )


def test_routing_report_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(model_dir)]) == 0
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").write_text("my own page")
    args = [
        "routing-report",
        "--model",
        str(model_dir),
        "--data",
        "digits",
        "--out",
        str(out),
        "--max-images",
        "8",
        "--no-sweep",
        "--examples",
        "1",
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vmoe routing-report: error: --out") and "pass --overwrite" in err, err
    assert (out / "index.html").read_text() == "my own page" and len(list(out.iterdir())) == 1
    assert main(args + ["--overwrite"]) == 0
    assert (out / "index.html").read_text() != "my own page" and (out / "report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # staging dir gone


@pytest.mark.parametrize("command", ["convert", "routing-report", "capacity-sweep"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: vmoe {command}" in capsys.readouterr().out


def test_convert_does_not_import_lightning(tmp_path):
    code = (
        "import sys; from vmoe.cli import main; "
        f"code = main(['convert', {str(FIXTURES / 'vmoe_tiny_a')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]); "
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr


def test_a_bad_option_is_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                str(FIXTURES / "vmoe_tiny_a"),
                "--out",
                str(tmp_path),
                "--num-selected",
                "two",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmoe convert: error:") and "num_selected" in err[0]
