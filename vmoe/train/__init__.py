"""vmoe.train: the LightningModule, callbacks (routing statistics, export, exact resume,
interrupt-safe last checkpoint, prediction CSV), the expert-parallel strategy."""

from .callbacks import ExportPretrained, RoutingStatsLogger
from .checkpointing import AtomicCheckpointIO, CheckpointError, LastCheckpoint, read_checkpoint
from .divergence import DivergenceError, first_nonfinite_parameter
from .module import VmoeClassifier, build_model
from .predictions import PredictionCsvWriter
from .resume import EpochSampler, ResumableLoader, ResumableStream, ResumableTraining
from .strategy import ExpertParallelStrategy

__all__ = [
    "VmoeClassifier",
    "build_model",
    "RoutingStatsLogger",
    "ExportPretrained",
    "ResumableTraining",
    "ResumableLoader",
    "ResumableStream",
    "EpochSampler",
    "LastCheckpoint",
    "AtomicCheckpointIO",
    "CheckpointError",
    "read_checkpoint",
    "DivergenceError",
    "first_nonfinite_parameter",
    "PredictionCsvWriter",
    "ExpertParallelStrategy",
]
