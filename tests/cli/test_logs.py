"""``vmoe fit`` output for a log file: plain progress lines when stdout is not a terminal (no
carriage returns or ANSI escapes), the bar when asked; none of the avoidable messages (wandb's
"anonymous setting", Lightning's litlogger tip, the LeafSpec deprecation); the end-of-fit
summary shows every path the same way. On main the quickstart's progress went to the log as
bar redraws and those three messages were printed."""

import io
import os
import re
import subprocess
import sys

from tests.helpers import QUICKSTART, ROOT
from vmoe.cli import main
from vmoe.cli.training import shown_path
from vmoe.train.progress import LineProgress

TINY_FIT = [
    "--config",
    QUICKSTART,
    "--torch_num_threads",
    "1",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "1",
    "--test_after_fit",
    "false",
    "--export.enabled",
    "false",
    "--routing_stats.figures",
    "false",
]


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    def root(name):
        return ["--trainer.default_root_dir", str(tmp_path / name), "--trainer.logger", "false"]

    assert main(["fit", *TINY_FIT, *root("lines")]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2, out
    assert re.match(
        r"epoch 1/2  batch 3/3  step 3  [\d.]+ it/s  0:00:\d\d  loss [\d.]+ ", epochs[0]
    )
    assert "val/acc1 " in epochs[1]
    # asked for the bar: no plain lines
    assert main(["fit", *TINY_FIT, *root("bar"), "--progress", "bar"]) == 0
    assert not re.search(r"^epoch 1/2  batch", capsys.readouterr().out, re.M)


def test_line_progress_writes_a_line_every_n_seconds(monkeypatch):
    import vmoe.train.progress as progress

    class Trainer:
        is_global_zero, max_epochs, max_steps, current_epoch, global_step = True, 3, -1, 0, 0
        num_training_batches = 10

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(LineProgress, "get_metrics", lambda self, t, m: {"v_num": 1, "loss": 0.5})
    stream = io.StringIO()
    bar = LineProgress(every_n_seconds=2.0, stream=stream)
    bar._trainer = trainer = Trainer()
    bar.on_train_start(trainer, None)
    bar.on_train_epoch_start(trainer, None)
    for i, t in enumerate([1.0, 2.5, 3.0]):  # a line at 2.5 s only
        now[0], trainer.global_step = t, i + 1
        bar.on_train_batch_end(trainer, None, None, None, i)
    now[0] = 4.0
    bar.on_train_epoch_end(trainer, None)  # and one at the epoch's end
    assert stream.getvalue().splitlines() == [
        "epoch 1/3  batch 2/10  step 2  0.8 it/s  0:00:02  loss 0.5",
        "epoch 1/3  batch 3/10  step 3  0.75 it/s  0:00:04  loss 0.5",
    ]


def test_a_plain_fit_prints_none_of_the_avoidable_messages(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WANDB_SILENT", None)  # (the tests' conftest sets it) wandb says what it says
    cmd = [sys.executable, "-m", "vmoe.cli", "fit", *TINY_FIT]  # default logger: wandb offline
    cmd += ["--trainer.log_every_n_steps", "1"]
    cmd += ["--trainer.default_root_dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "wandb: Tracking run" in text  # the logger ran
    for avoidable in ("anonymous setting", "litlogger", "LeafSpec"):
        assert avoidable not in text, (avoidable, text[-3000:])
    assert not re.search(r"\.py:\d+: ", done.stderr), done.stderr  # no warning at all


def test_summary_paths_are_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "runs" / "x" / "checkpoints") == os.path.join(
        "runs", "x", "checkpoints"
    )
    assert shown_path("runs/x/export") == os.path.join("runs", "x", "export")
    outside = tmp_path.parent / "elsewhere"
    assert shown_path(outside) == str(outside)


def test_a_resumed_fit_mid_epoch_with_pinned_memory_warns_of_nothing(tmp_path):
    """Lightning's "Checkpoint directory ... is not empty" (the run resumes from it) and torch's
    "pin_memory ... no accelerator" (the data modules now pin only with one) were printed by this
    resume on the commit before."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "vmoe.cli", "fit", *TINY_FIT, "--trainer.logger", "false"]
    base += ["--trainer.default_root_dir", str(tmp_path / "run"), "--data.pin_memory", "true"]
    resume = ["--trainer.max_steps", "4", "--ckpt_path", "last"]
    for extra in (["--trainer.max_steps", "2"], resume):
        done = subprocess.run(
            base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert "Restoring states from the checkpoint" in done.stdout + done.stderr
    assert not re.search(r"\.py:\d+: ", done.stderr), done.stderr
