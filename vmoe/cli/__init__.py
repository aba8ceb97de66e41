"""The ``vmoe`` command: ``main`` dispatches to a LightningCLI subcommand or to a ``Command``.

``vmoe fit | validate | test | predict`` are LightningCLI subcommands (``vmoe.cli.training``);
``vmoe convert | routing-report | capacity-sweep | export | make-shards | ...`` are the
``COMMANDS`` of ``vmoe.cli.commands`` (a new command is one entry there; ``vmoe --help`` lists
it). User errors end with one line ``vmoe <command>: error: ...`` and exit code 2
(``run_command``). Usage: the guide "The vmoe command" (``docs/guides/cli.md``).

Start-up is kept light: this module, ``commands`` and ``errors`` import only the standard
library, so ``vmoe --help``, ``vmoe <command> --help``, an unknown command, a usage error of a
``Command`` and a missing ``--config`` file answer without importing torch or Lightning; each
command imports what it needs when it runs (``benchmarks/cli_startup.py`` measures it).
"""

from __future__ import annotations

import difflib
import os
import shutil
import sys
import textwrap
from typing import Dict, List, Optional, Sequence

from .commands import COMMANDS, Command
from .errors import TrainingInterrupted, error_message, run_command

__all__ = [
    "main",
    "console_main",
    "COMMANDS",
    "Command",
    "LIGHTNING_COMMANDS",
    "run_command",
    "error_message",
    "TrainingInterrupted",
    "help_text",
]

# The LightningCLI subcommands with vmoe's one-line help (Lightning's own descriptions are cut
# mid-sentence by its first-line extraction).
LIGHTNING_COMMANDS: Dict[str, str] = {
    "fit": "train a model from a config (e.g. --config configs/quickstart.yaml), then test it, "
    "export it and print where everything went",
    "validate": "evaluate a model or a checkpoint (--ckpt_path) on the validation split",
    "test": "evaluate a model or a checkpoint (--ckpt_path) on the test split",
    "predict": "write a checkpoint's top-k predictions per image to predictions.csv",
}
_HELP = ("-h", "--help")


def help_text(width: Optional[int] = None) -> str:
    """``vmoe --help``: every command with one line of what it does (wrapped, never cut)."""
    if width is None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    names = [*LIGHTNING_COMMANDS, *COMMANDS]
    pad = max(len(n) for n in names) + 4

    def rows(items) -> List[str]:
        out = []
        for name, text in items:
            out += textwrap.wrap(
                text,
                width=max(width, pad + 30),
                initial_indent=f"  {name:<{pad - 2}}",
                subsequent_indent=" " * pad,
            )
        return out

    return "\n".join(
        [
            "usage: vmoe <command> [options]",
            "",
            *textwrap.wrap(
                "Vision Mixture-of-Experts (V-MoE, Soft MoE) in PyTorch: train, evaluate, "
                "import, export and inspect sparse MoE vision transformers.",
                width,
            ),
            "",
            "training and evaluation (LightningCLI: --config FILE, --model.*, --data.*, "
            "--trainer.*):",
            *rows(LIGHTNING_COMMANDS.items()),
            "",
            "models, data and routing:",
            *rows((name, command.help) for name, command in COMMANDS.items()),
            "",
            "'vmoe <command> --help' shows a command's options; the guide: docs/guides/cli.md.",
        ]
    )


def _exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


def _run_command(name: str, argv: List[str]) -> int:
    """Parses ``argv`` with the command's jsonargparse parser (a mistake raises ArgumentError,
    which ``run_command`` turns into one line) and runs it."""
    from jsonargparse import ArgumentParser

    command = COMMANDS[name]
    parser = ArgumentParser(prog=f"vmoe {name}", description=command.help, exit_on_error=False)
    command.add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help
        return _exit_code(stop)
    return int(command.run(args) or 0)


def _config_files(argv: Sequence[str]) -> List[str]:
    """The values of ``-c X``, ``--config X`` and ``--config=X`` in ``argv``."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config="):
            found.append(arg[len("--config=") :])
    return found


def _check_config_files(argv: Sequence[str]) -> None:
    """A ``--config`` that names no file is one line before Lightning is imported. A value that
    is not path-like (an inline YAML/JSON mapping, a URL) is left to jsonargparse."""
    for value in _config_files(argv):
        inline = "\n" in value or value.lstrip().startswith(("{", "[")) or "://" in value
        if not inline and not os.path.isfile(value):
            what = "is a directory" if os.path.isdir(value) else "no such file"
            raise FileNotFoundError(f"--config {value}: {what}")


def _from_snapshot(command: str, argv: Sequence[str]) -> Optional[int]:
    """``vmoe <command> --help`` and a misspelt option answered from the parser's snapshot
    (``vmoe.cli.snapshot``) without importing Lightning; None when the live parser must answer
    (no snapshot of this installation, or nothing the snapshot can settle)."""
    from . import snapshot

    if not argv or argv[0] != command:
        return None
    recorded = snapshot.load(command)
    if recorded is None:
        return None
    rest = list(argv[1:])
    if rest in (["-h"], ["--help"]):
        sys.stdout.write(snapshot.render_help(recorded, f"vmoe {command}"))
        sys.stdout.flush()
        return 0
    message = snapshot.refusal(rest, recorded, f"vmoe {command}")
    if message is not None:
        from argparse import ArgumentError

        raise ArgumentError(None, message)
    return None


def _run_lightning(command: str, argv: Optional[List[str]]) -> int:
    given = sys.argv[1:] if argv is None else argv
    _check_config_files(given)
    answered = _from_snapshot(command, given)
    if answered is not None:
        return answered
    from .training import VmoeCLI

    try:
        VmoeCLI(args=argv)
    except SystemExit as stop:
        return _exit_code(stop)
    return 0


def _unknown_command(command: str) -> int:
    names = [*LIGHTNING_COMMANDS, *COMMANDS]
    close = difflib.get_close_matches(command, names, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    print(
        f"vmoe: error: {command!r} is not a vmoe command; {hint}commands: {', '.join(names)} "
        "(vmoe --help says what each does)",
        file=sys.stderr,
        flush=True,
    )
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vmoe``; returns the exit code (0 ok, 2 user error, 130 Ctrl-C)."""
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in _HELP:
        print(help_text())
        return 0
    if not command:
        print(help_text(), file=sys.stderr)
        print("\nvmoe: error: choose a command", file=sys.stderr, flush=True)
        return 2
    if command in COMMANDS:
        return run_command(command, lambda: _run_command(command, argv[1:]))
    if command in LIGHTNING_COMMANDS or command.startswith("-"):  # e.g. vmoe -c x.yaml fit
        name = next((a for a in argv if a in LIGHTNING_COMMANDS), command)
        return run_command(name, lambda: _run_lightning(name, argv if explicit else None))
    return _unknown_command(command)


def console_main() -> None:
    sys.exit(main())
