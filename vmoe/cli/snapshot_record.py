"""What ``vmoe.cli.snapshot`` keeps of a live LightningCLI subcommand parser: its help as
replayable pieces (``record_snapshot``), its options and the ones that take ``.key``
continuations (``option_table``), and the data modules ``--data`` knows by name with their
options (``data_classes``). This side imports jsonargparse; ``vmoe.cli.snapshot`` reads what it
records with the standard library only."""

from __future__ import annotations

import argparse
import collections.abc
import os
import pathlib
import typing
from typing import Any, Dict, List

from jsonargparse._typehints import ActionTypeHint

__all__ = ["record_snapshot", "option_table", "class_options", "data_classes"]


class _Recorder(argparse.HelpFormatter):
    """Placed just above argparse's ``HelpFormatter`` in a formatter's MRO, it sees the final
    pieces (after jsonargparse's and ``PlainHelpFormatter``'s changes) and appends them to
    ``self.recorded`` as ``vmoe.cli.snapshot.render_help`` replays them."""

    recorded: List[list]

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        if usage is None:  # argparse would build (and wrap) it at the terminal's width
            raise ValueError("a recorded parser needs an explicit usage line")
        if usage is not argparse.SUPPRESS:
            self.recorded.append(["usage", self._format_usage(usage, actions, groups, prefix)])
        super().add_usage(usage, actions, groups, prefix)

    def start_section(self, heading) -> None:
        self.recorded.append(["section", heading])
        super().start_section(heading)

    def end_section(self) -> None:
        self.recorded.append(["end"])
        super().end_section()

    def add_text(self, text) -> None:
        if text is not argparse.SUPPRESS and text is not None:
            self.recorded.append(["text", text])
        super().add_text(text)

    def add_argument(self, action) -> None:
        if action.help is not argparse.SUPPRESS:
            if list(self._iter_indented_subactions(action)):
                raise ValueError(f"{action.dest}: sub-actions cannot be recorded")
            # as argparse's _format_action (and jsonargparse's, for an option without help)
            shown = action.help is None or (action.help and action.help.strip())
            text = self._expand_help(action) if shown else ""
            self.recorded.append(["option", self._format_action_invocation(action), text or ""])
        super().add_argument(action)


_SCALARS = (int, float, str, bool, type(None))
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)


def _scalar(hint) -> bool:
    """A type whose value has no ``.key`` parts: a scalar, a path, a Literal, a Union/Optional
    or sequence of such (``Optional[int]``, ``Union[str, Path]``, ``tuple[float, float]``)."""
    if hint in _SCALARS or hint is Ellipsis:
        return True
    if isinstance(hint, type) and issubclass(hint, (os.PathLike, pathlib.PurePath)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return True
    if origin is typing.Union or origin in _SEQUENCES:
        return all(_scalar(a) for a in typing.get_args(hint))
    return False


def _takes_keys(action: argparse.Action) -> bool:
    """Whether ``--<option>.key`` may be accepted: a typed option of a class, dict, dataclass or
    any other structured type. Other actions (a group's ``--model CONFIG``, ``--data.help``,
    ``--print_config``) take no keys."""
    return isinstance(action, ActionTypeHint) and not _scalar(action._typehint)


def option_table(parser) -> Dict[str, List[str]]:
    """``options``: every long option ``parser`` has (hidden ones too); ``open``: those that take
    ``.key`` continuations (``_takes_keys``)."""
    options, open_ = [], []
    for action in parser._actions:
        names = [o for o in action.option_strings if o.startswith("--")]
        options += names
        if _takes_keys(action):
            open_ += names
    return {"options": options, "open": open_}


def class_options(cls) -> List[str]:
    """The option names jsonargparse gives ``cls``'s ``__init__`` (``batch_size``, ``mean``, ...),
    the keys ``--data.KEY`` takes when ``--data`` is ``cls``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls)
    names = (o[2:].rstrip("+") for a in parser._actions for o in a.option_strings)
    return [n for n in dict.fromkeys(names) if n and "." not in n and n != "help"]


def _subclasses(base) -> List[type]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if cls not in found and "<locals>" not in cls.__qualname__:
            found.append(cls)
    return found


def data_classes(parser) -> Dict[str, List[str]]:
    """The data modules ``--data`` knows by name (the subclasses imported when the parser is
    built: vmoe's), by import path (``vmoe.data.DigitsDataModule``), with their
    ``class_options``."""
    from jsonargparse._util import get_import_path

    action = next((a for a in parser._actions if a.dest == "data"), None)
    hint = getattr(action, "_typehint", None)
    bases = [h for h in (typing.get_args(hint) or (hint,)) if isinstance(h, type)]
    return {
        get_import_path(cls): class_options(cls)
        for base in bases
        if base is not type(None)
        for cls in _subclasses(base)
    }


def record_snapshot(parser) -> Dict[str, Any]:
    """What ``vmoe.cli.snapshot`` keeps of a subcommand parser: its help as replayable pieces,
    its ``option_table`` and vmoe's ``data_classes``."""
    recorded: List[list] = []
    live = parser.formatter_class

    class Recording(live, _Recorder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.recorded = recorded

    parser.formatter_class = Recording
    try:
        parser.format_help()
    finally:
        parser.formatter_class = live
    return {"help": recorded, **option_table(parser), "data_classes": data_classes(parser)}
