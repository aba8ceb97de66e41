"""jsonargparse's errors for a misspelt option, ``--config`` key, data module or data module
option (an "Unrecognized arguments" line, a Union error over several lines) as the one line the
parser's snapshot gives for the same mistake (``vmoe.cli.snapshot.refusal``), naming the closest
valid options."""

from __future__ import annotations

import re
from argparse import ArgumentError
from typing import Sequence

from . import snapshot
from .snapshot_record import class_options, data_classes, option_table

__all__ = ["named_mistake"]

_UNRECOGNIZED = re.compile(r"^\s*[Uu]nrecognized arguments:\s*(.*)$", re.S)
_NOT_ACCEPTED = re.compile(r"given class_path '([\w.]+)':\s*Option '(\w+)[\w.]*' is not accepted")
# a --config file's unknown key, as jsonargparse words it: (group, key) or (None, key)
_CONFIG_KEY = re.compile(
    r"^(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([\w.]+)'"
    r"|^Option '([\w.]+)' is not accepted"
)
_NOT_AN_IMPORT_PATH = re.compile(r"Expected a dot import path string: ([\w.]+)")


def named_mistake(err: ArgumentError, parser, prog: str, argv: Sequence[str]) -> ArgumentError:
    """``err`` (raised by the subcommand ``parser`` of ``prog`` parsing ``argv``) as the
    snapshot's line for the mistake, or ``err`` itself when it is another error."""
    text = str(err)
    unrecognized = _UNRECOGNIZED.match(text)
    if unrecognized:
        names = [a.split("=", 1)[0] for a in unrecognized.group(1).split() if a[:2] == "--"]
        if not names:
            return err
        options = option_table(parser)["options"]
        return ArgumentError(None, snapshot.unknown_options_message(names, options, prog))
    in_config = _CONFIG_KEY.match(text)
    if in_config:
        group, key = in_config.group(1), in_config.group(2) or in_config.group(3)
        key = f"{group}.{key}" if group else key  # Group 'model' ... option 'lrr'
        options = option_table(parser)["options"]
        message = snapshot.unknown_options_message([key], options, prog, in_config=True)
        return ArgumentError(None, message)
    if not text.startswith('Parser key "data":'):
        return err
    not_accepted = _NOT_ACCEPTED.search(text)
    no_class = _NOT_AN_IMPORT_PATH.search(text)
    if not_accepted:
        path, key = not_accepted.groups()
        options = data_classes(parser).get(path)
        if options is None:  # a user's data module, by import path
            from jsonargparse._util import import_object

            options = class_options(import_object(path))
        given = {f"--data.{key}", f"--data.init_args.{key}"}
        typed = any(a.split("=", 1)[0] in given for a in argv)
        message = snapshot.unknown_data_option_message(
            key, path, options, prog, in_config=not typed
        )
    elif no_class:
        message = snapshot.unknown_data_class_message(no_class.group(1), data_classes(parser))
    else:
        return err
    return ArgumentError(None, message)
