"""The notebooks run top to bottom (small settings: VMOE_NOTEBOOK_SMALL=1) without error and show
what they promise. Committed notebooks carry no outputs."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT as REPO

NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, artifacts: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>`` in a fresh python3 kernel, cwd = notebooks/."""
    # The kernel is a child process: it inherits these.
    monkeypatch.setenv("VMOE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("VMOE_NOTEBOOK_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Tiny models gain nothing from threads; on a shared CPU, extra OpenMP threads stall.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # conftest sets MPLBACKEND=Agg for the tests; the kernel must pick its inline backend itself
    # to show figures (vmoe.viz keeps a Jupyter backend).
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(
                out.get("text", "")
                + out.get("data", {}).get("text/plain", "")
                + out.get("data", {}).get("text/markdown", "")
            )
    return "\n".join(parts)


def count_images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook_artifacts")


def test_01_trains_evaluates_and_saves(artifacts, monkeypatch):
    nb = run_notebook("01_train_quickstart.ipynb", artifacts, monkeypatch)
    text = text_outputs(nb)
    accuracy = re.search(r"test accuracy: ([0-9.]+)%", text)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 100.0
    assert (artifacts / "vmoe_tiny_digits" / "model.safetensors").is_file()


def test_02_draws_the_model_saved_by_01(artifacts, monkeypatch):
    if not (artifacts / "vmoe_tiny_digits" / "config.json").is_file():
        run_notebook(
            "01_train_quickstart.ipynb", artifacts, monkeypatch
        )  # run alone: make the model
    nb = run_notebook("02_visualize_routing.ipynb", artifacts, monkeypatch)
    text = text_outputs(nb)
    assert "loaded" in text and "| capacity factor |" in text
    assert count_images(nb) >= 6  # 2 patch maps, priority map, load, class x expert, sweep
    # Soft MoE section: dispatch map, combine entropy, slot similarity, class x expert
    assert count_images(nb) >= 10 and re.search(
        r"blocks\.3\.mlp: the slots mix on average [0-9.]+ of 17", text
    )
    assert "I(class; expert) through the combine weights" in text
    report = json.loads((artifacts / "routing_report" / "report.json").read_text())
    assert (artifacts / "routing_report" / "index.html").is_file() and report["data"][
        "num_images"
    ] == 60


def test_02_trains_a_model_when_01_was_not_run(tmp_path, monkeypatch):
    nb = run_notebook("02_visualize_routing.ipynb", tmp_path, monkeypatch)
    assert "trained a model here" in text_outputs(nb)


def test_03_upcycles_fine_tunes_and_reloads(artifacts, monkeypatch):
    nb = run_notebook("03_finetune_pretrained.ipynb", artifacts, monkeypatch)
    text = text_outputs(nb)
    gap = re.search(r"max \|dense - upcycled\| = ([0-9.e+-]+)", text)
    assert gap and float(gap.group(1)) < 1e-4  # upcycling computes what the dense model does
    assert re.search(r"test accuracy after fine-tuning: [0-9.]+%", text)
    assert "reloaded for 5 classes at 48x48: (2, 5)" in text
