"""VmoeClassifier: the LightningModule that trains a V-MoE image classifier.

Thin on purpose: the model is a plain timm/vmoe ``nn.Module`` (``self.model``) usable without
Lightning; this class adds the loss (task loss + the MoE auxiliary losses), metrics, the
optimizer and schedule, and the evaluation-time routing (the paper trains with capacity factor
1.05 and evaluates with 4.0).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from jsonargparse.typing import register_type
from lightning.pytorch.trainer.states import TrainerFn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy

import vmoe.models as vm
from vmoe.models.config_checks import shape_mismatches
from vmoe.models.moeify import MoeifyConfig, check_moe_options, nested_moe_options
from vmoe.moe import attach_bias_updates, moe_layers, restore_routing, set_routing
from vmoe.moe.bias_balancing import bias_balanced_routers, expert_load_buffer_names

from .build import build_model
from .divergence import DIVERGENCE_HINT, DivergenceError, first_nonfinite_parameter
from .optim import SCHEDULES, check_optimizer_name, create_optimizer, lr_factor, param_groups

__all__ = ["VmoeClassifier", "build_model", "state_dict_differences", "parse_moe_option"]

LOSSES = ("softmax", "sigmoid")
# Hyper-parameters that decide the network's shape: a checkpoint made with other values does not
# fit.
ARCHITECTURE_HPARAMS = ("model_name", "model_kwargs", "upcycle_from", "moe", "img_size")


def parse_moe_option(value) -> MoeifyConfig:
    """YAML/command-line ``model.moe`` -> ``MoeifyConfig`` (nested or flat router options);
    ValueError naming ``model.moe.<key>`` for an unknown or mistyped key, so jsonargparse refuses
    it when the config is parsed."""
    return MoeifyConfig.from_dict(value, where="model.moe")


# LightningCLI (jsonargparse) parses model.moe with MoeifyConfig's own reader, and writes it
# (--print_config, the run's config.yaml) in the nested form.
register_type(MoeifyConfig, serializer=MoeifyConfig.to_dict, deserializer=parse_moe_option)


class VmoeClassifier(L.LightningModule):
    """Image classification with a (V-MoE) vision transformer, the model of ``vmoe fit``.

    The network is ``self.model``, a plain ``nn.Module`` built by ``build_model``; this class
    adds the loss (task loss + MoE auxiliary losses), metrics, optimizer, schedule and the
    evaluation-time routing. The guide [The vmoe command](../guides/cli.md) explains
    the options in context.

    Args:
        model_name: A timm model name (``vmoe_*`` variants, or a dense ViT made MoE by ``moe``).
        model_kwargs: Passed on to ``timm.create_model`` (or ``from_pretrained``).
        pretrained_dir: A ``save_pretrained`` directory, ``local-dir:DIR`` or ``hf-hub:ORG/NAME``.
        upcycle_from: A dense timm ViT whose weights start every expert (needs ``moe``).
        checkpoint_path: Weights of ``upcycle_from`` from this file instead of timm's hub.
        upcycle_pretrained: Load the hub weights of ``upcycle_from`` (without checkpoint_path).
        moe: A ``vmoe.models.MoeifyConfig`` or its dict: MoE placement and layer options.
        num_classes: Classes of the head (set from the data module by the CLI).
        img_size: Input resolution (None: the model's).
        moe_dropout: Dropout inside the experts (the paper's "MoE dropout").
        loss: 'softmax' (cross-entropy) or 'sigmoid' (per-class binary cross-entropy).
        label_smoothing: Label smoothing, in [0, 1).
        mixup_alpha: timm mixup alpha (0: off).
        cutmix_alpha: timm cutmix alpha (0: off).
        mixup_prob: Probability of applying mixup/cutmix to a batch.
        aux_loss_weight: Weight of the MoE auxiliary losses in the training loss.
        optimizer: 'adamw', 'sgd' or any name of ``timm.optim.list_optimizers()``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        betas: AdamW betas.
        weight_decay: Weight decay, on kernels only.
        warmup_steps: Steps of linear warmup.
        schedule: 'cosine', 'linear' or 'constant' after the warmup.
        end_lr: Learning rate at the end of the schedule (<= lr).
        schedule_steps: Optimizer steps the schedule spans (None: Lightning's estimate, i.e.
            ``trainer.max_steps``, else the epochs times the batches an epoch). Set it to stop
            a run early with ``max_steps`` and continue it later on the same schedule.
        eval_capacity_factor: Capacity factor of validation/test/predict: None (default) runs
            the layers' own eval routing, dropless for top-K layers (every token on its K
            experts, nothing dropped); a number evaluates on the capacity path at that factor
            (the paper: 4.0).
        eval_batch_priority: Batch Priority Routing at evaluation (None: as in training).
        layer_decay: Layer-wise learning-rate decay for fine-tuning (e.g. 0.75).
        grad_checkpointing: Recompute each block's activations in the backward pass.
        compile: Run the network through ``torch.compile``.
        compile_kwargs: Passed on to ``torch.compile``.

    Raises:
        ValueError: A bad option (named as ``model.<key>``), not exactly one model source, or
            MoE options that do not fit the model.
    """

    def __init__(
        self,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        pretrained_dir: Optional[str] = None,
        upcycle_from: Optional[str] = None,
        checkpoint_path: Optional[str] = None,
        upcycle_pretrained: bool = True,
        moe: Optional[MoeifyConfig] = None,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        moe_dropout: Optional[float] = None,
        loss: str = "softmax",
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        aux_loss_weight: float = 1.0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        betas: Tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        schedule: str = "cosine",
        end_lr: float = 0.0,
        schedule_steps: Optional[int] = None,
        eval_capacity_factor: Optional[float] = None,
        eval_batch_priority: Optional[bool] = None,
        layer_decay: Optional[float] = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} must be one of {LOSSES}")
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r} must be one of {SCHEDULES}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing={label_smoothing} must be in [0, 1)")
        check_optimizer_name(optimizer)
        if end_lr > lr:
            raise ValueError(
                f"model.end_lr={end_lr} is above model.lr={lr}: the schedule would "
                "rise to end_lr; set end_lr <= lr"
            )
        if schedule_steps is not None and (
            not isinstance(schedule_steps, int) or schedule_steps < 1
        ):
            raise ValueError(f"model.schedule_steps={schedule_steps!r} must be a positive int")
        if lr <= 0 or warmup_steps < 0 or weight_decay < 0:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0, weight_decay >= 0 (got lr={lr}, "
                f"warmup_steps={warmup_steps}, weight_decay={weight_decay})"
            )
        # MoE options checked before anything is built, each mistake naming its key: model.moe
        # (also when given as a dict from Python) and the free dict model.model_kwargs.moe
        # that the vmoe timm factories read
        moe_config = None if moe is None else MoeifyConfig.from_dict(moe, where="model.moe")
        if isinstance(model_kwargs, Mapping) and model_kwargs.get("moe") is not None:
            check_moe_options(model_kwargs["moe"], where="model.model_kwargs.moe")
        # the hyper-parameters hold plain values (checkpoints load with weights_only=True)
        moe = None if moe_config is None else moe_config.to_dict()
        self.save_hyperparameters()
        self.model = build_model(
            model_name=model_name,
            model_kwargs=model_kwargs,
            pretrained_dir=pretrained_dir,
            upcycle_from=upcycle_from,
            checkpoint_path=checkpoint_path,
            upcycle_pretrained=upcycle_pretrained,
            moe=moe_config,
            num_classes=num_classes,
            img_size=img_size,
            moe_dropout=moe_dropout,
        )
        if vm.moe_layers(self.model):
            # training_step adds aux_loss_weight x the aux losses to the loss itself, so that
            # Lightning's gradient accumulation and AMP loss scaling apply to both terms: the
            # layers must not also attach them to the backward pass (vmoe.moe.balancing)
            vm.set_aux_loss_mode(self.model, "manual")
        if grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(
                    f"model.grad_checkpointing: {type(self.model).__name__} has no "
                    "set_grad_checkpointing (a timm model has)"
                )
            self.model.set_grad_checkpointing(True)
        if compile:
            _check_compile_backend((compile_kwargs or {}).get("backend"))
            # dynamic=False: evaluation routing changes the capacity factor (a float), which
            # dynamic shapes fail to trace; static shapes compile once per routing setting
            self.model.compile(**{"dynamic": False, **(compile_kwargs or {})})
        elif compile_kwargs:
            raise ValueError("model.compile_kwargs is given but model.compile is false")
        self.num_classes = int(self.model.num_classes)
        if self.num_classes < 1:
            raise ValueError(
                "the model has no classifier head (num_classes=0); set model.num_classes"
            )
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            # Mixed soft targets already include label smoothing.
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )
        # per-class BCE summed over classes (the paper's); smoothing only for integer labels
        self.sigmoid_loss = BinaryCrossEntropy(smoothing=label_smoothing, sum_classes=True)
        top5 = min(5, self.num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_acc{k}": torchmetrics.classification.MulticlassAccuracy(
                    num_classes=self.num_classes, top_k=kk, average="micro"
                )
                for split in ("train", "val", "test")
                for k, kk in (("1", 1), ("5", top5))
            }
        )
        self._training_routing = None  # {layer: RoutingSettings} while evaluation routing is on
        self._checked_labels = False

    # --- loss ------------------------------------------------------------------------------
    def task_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, C]; target: labels [B] (int, smoothed by ``label_smoothing``) or soft targets
        [B, C] (mixup's, already smoothed). Float32 scalar."""
        logits = logits.float()
        if self.hparams.loss == "sigmoid":
            return self.sigmoid_loss(logits, target)
        if target.is_floating_point():
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target.long(), label_smoothing=self.hparams.label_smoothing)

    def _check_labels(self, y: torch.Tensor) -> None:
        if self._checked_labels:
            return
        self._checked_labels = True  # once per run: it syncs with the device
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"the data has label {high if high >= self.num_classes else low} but the "
                f"model has num_classes={self.num_classes} (labels must be in "
                f"[0, {self.num_classes - 1}])"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> logits [B, C]."""
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if x.dtype == torch.uint8:
            raise TypeError(
                "uint8 training images reached the model: a data module with "
                "normalize_on_device=True normalizes them only when the Trainer is given it "
                "(trainer.fit(model, datamodule=dm)), not its loaders"
            )
        self._check_labels(y)
        target = y
        if self.mixup is not None:
            if x.shape[0] % 2:  # timm's Mixup needs an even batch; drop one sample
                x, y = x[:-1], y[:-1]
            x, target = self.mixup(x, y)
        logits = self(x)
        task = self.task_loss(logits, target)
        aux = vm.aux_loss(self.model).to(task.device)
        loss = task + self.hparams.aux_loss_weight * aux
        if not torch.isfinite(loss):  # before the optimizer step: this update is never applied
            self._raise_divergence(
                f"the training loss is {loss.item()} (task {task.item()}, aux {aux.item()})"
            )
        bs = x.shape[0]
        self.log_dict(
            {"train/loss": loss, "train/task_loss": task, "train/aux_loss": aux},
            prog_bar=False,
            batch_size=bs,
        )
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=bs)
        for k in ("1", "5"):
            metric = self.metrics[f"train_acc{k}"]
            metric(logits.detach(), y)
            self.log(f"train/acc{k}", metric, batch_size=bs, prog_bar=k == "1")
        return loss

    def _eval_step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.task_loss(logits, y)
        bs = x.shape[0]
        # sync_dist: the loss is averaged over processes; the metrics sync their own state.
        self.log(f"{split}/loss", loss, batch_size=bs, sync_dist=True, prog_bar=split == "val")
        for k in ("1", "5"):
            metric = self.metrics[f"{split}_acc{k}"]
            metric(logits, y)
            self.log(f"{split}/acc{k}", metric, batch_size=bs, prog_bar=k == "1")
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> Dict[str, torch.Tensor]:
        """Returns ``{"probs": [B, C], "top5": [B, min(5,C)], "label": [B]}`` (label if given)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(x).float()
        probs = torch.sigmoid(logits) if self.hparams.loss == "sigmoid" else logits.softmax(-1)
        out = {"probs": probs, "top5": probs.topk(min(5, self.num_classes), dim=-1).indices}
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            out["label"] = batch[1]
        return out

    # --- evaluation-time routing --------------------------------------------------------------
    def _eval_routing(self) -> None:
        """Route with ``eval_capacity_factor``/``eval_batch_priority``, keeping the training
        settings for ``_train_routing`` (a no-op when already in evaluation routing). Soft MoE
        layers have no capacity or priority to change (their slots are parameters): they are
        left as they are."""
        cf, bpr = self.hparams.eval_capacity_factor, self.hparams.eval_batch_priority
        sparse = [name for name, layer in moe_layers(self.model).items() if not layer.is_soft]
        if (cf is None and bpr is None) or not sparse or self._training_routing is not None:
            return
        self._training_routing = set_routing(
            self.model, capacity_factor=cf, batch_priority=bpr, layers=sparse
        )

    def _train_routing(self) -> None:
        """Put back exactly the training settings ``_eval_routing`` replaced."""
        if self._training_routing is not None:
            restore_routing(self.model, self._training_routing)
            self._training_routing = None

    def _raise_divergence(self, what: str) -> None:
        """DivergenceError naming the step and, when the weights are already non-finite, which
        parameter (made so by the previous step's update)."""
        step = self.global_step
        bad = first_nonfinite_parameter(self.model)
        if bad is not None:
            where = (
                f"parameter model.{bad} became non-finite in the optimizer update of step "
                f"{step - 1}"
                if step
                else f"parameter model.{bad} is non-finite before training"
            )
            what = f"{where} ({what})" if what else where
        raise DivergenceError(
            f"training diverged at step {step}: {what}; nothing non-finite was "
            f"saved; {DIVERGENCE_HINT}"
        )

    def _check_finite_weights(self, before: str) -> None:
        if first_nonfinite_parameter(self.model) is not None:
            self._raise_divergence(f"stopped before {before}")

    def on_validation_start(self) -> None:
        if (
            self._trainer is not None
            and self.trainer.state.fn == TrainerFn.FITTING
            and not self.trainer.sanity_checking
        ):
            self._check_finite_weights(
                "validating"
            )  # argmax of NaN logits would look like accuracy
        self._eval_routing()

    def on_validation_end(self) -> None:
        self._train_routing()

    def on_test_start(self) -> None:
        self._eval_routing()

    def on_test_end(self) -> None:
        self._train_routing()

    def on_predict_start(self) -> None:
        self._eval_routing()

    def on_predict_end(self) -> None:
        self._train_routing()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # A checkpoint written during validation must hold the training routing settings, which
        # live in plain attributes (not in the state dict), so nothing to undo here; the
        # hyper-parameters rebuild them.
        self._check_finite_weights("saving a checkpoint")  # a diverged model is never saved
        checkpoint["vmoe_num_classes"] = self.num_classes

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Refuses a checkpoint whose model differs from this one, naming what differs."""
        head = checkpoint.get("state_dict", {}).get("model.head.weight")
        theirs = checkpoint.get("vmoe_num_classes", None if head is None else head.shape[0])
        if theirs is not None and int(theirs) != self.num_classes:
            raise ValueError(
                f"the checkpoint was trained with num_classes={int(theirs)} but this "
                f"model/data has num_classes={self.num_classes}"
            )
        source = self._checkpoint_name()
        saved = checkpoint.get("hyper_parameters") or {}
        changed = [
            f"model.{d}"
            for key in ARCHITECTURE_HPARAMS
            if key in saved
            for d in _differences(
                key, _comparable(key, saved[key]), _comparable(key, self.hparams.get(key))
            )
        ]
        if changed:
            raise ValueError(
                f"checkpoint {source} does not fit the model: its architecture differs "
                f"({'; '.join(changed)}); resume with the checkpoint's settings or "
                "start a new run"
            )
        problems = self.strict_loading and state_dict_differences(
            checkpoint.get("state_dict", {}), self.state_dict()
        )
        if problems:
            raise ValueError(f"checkpoint {source} does not fit the model: {problems}")

    def _checkpoint_name(self) -> str:
        path = self.trainer.ckpt_path if self._trainer is not None else None
        return str(path) if path else "(being loaded)"

    def on_train_start(self) -> None:
        # bias balancing: one update after each optimizer step that really happened (an
        # optimizer step hook: Lightning runs on_before_optimizer_step also before a step that
        # fp16's GradScaler then skips); a no-op without bias-balanced routers
        self._remove_bias_updates()
        if bias_balanced_routers(self.model):
            self._bias_update_handles = [
                attach_bias_updates(optimizer, self.model) for optimizer in self.trainer.optimizers
            ]

    def on_train_end(self) -> None:
        self._remove_bias_updates()

    def _remove_bias_updates(self) -> None:
        for handle in getattr(self, "_bias_update_handles", ()):
            handle.remove()
        self._bias_update_handles = []

    def setup(self, stage: str) -> None:
        # Each rank counts its own tokens in the routers' expert_load buffers; DDP would
        # overwrite them with rank 0's before every forward (broadcast_buffers)
        counts = expert_load_buffer_names(self)
        if counts:
            ignored = list(getattr(self, "_ddp_params_and_buffers_to_ignore", []))
            self._ddp_params_and_buffers_to_ignore = ignored + [
                n for n in counts if n not in ignored
            ]
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(
                f"num_classes mismatch: the model has {self.num_classes} outputs but "
                f"the data module {type(dm).__name__} has {data_classes} classes"
            )
        data_size = getattr(dm, "img_size", None)
        model_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if (
            data_size is not None
            and model_size is not None
            and not getattr(self.model, "dynamic_img_size", False)
            and tuple(model_size) != _pair(data_size)
        ):
            raise ValueError(
                f"img_size mismatch: the data module {type(dm).__name__} makes "
                f"{data_size}x{data_size} images but the model expects "
                f"{model_size[0]}x{model_size[1]}; set data.init_args.img_size or "
                "model.img_size so that they agree"
            )

    # --- optimizer --------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, layer_decay=hp.layer_decay)
        for group in groups:  # the schedule multiplies each group's own initial lr
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)
        optimizer = create_optimizer(
            groups, hp.optimizer, lr=hp.lr, momentum=hp.momentum, betas=hp.betas
        )
        # Lightning's estimate: max_steps, or the epochs times the loader's length; for data of
        # unknown length (a stream) it is max_steps even when that is -1 (unset).
        total = hp.get("schedule_steps") or self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            if hp.schedule != "constant":
                raise ValueError(
                    f"the {hp.schedule} schedule needs the number of training steps, and the "
                    "training data has no known length (a stream): set --trainer.max_steps "
                    "(or --model.schedule_steps)"
                )
            total = hp.warmup_steps + 1
        total = int(total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step,
                total_steps=total,
                warmup_steps=hp.warmup_steps,
                schedule=hp.schedule,
                peak_lr=hp.lr,
                end_lr=hp.end_lr,
            ),
        )
        # the name is the key Lightning's LearningRateMonitor logs: train/lr/pg1, train/lr/pg2, ...
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }


def _pair(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)


def _comparable(key: str, value: Any) -> Any:
    """A hyper-parameter in the form two runs compare in: MoE options nested (a checkpoint of
    an earlier vmoe holds them flat), ``model.moe`` with every default written out."""
    try:
        if key == "moe" and value is not None:
            return MoeifyConfig.from_dict(value).to_dict()
        if key == "model_kwargs" and isinstance(value, Mapping) and value.get("moe") is not None:
            return {**value, "moe": nested_moe_options(value["moe"])}
    except (ValueError, TypeError):
        pass  # not readable as MoE options: compared as it is
    return value


def _differences(key: str, saved: Any, now: Any) -> list:
    """``["key.sub: checkpoint A, now B", ...]`` for nested dicts (None as {}); [] when equal."""
    if isinstance(saved, dict) or isinstance(now, dict):
        saved = {} if saved is None else saved
        now = {} if now is None else now
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            d
            for k in sorted(set(saved) | set(now), key=str)
            for d in _differences(f"{key}.{k}", saved.get(k), now.get(k))
        ]
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        saved, now = list(saved), list(now)
    return [] if saved == now else [f"{key}: checkpoint {saved!r}, now {now!r}"]


def state_dict_differences(
    saved: Dict[str, Any], own: Dict[str, torch.Tensor], limit: int = 5
) -> str:
    """What keeps ``saved`` from loading into a module whose state dict is ``own`` ('' if
    nothing)."""
    own_shapes = {k: tuple(v.shape) for k, v in own.items()}
    # entries without a shape (not tensors) are not compared
    saved_shapes = {
        k: tuple(v.shape) if hasattr(v, "shape") else own_shapes.get(k, ())
        for k, v in saved.items()
    }
    return shape_mismatches(
        own_shapes, saved_shapes, expected_as="model", found_as="checkpoint", limit=limit
    )


def _check_compile_backend(backend) -> None:
    """A ``torch.compile`` backend given by name must be one torch knows (its own error comes
    as a torch traceback, only once the model is compiled)."""
    if not isinstance(backend, str):
        return  # None (inductor) or a callable backend
    import torch._dynamo

    known = [b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING_ONLY" not in b]
    if backend not in known:
        raise ValueError(
            f"model.compile_kwargs.backend={backend!r} is not a torch.compile backend; "
            f"torch {torch.__version__} has {', '.join(known)}"
        )
