"""End-to-end ``vmoe`` CLI runs: a few training steps on digits and on a generated image folder
(loss goes down, checkpoint/log/export/picture files appear), validate/test/predict on the saved
checkpoint, and one-line errors with exit code 2 for configuration mistakes."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vmoe.data
import vmoe.models as vm
from tests.helpers import NO_AUG, fast, last_stderr_line, make_image_folder, read_metrics, series
from vmoe.cli import COMMANDS, LIGHTNING_COMMANDS, Command, main
from vmoe.data import DigitsDataModule
from vmoe.train import build_model


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    code = main(
        [
            "fit",
            *fast(
                root,
                "--trainer.max_epochs",
                "3",
                "--trainer.limit_train_batches",
                "12",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.limit_test_batches",
                "1",
                "--model.warmup_steps",
                "2",
                "--model.label_smoothing",
                "0",
                "--data.init_args.train_transform",
                NO_AUG,
                "--routing_stats.every_n_steps",
                "4",
            ),
        ]
    )
    assert code == 0
    return root


def test_fit_digits_trains_and_writes_everything(digits_run, capsys):
    root = digits_run
    rows = read_metrics(root)
    loss = series(rows, "train/loss")
    assert len(loss) == 36
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.1  # it learns
    assert series(rows, "val/acc1") and series(rows, "test/acc1")
    assert len(series(rows, "routing/blocks.1/dropped_fraction")) == 9  # steps 0, 4, ..., 32
    assert all(0 <= v <= 1 for v in series(rows, "val_routing/blocks.3/dropped_fraction"))
    assert all(v > 0 for v in series(rows, "routing/blocks.3/importance_loss"))
    ckpts = root / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-epoch*-step*.ckpt"))
    log_dir = next(root.glob("lightning_logs/version_*"))
    for name in ("expert_load.png", "routing_map.png"):
        assert (log_dir / "routing" / name).stat().st_size > 1000
    model = vm.from_pretrained(root / "export")  # the best checkpoint, exported
    best = next(ckpts.glob("best-*.ckpt"))
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["head.weight"], state["model.head.weight"])


def checkpoint_model(path, capacity_factor=4.0):
    """The checkpoint's network rebuilt without Lightning, at the evaluation routing."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    model = build_model(
        model_name=hp["model_name"],
        model_kwargs=hp["model_kwargs"],
        num_classes=hp["num_classes"],
        img_size=hp["img_size"],
    )
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    vm.set_routing(model, capacity_factor=capacity_factor)
    return model.eval()


def newest_metrics(root):
    version = max(
        Path(root).glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1])
    )
    return list(csv.DictReader(open(version / "metrics.csv")))


def test_validate_test_predict_from_checkpoint(digits_run, capsys):
    last = str(digits_run / "checkpoints" / "last.ckpt")
    model = checkpoint_model(last)
    dm = DigitsDataModule(
        img_size=16, batch_size=32
    )  # quickstart's data: whole val and test splits
    dm.setup("fit")
    for command, split, data in (("validate", "val", dm.val_set), ("test", "test", dm.test_set)):
        assert main([command, *fast(digits_run, "--ckpt_path", last)]) == 0, command
        x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
        with torch.no_grad():
            expected = (model(x).argmax(-1) == y).float().mean().item()
        assert series(newest_metrics(digits_run), f"{split}/acc1") == [
            pytest.approx(expected, abs=1e-6)
        ]

    assert main(["predict", *fast(digits_run, "--ckpt_path", last)]) == 0
    path = digits_run / "predictions.csv"
    assert f"wrote 180 predictions to {path}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(path)))
    x, y = next(iter(torch.utils.data.DataLoader(dm.test_set, batch_size=180)))
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top_p, top_i = probs.topk(5, dim=-1)
    assert [r["image"] for r in rows] == [
        str(i) for i in range(180)
    ]  # digits: indices in the test set
    assert [r["label"] for r in rows] == [str(int(v)) for v in y]
    for k in range(5):
        assert [r[f"top{k + 1}"] for r in rows] == [str(int(v)) for v in top_i[:, k]]
        got = torch.tensor([float(r[f"prob{k + 1}"]) for r in rows])
        assert torch.allclose(got, top_p[:, k], atol=2e-6)

    # with each image's expert usage: recomputed from the plans of the same batches (48 images)
    usage_csv = digits_run / "usage.csv"
    assert (
        main(
            [
                "predict",
                *fast(
                    digits_run,
                    "--ckpt_path",
                    last,
                    "--predictions.path",
                    str(usage_csv),
                    "--predictions.expert_usage",
                    "true",
                ),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(usage_csv)))
    assert list(rows[0])[12:] == [
        f"blocks.{b}.mlp/{c}" for b in (1, 3) for c in ("e0", "e1", "e2", "e3", "dropped")
    ]
    for start in range(0, 180, 48):
        with torch.no_grad():
            model(x[start : start + 48])
        for name, layer in vm.moe_layers(model).items():
            plan = layer.last_plan
            images = len(x[start : start + 48])
            expert = plan.expert_index.reshape(-1, 2)[: images * 17].reshape(images, 17 * 2)
            kept = plan.kept.reshape(-1, 2)[: images * 17].reshape(images, 17 * 2)
            for e in range(4):
                want = ((expert == e) & kept).float().mean(1)
                got = torch.tensor([float(r[f"{name}/e{e}"]) for r in rows[start : start + 48]])
                assert torch.allclose(got, want, atol=2e-6), (name, e)
            dropped = torch.tensor([float(r[f"{name}/dropped"]) for r in rows[start : start + 48]])
            assert torch.allclose(dropped, 1 - kept.float().mean(1), atol=2e-6)


def test_fit_image_folder(tmp_path):
    data = make_image_folder(tmp_path / "folder")
    root = tmp_path / "run"
    code = main(
        [
            "fit",
            *fast(
                root,
                "--data",
                "vmoe.data.ImageFolderDataModule",
                "--data.data_dir",
                str(data),
                "--data.img_size",
                "16",
                "--data.batch_size",
                "6",
                "--trainer.max_epochs",
                "3",
                "--model.warmup_steps",
                "1",
                "--model.lr",
                "2e-3",
                "--model.label_smoothing",
                "0",
            ),
        ]
    )
    assert code == 0
    rows = read_metrics(root)
    loss = series(rows, "train/loss")
    assert len(loss) == 18 and np.mean(loss[-3:]) < np.mean(loss[:3])
    assert (root / "export" / "config.json").is_file()
    assert vm.from_pretrained(root / "export").num_classes == 3
    assert (root / "checkpoints" / "last.ckpt").is_file()

    # predict on a folder of unlabeled images (any layout), classes named as the train folders
    loose = tmp_path / "loose"
    (loose / "sub").mkdir(parents=True)
    images = sorted((data / "test").glob("*/*.png"))[::2]
    for i, src in enumerate(images):
        (loose / ("sub" if i % 2 else "") / f"img{i}.png").write_bytes(src.read_bytes())
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                *fast(
                    root,
                    "--data",
                    "vmoe.data.ImageFolderDataModule",
                    "--data.data_dir",
                    str(data),
                    "--data.img_size",
                    "16",
                    "--data.predict_dir",
                    str(loose),
                    "--predictions.path",
                    str(out),
                    "--ckpt_path",
                    str(root / "checkpoints" / "last.ckpt"),
                ),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(out)))
    model = checkpoint_model(root / "checkpoints" / "last.ckpt")
    dm = vmoe.data.ImageFolderDataModule(str(data), img_size=16, predict_dir=str(loose))
    dm.setup("predict")
    assert [r["image"] for r in rows] == [str(p) for p in dm.predict_set.paths] and len(
        rows
    ) == len(images)
    x = torch.stack([dm.predict_set[i] for i in range(len(rows))])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    names = ["diag", "left", "top"]
    assert all(r["label"] == "" for r in rows) and list(rows[0])[-2:] == ["top3", "prob3"]
    assert [r["top1"] for r in rows] == [names[i] for i in probs.argmax(-1).tolist()]
    assert torch.allclose(
        torch.tensor([float(r["prob1"]) for r in rows]), probs.max(-1).values, atol=2e-6
    )


def one_line_error(capsys, pattern):
    last = last_stderr_line(capsys)
    assert last.startswith("vmoe ") and re.search(pattern, last), last
    return last


def test_unknown_config_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lrr: 0.1\n")
    assert main(["fit", *fast(tmp_path, "--config", str(bad))]) == 2
    one_line_error(
        capsys,
        r"model\.lrr \(in a --config file\): not an option of vmoe fit; did you mean "
        r"model\.lr ",
    )
    assert main(["fit", *fast(tmp_path, "--trainer.max_epohs", "1")]) == 2
    one_line_error(
        capsys,
        r"--trainer\.max_epohs: not an option of vmoe fit; did you mean --trainer\.max_epochs",
    )


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path,
                    "--data",
                    "vmoe.data.ImageFolderDataModule",
                    "--data.data_dir",
                    str(missing),
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, re.escape(str(missing)) + ".*does not exist")


def test_num_classes_mismatch(tmp_path, digits_run, capsys):
    data = make_image_folder(tmp_path / "folder", per_split=(2, 2, 2))
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path,
                    "--data",
                    "vmoe.data.ImageFolderDataModule",
                    "--data.data_dir",
                    str(data),
                    "--data.num_classes",
                    "5",
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, "num_classes=5 but .* has 3")
    # a 10-class checkpoint tested on 3-class data
    assert (
        main(
            [
                "test",
                *fast(
                    tmp_path,
                    "--data",
                    "vmoe.data.ImageFolderDataModule",
                    "--data.data_dir",
                    str(data),
                    "--data.img_size",
                    "16",
                    "--ckpt_path",
                    str(digits_run / "checkpoints" / "last.ckpt"),
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, "num_classes=10 but this model/data has num_classes=3")


def test_corrupt_image_is_named(tmp_path, capsys):
    data = make_image_folder(tmp_path / "folder", per_split=(2, 2, 2))
    broken = data / "train" / "top" / "broken.png"
    broken.write_bytes(b"not an image at all")
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path,
                    "--data",
                    "vmoe.data.ImageFolderDataModule",
                    "--data.data_dir",
                    str(data),
                    "--data.img_size",
                    "16",
                    "--trainer.max_steps",
                    "2",
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, re.escape(str(broken)))


def test_commands_dispatch_before_lightning(monkeypatch, capsys):
    calls = []
    hello = Command(
        "say hello",
        lambda p: p.add_argument("--x", type=int),
        lambda args: calls.append(args.x) or 7,
    )
    monkeypatch.setitem(COMMANDS, "hello", hello)
    assert main(["hello", "--x", "1"]) == 7 and calls == [1]
    assert not set(COMMANDS) & set(LIGHTNING_COMMANDS)  # a command never hides a Lightning one
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "say hello" in out and "fit" in out


@pytest.mark.parametrize(
    "data, extra, img_size, batch_size",
    [
        ("vmoe.data.DigitsDataModule", [], 16, 64),
        ("vmoe.data.ImageFolderDataModule", ["--data.data_dir", "images"], 224, 128),
        ("vmoe.data.CIFAR10DataModule", [], 32, 128),
    ],
)
def test_data_options_passed_on_as_kwargs_are_listed_and_checked(
    data, extra, img_size, batch_size, capsys
):
    """The data modules hand the base class's options on as ``**kwargs``: LightningCLI still
    shows them with their defaults, parses them and refuses a misspelt one."""
    import yaml

    assert (
        main(["fit", "--data", data, *extra, "--data.eval_batch_size", "7", "--print_config"]) == 0
    )
    args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    base = {
        "img_size": img_size,
        "batch_size": batch_size,
        "eval_batch_size": 7,
        "num_workers": 0,
        "pin_memory": False,
        "drop_last": False,
        "mean": None,
        "std": None,
        "train_transform": None,
        "eval_transform": None,
    }
    assert {k: args.get(k, "missing") for k in base} == base
    assert main(["fit", "--data", data, *extra, "--data.batch_sise", "8", "--print_config"]) == 2
    one_line_error(capsys, "batch_sise")
    assert (
        main(["fit", "--data", data, *extra, "--data.num_workers", "many", "--print_config"]) == 2
    )
    one_line_error(capsys, "num_workers")
