"""The ``vmoe`` command.

``vmoe fit | validate | test | predict --config configs/<name>.yaml`` are LightningCLI
subcommands (model: ``vmoe.train.VmoeClassifier``; data: any LightningDataModule with a
``num_classes`` attribute, e.g. ``vmoe.data.DigitsDataModule``). Other subcommands (``convert``,
``routing-report``, ...) live beside them in ``EXTRA_COMMANDS``: ``main`` dispatches on the
first argument before LightningCLI sees it, and imports the command's module only when used.

Run layout (``trainer.default_root_dir``, default ``runs/default``): ``checkpoints/`` (best and
last; ``--ckpt_path last`` resumes), ``export/`` (``save_pretrained`` of the best model), the
logger's files (wandb offline by default) and ``routing/*.png``.

Configuration mistakes (unknown key, missing data path, bad value, num_classes mismatch) end
with a one-line ``vmoe <command>: error: ...`` and exit code 2; ``VMOE_DEBUG=1`` shows the
traceback.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "VmoeCLI", "EXTRA_COMMANDS", "register_command", "LIGHTNING_COMMANDS"]

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


def _user_errors() -> tuple:
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException
    return (ArgumentError, ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, MisconfigurationException)


def _make_cli_class():
    """Defined lazily so that ``vmoe convert`` etc. do not pay for importing Lightning."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from vmoe.train import ExportPretrained, ResumableTraining, RoutingStatsLogger, VmoeClassifier
    from vmoe.train.loggers import default_logger_config

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
            # Two checkpoint callbacks: the best one (by val/acc1), and "last", which has no
            # monitor so it can also be written mid-epoch before any validation
            # (last_checkpoint.every_n_train_steps); --ckpt_path last finds it.
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max",
                                 "checkpoint.save_last": False, "checkpoint.save_top_k": 1,
                                 "checkpoint.filename": "best-epoch{epoch}-step{step}",
                                 "checkpoint.auto_insert_metric_name": False})
            parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
            parser.set_defaults({"last_checkpoint.monitor": None, "last_checkpoint.save_top_k": 0,
                                 "last_checkpoint.save_last": True})
            parser.add_lightning_class_args(RoutingStatsLogger, "routing_stats")
            parser.add_lightning_class_args(ExportPretrained, "export")
            parser.add_lightning_class_args(ResumableTraining, "resume")
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="after fit, test the best checkpoint and print where things are")
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
            logger = config.trainer.logger
            if logger is None or logger is True:
                config.trainer.logger = default_logger_config(root, name=Path(root).name)
            else:
                for entry in logger if isinstance(logger, list) else [logger]:
                    args = getattr(entry, "init_args", None)
                    if args is not None and "Wandb" in str(entry.class_path) and args.get("save_dir") in (None, "."):
                        args["save_dir"] = root

        def after_fit(self) -> None:
            # read before testing: restoring the best checkpoint resets the callbacks' state
            ckpts = self.trainer.checkpoint_callbacks
            self._paths = {"dir": ckpts[0].dirpath if ckpts else None,
                           "best": ckpts[0].best_model_path if ckpts else "",
                           "last": next((c.last_model_path for c in ckpts if c.last_model_path), "")}
            results = None
            if self.config.fit.test_after_fit and self._has_test_data():
                results = self.trainer.test(self.model, datamodule=self.datamodule,
                                            ckpt_path=self._paths["best"] or None, verbose=False)
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
                lines.append(f"test accuracy: {acc}  (test loss {r.get('test/loss', float('nan')):.4f})")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vmoe``; returns the exit code (0 ok, 2 configuration error)."""
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    debug = bool(os.environ.get("VMOE_DEBUG"))
    try:
        if command in EXTRA_COMMANDS:
            return _run_extra(command, argv[1:])
        try:
            _make_cli_class()(args=argv if explicit else None)
        except SystemExit as stop:
            if command in ("-h", "--help", "") and not stop.code:
                print(_extra_help())
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
        return 0
    except KeyboardInterrupt:
        print(f"\nvmoe {command}: interrupted (resume a fit with --ckpt_path last)", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if len(message) > 400:
            message = message[:400] + " ..."

        print(f"vmoe {command}: error: {message}  [{type(err).__name__}; VMOE_DEBUG=1 for the "
              "traceback]", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
