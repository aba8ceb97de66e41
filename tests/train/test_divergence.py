"""A diverging run stops with one line naming what diverged and at which step, before any
validation or checkpoint sees the non-finite weights: every checkpoint file on disk is finite."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import last_stderr_line, quiet
from vmoe.cli import main
from vmoe.train import DivergenceError, first_nonfinite_parameter


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
    return main(
        [
            "fit",
            *quiet(
                root,
                "--trainer.logger",
                "false",
                "--trainer.limit_train_batches",
                "3",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.max_epochs",
                "3",
                "--test_after_fit",
                "false",
                "--export.enabled",
                "false",
                "--routing_stats.figures",
                "false",
                *extra,
            ),
        ]
    )


def assert_all_checkpoints_finite(root, expected_steps):
    steps = []
    for path in sorted(Path(root, "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for name, value in ckpt["state_dict"].items():
            assert torch.isfinite(value).all(), (path.name, name)
        steps.append(ckpt["global_step"])
    assert sorted(steps) == sorted(expected_steps)


def last_error(capsys):
    line = last_stderr_line(capsys)
    assert line.startswith("vmoe fit: error: training diverged"), line
    return line


def test_update_turning_nan_before_validation_is_never_validated_or_saved(tmp_path, capsys):
    # step 5 is the last of epoch 1: validation (and the best/last checkpoints) would come next
    poison = [
        "--trainer.callbacks+=tests.train.test_divergence.PoisonAt",
        "--trainer.callbacks.step",
        "5",
    ]
    assert run(tmp_path, *poison) == 2
    line = last_error(capsys)
    assert re.search(
        r"at step 6: parameter model\.blocks\.0\.attn\.qkv\.weight became non-finite in the "
        r"optimizer update of step 5 \(stopped before validating\)",
        line,
    ), line
    assert "lower model.lr" in line
    assert_all_checkpoints_finite(tmp_path, [3, 3])  # best and last of epoch 0 only


def test_update_turning_nan_mid_epoch_is_never_saved(tmp_path, capsys):
    # a last checkpoint is due after every step: the one after the poisoned update is refused
    poison = [
        "--trainer.callbacks+=tests.train.test_divergence.PoisonAt",
        "--trainer.callbacks.step",
        "1",
        "--last_checkpoint.every_n_train_steps",
        "1",
    ]
    assert run(tmp_path, *poison) == 2
    line = last_error(capsys)
    assert (
        "at step 2: parameter model.blocks.0.attn.qkv.weight became non-finite in the optimizer "
        "update of step 1 (stopped before saving a checkpoint)" in line
    ), line
    assert_all_checkpoints_finite(tmp_path, [1])


def test_lr_1e3_diverges_with_one_line_naming_the_step(tmp_path, capsys):
    assert (
        run(
            tmp_path,
            "--model.lr",
            "1e3",
            "--model.warmup_steps",
            "0",
            "--trainer.gradient_clip_val",
            "null",
        )
        == 2
    )
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


class _Plain(L.LightningModule):
    """Any LightningModule (not VmoeClassifier, whose own guard stops a diverged run first)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2
        )


class _CrashAt(L.Callback):
    """At step ``step``: optionally turns a weight NaN, then crashes (as a bug would)."""

    def __init__(self, step: int, poison: bool):
        self.step, self.poison = step, poison

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.poison:
                with torch.no_grad():
                    pl_module.net.weight[0, 0] = float("nan")
            raise RuntimeError("crash")


@pytest.mark.parametrize("poison", [False, True])
def test_last_checkpoint_on_exception_never_saves_non_finite_weights_of_any_module(
    tmp_path, poison
):
    from vmoe.train import LastCheckpoint

    last = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=0, every_epoch=False)
    trainer = L.Trainer(
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        callbacks=[last, _CrashAt(3, poison)],
    )
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(_Plain())
    if poison:  # the crash comes with NaN weights: nothing is saved
        assert last.saved_on_exception is None and not (tmp_path / "last.ckpt").exists()
    else:  # control: the same crash with finite weights saves step 3
        assert last.saved_on_exception == 3
        assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
