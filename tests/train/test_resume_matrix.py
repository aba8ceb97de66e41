"""Exact resume on every data source and both ways a run stops.

For each source (digits, CIFAR-10 faked from local binary files, an image folder, a Hugging
Face ``save_to_disk`` folder map-style and streaming, ``vmoe make-shards`` shards) and each
stop (a ``--trainer.max_steps`` stop, then a longer ``max_steps`` with ``--ckpt_path last``; a
Ctrl-C in the middle of a step, which writes ``last.ckpt`` on the exception, then
``--ckpt_path last``), the two halves together equal one uninterrupted run: the same samples in
the same order at every step, the same epoch numbers, the same global torch RNG stream and
weights within 1e-6. Each step's samples are recorded by their content (images of the image
sources carry their id in their pixels; the transforms are deterministic), the RNG as a digest
of torch's global generator after the step.

The run crosses an epoch end (6 or 7 batches an epoch, 9 steps) and stops at step 4, mid
epoch 0.
"""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import NO_AUG, quiet
from vmoe.cli import main

STOP, TOTAL = 4, 9  # the stop is mid epoch 0; an epoch is 6 batches (CIFAR's 7)
IMAGES, BATCH = 22, 4  # 5 full batches and one of 2


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()[:12]


class RecordSteps(L.Callback):
    """Appends one JSON line per trained step to ``path``: the step, the epoch, a digest of
    every sample of the batch and of torch's global RNG state after the step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x, y = batch[0], batch[1]
        row = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "ids": [_digest(xi) + f"/{int(yi)}" for xi, yi in zip(x, y)],
            "rng": _digest(torch.get_rng_state()),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class KillMidStep(L.Callback):
    """Ctrl-C after the forward of the step after ``step`` (batch taken, router noise drawn)."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _id_image(i: int, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, 255 - i % 256
    return img


def _image_tree(root: Path, splits=(("train", IMAGES), ("val", 4))) -> Path:
    """``root/<split>/c<k>/<id>.png``, 2 classes, each image's id in its pixels."""
    n = 0
    for split, count in splits:
        for i in range(count):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_id_image(n)).save(folder / f"{n:04d}.png")
            n += 1
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Command-line options of each source (all made here, no network)."""
    tmp = tmp_path_factory.mktemp("sources")
    tree = _image_tree(tmp / "tree")
    out = {
        "digits": ["--data.init_args.batch_size", "256"],  # 1437 images: 6 batches an epoch
        "imagefolder": [
            "--data",
            "vmoe.data.ImageFolderDataModule",
            "--data.data_dir",
            str(tree),
            "--data.test_split",
            "null",
        ],
    }
    # CIFAR-10's binary records, 5 per train file (the spec is shrunk to match in the test)
    cifar = tmp / "cifar" / "cifar-10-batches-bin"
    cifar.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}.bin", 5) for i in range(1, 6)] + [("test_batch.bin", 5)]:
        records = np.concatenate(
            [rng.integers(0, 10, (count, 1)), rng.integers(0, 256, (count, 3072))], axis=1
        )
        (cifar / name).write_bytes(records.astype(np.uint8).tobytes())
    out["cifar"] = [
        "--data",
        "vmoe.data.CIFAR10DataModule",
        "--data.data_dir",
        str(tmp / "cifar"),
        "--data.download",
        "false",
        "--data.val_fraction",
        "0",
        "--data.img_size",
        "16",
    ]
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("imagefolder", data_dir=str(tree / "train"))
    hf.save_to_disk(str(tmp / "hf"))
    for name, streaming in (("hf", "false"), ("hf_stream", "true")):
        out[name] = [
            "--data",
            "vmoe.data.HFDataModule",
            "--data.path",
            str(tmp / "hf"),
            "--data.val_fraction",
            "0",
            "--data.streaming",
            streaming,
            "--data.shuffle_buffer",
            "8",
        ]
    pytest.importorskip("litdata")
    from vmoe.data import write_shards

    write_shards(str(tree / "train"), str(tmp / "shards"), chunk_bytes="400B", progress=False)
    out["shards"] = ["--data", "vmoe.data.ShardDataModule", "--data.path", str(tmp / "shards")]
    return out


def _fit(root: Path, source_args, log: Path, steps: int, *extra) -> int:
    args = quiet(
        root,
        *source_args,
        "--data.init_args.img_size",
        "16",
        "--data.init_args.train_transform",
        NO_AUG,
        "--trainer.logger",
        "false",
        "--trainer.deterministic",
        "true",
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_epochs",
        "-1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.warmup_steps",
        "2",
        "--model.schedule_steps",  # the same schedule whatever max_steps the run stops at
        str(TOTAL),
        "--test_after_fit",
        "false",
        "--export.enabled",
        "false",
        "--routing_stats.figures",
        "false",
        "--last_checkpoint.every_n_train_steps",
        "0",
        "--trainer.callbacks+=tests.train.test_resume_matrix.RecordSteps",
        f"--trainer.callbacks.path={log}",
        *extra,
    )
    if not any(a == "--data.init_args.batch_size" for a in source_args):
        args += ["--data.init_args.batch_size", str(BATCH)]
    return main(["fit", *args])


def _rows(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _weights(root: Path) -> dict:
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == TOTAL
    return ckpt["state_dict"]


@pytest.fixture
def small_cifar(monkeypatch):
    from vmoe.data.cifar import CIFAR10DataModule

    spec = replace(CIFAR10DataModule.spec, records_per_train_file=5, records_per_test_file=5)
    monkeypatch.setattr(CIFAR10DataModule, "spec", spec)


SOURCES = ["digits", "cifar", "imagefolder", "hf", "hf_stream", "shards"]
_straight: dict = {}


@pytest.mark.parametrize("stop", ["max_steps", "ctrl_c"])
@pytest.mark.parametrize("source", SOURCES)
def test_resumed_run_equals_the_uninterrupted_one(
    source, stop, sources, tmp_path_factory, small_cifar
):
    if source not in _straight:  # one uninterrupted run per source, shared by both stops
        root = tmp_path_factory.mktemp(f"{source}-straight")
        assert _fit(root, sources[source], root / "steps.jsonl", TOTAL) == 0
        _straight[source] = (_rows(root / "steps.jsonl"), _weights(root))
    rows, weights = _straight[source]
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    epochs = [r["epoch"] for r in rows]
    assert epochs[STOP] == 0 and epochs[-1] == 1  # the stop is mid epoch 0, the run crosses

    root = tmp_path_factory.mktemp(f"{source}-{stop}")
    log = root / "steps.jsonl"
    if stop == "max_steps":
        assert _fit(root, sources[source], log, STOP) == 0
    else:
        kill = [
            "--trainer.callbacks+=tests.train.test_resume_matrix.KillMidStep",
            "--trainer.callbacks.step",
            str(STOP),
        ]
        assert _fit(root, sources[source], log, TOTAL, *kill) == 130
    assert len(_rows(log)) == STOP
    assert _fit(root, sources[source], log, TOTAL, "--ckpt_path", "last") == 0
    resumed = _rows(log)
    for key in ("step", "epoch", "ids", "rng"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], f"{key} differ"
    got = _weights(root)
    diff = max((got[k].float() - weights[k].float()).abs().max().item() for k in weights)
    assert diff <= 1e-6, diff
