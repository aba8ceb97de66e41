"""Every user mistake in a ``vmoe`` command ends with one line ``vmoe <cmd>: error: ...`` and exit
code 2 (no traceback); the options given win over a checkpoint's hyper-parameters."""

import errno
import json
import os
import re

import lightning as L
import pytest
import torch

import vmoe.models as vm
from tests.helpers import VMOE_REFERENCE as FIXTURES
from tests.helpers import fast, last_stderr_line, make_image_folder
from vmoe.cli import main
from vmoe.train import AtomicCheckpointIO

SMALL = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "4",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--test_after_fit",
    "false",
    "--export.enabled",
    "false",
    "--routing_stats.figures",
    "false",
]


def one_line_error(capsys, command, pattern):
    line = last_stderr_line(capsys)
    assert line.startswith(f"vmoe {command}: error: ") and re.search(pattern, line), line
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    assert main(["fit", *fast(root, *SMALL)]) == 0
    return root


class RecordRouting(L.Callback):
    """Remembers the routing settings of every MoE layer at the first evaluation batch."""

    seen = []

    def _record(self, pl_module):
        RecordRouting.seen.append(
            {
                n: (m.router.capacity_factor, bool(m.router.batch_priority))
                for n, m in vm.moe_layers(pl_module.model).items()
            }
        )

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._record(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._record(pl_module)


@pytest.mark.parametrize("command", ["test", "validate"])
def test_options_given_win_over_the_checkpoint_hparams(trained, command):
    RecordRouting.seen = []
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    assert (
        main(
            [
                command,
                *fast(
                    trained,
                    "--ckpt_path",
                    ckpt,
                    "--model.eval_capacity_factor",
                    "0.25",
                    "--model.eval_batch_priority",
                    "true",
                    "--trainer.limit_val_batches",
                    "1",
                    "--trainer.limit_test_batches",
                    "1",
                    "--trainer.callbacks+=tests.cli.test_errors.RecordRouting",
                ),
            ]
        )
        == 0
    )
    assert RecordRouting.seen and all(v == (0.25, True) for v in RecordRouting.seen[-1].values()), (
        RecordRouting.seen
    )


@pytest.mark.parametrize("which", ["explicit", "last"])
def test_resume_with_another_architecture_names_the_hparam(trained, capsys, which):
    ckpt = str(trained / "checkpoints" / "last.ckpt") if which == "explicit" else "last"
    assert (
        main(
            [
                "fit",
                *fast(
                    trained,
                    *SMALL,
                    "--trainer.max_epochs",
                    "2",
                    "--ckpt_path",
                    ckpt,
                    "--model.model_kwargs",
                    "{moe: {num_experts: 8}}",
                ),
            ]
        )
        == 2
    )
    one_line_error(
        capsys,
        "fit",
        r"checkpoint .*last\.ckpt does not fit the model: .*"
        r"model\.model_kwargs\.moe\.num_experts: checkpoint None, now 8",
    )


def test_resume_after_a_state_dict_change_lists_the_mismatch(trained, capsys):
    # same hyper-parameters, other weights: a checkpoint edited to lose the head
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["model.head.bias"]
    path = trained / "headless.ckpt"
    torch.save(ckpt, path)
    assert (
        main(
            ["test", *fast(trained, "--ckpt_path", str(path), "--trainer.limit_test_batches", "1")]
        )
        == 2
    )
    one_line_error(
        capsys,
        "test",
        r"headless\.ckpt does not fit the model: missing keys \(1\): model\.head\.bias",
    )


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "truncated"])
def test_unreadable_checkpoint_is_refused_without_unsafe_advice(trained, tmp_path, capsys, content):
    path = tmp_path / f"{content}.ckpt"
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif content == "pickle":
        torch.save({"state_dict": {}, "payload": Evil()}, path)
    else:
        data = (trained / "checkpoints" / "last.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    for command in ("test", "fit"):
        assert main([command, *fast(tmp_path, *SMALL, "--ckpt_path", str(path))]) == 2
        line = one_line_error(
            capsys, command, re.escape(str(path)) + " is not a readable vmoe/Lightning checkpoint"
        )
        assert "weights_only" not in line
    if content == "pickle":
        assert "refuses" in line and "system" in line, line


def test_data_img_size_other_than_the_model_is_refused_at_setup(tmp_path, capsys):
    assert main(["fit", *fast(tmp_path, *SMALL, "--data.init_args.img_size", "32")]) == 2
    one_line_error(
        capsys, "fit", r"img_size mismatch: .* makes 32x32 images but the model expects 16x16"
    )


def test_corrupt_image_in_a_worker_is_named(tmp_path, capsys):
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
                    "--data.num_workers",
                    "2",
                    "--trainer.max_steps",
                    "2",
                ),
            ]
        )
        == 2
    )
    one_line_error(
        capsys, "fit", r"^vmoe fit: error: cannot read image file '" + re.escape(str(broken))
    )


def test_checkpoint_write_on_a_full_disk(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["fit", *fast(tmp_path, *SMALL)]) == 2
    one_line_error(
        capsys,
        "fit",
        r"could not write checkpoint .*\.ckpt: disk full \(No space left on device\); "
        r"nothing was changed",
    )
    assert not list((tmp_path / "checkpoints").glob("*"))  # neither a checkpoint nor a temp file


def test_atomic_checkpoint_io_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def half_then_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="could not write checkpoint .*last.ckpt: disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _FailingFile:
    """A file object that passes ``limit`` bytes on to ``f``, then raises ``exc`` (as a full
    disk, a file-size limit or a Ctrl-C arriving mid-write would)."""

    def __init__(self, f, exc, limit=4096):
        self.f, self.exc, self.left = f, exc, limit

    def write(self, data):
        if len(data) > self.left:
            raise self.exc
        self.left -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def save_fails(monkeypatch, exc, from_call=2, once=False):
    """torch.save call ``from_call`` (and, unless ``once``, every later one) fails mid-write
    with ``exc`` inside torch's zip writer: the error torch itself raises then."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        n = len(calls)
        if n < from_call or (once and n > from_call):
            return real(obj, f, *args, **kwargs)
        return real(obj, _FailingFile(f, exc), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_torch_save_failure_mid_fit_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """torch.save reports a full disk as RuntimeError('[enforce fail at inline_container.cc...
    unexpected pos ...'): the same one line as an OSError, the step-2 last.ckpt intact."""
    calls = save_fails(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert main(["fit", *fast(tmp_path, *SMALL, "--last_checkpoint.every_n_train_steps", "2")]) == 2
    one_line_error(
        capsys,
        "fit",
        r"could not write checkpoint .*last\.ckpt: disk full \(No space left on "
        r"device\); nothing was changed",
    )
    assert len(calls) >= 2
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]  # no temp file, no half file
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2


def test_ctrl_c_inside_torch_save_exits_130_and_keeps_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """torch wraps a KeyboardInterrupt raised inside its writer into a RuntimeError: it must
    still end as Ctrl-C (exit 130, the resume line), the previous last.ckpt intact."""
    save_fails(monkeypatch, KeyboardInterrupt(), once=True)
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path,
                    *SMALL,
                    "--last_checkpoint.every_n_train_steps",
                    "2",
                    "--last_checkpoint.on_exception",
                    "false",
                ),
            ]
        )
        == 130
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        err.strip().splitlines()[-1]
        == "vmoe fit: interrupted at step 4; resume with --ckpt_path last"
    )
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.fixture
def file_size_limit():
    """A real file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_convert_under_a_file_size_limit_is_one_line_and_keeps_the_old_output(
    tmp_path, capsys, file_size_limit
):
    out = tmp_path / "out"
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    file_size_limit(64 * 1024)  # model.safetensors is ~250 KB
    code = main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(out), "--overwrite"])
    file_size_limit(-1)  # RLIM_INFINITY
    assert code == 2
    one_line_error(
        capsys,
        "convert",
        rf"could not write {re.escape(str(out))}: file too large .*\(File too "
        r"large\); nothing was changed",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_write_errors_are_translated_once(tmp_path):
    from safetensors import SafetensorError

    from vmoe.writes import WriteError, failed_write

    target = tmp_path / "x"
    cases = [
        (OSError(errno.EFBIG, "File too large"), errno.EFBIG, r"file too large"),
        (OSError(errno.EROFS, "Read-only file system"), errno.EROFS, r"read-only file system"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT, r"disk quota exceeded"),
        (
            SafetensorError("I/O error: No space left on device (os error 28)"),
            errno.ENOSPC,
            "disk full",
        ),
        (
            RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
            errno.EIO,
            r"the write failed part-way \(disk full or file too large\?\) "
            r"\(torch\.save: PytorchStreamWriter failed",
        ),
        (
            OSError(errno.EIO, "Input/output error"),
            errno.EIO,
            r"input/output error \(Input/output error\)",
        ),
    ]
    for exc, code, pattern in cases:
        with pytest.raises(
            WriteError, match=rf"^could not write model {re.escape(str(target))}: {pattern}"
        ) as err:
            with failed_write(target, "model"):
                raise exc
        assert err.value.errno == code and err.value.__cause__ is exc
    for exc in (
        OSError(errno.ENOENT, "No such file"),
        RuntimeError("a bug"),
        ValueError("bad value"),
    ):
        with pytest.raises(type(exc)) as err, failed_write(target):
            raise exc
        assert err.value is exc  # not a write failure: unchanged


def test_predict_refuses_an_existing_csv_or_a_directory_unless_overwrite(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoints" / "last.ckpt")

    def predict(path, *extra):
        return main(
            [
                "predict",
                *fast(
                    trained,
                    "--ckpt_path",
                    ckpt,
                    "--trainer.limit_predict_batches",
                    "1",
                    "--predictions.path",
                    str(path),
                    *extra,
                ),
            ]
        )

    labels = tmp_path / "labels.csv"
    labels.write_text("keep me")
    assert predict(labels) == 2
    one_line_error(
        capsys,
        "predict",
        rf"predictions\.path {re.escape(str(labels))} exists; pass "
        r"--predictions\.overwrite true",
    )
    assert labels.read_text() == "keep me"
    assert predict(labels, "--predictions.overwrite", "true") == 0
    assert labels.read_text().startswith("image,label,top1,prob1")
    written = labels.read_text()

    from vmoe.train.predictions import PredictionCsvWriter

    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:  # a full disk while the rows are written
        patch.setattr(PredictionCsvWriter, "_write_rows", disk_full)
        assert predict(labels, "--predictions.overwrite", "true") == 2
    one_line_error(
        capsys, "predict", rf"could not write predictions {re.escape(str(labels))}: disk full"
    )
    assert labels.read_text() == written

    folder = tmp_path / "folder"
    folder.mkdir()
    for extra in ([], ["--predictions.overwrite", "true"]):
        assert predict(folder, *extra) == 2
        one_line_error(
            capsys, "predict", rf"predictions\.path {re.escape(str(folder))} is a directory"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "folder",
        "labels.csv",
    ]  # no .folder.*.tmp
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "command,extra,pattern",
    [
        (
            "fit",
            ["--ema.decay", "0.9"],
            r"weight averaging \(ema\.decay.*not supported with ExpertParallelStrategy",
        ),
        ("predict", [], r"predict with ExpertParallelStrategy is not supported"),
    ],
)
def test_expert_parallel_limits_are_one_line_before_any_rank_starts(
    tmp_path, capsys, command, extra, pattern
):
    assert (
        main(
            [
                command,
                *fast(
                    tmp_path,
                    "--trainer.strategy",
                    "expert_parallel_2",
                    "--trainer.devices",
                    "2",
                    "--trainer.accelerator",
                    "cpu",
                    *extra,
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, command, pattern)


def test_unknown_compile_backend_is_named_with_the_valid_ones(tmp_path, capsys):
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path,
                    *SMALL,
                    "--model.compile",
                    "true",
                    "--model.compile_kwargs",
                    "{backend: no_such_backend}",
                ),
            ]
        )
        == 2
    )
    one_line_error(
        capsys,
        "fit",
        r"model\.compile_kwargs\.backend='no_such_backend' is not a torch\.compile "
        r"backend; torch .* has .*aot_eager.*inductor",
    )
    assert not (tmp_path / "checkpoints").exists()  # refused before training


def test_convert_refuses_a_non_empty_out_naming_the_flag(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(out)]) == 2
    line = one_line_error(capsys, "convert", r"--out .* is not empty; pass --overwrite")
    assert "overwrite=True" not in line and (out / "mine.txt").read_text() == "keep me"


def test_convert_on_a_full_disk(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(
            errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors")
        )

    monkeypatch.setattr("vmoe.models.official.convert_vmoe_checkpoint", full)
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "convert", r"No space left on device")


def test_routing_report_on_an_unregistered_architecture(tmp_path, capsys):
    model_dir = tmp_path / "model"
    vm.save_pretrained(
        vm.create_model("vmoe_tiny_e4_k2", num_classes=10)
        if hasattr(vm, "create_model")
        else __import__("timm").create_model("vmoe_tiny_e4_k2", num_classes=10),
        model_dir,
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["architecture"] = "no_such_architecture"
    (model_dir / "config.json").write_text(json.dumps(config))
    assert (
        main(
            [
                "routing-report",
                "--model",
                str(model_dir),
                "--data",
                "digits",
                "--out",
                str(tmp_path / "report"),
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys, "routing-report", r"no_such_architecture")


# ------------------------------------------------------------------ model sources (issue 12)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A saved tiny V-MoE, the same config beside another model's weights, a config without
    weights."""
    import shutil

    import timm

    root = tmp_path_factory.mktemp("sources")
    vm.save_pretrained(timm.create_model("vmoe_tiny_e4_k2", num_classes=3), root / "tiny")
    vm.save_pretrained(
        timm.create_model(
            "vmoe_vit",
            img_size=16,
            patch_size=4,
            embed_dim=64,
            depth=2,
            num_heads=4,
            num_classes=3,
            moe=dict(every=2, num_experts=4, num_selected=2),
        ),
        root / "other",
    )
    for name, weights in (("mismatch", root / "other" / "model.safetensors"), ("no_weights", None)):
        (root / name).mkdir()
        shutil.copy(root / "tiny" / "config.json", root / name)
        if weights:
            shutil.copy(weights, root / name)
    return root


@pytest.mark.parametrize(
    "option, source, pattern",
    [
        (
            "pretrained_dir",
            "hf-hub:nobody/vmoe-none",
            r"could not download 'hf-hub:nobody/vmoe-none' .*Offline\?",
        ),
        (
            "model_name",
            "hf-hub:nobody/vmoe-none",
            r"could not download 'hf-hub:nobody/vmoe-none' .*Offline\?",
        ),
        (
            "model_name",
            "local-dir:{root}/no_weights",
            r"weights file .*no_weights/model.safetensors not found",
        ),
        (
            "pretrained_dir",
            "{root}/mismatch",
            r"mismatch/config.json: .* not MoE layers of the model in .*mismatch/model.safetensors",
        ),
        (
            "model_name",
            "no_such_model",
            r"model.model_name='no_such_model' is not a registered timm model",
        ),
    ],
)
def test_model_sources_that_cannot_load_give_one_line(
    saved_models, tmp_path, capsys, monkeypatch, option, source, pattern
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    clear = [] if option == "model_name" else ["--model.model_name", "null"]
    assert (
        main(
            [
                "fit",
                *fast(
                    tmp_path, *SMALL, *clear, f"--model.{option}", source.format(root=saved_models)
                ),
            ]
        )
        == 2
    )
    one_line_error(capsys, "fit", pattern)


def test_routing_report_of_a_hub_model_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert (
        main(
            [
                "routing-report",
                "--model",
                "hf-hub:nobody/vmoe-none",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "report"),
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys, "routing-report", r"could not download 'hf-hub:nobody/vmoe-none'")


def test_a_fine_tuning_config_starts_from_a_local_dir_model(saved_models, tmp_path):
    """A YAML whose model is ``local-dir:DIR`` (3 classes) fine-tunes on digits (10 classes): a
    new head, every other weight loaded. With a vanishing learning rate the exported model
    still holds the saved weights."""
    from safetensors.torch import load_file

    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model:\n  model_name: local-dir:{saved_models / 'tiny'}\n  lr: 1.0e-12\n"
        "  end_lr: 0.0\n  warmup_steps: 0\n  weight_decay: 0.0\n"
    )
    assert (
        main(
            [
                "fit",
                *fast(tmp_path, *SMALL[:-4], "--config", str(config), "--export.use_best", "false"),
            ]
        )
        == 0
    )
    saved = load_file(str(saved_models / "tiny" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert tuned["head.weight"].shape == (10, 64) and saved["head.weight"].shape == (3, 64)
    body = [k for k in saved if not k.startswith("head.")]
    assert body and max((tuned[k] - saved[k]).abs().max().item() for k in body) <= 1e-6


@pytest.mark.parametrize(
    "option",
    [
        ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"],
        ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"],
    ],
)
def test_lightning_optimizer_options_are_refused_naming_vmoes(tmp_path, capsys, option):
    """LightningCLI's --optimizer / --lr_scheduler replaced configure_optimizers silently (one
    parameter group, no schedule) while the hparams recorded model.optimizer: adamw."""
    assert main(["fit", *fast(tmp_path, *SMALL, *option)]) == 2
    one_line_error(
        capsys,
        "fit",
        rf"^vmoe fit: error: --{option[0][2:]} torch\.optim\..*: not "
        r"supported; .*use --model\.optimizer \(adamw, sgd or a timm\.optim name\)",
    )
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


UNION_ERROR = """Parser key "model.moe":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'vmoe.models.moeify.MoeifyConfig'>, <class 'NoneType'>]
  Errors:
    - Not of type MoeifyConfig: model.moe.router.num_selcted: not an option of router 'top_k'
      (its options: num_selected, capacity_factor)
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'router': {'num_selcted': 3}}"""


def test_union_errors_are_condensed_to_the_first_type_message():
    from argparse import ArgumentError

    from vmoe.cli.errors import condense_union_error, error_message

    line = (
        'Parser key "model.moe": model.moe.router.num_selcted: not an option of router '
        "'top_k' (its options: num_selected, capacity_factor)"
    )
    assert condense_union_error(UNION_ERROR) == line
    assert error_message(ArgumentError(None, UNION_ERROR)) == line
    # a Union error without a 'Not of type' entry, and any other message: unchanged
    plain = UNION_ERROR.replace("Not of type MoeifyConfig: ", "Expected a dict: ")
    assert condense_union_error(plain) == plain
    assert condense_union_error('Parser key "x": bad value') == 'Parser key "x": bad value'


def test_a_real_jsonargparse_union_error_is_one_line():
    from typing import Dict, Optional, Union

    from jsonargparse import ArgumentParser
    from jsonargparse.typing import register_type

    from vmoe.cli.errors import error_message

    class Strict(dict):
        pass

    def parse(value):
        raise ValueError(f"model.moe.foo: not an option (got {sorted(value)})")

    register_type(Strict, serializer=dict, deserializer=parse)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.moe", type=Optional[Strict])
    parser.add_argument("--other", type=Union[int, Dict[str, int]])
    with pytest.raises(Exception) as info:
        parser.parse_args(["--model.moe", "{foo: 1}"])
    assert (
        error_message(info.value)
        == "Parser key \"model.moe\": model.moe.foo: not an option (got ['foo'])"
    )
    with pytest.raises(Exception) as info:  # no 'Not of type' entry: kept, on one line
        parser.parse_args(["--other", "{a: b}"])
    message = error_message(info.value)
    assert message.startswith(
        'Parser key "other": Does not validate against any of the Union subtypes'
    )
