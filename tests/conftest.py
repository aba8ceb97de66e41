import os

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from tests.helpers import VMOE_REFERENCE as FIXTURES


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
