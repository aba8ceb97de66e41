"""``LineProgress``: training progress as plain lines, for output that is not a terminal (a CI
job's log, a cluster job's output file), where a progress bar's redraws become thousands of
lines of carriage returns and ANSI escapes. ``vmoe fit`` uses it when stdout is not a terminal
(``--progress auto``, the default) and keeps Lightning's bar on a terminal."""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional, TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

__all__ = ["LineProgress"]


def _number(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class LineProgress(ProgressBar):
    """One line at the end of every training epoch (with the validation metrics), one every
    ``every_n_seconds`` inside an epoch, and one at the end of validate / test / predict; on
    global rank 0 only, flushed, nothing but printable text::

        epoch 3/30  batch 30/30  step 90  8.5 it/s  0:00:11  loss 1.85  val/acc1 0.361

    Args:
        every_n_seconds: seconds between two lines inside an epoch (the epoch-end line is
            always written).
        stream: where the lines go (default: ``sys.stdout`` at the time of writing).
    """

    def __init__(self, every_n_seconds: float = 30.0, stream: Optional[TextIO] = None):
        super().__init__()
        if not every_n_seconds > 0:
            raise ValueError(f"every_n_seconds={every_n_seconds} must be > 0")
        self.every_n_seconds = float(every_n_seconds)
        self._stream = stream
        self._enabled = True
        self._start = self._last = self._epoch_start = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, file=self._stream or sys.stdout, flush=True)

    def _metrics(self, trainer, pl_module) -> Dict[str, object]:
        metrics = dict(self.get_metrics(trainer, pl_module))
        metrics.pop("v_num", None)
        return metrics

    def _line(self, trainer, pl_module, batches_done: int) -> str:
        now = time.monotonic()
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else "")
        total = self.total_train_batches
        batch = f"batch {batches_done}" + (f"/{total}" if math.isfinite(total) else "")
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        step = f"step {trainer.global_step}" + (f"/{steps}" if steps else "")
        elapsed = now - self._epoch_start
        speed = f"{batches_done / elapsed:.3g} it/s" if elapsed > 0 else ""
        parts = [epoch, batch, step, speed, _duration(now - self._start)]
        parts += [f"{k} {_number(v)}" for k, v in self._metrics(trainer, pl_module).items()]
        return "  ".join(p for p in parts if p)

    # ---------------------------------------------------------------------------- training

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last = time.monotonic()
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches = batch_idx + 1
        now = time.monotonic()
        if now - self._last >= self.every_n_seconds:
            self._last = now
            self._write(trainer, self._line(trainer, pl_module, self._batches))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # (an epoch's validation has run by now: its metrics are in the line)
        self._write(trainer, self._line(trainer, pl_module, getattr(self, "_batches", 0)))

    # ------------------------------------------------------------------- evaluation, predict

    def _evaluation_start(self) -> None:
        self._eval_start = time.monotonic()
        self._eval_batches = 0

    def _evaluation_batch(self) -> None:
        self._eval_batches = getattr(self, "_eval_batches", 0) + 1

    def _evaluation_end(self, trainer, what: str) -> None:
        seconds = time.monotonic() - getattr(self, "_eval_start", time.monotonic())
        self._write(trainer, f"{what}: {self._eval_batches} batches in {seconds:.1f} s")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._evaluation_start()

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._evaluation_batch()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # in fit, the epoch line says it
            self._evaluation_end(trainer, "validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._evaluation_start()

    def on_test_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._evaluation_batch()

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._evaluation_start()

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._evaluation_batch()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._evaluation_end(trainer, "predict")
