"""Messages of Lightning and wandb that a plain ``vmoe fit`` would print and that say nothing
to its user, silenced for the ``vmoe`` command only (a library user of vmoe keeps them):

- Lightning's "Tip: ... try installing litlogger" advertisement, logged on every Trainer;
- torch's FutureWarning "``isinstance(treespec, LeafSpec)`` is deprecated", raised by
  Lightning's own ``CombinedLoader`` (lightning/pytorch/utilities/_pytree.py) with torch >= 2.10,
  for Lightning's developers to act on;
- wandb's "The anonymous setting has no effect": Lightning's ``WandbLogger`` always passes
  ``anonymous=None`` to ``wandb.init``, which wandb >= 0.22 warns about (dropped when None);
- warnings that are wrong for a run of vmoe's data modules (``quiet_run``): Lightning's "your
  dataloader is not resumable" on a mid-epoch resume (``vmoe.train.ResumableTraining`` resumes
  them exactly), "``IterableDataset`` has ``__len__`` ... with multi-process data loading" (their
  streams give each worker its own rows), "Total length of `list` across ranks is zero" (no
  validation split: no loaders, on purpose), and "Checkpoint directory ... exists and is not
  empty" when the run resumes from a checkpoint there.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_lightning", "quiet_wandb_init", "quiet_run"]

_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_FILTER = _DropLitloggerTip()


def quiet_lightning() -> None:
    """Drops the litlogger tip and the LeafSpec deprecation (idempotent)."""
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


def quiet_wandb_init(loggers) -> None:
    """Removes ``anonymous=None`` from the ``wandb.init`` arguments of Lightning's
    ``WandbLogger``s that have not started their run yet (None is wandb's default anyway)."""
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous", "") is None:
            del init["anonymous"]


def quiet_run(vmoe_data: bool, exact_resume: bool, resuming: bool) -> None:
    """Drops the Lightning warnings that are wrong for this run: ``vmoe_data``: the data module
    is one of ``vmoe.data``'s; ``exact_resume``: ``ResumableTraining`` is on; ``resuming``: the
    run starts from a checkpoint (``--ckpt_path``)."""
    if vmoe_data and exact_resume:
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
    if vmoe_data:
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        # a data module with no validation split returns no loaders ([]) on purpose
        warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")
