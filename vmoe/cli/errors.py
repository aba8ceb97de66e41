"""The one error path of every ``vmoe`` subcommand: a user's mistake is one line
``vmoe <command>: error: ...`` on stderr and exit code 2, Ctrl-C exit code 130, a bug a
traceback (``VMOE_DEBUG=1`` shows the traceback of a user error too)."""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable, Optional

__all__ = ["run_command", "error_message", "condense_union_error", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a Lightning subcommand; ``step`` is the trainer's global step then."""

    def __init__(self, step: Optional[int] = None):
        super().__init__(step)
        self.step = step


# OSErrors that are the user's to fix rather than bugs: a full disk or quota, a file-size
# limit, a read-only place (vmoe's writers raise them as vmoe.writes.WriteError).
USER_OS_ERRNOS = {
    errno.ENOSPC,
    getattr(errno, "EDQUOT", errno.ENOSPC),
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
}
MAX_MESSAGE = 400
_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")
_UNION_HEADER = re.compile(
    r'^(Parser key "[^"]*":)\s*\n\s*Does not validate against any of the Union subtypes'
)
_NOT_OF_TYPE = re.compile(r"^(\s*)- Not of type [^:]+: ?(.*)$")


def condense_union_error(text: str) -> str:
    """jsonargparse's error for a value that fits no member of a ``Union`` (``Optional[X]``
    included) lists every member's error over several lines::

        Parser key "model.moe":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'MoeifyConfig'>, <class 'NoneType'>]
          Errors:
            - Not of type MoeifyConfig: model.moe.router.num_selcted: not an option ...
            - Expected a <class 'NoneType'>
          Given value type: <class 'dict'> ...

    Returns ``Parser key "model.moe": <the first 'Not of type' message>`` (what the type's own
    parser said, the useful part) on one line; any other text unchanged."""
    header = _UNION_HEADER.match(text)
    if not header:
        return text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = _NOT_OF_TYPE.match(line)
        if not found:
            continue
        indent = len(found.group(1))
        # the message, with its continuation lines (indented deeper than the "- " bullet)
        body = [found.group(2)]
        for more in lines[i + 1 :]:
            if len(more) - len(more.lstrip()) <= indent:
                break
            body.append(more)
        return f"{header.group(1)} {' '.join(' '.join(body).split())}"
    return text


_INSTANTIATION_UNION = "Does not validate against any of the Union subtypes"
_CLASS_PATH = re.compile(r"class_path='([\w.]+)'")


def _instantiation_cause(err: BaseException) -> Optional[str]:
    """jsonargparse reports a class whose ``__init__`` raised (``--data X --data.path ...``)
    as a Union error over several lines, the class's own error its cause: that cause's
    message, prefixed with the class's name, or None when ``err`` is not such an error."""
    text, cause = str(err), err.__cause__
    if not text.startswith(_INSTANTIATION_UNION) or cause is None:
        return None
    message = error_message(cause)
    if message is None:
        return None
    found = _CLASS_PATH.search(text)
    return f"{found.group(1).rsplit('.', 1)[-1]}: {message}" if found else message


def _user_errors() -> tuple:
    from argparse import ArgumentError

    from ..writes import WriteError

    # ConnectionError: a download that failed (offline, no such hub repository): the user's to fix
    errors = [
        ArgumentError,
        ValueError,
        TypeError,
        KeyError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        FloatingPointError,
        ConnectionError,
        WriteError,
    ]
    if "lightning" in sys.modules:  # vmoe convert etc. do not import Lightning
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    return tuple(errors)


def error_message(err: BaseException) -> Optional[str]:
    """One line describing a user error, or None when ``err`` is a bug (show the traceback).

    An exception re-raised from a DataLoader worker carries the worker's whole traceback as its
    message; the line shown is the original exception's (e.g. the unreadable image's path)."""
    is_user = isinstance(err, _user_errors()) or (
        isinstance(err, OSError) and err.errno in USER_OS_ERRNOS
    )
    if not is_user:
        return None
    from_init = _instantiation_cause(err)
    if from_init is not None:
        return from_init
    text = condense_union_error(str(err))
    if _WORKER_PREFIX.match(text):
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = (
            re.sub(r"^[\w.]+(Error|Exception|Warning)?: ", "", lines[-1].strip()) if lines else text
        )
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
        print(
            f"vmoe {command}: error: {message}  [{type(err).__name__}; VMOE_DEBUG=1 for the "
            "traceback]",
            file=sys.stderr,
            flush=True,
        )
        return 2
