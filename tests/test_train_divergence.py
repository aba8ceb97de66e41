"""A diverging run stops with one line naming what diverged and at which step, before any
validation or checkpoint sees the non-finite weights: every checkpoint file on disk is finite."""
import re
from pathlib import Path

import lightning as L
import torch

from vmoe.cli import main
from vmoe.train import DivergenceError, first_nonfinite_parameter

ROOT = Path(__file__).resolve().parents[1]


class PoisonAt(L.Callback):
    """Makes an update non-finite: after the optimizer step number ``step`` (0-based), one
    weight of ``blocks.0.attn.qkv.weight`` becomes NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            with torch.no_grad():
                pl_module.model.blocks[0].attn.qkv.weight[0, 0] = float("nan")


def run(root, *extra):
    return main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--torch_num_threads", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
                 "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "3",
                 "--test_after_fit", "false", "--export.enabled", "false", "--routing_stats.figures", "false",
                 *extra])


def assert_all_checkpoints_finite(root, expected_steps):
    steps = []
    for path in sorted(Path(root, "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for name, value in ckpt["state_dict"].items():
            assert torch.isfinite(value).all(), (path.name, name)
        steps.append(ckpt["global_step"])
    assert sorted(steps) == sorted(expected_steps)


def last_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("vmoe fit: error: training diverged"), lines[-1]
    return lines[-1]


def test_update_turning_nan_before_validation_is_never_validated_or_saved(tmp_path, capsys):
    # step 5 is the last of epoch 1: validation (and the best/last checkpoints) would come next
    poison = ["--trainer.callbacks+=tests.test_train_divergence.PoisonAt", "--trainer.callbacks.step", "5"]
    assert run(tmp_path, *poison) == 2
    line = last_error(capsys)
    assert re.search(r"at step 6: parameter model\.blocks\.0\.attn\.qkv\.weight became non-finite in the "
                     r"optimizer update of step 5 \(stopped before validating\)", line), line
    assert "lower model.lr" in line
    assert_all_checkpoints_finite(tmp_path, [3, 3])  # best and last of epoch 0 only


def test_update_turning_nan_mid_epoch_is_never_saved(tmp_path, capsys):
    # a last checkpoint is due after every step: the one after the poisoned update is refused
    poison = ["--trainer.callbacks+=tests.test_train_divergence.PoisonAt", "--trainer.callbacks.step", "1",
              "--last_checkpoint.every_n_train_steps", "1"]
    assert run(tmp_path, *poison) == 2
    line = last_error(capsys)
    assert "at step 2: parameter model.blocks.0.attn.qkv.weight became non-finite in the optimizer update " \
           "of step 1 (stopped before saving a checkpoint)" in line, line
    assert_all_checkpoints_finite(tmp_path, [1])


def test_lr_1e3_diverges_with_one_line_naming_the_step(tmp_path, capsys):
    assert run(tmp_path, "--model.lr", "1e3", "--model.warmup_steps", "0",
               "--trainer.gradient_clip_val", "null") == 2
    line = last_error(capsys)
    assert re.search(r"training diverged at step \d+: ", line) and "non-finite" in line, line
    assert_all_checkpoints_finite(tmp_path, [])


def test_first_nonfinite_parameter_names_it_and_ignores_huge_finite_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but its sum overflows
    assert first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    assert first_nonfinite_parameter(model) == "1.bias"
    assert issubclass(DivergenceError, FloatingPointError)
