"""Routing pictures and statistics callbacks, and the default logger's offline detection."""
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import vmoe.models as vm
from vmoe.train import RoutingStatsLogger, first_choice_maps
from vmoe.train.figures import expert_load_figure, figure_to_array, resolve_figure_fn, routing_map_figure
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


def test_first_choice_maps_follow_the_plan():
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    vm.set_routing(model, capacity_factor=0.25)  # small buffers: some choices are dropped
    model(torch.randn(8, 3, 16, 16))  # one full routing group of 8 images
    maps = first_choice_maps(model, 8)
    assert set(maps) == {"blocks.1.mlp", "blocks.3.mlp"}
    for name, m in maps.items():
        plan = vm.routing_plans(model)[name]
        assert m.shape == (8, 16)
        tokens = plan.expert_index[..., 0].reshape(8, 17)[:, 1:]
        kept = plan.slot[..., 0].reshape(8, 17)[:, 1:] >= 0
        assert torch.equal(m, torch.where(kept, tokens, torch.full_like(tokens, -1)))
    assert any((m == -1).any() for m in maps.values())


def test_figures_render():
    load = {"blocks.1": np.array([0.4, 0.3, 0.2, 0.1])}
    arr = figure_to_array(expert_load_figure(load))
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.std() > 0
    maps = {"blocks.1.mlp": torch.tensor([[0, 1, 2, 3, -1, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2]])}
    fig = routing_map_figure(torch.randn(1, 3, 16, 16), maps, {"blocks.1.mlp": 4}, (4, 4))
    assert figure_to_array(fig).shape[0] > 100
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_figure_fn("vmoe.nothing_here:fn")
    assert resolve_figure_fn("vmoe.train.figures:expert_load_figure") is expert_load_figure


def test_routing_stats_logger_figures_go_to_tensorboard_and_png(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10).eval()
    pl_module = SimpleNamespace(model=model, device=torch.device("cpu"), log=lambda *a, **k: None)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    trainer = SimpleNamespace(loggers=[logger], log_dir=logger.log_dir, default_root_dir=str(tmp_path),
                              global_step=7, sanity_checking=False, is_global_zero=True,
                              current_epoch=0, max_epochs=5)
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
