"""vmoe.train: the LightningModule, callbacks (routing statistics, export, exact resume)."""
from .callbacks import ExportPretrained, RoutingStatsLogger, first_choice_maps
from .module import VmoeClassifier, build_model
from .resume import EpochSampler, ResumableLoader, ResumableTraining

__all__ = ["VmoeClassifier", "build_model", "RoutingStatsLogger", "ExportPretrained",
           "first_choice_maps", "ResumableTraining", "ResumableLoader", "EpochSampler"]
