"""Helpers shared by the tests: the repository paths, the fixture folders, small ``vmoe fit``
command lines (in-process and as a subprocess) and a generated image folder."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VMOE_REFERENCE = FIXTURES / "vmoe_reference"
SOFT_MOE_REFERENCE = FIXTURES / "soft_moe_reference"
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
NO_AUG = "{scale: [1.0, 1.0], ratio: [1.0, 1.0], randaugment_num_ops: 0, hflip_prob: 0.0}"


def quiet(root, *extra):
    """The options every in-process ``vmoe fit`` of the tests starts with: the quickstart config,
    1 thread, no progress bar or model summary, everything written under ``root``."""
    return [
        "--config",
        QUICKSTART,
        "--torch_num_threads",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def fast(root, *extra):
    """``quiet`` with CSV logs of every step (read back by ``read_metrics``)."""
    return quiet(
        root,
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s}}" % root,
        *extra,
    )


def last_stderr_line(capsys):
    """The last line the command wrote to stderr; there is one and no traceback came with it."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert not any(line.startswith("Traceback") for line in lines), lines
    return lines[-1]


def read_metrics(root):
    rows = list(csv.DictReader(open(next(Path(root).glob("lightning_logs/version_*/metrics.csv")))))
    return rows


def series(rows, key):
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def make_image_folder(path: Path, per_split=(12, 4, 4), size=16, seed=0):
    """3 classes told apart by where the bright half is (top, left, bottom-right diagonal)."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((size, size), bool) for _ in range(3)]
    masks[0][: size // 2] = True
    masks[1][:, : size // 2] = True
    masks[2] = np.add.outer(np.arange(size), np.arange(size)) >= size
    for split, count in zip(("train", "val", "test"), per_split):
        for c, name in enumerate(("top", "left", "diag")):
            (path / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img[masks[c]] += 150
                Image.fromarray(img).save(path / split / name / f"{i}.png")
    return path


def cli_subprocess(root, *extra, timeout=400):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "vmoe.cli",
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger",
        "false",
        "--test_after_fit",
        "false",
        "--routing_stats.figures",
        "false",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _onnx_installed() -> bool:
    from vmoe.models import export

    try:
        export.require_onnx()
    except ImportError:
        return False
    return True


# Tests of the ONNX path: skipped only where the export extra is not installed (CI installs it).
def _needs_onnx():
    from vmoe.models.export import EXPORT_EXTRA

    return pytest.mark.skipif(
        not _onnx_installed(), reason=f"the export extra is not installed ({EXPORT_EXTRA})"
    )


needs_onnx = _needs_onnx()
