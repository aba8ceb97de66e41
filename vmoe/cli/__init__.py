"""The ``vmoe`` command: ``main`` dispatches to a LightningCLI subcommand or to a ``Command``.

``vmoe fit | validate | test | predict`` are LightningCLI subcommands (``vmoe.cli.training``);
``vmoe convert | routing-report | capacity-sweep | export | make-shards`` are the ``COMMANDS``
of ``vmoe.cli.commands``. User errors end with one line ``vmoe <command>: error: ...`` and exit
code 2 (``run_command``). Usage: the guide "The vmoe command" (``docs/guides/cli.md``).
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

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
]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _commands_help() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = [f"  {n:<{width}}  {c.help}" for n, c in sorted(COMMANDS.items())]
    return "\nmore commands (vmoe <command> --help):\n" + "\n".join(rows)


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


def _run_lightning(command: str, argv: Optional[List[str]]) -> int:
    from .training import VmoeCLI

    try:
        VmoeCLI(args=argv)
    except SystemExit as stop:
        if command in ("-h", "--help", "") and not stop.code:
            print(_commands_help())
        return _exit_code(stop)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vmoe``; returns the exit code (0 ok, 2 user error, 130 Ctrl-C)."""
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in COMMANDS:
        return run_command(command, lambda: _run_command(command, argv[1:]))
    return run_command(command, lambda: _run_lightning(command, argv if explicit else None))


def console_main() -> None:
    sys.exit(main())
