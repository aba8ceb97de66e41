"""Callbacks: routing statistics and pictures to the logger; export of the best model.

``RoutingStatsLogger`` reads what the MoE layers keep after each forward (their RoutingPlan and
auxiliary losses) through ``vmoe.models.routing_stats``/``aux_losses``; it never re-routes. Its
pictures are drawn by ``vmoe.viz`` (``expert_load_chart``, ``routing_figure``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

import vmoe.models as vm
import vmoe.viz as viz
from vmoe.moe import SOFT_TRAIN_STATS, SoftRoutingPlan, expert_bias_values, routing_statistics
from vmoe.moe.parallel import expert_parallel_layers, gather_plan
from vmoe.writes import save_figure

__all__ = ["RoutingStatsLogger", "ExportPretrained"]

log = logging.getLogger(__name__)
TRAIN_STATS = ("dropped_fraction", "load_min", "load_max", "load_cv", "router_entropy")
# (Soft MoE layers log vmoe.moe.SOFT_TRAIN_STATS: importance min/max/CV, combine entropy, and
# the tokens each slot effectively mixes.)


def _short(layer: str) -> str:
    return layer[:-4] if layer.endswith(".mlp") else layer


class RoutingStatsLogger(L.Callback):
    """Logs routing health per MoE layer, and routing pictures at validation.

    Every ``every_n_steps`` training steps (rank 0, straight to the loggers), per layer: each
    auxiliary loss (unweighted), the fraction of token-choices dropped, expert load min/max
    (times E: 1 is balanced) and CV, and the router entropy (Soft MoE layers:
    ``vmoe.moe.SOFT_TRAIN_STATS`` instead); with bias balancing, each expert's bias
    (``routing/<layer>/expert_bias_<e>``, after this step's update). During validation (at the
    evaluation capacity) the dropped fraction is averaged over the epoch. At validation end (rank
    0): the expert load of the whole validation (``vmoe.viz.expert_load_chart``; sparse layers
    only) and the patch map of the first validation image (``vmoe.viz.routing_figure``; for a
    Soft MoE model its dispatch map) go to the logger (wandb image, tensorboard figure) and are
    saved as ``expert_load.png`` and ``routing_map.png`` in ``<log dir>/routing/``.

    Args:
        every_n_steps: log the training statistics every this many steps.
        figures: draw the routing figures at validation end.
        num_images: validation images kept for the routing map (one forward; the first is drawn).
        figures_every_n_val: draw the figures at every n-th validation (and at the last epoch).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        figures: bool = True,
        num_images: int = 4,
        figures_every_n_val: int = 1,
    ):
        if every_n_steps < 1 or figures_every_n_val < 1:
            raise ValueError(
                f"every_n_steps={every_n_steps} and figures_every_n_val="
                f"{figures_every_n_val} must be >= 1"
            )
        self.figures_every_n_val = figures_every_n_val
        self._val_count = 0
        self.every_n_steps, self.figures, self.num_images = every_n_steps, figures, num_images
        self.last_figures: Dict[str, Path] = {}
        # Per layer, summed over the validation batches: routed [K, E], kept [K, E], capacity.
        self._load: Dict[str, List] = {}
        self._batches = 0
        self._images: Optional[torch.Tensor] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning's own step counter for logs is global_step - 1 here (the step just taken).
        step = trainer.global_step - 1
        if step % self.every_n_steps or not trainer.loggers or not vm.moe_layers(pl_module.model):
            return
        values = {}
        stats = _routing_stats_over_ranks(pl_module.model)
        for layer, losses in vm.aux_losses(pl_module.model).items():
            short = _short(layer)
            # A Soft MoE layer drops nothing and has no load: its own statistics instead.
            names = SOFT_TRAIN_STATS if "dropped_fraction" not in stats[layer] else TRAIN_STATS
            for name in names:
                values[f"routing/{short}/{name}"] = stats[layer][name]
            for name, value in losses.items():
                values[f"routing/{short}/{name}_loss"] = value.detach()
        for layer, bias in expert_bias_values(pl_module.model).items():  # bias balancing
            for e, value in enumerate(bias):
                values[f"routing/{_short(layer)}/expert_bias_{e}"] = value
        # Straight to the loggers (not self.log, which would repeat the value every step until
        # the next update); one host sync every N steps.
        stacked = _mean_over_ranks(torch.stack([v.float() for v in values.values()]))  # the losses
        values = dict(zip(values, stacked.tolist()))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._load, self._batches, self._images = {}, 0, None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        layers = vm.moe_layers(pl_module.model)
        if not layers:
            return
        stats = vm.routing_stats(pl_module.model)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        for layer, s in stats.items():
            if "dropped_fraction" in s:  # Soft MoE layers drop nothing
                pl_module.log(
                    f"val_routing/{_short(layer)}/dropped_fraction",
                    s["dropped_fraction"].float(),
                    on_epoch=True,
                    sync_dist=True,
                    batch_size=x.shape[0],
                )
        self._batches += 1
        if not self.figures:  # every rank counts: the chart shows every rank's tokens
            return
        for name, layer in layers.items():  # counts stay on the device: no host sync per batch
            if isinstance(layer.last_plan, SoftRoutingPlan):
                continue  # a Soft MoE layer has no load to count (nothing is dropped)
            counts = viz.expert_load_counts(layer.last_plan, layer.router)
            total = self._load.get(name)
            self._load[name] = (
                list(counts) if total is None else [t + c for t, c in zip(total, counts)]
            )
        if self._images is None:
            self._images = x[: self.num_images].detach().cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._val_count += 1
        # Figures cost ~0.5 s each: draw them every n-th validation, and always on the last epoch.
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0
        due = (self._val_count - 1) % self.figures_every_n_val == 0 or last
        if not self.figures or not due or not self._batches:
            return
        self._load = _sum_over_ranks(self._load)
        # trainer.log_dir is a broadcast under DDP: every rank asks, or rank 0 waits forever
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "routing"
        # an expert-parallel forward is a collective: then every rank draws the routing map
        every_rank = bool(expert_parallel_layers(pl_module.model))
        if not trainer.is_global_zero and not every_rank:
            return
        was_training = pl_module.model.training
        routing_map = viz.routing_figure(pl_module.model.eval(), self._images.to(pl_module.device))
        pl_module.model.train(was_training)
        if not trainer.is_global_zero:
            plt.close(routing_map)
            return
        step = trainer.global_step
        names = list(self._load)
        figs = {}
        if names:  # sparse layers only: a Soft MoE layer has no load to count
            routed = torch.stack([self._load[n][0] for n in names]).cpu().numpy()  # [L, K, E]
            kept = torch.stack([self._load[n][1] for n in names]).cpu().numpy()  # [L, K, E]
            capacity = [self._load[n][2] for n in names]  # [L]
            figs["expert_load"] = viz.expert_load_chart(
                [_short(n) for n in names],
                routed,
                kept,
                capacity,
                f"validation expert load, step {step}",
            )[0]
        figs["routing_map"] = routing_map
        self._emit(trainer, figs, step, out_dir)

    def _emit(self, trainer, figs, step: int, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            path = out_dir / f"{name}.png"
            save_figure(fig, path, dpi=100)
            self.last_figures[name] = path
            for logger in trainer.loggers:
                try:
                    if isinstance(logger, WandbLogger):
                        logger.log_image(key=f"routing/{name}", images=[fig], step=step)
                    elif isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_figure(
                            f"routing/{name}", fig, global_step=step, close=False
                        )
                except (
                    Exception
                ) as err:  # a logger failing to take a picture must not stop training
                    log.warning("could not log %s to %s: %s", name, type(logger).__name__, err)
            plt.close(fig)  # pyplot keeps every open figure: one set per validation would pile up


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _routing_stats_over_ranks(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """``routing_statistics`` of each layer's last plan, over every rank's groups (the plans
    are gathered: expert load counts every rank's tokens) when running distributed."""
    plans = vm.routing_plans(model)
    if _distributed():
        plans = {name: gather_plan(plan) for name, plan in plans.items()}
    return {name: routing_statistics(plan) for name, plan in plans.items()}


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def _sum_over_ranks(load: Dict[str, List]) -> Dict[str, List]:
    """{layer: [routed [K, E], kept [K, E], capacity]} summed over the ranks (one all_reduce)."""
    if not _distributed() or not load:
        return load
    names = list(load)
    flat = torch.cat(
        [
            torch.cat(
                [
                    load[n][0].reshape(-1),
                    load[n][1].reshape(-1),
                    torch.tensor([load[n][2]], device=load[n][0].device),
                ]
            )
            for n in names
        ]
    )
    torch.distributed.all_reduce(flat)
    out, offset = {}, 0
    for n in names:
        routed, kept, _ = load[n]
        size = routed.numel()
        out[n] = [
            flat[offset : offset + size].view_as(routed),
            flat[offset + size : offset + 2 * size].view_as(kept),
            int(flat[offset + 2 * size]),
        ]
        offset += 2 * size + 1
    return out


def detached_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also right after a training step: the outputs of the last forward
    that modules keep as attributes (a MoE layer's ``aux_loss``/``aux_losses``) are still part of
    the autograd graph, which deepcopy refuses; the copy gets them detached."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            for item in value.values() if isinstance(value, dict) else (value,):
                if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                    memo[id(item)] = item.detach()
    return copy.deepcopy(model, memo)


class ExportPretrained(L.Callback):
    """At the end of ``fit`` write ``save_pretrained`` (config.json + model.safetensors) of the
    best checkpoint (or the final weights when there is none) into ``dirpath`` (default
    ``<default_root_dir>/export``); rank 0 only."""

    def __init__(self, dirpath: Optional[str] = None, use_best: bool = True, enabled: bool = True):
        self.dirpath, self.use_best, self.enabled = dirpath, use_best, enabled
        self.export_path: Optional[Path] = None
        self.source: Optional[str] = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        model = detached_copy(pl_module.model).cpu()
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.use_best else ""
        self.source = "final weights"
        if ckpt:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict(
                {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            )
            self.source = ckpt
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "export"
        self.export_path = vm.save_pretrained(model, out, overwrite=True)
