"""Messages that say what happened: ``vmoe convert`` names the variant, E, K, the MoE blocks and
the parameter count; fine-tuning from ``model.pretrained_dir`` says how many tensors came from
where and which were re-initialised; a fresh ``vmoe fit`` on a full disk (or under a file-size
limit) names the file it could not write. On main: "wrote DIR", nothing, "[Errno 27] File too
large"."""

import errno
import logging
import os
import re
import resource
import signal
import subprocess
import sys

import lightning as L
import timm
import torch

import vmoe.models as vm
from tests.helpers import QUICKSTART, ROOT, last_stderr_line
from tests.helpers import VMOE_REFERENCE as FIXTURES
from vmoe.cli import main
from vmoe.models.describe import describe_model
from vmoe.train import VmoeClassifier

SHORT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--test_after_fit",
    "false",
    "--export.enabled",
    "false",
    "--routing_stats.figures",
    "false",
]


def test_convert_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["convert", str(FIXTURES / "vmoe_tiny_a"), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    count = sum(p.numel() for p in vm.from_pretrained(out).parameters())
    assert line == (
        f"wrote {out} (config.json + model.safetensors): V-MoE (d=32, 4 blocks, patch 4): "
        f"E=4 experts, K=2, MoE blocks 1, 3 of 4, {count / 1e3:.1f} K parameters; 10 classes; "
        "16x16 images"
    )


def test_describe_model_names_the_papers_variants():
    with torch.device("meta"):
        s32 = timm.create_model("vmoe_s32_e8_k2_last2")
        soft = timm.create_model("soft_moe_tiny_e8")
    count = sum(p.numel() for p in s32.parameters())
    assert describe_model(s32) == (
        f"V-MoE-S/32: E=8 experts, K=2, MoE blocks 5, 7 of 8, {count / 1e6:.1f} M parameters"
    )
    assert re.match(
        r"Soft MoE \(d=\d+, 4 blocks, patch 4\): E=8 experts, 1 slot per", describe_model(soft)
    )


def test_fine_tuning_from_a_pretrained_dir_says_what_was_loaded(tmp_path, caplog):
    directory = tmp_path / "pretrained"
    vm.save_pretrained(timm.create_model("vmoe_tiny_e4_k2", num_classes=10), directory)
    with caplog.at_level(logging.INFO):
        model = VmoeClassifier(pretrained_dir=str(directory), num_classes=3)
    total = len(model.model.state_dict())
    lines = [r.getMessage() for r in caplog.records if "model.pretrained_dir" in r.getMessage()]
    assert lines == [
        f"model.pretrained_dir: loaded {total - 2} of {total} tensors from "
        f"{directory / 'model.safetensors'}; re-initialised head.weight, head.bias "
        "(a new head: 3 classes)"
    ]


def _limited(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_fresh_fit_that_cannot_write_names_the_file(tmp_path):
    """RLIMIT_FSIZE makes every write past 2 KB fail with EFBIG, as a full disk fails writes:
    the run's config.yaml is the first file written. A previous config.yaml (a resumed run's)
    is put back as it was."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vmoe.cli", "fit", "--config", QUICKSTART, *SHORT]
    cmd += ["--trainer.default_root_dir", str(run)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def fit():
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, preexec_fn=_limited(2000), capture_output=True, text=True
        )
        return done.returncode, done.stderr.strip().splitlines()[-1]

    code, line = fit()
    assert code == 2, line
    config = run / "config.yaml"
    assert line.startswith(f"vmoe fit: error: could not write the run's config {config}: file "), (
        line
    )
    assert not config.exists()  # no partial file left
    config.write_text("a previous run's config\n")
    code, line = fit()
    assert code == 2 and "could not write the run's config" in line, line
    assert config.read_text() == "a previous run's config\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


class BareDiskFull(L.Callback):
    """A write of the run that fails without naming its file (as a logger's can)."""

    def on_train_start(self, trainer, pl_module):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_that_names_no_file_names_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", QUICKSTART, *SHORT, "--trainer.default_root_dir", "runs/x"]
    assert main([*argv, "--trainer.callbacks+=tests.cli.test_messages.BareDiskFull"]) == 2
    line = last_stderr_line(capsys)
    assert line.startswith(
        "vmoe fit: error: could not write a file of the run under runs/x: disk full "
        "(No space left on device)"
    ), line
