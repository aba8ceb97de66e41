"""One translation of failed writes, used by every vmoe writer (checkpoints, ``save_pretrained``
and ``vmoe convert``, reports, predictions, figures).

A write that fails part-way surfaces differently depending on the writer: ``OSError(ENOSPC)``
from our own files, ``EFBIG`` under a file-size limit (or a 4 GB file on FAT32), ``EDQUOT``,
``EROFS``, safetensors' ``SafetensorError("... (os error 28)")``, and ``torch.save``'s
``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`` whose
``__context__`` holds the OSError its file object raised. ``failed_write`` turns all of
them into one ``WriteError`` "could not write X: disk full (...); nothing was changed".

``require_writable_dir`` refuses up front, before any slow work, a file whose directory is on
a read-only file system or has no write permission for us (``NotWritableError``, also a
``PermissionError``), naming both.

Ctrl-C inside ``torch.save`` is wrapped the same way (a RuntimeError whose ``__context__`` is
the KeyboardInterrupt): ``failed_write`` raises it as ``KeyboardInterrupt`` again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = [
    "WriteError",
    "NotWritableError",
    "WRITE_ERRNOS",
    "write_errno",
    "failed_write",
    "require_writable_dir",
    "save_figure",
]

# errno -> what the user is told; EIO also stands for "the write failed, cause unknown"
WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the file-size limit",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
}
# how torch's zip writer (PytorchStreamWriter) reports a failed write of its file object
_TORCH_WRITE_FAILED = (
    "[enforce fail at inline_container.cc",
    "unexpected pos",
    "PytorchStreamWriter failed",
)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")


class WriteError(OSError):
    """A file or directory that could not be written (disk full, file too large, quota,
    read-only); the message names it and says that nothing was changed. ``errno`` is the
    cause's (EIO when torch's writer does not say)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return str(self.strerror)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILED)


def write_errno(err: BaseException) -> Optional[int]:
    """The errno of a failed write (see the module docstring), or None when ``err`` is not one."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return err.errno
    if (
        type(err).__name__ == "SafetensorError"
    ):  # "I/O error: No space left on device (os error 28)"
        code = _OS_ERROR_CODE.search(str(err))
        return int(code.group(1)) if code and int(code.group(1)) in WRITE_ERRNOS else None
    if _torch_write_failure(err):
        causes = [
            e.errno for e in _chain(err) if isinstance(e, OSError) and e.errno in WRITE_ERRNOS
        ]
        return causes[0] if causes else errno.EIO
    return None


def _interrupted(err: BaseException) -> bool:
    """A KeyboardInterrupt that torch's writer wrapped into its RuntimeError."""
    return _torch_write_failure(err) and any(isinstance(e, KeyboardInterrupt) for e in _chain(err))


def _detail(err: BaseException, code: int) -> str:
    causes = [e for e in _chain(err) if isinstance(e, OSError) and e.errno == code and e.strerror]
    if causes:
        return causes[0].strerror
    if _torch_write_failure(err):
        return "torch.save: " + " ".join(str(err).split())[:160]
    return os.strerror(code)


@contextlib.contextmanager
def failed_write(target: Union[str, os.PathLike], what: str = "") -> Iterator[None]:
    """Re-raise a failed write inside the block as ``WriteError`` "could not write <what>
    <target>: <reason> (<detail>); nothing was changed", and a Ctrl-C that torch wrapped as
    ``KeyboardInterrupt``. The block must leave the previous files as they were (write to a
    temporary file, ``os.replace`` at the end); other exceptions pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as err:
        if _interrupted(err):
            raise KeyboardInterrupt() from err
        code = write_errno(err)
        if code is None:
            raise
        name = f"{what} {os.fspath(target)}" if what else os.fspath(target)
        reason = WRITE_ERRNOS[code]
        if (
            code == errno.EIO
            and _torch_write_failure(err)
            and not any(isinstance(e, OSError) for e in _chain(err))
        ):
            reason = (
                "the write failed part-way (disk full or file too large?)"  # torch did not say why
            )
        raise WriteError(
            code, f"could not write {name}: {reason} ({_detail(err, code)}); nothing was changed"
        ) from err


def save_figure(fig, path: Union[str, os.PathLike], **savefig_kwargs) -> None:
    """``fig.savefig(path)`` atomically (a temporary file beside it, then ``os.replace``), its
    failures as ``WriteError``: a picture is the old one or the new one, never half."""
    path = os.fspath(path)
    fmt = savefig_kwargs.pop("format", None) or os.path.splitext(path)[1].lstrip(".") or "png"
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with failed_write(path, "figure"):
        try:
            fig.savefig(tmp, format=fmt, **savefig_kwargs)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


class NotWritableError(WriteError, PermissionError):
    """A file that cannot be written for lack of permission (errno EACCES); names the path."""


def require_writable_dir(path: Union[str, os.PathLike]) -> None:
    """Refuse, before any slow work, a file ``path`` whose directory takes no new file: on a
    read-only file system (``WriteError``, EROFS) or without write permission
    (``NotWritableError``, a ``PermissionError``), each naming the path and the directory."""
    path = Path(path)
    parent = path.parent
    if os.access(parent, os.W_OK | os.X_OK):
        return
    statvfs = getattr(os, "statvfs", None)
    if statvfs is not None and statvfs(parent).f_flag & os.ST_RDONLY:
        raise WriteError(
            errno.EROFS,
            f"cannot write {path}: the directory {parent} is on a read-only file system",
        )
    raise NotWritableError(
        errno.EACCES, f"cannot write {path}: permission denied on the directory {parent}"
    )
