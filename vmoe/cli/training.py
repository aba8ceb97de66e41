"""``vmoe fit | validate | test | predict``: LightningCLI with vmoe's run layout.

The model is ``vmoe.train.VmoeClassifier``; the data any LightningDataModule with a
``num_classes`` attribute (e.g. ``vmoe.data.DigitsDataModule``). This module imports Lightning,
so ``vmoe.cli`` imports it only for these four subcommands, and only the chosen subcommand's
parser is built. Its ``--help`` is vmoe's: the options of ``vmoe fit`` itself, then the model and
data groups, vmoe's callbacks, and Lightning's trainer flags last, in plain text
(``vmoe.cli.help``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Dict, Literal, Optional, Sequence, Set

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
    WeightAveraging,
)
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import vmoe.data  # noqa: F401 (the data modules --data takes by name: --data DigitsDataModule)
from vmoe.train import (
    AtomicCheckpointIO,
    ExportPretrained,
    LastCheckpoint,
    ResumableTraining,
    RoutingStatsLogger,
    VmoeClassifier,
    read_checkpoint,
)
from vmoe.train.loggers import default_logger_config
from vmoe.train.predictions import PredictionCsvWriter
from vmoe.train.progress import LineProgress
from vmoe.train.strategy import ExpertParallelStrategy
from vmoe.writes import WRITE_ERRNOS, WriteError, failed_write, write_errno

from . import snapshot
from .errors import TrainingInterrupted
from .help import PlainHelpFormatter, arrange_help, subcommand_usage
from .moe_option import merge_on_the_command_line
from .parse_errors import named_mistake
from .quiet import quiet_lightning, quiet_run, quiet_wandb_init
from .snapshot_record import record_snapshot

__all__ = ["VmoeCLI"]


def _refuse_lightning_optimizer(config) -> None:
    """LightningCLI's ``--optimizer`` / ``--lr_scheduler`` would replace ``configure_optimizers``
    (one parameter group: weight decay on biases and norms too; no warmup, no schedule) while the
    hyper-parameters still record ``model.optimizer``: refused, naming vmoe's options instead."""
    given = [
        f"--{key} {_class_name(config.get(key))}"
        for key in ("optimizer", "lr_scheduler")
        if config.get(key) is not None
    ]
    if given:
        raise ValueError(
            f"{' and '.join(given)}: not supported; vmoe builds the optimizer and schedule itself "
            "(no weight decay on biases, norms and embeddings; warmup then decay): use "
            "--model.optimizer (adamw, sgd or a timm.optim name), --model.lr, "
            "--model.weight_decay, --model.momentum/--model.betas, --model.schedule, "
            "--model.warmup_steps, --model.end_lr"
        )


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def shown_path(path) -> str:
    """``path`` as the end-of-fit summary shows every path: relative to the working directory
    when it is inside it (as the user typed ``runs/x``), else absolute."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _class_name(value) -> str:
    return str(getattr(value, "class_path", value))


class RunConfigSaver(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (the run's ``config.yaml``), a failed write named as
    every vmoe writer names it (``vmoe.writes.WriteError``: "could not write the run's config
    X: disk full ...") instead of a bare ``[Errno 28]``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        target = os.path.join(trainer.log_dir or trainer.default_root_dir, self.config_filename)
        # the previous config.yaml (a resumed run's) is set aside, and put back if the write fails
        kept = os.path.join(os.path.dirname(target), f".{self.config_filename}.previous")
        mine = trainer.is_global_zero and os.path.isfile(target)
        with failed_write(target, "the run's config"):
            if mine:
                os.replace(target, kept)
            try:
                super().setup(trainer, pl_module, stage)
            except BaseException:
                if trainer.is_global_zero:
                    with contextlib.suppress(OSError):
                        os.remove(target)  # a partial file
                    if mine:
                        os.replace(kept, target)
                raise
            if mine:
                os.remove(kept)


class VmoeCLI(LightningCLI):
    """LightningCLI with the run layout, default callbacks and logger of vmoe."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs):
        from . import LIGHTNING_COMMANDS

        quiet_lightning()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("seed_everything_default", 0)
        # Only the parser of the subcommand given is built (each costs seconds of signature
        # inspection): the first word of args that names one, else all of them.
        given = sys.argv[1:] if args is None else args
        words = given if isinstance(given, (list, tuple)) else []
        self._args = list(words)
        self._only = next((w for w in words if w in LightningCLI.subcommands()), None)
        # Parse errors raise (ArgumentError) instead of printing the whole usage: main()
        # turns them into one line.
        quiet = {"exit_on_error": False}
        sub = {
            c: {
                **quiet,
                "formatter_class": PlainHelpFormatter,
                "description": LIGHTNING_COMMANDS[c],
                "usage": subcommand_usage(c),
            }
            for c in self.subcommands()
        }
        # (a subcommand parser takes the formatter of the main one)
        main = {**quiet, "prog": "vmoe", "formatter_class": PlainHelpFormatter}
        kwargs.setdefault("parser_kwargs", {**main, **sub})
        super().__init__(
            VmoeClassifier,
            L.LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI's warns when args is given while sys.argv has arguments (always so under
        # pytest or a script calling vmoe.cli.main): main() chose args on purpose
        structured = isinstance(args, (dict, Namespace))
        try:
            self.config = parser.parse_object(args) if structured else parser.parse_args(args)
        except ArgumentError as err:
            if self._only is None:
                raise
            subparser = self._subcommand_parsers[self._only]
            raise named_mistake(err, subparser, f"vmoe {self._only}", self._args) from err

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # the snapshot that answers the next --help / misspelt option without this parser
        for subcommand, subparser in self._subcommand_parsers.items():
            if snapshot.cache_folder() is not None and snapshot.load(subcommand) is None:
                snapshot.save(subcommand, record_snapshot(subparser))

    def subcommands(self) -> Dict[str, Set[str]]:  # LightningCLI's is a staticmethod
        every = LightningCLI.subcommands()
        only = getattr(self, "_only", None)
        return {only: every[only]} if only else every

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        arrange_help(parser, subcommand)
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        # Two checkpoint callbacks: the best one (by val/acc1), and "last" (LastCheckpoint:
        # every N steps, every epoch end, on Ctrl-C/crash); --ckpt_path last finds it.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(PredictionCsvWriter, "predictions")
        parser.add_lightning_class_args(RoutingStatsLogger, "routing_stats")
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.add_lightning_class_args(ResumableTraining, "resume")
        parser.add_argument(
            "--ema.decay",
            type=Optional[float],
            default=None,
            help="keep an exponential moving average of the weights with this "
            "decay (e.g. 0.9998; Lightning's EMAWeightAveraging): validation, "
            "checkpoints, testing after fit and the export use the EMA weights",
        )
        parser.add_argument(
            "--ema.update_starting_at_step",
            type=Optional[int],
            default=None,
            help="first optimizer step (0-based) averaged into the EMA",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, test and print where things are",
        )
        parser.add_argument(
            "--test_weights",
            type=Literal["best", "final"],
            default="best",
            help="weights tested after fit: the best checkpoint (by the "
            "checkpoint monitor) or the final weights of the run",
        )
        parser.add_argument(
            "--torch_num_threads",
            type=Optional[int],
            default=None,
            help="CPU threads for torch (1 is fastest for tiny models on a busy CPU)",
        )
        parser.add_argument(
            "--progress",
            type=Literal["auto", "bar", "lines"],
            default="auto",
            help="auto: Lightning's progress bar on a terminal, plain lines (one per epoch and "
            "every 30 s) when stdout is a file or a pipe (a CI job, a cluster job's log); "
            "bar or lines: always that",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        merge_on_the_command_line(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _refuse_lightning_optimizer(config)
        data_class = str(getattr(config.get("data"), "class_path", config.get("data")))
        resume = config.get("resume")
        quiet_run(
            vmoe_data=data_class.startswith("vmoe.data."),
            exact_resume=bool(resume is None or resume.get("enabled", True)),
            resuming=bool(config.get("ckpt_path")),
        )
        if config.get("torch_num_threads"):
            torch.set_num_threads(config.torch_num_threads)
        root = config.trainer.default_root_dir or os.path.join("runs", "default")
        config.trainer.default_root_dir = root
        for name in ("checkpoint", "last_checkpoint"):
            if config[name].dirpath is None:
                config[name].dirpath = os.path.join(root, "checkpoints")
        if config.predictions.path is None:
            config.predictions.path = os.path.join(root, "predictions.csv")
        logger = config.trainer.logger
        if logger is None or logger is True:
            config.trainer.logger = default_logger_config(root, name=Path(root).name)
        else:
            for entry in logger if isinstance(logger, list) else [logger]:
                args = getattr(entry, "init_args", None)
                if (
                    args is not None
                    and "Wandb" in str(entry.class_path)
                    and args.get("save_dir") in (None, ".")
                ):
                    args["save_dir"] = root

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        self._plain_progress(trainer)
        quiet_wandb_init(trainer.loggers)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.loggers and not any(
            isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks
        ):
            # logs each parameter group's learning rate every step as train/lr/pg<i>
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        ema = self.config[self.subcommand].get("ema") if self.subcommand == "fit" else None
        if ema is not None and ema.decay is not None:
            if not 0.0 < ema.decay < 1.0:
                raise ValueError(f"ema.decay={ema.decay} must be in (0, 1)")
            trainer.callbacks.insert(
                0,
                EMAWeightAveraging(
                    decay=ema.decay, update_starting_at_step=ema.update_starting_at_step
                ),
            )
        if isinstance(trainer.strategy, ExpertParallelStrategy):  # one line, before ranks start
            try:
                trainer.strategy.check_supported(TrainerFn(self.subcommand), trainer.callbacks)
            except NotImplementedError as err:
                raise ValueError(str(err)) from None
        return trainer

    def _plain_progress(self, trainer) -> None:
        """Lightning's default progress bar becomes ``LineProgress`` when ``--progress lines``, or
        ``auto`` and stdout is not a terminal (a bar the user configured stays)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        mode = config.get("progress", "auto")
        bar = trainer.progress_bar_callback
        if bar is None or type(bar) not in (TQDMProgressBar, RichProgressBar):
            return
        given = config.trainer.get("callbacks") or []
        if any("ProgressBar" in str(getattr(c, "class_path", c)) for c in given):
            return
        if mode == "lines" or (mode == "auto" and not _is_terminal(sys.stdout)):
            trainer.callbacks[trainer.callbacks.index(bar)] = LineProgress()

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which re-applies every model hyper-parameter of
        ``--ckpt_path`` over the user's options (a ``--model.eval_capacity_factor`` given
        to ``vmoe test`` was silently ignored) and suggests an unsafe load for a bad file.
        Here the checkpoint fills in only the model options left at their defaults."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(read_checkpoint(ckpt_path, mmap=True).get("hyper_parameters") or {})
        config = self.config[subcommand].model
        defaults = self._parser(subcommand).get_defaults().model
        taken = {
            k: v
            for k, v in hparams.items()
            if not k.startswith("_") and k in defaults and config.get(k) == defaults.get(k)
        }
        if taken:
            self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown (which
            # wrote last.ckpt through LastCheckpoint.on_exception): report it as such.
            if self.trainer.state.status == TrainerStatus.INTERRUPTED:
                raise TrainingInterrupted(self.trainer.global_step) from None
            raise
        except OSError as err:
            # a failed write that names no file (a logger's, Lightning's own): name the run
            code = write_errno(err)
            if isinstance(err, WriteError) or err.filename or code is None:
                raise
            root = shown_path(self.trainer.default_root_dir)
            raise WriteError(
                code,
                f"could not write a file of the run under {root}: {WRITE_ERRNOS[code]} "
                f"({err.strerror or os.strerror(code)})",
            ) from err

    def after_predict(self) -> None:
        for cb in self.trainer.callbacks:
            if isinstance(cb, PredictionCsvWriter) and cb.written is not None:
                print(f"vmoe predict: wrote {cb.rows} predictions to {cb.written}", flush=True)

    def after_fit(self) -> None:
        # read before testing: restoring the best checkpoint resets the callbacks' state
        ckpts = self.trainer.checkpoint_callbacks
        self._paths = {
            "dir": ckpts[0].dirpath if ckpts else None,
            "best": ckpts[0].best_model_path if ckpts else "",
            "last": next((c.last_model_path for c in ckpts if c.last_model_path), ""),
        }
        results = None
        if self.config.fit.test_after_fit and self._has_test_data():
            best = self._paths["best"] if self.config.fit.test_weights == "best" else ""
            self._paths["tested"] = Path(best).name if best else "final weights"
            # Lightning's WeightAveraging (ema.decay) would restore the checkpoint's training
            # weights (current_model_state) over its EMA weights (state_dict) when the test loads
            # the best checkpoint; the final weights are the EMA already (on_train_end)
            averaging = [cb for cb in self.trainer.callbacks if isinstance(cb, WeightAveraging)]
            self.trainer.callbacks = [cb for cb in self.trainer.callbacks if cb not in averaging]
            try:
                results = self.trainer.test(
                    self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False
                )
            finally:
                self.trainer.callbacks = averaging + self.trainer.callbacks
        self._summary(results)

    def _has_test_data(self) -> bool:
        dm = self.datamodule
        if dm is None or not hasattr(dm, "test_dataloader"):
            return False
        try:
            dm.setup("test")
        except Exception as err:  # e.g. no test split configured: skip testing, say why
            print(f"vmoe fit: not testing after fit ({type(err).__name__}: {err})", flush=True)
            return False
        return getattr(dm, "test_set", True) is not None

    @rank_zero_only
    def _summary(self, results) -> None:
        trainer, lines = self.trainer, []
        if results:
            r = results[0]
            acc = "  ".join(
                f"{k.split('/')[1]} {100 * v:.2f}%"
                for k, v in r.items()
                if k.startswith("test/acc")
            )
            lines.append(
                f"test accuracy: {acc}  (test loss {r.get('test/loss', float('nan')):.4f}; "
                f"{self._paths['tested']})"
            )
        paths = self._paths
        if paths["dir"]:
            best, last = Path(paths["best"]).name or "-", Path(paths["last"]).name or "-"
            lines.append(
                f"checkpoints:   {shown_path(paths['dir'])}  (best: {best}, last: {last}; "
                "resume with --ckpt_path last)"
            )
        for logger in trainer.loggers:
            where = getattr(logger, "log_dir", None) or logger.save_dir
            lines.append(f"logs:          {shown_path(where)}  ({type(logger).__name__})")
        for cb in trainer.callbacks:
            if isinstance(cb, ExportPretrained) and cb.export_path is not None:
                lines.append(
                    f"exported:      {shown_path(cb.export_path)}  (vmoe.models.from_pretrained, "
                    "or timm.create_model('local-dir:DIR', pretrained=True))"
                )
            if isinstance(cb, RoutingStatsLogger):
                for name, path in cb.last_figures.items():
                    lines.append(f"{name + ':':<14} {shown_path(path)}")
        print("\n".join(["", "vmoe fit finished."] + ["  " + line for line in lines]), flush=True)
