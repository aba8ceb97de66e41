import os
import sys
import tempfile

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# the CLI's parser snapshots (vmoe.cli.snapshot) go to a folder of this run, not ~/.cache
os.environ.setdefault("VMOE_CLI_CACHE", tempfile.mkdtemp(prefix="vmoe-cli-cache-"))

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


# The files that take longest (each well over 30 s of one worker's time on 2 cores), longest
# first. pytest-xdist (--dist loadfile) hands files to the workers in collection order, so
# starting with these keeps one worker from finishing a long file alone at the end (pyproject
# turns off xdist's own reordering, which sends the files with the most tests first).
LONGEST_FILES = (
    "tests/models/test_export.py",
    "tests/models/test_export_dynamic.py",
    "tests/models/test_export_cli.py",
    "tests/test_notebooks.py",
    "tests/test_docs.py",
    "tests/train/test_expert_parallel_fit.py",
    "tests/moe/test_parallel.py",
    "tests/train/test_options.py",
    "tests/train/test_ddp.py",
    "tests/cli/test_errors.py",
    "tests/models/test_timm_contract.py",
    "tests/train/test_resume.py",
    "tests/models/test_catalogue.py",
    "tests/train/test_resume_matrix.py",
    "tests/data/test_streams.py",
    "tests/data/test_ranks.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the longest files first (each file's tests stay together, in their own order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}

    def key(item):
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the other files keep pytest's order


@pytest.fixture(autouse=True)
def _close_figures():
    """pyplot keeps every figure a test drew (the viz API returns them open) until closed."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
