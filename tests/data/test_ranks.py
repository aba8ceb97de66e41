"""Every rank the same number of batches, ``len()`` true on each rank, every image once per
epoch up to the documented rule, with counts that do not divide (43 images, 2 ranks, batch 4):

- shards (``ShardDataModule``): each rank yields ``43 // 2 = 21`` images; what litdata gave a
  rank beyond that is left out, a rank short of it repeats its first ones;
- HF map-style (``ResumableLoader``'s sampler, as ``DistributedSampler``): ``ceil(43 / 2) = 22``
  each, the order padded with its first image;
- HF streaming: ``43 // 2 = 21`` each, the last row of the epoch's order left out.

Plus a real ``vmoe fit --trainer.strategy ddp --trainer.devices 2`` on CPU (gloo) from shards
with 2 loader workers per rank, and ``HFDataModule`` under a trainer as rank 1 of 2 reading
rank 1's part; a ``ClassLabel`` whose names are not sorted keeps the dataset's order.
"""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests.helpers import NO_AUG, cli_subprocess  # noqa: E402

datasets = pytest.importorskip("datasets")

from vmoe.data import HFDataModule  # noqa: E402

N, WORLD, BATCH = 43, 2, 4


def id_image(i: int, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0], img[..., 1] = i % 256, i // 256
    return img


def ids_of(x: torch.Tensor) -> list:
    """Ids of a batch [B, 3, H, W] normalized with mean = std = 0.5."""
    v = ((x[:, :2, 0, 0] * 0.5 + 0.5) * 255).round().long()
    return (v[:, 0] + 256 * v[:, 1]).tolist()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    for i in range(N):
        folder = root / "tree" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_image(i)).save(folder / f"{i:03d}.png")
    datasets.load_dataset("imagefolder", data_dir=str(root / "tree")).save_to_disk(str(root / "hf"))
    return root


def _no_aug():
    from vmoe.data.transforms import TrainTransformConfig

    return TrainTransformConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment_num_ops=0, hflip_prob=0.0
    )


def _per_rank(make_loader):
    """{rank: (len(loader), [ids of each batch])} for rank 0 and 1 of 2."""
    out = {}
    for rank in range(WORLD):
        loader = make_loader(rank)
        out[rank] = (len(loader), [ids_of(x) for x, _ in loader])
    return out


def _check_equal(out, per_rank_images):
    lens = {rank: n for rank, (n, _) in out.items()}
    batches = {rank: len(b) for rank, (_, b) in out.items()}
    assert lens == batches, f"len() {lens} but batches {batches}"
    assert len(set(batches.values())) == 1, f"unequal batch counts {batches}"
    for _, b in out.values():
        assert sum(map(len, b)) == per_rank_images
        assert [len(x) for x in b[:-1]] == [BATCH] * (len(b) - 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_equal_on_every_rank(data, tmp_path, monkeypatch, workers):
    pytest.importorskip("litdata")
    from vmoe.data import ShardDataModule, write_shards

    write_shards(str(data / "tree"), str(tmp_path / "s"), chunk_bytes="400B", progress=False)

    def make(rank):
        monkeypatch.setenv("WORLD_SIZE", str(WORLD))  # litdata's distributed environment
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dm = ShardDataModule(
            str(tmp_path / "s"),
            img_size=16,
            batch_size=BATCH,
            num_workers=workers,
            train_transform=_no_aug(),
        )
        dm.setup("fit")
        return dm.train_dataloader()

    out = _per_rank(make)
    per_rank = N // WORLD
    _check_equal(out, per_rank)
    a, b = ([i for x in out[r][1] for i in x] for r in range(WORLD))
    assert not set(a) & set(b)  # no image on both ranks
    for ids in (a, b):  # a rank short of 21 repeats its first images, nothing else repeats
        unique = list(dict.fromkeys(ids))
        assert ids == unique + unique[: per_rank - len(unique)]
    assert len(set(a) | set(b)) >= N - BATCH  # here: what litdata gave beyond 21 is left out


def test_hf_map_style_equal_on_every_rank(data, monkeypatch):
    import vmoe.train.resume as resume

    def make(rank):
        dm = HFDataModule(
            str(data / "hf"),
            val_fraction=0,
            img_size=16,
            batch_size=BATCH,
            train_transform=_no_aug(),
        )
        dm.setup("fit")
        monkeypatch.setattr(resume, "_dist_info", lambda: (rank, WORLD))
        return resume.ResumableLoader(dm.train_dataloader(), seed=0)

    out = _per_rank(make)
    _check_equal(out, -(-N // WORLD))
    a, b = ([i for x in out[r][1] for i in x] for r in range(WORLD))
    assert sorted(set(a) | set(b)) == list(range(N))  # every image, one twice (the pad)
    assert len(a + b) == N + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_hf_streaming_equal_on_every_rank_under_a_trainer(data, workers):
    """Set up as rank r of 2 through ``trainer`` (as Lightning does): rank 1 reads rank 1's part
    (a data module that read every rank as rank 0 would give both ranks the same rows)."""

    def make(rank):
        dm = HFDataModule(
            str(data / "hf"),
            streaming=True,
            val_fraction=0,
            img_size=16,
            batch_size=BATCH,
            num_workers=workers,
            shuffle_buffer=8,
            train_transform=_no_aug(),
        )
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD, current_epoch=0)
        dm.setup("fit")
        assert (dm.train_set.rank, dm.train_set.world_size) == (rank, WORLD)
        return dm.train_dataloader()

    out = _per_rank(make)
    _check_equal(out, N // WORLD)
    a, b = ([i for x in out[r][1] for i in x] for r in range(WORLD))
    assert not set(a) & set(b) and len(set(a) | set(b)) == N - 1  # one row left out
    if workers:  # the same batches in the same order for any number of workers
        dm = HFDataModule(
            str(data / "hf"), streaming=True, val_fraction=0, img_size=16, batch_size=BATCH,
            shuffle_buffer=8, train_transform=_no_aug(),
        )  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=1, world_size=WORLD, current_epoch=0)
        dm.setup("fit")
        assert [ids_of(x) for x, _ in dm.train_dataloader()] == out[1][1]


def test_class_label_names_keep_the_dataset_order(tmp_path):
    """A ClassLabel ['zebra', 'apple', 'mango']: class 0 is 'zebra' (sorting the names would
    make it 'apple' and mislabel every image), in the data module and in the shards."""
    names = ["zebra", "apple", "mango"]
    rows = {"image": [], "label": []}
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(id_image(i)).save(path)
        rows["image"].append(str(path))
        rows["label"].append(i % 3)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    dm = HFDataModule(
        str(tmp_path / "hf"), val_fraction=0, img_size=16, batch_size=6, train_transform=_no_aug()
    )
    assert dm.num_classes == 3 and dm.classes == names
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    ids = ids_of(x)
    assert sorted(ids) == list(range(6))
    assert all(label == i % 3 for i, label in zip(ids, y.tolist()))  # image i has label i % 3
    pytest.importorskip("litdata")
    from vmoe.data import ShardDataModule, write_shards

    write_shards(str(tmp_path / "hf"), str(tmp_path / "s"), progress=False)
    assert ShardDataModule(str(tmp_path / "s"), img_size=16).classes == names


class RecordRank(L.Callback):
    """Each rank writes, per epoch, the ids of the images it trained on, its batch count and
    ``len()`` of its training loader; and when its first batch arrived after fit start."""

    def __init__(self, out_dir: str):
        self.out_dir, self.epochs, self.first_batch_s = out_dir, {}, None

    def setup(self, trainer, pl_module, stage):
        self.times = {"setup": time.time()}

    def on_train_start(self, trainer, pl_module):
        self._start = time.monotonic()
        self.times["train_start"] = time.time()

    def on_train_epoch_start(self, trainer, pl_module):
        self.times[f"epoch{trainer.current_epoch}_start"] = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch_s is None:
            self.first_batch_s = time.monotonic() - self._start
        self.times.setdefault(f"epoch{trainer.current_epoch}_first_batch", time.time())
        self.epochs.setdefault(str(trainer.current_epoch), []).append(ids_of(batch[0].cpu()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.times[f"epoch{trainer.current_epoch}_end"] = time.time()

    def on_train_end(self, trainer, pl_module):
        out = {
            "epochs": self.epochs,
            "len": len(trainer.train_dataloader),
            "first_batch_s": self.first_batch_s,
            "times": self.times,
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_vmoe_fit_ddp_two_gloo_ranks_from_shards_with_two_workers(data, tmp_path):
    pytest.importorskip("litdata")
    from vmoe.data import write_shards

    write_shards(str(data / "tree"), str(tmp_path / "s"), chunk_bytes="400B", progress=False)
    (tmp_path / "ranks").mkdir()
    start = time.monotonic()
    proc = cli_subprocess(
        tmp_path / "run",
        "--data",
        "vmoe.data.ShardDataModule",
        "--data.path",
        str(tmp_path / "s"),
        "--data.img_size",
        "16",
        "--data.batch_size",
        str(BATCH),
        "--data.num_workers",
        "2",
        "--data.train_transform",
        NO_AUG,
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.warmup_steps",
        "1",
        "--export.enabled",
        "false",
        "--trainer.callbacks+=tests.data.test_ranks.RecordRank",
        f"--trainer.callbacks.out_dir={tmp_path / 'ranks'}",
    )
    wall = time.monotonic() - start
    (tmp_path.parent / "ddp-times.json").write_text(
        json.dumps(
            {"start": time.time() - wall, "end": time.time(), "stderr": proc.stderr[-20000:]}
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    per_rank = N // WORLD
    for epoch in ("0", "1"):
        a, b = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(a) == len(b) == r0["len"] == r1["len"] == -(-per_rank // BATCH)
        a, b = [i for x in a for i in x], [i for x in b for i in x]
        assert len(a) == len(b) == per_rank and not set(a) & set(b)
        assert len(set(a) | set(b)) >= N - BATCH
    assert r0["epochs"]["0"] != r0["epochs"]["1"]  # reshuffled
    print(f"ddp fit wall {wall:.1f} s; first batch after fit start: {r0['first_batch_s']:.1f} s")
    assert max(r0["first_batch_s"], r1["first_batch_s"]) < 15  # the workers start in seconds


def test_workers_fork_in_a_spawned_rank(monkeypatch):
    """A rank started by torch.multiprocessing.spawn (or ddp_spawn) inherits the spawn start
    method; its loader workers would each re-import torch/Lightning/vmoe (measured 20-56 s to
    the first batch on the busy 2-core machine, 0.4 s forked): the loaders fork them on Linux."""
    import multiprocessing
    import sys

    from vmoe.data.datasets import worker_context
    from vmoe.data.digits import DigitsDataModule

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    expected = "fork" if sys.platform.startswith("linux") else None
    assert worker_context(2) == expected and worker_context(0) is None
    dm = DigitsDataModule(num_workers=2)
    dm.setup("fit")
    assert dm.train_dataloader().multiprocessing_context is not None or expected is None
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert worker_context(2) is None
