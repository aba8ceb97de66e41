"""``vmoe predict`` writes its predictions: one CSV row per image.

Columns: ``image`` (the file path when the dataset has ``paths``, else the index in the
dataset), ``label`` (empty when the data has no labels), then ``top1, prob1, ..., topK, probK``:
the K most probable classes (class names when the data module has ``classes``, else ids) and
their probabilities (softmax, or per-class sigmoid for ``model.loss=sigmoid``) from
``VmoeClassifier.predict_step``. With ``expert_usage``, per MoE layer (e.g. ``blocks.1.mlp``)
``<layer>/e0 .. <layer>/e{E-1}``: the fraction of the image's token choices (N*K) each expert
processed, and ``<layer>/dropped``: the fraction dropped (the row's expert fractions sum to
1 minus it), read from the layer's routing plan of that batch (``image_expert_usage``).
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..moe import moe_layers
from ..moe.stats import image_expert_usage
from ..writes import failed_write

__all__ = ["PredictionCsvWriter"]


class PredictionCsvWriter(BasePredictionWriter):
    """Writes ``path`` (the vmoe CLI's default: ``<default_root_dir>/predictions.csv``) during
    predict, rows in dataset order, each batch as it comes; the file appears (atomically) when
    the predict loop ends. An existing file is refused before predicting unless ``overwrite``
    (``--predictions.overwrite true``), as every vmoe output. Single process only (under DDP
    each rank would see a shard).

    Attributes:
        written: the CSV's path once written, else None; ``rows``: the number of rows.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        top_k: int = 5,
        enabled: bool = True,
        expert_usage: bool = False,
        overwrite: bool = False,
    ):
        super().__init__(write_interval="batch")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"predictions.top_k={top_k!r} must be a positive int")
        self.path, self.top_k, self.enabled, self.expert_usage = path, top_k, enabled, expert_usage
        self.overwrite = overwrite
        self._layers: dict = {}
        self.written: Optional[Path] = None
        self.rows = 0
        self._file = self._writer = self._tmp = None
        self._classes: Optional[Sequence[str]] = None
        self._paths: Optional[Sequence[Any]] = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.written, self.rows = None, 0
        if not self.enabled or not trainer.is_global_zero:
            return
        if self.path is None:
            raise ValueError("predictions.path is not set (where to write the predictions CSV)")
        target = Path(self.path)
        if target.is_dir():
            raise IsADirectoryError(
                f"predictions.path {target} is a directory; give the CSV file's path, "
                f"e.g. {target / 'predictions.csv'}"
            )
        if target.exists() and not self.overwrite:
            raise FileExistsError(
                f"predictions.path {target} exists; pass --predictions.overwrite true "
                "(overwrite=True) to replace it, or choose another path"
            )
        with failed_write(target, "predictions"):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
            )
        self._file = os.fdopen(fd, "w", newline="")
        self._writer = csv.writer(self._file)
        k = min(self.top_k, int(getattr(pl_module, "num_classes", self.top_k)))
        self._layers = (
            moe_layers(getattr(pl_module, "model", pl_module)) if self.expert_usage else {}
        )
        usage = [
            f"{name}/{column}"
            for name, layer in self._layers.items()
            for column in [f"e{e}" for e in range(layer.num_experts)] + ["dropped"]
        ]
        self._writer.writerow(
            ["image", "label"]
            + [c for i in range(1, k + 1) for c in (f"top{i}", f"prob{i}")]
            + usage
        )
        dm = trainer.datamodule
        self._classes = getattr(dm, "classes", None) if dm is not None else None
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self._paths = getattr(getattr(loader, "dataset", None), "paths", None)

    def _name(self, index: int) -> str:
        classes = self._classes
        return (
            str(classes[index]) if classes is not None and 0 <= index < len(classes) else str(index)
        )

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction,
        batch_indices: Optional[List[int]],
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._writer is None:
            return
        probs = prediction["probs"].float().cpu()  # [B, C]
        k = min(self.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=-1)  # [B, k]
        labels = prediction.get("label")
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else [None] * len(probs)
        if batch_indices is None or len(batch_indices) != len(probs):
            batch_indices = list(range(self.rows, self.rows + len(probs)))
        usage = self._usage(len(probs))
        with failed_write(self.path, "predictions"):
            self._write_rows(batch_indices, labels, top_i, top_p, usage)
        self.rows += len(probs)

    def _write_rows(self, batch_indices, labels, top_i, top_p, usage) -> None:
        for row, index in enumerate(batch_indices):
            image = self._paths[index] if self._paths is not None else index
            label = labels[row]
            cells = [str(image), "" if label is None or label < 0 else self._name(int(label))]
            for i, p in zip(top_i[row].tolist(), top_p[row].tolist()):
                cells += [self._name(i), f"{p:.6f}"]
            self._writer.writerow(cells + [f"{u:.6f}" for u in usage[row]])

    def _usage(self, batch_size: int) -> List[List[float]]:
        """Per image, the usage columns of every MoE layer ([] per image without expert_usage)."""
        if not self._layers:
            return [[] for _ in range(batch_size)]
        parts = []
        for layer in self._layers.values():
            used = image_expert_usage(layer.last_plan, batch_size).float().cpu()  # [B, E]
            parts += [used, 1.0 - used.sum(1, keepdim=True)]
        return torch.cat(parts, dim=1).tolist()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is None:
            return
        try:
            with failed_write(self.path, "predictions"):
                self._file.close()
                os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        self._file = self._writer = None
        self.written = Path(self.path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._discard()

    def _discard(self) -> None:
        """Close and remove the temporary file (the target is left as it was)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = self._writer = None
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
