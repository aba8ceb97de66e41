"""Bad input to the data sources and ``vmoe make-shards``, met where the user meets it: one
line ``vmoe <command>: error: ...`` naming the problem and the file or option, exit code 2, and
nothing written (no shard folder, no checkpoint). Each case failed on main 348d7b1 (a bare
traceback, jsonargparse's multi-line Union dump, litdata's chunk timeout, or silence)."""

import io
import json
import os
import re
import shutil
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

datasets = pytest.importorskip("datasets")
pytest.importorskip("litdata")

from tests.helpers import NO_AUG, last_stderr_line, quiet  # noqa: E402
from vmoe.cli import main  # noqa: E402
from vmoe.data import write_shards  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def png(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def hf_saved(path: Path, labels, n: int = 12) -> Path:
    """A ``save_to_disk`` folder of ``n`` PNGs whose label column holds ``labels`` (plain
    values, no ClassLabel)."""
    images = [{"bytes": png(i * 10), "path": None} for i in range(n)]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": list(labels)},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value(type_of(labels))}
        ),
    )
    datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    return path


def type_of(labels) -> str:
    first = list(labels)[0]
    return (
        "string" if isinstance(first, str) else "float64" if isinstance(first, float) else "int64"
    )


def image_folder(root: Path, classes: int = 3, per_class: int = 4, corrupt=None) -> Path:
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"c{k}" / f"{i}.png").write_bytes(png(k * per_class + i))
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def one_line(capsys, command: str, *patterns: str) -> str:
    line = last_stderr_line(capsys)
    assert line.startswith(f"vmoe {command}: error: "), line
    assert "Traceback" not in line and "Union subtypes" not in line, line
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
    return line


def make_shards(*argv) -> int:
    return main(["make-shards", "--no-progress", *map(str, argv)])


def fit(root: Path, data: str, *extra) -> int:
    """``vmoe fit`` on a data module for at most 2 steps, writing under ``root``."""
    return main(
        [
            "fit",
            *quiet(
                root,
                "--data",
                data,
                "--data.img_size",
                "16",
                "--data.batch_size",
                "4",
                "--data.train_transform",
                NO_AUG,
                "--trainer.max_steps",
                "2",
                "--trainer.num_sanity_val_steps",
                "0",
                "--trainer.logger",
                "false",
                "--test_after_fit",
                "false",
                "--routing_stats.figures",
                "false",
                "--export.enabled",
                "false",
                *map(str, extra),
            ),
        ]
    )


def no_checkpoint(root: Path) -> bool:
    return not list(Path(root).rglob("*.ckpt"))


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("good")
    image_folder(tmp / "src", classes=3, per_class=8)
    write_shards(str(tmp / "src"), str(tmp / "shards"), chunk_bytes="400B", progress=False)
    return tmp / "shards"


def copy_of(shards: Path, where: Path) -> Path:
    shutil.copytree(shards, where)
    return where


# ------------------------------------------------------------------ Hugging Face sources


def test_string_labels_in_a_hf_column_fit_and_make_shards(tmp_path, capsys):
    src = hf_saved(tmp_path / "hf", ["cat", "dog", "eel"] * 4)  # main: ufunc 'maximum' ...
    assert fit(tmp_path / "run", "vmoe.data.HFDataModule", "--data.path", src) == 2
    one_line(capsys, "fit", r"label column 'label' of split 'train' of '.*hf'", r"'cat'")
    assert no_checkpoint(tmp_path / "run")
    assert make_shards("--source", src, "--out", tmp_path / "out") == 2
    one_line(capsys, "make-shards", r"non-integer labels \(row 0: 'cat'\)", "--label-column")
    assert not (tmp_path / "out").exists()


def test_fractional_labels_are_refused_by_make_shards(tmp_path, capsys):
    labels = [0.0, 1.0, 2.0] * 3 + [1.7, 0.0, 1.0]  # main: 1.7 silently became 1
    src = hf_saved(tmp_path / "hf", labels)
    assert make_shards("--source", src, "--out", tmp_path / "out") == 2
    one_line(capsys, "make-shards", r"fractional labels \(row 9: .*1\.7\)", r"of '.*hf'")
    assert not (tmp_path / "out").exists()
    # whole-number floats are class indices: written, labels intact
    whole = hf_saved(tmp_path / "whole", [0.0, 1.0, 2.0] * 4)
    assert make_shards("--source", whole, "--out", tmp_path / "ok") == 0
    assert json.loads((tmp_path / "ok" / "vmoe_shards.json").read_text())["num_classes"] == 3


@pytest.mark.parametrize(
    "damaged", ["dataset_dict.json", "train/dataset_info.json", "train/state.json", "arrow"]
)
def test_a_damaged_save_to_disk_folder_names_the_file(tmp_path, capsys, damaged):
    src = hf_saved(tmp_path / "hf", [0, 1, 2] * 4)
    if damaged == "arrow":
        file = next((src / "train").glob("*.arrow"))
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated
    else:
        file = src / damaged
        file.write_text("{not json")
    assert make_shards("--source", src, "--out", tmp_path / "out") == 2
    kind = "not a whole Arrow file" if damaged == "arrow" else "not valid JSON"
    one_line(capsys, "make-shards", re.escape(str(file)) + f" is {kind}", "save the dataset again")
    assert not (tmp_path / "out").exists()
    assert fit(tmp_path / "run", "vmoe.data.HFDataModule", "--data.path", src) == 2
    one_line(capsys, "fit", re.escape(str(file)))
    assert no_checkpoint(tmp_path / "run")


def test_streaming_with_val_fraction_is_refused(tmp_path, capsys):
    src = hf_saved(tmp_path / "hf", [0, 1, 2] * 4)
    streamed = ["--data.path", src, "--data.streaming", "true", "--data.num_classes", "3"]
    # main: trained with no validation at all, silently
    assert (
        fit(tmp_path / "run", "vmoe.data.HFDataModule", *streamed, "--data.val_fraction", "0.2")
        == 2
    )
    one_line(capsys, "fit", r"val_fraction=0.2 cannot hold out rows of the streamed", "val_split")
    assert no_checkpoint(tmp_path / "run")


def test_val_fraction_too_small_for_the_classes_names_the_option(tmp_path, capsys):
    src = hf_saved(tmp_path / "hf", [0, 1, 2] * 4)  # 12 images, 3 classes
    # main: scikit-learn's "test_size = 1 should be greater or equal to the number of classes"
    args = ["--data.path", src, "--data.val_fraction", "0.1"]
    assert fit(tmp_path / "run", "vmoe.data.HFDataModule", *args) == 2
    one_line(capsys, "fit", r"val_fraction=0.1 holds out 1 of 12 images, fewer than the 3 classes")
    assert no_checkpoint(tmp_path / "run")


# ------------------------------------------------------------------ make-shards


def test_a_corrupt_source_image_is_refused_or_skipped_and_counted(tmp_path, capsys):
    src = image_folder(tmp_path / "src", corrupt="c1/9bad.png")  # main: "wrote 13 images"
    assert make_shards("--source", src, "--out", tmp_path / "out") == 2
    one_line(capsys, "make-shards", r"cannot read image file '.*src/c1/9bad.png'")
    assert not (tmp_path / "out").exists()
    assert make_shards("--source", src, "--out", tmp_path / "out", "--skip-corrupt") == 0
    out = capsys.readouterr().out
    assert "wrote 12 images of 3 classes" in out and "skipped 1 unreadable: c1/9bad.png" in out
    manifest = json.loads((tmp_path / "out" / "vmoe_shards.json").read_text())
    assert manifest["num_images"] == 12 and manifest["skipped"] == ["c1/9bad.png"]


def test_overwrite_removes_the_old_chunks(tmp_path):
    image_folder(tmp_path / "big", per_class=8)
    image_folder(tmp_path / "small", per_class=1)
    out = tmp_path / "out"
    assert make_shards("--source", tmp_path / "big", "--out", out, "--chunk-bytes", "400B") == 0
    before = sorted(p.name for p in out.glob("chunk-*.bin"))
    assert len(before) > 3
    argv = ["--source", tmp_path / "small", "--out", out, "--chunk-bytes", "400B", "--overwrite"]
    assert make_shards(*argv) == 0
    listed = [c["filename"] for c in json.loads((out / "index.json").read_text())["chunks"]]
    assert sorted(p.name for p in out.glob("chunk-*.bin")) == sorted(listed)  # main: all 24
    assert len(listed) < len(before)


@pytest.mark.parametrize("value", ["0", "0B", "-5MB", "abc", "12XB"])
def test_chunk_bytes_not_a_positive_size_names_option_and_value(tmp_path, capsys, value):
    src = image_folder(tmp_path / "src", per_class=1)
    assert make_shards("--source", src, "--out", tmp_path / "out", f"--chunk-bytes={value}") == 2
    one_line(capsys, "make-shards", re.escape(f"--chunk-bytes {value!r} is not a positive size"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ ShardDataModule


def test_shard_module_argument_errors_are_one_line(tmp_path, good_shards, capsys):
    # main: jsonargparse's "Does not validate against any of the Union subtypes ..." dump
    assert fit(tmp_path / "a", "vmoe.data.ShardDataModule", "--data.path", tmp_path / "no") == 2
    one_line(capsys, "fit", r"error: ShardDataModule: shard folder '.*no' does not exist")
    args = ["--data.path", good_shards, "--data.num_classes", "5"]
    assert fit(tmp_path / "b", "vmoe.data.ShardDataModule", *args) == 2
    one_line(capsys, "fit", r"ShardDataModule: num_classes=5 but the shards at .* have 3 classes")
    assert no_checkpoint(tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_chunk_is_named_with_0_and_2_workers(tmp_path, good_shards, capsys, workers):
    shards = copy_of(good_shards, tmp_path / "shards")
    chunk = shards / "chunk-0-3.bin"
    chunk.write_bytes(
        chunk.read_bytes()[:-40]
    )  # main: litdata's wait for the chunk, or a traceback
    args = ["--data.path", shards, "--data.num_workers", workers]
    assert fit(tmp_path / "run", "vmoe.data.ShardDataModule", *args) == 2
    one_line(capsys, "fit", re.escape(str(chunk)) + r" is \d+ bytes, index.json says \d+")
    assert no_checkpoint(tmp_path / "run")


def test_a_garbage_chunk_header_is_named(tmp_path, good_shards, capsys):
    shards = copy_of(good_shards, tmp_path / "shards")
    chunk = shards / "chunk-0-2.bin"
    data = bytearray(chunk.read_bytes())
    data[:8] = b"GARBAGE!"  # same size, header overwritten
    chunk.write_bytes(bytes(data))
    assert fit(tmp_path / "run", "vmoe.data.ShardDataModule", "--data.path", shards) == 2
    one_line(capsys, "fit", re.escape(str(chunk)) + r" is damaged: its header says \d+ items")
    assert no_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("text", ["{not json", '{"config": {}}'])
def test_a_corrupt_index_json_is_named(tmp_path, good_shards, capsys, text):
    shards = copy_of(good_shards, tmp_path / "shards")
    (shards / "index.json").write_text(text)  # main: a bare JSONDecodeError / KeyError
    assert fit(tmp_path / "run", "vmoe.data.ShardDataModule", "--data.path", shards) == 2
    one_line(capsys, "fit", re.escape(str(shards / "index.json")) + " is not a litdata chunk index")
    assert no_checkpoint(tmp_path / "run")


def test_resuming_on_shards_rewritten_with_another_count_is_refused(tmp_path, capsys):
    src = image_folder(tmp_path / "src", classes=3, per_class=8)
    shards = tmp_path / "shards"
    assert make_shards("--source", src, "--out", shards, "--chunk-bytes", "400B") == 0
    run = tmp_path / "run"
    assert fit(run, "vmoe.data.ShardDataModule", "--data.path", shards) == 0
    last = run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    state = torch.load(last, map_location="cpu", weights_only=True)["ShardDataModule"]
    assert state["shards"] == {"num_images": 24, "num_classes": 3}
    (src / "c2" / "7.png").unlink()  # 23 images now; main: "Restored all states", went on
    assert make_shards("--source", src, "--out", shards, "--overwrite") == 0
    capsys.readouterr()
    args = ["--data.path", shards, "--trainer.max_steps", "4", "--ckpt_path", "last"]
    assert fit(run, "vmoe.data.ShardDataModule", *args) == 2
    one_line(capsys, "fit", r"shards of 24 images / 3 classes, but .*shards now holds 23 / 3")
    assert last.read_bytes() == saved  # the checkpoint is untouched
