"""Exact mid-epoch resume: resumable training loaders and the RNG bookkeeping around them.

Lightning resumes the model, optimizer, schedule and loop counters, but the rest is left to us:

1. **Data order.** A plain ``DataLoader`` restarts its epoch from the first batch on resume.
   ``ResumableLoader`` (map-style data) draws each epoch's order from ``(seed, epoch)`` alone,
   shards it over the DDP processes itself, and is ``state_dict``-able: the checkpoint holds
   the epoch and the number of batches *trained* in it, and the resumed run continues with the
   next one. ``ResumableStream`` does the same for a stream that can seek by whole batches
   (``HFIterableImageDataset``: ``set_epoch`` and ``skip_batches``). litdata shards keep
   their own position (``ShardDataModule``), counted the same way.
2. **The epoch.** Lightning calls ``set_epoch`` on samplers only, with its count of processed
   epochs, which is one ahead after a ``max_steps`` stop. Both wrappers instead take the epoch
   from ``trainer.current_epoch`` when an epoch's iterator is made, so a run stopped by
   ``max_steps`` continues the same epoch, and a stream reshuffles every epoch.
3. **Global RNG.** Router noise and dropout draw from torch's global RNG, which Lightning does not
   checkpoint. ``ResumableTraining`` saves the RNG states with the checkpoint and puts them back
   just before the first resumed training step; it also runs validation inside a forked RNG so
   that evaluating (or not) never changes the training randomness. The loaders draw their
   workers' seeds from private generators, never from the global one.

What is tested (tests/train/test_resume_matrix.py): for digits, CIFAR-10, an image folder,
Hugging Face map-style and streaming, and shards, a run stopped by ``max_steps`` (then resumed
with a larger ``max_steps``) and a run interrupted mid-step (``last.ckpt`` written on the
exception) continue with the same samples at every step, the same epoch numbers, the same
global RNG stream and weights within 1e-6 of the uninterrupted run. Augmentation randomness
lives in the dataset's transform: map-style sources and shards reseed it per worker, so exact
resume there holds for deterministic transforms; the HF stream reseeds it per batch from
``(seed, epoch, rank, batch)``, so its resume is exact with augmentation too.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterator, List, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "ResumableLoader",
    "ResumableStream",
    "EpochSampler",
    "ResumableTraining",
    "get_rng_state",
    "set_rng_state",
]


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Indices of this process's share of one epoch: a permutation drawn from ``seed + epoch``
    (or ``range(n)`` when not shuffling), padded/trimmed to a multiple of the world size and
    strided by rank like ``DistributedSampler``; the first ``skip`` indices are left out once."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def epoch_indices(self) -> List[int]:
        rank, world = _dist_info()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = -(-self.size // world)
        order += order[: per_rank * world - len(order)]  # pad (DistributedSampler does the same)
        return order[rank::world]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()[self.skip :]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return -(-self.size // _dist_info()[1])


class ResumableLoader:
    """Wraps a map-style training ``DataLoader`` (same dataset, batch size, workers, collate).

    Not a ``DataLoader`` subclass on purpose: Lightning then leaves its sampler alone under DDP
    (it shards by itself), and it has no ``sampler`` attribute, so Lightning's ``set_epoch``
    (its processed-epoch count) does not reach ``epoch_sampler``: the epoch comes from
    ``epoch_fn`` (``trainer.current_epoch``, set by ``ResumableTraining``) when an epoch's
    iterator is made. ``consumed`` counts the batches the training loop has trained this epoch
    (``ResumableTraining`` advances it); ``state_dict`` saves (seed, epoch, consumed).
    """

    def __init__(self, loader: DataLoader, seed: int = 0):
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"ResumableLoader wraps a torch DataLoader, got {type(loader).__name__}"
            )
        if loader.batch_size is None:
            raise ValueError(
                "ResumableLoader needs a DataLoader with batch_size (not a batch_sampler)"
            )
        try:
            size = len(loader.dataset)
        except TypeError:
            raise ValueError("ResumableLoader needs a map-style dataset with a length") from None
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        self.epoch_sampler = EpochSampler(size, shuffle=shuffle, seed=seed)
        self.batch_size, self.drop_last = loader.batch_size, loader.drop_last
        self.consumed = 0
        self.epoch_fn: Optional[Callable[[], int]] = None
        # A private generator for the workers' base seed: creating the epoch's iterator must not
        # draw from the global RNG (that would shift the router noise of the resumed run).
        self._generator = torch.Generator()
        self.loader = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=self.epoch_sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            worker_init_fn=loader.worker_init_fn,
            generator=self._generator,
            persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            multiprocessing_context=loader.multiprocessing_context,
        )

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        n = len(self.epoch_sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.epoch_fn is not None:
            self.epoch_sampler.set_epoch(int(self.epoch_fn()))  # a new epoch drops the skip
        self.consumed = self.epoch_sampler.skip // self.batch_size
        self._generator.manual_seed(self.epoch_sampler.seed * 1_000_003 + self.epoch_sampler.epoch)
        return iter(self.loader)

    def state_dict(self) -> Dict[str, int]:
        return {
            "seed": self.epoch_sampler.seed,
            "epoch": self.epoch_sampler.epoch,
            "consumed": self.consumed,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch_sampler.seed = int(state["seed"])
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: continue with the next one
            epoch, consumed = epoch + 1, 0
        self.epoch_sampler.epoch, self.epoch_sampler.skip = epoch, consumed * self.batch_size
        self.consumed = consumed


class ResumableStream:
    """Wraps a training ``DataLoader`` over a stream that seeks by whole batches: its dataset
    has ``set_epoch(epoch)`` and a ``skip_batches`` attribute (the batches of the epoch to
    leave out on the next pass; ``HFIterableImageDataset``).

    Each pass sets the dataset's epoch from ``epoch_fn`` (``trainer.current_epoch``), so the
    stream reshuffles and reseeds its augmentation every epoch; ``consumed`` counts the batches
    trained in this epoch, ``state_dict`` saves (epoch, consumed). ``len()`` is the loader's
    (a TypeError when the stream's length is unknown, which Lightning reads as unsized).
    """

    def __init__(self, loader: DataLoader):
        dataset = loader.dataset
        if not (callable(getattr(dataset, "set_epoch", None)) and hasattr(dataset, "skip_batches")):
            raise TypeError(
                f"ResumableStream needs a dataset with set_epoch and skip_batches, got "
                f"{type(dataset).__name__}"
            )
        self.loader, self.stream = loader, dataset
        self.epoch, self.skip, self.consumed = 0, 0, 0
        self.epoch_fn: Optional[Callable[[], int]] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.epoch_fn is not None:
            epoch = int(self.epoch_fn())
            if epoch != self.epoch:
                self.epoch, self.skip = epoch, 0
        self.stream.set_epoch(self.epoch)
        self.stream.skip_batches, self.consumed, self.skip = self.skip, self.skip, 0
        return iter(self.loader)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        try:
            if consumed >= len(self):  # saved at the end of an epoch: the next one
                epoch, consumed = epoch + 1, 0
        except TypeError:  # unknown length: an exhausted pass ends the epoch by itself
            pass
        self.epoch, self.skip, self.consumed = epoch, consumed, consumed


def get_rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors/ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss)
    )
    random.setstate(
        (state["python_version"], tuple(state["python"].tolist()), state["python_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableTraining(L.Callback):
    """Makes ``--ckpt_path last`` continue exactly where the run stopped (see module docstring).

    Wraps the training loader of the data module (or LightningModule) in a ``ResumableLoader``
    seeded with ``seed`` (default: the ``seed_everything`` seed), keeps validation's randomness
    apart from training's, and saves/restores the RNG states.
    """

    def __init__(self, seed: Optional[int] = None, enabled: bool = True):
        self.seed, self.enabled = seed, enabled
        self._pending_rng: Optional[Dict[str, Any]] = None
        self._pending_loader: Optional[Dict[str, int]] = None
        self._stashed_rng: Optional[Dict[str, Any]] = None
        self._step_rng: Optional[Dict[str, Any]] = None
        self.loader: Optional[ResumableLoader] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.train_dataloader
        if getattr(original, "_vmoe_resumable", False):
            return
        seed = self.seed
        if seed is None:
            import os

            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

        def train_dataloader():
            loader = original()
            if isinstance(loader, DataLoader) and not isinstance(
                loader.dataset, torch.utils.data.IterableDataset
            ):
                self.loader = ResumableLoader(loader, seed=seed)
            elif isinstance(loader, DataLoader) and hasattr(loader.dataset, "skip_batches"):
                self.loader = ResumableStream(loader)
            else:  # litdata shards keep their own position (ShardDataModule)
                self.loader = loader
            if isinstance(self.loader, (ResumableLoader, ResumableStream)):
                self.loader.epoch_fn = lambda: trainer.current_epoch
                if self._pending_loader is not None:
                    # Lightning reloads loader states only when restarting mid-epoch, and it
                    # creates the first iterator before calling set_epoch; so the position is
                    # applied here.
                    self.loader.load_state_dict(self._pending_loader)
                    self._pending_loader = None
            return self.loader

        train_dataloader._vmoe_resumable = True
        owner.train_dataloader = train_dataloader

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)  # first step after a resume: same RNG as uninterrupted
            self._pending_rng = None
        # A checkpoint written on an exception inside this step (Ctrl-C, a crash) must hold the
        # RNG of the step's start: the resumed run redoes the whole step.
        self._step_rng = get_rng_state()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Counted when the step is done, so that a checkpoint written mid-step (on an exception)
        # does not skip the batch it was training on.
        self._step_rng = None
        if isinstance(self.loader, (ResumableLoader, ResumableStream)):
            self.loader.consumed += 1
        elif callable(getattr(self.loader, "batch_trained", None)):
            self.loader.batch_trained()  # e.g. the shards' loader: its position moves on

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stashed_rng = get_rng_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._stashed_rng is not None:
            set_rng_state(self._stashed_rng)
            self._stashed_rng = None

    def state_dict(self) -> Dict[str, Any]:
        # Saved mid-validation (ModelCheckpoint on validation end): the training RNG is the stash.
        # Saved mid-step (on an exception): the RNG of the step's start.
        rng = self._stashed_rng if self._stashed_rng is not None else self._step_rng
        state = {"rng": rng if rng is not None else get_rng_state()}
        if isinstance(self.loader, (ResumableLoader, ResumableStream)):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")
        self._pending_loader = state_dict.get("loader")
