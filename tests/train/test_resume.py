"""Kill a run mid-epoch, resume with ``--ckpt_path last``: the weights equal those of an
uninterrupted run (fixed seed, deterministic settings) to 1e-5. The router noise makes training
stochastic, so this only holds if the data position and the RNG states are restored too; a
control run without that restoration must differ."""

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import NO_AUG, quiet
from vmoe.cli import main
from vmoe.train.resume import EpochSampler, ResumableLoader

N = 8  # steps before the "kill"; an epoch is 12 steps, so the resumed run crosses an epoch end


class KillAtStep(L.Callback):
    """Raises KeyboardInterrupt at the start of the step after ``step`` (its checkpoint is
    saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class KillMidStep(L.Callback):
    """Ctrl-C in the middle of the step after ``step``: after its forward (router noise drawn,
    batch taken), before its backward and optimizer update."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def run(root, *extra, every=N):
    args = quiet(
        root,
        "--trainer.logger",
        "false",
        "--trainer.deterministic",
        "true",
        "--trainer.max_steps",
        str(2 * N),
        "--trainer.limit_val_batches",
        "1",
        "--last_checkpoint.every_n_train_steps",
        str(every),
        "--data.init_args.batch_size",
        "128",
        "--data.init_args.train_transform",
        NO_AUG,
        "--model.warmup_steps",
        "2",
        "--test_after_fit",
        "false",
        "--export.enabled",
        "false",
        "--routing_stats.figures",
        "false",
        *extra,
    )
    return main(["fit", *args])


def weights(root):
    ckpt = torch.load(
        Path(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 2 * N
    return ckpt["state_dict"]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's final weights."""
    root = tmp_path_factory.mktemp("straight")
    assert run(root) == 0
    return weights(root)


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, straight):
    kill = [
        "--trainer.callbacks+=tests.train.test_resume.KillAtStep",
        "--trainer.callbacks.step",
        str(N),
    ]
    assert run(tmp_path / "resumed", *kill) != 0  # interrupted
    first = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert first["global_step"] == N
    assert run(tmp_path / "resumed", "--ckpt_path", "last") == 0
    assert max_diff(straight, weights(tmp_path / "resumed")) < 1e-5

    # Control: the same resume without restoring data position and RNG goes elsewhere.
    assert run(tmp_path / "control", "--resume.enabled", "false", *kill) != 0
    assert run(tmp_path / "control", "--resume.enabled", "false", "--ckpt_path", "last") == 0
    assert max_diff(straight, weights(tmp_path / "control")) > 1e-4


def test_epoch_sampler_order_depends_only_on_seed_and_epoch_and_skips_once():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    full = list(a)
    assert sorted(full) == list(range(10)) and full == list(b)
    b.set_epoch(1)
    assert list(b) != full
    a.skip = 4
    assert list(a) == full[4:] and list(a) == full  # the skip applies to one pass only


def test_resumable_loader_state_round_trip():
    data = torch.utils.data.TensorDataset(torch.arange(20).float())
    loader = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True), seed=5)
    assert len(loader) == 5
    batches = [b[0].tolist() for b in loader]
    loader.consumed = 2
    state = loader.state_dict()
    fresh = ResumableLoader(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    fresh.load_state_dict(state)
    assert [b[0].tolist() for b in fresh] == batches[2:]
    # saved after the last batch of an epoch: continue with the next epoch
    fresh.load_state_dict({"seed": 5, "epoch": 0, "consumed": 5})
    assert fresh.epoch_sampler.epoch == 1 and fresh.epoch_sampler.skip == 0


@pytest.mark.parametrize("killer", ["KillAtStep", "KillMidStep"])
def test_ctrl_c_writes_last_checkpoint_exits_130_and_resumes_exactly(
    tmp_path, capsys, killer, straight
):
    """No periodic checkpoint (every_n_train_steps 0) and no epoch end before the kill: only
    the checkpoint written on the interrupt can hold step N; the resumed run must redo the
    interrupted step with the same batch and RNG, ending on the uninterrupted run's weights."""
    kill = [
        f"--trainer.callbacks+=tests.train.test_resume.{killer}",
        "--trainer.callbacks.step",
        str(N),
    ]
    assert run(tmp_path / "resumed", *kill, every=0) == 130
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"vmoe fit: interrupted at step {N}; resume with --ckpt_path last"
    )
    first = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert first["global_step"] == N
    assert not list((tmp_path / "resumed" / "checkpoints").glob(".*.tmp"))  # no temp file left
    assert run(tmp_path / "resumed", "--ckpt_path", "last", every=0) == 0
    assert max_diff(straight, weights(tmp_path / "resumed")) < 1e-5


def test_last_checkpoint_every_epoch_by_default(tmp_path):
    """An epoch is 12 steps: without any option last.ckpt is written at step 12 (epoch end),
    so a crash in the second epoch resumes from there."""
    kill = [
        "--trainer.callbacks+=tests.train.test_resume.KillAtStep",
        "--trainer.callbacks.step",
        "14",
        "--last_checkpoint.on_exception",
        "false",
    ]
    assert run(tmp_path, *kill, every=500) == 130
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
