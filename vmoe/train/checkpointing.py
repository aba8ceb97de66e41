"""Checkpoints that survive interrupts, crashes and full disks, and a clear error for bad ones.

- ``LastCheckpoint``: ``last.ckpt`` every ``every_n_train_steps`` steps, at every epoch end and
  when training stops on an exception (Ctrl-C, a crash), so ``--ckpt_path last`` resumes from
  where the run stopped rather than from step 0. Lightning 2.6's monitor-free "last" checkpoint
  is otherwise written only at train end. A model with non-finite weights is never saved.
- ``AtomicCheckpointIO``: writes ``<dir>/.<name>.*.tmp`` beside the target, fsyncs it, then
  ``os.replace``: a reader sees the old file or the new one, never half of one (Lightning's
  own writer stages in the system temp dir and moves across file systems, which copies in
  place). A failed write (full disk, file too large, ...) raises ``vmoe.writes.WriteError``
  naming the checkpoint, the old file intact; Ctrl-C inside ``torch.save`` stays a
  KeyboardInterrupt.
- ``read_checkpoint``: ``torch.load(weights_only=True)`` whose failures (corrupt, truncated,
  pickled objects) become ``CheckpointError`` "X is not a readable vmoe/Lightning checkpoint".
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from ..writes import failed_write
from .divergence import DivergenceError, first_nonfinite_parameter

__all__ = ["LastCheckpoint", "AtomicCheckpointIO", "CheckpointError", "read_checkpoint"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model; names the file."""


def _reason(err: BaseException) -> str:
    """A short reason for a failed safe load, without torch's advice to load unsafely."""
    text = str(err)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and "weights_only" not in line
        and not line.strip().startswith("Check the documentation")
    ]
    if "Weights only load failed" in text or "WeightsUnpickler error" in text:
        detail = lines[0].replace("WeightsUnpickler error:", "").strip() if lines else ""
        return f"it holds Python objects that a safe load refuses ({detail or type(err).__name__})"
    return (
        f"corrupt or truncated? ({type(err).__name__}: {lines[0] if lines else type(err).__name__})"
    )


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint (a dict with a
    ``state_dict``); nothing in the file is executed. Raises FileNotFoundError or
    CheckpointError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
    ) as err:
        raise CheckpointError(
            f"{path} is not a readable vmoe/Lightning checkpoint: {_reason(err)}"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a readable vmoe/Lightning checkpoint: no 'state_dict' entry "
            f"(a {type(ckpt).__name__})"
        )
    return ckpt


def _is_local(path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with a same-directory temp file + fsync + ``os.replace`` for local
    paths (remote URLs go to Lightning's writer), and ``read_checkpoint``'s clear errors."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        with failed_write(path, "checkpoint"):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def load_checkpoint(
        self,
        path,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> Dict[str, Any]:
        if not _is_local(path) or weights_only is False:
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        return read_checkpoint(str(path).removeprefix("file://"), map_location=map_location)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` that is never far behind the run (``--ckpt_path last`` resumes from it).

    Written every ``every_n_train_steps`` optimizer steps (0: never by count), at the end of
    every training epoch (``every_epoch``), when training stops on an exception
    (``on_exception``: Ctrl-C, a crash; single-process runs only, DDP ranks could wait on each
    other) and at train end. Files are replaced atomically under the vmoe CLI
    (``AtomicCheckpointIO``). A model whose weights are non-finite is not saved.

    Attributes:
        saved_on_exception: the step of the checkpoint written on an exception, else None.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        every_n_train_steps: int = 500,
        every_epoch: bool = True,
        on_exception: bool = True,
    ):
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(
                f"last_checkpoint.every_n_train_steps={every_n_train_steps!r} must be an "
                "int >= 0 (0: only at epoch ends)"
            )
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
        )
        self.every_epoch, self.save_last_on_exception = every_epoch, on_exception
        self.saved_on_exception: Optional[int] = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_epoch and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if (
            not self.save_last_on_exception
            or isinstance(exception, DivergenceError)
            or trainer.world_size > 1
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_global_step_saved == trainer.global_step
        ):
            return
        if first_nonfinite_parameter(pl_module) is not None:
            return  # never save a diverged model
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self.saved_on_exception = trainer.global_step
        except Exception as err:  # e.g. a full disk: keep the original exception
            log.warning(
                "could not write the last checkpoint after %s: %s", type(exception).__name__, err
            )
