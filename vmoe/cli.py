"""The ``vmoe`` command.

``vmoe fit | validate | test | predict --config configs/<name>.yaml`` are LightningCLI
subcommands (model: ``vmoe.train.VmoeClassifier``; data: any LightningDataModule with a
``num_classes`` attribute, e.g. ``vmoe.data.DigitsDataModule``). Other subcommands (``convert``,
``routing-report``, ...) live beside them in ``EXTRA_COMMANDS``: ``main`` dispatches on the
first argument before LightningCLI sees it, and imports the command's module only when used.

Run layout (``trainer.default_root_dir``, default ``runs/default``): ``checkpoints/`` (best and
last; ``--ckpt_path last`` resumes), ``export/`` (``save_pretrained`` of the best model), the
logger's files (wandb offline by default) and ``routing/*.png``.

Interrupt-safe: ``last.ckpt`` is written every ``last_checkpoint.every_n_train_steps`` steps
(default 500), at every epoch end and when training stops on Ctrl-C or a crash, atomically
(temp file + ``os.replace``). Ctrl-C ends with exit code 130 and
``vmoe fit: interrupted at step N; resume with --ckpt_path last``.

With ``--ckpt_path FILE``, the checkpoint's model hyper-parameters fill in the model options
left at their defaults; options given on the command line or in a config win. A checkpoint
whose architecture differs from the configured model is refused, naming what differs.

User mistakes in every subcommand (unknown key, missing data path, bad value, num_classes or
img_size mismatch, an unreadable checkpoint, a diverged run, a full disk, ...) end with a
one-line ``vmoe <command>: error: ...`` and exit code 2; ``VMOE_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

__all__ = ["main", "VmoeCLI", "EXTRA_COMMANDS", "register_command", "LIGHTNING_COMMANDS",
           "run_command", "error_message", "TrainingInterrupted"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# name -> ("module:function", one-line help). The function takes the remaining argv (a list of
# str) and returns an exit code. Other parts of vmoe add their commands here.
EXTRA_COMMANDS: Dict[str, Tuple[str, str]] = {}


def register_command(name: str, target: str, help: str) -> None:
    """Add a ``vmoe <name> ...`` subcommand implemented by ``target`` ("module:function")."""
    if name in LIGHTNING_COMMANDS:
        raise ValueError(f"{name!r} is a LightningCLI subcommand and cannot be replaced")
    EXTRA_COMMANDS[name] = (target, help)


register_command("convert", "vmoe.models.vmoe_import:convert_main",
                 "convert an official V-MoE checkpoint (PREFIX.index + shards) to a save_pretrained dir")
register_command("routing-report", "vmoe.viz.cli:routing_report_main",
                 "write routing plots, index.html and report.json for a model on a dataset")
register_command("capacity-sweep", "vmoe.viz.cli:capacity_sweep_main",
                 "accuracy and MoE FLOPs vs inference capacity factor, vanilla vs BPR")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a Lightning subcommand; ``step`` is the trainer's global step then."""

    def __init__(self, step: Optional[int] = None):
        super().__init__(step)
        self.step = step


# OSErrors that are the user's to fix rather than bugs: a full disk or quota, a read-only place.
USER_OS_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES}
MAX_MESSAGE = 400
_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def _user_errors() -> tuple:
    from argparse import ArgumentError

    errors = [ArgumentError, ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
              NotADirectoryError, IsADirectoryError, PermissionError, FloatingPointError]
    if "lightning" in sys.modules:  # vmoe convert etc. do not import Lightning
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        errors.append(MisconfigurationException)
    return tuple(errors)


def error_message(err: BaseException) -> Optional[str]:
    """One line describing a user error, or None when ``err`` is a bug (show the traceback).

    An exception re-raised from a DataLoader worker carries the worker's whole traceback as its
    message; the line shown is the original exception's (e.g. the unreadable image's path)."""
    is_user = isinstance(err, _user_errors()) or (isinstance(err, OSError) and err.errno in USER_OS_ERRNOS)
    if not is_user:
        return None
    text = str(err)
    if _WORKER_PREFIX.match(text):
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = re.sub(r"^[\w.]+(Error|Exception|Warning)?: ", "", lines[-1].strip()) if lines else text
    message = " ".join(text.split()) or type(err).__name__
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " ..."
    return message


def run_command(command: str, fn: Callable[[], Optional[int]]) -> int:
    """Run ``fn()`` for ``vmoe <command>``; a user error becomes one line
    ``vmoe <command>: error: ...`` on stderr and exit code 2, Ctrl-C exit code 130
    (``VMOE_DEBUG=1`` re-raises to show the traceback). Every vmoe subcommand goes through it."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt as err:
        step = getattr(err, "step", None)
        if command == "fit" and step is not None:
            text = f"interrupted at step {step}; resume with --ckpt_path last"
        else:
            text = "interrupted"
        print(f"\nvmoe {command}: {text}", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        message = error_message(err)
        if message is None or os.environ.get("VMOE_DEBUG"):
            raise
        print(f"vmoe {command}: error: {message}  [{type(err).__name__}; VMOE_DEBUG=1 for the "
              "traceback]", file=sys.stderr, flush=True)
        return 2


def _make_cli_class():
    """Defined lazily so that ``vmoe convert`` etc. do not pay for importing Lightning."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.trainer.states import TrainerStatus

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

    class VmoeCLI(LightningCLI):
        """LightningCLI with the run layout, default callbacks and logger of vmoe."""

        def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs):
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            kwargs.setdefault("seed_everything_default", 0)
            # Parse errors raise (ArgumentError) instead of printing the whole usage: main()
            # turns them into one line.
            quiet = {"exit_on_error": False}
            kwargs.setdefault("parser_kwargs", {**quiet, "prog": "vmoe",
                                                **{c: dict(quiet) for c in LIGHTNING_COMMANDS}})
            super().__init__(VmoeClassifier, L.LightningDataModule, subclass_mode_data=True,
                             args=args, run=run, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            # Two checkpoint callbacks: the best one (by val/acc1), and "last" (LastCheckpoint:
            # every N steps, every epoch end, on Ctrl-C/crash); --ckpt_path last finds it.
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max",
                                 "checkpoint.save_last": False, "checkpoint.save_top_k": 1,
                                 "checkpoint.filename": "best-epoch{epoch}-step{step}",
                                 "checkpoint.auto_insert_metric_name": False})
            parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
            parser.add_lightning_class_args(PredictionCsvWriter, "predictions")
            parser.add_lightning_class_args(RoutingStatsLogger, "routing_stats")
            parser.add_lightning_class_args(ExportPretrained, "export")
            parser.add_lightning_class_args(ResumableTraining, "resume")
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="after fit, test and print where things are")
            parser.add_argument("--test_weights", type=Literal["best", "final"], default="best",
                                help="weights tested after fit: the best checkpoint (by the "
                                     "checkpoint monitor) or the final weights of the run")
            parser.add_argument("--torch_num_threads", type=Optional[int], default=None,
                                help="CPU threads for torch (1 is fastest for tiny models on a busy CPU)")
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.get("torch_num_threads"):
                import torch
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
                    if args is not None and "Wandb" in str(entry.class_path) and args.get("save_dir") in (None, "."):
                        args["save_dir"] = root

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's plugin
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

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
            taken = {k: v for k, v in hparams.items()
                     if not k.startswith("_") and k in defaults and config.get(k) == defaults.get(k)}
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

        def after_predict(self) -> None:
            for cb in self.trainer.callbacks:
                if isinstance(cb, PredictionCsvWriter) and cb.written is not None:
                    print(f"vmoe predict: wrote {cb.rows} predictions to {cb.written}", flush=True)

        def after_fit(self) -> None:
            # read before testing: restoring the best checkpoint resets the callbacks' state
            ckpts = self.trainer.checkpoint_callbacks
            self._paths = {"dir": ckpts[0].dirpath if ckpts else None,
                           "best": ckpts[0].best_model_path if ckpts else "",
                           "last": next((c.last_model_path for c in ckpts if c.last_model_path), "")}
            results = None
            if self.config.fit.test_after_fit and self._has_test_data():
                best = self._paths["best"] if self.config.fit.test_weights == "best" else ""
                self._paths["tested"] = Path(best).name if best else "final weights"
                results = self.trainer.test(self.model, datamodule=self.datamodule,
                                            ckpt_path=best or None, verbose=False)
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
                acc = "  ".join(f"{k.split('/')[1]} {100 * v:.2f}%" for k, v in r.items()
                                if k.startswith("test/acc"))
                lines.append(f"test accuracy: {acc}  (test loss {r.get('test/loss', float('nan')):.4f}; "
                             f"{self._paths['tested']})")
            paths = self._paths
            if paths["dir"]:
                best, last = Path(paths["best"]).name or "-", Path(paths["last"]).name or "-"
                lines.append(f"checkpoints:   {paths['dir']}  (best: {best}, last: {last}; "
                             "resume with --ckpt_path last)")
            for logger in trainer.loggers:
                where = getattr(logger, "log_dir", None) or logger.save_dir
                lines.append(f"logs:          {where}  ({type(logger).__name__})")
            for cb in trainer.callbacks:
                if isinstance(cb, ExportPretrained) and cb.export_path is not None:
                    lines.append(f"exported:      {cb.export_path}  (vmoe.models.from_pretrained)")
                if isinstance(cb, RoutingStatsLogger):
                    for name, path in cb.last_figures.items():
                        lines.append(f"{name + ':':<14} {path}")
            print("\n".join(["", "vmoe fit finished."] + ["  " + line for line in lines]), flush=True)

    return VmoeCLI


def __getattr__(name: str):
    if name == "VmoeCLI":
        return _make_cli_class()
    raise AttributeError(name)


def _extra_help() -> str:
    if not EXTRA_COMMANDS:
        return ""
    width = max(len(n) for n in EXTRA_COMMANDS)
    rows = [f"  {n:<{width}}  {h}" for n, (_, h) in sorted(EXTRA_COMMANDS.items())]
    return "\nmore commands (vmoe <command> --help):\n" + "\n".join(rows)


def _run_extra(name: str, argv: List[str]) -> int:
    module, _, func = EXTRA_COMMANDS[name][0].partition(":")
    fn: Callable[[List[str]], int] = getattr(importlib.import_module(module), func)
    return int(fn(argv) or 0)


def _run_lightning(command: str, argv: Optional[List[str]]) -> int:
    try:
        _make_cli_class()(args=argv)
    except SystemExit as stop:
        if command in ("-h", "--help", "") and not stop.code:
            print(_extra_help())
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vmoe``; returns the exit code (0 ok, 2 user error, 130 Ctrl-C)."""
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in EXTRA_COMMANDS:
        return run_command(command, lambda: _run_extra(command, argv[1:]))
    return run_command(command, lambda: _run_lightning(command, argv if explicit else None))


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
