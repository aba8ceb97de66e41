"""A snapshot of a LightningCLI subcommand's parser (``vmoe fit | validate | test | predict``), so
that its ``--help`` and a misspelt option answer in a fraction of a second instead of the ~7 s
that importing torch and Lightning and building the parser take.

Building the parser (``vmoe.cli.training.VmoeCLI``, any run of the subcommand) records what its
help is made of (usage, group titles, each option's invocation and expanded help text, all
width-independent) and the option names it accepts into a JSON file under the CLI cache
(``$VMOE_CLI_CACHE``, else ``$XDG_CACHE_HOME/vmoe/cli``, else ``~/.cache/vmoe/cli``;
``VMOE_CLI_CACHE=off`` disables it). The file's name holds a fingerprint of everything the parser
depends on: the Python version, the installation records in the ``sys.path`` folders (an
install or uninstall changes them) and the size and modification time of each of vmoe's own
source files. A later run whose fingerprint matches:

- ``vmoe fit --help`` renders the recorded help with the standard library's argparse formatter
  at the terminal's width: the same text the live parser prints (``tests/cli/test_snapshot.py``);
- a misspelt option (``--model.lrr 5``), an unknown key of a ``--config`` file, a ``--data
  NAME`` that names no data module or a ``--data.KEY`` the chosen data module does not take is
  refused in one line naming the closest options, the line the live parser's error becomes
  (``refusal``). What the snapshot cannot judge (an abbreviation, keys under a class- or
  dict-typed option such as ``--model.moe.*`` or ``--trainer.logger.*``, a user's data module,
  values) goes to the live parser.

This module imports only the standard library.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "FORMAT",
    "cache_folder",
    "fingerprint",
    "load",
    "save",
    "render_help",
    "refusal",
    "unknown_options",
    "unknown_options_message",
    "unknown_data_class_message",
    "unknown_data_option_message",
]

FORMAT = 1  # the snapshot file's layout; a change makes old files unused
CACHE_ENV = "VMOE_CLI_CACHE"
_KEY_LENGTH = 24
# what pip leaves in a sys.path folder per installed distribution (a new version: a new name)
_INSTALL_RECORDS = (".dist-info", ".egg-info", ".egg-link", ".pth")
_OFF = ("", "0", "off", "false", "no")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the vmoe folder


def cache_folder() -> Optional[str]:
    """The folder of the snapshots, or None when ``VMOE_CLI_CACHE`` turns them off."""
    given = os.environ.get(CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in _OFF else os.path.expanduser(given)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(xdg), "vmoe", "cli")


def fingerprint(subcommand: str, package: str = _PACKAGE) -> str:
    """A digest of what the parser of ``subcommand`` depends on: the Python version, the
    installation records of each ``sys.path`` folder (the names and modification times of its
    ``*.dist-info``, ``*.egg-info``, ``*.pth``: pip writes them for every distribution it
    installs; ``sys.path[0]``, the script's folder, and the working directory are left out) and
    the size and modification time of every ``.py`` file under ``package`` (an edit of vmoe's
    source)."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        digest.update("\0".join(map(str, parts)).encode() + b"\n")

    add(FORMAT, subcommand, sys.version, sys.executable)
    cwd = os.getcwd()
    for entry in sys.path[1:]:  # [0]: the script's folder or the working directory
        path = os.path.abspath(entry or cwd)
        if path == cwd or not os.path.isdir(path):  # ('' in PYTHONPATH is the working directory)
            continue
        add(path)
        with os.scandir(path) as found:
            for item in sorted(found, key=lambda e: e.name):
                if item.name.endswith(_INSTALL_RECORDS):
                    add(item.name, item.stat().st_mtime_ns)
    for folder, subfolders, files in os.walk(package):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                status = os.stat(os.path.join(folder, name))
                add(os.path.relpath(os.path.join(folder, name), package), status.st_size,
                    status.st_mtime_ns)  # fmt: skip
    for key in sorted(os.environ):
        if key.startswith(("JSONARGPARSE_", "LIGHTNING_", "PL_")):
            add(key, os.environ[key])
    return digest.hexdigest()[:_KEY_LENGTH]


def _path(folder: str, subcommand: str, key: str) -> str:
    return os.path.join(folder, f"{subcommand}-{key}.json")


def load(subcommand: str) -> Optional[Dict[str, Any]]:
    """The snapshot of ``subcommand`` whose fingerprint matches this installation, or None (none
    kept, stale, unreadable or turned off)."""
    folder = cache_folder()
    if folder is None:
        return None
    try:
        with open(_path(folder, subcommand, fingerprint(subcommand)), encoding="utf-8") as f:
            snapshot = json.load(f)
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(snapshot, dict)
        and snapshot.get("format") == FORMAT
        and isinstance(snapshot.get("help"), list)
        and isinstance(snapshot.get("options"), list)
        and isinstance(snapshot.get("open"), list)
    )
    return snapshot if valid else None


def save(subcommand: str, snapshot: Dict[str, Any]) -> Optional[str]:
    """Writes ``snapshot`` (``vmoe.cli.snapshot_record.record_snapshot``) atomically and removes the
    subcommand's older snapshots; returns the file written, or None. Never raises for a folder
    that cannot be written: the snapshot only saves time."""
    folder = cache_folder()
    if folder is None:
        return None
    target = _path(folder, subcommand, fingerprint(subcommand))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{subcommand}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**snapshot, "format": FORMAT}, f)
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
        ours = re.compile(rf"{re.escape(subcommand)}-[0-9a-f]{{{_KEY_LENGTH}}}\.json")
        for name in os.listdir(folder):  # the older snapshots (no other file of the folder)
            if ours.fullmatch(name) and os.path.join(folder, name) != target:
                os.unlink(os.path.join(folder, name))
    except (OSError, TypeError, ValueError):
        return None
    return target


class _Recorded(argparse.Action):
    """An option as recorded: its invocation (``--model.lr LR``) and expanded help text."""

    def __init__(self, invocation: str, text: str):
        super().__init__(option_strings=[], dest="recorded", help=text)
        self.invocation = invocation


class _ReplayFormatter(argparse.HelpFormatter):
    """argparse's formatter over recorded pieces: wrapping and indentation are argparse's own, at
    this terminal's width, as when the live parser prints its help."""

    def _format_usage(self, usage, actions, groups, prefix):
        return usage

    def _format_action_invocation(self, action):
        return action.invocation

    def _expand_help(self, action):
        return action.help


def render_help(snapshot: Dict[str, Any], prog: str) -> str:
    """The help text of the recorded parser, at the terminal's width."""
    formatter = _ReplayFormatter(prog=prog)
    for kind, *values in snapshot["help"]:
        if kind == "usage":
            formatter.add_usage(values[0], [], [])
        elif kind == "section":
            formatter.start_section(values[0])
        elif kind == "end":
            formatter.end_section()
        elif kind == "text":
            formatter.add_text(values[0])
        elif kind == "option":
            formatter.add_argument(_Recorded(*values))
    return formatter.format_help()


def _option_names(argv: Sequence[str]) -> Iterable[str]:
    """The long option names given in ``argv`` (``--a.b`` of ``--a.b=1`` and ``--a.b+=x``)."""
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("--") and len(arg) > 2:
            yield arg.split("=", 1)[0].rstrip("+")


def unknown_options(argv: Sequence[str], snapshot: Dict[str, Any]) -> List[str]:
    """The options of ``argv`` that the recorded parser surely refuses: not one of its options,
    not an abbreviation of one, and under none of its open options (class-, dict- or
    dataclass-typed ones such as ``--data`` or ``--model.moe``, which take any ``.key``)."""
    options, open_ = set(snapshot["options"]), snapshot["open"]
    unknown = []
    for name in _option_names(argv):
        if name in options or any(o.startswith(name) for o in options):
            continue
        if any(name.startswith(o + ".") for o in open_):
            continue
        unknown.append(name)
    return unknown


def unknown_options_message(
    names: Sequence[str], options: Sequence[str], prog: str, in_config: bool = False
) -> str:
    """``--model.lrr: not an option of vmoe fit; did you mean --model.lr? ...`` for each name;
    ``in_config``: the names are keys of a ``--config`` file (``model.lrr``)."""
    options = [o for o in options if not o.endswith("+")]  # --x+ appends to the list --x
    if in_config:
        options = [o[2:] for o in options]
    parts = []
    for name in dict.fromkeys(names):
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        where = " (in a --config file)" if in_config else ""
        parts.append(f"{name}{where}: not an option of {prog}{hint}")
    return "; ".join(parts) + f" ('{prog} --help' lists them)"


_CLASS_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_KEEP = object()  # a config file that names no data class
_UNREADABLE = object()  # a config file that could not be read as YAML


def _read_config(path: Optional[str]):
    """A ``--config`` file's YAML document, or ``_UNREADABLE`` (a missing file, not YAML, an
    inline value: the live parser says what is wrong)."""
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except Exception:
        return _UNREADABLE


def _config_files(argv: Sequence[str]) -> Iterable[str]:
    for i, arg in enumerate(argv):
        if arg == "--":
            return
        if arg in ("-c", "--config") and i + 1 < len(argv):
            yield argv[i + 1]
        elif arg.startswith("--config="):
            yield arg[len("--config=") :]


def _unknown_config_key(document, snapshot: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """The first key of a config document (dotted: ``model.lrr``) that is no option of the
    recorded parser nor under an open one, with ``""``; or a key of its data module's
    ``init_args`` that the module (one of ``data_classes``) does not take, with the module's
    import path."""
    options, open_ = set(snapshot["options"]), set(snapshot["open"])
    classes = snapshot.get("data_classes") or {}
    prefixes = {o[: i + 1] for o in options for i, c in enumerate(o) if c == "."}

    def walk(mapping, where: str) -> Optional[Tuple[str, str]]:
        for key, value in mapping.items():
            path = f"{where}{key}"
            option = f"--{path}"
            if (
                path == "data"
                and isinstance(value, dict)
                and isinstance(value.get("init_args"), dict)
            ):
                found = _find_class(str(value.get("class_path")), classes)
                extra = sorted(set(value["init_args"]) - set(classes.get(found, ())))
                if found is not None and extra:
                    return extra[0], found
            if option in open_:
                continue
            if isinstance(value, dict) and option + "." in prefixes:
                inner = walk(value, path + ".")
                if inner is not None:
                    return inner
            elif option not in options:
                while isinstance(value, dict) and value:  # named down to its first leaf, as
                    key, value = next(iter(value.items()))  # jsonargparse flattens it
                    path = f"{path}.{key}"
                return path, ""
        return None

    return walk(document, "") if isinstance(document, dict) else None


def _config_refusal(
    documents: Dict[str, Any], snapshot: Dict[str, Any], prog: str
) -> Optional[str]:
    """The live parser's line for the first unknown key of the ``--config`` files (their
    documents by path)."""
    for document in documents.values():
        found = None if document is _UNREADABLE else _unknown_config_key(document, snapshot)
        if found is None:
            continue
        key, data_class = found
        if data_class:
            options = snapshot["data_classes"][data_class]
            return unknown_data_option_message(key, data_class, options, prog, in_config=True)
        return unknown_options_message([key], snapshot["options"], prog, in_config=True)
    return None


def _config_data_class(document):
    """The data class a ``--config`` file's document names (``data: {class_path: X}`` or
    ``data: X``), ``_KEEP`` when it names none, None when it cannot be told."""
    if document is _UNREADABLE:
        return None
    data = document.get("data", _KEEP) if isinstance(document, dict) else _KEEP
    if isinstance(data, dict):
        data = data.get("class_path", _KEEP)
    if data is _KEEP or (isinstance(data, str) and _CLASS_NAME.fullmatch(data)):
        return data
    return None


def _find_class(name: str, classes: Dict[str, List[str]]) -> Optional[str]:
    """The import path among ``classes`` that ``name`` (a path or a class name) means."""
    if name in classes:
        return name
    short = [path for path in classes if path.rsplit(".", 1)[-1] == name]
    return short[0] if len(short) == 1 else None


def unknown_data_class_message(name: str, classes: Sequence[str]) -> str:
    known = ", ".join(sorted({path.rsplit(".", 1)[-1] for path in classes}))
    return (
        f"--data {name}: not a data module vmoe knows ({known}) nor an import path "
        "(my_package.MyDataModule)"
    )


def unknown_data_option_message(
    key: str, cls: str, options: Sequence[str], prog: str, in_config: bool = False
) -> str:
    """``--data.batch_sz: not an option of DigitsDataModule; did you mean --data.batch_size?``;
    ``in_config``: the key is a ``--config`` file's (``data.batch_sz (in a --config file)``)."""
    short = cls.rsplit(".", 1)[-1]
    prefix = "data." if in_config else "--data."
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    where = " (in a --config file)" if in_config else ""
    return (
        f"{prefix}{key}{where}: not an option of {short}{hint} "
        f"('{prog} --data.help {short}' lists them)"
    )


def _data_refusal(
    argv: Sequence[str], documents: Dict[str, Any], classes: Dict[str, List[str]], prog: str
) -> Optional[str]:
    """The first ``--data NAME`` that names no data module or ``--data.KEY`` the data module
    chosen so far (by ``--config`` files and ``--data`` options, in order) does not take; None
    when there is none, or when the data module cannot be told (then the live parser judges)."""
    current: Optional[str] = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name in ("-c", "--config"):
            found = _config_data_class(documents.get(value, _UNREADABLE))
            current = current if found is _KEEP else found
        elif name in ("--data", "--data.class_path"):
            current = value if _CLASS_NAME.fullmatch(value) else None
            if current and "." not in current and _find_class(current, classes) is None:
                return unknown_data_class_message(current, classes)
        elif name.startswith("--data.") and current is not None:
            key = name[len("--data.") :].rstrip("+")
            key = key[len("init_args.") :] if key.startswith("init_args.") else key
            first = key.split(".", 1)[0]
            path = _find_class(current, classes)
            if path is None or first in ("help", "class_path", "init_args", "dict_kwargs"):
                continue
            if first not in classes[path]:
                return unknown_data_option_message(first, path, classes[path], prog)
    return None


def refusal(argv: Sequence[str], snapshot: Dict[str, Any], prog: str) -> Optional[str]:
    """The one-line error the live parser would give for ``argv`` that the snapshot can tell
    already (an unknown option; an unknown key of a ``--config`` file; an unknown data module or
    option of it), or None."""
    unknown = unknown_options(argv, snapshot)
    if unknown:
        return unknown_options_message(unknown, snapshot["options"], prog)
    documents = {path: _read_config(path) for path in _config_files(argv)}  # each read once
    in_config = _config_refusal(documents, snapshot, prog)
    if in_config is not None:
        return in_config
    classes = snapshot.get("data_classes")
    if isinstance(classes, dict) and any(a.startswith("--data") for a in argv):
        return _data_refusal(argv, documents, classes, prog)
    return None
