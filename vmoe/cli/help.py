"""``vmoe fit | validate | test | predict --help`` as vmoe's: the subcommand's own options, the
model and data groups and vmoe's callbacks first, Lightning's trainer flags after, titles that
say what each group is, and plain text (the reST markup of the docstrings the help is made of,
````x````, ``:class:`x```, ``.. note::``, removed)."""

from __future__ import annotations

import argparse
import re

from jsonargparse import DefaultHelpFormatter

__all__ = ["PlainHelpFormatter", "arrange_help", "plain_text", "subcommand_usage"]

_ROLE = re.compile(
    r":(?:class|func|meth|attr|mod|obj|ref|data|exc|paramref):`~?([^`<]*?)(?:\s*<[^>]*>)?`"
)
_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`_{1,2}")
_LITERAL = re.compile(r"``(.+?)``")
_SINGLE = re.compile(r"(?<![\w`])`([^`]+)`(?![\w`])")
_DIRECTIVE = re.compile(r"\.\. (\w+)::")

# group key -> (order, title); a key of None is the subcommand's own options
_GROUPS = {
    "model": (1, "model: --model.* (vmoe.train.VmoeClassifier; --model.moe.* for the MoE layers)"),
    "data": (
        2,
        "data: --data CLASS, --data.* (a LightningDataModule; --data.help CLASS lists its options)",
    ),
    "checkpoint": (4, "checkpoint: the best checkpoint (Lightning's ModelCheckpoint)"),
    "last_checkpoint": (5, "last_checkpoint: last.ckpt, what --ckpt_path last resumes from"),
    "predictions": (6, "predictions: predictions.csv of vmoe predict"),
    "routing_stats": (7, "routing_stats: routing statistics and pictures logged during fit"),
    "export": (8, "export: the save_pretrained folder written at the end of fit"),
    "resume": (9, "resume: exact resume of an interrupted run"),
    "trainer": (20, "trainer: Lightning's Trainer flags"),
}
_LINKED = (10, "set from other options")
_OWN = 3  # the subcommand method's own arguments (ckpt_path, ...)
_HIDDEN = ("optimizer", "lr_scheduler")  # refused by vmoe (it builds the optimizer itself)


def plain_text(text: str) -> str:
    """``text`` with reST markup removed: ````x```` -> x, ``:class:`~a.B``` -> B,
    ```t <url>`_`` -> t (url), ``.. note::`` -> Note:, ``Example::`` -> Example:."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if "~" in m.group(0) else m.group(1), text)
    text = _LINK.sub(r"\1 (\2)", text)
    text = _LITERAL.sub(r"\1", text)
    text = _SINGLE.sub(r"\1", text)
    text = _DIRECTIVE.sub(lambda m: m.group(1).capitalize() + ":", text)
    return re.sub(r"(\w)::(\s|$)", r"\1:\2", text)


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, in plain text (``plain_text``)."""

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))

    def start_section(self, heading) -> None:
        super().start_section(plain_text(heading) if heading else heading)

    def add_text(self, text) -> None:
        super().add_text(plain_text(text) if text and text is not argparse.SUPPRESS else text)


def subcommand_usage(subcommand: str) -> str:
    """The usage line of ``vmoe <subcommand> --help`` (Lightning's lists all 150 options)."""
    return (
        f"vmoe {subcommand} [-c CONFIG.yaml] [--model.* ...] [--data CLASS --data.* ...] "
        "[--trainer.* ...] [options]"
    )


def arrange_help(parser, subcommand: str) -> None:
    """Orders, titles and trims the argument groups of a LightningCLI subcommand parser (only
    what ``--help`` shows changes; parsing is untouched)."""
    groups = getattr(parser, "groups", {}) or {}
    order = {}
    for key, group in groups.items():
        if key in _GROUPS:
            order[id(group)], group.title = _GROUPS[key]
            group.description = None
        elif key == subcommand:
            order[id(group)] = _OWN
            group.title = f"vmoe {subcommand}: " + (
                "the checkpoint to resume from" if subcommand == "fit" else "the checkpoint to load"
            )
        elif key in _HIDDEN:
            for action in group._group_actions:
                action.help = argparse.SUPPRESS
            order[id(group)] = 30
    for group in parser._action_groups:
        if group.title == "Linked arguments":
            order[id(group)], group.title = _LINKED
        elif group is parser._optionals:
            order[id(group)] = 0
            group.title = f"vmoe {subcommand}"
    parser._action_groups.sort(key=lambda g: order.get(id(g), 25))
