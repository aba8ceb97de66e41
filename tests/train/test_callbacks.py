"""Routing pictures and statistics callbacks, and the default logger's offline detection."""

from types import SimpleNamespace

import numpy as np
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import vmoe.models as vm
import vmoe.viz as V
from vmoe.train import RoutingStatsLogger
from vmoe.train.loggers import default_logger_config, wandb_configured


def test_wandb_configured_only_with_key_netrc_or_mode(tmp_path):
    assert not wandb_configured({}, home=tmp_path)
    assert wandb_configured({"WANDB_API_KEY": "x"}, home=tmp_path)
    assert wandb_configured({"WANDB_MODE": "online"}, home=tmp_path)
    (tmp_path / ".netrc").write_text("machine example.com login a password b\n")
    assert not wandb_configured({}, home=tmp_path)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_configured({}, home=tmp_path)


def test_default_logger_is_offline_wandb_when_not_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    cfg = default_logger_config(str(tmp_path / "run"))
    assert cfg["class_path"].endswith("WandbLogger") and cfg["init_args"]["offline"] is True
    assert cfg["init_args"]["save_dir"] == str(tmp_path / "run")
    import os

    assert os.environ["WANDB_MODE"] == "offline"  # wandb itself will not try to log in


def test_routing_stats_logger_figures_go_to_tensorboard_and_png(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    pl_module = SimpleNamespace(model=model, device=torch.device("cpu"), log=lambda *a, **k: None)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    trainer = SimpleNamespace(
        loggers=[logger],
        log_dir=logger.log_dir,
        default_root_dir=str(tmp_path),
        global_step=7,
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        max_epochs=5,
    )
    cb = RoutingStatsLogger()
    cb.on_validation_epoch_start(trainer, pl_module)
    x = torch.randn(8, 3, 16, 16)
    model(x)
    cb.on_validation_batch_end(trainer, pl_module, None, (x, torch.zeros(8)), 0)
    cb.on_validation_epoch_end(trainer, pl_module)
    logger.experiment.flush()
    assert set(cb.last_figures) == {"expert_load", "routing_map"}
    assert all(p.is_file() and p.parent.name == "routing" for p in cb.last_figures.values())
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 5000  # the two images are in the event file
    # figures_every_n_val=2: drawn at the 1st validation, not at the 2nd
    cb2 = RoutingStatsLogger(figures_every_n_val=2)
    for expected in (True, False):
        cb2.last_figures.clear()
        cb2.on_validation_epoch_start(trainer, pl_module)
        cb2.on_validation_batch_end(trainer, pl_module, None, (x, torch.zeros(8)), 0)
        cb2.on_validation_epoch_end(trainer, pl_module)
        assert bool(cb2.last_figures) == expected


def test_routing_stats_logger_expert_load_sums_every_validation_batch(tmp_path):
    """The callback's expert-load chart counts the same assignments as vmoe.viz.expert_load over
    a record of the same validation forwards."""
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    vm.set_routing(model, capacity_factor=0.5)
    pl_module = SimpleNamespace(model=model, device=torch.device("cpu"), log=lambda *a, **k: None)
    trainer = SimpleNamespace(
        loggers=[],
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        global_step=3,
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        max_epochs=1,
    )
    cb = RoutingStatsLogger()
    cb.on_validation_epoch_start(trainer, pl_module)
    with V.record_routing(model) as record:
        for i, x in enumerate((torch.randn(8, 3, 16, 16), torch.randn(5, 3, 16, 16))):
            model(x)
            cb.on_validation_batch_end(trainer, pl_module, None, (x, torch.zeros(len(x))), i)
    _, want = V.expert_load(record)
    for li, name in enumerate(want["layers"]):
        routed, kept, capacity = cb._load[name]
        np.testing.assert_array_equal(routed.numpy(), want["routed"][li])
        np.testing.assert_array_equal(kept.numpy(), want["kept"][li])
        assert capacity == want["capacity"][li]
    assert want["dropped_fraction"].max() > 0
    cb.on_validation_epoch_end(trainer, pl_module)
    assert set(cb.last_figures) == {"expert_load", "routing_map"}
