import os

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from tests.helpers import VMOE_REFERENCE as FIXTURES

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pyproject's addopts run the suite in 2 pytest-xdist workers (one per core of a 2-core CI
    # machine): each worker computes on one thread, so the two do not fight over the cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference():
    """Loader of the official-code fixtures: ``reference("aux_losses")`` -> np.load(...)."""
    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = np.load(FIXTURES / f"{name}.npz")
        return cache[name]

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
